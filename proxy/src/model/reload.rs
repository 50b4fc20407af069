//! Keeping a proxy's model in step with its configuration directory (CFG-1): compile every
//! settled change, publish it when it has no errors, keep the last good model otherwise.
//!
//! A change that would stop capturing every workload because they are missing from it is held
//! back (OPS-5): a directory being rewritten, or emptied by mistake, must not turn the mesh off
//! and let pods talk in plaintext. It applies only if it stays so for the hold period
//! (`--empty-config-hold`); un-enrolling pods on purpose applies at once.

use std::{
    collections::BTreeSet,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::anyhow;
use tracing::{error, info, warn};

use super::{Model, ModelHandle, ModelPublisher, channel, compile};
use crate::config::{CONFIG_POLL, ConfigDir, Loaded, Located, Resource};

/// Compiles loaded resources; on errors logs every diagnostic and returns their count.
pub fn compile_or_report(loaded: &Loaded) -> Result<Model, usize> {
    let (model, mut compile_diagnostics) = compile(&loaded.resources);
    loaded.locate(&mut compile_diagnostics);
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
/// returns the handle consumers read the model from. A change that loses every captured
/// workload replaces the model in force only after it has stayed so for `empty_hold`.
pub fn load_and_watch(dir: &Path, empty_hold: Duration) -> anyhow::Result<ModelHandle> {
    load_and_watch_then(dir, empty_hold, |_, _| {})
}

/// Like `load_and_watch`; `on_apply` also sees every model published, with the resources it was
/// compiled from, before the model's consumers do (the control plane builds its xDS snapshot
/// there).
pub fn load_and_watch_then(
    dir: &Path,
    empty_hold: Duration,
    on_apply: impl FnMut(&Model, &[Located<Resource>]) + Send + 'static,
) -> anyhow::Result<ModelHandle> {
    follow_then(ConfigDir::new(dir), empty_hold, on_apply)
}

/// Where settled configurations come from (CFG-1, CFG-3): a directory, or the Kubernetes API.
pub trait Source: Send + 'static {
    /// The first complete configuration; blocks until there is one.
    fn first_read(&mut self) -> Loaded;
    /// The next settled change, if any; called every [`CONFIG_POLL`].
    fn poll(&mut self) -> Option<Loaded>;
    /// What the source is, for messages.
    fn describe(&self) -> String;
    /// Whether a resource with errors is left out and the rest applied, instead of the whole
    /// change being rejected: true for the API server, whose objects are independent and
    /// already accepted by it (CFG-3); false for a directory, written as one change (CFG-1).
    fn skips_invalid(&self) -> bool {
        false
    }
}

impl Source for ConfigDir {
    fn first_read(&mut self) -> Loaded {
        ConfigDir::first_read(self)
    }

    fn poll(&mut self) -> Option<Loaded> {
        ConfigDir::poll(self)
    }

    fn describe(&self) -> String {
        self.dir().display().to_string()
    }
}

/// Compiles `loaded`; with `skip_invalid`, leaves out every resource an error names and
/// compiles again, so that one bad object never holds the others back.
fn compile_source(loaded: Loaded, skip_invalid: bool) -> (Result<Model, usize>, Loaded) {
    if !skip_invalid {
        let compiled = compile_or_report(&loaded);
        return (compiled, loaded);
    }
    let mut loaded = loaded;
    // Each round removes at least one resource, so this ends.
    loop {
        let (model, mut diagnostics) = compile(&loaded.resources);
        loaded.locate(&mut diagnostics);
        let bad: BTreeSet<&Path> = loaded
            .diagnostics
            .iter()
            .chain(diagnostics.iter())
            .filter(|d| d.is_error())
            .map(|d| d.origin.file.as_path())
            .collect();
        if bad.is_empty() {
            for diagnostic in loaded.diagnostics.iter().chain(diagnostics.iter()) {
                warn!("{diagnostic}");
            }
            return (Ok(model), loaded);
        }
        let before = loaded.resources.len();
        let bad: BTreeSet<std::path::PathBuf> = bad.into_iter().map(Path::to_path_buf).collect();
        for diagnostic in loaded.diagnostics.iter().chain(diagnostics.iter()).filter(|d| d.is_error()) {
            error!("{diagnostic}; this resource is left out");
        }
        loaded.resources.retain(|r| !bad.contains(&r.origin.file));
        loaded.diagnostics.retain(|d| !d.is_error());
        if loaded.resources.len() == before {
            // An error about no resource that can be left out: reject the change.
            return (Err(bad.len()), loaded);
        }
    }
}

/// Like `load_and_watch_then`, for any [`Source`].
pub fn follow_then(
    mut source: impl Source,
    empty_hold: Duration,
    mut on_apply: impl FnMut(&Model, &[Located<Resource>]) + Send + 'static,
) -> anyhow::Result<ModelHandle> {
    let loaded = source.first_read();
    let (initial, loaded) = compile_source(loaded, source.skips_invalid());
    let initial = initial.map_err(|n| {
        anyhow!("the configuration in {} has {n} error(s), listed above; fix them and start again", source.describe())
    })?;
    let in_force = captured(&initial);
    on_apply(&initial, &loaded.resources);
    let (publisher, model) = channel(initial);
    let guard = LossGuard::new(empty_hold);
    std::thread::Builder::new()
        .name("config-watch".into())
        .spawn(move || watch(source, publisher, guard, in_force, &mut on_apply))
        .map_err(|e| anyhow!("cannot start the configuration watcher: {e}"))?;
    Ok(model)
}

/// The captured workloads of a model, as `(namespace, name)`.
fn captured(model: &Model) -> BTreeSet<(String, String)> {
    model.workloads.iter().filter(|w| w.captured).map(|w| (w.namespace.clone(), w.name.clone())).collect()
}

fn watch(
    mut dir: impl Source,
    mut publisher: ModelPublisher,
    mut guard: LossGuard,
    mut in_force: BTreeSet<(String, String)>,
    on_apply: &mut dyn FnMut(&Model, &[Located<Resource>]),
) {
    // A valid change the guard holds back, re-examined on every tick until it applies or is
    // replaced by the next change.
    let mut held: Option<(Model, Change, Loaded)> = None;
    loop {
        std::thread::sleep(CONFIG_POLL);
        if let Some(loaded) = dir.poll() {
            let (compiled, loaded) = compile_source(loaded, dir.skips_invalid());
            match compiled {
                Ok(model) => {
                    let change = Change::between(&in_force, &model, &loaded);
                    held = Some((model, change, loaded));
                }
                Err(n) => {
                    error!("configuration rejected ({n} error(s) above); the previous configuration stays in force");
                    held = None;
                    guard.reset();
                    continue;
                }
            }
        }
        let Some((candidate, change, loaded)) = held.take() else { continue };
        match guard.admit(&change, Instant::now()) {
            Admission::Apply => {}
            Admission::Hold { first } => {
                if first {
                    warn!(
                        captured_in_force = in_force.len(),
                        missing = change.lost,
                        "the new configuration captures no workload and lacks the ones captured now (or their \
                         namespace): the previous one stays in force unless the directory stays so for {}s \
                         (--empty-config-hold), as a directory being rewritten must not turn the mesh off",
                        guard.hold.as_secs_f64()
                    );
                }
                held = Some((candidate, change, loaded));
                continue;
            }
            Admission::HeldLongEnough => warn!(
                "the configuration has captured no workload for {}s: applying it; capture is off",
                guard.hold.as_secs_f64()
            ),
        }
        in_force = captured(&candidate);
        info!(workloads = candidate.workloads.len(), captured = in_force.len(), "configuration applied");
        on_apply(&candidate, &loaded.resources);
        publisher.publish(candidate);
    }
}

/// What a valid configuration would do to the workloads captured now (OPS-5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Change {
    /// Workloads it captures.
    captured: usize,
    /// Workloads captured now that it lacks, or whose namespace it lacks: lost to a directory
    /// being rewritten, as opposed to un-enrolled on purpose (still there, not captured).
    lost: usize,
}

