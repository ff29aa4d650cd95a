//! Charts: time per sequence and peak extra memory against sequence length, log-log, one line per series.

use crate::bench::Measurement;
use plotters::prelude::*;
use std::path::Path;

/// Where a TrueType font may be found; `FLASHATTN_FONT` takes precedence.
const FONT_PATHS: [&str; 6] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

fn register_font() -> Result<(), String> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let env = std::env::var("FLASHATTN_FONT").ok();
        let candidates = env.iter().map(String::as_str).chain(FONT_PATHS);
        for path in candidates {
            if let Ok(bytes) = std::fs::read(path) {
                // The font table keeps the bytes for the rest of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return Ok(());
                }
            }
        }
        Err(format!(
            "no TrueType font found for the chart's text (looked in {FONT_PATHS:?}); set FLASHATTN_FONT to a .ttf file"
        ))
    })
    .clone()
}

/// A line of points (x, y) with its label.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Draws panels side by side into a .png or .svg file: each panel is (title, y label, series), log-log.
pub fn panels(path: &Path, title: &str, x_label: &str, panels: &[(&str, &str, Vec<Series>)]) -> Result<(), String> {
    register_font()?;
    let size = (700 * panels.len() as u32, 520);
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", path.display());
    match ext.as_deref() {
        Some("png") => {
            draw(BitMapBackend::new(path, size).into_drawing_area(), title, x_label, panels).map_err(|e| err(&e))
        }
        Some("svg") => {
            draw(SVGBackend::new(path, size).into_drawing_area(), title, x_label, panels).map_err(|e| err(&e))
        }
        _ => Err(format!("--plot {}: expected a .png or .svg file name", path.display())),
    }
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, plotters::coord::Shift>,
    title: &str,
    x_label: &str,
    panels: &[(&str, &str, Vec<Series>)],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    for (area, (name, y_label, series)) in root.split_evenly((1, panels.len())).iter().zip(panels) {
        draw_panel(area, name, x_label, y_label, series)?;
    }
    root.present()?;
    Ok(())
}

fn draw_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    name: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> DrawResult
where
    DB::ErrorType: 'static,
{
    let pts = series.iter().flat_map(|s| s.points.iter()).filter(|(x, y)| *x > 0.0 && *y > 0.0);
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (1.0, 10.0, 1.0, 10.0);
    }
    let mut chart = ChartBuilder::on(area)
        .caption(name, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((x0 / 1.3..x1 * 1.3).log_scale(), (y0 / 2.0..y1 * 2.0).log_scale())?;
    chart.configure_mesh().x_desc(x_label).y_desc(y_label).x_label_formatter(&|x| format!("{x:.0}")).draw()?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|(x, y)| *x > 0.0 && *y > 0.0).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))?
            .label(s.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2)));
        chart.draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

/// The bench chart: time per sequence and peak extra memory against N.
pub fn scaling(path: &Path, rows: &[Measurement], title: &str) -> Result<(), String> {
    let mut keys: Vec<(String, String, usize, bool)> =
        rows.iter().map(|m| (m.implementation.clone(), m.pass.clone(), m.head_dim, m.causal)).collect();
    keys.sort();
    keys.dedup();
    let series = |y: &dyn Fn(&Measurement) -> Option<f64>| -> Vec<Series> {
        keys.iter()
            .map(|(imp, pass, d, causal)| Series {
                label: format!("{imp} {pass} d={d}{}", if *causal { " causal" } else { "" }),
                points: rows
                    .iter()
                    .filter(|m| &m.implementation == imp && &m.pass == pass && m.head_dim == *d && m.causal == *causal)
                    .filter_map(|m| Some((m.seqlen_q as f64, y(m)?)))
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect()
    };
    let time = series(&|m| Some(m.ms? / m.batch as f64));
    let mem = series(&|m| Some(m.peak_bytes? as f64 / (1u64 << 20) as f64));
    panels(path, title, "sequence length N", &[("time per sequence", "ms", time), ("peak extra memory", "MiB", mem)])
}
