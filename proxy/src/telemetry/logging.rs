//! The process's log subscriber, with a filter that can be changed while running (OBS-3
//! `/logging`), so an operator can turn on debug logs without restarting a proxy that holds
//! live connections.

use tracing_subscriber::{EnvFilter, Registry, layer::SubscriberExt as _, reload, util::SubscriberInitExt as _};

/// Changes and reports the log filter of the running process.
#[derive(Debug, Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl LogControl {
    /// The filter in force, as `RUST_LOG` would spell it.
    pub fn current(&self) -> String {
        self.handle.with_current(ToString::to_string).unwrap_or_else(|e| format!("unknown ({e})"))
    }

    /// Replaces the filter (`debug`, `info,strait=trace`, ...); a bad filter changes nothing.
    pub fn set(&self, filter: &str) -> Result<(), String> {
        let parsed = EnvFilter::try_new(filter).map_err(|e| format!("`{filter}` is not a log filter: {e}"))?;
        self.handle.reload(parsed).map_err(|e| format!("cannot change the log filter: {e}"))
    }
}

/// Installs the global subscriber: logs on stderr, filtered by `filter` (`info` if it does not
/// parse). Call once, at start.
pub fn init(filter: &str) -> LogControl {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let output = tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(std::io::stderr);
    tracing_subscriber::registry().with(filter).with(output).init();
    LogControl { handle }
}
