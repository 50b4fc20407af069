//! The benchmark chart: the latency distribution at the fixed rate (direct, through the node
//! proxies, through the waypoint), and the throughput bars, in one PNG.

use std::path::Path;

use anyhow::{Context as _, anyhow};
use plotters::prelude::*;

use crate::report::Results;

/// Debian's fonts-dejavu-core, installed by `cargo xtask setup`.
const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Curve colours in the order the latency scenario records its runs: direct, strait (node
/// proxies), strait via the waypoint; a dark green, since plotters' pure green is hard to read.
const CURVES: [RGBColor; 3] = [BLUE, RED, RGBColor(0, 140, 60)];

pub fn draw(path: &Path, results: &Results) -> anyhow::Result<()> {
    let bytes = std::fs::read(FONT).with_context(|| format!("the chart needs the font {FONT} (fonts-dejavu-core)"))?;
    // plotters keeps fonts for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{FONT} is not a font"))?;

    let root = BitMapBackend::new(path, (1400, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(820);
    latency(&left, results)?;
    throughput(&right, results)?;
    root.present()?;
    Ok(())
}

/// Latency against percentile, with the percentile axis in "nines" (0 = p0, 1 = p90, 2 = p99,
/// 3 = p99.9) so the tail gets as much room as the median.
fn latency(area: &DrawingArea<BitMapBackend, plotters::coord::Shift>, results: &Results) -> anyhow::Result<()> {
    let nines = |q: f64| -(1.0 - q.min(0.9999)).log10();
    let series: Vec<(String, Vec<(f64, f64)>)> = results
        .latency
        .iter()
        .map(|d| (d.label.clone(), d.points.iter().map(|(us, q)| (nines(*q), *us)).collect()))
        .collect();
    let max_us = series.iter().flat_map(|(_, p)| p.iter().map(|(_, us)| *us)).fold(100.0, f64::max);
    let mut chart = ChartBuilder::on(area)
        .caption("Latency at 1,000 req/s, 8 connections, 1 KiB (open loop)", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..4f64, (10f64..max_us * 1.2).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (µs)")
        .x_label_formatter(&|x| match x.round() as i32 {
            0 => "p0".into(),
            1 => "p90".into(),
            2 => "p99".into(),
            3 => "p99.9".into(),
            _ => "p99.99".into(),
        })
        .x_labels(5)
        .draw()?;
    for (i, (label, points)) in series.into_iter().enumerate() {
        let color = CURVES[i % CURVES.len()];
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    Ok(())
}

fn throughput(area: &DrawingArea<BitMapBackend, plotters::coord::Shift>, results: &Results) -> anyhow::Result<()> {
    let bars: Vec<(String, f64, f64)> = results
        .figures
        .iter()
        .filter(|f| f.scenario == "throughput")
        .map(|f| (f.name.split(", ").last().unwrap_or("").to_owned(), f.direct.unwrap_or(0.0), f.mesh))
        .collect();
    let top = bars.iter().map(|(_, d, m)| d.max(*m)).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption("Throughput (Gbit/s)", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..(bars.len().max(1) as f64), 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(bars.len().max(1))
        .x_label_formatter(&|x| bars.get(x.floor() as usize).map(|b| b.0.clone()).unwrap_or_default())
        .y_desc("Gbit/s")
        .draw()?;
    for (i, (_, direct, mesh)) in bars.iter().enumerate() {
        let x = i as f64;
        chart.draw_series([
            Rectangle::new([(x + 0.15, 0.0), (x + 0.48, *direct)], BLUE.filled()),
            Rectangle::new([(x + 0.52, 0.0), (x + 0.85, *mesh)], RED.filled()),
        ])?;
        for (dx, v) in [(0.16, direct), (0.53, mesh)] {
            chart.draw_series([Text::new(format!("{v:.1}"), (x + dx, v + top * 0.02), ("sans-serif", 16))])?;
        }
    }
    area.draw(&Text::new("blue: direct   red: strait", (60, 530), ("sans-serif", 16)))?;
    Ok(())
}
