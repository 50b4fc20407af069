//! The figures of one benchmark run and how they are written: a Markdown table (ratios to
//! direct beside absolute values, and each target with whether it was met) and JSON.

use std::{fmt::Write as _, fs, path::Path};

use serde::Serialize;

/// Which way a figure is better.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Better {
    Higher,
    Lower,
}

/// A target: a bound on the mesh figure itself, on mesh/direct, or on mesh − direct.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Target {
    Absolute(f64),
    Ratio(f64),
    Added(f64),
}

#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    pub scenario: &'static str,
    pub name: String,
    pub unit: &'static str,
    pub direct: Option<f64>,
    /// The figure through strait; NaN (`null` in JSON) when it could not be measured, and then
    /// `note` says why.
    pub mesh: f64,
    pub better: Better,
    pub target: Option<Target>,
    /// Requests that failed in the run this figure comes from, when that run counts them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<u64>,
    /// What a reader must know to trust the figure: failed requests, why it was not measured,
    /// what stopped a search. Shown beside the value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl Figure {
    /// This figure as not measured, and why; it meets no target.
    pub fn not_measured(self, why: &str) -> Self {
        Figure { mesh: f64::NAN, errors: None, note: Some(format!("not measured: {why}")), ..self }
    }

    pub fn measured(&self) -> bool {
        self.mesh.is_finite()
    }

    pub fn ratio(&self) -> Option<f64> {
        self.direct.filter(|d| *d != 0.0 && self.measured()).map(|d| self.mesh / d)
    }

    /// Whether the target holds; `None` without a target, a measured figure or a direct figure
    /// to compare to, and for a figure from a run where requests failed: the failures are not
    /// in its latency, and may be why it looks good.
    pub fn met(&self) -> Option<bool> {
        if !self.measured() || self.errors.is_some_and(|n| n > 0) {
            return None;
        }
        let ok = |value: f64, bound: f64| match self.better {
            Better::Higher => value >= bound,
            Better::Lower => value <= bound,
        };
        match self.target? {
            Target::Absolute(bound) => Some(ok(self.mesh, bound)),
            Target::Ratio(bound) => Some(ok(self.ratio()?, bound)),
            Target::Added(bound) => Some(ok(self.mesh - self.direct?, bound)),
        }
    }
}

/// A latency distribution for the chart: (latency µs, cumulative fraction).
#[derive(Debug, Clone, Serialize)]
pub struct Distribution {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub quick: bool,
    pub machine: String,
    pub figures: Vec<Figure>,
    pub latency: Vec<Distribution>,
    /// `--profile`: the flame graphs recorded, or why there are none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profiles: Option<crate::profile::Profiles>,
}

impl Results {
    pub fn new(quick: bool) -> Self {
        Self { quick, machine: machine(), ..Self::default() }
    }

    pub fn add(&mut self, figure: Figure) {
        eprintln!(
            "  {:<40} direct {:>12} strait {:>12} {}{}",
            figure.name,
            figure.direct.map_or("-".into(), |d| format!("{d:.2}")),
            if figure.measured() { format!("{:.2}", figure.mesh) } else { "-".into() },
            figure.unit,
            // The first line only: the report has the rest (a log's tail, say).
            figure.note.as_ref().and_then(|n| n.lines().next()).map_or(String::new(), |n| format!(" ({n})"))
        );
        self.figures.push(figure);
    }
}

/// "2 vCPU AMD EPYC ..., kernel 6.18": what the figures were measured on.
fn machine() -> String {
    let cpu = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let memory_gib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<f64>().ok()))
        .map_or(0.0, |kib| kib / 1024.0 / 1024.0);
    format!("{cpus} vCPU {cpu}, {memory_gib:.0} GiB, Linux {}", kernel.trim())
}

