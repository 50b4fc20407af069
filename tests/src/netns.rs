//! One network namespace: running commands and background processes inside it.
//!
//! Short commands go through `ip netns exec`, as an operator would type them. Background
//! processes instead join the namespace with `setns` right before `exec`: `ip netns exec` also
//! gives the process a new mount namespace with a fresh `/sys`, which hides `/sys/fs/cgroup` and
//! `/sys/fs/bpf` — exactly what the eBPF-loading `strait` node proxy needs to see.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, PoisonError};

use crate::command::{self, command_line, context, spawn_error};
use crate::process::Process;

/// State every handle of one topology shares with the topology itself.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The topology's temp dir: logs, config, curl bodies.
    pub dir: PathBuf,
    /// Pids of spawned processes not yet reaped, so the topology can kill them even when their
    /// `Process` was leaked. A pid leaves the set only once reaped, so it cannot name a reused pid.
    pub spawned: Mutex<HashSet<u32>>,
}

impl Shared {
    pub fn spawned_pids(&self) -> Vec<u32> {
        let set = self.spawned.lock().unwrap_or_else(PoisonError::into_inner);
        set.iter().copied().collect()
    }

    pub fn forget_pid(&self, pid: u32) {
        self.spawned.lock().unwrap_or_else(PoisonError::into_inner).remove(&pid);
    }
}

/// A named network namespace of a topology. Cheap to clone; the topology deletes it.
#[derive(Clone, Debug)]
pub struct Netns {
    name: String,
    shared: Arc<Shared>,
}

impl Netns {
    pub(crate) fn new(name: String, shared: Arc<Shared>) -> Netns {
        Netns { name, shared }
    }

    /// The namespace name, as `ip netns` knows it.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The topology's temp dir, where logs of processes in this namespace go.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Runs `ip netns exec <ns> program args...` and waits for it; a non-zero exit is not an
    /// error here (see [`Netns::run_ok`]).
    pub fn run(&self, program: impl AsRef<OsStr>, args: &[&str]) -> io::Result<Output> {
        command::run("ip", &self.exec_args(program.as_ref(), args))
    }

    /// Like [`Netns::run`], but returns stdout, or an error with the command line, exit status
    /// and stderr when the program fails.
    pub fn run_ok(&self, program: impl AsRef<OsStr>, args: &[&str]) -> io::Result<String> {
        let full = self.exec_args(program.as_ref(), args);
        let output = command::run("ip", &full)?;
        command::check(&command_line(OsStr::new("ip"), &full), output)
    }

