//! A background process started in a namespace, and its log.
//!
//! Tests mostly learn what a process is doing by reading its log (a proxy says it is ready, a
//! server logs a request), so waiting on log lines with a timeout is the main interface. Dropping
//! the handle stops the process: a test that fails half-way must not leave servers running.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::netns::Shared;

/// How long a process gets to exit after SIGTERM before it is killed.
const TERM_GRACE: Duration = Duration::from_secs(2);
/// How often logs and exit status are polled: short next to test timeouts, long next to a read.
const POLL: Duration = Duration::from_millis(20);
/// Lines of log quoted in errors.
const TAIL_LINES: usize = 30;

/// A running (or finished) background process; stopped with SIGTERM, then SIGKILL, on drop.
#[derive(Debug)]
pub struct Process {
    /// The name given at spawn, used in errors.
    name: String,
    pid: u32,
    /// Behind a lock so a `Process` can be shared (`&Process`, `Arc<Process>`) across threads.
    state: Mutex<ChildState>,
    log_path: PathBuf,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct ChildState {
    child: Child,
    /// Set once the child has been reaped; its pid may then be reused, so no more signals.
    exit: Option<ExitStatus>,
}

impl Process {
    pub(crate) fn new(name: String, child: Child, log_path: PathBuf, shared: Arc<Shared>) -> Process {
        let pid = child.id();
        Process { name, pid, state: Mutex::new(ChildState { child, exit: None }), log_path, shared }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The log as it is now (stdout and stderr interleaved); empty if it cannot be read.
    pub fn log(&self) -> String {
        fs::read(&self.log_path).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    /// How many log lines contain `needle`.
    pub fn count_log_lines(&self, needle: &str) -> usize {
        self.log().lines().filter(|l| l.contains(needle)).count()
    }

    /// Waits until a log line contains `needle` and returns that line. Fails at the timeout, or
    /// as soon as the process exits without having logged it; the error quotes the log's tail.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> io::Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            // Read the exit status before the log, so a line written just before exiting is seen.
            let exited = self.poll_exit();
            if let Some(line) = self.log().lines().find(|l| l.contains(needle)) {
                return Ok(line.to_string());
            }
            if let Some(status) = exited {
                return Err(io::Error::other(format!(
                    "process {} exited ({status}) without logging {needle:?}; log {} ends with:\n{}",
                    self.name,
                    self.log_path.display(),
                    self.log_tail()
                )));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "process {} did not log {needle:?} within {timeout:?}; log {} ends with:\n{}",
                        self.name,
                        self.log_path.display(),
                        self.log_tail()
                    ),
                ));
            }
            thread::sleep(POLL);
        }
    }

    /// The last lines of the log, for error messages.
    pub fn log_tail(&self) -> String {
        tail(&self.log(), TAIL_LINES)
    }

    pub fn is_running(&self) -> bool {
        self.poll_exit().is_none()
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`); a no-op once the process has been reaped.
    pub fn terminate(&self, signal: i32) -> io::Result<()> {
        // Holding the lock keeps the child from being reaped (and its pid reused) meanwhile.
        let mut state = self.lock();
        if self.reap(&mut state).is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.pid).map_err(io::Error::other)?;
        // SAFETY: kill has no memory effects; the child is not reaped, so the pid is still ours.
        if unsafe { libc::kill(pid, signal) } == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.poll_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(POLL);
        }
    }

    fn poll_exit(&self) -> Option<ExitStatus> {
        self.reap(&mut self.lock())
    }

    fn reap(&self, state: &mut ChildState) -> Option<ExitStatus> {
        if state.exit.is_none()
            && let Ok(Some(status)) = state.child.try_wait()
        {
            state.exit = Some(status);
            self.shared.forget_pid(self.pid);
        }
        state.exit
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ChildState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if self.poll_exit().is_some() {
            return;
        }
        let _ = self.terminate(libc::SIGTERM);
        if self.wait_exit(TERM_GRACE).is_none() {
            let _ = self.terminate(libc::SIGKILL);
            let mut state = self.lock();
            if let Ok(status) = state.child.wait() {
                state.exit = Some(status);
                self.shared.forget_pid(self.pid);
            }
        }
    }
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
        assert_eq!(tail("", 5), "");
    }
}
