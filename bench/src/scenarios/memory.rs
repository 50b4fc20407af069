//! The memory scenario: each proxy's resident and private memory idle, the node proxies' cost
//! per idle proxied connection, and the waypoint's memory idle and after load.

use std::{
    fs, thread,
    time::{Duration, Instant},
};

use anyhow::bail;
use strait_testbed::{Process, bin_path};

use super::{Bed, PORT, TIMEOUT, procfs};
use crate::report::{Better, Figure, Results, Target, mib};

pub(super) fn memory(bed: &Bed, results: &mut Results) -> anyhow::Result<()> {
    for (i, idle) in bed.idle_rss.iter().enumerate() {
        results.add(Figure {
            scenario: "memory",
            name: format!("RSS of node {} proxy, idle (certificates and pool warm)", i + 1),
            unit: "MiB",
            direct: None,
            mesh: mib(*idle),
            better: Better::Lower,
            target: Some(Target::Absolute(10.0)),
            errors: None,
            note: None,
        });
    }
    // RSS counts the pages of the binary and libc the process touched, which are shared with
    // every other process mapping them; the private (anonymous) part is what one more proxy costs.
    for (i, proxy) in bed.proxies.iter().enumerate() {
        results.add(Figure {
            scenario: "memory",
            name: format!("private (anonymous) memory of node {} proxy, idle", i + 1),
            unit: "MiB",
            direct: None,
            mesh: mib(procfs::anonymous_bytes(proxy.pid())),
            better: Better::Lower,
            target: None,
            errors: None,
            note: None,
        });
    }
    let counts: &[u32] = if bed.quick { &[1000] } else { &[1000, 10_000] };
    for &count in counts {
        held_connections(bed, count, results)?;
    }
    waypoint(bed, results);
    Ok(())
}

/// RSS of the node proxies while `count` idle connections go through them, and per connection.
fn held_connections(bed: &Bed, count: u32, results: &mut Results) -> anyhow::Result<()> {
    let before: Vec<u64> = bed.proxies.iter().map(|p| procfs::rss_bytes(p.pid())).collect();
    let ready = bed.topo.dir().join(format!("hold-{count}.ready"));
    let _ = fs::remove_file(&ready);
    let target = format!("{}:{PORT}", bed.server.ip());
    let args = [
        "hold",
        "--target",
        &target,
        "--count",
        &count.to_string(),
        "--ready-file",
        ready.to_str().unwrap_or_default(),
    ];
    let hold = bed.client.spawn(&format!("hold-{count}"), bin_path("strait-load"), &args, &[])?;
    wait_for_file(&ready, &hold)?;
    thread::sleep(Duration::from_secs(1));
    let held: Vec<u64> = bed.proxies.iter().map(|p| procfs::rss_bytes(p.pid())).collect();
    hold.terminate(libc::SIGTERM)?;
    hold.wait_exit(TIMEOUT);
    for (i, (b, h)) in before.iter().zip(&held).enumerate() {
        results.add(Figure {
            scenario: "memory",
            name: format!("RSS of node {} proxy with {count} idle connections", i + 1),
            unit: "MiB",
            direct: None,
            mesh: mib(*h),
            better: Better::Lower,
            target: None,
            errors: None,
            note: None,
        });
        results.add(Figure {
            scenario: "memory",
            name: format!("memory per idle connection, node {} proxy ({count} held)", i + 1),
            unit: "KiB",
            direct: None,
            mesh: h.saturating_sub(*b) as f64 / f64::from(count) / 1024.0,
            better: Better::Lower,
            target: Some(Target::Absolute(3.0)),
            errors: None,
            note: None,
        });
    }
    Ok(())
}

/// The waypoint's memory idle (measured when the bed was built, after one request through it)
/// and right after the 1,000 req/s run, if the latency or cpu scenario ran one.
fn waypoint(bed: &Bed, results: &mut Results) {
    let figure = |name: &str, target| Figure {
        scenario: "memory",
        name: name.into(),
        unit: "MiB",
        direct: None,
        mesh: f64::NAN,
        better: Better::Lower,
        target,
        errors: None,
        note: None,
    };
    // The waypoint's issue: at most 30 MiB resident (Istio's Envoy waypoint is several times that).
    let idle = [
        figure("RSS of the waypoint, idle (certificate issued, one request through)", Some(Target::Absolute(30.0))),
        figure("private (anonymous) memory of the waypoint, idle", None),
    ];
    for (i, figure) in idle.into_iter().enumerate() {
        results.add(match &bed.waypoint {
            Ok(w) => Figure { mesh: mib(if i == 0 { w.idle_rss } else { w.idle_anonymous }), ..figure },
            Err(why) => figure.not_measured(why),
        });
    }
    let Some(load) = bed.waypoint_load.borrow().clone() else { return };
    let figure = figure("RSS of the waypoint right after the 1,000 req/s run", None);
    results.add(match load {
        Ok(load) if load.rss_after == 0 => {
            figure.not_measured(&load.note.unwrap_or_else(|| "the waypoint was gone as the run ended".into()))
        }
        Ok(load) => Figure { mesh: mib(load.rss_after), errors: load.errors, note: load.note, ..figure },
        Err(why) => figure.not_measured(&why),
    });
}

fn wait_for_file(path: &std::path::Path, process: &Process) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        if Instant::now() > deadline || !process.is_running() {
            bail!("connections were not all opened:\n{}", process.log_tail());
        }
        thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}
