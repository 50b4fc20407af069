//! Running `ip` and friends with errors that say what failed.
//!
//! Every failure of a setup step must tell the reader which command ran and what it printed on
//! stderr, because the test that hits it usually runs in parallel with others and cannot be
//! stepped through.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Output, Stdio};

/// Where cross-process state lives: the lock below and the owner records (see `cleanup`).
/// `/run` is a tmpfs, emptied at boot like `/run/netns` itself.
pub const STATE_DIR: &str = "/run/strait-testbed";

/// Runs `program args...` to completion, capturing stdout and stderr.
pub fn run<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> io::Result<Output> {
    let program = program.as_ref();
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| spawn_error(&command_line(program, args), e))
}

/// Runs `program args...` and returns its stdout, or an error naming the command, its exit
/// status and its stderr.
pub fn run_ok<S: AsRef<OsStr>>(program: impl AsRef<OsStr>, args: &[S]) -> io::Result<String> {
    let output = run(&program, args)?;
    check(&command_line(program.as_ref(), args), output)
}

/// `run_ok` for `ip` itself, the command behind almost every setup step.
pub fn ip(args: &[&str]) -> io::Result<String> {
    run_ok("ip", args)
}

/// Turns a finished command's output into its stdout, or an error if it did not exit 0.
pub fn check(command_line: &str, output: Output) -> io::Result<String> {
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stderr = stderr.trim();
    let stderr = if stderr.is_empty() { "(no stderr)" } else { stderr };
    Err(io::Error::other(format!("`{command_line}` failed ({}): {stderr}", output.status)))
}

/// The command as a reader would type it, for error messages.
pub fn command_line<S: AsRef<OsStr>>(program: &OsStr, args: &[S]) -> String {
    let mut line = program.to_string_lossy().into_owned();
    for arg in args {
        line.push(' ');
        line.push_str(&arg.as_ref().to_string_lossy());
    }
    line
}

/// An error for a command that could not even start; a missing program gets a hint, since the
/// usual cause is a binary of this project that has not been built yet.
pub fn spawn_error(command_line: &str, err: io::Error) -> io::Error {
    if err.kind() == io::ErrorKind::NotFound {
        io::Error::new(
            err.kind(),
            format!(
                "cannot run `{command_line}`: program not found (for strait's own binaries, \
                 build it first: cargo build --bins)"
            ),
        )
    } else {
        io::Error::new(err.kind(), format!("cannot run `{command_line}`: {err}"))
    }
}

/// Prefixes an error with the step that was being taken, keeping its kind.
pub fn context(what: impl std::fmt::Display) -> impl FnOnce(io::Error) -> io::Error {
    move |err| io::Error::new(err.kind(), format!("{what}: {err}"))
}

/// An exclusive lock shared by every thread and process using the testbed.
///
/// `ip netns add` mounts `/run/netns` on first use and two processes doing that at once stack
/// mounts; holding this lock around namespace creation and deletion avoids that. It is an
/// `flock`, so the kernel releases it when a crashed holder's file is closed.
pub struct GlobalLock {
    _file: File,
}

impl GlobalLock {
    pub fn acquire() -> io::Result<GlobalLock> {
        fs::create_dir_all(STATE_DIR).map_err(context(format!("creating {STATE_DIR}")))?;
        let path = Path::new(STATE_DIR).join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(context(format!("opening {}", path.display())))?;
        loop {
            // SAFETY: flock only reads the descriptor, which `file` keeps open.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(GlobalLock { _file: file });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(context(format!("locking {}", path.display()))(err));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::ExitStatus;

    #[test]
    fn failed_command_error_names_command_status_and_stderr() {
        let output = Output {
            status: ExitStatus::from_raw(2 << 8),
            stdout: Vec::new(),
            stderr: b"RTNETLINK answers: File exists\n".to_vec(),
        };
        let err = check("ip -n x link add", output).unwrap_err().to_string();
        assert!(err.contains("`ip -n x link add`"), "{err}");
        assert!(err.contains("exit status: 2"), "{err}");
        assert!(err.contains("RTNETLINK answers: File exists"), "{err}");
    }

    #[test]
    fn missing_program_gets_a_build_hint() {
        let err = run("/nonexistent/strait", &["demo"]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(err.to_string().contains("cargo build --bins"), "{err}");
    }
}
