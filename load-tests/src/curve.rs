//! The latency-versus-rate curve: several paced runs, each at its own rate, read back from
//! their JSON reports and put side by side as one table and one PNG.
//!
//! A single run says how late a fix is at one rate; the curve says where the knee is —
//! the rate past which the pipeline stops keeping up and latency becomes backlog. Each
//! point is one report: the rate the service processed while the fleet was sent, and the
//! publish → WebSocket percentiles the harness's tracker saw at that rate.

use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;
use serde_json::Value;

use crate::plot::{PlotError, err as plot_err, load_font};

/// One run of the curve.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CurvePoint {
    /// The run's name (its report's file stem).
    pub run: String,
    /// Events per second offered by the harness.
    pub offered_per_s: f64,
    /// Events per second the service processed while the fleet was sent.
    pub processed_per_s: f64,
    /// Publish → WebSocket percentiles, ms.
    pub p50_ms: f64,
    /// 90th percentile, ms.
    pub p90_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// Fixes the tracker received (the sample size of the percentiles).
    pub samples: u64,
    /// Events per epoch, on average (from the service's `/metrics`).
    pub events_per_epoch: Option<f64>,
    /// Mean commit time of an epoch by the slowest sink, ms.
    pub epoch_commit_mean_ms: Option<f64>,
    /// Cores the service used while the fleet was sent.
    pub service_cores: Option<f64>,
    /// The machine's load average at the run's start.
    pub loadavg: Option<String>,
}

/// Why a report could not be read as a point of the curve.
#[derive(Debug, thiserror::Error)]
pub enum CurveError {
    /// The file could not be read or is not JSON.
    #[error("{path}: {reason}")]
    Report {
        /// The report.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The chart could not be drawn.
    #[error(transparent)]
    Plot(#[from] PlotError),
}

impl CurvePoint {
    /// The point of one report: `None` for a run without WebSocket latencies (no tracker,
    /// or an unpaced run, whose latency is the backlog it built).
    pub fn of(run: &str, report: &Value) -> Option<Self> {
        if report["config"]["unpaced"].as_bool().unwrap_or(false) {
            return None;
        }
        let ws = &report["latency"]["publish_to_websocket"];
        let samples = ws["count"].as_u64().filter(|&n| n > 0)?;
        let events = &report["events"];
        let server = &report["server"];
        Some(Self {
            run: run.to_owned(),
            offered_per_s: events["offered_per_s"].as_f64().unwrap_or(0.0),
            processed_per_s: events["processed_per_s"]
                .as_f64()
                .or_else(|| events["achieved_per_s"].as_f64())
                .unwrap_or(0.0),
            p50_ms: ws["p50_ms"].as_f64()?,
            p90_ms: ws["p90_ms"].as_f64()?,
            p99_ms: ws["p99_ms"].as_f64()?,
            samples,
            events_per_epoch: server["events_per_epoch"].as_f64(),
            epoch_commit_mean_ms: server["epoch_commit_mean_ms"].as_f64(),
            service_cores: report["cpu_cores"]["delivertrack"].as_f64(),
            loadavg: report["loadavg"][0].as_str().map(str::to_owned),
        })
    }

    /// Reads the reports at `paths` and returns their points by processed rate.
    ///
    /// # Errors
    /// [`CurveError::Report`] for a file that cannot be read or parsed.
    pub fn read_all(paths: &[impl AsRef<Path>]) -> Result<Vec<Self>, CurveError> {
        let mut points = Vec::new();
        for path in paths {
            let path = path.as_ref();
            let failed = |reason: String| CurveError::Report {
                path: path.display().to_string(),
                reason,
            };
            let text = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
            let report: Value = serde_json::from_str(&text).map_err(|e| failed(e.to_string()))?;
            let run = path
                .file_stem()
                .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
            points.extend(Self::of(&run, &report));
        }
        points.sort_by(|a, b| a.processed_per_s.total_cmp(&b.processed_per_s));
        Ok(points)
    }
}

/// The curve as a Markdown table, one row per run, by rate.
pub fn table(points: &[CurvePoint]) -> String {
    let mut out = String::from(
        "| run | offered ev/s | processed ev/s | publish → WebSocket p50 / p90 / p99 ms | fixes seen | events per epoch | epoch commit ms | service cores | load (start) |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    let opt = |value: Option<f64>, digits: usize| {
        value.map_or_else(|| "–".to_owned(), |v| format!("{v:.digits$}"))
    };
    for p in points {
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.1} / {:.1} / **{:.1}** | {} | {} | {} | {} | {} |",
            p.run,
            p.offered_per_s,
            p.processed_per_s,
            p.p50_ms,
            p.p90_ms,
            p.p99_ms,
            p.samples,
            opt(p.events_per_epoch, 0),
            opt(p.epoch_commit_mean_ms, 1),
            opt(p.service_cores, 2),
            p.loadavg.as_deref().unwrap_or("?"),
        );
    }
    out
}

