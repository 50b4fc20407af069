//! The request scenarios: latency at a fixed rate (with the CPU it costs) and the highest rate
//! that keeps p99 under 10 ms, direct, through the node proxies, and through the waypoint.

use std::time::Instant;

use serde_json::Value;

use super::{Bed, Path, errors_of, f, procfs::BoxCpu, thousands, waypoint};
use crate::{
    profile::{self, ProfiledRun, Profiles},
    report::{Better, Distribution, Figure, Results, Target},
};

/// Open loop at 1,000 req/s, 8 keep-alive connections, 1 KiB bodies (BENCHMARKS.md).
pub(super) fn rate_run(bed: &Bed, path: Path, rps: u32, secs: &str, connections: &str) -> anyhow::Result<Value> {
    let rps = rps.to_string();
    let args = ["rate", "--rps", &rps, "--duration", secs, "--connections", connections, "--path", "/bytes/1024"];
    bed.load(path, &args)
}

/// The percentiles reported, their JSON keys, and the node path's targets (added to direct).
const PERCENTILES: [(&str, &str, Option<Target>); 4] = [
    ("p50_us", "p50", Some(Target::Added(120.0))),
    ("p90_us", "p90", None),
    ("p99_us", "p99", Some(Target::Added(240.0))),
    ("p999_us", "p99.9", None),
];

pub(super) fn latency(bed: &Bed, results: &mut Results) -> anyhow::Result<()> {
    let secs = bed.secs(30, 8);
    let direct = rate_run(bed, Path::Direct, 1000, &secs, "8")?;
    let cpu_before = bed.proxy_cpu_seconds();
    let started = Instant::now();
    let mesh = rate_run(bed, Path::Mesh, 1000, &secs, "8")?;
    let cpu = (bed.proxy_cpu_seconds() - cpu_before) / started.elapsed().as_secs_f64();
    let achieved = f(&mesh, "achieved_rps");
    *bed.cpu_per_krps.borrow_mut() = Some(cpu / (achieved / 1000.0));
    let via_waypoint = waypoint::measured_load(bed, &secs);
    if let Err(why) = &via_waypoint {
        eprintln!("strait-bench: latency through the waypoint not measured: {why}");
    }
    if let Some(dir) = &bed.profile {
        results.profiles = Some(profiled(bed, dir, &secs));
    }
    for (key, label, target) in PERCENTILES {
        results.add(Figure {
            scenario: "latency",
            name: format!("{label} at 1,000 req/s, 8 conns, 1 KiB"),
            unit: "µs",
            direct: Some(f(&direct, key)),
            mesh: f(&mesh, key),
            better: Better::Lower,
            target,
            errors: None,
            note: None,
        });
    }
    // The waypoint's own target (its issue): p99 at most 1 ms above direct.
    for (key, label, _) in PERCENTILES {
        let figure = Figure {
            scenario: "latency",
            name: format!("{label} via waypoint at 1,000 req/s, 8 conns, 1 KiB"),
            unit: "µs",
            direct: Some(f(&direct, key)),
            mesh: f64::NAN,
            better: Better::Lower,
            target: (key == "p99_us").then_some(Target::Added(1000.0)),
            errors: None,
            note: None,
        };
        results.add(match &via_waypoint {
            Ok((v, load)) => Figure { mesh: f(v, key), errors: load.errors, note: load.note.clone(), ..figure },
            Err(why) => figure.not_measured(why),
        });
    }
    let runs = [
        ("direct", Some(&direct)),
        ("strait", Some(&mesh)),
        ("strait via waypoint", via_waypoint.as_ref().ok().map(|(v, _)| v)),
    ];
    for (label, v) in runs {
        let Some(v) = v else { continue };
        let points = v
            .get("histogram")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|p| Some((p.get(0)?.as_f64()?, p.get(1)?.as_f64()?))).collect())
            .unwrap_or_default();
        results.latency.push(Distribution { label: label.into(), points });
    }
    add_cpu(bed, results);
    Ok(())
}

