//! Plots of measured vs estimated peaks and of an estimate's components: SVG drawn with
//! plotters, PNG rasterized from the SVG with resvg (text uses the system's fonts; on a
//! machine without fonts the PNG has no labels, the SVG always does).

use std::path::Path;

use plotters::prelude::*;

use crate::error::{Error, Result};

/// One series of a line chart: `(x, y)` points in bytes on y.
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points.
    pub points: Vec<(f64, f64)>,
    /// Draw as a line (estimate) or as marks (measurement).
    pub line: bool,
    /// Colour index.
    pub colour: usize,
}

fn err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Io {
        path: path.to_path_buf(),
        err: std::io::Error::other(e.to_string()),
    }
}

/// Draws `series` (y in bytes, shown in GiB) into `path` (SVG) and `path` with `.png`.
///
/// # Errors
/// [`Error::Io`] when drawing or writing fails.
pub fn line_chart(path: &Path, title: &str, x_label: &str, series: &[Series]) -> Result<()> {
    let gib = (1u64 << 30) as f64;
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let ys = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1 / gib));
    let (x0, x1) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    let y1 = ys.fold(0f64, f64::max) * 1.1;
    {
        let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(path, e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d((x0 * 0.9)..(x1 * 1.05), 0f64..y1.max(1e-9))
            .map_err(|e| err(path, e))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .y_desc("peak allocated (GiB, 2^30 bytes)")
            .draw()
            .map_err(|e| err(path, e))?;
        for s in series {
            let colour = Palette99::pick(s.colour).to_rgba();
            let pts: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (x, y / gib)).collect();
            if s.line {
                chart
                    .draw_series(LineSeries::new(pts, colour.stroke_width(2)))
                    .map_err(|e| err(path, e))?
                    .label(s.label.clone())
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                    });
            } else {
                chart
                    .draw_series(
                        pts.iter()
                            .map(|&p| Cross::new(p, 6, colour.stroke_width(2))),
                    )
                    .map_err(|e| err(path, e))?
                    .label(s.label.clone())
                    .legend(move |(x, y)| Cross::new((x + 9, y), 6, colour.stroke_width(2)));
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(|e| err(path, e))?;
        root.present().map_err(|e| err(path, e))?;
    }
    to_png(path)
}

/// Draws one stacked bar of `parts` (label, bytes) into `path` (SVG) and its `.png`.
///
/// # Errors
/// [`Error::Io`] when drawing or writing fails.
pub fn stacked_bar(path: &Path, title: &str, parts: &[(String, u64)]) -> Result<()> {
    let gib = (1u64 << 30) as f64;
    let total: f64 = parts.iter().map(|p| p.1 as f64 / gib).sum();
    {
        let root = SVGBackend::new(path, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(path, e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(16)
            .x_label_area_size(30)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..3f64, 0f64..(total * 1.05).max(1e-9))
            .map_err(|e| err(path, e))?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .disable_x_axis()
            .y_desc("GiB (2^30 bytes)")
            .draw()
            .map_err(|e| err(path, e))?;
        let mut base = 0f64;
        for (i, (label, b)) in parts.iter().enumerate() {
            let h = *b as f64 / gib;
            let colour = Palette99::pick(i).to_rgba();
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(0.3, base), (1.3, base + h)],
                    colour.filled(),
                )))
                .map_err(|e| err(path, e))?
                .label(format!("{label}: {:.2} GiB", h))
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled())
                });
            base += h;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| err(path, e))?;
        root.present().map_err(|e| err(path, e))?;
    }
    to_png(path)
}

/// Rasterizes the SVG at `svg` into the same name with `.png`.
fn to_png(svg: &Path) -> Result<()> {
    let data = std::fs::read(svg).map_err(|e| Error::io(svg, e))?;
    let mut opt = resvg::usvg::Options::default();
    let db = opt.fontdb_mut();
    db.load_system_fonts();
    // fontdb maps the generic `sans-serif` to Arial; use an installed sans face instead.
    let sans = db.faces().find_map(|f| {
        f.families
            .iter()
            .map(|(name, _)| name.clone())
            .find(|n| n.contains("Sans") && !n.contains("Mono") && !n.contains("Serif"))
    });
    if let Some(name) = sans {
        db.set_sans_serif_family(name);
    }
    let tree = resvg::usvg::Tree::from_data(&data, &opt).map_err(|e| err(svg, e))?;
    let size = tree.size().to_int_size();
    let mut pixmap = resvg::tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| err(svg, "empty image"))?;
    resvg::render(
        &tree,
        resvg::tiny_skia::Transform::default(),
        &mut pixmap.as_mut(),
    );
    let png = svg.with_extension("png");
    pixmap.save_png(&png).map_err(|e| err(&png, e))
}
