//! Keeping a proxy's model in step with its configuration directory (CFG-1): compile every
//! change, publish it when it has no errors, keep the last good model otherwise.

use std::{path::Path, time::Duration};

use anyhow::anyhow;
use tracing::{error, info, warn};

use super::{Model, ModelHandle, ModelPublisher, channel, compile};
use crate::config::{ConfigDir, Loaded};

/// How often the configuration directory is checked for changes (CFG-1: applied within 1 s).
const CONFIG_POLL: Duration = Duration::from_millis(200);

/// Compiles loaded resources; on errors logs every diagnostic and returns their count.
pub fn compile_or_report(loaded: &Loaded) -> Result<Model, usize> {
    let (model, compile_diagnostics) = compile(&loaded.resources);
    let all = loaded.diagnostics.iter().chain(compile_diagnostics.iter());
    let mut errors = 0;
    for diagnostic in all {
        if diagnostic.is_error() {
            errors += 1;
            error!("{diagnostic}");
        } else {
            warn!("{diagnostic}");
        }
    }
    if errors == 0 { Ok(model) } else { Err(errors) }
}

/// Loads `dir` (which must be valid) and starts a thread that publishes every valid change;
/// returns the handle consumers read the model from.
pub fn load_and_watch(dir: &Path) -> anyhow::Result<ModelHandle> {
    let mut config_dir = ConfigDir::new(dir);
    let loaded = config_dir.poll().unwrap_or_default();
    let initial = compile_or_report(&loaded).map_err(|n| {
        anyhow!("the configuration in {} has {n} error(s), listed above; fix them and start again", dir.display())
    })?;
    let (publisher, model) = channel(initial);
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || watch(config_dir, publisher))
        .map_err(|e| anyhow!("cannot start the configuration watcher: {e}"))?;
    Ok(model)
}

fn watch(mut dir: ConfigDir, mut publisher: ModelPublisher) {
    loop {
        std::thread::sleep(CONFIG_POLL);
        let Some(loaded) = dir.poll() else { continue };
        match compile_or_report(&loaded) {
            Ok(model) => {
                info!(workloads = model.workloads.len(), "configuration applied");
                publisher.publish(model);
            }
            Err(n) => error!("configuration rejected ({n} error(s) above); the previous configuration stays in force"),
        }
    }
}