/// `--profile`: the node path's and the waypoint path's 1,000 req/s runs again, each with perf
/// on every proxy on the path. Extra runs after the measured ones, so perf's cost (its sampling
/// in the proxies, its own process on the shared cores) stays out of the published figures and
/// shows in the profiled runs' own latency instead.
fn profiled(bed: &Bed, dir: &std::path::Path, secs: &str) -> Profiles {
    let mut section = Profiles::default();
    if let Err(why) = profile::check() {
        eprintln!("strait-bench: no profiles: {why}");
        section.problems.push(why);
        return section;
    }
    profile::clear(dir);
    let _kernel_symbols = profile::KernelSymbols::visible();
    let symbolizer = profile::Symbolizer::find(dir);
    let (node1, node2) = (bed.proxies[0].pid(), bed.proxies[1].pid());
    let mut plans = vec![(
        Path::Mesh,
        "node path",
        vec![("node1-mesh", "node 1 proxy, node path", node1), ("node2-mesh", "node 2 proxy, node path", node2)],
    )];
    match bed.waypoint() {
        Ok(w) => plans.push((
            Path::Waypoint,
            "waypoint path",
            vec![
                ("node1-waypoint", "node 1 proxy, waypoint path", node1),
                ("waypoint", "waypoint, waypoint path", w.process.pid()),
                ("node2-waypoint", "node 2 proxy, waypoint path", node2),
            ],
        )),
        Err(e) => section.problems.push(format!("the waypoint path was not profiled: {e:#}")),
    }
    for (path, name, processes) in plans {
        eprintln!("strait-bench: profiling the {name}");
        let mut recordings = Vec::new();
        for (label, title, pid) in processes {
            match profile::start(dir, label, title, pid) {
                Ok(r) => recordings.push(r),
                Err(why) => section.problems.push(why),
            }
        }
        section.problems.extend(profile::settle(&mut recordings));
        if recordings.is_empty() {
            continue;
        }
        match rate_run(bed, path, 1000, secs, "8") {
            Ok(v) => section.runs.push(ProfiledRun {
                path: name.into(),
                p50_us: f(&v, "p50_us"),
                p99_us: f(&v, "p99_us"),
                achieved_rps: f(&v, "achieved_rps"),
            }),
            Err(e) => section.problems.push(format!("the profiled {name} run failed: {e:#}")),
        }
        let stopped: Vec<_> = recordings.into_iter().map(profile::Recording::stop).collect();
        for recording in stopped {
            match recording.and_then(|r| r.finish(dir, symbolizer.as_ref().map(profile::Symbolizer::dir))) {
                Ok(p) => section.profiles.push(p),
                Err(why) => section.problems.push(why),
            }
        }
    }
    for why in &section.problems {
        eprintln!("strait-bench: profile: {why}");
    }
    section
}

fn add_cpu(bed: &Bed, results: &mut Results) {
    if results.figures.iter().any(|f| f.scenario == "cpu") {
        return;
    }
    if let Some(cpu) = *bed.cpu_per_krps.borrow() {
        results.add(Figure {
            scenario: "cpu",
            name: "both proxies, per 1,000 req/s".into(),
            unit: "vCPU",
            direct: None,
            mesh: cpu,
            better: Better::Lower,
            target: Some(Target::Absolute(0.12)),
            errors: None,
            note: None,
        });
    }
    let Some(load) = bed.waypoint_load.borrow().clone() else { return };
    // The waypoint's target is for it alone (0.12 vCPU, as for both node proxies); Istio's Envoy
    // waypoint is about 0.25.
    let figures = [
        ("waypoint alone, per 1,000 req/s through it", Some(Target::Absolute(0.12))),
        ("waypoint path: both node proxies and the waypoint, per 1,000 req/s", None),
    ];
    for (i, (name, target)) in figures.into_iter().enumerate() {
        let figure = Figure {
            scenario: "cpu",
            name: name.into(),
            unit: "vCPU",
            direct: None,
            mesh: f64::NAN,
            better: Better::Lower,
            target,
            errors: None,
            note: None,
        };
        results.add(match &load {
            Ok(load) => Figure {
                mesh: if i == 0 { load.waypoint_cpu } else { load.path_cpu },
                errors: load.errors,
                note: load.note.clone(),
                ..figure
            },
            Err(why) => figure.not_measured(why),
        });
    }
}

