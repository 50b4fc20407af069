//! End to end: `strait demo` (OPS-1), the README's first command, runs every step to the end on
//! this machine: capture, HBONE, policy, the waypoint, the ingress gateway, egress and the control
//! plane. A step that fails makes the demo exit non-zero; a step that shows a bug says so.

use strait_testbed::bin_path;

#[test]
fn the_demo_runs_every_step() {
    let out = std::process::Command::new(bin_path("strait")).arg("demo").output().expect("strait demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "strait demo failed:\n{stdout}\n{stderr}");
    for step in 1..=11 {
        assert!(stdout.contains(&format!("-- step {step}:")), "step {step} missing:\n{stdout}");
    }
    assert!(!stdout.contains("a bug"), "a step shows a bug:\n{stdout}");
    assert!(stdout.contains("-> 200 hello from reviews-v1"), "the ingress step:\n{stdout}");
    assert!(stdout.contains("hello from partner-api"), "the egress step:\n{stdout}");
}