impl Change {
    fn between(in_force: &BTreeSet<(String, String)>, candidate: &Model, loaded: &Loaded) -> Self {
        let namespaces: BTreeSet<&str> = loaded
            .resources
            .iter()
            .filter_map(|r| match &r.resource {
                Resource::Namespace(ns) => Some(ns.metadata.name.as_str()),
                _ => None,
            })
            .collect();
        let listed: BTreeSet<(&str, &str)> =
            candidate.workloads.iter().map(|w| (w.namespace.as_str(), w.name.as_str())).collect();
        let lost = in_force
            .iter()
            .filter(|(ns, name)| !namespaces.contains(ns.as_str()) || !listed.contains(&(ns.as_str(), name.as_str())))
            .count();
        Self { captured: candidate.workloads.iter().filter(|w| w.captured).count(), lost }
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
    /// It has lost every captured workload for the whole hold period: apply it.
    HeldLongEnough,
}

/// Holds back configurations that capture no workload because the ones captured now are
/// missing from them, until they have stayed so for `hold`. Pure: time comes in as an argument.
#[derive(Debug)]
struct LossGuard {
    hold: Duration,
    /// When the configurations seen started losing every captured workload.
    since: Option<Instant>,
}

impl LossGuard {
    fn new(hold: Duration) -> Self {
        Self { hold, since: None }
    }

