//! What the scenarios read about a proxy from /proc: resident and private memory, CPU time.
//! A process that has gone reads as zero; the figures built on it say what happened.

use std::fs;

/// Resident memory of a process, bytes.
pub(crate) fn rss_bytes(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// Anonymous (private, not file-backed) resident memory of a process, bytes.
pub(crate) fn anonymous_bytes(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Anonymous:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kib| kib * 1024)
}

/// User plus system CPU time of a process, seconds.
pub(crate) fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name, which is in parentheses and may contain spaces.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // SAFETY: sysconf has no side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (ticks(11) + ticks(12)) / hz.max(1.0)
}

/// Open file descriptors of a process (sockets included).
pub(crate) fn open_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// The whole box's CPU time from /proc/stat: busy, idle and stolen (by the hypervisor), in
/// ticks of all CPUs together.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct BoxCpu {
    busy: u64,
    idle: u64,
    steal: u64,
}

impl BoxCpu {
    pub(crate) fn now() -> Self {
        let Ok(stat) = fs::read_to_string("/proc/stat") else { return Self::default() };
        let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return Self::default() };
        // user nice system idle iowait irq softirq steal (guest time is within user).
        let v: Vec<u64> = line.split_whitespace().skip(1).take(8).filter_map(|x| x.parse().ok()).collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        Self { busy: at(0) + at(1) + at(2) + at(5) + at(6), idle: at(3) + at(4), steal: at(7) }
    }

    /// Busy and stolen shares of the time since `earlier`, percent.
    pub(crate) fn since(&self, earlier: &BoxCpu) -> (f64, f64) {
        let busy = self.busy.saturating_sub(earlier.busy) as f64;
        let idle = self.idle.saturating_sub(earlier.idle) as f64;
        let steal = self.steal.saturating_sub(earlier.steal) as f64;
        let all = (busy + idle + steal).max(1.0);
        (100.0 * busy / all, 100.0 * steal / all)
    }
}
