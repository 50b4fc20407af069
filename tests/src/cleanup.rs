//! Creating and deleting namespaces, and sweeping up what crashed runs left behind.
//!
//! A test process killed by a timeout or a signal never runs its destructors, so its namespaces
//! and the processes inside them outlive it. Every namespace name starts with `st<pid>x`, and
//! each process records its start time under [`STATE_DIR`]; a later run deletes namespaces whose
//! creator is gone, even when the pid has since been reused by an unrelated process (`pid_max`
//! is only 32768 on some machines).

use std::env;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::thread;
use std::time::Duration;

use crate::command::{self, GlobalLock, STATE_DIR, context};
use crate::names::{owner_pid, start_time_from_stat};

const NETNS_DIR: &str = "/run/netns";

/// Creates namespace `name`. A namespace of that name can only be a leftover of a dead process
/// that had our pid (names embed the pid and a per-process counter), so it is replaced.
pub(crate) fn create_netns(name: &str) -> io::Result<()> {
    if Path::new(NETNS_DIR).join(name).exists() {
        delete_netns(name)?;
    }
    let _lock = GlobalLock::acquire()?;
    command::ip(&["netns", "add", name]).map(drop)
}

/// Kills every process inside namespace `name`, then deletes it. Deleting only unlinks the
/// name, and a namespace lives on while any process is in it, so the killing comes first.
pub(crate) fn delete_netns(name: &str) -> io::Result<()> {
    if !Path::new(NETNS_DIR).join(name).exists() {
        return Ok(());
    }
    kill_netns_processes(name);
    // The namespace's own resolver configuration (`Netns::set_resolv_conf`), if it had one.
    let _ = std::fs::remove_dir_all(crate::netns::etc_dir(name));
    let _lock = GlobalLock::acquire()?;
    match command::ip(&["netns", "del", name]) {
        // Another process's stale sweep may have deleted it since we looked.
        Err(_) if !Path::new(NETNS_DIR).join(name).exists() => Ok(()),
        other => other.map(drop),
    }
}

/// SIGKILLs the processes in namespace `name`. A few rounds, because a process may fork while
/// we kill it; failures are ignored because this runs in destructors.
pub(crate) fn kill_netns_processes(name: &str) {
    for _ in 0..3 {
        let pids = match command::ip(&["netns", "pids", name]) {
            Ok(out) => out,
            Err(_) => return,
        };
        let pids: Vec<libc::pid_t> = pids.split_whitespace().filter_map(|p| p.parse().ok()).collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            kill(pid, libc::SIGKILL);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

pub(crate) fn kill(pid: libc::pid_t, signal: i32) {
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(pid, signal) };
}

/// Records this process's start time so other runs can tell it from a later process that
/// reuses its pid. Done once per process, before its first namespace exists.
pub(crate) fn register_owner() -> io::Result<()> {
    static DONE: OnceLock<()> = OnceLock::new();
    if DONE.get().is_some() {
        return Ok(());
    }
    let pid = std::process::id();
    let start = process_start_time(pid)
        .ok_or_else(|| io::Error::other("cannot read this process's start time from /proc/self/stat"))?;
    let dir = owners_dir();
    fs::create_dir_all(&dir).map_err(context(format!("creating {}", dir.display())))?;
    let path = dir.join(pid.to_string());
    fs::write(&path, start.to_string()).map_err(context(format!("writing {}", path.display())))?;
    let _ = DONE.set(());
    Ok(())
}

fn owners_dir() -> PathBuf {
    Path::new(STATE_DIR).join("owners")
}

/// The start time of a live, non-zombie process; `None` if there is no such process.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let state = stat.get(stat.rfind(')')? + 1..)?.split_whitespace().next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    start_time_from_stat(&stat)
}

/// Whether the run that used `pid` in its names is gone: no such process, or a process that
/// started at a different time than the one recorded by the run.
fn owner_is_gone(pid: u32) -> bool {
    let Some(start) = process_start_time(pid) else {
        return true;
    };
    match fs::read_to_string(owners_dir().join(pid.to_string())) {
        Ok(recorded) => recorded.trim().parse::<u64>().is_ok_and(|r| r != start),
        // No record: written by something else, or before records existed; trust liveness.
        Err(_) => false,
    }
}

/// Deletes the namespaces (and processes in them), temp dirs and owner records of runs that are
/// gone. Returns how many namespaces it deleted; failures on single items are reported on stderr
/// and skipped, because another process may be sweeping the same items at the same time.
pub fn cleanup_stale() -> io::Result<usize> {
    let mut deleted = 0;
    for name in list_dir(Path::new(NETNS_DIR)) {
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid == std::process::id() || !owner_is_gone(pid) {
            continue;
        }
        match delete_netns(&name) {
            Ok(()) => deleted += 1,
            Err(err) => eprintln!("strait-testbed: cannot delete stale namespace {name}: {err}"),
        }
    }

    let keep_dirs = keep_requested();
    let tmp = env::temp_dir();
    for name in list_dir(&tmp) {
        let Some(pid) = name.strip_prefix("strait-").and_then(owner_pid) else {
            continue;
        };
        if pid == std::process::id() || !owner_is_gone(pid) {
            continue;
        }
        if !keep_dirs {
            let _ = fs::remove_dir_all(tmp.join(&name));
        }
    }

    for name in list_dir(Path::new(BPF_PIN_ROOT)) {
        let Some(pid) = owner_pid(&name) else {
            continue;
        };
        if pid != std::process::id() && owner_is_gone(pid) {
            remove_bpf_pins(&name);
        }
    }

    // Records of exited processes; a record whose pid was reused stays, since it is what marks
    // that pid's leftovers (if any could not be deleted above) as stale.
    for record in list_dir(&owners_dir()) {
        if record.parse().is_ok_and(|pid| process_start_time(pid).is_none()) {
            let _ = fs::remove_file(owners_dir().join(record));
        }
    }
    Ok(deleted)
}

/// Where a node proxy started by tests or the demo pins its eBPF maps and links: one directory
/// per node namespace, so parallel runs never share kernel objects.
pub const BPF_PIN_ROOT: &str = "/sys/fs/bpf/strait-test";

/// Deletes the pins of one node namespace's proxy (its links detach once unpinned, and a
/// crashed proxy leaves them behind).
pub fn remove_bpf_pins(netns_name: &str) {
    let dir = Path::new(BPF_PIN_ROOT).join(netns_name);
    for sub in [dir.join("links"), dir.clone()] {
        for name in list_dir(&sub) {
            let _ = fs::remove_file(sub.join(name));
        }
    }
    let _ = fs::remove_dir(dir.join("links"));
    let _ = fs::remove_dir(&dir);
}

/// `STRAIT_KEEP=1` keeps temp dirs (logs, config) for a look after the run.
pub(crate) fn keep_requested() -> bool {
    env::var("STRAIT_KEEP").is_ok_and(|v| v == "1")
}

/// File names in `dir`; empty if it does not exist (no namespace was ever created).
pub(crate) fn list_dir(dir: &Path) -> Vec<String> {
    match fs::read_dir(dir) {
        Ok(entries) => entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect(),
        Err(_) => Vec::new(),
    }
}