/// Draws the curve to `path` (PNG, 1200 × 700): publish → WebSocket p50, p90 and p99
/// (log scale) against the processed rate, with the 100 ms target as a line. Returns
/// whether text was drawn (a font was found).
///
/// # Errors
/// [`PlotError`] when the file cannot be written.
pub fn draw(
    path: &Path,
    title: &str,
    points: &[CurvePoint],
    font: &Path,
) -> Result<bool, PlotError> {
    let text = load_font(font);
    let root = BitMapBackend::new(path, (1200, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let rate_max = points
        .iter()
        .map(|p| p.processed_per_s)
        .fold(1.0_f64, f64::max)
        * 1.05;
    let latency_max = points.iter().map(|p| p.p99_ms).fold(200.0_f64, f64::max) * 1.5;
    let latency_min = points
        .iter()
        .map(|p| p.p50_ms)
        .fold(f64::INFINITY, f64::min)
        .clamp(1.0, 10.0)
        / 2.0;
    let mut chart = ChartBuilder::on(&root);
    chart
        .margin(15)
        .x_label_area_size(if text { 45 } else { 5 })
        .y_label_area_size(if text { 70 } else { 5 });
    if text {
        chart.caption(title, ("sans-serif", 22));
    }
    let mut chart = chart
        .build_cartesian_2d(0.0..rate_max, (latency_min..latency_max).log_scale())
        .map_err(plot_err)?;
    if text {
        chart
            .configure_mesh()
            .x_desc("events/s processed")
            .y_desc("publish → WebSocket, ms (log)")
            .draw()
            .map_err(plot_err)?;
    }
    let target = vec![(0.0, 100.0), (rate_max, 100.0)];
    let drawn = chart
        .draw_series(LineSeries::new(target, BLACK.mix(0.5).stroke_width(1)))
        .map_err(plot_err)?;
    if text {
        drawn
            .label("target: p99 100 ms")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.5)));
    }
    type Pick = fn(&CurvePoint) -> f64;
    let series: [(&str, RGBColor, Pick); 3] = [
        ("p50", BLUE, |p| p.p50_ms),
        ("p90", GREEN, |p| p.p90_ms),
        ("p99", RED, |p| p.p99_ms),
    ];
    for (name, color, pick) in series {
        let line: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.processed_per_s, pick(p).max(latency_min)))
            .collect();
        chart
            .draw_series(line.iter().map(|&xy| Circle::new(xy, 4, color.filled())))
            .map_err(plot_err)?;
        let drawn = chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))
            .map_err(plot_err)?;
        if text {
            drawn
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)?;
    Ok(text)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn report(unpaced: bool, processed: f64, p99: f64, count: u64) -> Value {
        json!({
            "config": {"unpaced": unpaced},
            "loadavg": ["1.00 0.50 0.25", "1.10 0.60 0.30"],
            "events": {"offered_per_s": processed, "achieved_per_s": processed,
                       "processed_per_s": processed},
            "latency": {"publish_to_websocket": {"count": count, "p50_ms": p99 / 3.0,
                        "p90_ms": p99 / 2.0, "p99_ms": p99, "max_ms": p99, "mean_ms": p99 / 3.0}},
            "server": {"events_per_epoch": 40.0, "epoch_commit_mean_ms": 5.5},
            "cpu_cores": {"delivertrack": 0.25},
        })
    }

    #[test]
    fn a_paced_run_with_latencies_is_a_point_and_an_unpaced_one_is_not() {
        let point = CurvePoint::of("curve-250", &report(false, 264.0, 55.0, 6877)).unwrap();
        assert_eq!(point.processed_per_s, 264.0);
        assert_eq!(point.p99_ms, 55.0);
        assert_eq!(point.samples, 6877);
        assert_eq!(point.events_per_epoch, Some(40.0));
        assert_eq!(point.service_cores, Some(0.25));
        assert_eq!(point.loadavg.as_deref(), Some("1.00 0.50 0.25"));
        assert!(CurvePoint::of("max", &report(true, 9000.0, 5000.0, 100)).is_none());
        assert!(CurvePoint::of("quiet", &report(false, 264.0, 55.0, 0)).is_none());
    }

    #[test]
    fn the_table_and_the_chart_hold_every_point_by_rate() {
        let dir = std::env::temp_dir().join(format!("dt-curve-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut paths = Vec::new();
        for (name, rate, p99) in [
            ("b", 2000.0, 80.0),
            ("a", 250.0, 50.0),
            ("c", 8000.0, 900.0),
        ] {
            let path = dir.join(format!("{name}.json"));
            std::fs::write(&path, report(false, rate, p99, 100).to_string()).unwrap();
            paths.push(path);
        }
        let unpaced = dir.join("max.json");
        std::fs::write(&unpaced, report(true, 9000.0, 1.0, 100).to_string()).unwrap();
        paths.push(unpaced);

        let points = CurvePoint::read_all(&paths).unwrap();
        let runs: Vec<_> = points.iter().map(|p| p.run.as_str()).collect();
        assert_eq!(runs, ["a", "b", "c"]);
        let table = table(&points);
        assert_eq!(table.lines().count(), 2 + 3, "{table}");
        assert!(
            table.contains("| c | 8000 | 8000 | 300.0 / 450.0 / **900.0** |"),
            "{table}"
        );

        let png = dir.join("curve.png");
        draw(&png, "curve", &points, Path::new("/nonexistent-font.ttf")).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_report_that_is_not_json_is_named_in_the_error() {
        let path = std::env::temp_dir().join(format!("dt-curve-bad-{}.json", std::process::id()));
        std::fs::write(&path, "not json").unwrap();
        let error = CurvePoint::read_all(&[&path]).unwrap_err().to_string();
        assert!(error.contains(&path.display().to_string()), "{error}");
        std::fs::remove_file(&path).unwrap();
    }
}
