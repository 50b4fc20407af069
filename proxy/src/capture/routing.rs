//! Policy routing for steered packets. A packet the capture program assigns to a local socket
//! still goes through the routing decision, and its destination is usually not local (it is the
//! pod's original destination), so the kernel would forward it. The program marks such packets,
//! and this rule sends marked packets to a table whose only route is `local 0.0.0.0/0`.

use std::process::Command;

use strait_ebpf_common::{STEER_MARK, STEER_RULE_PRIORITY, STEER_TABLE};
use tracing::warn;

/// The installed rule and route; removed on drop.
pub struct SteerRouting {
    _private: (),
}

impl SteerRouting {
    /// Installs the rule and route in the current network namespace, replacing leftovers of
    /// an earlier run.
    /// A rule already in place (a running predecessor's, or a crashed run's) is kept as it is:
    /// removing and re-adding it would leave a moment in which steered packets are forwarded
    /// instead of delivered, during a restart (OPS-3).
    pub fn install() -> Result<Self, String> {
        let mark = format!("{STEER_MARK:#x}");
        let table = STEER_TABLE.to_string();
        let priority = STEER_RULE_PRIORITY.to_string();
        ip(&["route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", &table])?;
        let rules = ip_output(&["rule", "show", "priority", &priority])?;
        let wanted =
            rules.lines().any(|l| l.contains(&format!("fwmark {mark}")) && l.contains(&format!("lookup {table}")));
        if !wanted {
            remove_rules();
            ip(&["rule", "add", "fwmark", &mark, "lookup", &table, "priority", &priority])?;
        }
        Ok(Self { _private: () })
    }
}

impl Drop for SteerRouting {
    fn drop(&mut self) {
        remove();
    }
}

fn remove() {
    remove_rules();
    // May be absent; only the end state matters.
    let _ = ip(&["route", "flush", "table", &STEER_TABLE.to_string()]);
}

fn remove_rules() {
    let priority = STEER_RULE_PRIORITY.to_string();
    while ip(&["rule", "del", "priority", &priority]).is_ok() {}
}

fn ip_output(args: &[&str]) -> Result<String, String> {
    let output =
        Command::new("ip").args(args).output().map_err(|e| format!("cannot run `ip` (iproute2 is required): {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim()))
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let output =
        Command::new("ip").args(args).output().map_err(|e| format!("cannot run `ip` (iproute2 is required): {e}"))?;
    if output.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let message = format!("`ip {}` failed: {}", args.join(" "), stderr.trim());
        if args.first() == Some(&"rule") && args.get(1) == Some(&"add") {
            warn!("{message}");
        }
        Err(message)
    }
}