pub(super) fn cpu(bed: &Bed, results: &mut Results) -> anyhow::Result<()> {
    let secs = bed.secs(30, 8);
    if bed.cpu_per_krps.borrow().is_none() {
        let cpu_before = bed.proxy_cpu_seconds();
        let started = Instant::now();
        let mesh = rate_run(bed, Path::Mesh, 1000, &secs, "8")?;
        let cpu = (bed.proxy_cpu_seconds() - cpu_before) / started.elapsed().as_secs_f64();
        *bed.cpu_per_krps.borrow_mut() = Some(cpu / (f(&mesh, "achieved_rps") / 1000.0));
    }
    if bed.waypoint_load.borrow().is_none() {
        // Only the CPU and RSS are wanted here: measured_load records them in the bed.
        let _ = waypoint::measured_load(bed, &secs);
    }
    add_cpu(bed, results);
    Ok(())
}

/// Rates tried in turn, up to the first that misses.
const LADDER: [u32; 14] =
    [2000, 4000, 6000, 8000, 10000, 12500, 15000, 17500, 20000, 25000, 30000, 35000, 40000, 50000];
/// Rates tried, downwards, only when the ladder's first rate misses, so a slow path (the
/// waypoint's) reads as a rate rather than 0; a path that holds 2,000 req/s never runs them.
const BELOW: [u32; 3] = [1500, 1000, 500];

/// The highest rate whose p99 stays under 10 ms (and that is actually achieved, without errors).
pub(super) fn max_rps(bed: &Bed, results: &mut Results) -> anyhow::Result<()> {
    let secs = bed.secs(5, 3);
    let direct = climb(bed, Path::Direct, &secs)?;
    let mesh = climb(bed, Path::Mesh, &secs)?;
    results.add(Figure {
        scenario: "max-rps",
        name: "highest rate with p99 < 10 ms, 8 conns".into(),
        unit: "req/s",
        direct: Some(direct.best),
        mesh: mesh.best,
        better: Better::Higher,
        target: Some(Target::Absolute(15000.0)),
        errors: None,
        // What stopped the climb, with the slow-request timeline: a stall or saturation.
        note: mesh.stopped,
    });
    // No target: the 15,000 req/s above is the node path's (against ztunnel), and the waypoint's
    // issue sets none for rate; the note says what stopped the climb.
    let figure = Figure {
        scenario: "max-rps",
        name: "highest rate with p99 < 10 ms via waypoint, 8 conns".into(),
        unit: "req/s",
        direct: Some(direct.best),
        mesh: f64::NAN,
        better: Better::Higher,
        target: None,
        errors: None,
        note: None,
    };
    results.add(match climb(bed, Path::Waypoint, &secs) {
        Ok(ladder) => Figure { mesh: ladder.best, note: ladder.stopped, ..figure },
        Err(e) => figure.not_measured(&format!("{e:#}")),
    });
    Ok(())
}

/// How far up the ladder a path got.
struct Ladder {
    /// The highest rate that held, req/s (0 if none did).
    best: f64,
    /// What went wrong at the lowest rate above `best` that was tried; `None` if the top of the
    /// ladder held.
    stopped: Option<String>,
}

