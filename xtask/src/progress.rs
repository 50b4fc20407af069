//! Progress lines for long commands (`cargo xtask setup`, `test`, `bench`), so a step that takes
//! minutes is never minutes of silence: every step ends with one line saying how far along the
//! command is, how the step ended and how long it took, and a step with real work to do (an apt
//! install, a build, a benchmark scenario) also says when it starts.
//!
//! ```text
//! [setup 1/6] Debian packages: all 17 present (0.1 s)
//! [setup 3/6] kube-apiserver 1.20.2: building from Debian's source package (about 5 minutes) ...
//! [setup 3/6] kube-apiserver 1.20.2: built (4 min 51 s)
//! ```
//!
//! std only, and shared with `strait-bench` (which includes this file), since xtask is the
//! first thing built on a fresh machine.

use std::{
    io::Write,
    time::{Duration, Instant},
};

/// Numbered steps of one command, written to `out` (stderr, or a buffer in tests).
pub struct Progress<W: Write> {
    task: &'static str,
    total: usize,
    done: usize,
    out: W,
}

/// The step being run: lets it announce long work and say how it ended.
pub struct Step<'a, W: Write> {
    prefix: &'a str,
    out: &'a mut W,
    outcome: Option<String>,
}

impl<W: Write> Step<'_, W> {
    /// Says the step has long work to do (`doing`), before doing it.
    pub fn start(&mut self, doing: &str) {
        let _ = writeln!(self.out, "{}: {doing} ...", self.prefix);
    }

    /// How the step ended when it succeeded (`ok` if never said).
    pub fn outcome(&mut self, outcome: impl Into<String>) {
        self.outcome = Some(outcome.into());
    }
}

impl<W: Write> Progress<W> {
    /// `total` steps of `task` (`setup`, `bench`, ...).
    pub fn new(task: &'static str, total: usize, out: W) -> Self {
        Self { task, total, done: 0, out }
    }

    /// Runs the next step, `what`, and writes its end line.
    pub fn run<T, E>(&mut self, what: &str, work: impl FnOnce(&mut Step<'_, W>) -> Result<T, E>) -> Result<T, E> {
        self.done += 1;
        let prefix = format!("[{} {}/{}] {what}", self.task, self.done, self.total.max(self.done));
        let started = Instant::now();
        let mut step = Step { prefix: &prefix, out: &mut self.out, outcome: None };
        let result = work(&mut step);
        let outcome = match &result {
            Ok(_) => step.outcome.take().unwrap_or_else(|| "ok".to_owned()),
            Err(_) => "failed".to_owned(),
        };
        let _ = writeln!(self.out, "{prefix}: {outcome} ({})", elapsed(started.elapsed()));
        result
    }
}

/// A step's duration as a person reads it: `0.3 s`, `42 s`, `4 min 51 s`.
pub fn elapsed(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 10.0 {
        format!("{secs:.1} s")
    } else if secs < 60.0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} min {} s", d.as_secs() / 60, d.as_secs() % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(out: &[u8]) -> Vec<String> {
        String::from_utf8_lossy(out).lines().map(str::to_owned).collect()
    }

    #[test]
    fn durations_read_as_seconds_then_minutes() {
        assert_eq!(elapsed(Duration::from_millis(340)), "0.3 s");
        assert_eq!(elapsed(Duration::from_millis(9_960)), "10.0 s");
        assert_eq!(elapsed(Duration::from_secs(42)), "42 s");
        assert_eq!(elapsed(Duration::from_secs(291)), "4 min 51 s");
    }

    // Nothing to do: one line per step, numbered, with its outcome and time.
    #[test]
    fn steps_with_nothing_to_do_write_one_line_each() {
        let mut out = Vec::new();
        let mut progress = Progress::new("setup", 2, &mut out);
        progress
            .run("Debian packages", |step| {
                step.outcome("all 17 present");
                Ok::<_, String>(())
            })
            .expect("ok");
        progress.run("bpf-linker 0.13.0", |_| Ok::<_, String>(())).expect("ok");
        let lines = lines(&out);
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("[setup 1/2] Debian packages: all 17 present ("), "{lines:?}");
        assert!(lines[1].starts_with("[setup 2/2] bpf-linker 0.13.0: ok ("), "{lines:?}");
        assert!(lines.iter().all(|l| l.ends_with(" s)")), "{lines:?}");
    }

    // Long work says when it starts; a failure says so and passes the error on.
    #[test]
    fn long_steps_announce_their_start_and_failures_are_named() {
        let mut out = Vec::new();
        let mut progress = Progress::new("bench", 3, &mut out);
        let value = progress
            .run("latency", |step| {
                step.start("direct, node path and waypoint at 1,000 req/s");
                Ok::<_, String>(7)
            })
            .expect("ok");
        assert_eq!(value, 7);
        let error = progress.run("cpu", |_| Err::<(), _>("no perf".to_owned())).expect_err("fails");
        assert_eq!(error, "no perf");
        let lines = lines(&out);
        assert_eq!(lines[0], "[bench 1/3] latency: direct, node path and waypoint at 1,000 req/s ...");
        assert!(lines[1].starts_with("[bench 1/3] latency: ok ("), "{lines:?}");
        assert!(lines[2].starts_with("[bench 2/3] cpu: failed ("), "{lines:?}");
    }
}
