//! SVG charts of a run's per-second series: connections, deliveries per
//! second, latency percentiles. Text is written as SVG `<text>`, so no
//! font is needed on the machine that draws them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::prelude::*;

use crate::series::Point;

/// Chart size in pixels.
const SIZE: (u32, u32) = (900, 420);

/// Writes `connections.svg`, `deliveries.svg` and `latency.svg` into `dir`;
/// returns their paths.
pub fn write(dir: &Path, series: &[Point]) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let line = |f: fn(&Point) -> Option<f64>| -> Vec<(f64, f64)> {
        series.iter().filter_map(|p| Some((p.t_s as f64, f(p)?))).collect()
    };
    let charts = [
        (
            "connections.svg",
            "Devices connected",
            "connections",
            vec![("connections", line(|p| Some(p.connections as f64)))],
        ),
        (
            "deliveries.svg",
            "Deliveries per second",
            "deliveries/s",
            vec![("deliveries/s", line(|p| Some(p.deliveries_per_s as f64)))],
        ),
        (
            "latency.svg",
            "Latency, publish to receipt",
            "ms",
            vec![
                ("p50", line(|p| p.latency_p50_ms)),
                ("p99", line(|p| p.latency_p99_ms)),
                ("max", line(|p| p.latency_max_ms)),
            ],
        ),
    ];
    let mut out = Vec::new();
    for (file, title, unit, lines) in charts {
        let path = dir.join(file);
        draw(&path, title, unit, &lines).map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", path.display()))?;
        out.push(path);
    }
    Ok(out)
}

/// Writes `celebrity.svg`: devices that have the post and feeds that hold
/// it, by ms since the post's request (`--celebrity`).
pub fn celebrity(dir: &Path, receipts: &[(f64, u64)], feeds: &[(f64, u64)]) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("celebrity.svg");
    let as_f = |l: &[(f64, u64)]| l.iter().map(|&(t, n)| (t, n as f64)).collect::<Vec<_>>();
    let lines = [("devices with the post", as_f(receipts)), ("feeds holding it", as_f(feeds))];
    draw_xy(&path, "One post to every follower: receipts over time", "ms since POST /post/create", "followers", &lines)
        .map_err(|e| anyhow::anyhow!("cannot draw {}: {e}", path.display()))?;
    Ok(path)
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw(path: &Path, title: &str, unit: &str, lines: &[(&str, Vec<(f64, f64)>)]) -> DrawResult {
    draw_xy(path, title, "seconds since start", unit, lines)
}

fn draw_xy(path: &Path, title: &str, x_desc: &str, unit: &str, lines: &[(&str, Vec<(f64, f64)>)]) -> DrawResult {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let points = lines.iter().flat_map(|(_, l)| l.iter());
    let x_max = points.clone().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points.map(|p| p.1).fold(0.0, f64::max).max(1e-3) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart.configure_mesh().x_desc(x_desc).y_desc(unit).draw()?;
    let colors = [BLUE, RED, BLACK];
    for ((name, line), color) in lines.iter().zip(colors) {
        chart
            .draw_series(LineSeries::new(line.iter().copied(), color.stroke_width(2)))?
            .label(*name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    if lines.len() > 1 {
        chart.configure_series_labels().background_style(WHITE.mix(0.8)).border_style(BLACK).draw()?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_svg_with_their_text() {
        let series: Vec<Point> = (0..5)
            .map(|t| Point {
                t_s: t,
                connections: t * 100,
                deliveries_per_s: t * 10,
                events_published: t,
                latency_p50_ms: (t > 1).then_some(1.5),
                latency_p99_ms: (t > 1).then_some(9.0),
                latency_max_ms: (t > 1).then_some(12.0),
            })
            .collect();
        let dir = std::env::temp_dir().join(format!("lt-charts-{}", std::process::id()));
        let files = write(&dir, &series).unwrap();
        assert_eq!(files.len(), 3);
        let latency = std::fs::read_to_string(dir.join("latency.svg")).unwrap();
        assert!(latency.starts_with("<svg"), "{}", &latency[..60.min(latency.len())]);
        assert!(latency.contains("Latency, publish to receipt") && latency.contains("p99"));
        assert!(latency.contains("<polyline"), "a line is drawn");
        // An empty series still gives valid charts.
        write(&dir, &[]).unwrap();
        let c = celebrity(&dir, &[(0.0, 0), (150.0, 900), (400.0, 1000)], &[(80.0, 200), (900.0, 1000)]).unwrap();
        let c = std::fs::read_to_string(c).unwrap();
        assert!(c.contains("ms since POST") && c.contains("feeds holding it") && c.contains("<polyline"));
        std::fs::remove_dir_all(&dir).ok();
    }
}