/// Tries the ladder's rates in turn until one misses, then, if that was the first, the rates
/// below it until one holds. A run that fails outright misses; only when the very first fails
/// is the path not measured at all (it fails for a reason other than load).
fn climb(bed: &Bed, path: Path, secs: &str) -> anyhow::Result<Ladder> {
    let mut ladder = Ladder { best: 0.0, stopped: None };
    for (step, rate) in LADDER.into_iter().enumerate() {
        match attempt(bed, path, secs, rate) {
            Ok(None) => ladder.best = f64::from(rate),
            Ok(Some(missed)) => {
                ladder.stopped = Some(missed);
                break;
            }
            Err(e) if step == 0 => return Err(e),
            Err(e) => {
                ladder.stopped = Some(format!("at {} req/s the run failed: {e:#}", thousands(u64::from(rate))));
                break;
            }
        }
    }
    if ladder.best > 0.0 || ladder.stopped.is_none() {
        return Ok(ladder);
    }
    for rate in BELOW {
        match attempt(bed, path, secs, rate) {
            Ok(None) => {
                ladder.best = f64::from(rate);
                break;
            }
            Ok(Some(missed)) => ladder.stopped = Some(missed),
            Err(e) => ladder.stopped = Some(format!("at {} req/s the run failed: {e:#}", thousands(u64::from(rate)))),
        }
    }
    Ok(ladder)
}

/// One rung: `None` if `rate` held (p99 under 10 ms, 95 % of it achieved, no errors), else
/// what missed.
fn attempt(bed: &Bed, path: Path, secs: &str, rate: u32) -> anyhow::Result<Option<String>> {
    let rps = rate.to_string();
    let args =
        ["rate", "--rps", &rps, "--duration", secs, "--warmup", "1", "--connections", "8", "--path", "/bytes/1024"];
    let log_from = if path == Path::Waypoint { waypoint::log_mark(bed) } else { None };
    let (box_before, proxies_before, started) = (BoxCpu::now(), bed.proxy_cpu_seconds(), Instant::now());
    let v = bed.load(path, &args)?;
    let (busy, steal) = BoxCpu::now().since(&box_before);
    let proxies = (bed.proxy_cpu_seconds() - proxies_before) / started.elapsed().as_secs_f64();
    let (p99, achieved) = (f(&v, "p99_us"), f(&v, "achieved_rps"));
    let (errors, errors_note) = errors_of(&v);
    if p99 < 10_000.0 && achieved >= 0.95 * f64::from(rate) && errors == Some(0) {
        return Ok(None);
    }
    let mut missed = format!(
        "at {} req/s: p99 {} µs, {} req/s achieved",
        thousands(u64::from(rate)),
        thousands(p99 as u64),
        thousands(achieved as u64)
    );
    missed = match errors_note {
        Some(note) => format!("{missed}, {note}"),
        None => format!("{missed}, {} errors", errors.map_or("unknown".into(), thousands)),
    };
    if let Some(when) = slow_timeline(&v) {
        missed = format!("{missed}; {when}");
    }
    missed = format!("{missed}; box CPU {busy:.0} % busy, {steal:.0} % stolen; node proxies {proxies:.2} vCPU");
    // Through the waypoint, also what it logged about the failed requests, and if it is gone.
    Ok(Some(match (log_from, &bed.waypoint) {
        (Some(from), Ok(w)) => waypoint::explain(w, missed, from),
        _ => missed,
    }))
}

/// When in the window a missed rung's slow requests (over 10 ms) were due, from the load
/// generator's 100 ms slots, and how late its timer sent: a stall of the path (or of the box)
/// fills a few slots, saturation most of them, and a generator short of CPU shows in its lag.
fn slow_timeline(v: &Value) -> Option<String> {
    let slots = v.get("slow_slots")?.as_array()?;
    let total = v.get("slots")?.as_u64()?;
    let field = |slot: &Value, name: &str| slot.get(name).and_then(Value::as_u64).unwrap_or(0);
    let worst = slots.iter().max_by_key(|slot| field(slot, "slow"))?;
    let first = slots.first()?;
    Some(format!(
        "slow requests in {} of {total} 100 ms slots, the first at {:.1} s, the worst at {:.1} s ({} over 10 ms, \
         slowest {} ms); generator send lag p99 {} µs, max {} µs",
        slots.len(),
        field(first, "at_ms") as f64 / 1000.0,
        field(worst, "at_ms") as f64 / 1000.0,
        field(worst, "slow"),
        field(worst, "max_us") / 1000,
        thousands(field(v, "send_lag_p99_us")),
        thousands(field(v, "send_lag_max_us")),
    ))
}
