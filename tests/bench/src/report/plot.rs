//! The page's SVG plots (plotters, SVG backend only).

use std::path::Path;

use anyhow::Result;
use plotters::prelude::*;

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn nice_max(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 {
        v * 1.15
    } else {
        1.0
    }
}

/// A horizontal-axis-categories bar chart.
pub(super) fn plot_bars(path: &Path, title: &str, bars: &[(String, f64)]) -> Result<()> {
    plot_groups(path, title, &[(String::new(), bars.to_vec())])
}

/// Grouped bars: one group per entry, one bar per (name, value).
pub(super) fn plot_groups(
    path: &Path,
    title: &str,
    groups: &[(String, Vec<(String, f64)>)],
) -> Result<()> {
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let per = groups.iter().map(|g| g.1.len()).max().unwrap_or(1).max(1);
    let ymax = nice_max(
        groups
            .iter()
            .flat_map(|g| g.1.iter().map(|b| b.1))
            .filter(|v| v.is_finite())
            .fold(0.0, f64::max),
    );
    let width = (groups.len() * (per + 1)) as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..width, 0.0..ymax)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(plot_err)?;
    let names: Vec<String> = groups
        .first()
        .map(|g| g.1.iter().map(|b| b.0.clone()).collect())
        .unwrap_or_default();
    for (gi, (gname, bars)) in groups.iter().enumerate() {
        let x0 = (gi * (per + 1)) as f64 + 0.5;
        for (bi, (_, v)) in bars.iter().enumerate() {
            if !v.is_finite() {
                continue;
            }
            let x = x0 + bi as f64;
            let color = COLORS[bi % COLORS.len()];
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x, 0.0), (x + 0.8, *v)],
                    color.filled(),
                )))
                .map_err(plot_err)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    format!("{v:.0}"),
                    (x + 0.1, *v + ymax * 0.01),
                    ("sans-serif", 12),
                )))
                .map_err(plot_err)?;
        }
        if !gname.is_empty() {
            chart
                .draw_series(std::iter::once(Text::new(
                    gname.clone(),
                    (x0, -ymax * 0.0),
                    ("sans-serif", 14),
                )))
                .map_err(plot_err)?;
        }
    }
    for (bi, name) in names.iter().enumerate() {
        let color = COLORS[bi % COLORS.len()];
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(0.0, 0.0), (0.0, 0.0)],
                color.filled(),
            )))
            .map_err(plot_err)?
            .label(name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

/// One line per series of per-second values.
pub(super) fn plot_lines(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[(String, Vec<f64>)],
) -> Result<()> {
    let xy: Vec<(String, Vec<(f64, f64)>)> = series
        .iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.iter()
                    .enumerate()
                    .map(|(i, y)| (i as f64 + 0.5, *y))
                    .collect(),
            )
        })
        .collect();
    plot_xy(path, title, xlabel, ylabel, &xy)
}

pub(super) fn plot_xy(
    path: &Path,
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    let root = SVGBackend::new(path, (900, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let pts = || {
        series
            .iter()
            .flat_map(|s| s.1.iter())
            .filter(|p| p.0.is_finite() && p.1.is_finite())
    };
    let xmax = pts().map(|p| p.0).fold(0.0, f64::max).ceil();
    let ymax = nice_max(pts().map(|p| p.1).fold(0.0, f64::max));
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.0..xmax.max(1.0), 0.0..ymax)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .x_desc(xlabel)
        .y_desc(ylabel)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(plot_err)?;
    for (i, (name, s)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                s.iter()
                    .copied()
                    .filter(|p| p.0.is_finite() && p.1.is_finite()),
                color.stroke_width(2),
            ))
            .map_err(plot_err)?
            .label(name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(plot_err)?;
    root.present().map_err(plot_err)?;
    Ok(())
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow::anyhow!("drawing a plot: {e:?}")
}