    fn admit(&mut self, change: &Change, now: Instant) -> Admission {
        if change.captured > 0 || change.lost == 0 {
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

    /// An invalid configuration came in between: the next loss starts a new hold.
    fn reset(&mut self) {
        self.since = None;
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path as FsPath;

    use super::*;
    use crate::config::parse_file;

    const HOLD: Duration = Duration::from_secs(30);

    fn at(t0: Instant, secs: u64) -> Instant {
        t0 + Duration::from_secs(secs)
    }

    fn lost(n: usize) -> Change {
        Change { captured: 0, lost: n }
    }

    // OPS-5: losing every captured workload is held for the hold period, counted from the first
    // such configuration even as the directory keeps changing, then applied.
    #[test]
    fn losing_every_captured_workload_waits_for_the_hold() {
        let t0 = Instant::now();
        let mut guard = LossGuard::new(HOLD);
        let steps = [
            (0, lost(5), Admission::Hold { first: true }),
            (10, lost(5), Admission::Hold { first: false }),
            (29, lost(2), Admission::Hold { first: false }),
            (30, lost(5), Admission::HeldLongEnough),
            (31, Change { captured: 0, lost: 0 }, Admission::Apply),
        ];
        for (secs, change, expected) in steps {
            assert_eq!(guard.admit(&change, at(t0, secs)), expected, "at {secs} s");
        }
    }

    // A configuration that captures again ends the hold; the next loss starts a new one.
    #[test]
    fn a_configuration_that_captures_again_ends_the_hold() {
        let t0 = Instant::now();
        let mut guard = LossGuard::new(HOLD);
        assert_eq!(guard.admit(&lost(5), at(t0, 0)), Admission::Hold { first: true });
        assert_eq!(guard.admit(&Change { captured: 3, lost: 2 }, at(t0, 20)), Admission::Apply);
        assert_eq!(guard.admit(&lost(3), at(t0, 40)), Admission::Hold { first: true });
        assert_eq!(guard.admit(&lost(3), at(t0, 69)), Admission::Hold { first: false });
        guard.reset();
        assert_eq!(guard.admit(&lost(3), at(t0, 75)), Admission::Hold { first: true });
    }

    // Fewer workloads, un-enrolment on purpose, or a hold of zero: applied at once.
    #[test]
    fn other_changes_apply_at_once() {
        let now = Instant::now();
        assert_eq!(LossGuard::new(HOLD).admit(&Change { captured: 1, lost: 4 }, now), Admission::Apply);
        assert_eq!(LossGuard::new(HOLD).admit(&Change { captured: 0, lost: 0 }, now), Admission::Apply);
        assert_eq!(LossGuard::new(Duration::ZERO).admit(&lost(5), now), Admission::HeldLongEnough);
    }

    fn change(in_force: &str, candidate: &str) -> Change {
        let compiled = |yaml: &str| {
            let (resources, _) = parse_file(FsPath::new("c.yaml"), yaml);
            let (model, _) = compile(&resources);
            (model, Loaded { resources, ..Loaded::default() })
        };
        let (before, _) = compiled(in_force);
        let (after, loaded) = compiled(candidate);
        Change::between(&captured(&before), &after, &loaded)
    }

    // What counts as lost: a pod missing, or its namespace missing (its enrolment unknown); a
    // pod opted out or a namespace un-labelled is released on purpose.
    #[test]
    fn missing_pods_and_namespaces_are_lost_opted_out_ones_are_not() {
        let ns = |labels: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: mesh{labels}\n---\n");
        let pod = |name: &str, ip: &str, labels: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: mesh{labels}\nspec: {{nodeName: n1}}\nstatus: {{podIP: {ip}}}\n---\n"
            )
        };
        let ambient = ns("\n  labels: {istio.io/dataplane-mode: ambient}");
        let now = [ambient.clone(), pod("a", "10.1.0.1", ""), pod("b", "10.1.0.2", "")].concat();
        let cases = [
            ("everything deleted", String::new(), lost(2)),
            ("the namespace file missing", [pod("a", "10.1.0.1", ""), pod("b", "10.1.0.2", "")].concat(), lost(2)),
            ("one pod left", [ambient.clone(), pod("a", "10.1.0.1", "")].concat(), Change { captured: 1, lost: 1 }),
            ("namespace un-enrolled", [ns(""), pod("a", "10.1.0.1", ""), pod("b", "10.1.0.2", "")].concat(), lost(0)),
            (
                "pods opted out",
                [
                    ambient.clone(),
                    pod("a", "10.1.0.1", "\n  labels: {istio.io/dataplane-mode: none}"),
                    pod("b", "10.1.0.2", "\n  labels: {istio.io/dataplane-mode: none}"),
                ]
                .concat(),
                lost(0),
            ),
        ];
        for (what, candidate, expected) in cases {
            assert_eq!(change(&now, &candidate), expected, "{what}");
        }
    }

    // CFG-3: from the API server, a resource with an error is left out and the rest applies;
    // from a directory, the whole change is rejected (CFG-1).
    #[test]
    fn a_source_of_independent_objects_leaves_out_only_the_bad_one() {
        let read = |file: &str, yaml: &str| parse_file(FsPath::new(file), yaml).0;
        let ns =
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}\n";
        let pod = |name: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: mesh}}\nspec: {{nodeName: n1}}\nstatus: {{podIP: 10.1.0.1}}\n"
            )
        };
        let loaded = || {
            let resources =
                [read("k8s:Namespace/mesh", ns), read("k8s:Pod/mesh/a", &pod("a")), read("k8s:Pod/mesh/b", &pod("b"))]
                    .concat();
            Loaded { resources, ..Loaded::default() }
        };
        let (model, kept) = compile_source(loaded(), true);
        let model = model.expect("the rest compiles");
        assert_eq!(model.workloads.iter().map(|w| w.name.as_str()).collect::<Vec<_>>(), ["a"]);
        assert_eq!(kept.resources.len(), 2);
        assert!(compile_source(loaded(), false).0.is_err());
    }
}
