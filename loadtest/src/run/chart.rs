//! `--chart PATH.svg`: produce rate, processing rate and lag over the run,
//! with a vertical marker at each fault, so a dip and its cause are seen
//! together.
//!
//! Rates use the left axis (records per second), lag the right one
//! (records): lag after a failover can be many times the rate, and on one
//! axis it would flatten the rates into the floor. SVG only (plotters'
//! `svg_backend`): text is left to the viewer's fonts, so no font files or
//! system libraries are needed.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;

use super::ledger::Row;

const SIZE: (u32, u32) = (1100, 520);
const PRODUCED: RGBColor = RGBColor(31, 119, 180);
const PROCESSED: RGBColor = RGBColor(44, 160, 44);
const LAG: RGBColor = RGBColor(214, 39, 40);
const FAULT: RGBColor = RGBColor(90, 90, 90);

/// A fault marker: seconds since the start and a label.
pub struct Marker {
    pub at_s: f64,
    pub label: String,
}

pub fn write(path: &Path, title: &str, timeline: &[Row], markers: &[Marker]) -> anyhow::Result<()> {
    draw(path, title, timeline, markers).with_context(|| format!("cannot draw the chart {}", path.display()))
}

fn draw(path: &Path, title: &str, timeline: &[Row], markers: &[Marker]) -> anyhow::Result<()> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    // Each row covers [t, t + 1): plotted at its end, where its count is
    // complete.
    let x_max = (timeline.len() as f64).max(markers.iter().map(|m| m.at_s).fold(1.0, f64::max));
    let rate_max =
        timeline.iter().map(|r| r.produced.max(r.processed)).max().unwrap_or(0).max(1) as f64 * 1.15;
    let lag_max = timeline.iter().map(|r| r.lag).max().unwrap_or(0).max(1) as f64 * 1.15;

    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .right_y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..rate_max)?
        .set_secondary_coord(0f64..x_max, 0f64..lag_max);
    // Counts are whole numbers; plotters would print `400.0`.
    let whole = |v: &f64| format!("{v:.0}");
    chart
        .configure_mesh()
        .x_desc("seconds since producing started")
        .y_desc("records / s")
        .x_label_formatter(&whole)
        .y_label_formatter(&whole)
        .draw()?;
    chart.configure_secondary_axes().y_desc("lag (records)").y_label_formatter(&whole).draw()?;

    let series = |f: fn(&Row) -> u64| -> Vec<(f64, f64)> {
        timeline.iter().map(|r| (r.t as f64 + 1.0, f(r) as f64)).collect()
    };
    chart
        .draw_series(LineSeries::new(series(|r| r.produced), PRODUCED.stroke_width(2)))?
        .label("produced / s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], PRODUCED.stroke_width(2)));
    chart
        .draw_series(LineSeries::new(series(|r| r.processed), PROCESSED.stroke_width(2)))?
        .label("processed / s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], PROCESSED.stroke_width(2)));
    chart
        .draw_secondary_series(LineSeries::new(series(|r| r.lag), LAG.stroke_width(2)))?
        .label("lag (right axis)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], LAG.stroke_width(2)));
    for (i, m) in markers.iter().enumerate() {
        chart.draw_series(LineSeries::new(vec![(m.at_s, 0.0), (m.at_s, rate_max)], FAULT.stroke_width(1)))?;
        // Staggered so labels of faults close together do not overlap.
        let y = rate_max * (0.97 - 0.05 * (i % 3) as f64);
        chart.draw_series(std::iter::once(Text::new(
            m.label.clone(),
            (m.at_s, y),
            ("sans-serif", 13).into_font().color(&FAULT),
        )))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_an_svg_with_series_and_markers() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("c.svg");
        let timeline: Vec<Row> = (0..30)
            .map(|t| Row {
                t,
                produced: 100,
                processed: if (10..14).contains(&t) { 20 } else { 110 },
                lag: t * 3,
                max_latency_ms: 5,
            })
            .collect();
        write(&path, "failover", &timeline, &[Marker { at_s: 10.0, label: "kill9 w0".into() }])?;
        let svg = std::fs::read_to_string(&path)?;
        assert!(svg.starts_with("<svg"), "{}", &svg[..svg.len().min(100)]);
        for text in ["failover", "kill9 w0", "processed / s", "lag (records)"] {
            assert!(svg.contains(text), "no {text} in the chart");
        }
        // An empty run still draws (axes only) rather than failing.
        write(&path, "empty", &[], &[])?;
        Ok(())
    }
}
