//! The PNG of a run: throughput (top) and latency (bottom) over time, with `plotters`.
//!
//! Text needs a TrueType font, which the harness reads at run time (`--font`, else
//! DejaVu Sans where Debian puts it) rather than linking a system font stack. Without one
//! the chart is drawn without text, and the legend is in the report (series colours:
//! offered blue, achieved green, processed by the server red; WebSocket p50 blue, p99
//! red, GraphQL p99 magenta).

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::record::Sample;

/// Where Debian's `fonts-dejavu-core` puts DejaVu Sans.
pub const DEFAULT_FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Why the chart could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("the chart could not be drawn: {0}")]
pub struct PlotError(String);

pub(crate) fn err(error: impl std::fmt::Display) -> PlotError {
    PlotError(error.to_string())
}

/// A series: its name, colour and points.
type Line = (&'static str, RGBColor, Vec<(f64, f64)>);

static FONT: OnceLock<bool> = OnceLock::new();

/// Registers the font at `path` once per process; `true` when text can be drawn.
pub(crate) fn load_font(path: &Path) -> bool {
    *FONT.get_or_init(|| match std::fs::read(path) {
        Ok(bytes) => {
            // Registered fonts must live for the whole process: leaked once, on purpose.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
        }
        Err(_) => false,
    })
}

/// Draws `timeline` to `path` (PNG, 1200 × 800). Returns whether text was drawn.
///
/// # Errors
/// [`PlotError`] when the file cannot be written.
pub fn draw(path: &Path, title: &str, timeline: &[Sample], font: &Path) -> Result<bool, PlotError> {
    let text = load_font(font);
    let root = BitMapBackend::new(path, (1200, 800)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let (top, bottom) = root.split_vertically(400);
    let t_max = timeline.last().map_or(1.0, |s| s.t_s).max(1.0);

    let rate_max = timeline
        .iter()
        .flat_map(|s| {
            [
                s.offered_per_s,
                s.achieved_per_s,
                s.processed_per_s.unwrap_or(0.0),
            ]
        })
        .fold(1.0_f64, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&top);
    chart
        .margin(10)
        .x_label_area_size(if text { 35 } else { 5 });
    chart.y_label_area_size(if text { 70 } else { 5 });
    if text {
        chart.caption(format!("{title}: events per second"), ("sans-serif", 20));
    }
    let mut chart = chart
        .build_cartesian_2d(0.0..t_max, 0.0..rate_max)
        .map_err(err)?;
    if text {
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("events/s")
            .draw()
            .map_err(err)?;
    }
    let series: [Line; 3] = [
        (
            "offered",
            BLUE,
            timeline.iter().map(|s| (s.t_s, s.offered_per_s)).collect(),
        ),
        (
            "achieved",
            GREEN,
            timeline.iter().map(|s| (s.t_s, s.achieved_per_s)).collect(),
        ),
        (
            "processed (server)",
            RED,
            timeline
                .iter()
                .filter_map(|s| s.processed_per_s.map(|p| (s.t_s, p)))
                .collect(),
        ),
    ];
    for (name, color, points) in series {
        let drawn = chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(err)?;
        if text {
            drawn
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }

    let latency_max = timeline
        .iter()
        .flat_map(|s| {
            [
                s.ws_p99_ms.unwrap_or(0.0),
                s.ws_p50_ms.unwrap_or(0.0),
                s.graphql_p99_ms.unwrap_or(0.0),
            ]
        })
        .fold(1.0_f64, f64::max)
        * 1.1;
    let mut chart = ChartBuilder::on(&bottom);
    chart
        .margin(10)
        .x_label_area_size(if text { 35 } else { 5 });
    chart.y_label_area_size(if text { 70 } else { 5 });
    if text {
        chart.caption("latency per second (ms)", ("sans-serif", 20));
    }
    let mut chart = chart
        .build_cartesian_2d(0.0..t_max, 0.0..latency_max)
        .map_err(err)?;
    if text {
        chart
            .configure_mesh()
            .x_desc("seconds")
            .y_desc("ms")
            .draw()
            .map_err(err)?;
    }
    let series: [Line; 3] = [
        (
            "publish to WebSocket p50",
            BLUE,
            timeline
                .iter()
                .filter_map(|s| s.ws_p50_ms.map(|v| (s.t_s, v)))
                .collect(),
        ),
        (
            "publish to WebSocket p99",
            RED,
            timeline
                .iter()
                .filter_map(|s| s.ws_p99_ms.map(|v| (s.t_s, v)))
                .collect(),
        ),
        (
            "GraphQL query p99",
            MAGENTA,
            timeline
                .iter()
                .filter_map(|s| s.graphql_p99_ms.map(|v| (s.t_s, v)))
                .collect(),
        ),
    ];
    for (name, color, points) in series {
        let drawn = chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(err)?;
        if text {
            drawn
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
    }
    if text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(text)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn a_chart_is_a_png_file() {
        let timeline: Vec<Sample> = (1..=10)
            .map(|t| Sample {
                t_s: f64::from(t),
                offered_per_s: 100.0,
                achieved_per_s: 95.0,
                processed_per_s: Some(90.0),
                ws_p50_ms: Some(5.0),
                ws_p99_ms: Some(20.0),
                ..Sample::default()
            })
            .collect();
        let path = std::env::temp_dir().join(format!("dt-plot-{}.png", uuid::Uuid::new_v4()));
        draw(&path, "test", &timeline, Path::new(DEFAULT_FONT)).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        std::fs::remove_file(&path).unwrap();
    }
}
