//! Keeping a proxy's model in step with its configuration directory (CFG-1): compile every
//! settled change, publish it when it has no errors, keep the last good model otherwise.
//!
//! A change that would stop capturing every workload is held back (OPS-5): the directory being
//! rewritten, or emptied by mistake, must not turn the mesh off and let pods talk in plaintext.
//! It applies only if it stays so for the hold period (`--empty-config-hold`).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::anyhow;
use tracing::{error, info, warn};

use super::{Model, ModelHandle, ModelPublisher, channel, compile};
use crate::config::{CONFIG_POLL, ConfigDir, Loaded};

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
/// returns the handle consumers read the model from. A change capturing no workload replaces
/// one capturing some only after it has stayed so for `empty_hold`.
pub fn load_and_watch(dir: &Path, empty_hold: Duration) -> anyhow::Result<ModelHandle> {
    let mut config_dir = ConfigDir::new(dir);
    let loaded = config_dir.first_read();
    let initial = compile_or_report(&loaded).map_err(|n| {
        anyhow!("the configuration in {} has {n} error(s), listed above; fix them and start again", dir.display())
    })?;
    let in_force = captured(&initial);
    let (publisher, model) = channel(initial);
    let guard = LossGuard::new(empty_hold);
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || watch(config_dir, publisher, guard, in_force))
        .map_err(|e| anyhow!("cannot start the configuration watcher: {e}"))?;
    Ok(model)
}

fn captured(model: &Model) -> usize {
    model.workloads.iter().filter(|w| w.captured).count()
}

fn watch(mut dir: ConfigDir, mut publisher: ModelPublisher, mut guard: LossGuard, mut in_force: usize) {
    // A valid change the guard holds back, re-examined on every tick until it applies or is
    // replaced by the next change.
    let mut held: Option<Model> = None;
    loop {
        std::thread::sleep(CONFIG_POLL);
        if let Some(loaded) = dir.poll() {
            match compile_or_report(&loaded) {
                Ok(model) => held = Some(model),
                Err(n) => {
                    error!("configuration rejected ({n} error(s) above); the previous configuration stays in force");
                    held = None;
                    guard.reset();
                    continue;
                }
            }
        }
        let Some(candidate) = held.take() else { continue };
        let candidate_captured = captured(&candidate);
        match guard.admit(in_force, candidate_captured, Instant::now()) {
            Admission::Apply => {}
            Admission::Hold { first } => {
                if first {
                    warn!(
                        captured_in_force = in_force,
                        "the new configuration captures no workload: the previous one stays in force unless the \
                         directory stays so for {}s (--empty-config-hold), as a directory being rewritten must not \
                         turn the mesh off",
                        guard.hold.as_secs_f64()
                    );
                }
                held = Some(candidate);
                continue;
            }
            Admission::HeldLongEnough => warn!(
                "the configuration has captured no workload for {}s: applying it; capture is off",
                guard.hold.as_secs_f64()
            ),
        }
        info!(workloads = candidate.workloads.len(), captured = candidate_captured, "configuration applied");
        in_force = candidate_captured;
        publisher.publish(candidate);
    }
}

/// What to do with a valid configuration (OPS-5).
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    Apply,
    /// Keep the configuration in force; `first` when the hold has just begun.
    Hold {
        first: bool,
    },
    /// It captures nothing, and has for the whole hold period: apply it.
    HeldLongEnough,
}

/// Holds back configurations that capture no workload while the one in force captures some,
/// until they have stayed so for `hold`. Pure: time comes in as an argument.
#[derive(Debug)]
struct LossGuard {
    hold: Duration,
    /// When the configurations seen started capturing nothing.
    since: Option<Instant>,
}

impl LossGuard {
    fn new(hold: Duration) -> Self {
        Self { hold, since: None }
    }

    fn admit(&mut self, in_force: usize, candidate: usize, now: Instant) -> Admission {
        if candidate > 0 || in_force == 0 {
            self.since = None;
            return Admission::Apply;
        }
        match self.since {
            _ if self.hold.is_zero() => Admission::HeldLongEnough,
            None => {
                self.since = Some(now);
                Admission::Hold { first: true }
            }
            Some(since) if now.saturating_duration_since(since) >= self.hold => {
                self.since = None;
                Admission::HeldLongEnough
            }
            Some(_) => Admission::Hold { first: false },
        }
    }

    /// An invalid configuration came in between: the next empty one starts a new hold.
    fn reset(&mut self) {
        self.since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOLD: Duration = Duration::from_secs(30);

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    // OPS-5: losing every captured workload is held for the hold period, counted from the first
    // such configuration even as the directory keeps changing, then applied.
    #[test]
    fn losing_every_captured_workload_waits_for_the_hold() {
        let t0 = Instant::now();
        let mut guard = LossGuard::new(HOLD);
        let steps = [
            (0, 5, 0, Admission::Hold { first: true }),
            (10, 5, 0, Admission::Hold { first: false }),
            (29, 5, 0, Admission::Hold { first: false }),
            (30, 5, 0, Admission::HeldLongEnough),
            (31, 0, 0, Admission::Apply),
        ];
        for (secs, in_force, candidate, expected) in steps {
            assert_eq!(guard.admit(in_force, candidate, at(t0, secs)), expected, "at {secs} s");
        }
    }

    // A configuration that captures again ends the hold; the next loss starts a new one.
    #[test]
    fn a_configuration_that_captures_again_ends_the_hold() {
        let t0 = Instant::now();
        let mut guard = LossGuard::new(HOLD);
        assert_eq!(guard.admit(5, 0, at(t0, 0)), Admission::Hold { first: true });
        assert_eq!(guard.admit(5, 3, at(t0, 20)), Admission::Apply);
        assert_eq!(guard.admit(3, 0, at(t0, 40)), Admission::Hold { first: true });
        assert_eq!(guard.admit(3, 0, at(t0, 69)), Admission::Hold { first: false });
        guard.reset();
        assert_eq!(guard.admit(3, 0, at(t0, 75)), Admission::Hold { first: true });
    }

    // Fewer workloads, a mesh that captured nothing anyway, or a hold of zero: applied at once.
    #[test]
    fn other_changes_apply_at_once() {
        let now = Instant::now();
        assert_eq!(LossGuard::new(HOLD).admit(5, 1, now), Admission::Apply);
        assert_eq!(LossGuard::new(HOLD).admit(0, 0, now), Admission::Apply);
        assert_eq!(LossGuard::new(HOLD).admit(0, 4, now), Admission::Apply);
        assert_eq!(LossGuard::new(Duration::ZERO).admit(5, 0, now), Admission::HeldLongEnough);
    }
}
