//! The live benchmark's SVG chart: for each measured quantity a panel of
//! horizontal bars, one per contender, the median with its spread (a line
//! from the smallest to the largest round).

use std::path::Path;

use anyhow::{Result, anyhow};
use plotters::prelude::*;

pub struct Bar {
    pub label: String,
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

pub struct Panel {
    pub title: String,
    pub bars: Vec<Bar>,
}

const LABEL_AREA: u32 = 330;
const ROW_HEIGHT: u32 = 26;

/// Writes `panels`, one above the other, to an SVG file at `path`
/// (panels without bars left out).
pub fn write_svg(path: &Path, panels: &[Panel]) -> Result<()> {
    let panels: Vec<&Panel> = panels
        .iter()
        .filter(|panel| !panel.bars.is_empty())
        .collect();
    let heights: Vec<u32> = panels
        .iter()
        .map(|panel| 90 + ROW_HEIGHT * panel.bars.len() as u32)
        .collect();
    let root = SVGBackend::new(path, (1000, heights.iter().sum())).into_drawing_area();
    root.fill(&WHITE).map_err(plot_error)?;
    let mut rest = root;
    for (panel, height) in panels.into_iter().zip(heights) {
        let (area, below) = rest.split_vertically(height);
        draw_panel(&area, panel)?;
        rest = below;
    }
    rest.present().map_err(plot_error)?;
    Ok(())
}

fn draw_panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    panel: &Panel,
) -> Result<()> {
    let top = panel
        .bars
        .iter()
        .map(|bar| bar.max)
        .fold(0.0, f64::max)
        .max(f64::MIN_POSITIVE)
        * 1.1;
    let rows = panel.bars.len();
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(LABEL_AREA)
        .build_cartesian_2d(0.0..top, (0..rows).into_segmented())
        .map_err(plot_error)?;
    let labels: Vec<&str> = panel.bars.iter().map(|bar| bar.label.as_str()).collect();
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(rows)
        .y_label_formatter(&|at| match at {
            SegmentValue::CenterOf(i) => labels.get(*i).copied().unwrap_or("").to_owned(),
            _ => String::new(),
        })
        .draw()
        .map_err(plot_error)?;
    chart
        .draw_series(panel.bars.iter().enumerate().map(|(i, bar)| {
            let mut rectangle = Rectangle::new(
                [
                    (0.0, SegmentValue::Exact(i)),
                    (bar.median, SegmentValue::Exact(i + 1)),
                ],
                BLUE.mix(0.6).filled(),
            );
            rectangle.set_margin(4, 4, 0, 0);
            rectangle
        }))
        .map_err(plot_error)?;
    chart
        .draw_series(panel.bars.iter().enumerate().map(|(i, bar)| {
            PathElement::new(
                [
                    (bar.min, SegmentValue::CenterOf(i)),
                    (bar.max, SegmentValue::CenterOf(i)),
                ],
                BLACK.stroke_width(2),
            )
        }))
        .map_err(plot_error)?;
    Ok(())
}

fn plot_error(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the chart: {error}")
}