    fn exec_args<'a>(&'a self, program: &'a OsStr, args: &[&'a str]) -> Vec<&'a OsStr> {
        let mut full: Vec<&OsStr> = vec!["netns".as_ref(), "exec".as_ref(), self.name.as_ref(), program];
        full.extend(args.iter().map(|a| OsStr::new(*a)));
        full
    }

    /// Starts `program args...` in the background inside this namespace, with `envs` added to
    /// the environment; stdout and stderr are appended to `<topology dir>/<name_for_logs>.log`
    /// (`/` in the name becomes `-`). The process keeps the caller's mount namespace.
    pub fn spawn(
        &self,
        name_for_logs: &str,
        program: impl AsRef<OsStr>,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> io::Result<Process> {
        let program = program.as_ref();
        let line = format!("[netns {}] {}", self.name, command_line(program, args));
        let log_path = self.dir().join(crate::names::log_file_name(name_for_logs));
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(context(format!("opening log {}", log_path.display())))?;
        let stderr = log.try_clone()?;
        let netns_file = self.open()?;
        let netns_fd = netns_file.as_raw_fd();
        // Prepared before the fork: the child may not allocate.
        let resolv_conf = self.resolv_conf_path().filter(|p| p.exists()).map(|p| c_path(&p)).transpose()?;
        let etc_resolv_conf = c_path(Path::new("/etc/resolv.conf"))?;

        let mut cmd = Command::new(program);
        cmd.args(args).envs(envs.iter().copied()).stdin(Stdio::null()).stdout(log).stderr(stderr);
        // SAFETY: the closure runs in the forked child before exec and only makes system calls,
        // which are async-signal-safe, on C strings prepared before the fork; `netns_file`
        // outlives the spawn below.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(netns_fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                if let Some(source) = &resolv_conf {
                    private_resolv_conf(source, &etc_resolv_conf)?;
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| spawn_error(&line, e))?;
        drop(netns_file);
        let pid = child.id();
        self.shared.spawned.lock().unwrap_or_else(PoisonError::into_inner).insert(pid);
        Ok(Process::new(name_for_logs.to_string(), child, log_path, Arc::clone(&self.shared)))
    }

    /// Runs `f` on a new thread that has joined this namespace (only that thread does), so a
    /// test can open sockets inside it: a client written in the test talking to a process of
    /// the topology. Returns what `f` returns.
    pub fn run_in<T: Send>(&self, f: impl FnOnce() -> T + Send) -> io::Result<T> {
        let netns_file = self.open()?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    // SAFETY: setns on a descriptor we own; it moves this thread only.
                    if unsafe { libc::setns(netns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(f())
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Gives this namespace its own resolver configuration, as `ip netns exec` reads it from
    /// `/etc/netns/<name>/resolv.conf`: commands run with [`Netns::run`] see it as
    /// `/etc/resolv.conf` (ip does the bind mount), and so do processes started afterwards with
    /// [`Netns::spawn`] (in a private mount namespace of their own). The host's
    /// `/etc/resolv.conf` is never touched; the file goes with the namespace.
    pub fn set_resolv_conf(&self, content: &str) -> io::Result<()> {
        let dir = etc_dir(&self.name);
        std::fs::create_dir_all(&dir).map_err(context(format!("creating {}", dir.display())))?;
        let path = dir.join("resolv.conf");
        std::fs::write(&path, content).map_err(context(format!("writing {}", path.display())))
    }

    /// Points this namespace at the resolver at `nameserver` (see [`Netns::set_resolv_conf`]),
    /// giving up on it quickly: a test waits seconds, not the libc default of 5 s × 2.
    pub fn use_resolver(&self, nameserver: impl Into<std::net::IpAddr>) -> io::Result<()> {
        let nameserver = nameserver.into();
        self.set_resolv_conf(&format!("nameserver {nameserver}\noptions timeout:1 attempts:2\n"))
    }

    fn resolv_conf_path(&self) -> Option<PathBuf> {
        Some(etc_dir(&self.name).join("resolv.conf"))
    }

    /// Opens the namespace file, for `setns`.
    fn open(&self) -> io::Result<File> {
        let path = Path::new("/run/netns").join(&self.name);
        File::open(&path).map_err(context(format!("opening network namespace {}", path.display())))
    }
}

impl fmt::Display for Netns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl AsRef<OsStr> for Netns {
    fn as_ref(&self) -> &OsStr {
        OsStr::new(&self.name)
    }
}

/// `/etc/netns/<name>`: where `ip netns exec` finds files to show a namespace's commands in
/// place of `/etc`'s.
pub(crate) fn etc_dir(name: &str) -> PathBuf {
    Path::new("/etc/netns").join(name)
}

fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(io::Error::other)
}

/// In a forked child: a mount namespace of its own whose `/etc/resolv.conf` is `source`, as
/// `ip netns exec` arranges. Mounts are made slaves first so that the bind never propagates back
/// to the host's namespace.
fn private_resolv_conf(source: &std::ffi::CStr, target: &std::ffi::CStr) -> io::Result<()> {
    let check = |rc: libc::c_int| if rc == 0 { Ok(()) } else { Err(io::Error::last_os_error()) };
    // SAFETY: plain system calls on NUL-terminated strings that outlive them.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        ))?;
        check(libc::mount(source.as_ptr(), target.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()))
    }
}
