//! `kiln report --plot FILE.png|svg`: loss, eval perplexity and (GRPO) rewards, one panel each,
//! every run in its own colour. Text is drawn with a bundled DejaVu Sans, so no system font
//! library is needed.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::{ReportError, Run};

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";
const PALETTE: [RGBColor; 6] = [RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40), RGBColor(148, 103, 189), RGBColor(140, 86, 75)];

/// One line (or set of points) on a panel.
struct Line<'a> {
    name: String,
    colour: RGBColor,
    data: &'a [(f64, f64)],
    points: bool,
}

/// Draws the runs' charts to `path` (PNG or SVG by extension), written atomically.
pub fn plot(runs: &[Run], path: &Path) -> Result<(), ReportError> {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // The bundled font is valid (a test draws with it), so this cannot fail in practice.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
    let err = |message: String| ReportError::Plot { path: path.to_path_buf(), message };
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
    let grpo = runs.iter().any(|r| !r.state.grpo.is_empty());
    let size = (1100u32, if grpo { 1050u32 } else { 720 });
    if ext != "png" && ext != "svg" {
        return Err(err(format!("unknown image type {ext:?}: the file name must end in .png or .svg")));
    }
    let tmp = crate::fsutil::temp_beside(path).map_err(|source| ReportError::Io { path: path.to_path_buf(), source })?;
    if ext == "png" {
        let root = BitMapBackend::new(tmp.path(), size).into_drawing_area();
        draw(&root, runs, grpo).map_err(err)?;
        root.present().map_err(|e| err(e.to_string()))?;
    } else {
        let root = SVGBackend::new(tmp.path(), size).into_drawing_area();
        draw(&root, runs, grpo).map_err(err)?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    tmp.persist(path).map_err(|e| ReportError::Io { path: path.to_path_buf(), source: e.error })?;
    Ok(())
}

fn draw<DB: DrawingBackend>(root: &DrawingArea<DB, Shift>, runs: &[Run], grpo: bool) -> Result<(), String> {
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let panels = root.split_evenly((if grpo { 3 } else { 2 }, 1));
    let rewards: Vec<Vec<(f64, f64)>> = runs.iter().map(|r| r.state.grpo.iter().map(|g| (g.step, g.reward_mean)).filter(|p| p.1.is_finite()).collect()).collect();
    let mut loss = Vec::new();
    let mut ppl = Vec::new();
    let mut reward = Vec::new();
    for (i, run) in runs.iter().enumerate() {
        let (colour, name, s) = (PALETTE[i % PALETTE.len()], run.name(), &run.state);
        loss.push(Line { name: format!("{name} train (smoothed)"), colour, data: &s.smooth_loss, points: false });
        loss.push(Line { name: format!("{name} eval"), colour, data: &s.eval_loss, points: true });
        ppl.push(Line { name: format!("{name} eval ppl"), colour, data: &s.eval_ppl, points: false });
        reward.push(Line { name: format!("{name} reward mean"), colour, data: &rewards[i], points: false });
    }
    panel(&panels[0], "loss", &loss)?;
    panel(&panels[1], "eval perplexity", &ppl)?;
    if grpo {
        panel(&panels[2], "GRPO reward", &reward)?;
    }
    Ok(())
}

fn panel<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, title: &str, lines: &[Line]) -> Result<(), String> {
    let s = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    let all = lines.iter().flat_map(|l| l.data.iter()).filter(|p| p.1.is_finite());
    let (x0, x1, y0, y1) = all.fold((f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY), |(a, b, c, d), p| (a.min(p.0), b.max(p.0), c.min(p.1), d.max(p.1)));
    if !x0.is_finite() {
        area.draw_text(&format!("{title}: no data"), &(FAMILY, 18).into_font().color(&BLACK), (20, 20)).map_err(s)?;
        return Ok(());
    }
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let pad = if y1 > y0 { (y1 - y0) * 0.05 } else { y0.abs().max(1e-3) * 0.1 };
    let mut chart = ChartBuilder::on(area)
        .caption(title, (FAMILY, 20))
        .margin(12)
        .margin_right(36)
        .x_label_area_size(34)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
        .map_err(s)?;
    chart.configure_mesh().x_desc("step").x_label_formatter(&|x| format!("{x:.0}")).label_style((FAMILY, 13)).light_line_style(WHITE.mix(0.0)).draw().map_err(s)?;
    for l in lines.iter().filter(|l| !l.data.is_empty()) {
        let colour = l.colour;
        if l.points {
            chart
                .draw_series(l.data.iter().filter(|p| p.1.is_finite()).map(|&p| Circle::new(p, 3, colour.filled())))
                .map_err(s)?
                .label(l.name.clone())
                .legend(move |(x, y)| Circle::new((x + 10, y), 3, colour.filled()));
        } else {
            chart
                .draw_series(LineSeries::new(l.data.iter().copied().filter(|p| p.1.is_finite()), colour.stroke_width(2)))
                .map_err(s)?
                .label(l.name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2)));
        }
    }
    chart.configure_series_labels().label_font((FAMILY, 13)).background_style(WHITE.mix(0.85)).border_style(BLACK).draw().map_err(s)?;
    Ok(())
}