fn number(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

pub fn markdown(results: &Results) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Measured on {}{}.\n", results.machine, if results.quick { " (quick run)" } else { "" });
    out.push_str("| Scenario | Figure | Direct | strait | strait vs direct | Target | Met |\n");
    out.push_str("|---|---|---:|---:|---:|---|---|\n");
    for f in &results.figures {
        let direct = f.direct.map_or("—".into(), |d| format!("{} {}", number(d), f.unit));
        let versus = match (f.target, f.direct) {
            _ if !f.measured() => "—".into(),
            (Some(Target::Added(_)), Some(d)) => format!("+{} {}", number(f.mesh - d), f.unit),
            (_, Some(_)) => f.ratio().map_or("—".into(), |r| format!("{r:.2}×")),
            (_, None) => "—".into(),
        };
        let value = if f.measured() { format!("{} {}", number(f.mesh), f.unit) } else { String::new() };
        let strait = match &f.note {
            None => value,
            Some(note) if value.is_empty() => table_cell(note),
            Some(note) => format!("{value} ({})", table_cell(note)),
        };
        let target = match f.target {
            None => "—".into(),
            Some(Target::Absolute(v)) => {
                format!("{} {} {}", if f.better == Better::Higher { "≥" } else { "≤" }, number(v), f.unit)
            }
            Some(Target::Ratio(v)) => format!("{} {v:.2}× direct", if f.better == Better::Higher { "≥" } else { "≤" }),
            Some(Target::Added(v)) => format!("≤ +{} {}", number(v), f.unit),
        };
        let met = match f.met() {
            Some(true) => "yes",
            Some(false) => "no",
            None => "—",
        };
        let _ = writeln!(out, "| {} | {} | {direct} | {strait} | {versus} | {target} | {met} |", f.scenario, f.name);
    }
    if let Some(profiles) = &results.profiles {
        out.push_str(&crate::profile::markdown(profiles));
    }
    out
}

/// Text fit for one Markdown table cell: one line, no column separator, not a page long (the
/// JSON keeps the whole note).
fn table_cell(text: &str) -> String {
    const LONGEST: usize = 240;
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ").replace('|', "/");
    match line.char_indices().nth(LONGEST) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

pub fn write(dir: &Path, results: &Results) -> anyhow::Result<()> {
    fs::write(dir.join("report.md"), format!("# strait benchmark\n\n{}", markdown(results)))?;
    fs::write(dir.join("report.json"), serde_json::to_string_pretty(results)?)?;
    Ok(())
}

/// Bytes in MiB, for the memory figures.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A table cell: the value with `decimals`, or "—" when it was not measured.
pub fn cell(v: Option<f64>, decimals: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.decimals$}"),
        _ => "—".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figure(direct: f64, mesh: f64, better: Better, target: Target) -> Figure {
        Figure {
            scenario: "s",
            name: "n".into(),
            unit: "u",
            direct: Some(direct),
            mesh,
            better,
            target: Some(target),
            errors: None,
            note: None,
        }
    }

    #[test]
    fn targets_are_judged_the_right_way() {
        assert_eq!(figure(10.0, 6.0, Better::Higher, Target::Ratio(0.5)).met(), Some(true));
        assert_eq!(figure(10.0, 4.0, Better::Higher, Target::Ratio(0.5)).met(), Some(false));
        assert_eq!(figure(100.0, 200.0, Better::Lower, Target::Added(120.0)).met(), Some(true));
        assert_eq!(figure(100.0, 300.0, Better::Lower, Target::Added(120.0)).met(), Some(false));
        assert_eq!(figure(0.0, 9.0, Better::Lower, Target::Absolute(10.0)).met(), Some(true));
    }

    #[test]
    fn markdown_shows_ratio_and_added_latency() {
        let mut r = Results::default();
        r.figures.push(figure(10.0, 6.0, Better::Higher, Target::Ratio(0.5)));
        r.figures.push(figure(100.0, 250.0, Better::Lower, Target::Added(120.0)));
        let md = markdown(&r);
        assert!(md.contains("0.60×") && md.contains("| yes |"), "{md}");
        assert!(md.contains("+150 u") && md.contains("| no |"), "{md}");
    }

    #[test]
    fn an_unmeasured_figure_says_why_and_meets_nothing() {
        let why = "the waypoint exited | status 1\nlast line";
        let figure = figure(1.0, 0.5, Better::Lower, Target::Absolute(1.0)).not_measured(why);
        assert_eq!(figure.met(), None);
        assert_eq!(figure.ratio(), None);
        let md = markdown(&Results { figures: vec![figure], ..Results::default() });
        assert!(
            md.contains("| 1.00 u | not measured: the waypoint exited / status 1 last line | — | ≤ 1.00 u | — |"),
            "{md}"
        );
        let json = serde_json::to_value(&Results { figures: vec![figure_with_errors()], ..Results::default() });
        assert_eq!(json.ok().and_then(|j| j["figures"][0]["errors"].as_u64()), Some(3));
    }

    #[test]
    fn a_note_follows_the_value_and_failed_requests_leave_the_target_unjudged() {
        let md = markdown(&Results { figures: vec![figure_with_errors()], ..Results::default() });
        assert!(md.contains("| 250 u (3 of 1,000 requests failed) | +150 u | ≤ +120 u | — |"), "{md}");
    }

    fn figure_with_errors() -> Figure {
        Figure {
            errors: Some(3),
            note: Some("3 of 1,000 requests failed".into()),
            ..figure(100.0, 250.0, Better::Lower, Target::Added(120.0))
        }
    }
}
