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
    pub fn install() -> Result<Self, String> {
        remove();
        let mark = format!("{STEER_MARK:#x}");
        let table = STEER_TABLE.to_string();
        let priority = STEER_RULE_PRIORITY.to_string();
        ip(&["rule", "add", "fwmark", &mark, "lookup", &table, "priority", &priority])?;
        ip(&["route", "replace", "local", "0.0.0.0/0", "dev", "lo", "table", &table])?;
        Ok(Self { _private: () })
    }
}

impl Drop for SteerRouting {
    fn drop(&mut self) {
        remove();
    }
}

fn remove() {
    let priority = STEER_RULE_PRIORITY.to_string();
    let table = STEER_TABLE.to_string();
    // Either may be absent; only the end state matters.
    while ip(&["rule", "del", "priority", &priority]).is_ok() {}
    let _ = ip(&["route", "flush", "table", &table]);
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
