//! Drawing: one function per panel, each reading [`App`] and nothing else. Everything is laid
//! out from the frame's size on every draw, so resizing just works; ratatui diffs frames, so
//! redrawing never flickers.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, Chart, Clear, Dataset, GraphType, Paragraph, Tabs, Wrap};
use ratatui::Frame;

use super::app::{App, Panel};
use super::state::{Level, ProbePoint, RunState};

const ACCENT: Color = Color::Cyan;
const DIM: Style = Style::new().fg(Color::DarkGray);

pub fn draw(f: &mut Frame, app: &App) {
    // A run that died says why on every panel but the event log (which already does).
    let error = app.state.error.as_ref().filter(|_| app.panel != Panel::Events);
    let width = f.area().width.saturating_sub(2).max(1) as usize;
    let error_rows = error.map_or(0, |m| (m.chars().count().div_ceil(width)).clamp(1, 4) as u16 + 2);
    let [header, tabs, main, banner, footer] =
        Layout::vertical([Constraint::Length(4), Constraint::Length(1), Constraint::Min(3), Constraint::Length(error_rows), Constraint::Length(1)]).areas(f.area());
    draw_header(f, header, app);
    let titles: Vec<Line> = Panel::ALL.iter().enumerate().map(|(i, p)| Line::from(format!("{} {}", i + 1, p.title(&app.state)))).collect();
    let selected = Panel::ALL.iter().position(|p| *p == app.panel);
    f.render_widget(Tabs::new(titles).select(selected).highlight_style(Style::new().fg(ACCENT).add_modifier(Modifier::BOLD | Modifier::REVERSED)), tabs);
    match app.panel {
        Panel::Overview => draw_overview(f, main, app),
        Panel::Method => draw_method(f, main, app),
        Panel::Probes => draw_probes(f, main, app),
        Panel::Samples => draw_samples(f, main, &app.state),
        Panel::Events => draw_events(f, main, &app.state),
    }
    if let Some(message) = error {
        let red = Style::new().fg(Color::Red);
        let title = Line::styled(format!(" error at step {} ", app.state.step), red.add_modifier(Modifier::BOLD));
        f.render_widget(Paragraph::new(message.as_str()).style(red).wrap(Wrap { trim: true }).block(Block::bordered().title(title).border_style(red)), banner);
    }
    let hint = if app.status.is_empty() { "? help  q quit  tab panels  p pause  s save  x stop  l log  z zoom  [ ] signal".to_string() } else { app.status.clone() };
    f.render_widget(Paragraph::new(Line::styled(hint, DIM)), footer);
    if app.help {
        draw_help(f, f.area());
    }
}

fn draw_header(f: &mut Frame, area: Rect, app: &App) {
    let s = &app.state;
    let title = if s.run.is_empty() { " kiln · waiting for events ".to_string() } else { format!(" kiln · {} ", s.run) };
    let (status, status_style) = match (&s.ended, &s.error, s.paused) {
        (_, Some(_), _) => ("ERROR".to_string(), Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)),
        (Some(reason), _, _) => (format!("ended: {reason}"), Style::new().fg(Color::Green)),
        (None, None, true) => ("PAUSED".to_string(), Style::new().fg(Color::Yellow).add_modifier(Modifier::BOLD)),
        (None, None, false) if s.events > 0 => ("running".to_string(), Style::new().fg(ACCENT)),
        _ => ("waiting".to_string(), DIM),
    };
    let block = Block::bordered().title(Line::from(title).style(Style::new().add_modifier(Modifier::BOLD))).title(Line::from(Span::styled(format!(" {status} "), status_style)).right_aligned());
    let elapsed = if s.ended.is_some() || app.now <= 0.0 { s.elapsed_s.max(s.last_t - s.first_t.unwrap_or(s.last_t)) } else { app.now - s.first_t.unwrap_or(app.now) };
    let pct = if s.total_steps > 0 { 100.0 * s.step as f64 / s.total_steps as f64 } else { 0.0 };
    let line1 = Line::from(vec![
        Span::styled(format!("{} ", s.method), Style::new().fg(ACCENT)),
        Span::raw(format!("{} ({})  ", short_path(&s.model, 28), s.device)),
        Span::styled(format!("step {}/{} ({pct:.0}%)", s.step, s.total_steps), Style::new().add_modifier(Modifier::BOLD)),
        Span::raw(format!("  epoch {}  elapsed {}  ETA {}", s.epoch, duration(elapsed), s.eta_s().map_or("—".into(), duration))),
    ]);
    let mut spans = vec![Span::raw(format!("{} tok/s  {} tokens  mem {}", si(s.tokens_per_s), si(s.tokens as f64), bytes(s.rss_bytes)))];
    if let Some(gpu) = s.device_bytes {
        spans.push(Span::raw(format!("  gpu {}", bytes(gpu))));
    }
    if let Some(&(_, l)) = s.train_loss.last() {
        spans.push(Span::raw(format!("  loss {l:.4}")));
    }
    if let Some((step, loss, _)) = s.best_eval {
        spans.push(Span::raw(format!("  best eval {loss:.4} @ {step}")));
    }
    if !s.malformed.is_empty() {
        spans.push(Span::styled(format!("  {} malformed line(s) skipped", s.malformed.len()), Style::new().fg(Color::Yellow)));
    }
    f.render_widget(Paragraph::new(vec![line1, Line::from(spans)]).block(block), area);
}

fn draw_overview(f: &mut Frame, area: Rect, app: &App) {
    let s = &app.state;
    let loss = || {
        let mut series = vec![
            Series::line("train", Color::DarkGray, &s.train_loss),
            Series::line("smoothed", Color::Cyan, &s.smooth_loss),
            Series::points("eval", Color::Yellow, &s.eval_loss),
        ];
        series.retain(|x| !x.data.is_empty());
        series
    };
    // GRPO's training loss is its clipped objective, not a cross-entropy like the eval loss.
    let what = if s.is_grpo() { "loss (train: GRPO objective, eval: cross-entropy)" } else { "loss" };
    let loss_title = format!("{what}{}{}", if app.log_scale { " (log)" } else { "" }, zoom_note(app));
    let best: Vec<(f64, f64)> = s.best_eval.iter().map(|&(x, _, p)| (x, p)).collect();
    let ppl_title = match s.best_eval {
        Some((x, _, p)) => format!("eval perplexity (best {p:.3} @ {x})"),
        None => "eval perplexity".to_string(),
    };
    let ppl = vec![Series::line("ppl", Color::Yellow, &s.eval_ppl), Series::points("best", Color::Green, &best)];
    let lr_title = format!("learning rate{}", s.lr.last().map_or(String::new(), |p| format!(" {:.2e}", p.1)));
    let gn_title = format!("grad norm{}", s.grad_norm.last().map_or(String::new(), |p| format!(" {:.3}", p.1)));
    if area.width >= 120 {
        let rows: [Rect; 2] = if area.height >= 30 {
            Layout::vertical([Constraint::Min(10), Constraint::Length(10)]).areas(area)
        } else {
            [area, Rect::default()]
        };
        let [left, right] = Layout::horizontal([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(rows[0]);
        chart(f, left, &loss_title, &loss(), app.log_scale, app.zoom_steps());
        let [a, b, c] = Layout::vertical([Constraint::Ratio(1, 3); 3]).areas(right);
        chart(f, a, &ppl_title, &ppl, app.log_scale, app.zoom_steps());
        chart(f, b, &lr_title, &[Series::line("lr", Color::Magenta, &s.lr)], false, app.zoom_steps());
        chart(f, c, &gn_title, &[Series::line("|g|", Color::Blue, &s.grad_norm)], app.log_scale, app.zoom_steps());
        if rows[1].height > 0 {
            draw_events(f, rows[1], s);
        }
    } else {
        let [top, bottom] = Layout::vertical([Constraint::Percentage(55), Constraint::Percentage(45)]).areas(area);
        chart(f, top, &loss_title, &loss(), app.log_scale, app.zoom_steps());
        let [a, b] = Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(bottom);
        chart(f, a, &ppl_title, &ppl, app.log_scale, app.zoom_steps());
        let title = format!("{gn_title}  lr {}", s.lr.last().map_or("—".into(), |p| format!("{:.1e}", p.1)));
        chart(f, b, &title, &[Series::line("|g|", Color::Blue, &s.grad_norm)], app.log_scale, app.zoom_steps());
    }
}

fn draw_method(f: &mut Frame, area: Rect, app: &App) {
    let s = &app.state;
    let zoom = app.zoom_steps();
    if s.is_grpo() {
        let g = &s.grpo;
        let col = |f: fn(&super::state::GrpoPoint) -> f64| -> Vec<(f64, f64)> { g.iter().map(|p| (p.step, f(p))).filter(|p| p.1.is_finite()).collect() };
        let (mean, hi, lo) = (col(|p| p.reward_mean), col(|p| p.reward_mean + p.reward_std), col(|p| p.reward_mean - p.reward_std));
        let names: Vec<String> = g.last().map(|p| p.rewards.iter().map(|r| r.0.clone()).collect()).unwrap_or_default();
        let per_fn: Vec<Vec<(f64, f64)>> = (0..names.len())
            .map(|i| g.iter().filter_map(|p| p.rewards.get(i).map(|r| (p.step, r.1))).filter(|p| p.1.is_finite()).collect())
            .collect();
        let palette = [Color::Green, Color::Magenta, Color::Blue, Color::LightRed, Color::LightCyan];
        let mut rewards = vec![Series::line("mean", Color::Yellow, &mean), Series::line("+std", Color::DarkGray, &hi), Series::line("-std", Color::DarkGray, &lo)];
        if names.len() > 1 {
            rewards.extend(names.iter().zip(&per_fn).enumerate().map(|(i, (n, d))| Series::line(n, palette[i % palette.len()], d)));
        }
        let (kl, clip) = (col(|p| p.kl), col(|p| p.clip_low + p.clip_high));
        let (len_mean, len_min, len_max) = (col(|p| p.len_mean), col(|p| p.len_min), col(|p| p.len_max));
        let last = g.last().cloned().unwrap_or_default();
        let [top, mid, text] = Layout::vertical([Constraint::Percentage(50), Constraint::Min(4), Constraint::Length(2)]).areas(area);
        let reward_title = format!("reward {:.3} ± {:.3}", last.reward_mean, last.reward_std);
        chart(f, top, &reward_title, &rewards, false, zoom);
        let [a, b, c] = Layout::horizontal([Constraint::Ratio(1, 3); 3]).areas(mid);
        chart(f, a, &format!("KL {:.4}", last.kl), &[Series::line("kl", Color::Magenta, &kl)], false, zoom);
        chart(f, b, &format!("clipped {:.1}%", 100.0 * (last.clip_low + last.clip_high)), &[Series::line("clip", Color::Red, &clip)], false, zoom);
        let lens = [Series::line("mean", Color::Cyan, &len_mean), Series::line("min", Color::DarkGray, &len_min), Series::line("max", Color::DarkGray, &len_max)];
        chart(f, c, &format!("completion length {:.1}", last.len_mean), &lens, false, zoom);
        let mut summary = vec![Span::raw(format!(
            "zero-std groups {:.0}%  truncated {:.0}%  clip low {:.1}% high {:.1}%",
            100.0 * last.zero_std_frac,
            100.0 * last.truncated_frac,
            100.0 * last.clip_low,
            100.0 * last.clip_high
        ))];
        for (name, mean, std) in &last.rewards {
            summary.push(Span::styled(format!("  {name} {mean:.3}±{std:.3}"), DIM));
        }
        f.render_widget(Paragraph::new(Line::from(summary)).wrap(Wrap { trim: true }), text);
    } else if s.is_distill() {
        let kd: Vec<(f64, f64)> = s.distill.iter().map(|d| (d.0, d.1)).filter(|p| p.1.is_finite()).collect();
        let ce: Vec<(f64, f64)> = s.distill.iter().map(|d| (d.0, d.2)).filter(|p| p.1.is_finite()).collect();
        let [top, text] = Layout::vertical([Constraint::Min(4), Constraint::Length(1)]).areas(area);
        let [a, b] = Layout::horizontal([Constraint::Percentage(50), Constraint::Percentage(50)]).areas(top);
        chart(f, a, "distillation loss", &[Series::line("kd", Color::Magenta, &kd), Series::line("ce", Color::Cyan, &ce)], app.log_scale, zoom);
        let teacher: Vec<(f64, f64)> = match (s.teacher_ppl, s.eval_ppl.first(), s.eval_ppl.last()) {
            (Some(t), Some(a), Some(b)) if t.is_finite() => vec![(a.0, t), (b.0, t)],
            _ => Vec::new(),
        };
        chart(f, b, "perplexity", &[Series::line("student", Color::Yellow, &s.eval_ppl), Series::line("teacher", Color::Green, &teacher)], app.log_scale, zoom);
        let student = s.eval_ppl.last().map_or("—".into(), |p| format!("{:.3}", p.1));
        let teacher = s.teacher_ppl.map_or("—".into(), |t| format!("{t:.3}"));
        f.render_widget(Paragraph::new(format!("student ppl {student}  teacher ppl {teacher}")), text);
    } else {
        let acc: Vec<(f64, f64)> = s.accuracy.iter().map(|&(x, a)| (x, 100.0 * a)).collect();
        let title = match acc.last() {
            Some(&(_, a)) => format!("exact match {a:.1}% (SFT: rewards and distillation panels appear for those methods)"),
            None => "exact match (SFT: rewards and distillation panels appear for those methods)".to_string(),
        };
        chart(f, area, &title, &[Series::line("accuracy %", Color::Green, &acc)], false, zoom);
    }
}

fn draw_probes(f: &mut Frame, area: Rect, app: &App) {
    let s = &app.state;
    let Some(name) = app.signal_name() else {
        let msg = "no probe events yet (recipe [probes] every = N; see docs/probes.md)";
        f.render_widget(Paragraph::new(msg).style(DIM).block(Block::bordered().title("probes")), area);
        return;
    };
    let points = &s.probes[name];
    let [selector, body] = Layout::vertical([Constraint::Length(1), Constraint::Min(3)]).areas(area);
    // The selected signal always shows, however narrow the terminal; the others follow it.
    let n = s.probes.len();
    let at = app.signal % n;
    let mut spans = vec![Span::styled(format!("signal {}/{n} ", at + 1), DIM), Span::styled(format!(" {name} "), Style::new().fg(ACCENT).add_modifier(Modifier::REVERSED))];
    spans.extend((1..n).map(|k| Span::styled(format!("  {}", s.probes.keys().nth((at + k) % n).map_or("", String::as_str)), DIM)));
    f.render_widget(Paragraph::new(Line::from(spans)), selector);
    let [map, bars] = Layout::horizontal([Constraint::Percentage(60), Constraint::Percentage(40)]).areas(body);
    heatmap(f, map, name, points);
    let Some(last) = points.last() else { return };
    let per_layer = last.per_layer();
    let inner_width = bars.width.saturating_sub(2) as usize;
    let finite: Vec<f64> = per_layer.iter().copied().filter(|x| x.is_finite()).collect();
    let hi = finite.iter().fold(f64::NEG_INFINITY, |a, &b| a.max(b.abs())).max(1e-12);
    let bar_width = inner_width.saturating_sub(16);
    let mut lines: Vec<Line> = last
        .layers
        .iter()
        .zip(&per_layer)
        .map(|(l, v)| {
            let n = if v.is_finite() { ((v.abs() / hi) * bar_width as f64).round() as usize } else { 0 };
            Line::from(vec![Span::styled(format!("L{l:<3}"), DIM), Span::styled("█".repeat(n.min(bar_width)), Style::new().fg(ACCENT)), Span::raw(format!(" {}", compact(*v)))])
        })
        .collect();
    if name == "attention_distance" {
        lines.push(Line::styled("furthest-looking heads:", Style::new().add_modifier(Modifier::BOLD)));
        let mut heads: Vec<(usize, usize, f64)> = last.layers.iter().zip(&last.values).flat_map(|(&l, v)| v.iter().enumerate().map(move |(h, &d)| (l, h, d))).collect();
        heads.sort_by(|a, b| b.2.total_cmp(&a.2));
        lines.extend(heads.iter().take(5).map(|(l, h, d)| Line::raw(format!("  L{l} h{h}: {d:.1} tokens back"))));
    }
    let kind = if last.values.iter().any(|v| v.len() > 1) { "mean per layer" } else { "per layer" };
    let title = format!("step {} · {kind}", last.step);
    f.render_widget(Paragraph::new(lines).block(Block::bordered().title(title)), bars);
}

/// Layers (rows) × probe steps (columns): each row shaded from its own minimum (·) to maximum
/// (█), so change over time shows in every layer whatever its scale (the bars beside give the
/// values). A row that varies by less than 2 % stays mid-shade.
fn heatmap(f: &mut Frame, area: Rect, name: &str, points: &[ProbePoint]) {
    let block = Block::bordered().title(format!("{name}: layers × time"));
    let inner = block.inner(area);
    f.render_widget(block, area);
    if inner.width < 8 || inner.height < 2 {
        return;
    }
    let label = 5usize;
    let cols = (inner.width as usize - label).min(points.len());
    let shown = &points[points.len() - cols..];
    // Few points are stretched to fill the width (up to 4 cells each).
    let cell = ((inner.width as usize - label) / cols.max(1)).clamp(1, 4);
    let layers: Vec<usize> = shown.last().map(|p| p.layers.clone()).unwrap_or_default();
    let grid: Vec<Vec<f64>> = shown.iter().map(ProbePoint::per_layer).collect();
    let range_of = |row: usize| {
        let finite = grid.iter().filter_map(|col| col.get(row).copied()).filter(|x| x.is_finite());
        finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| (a.min(x), b.max(x)))
    };
    const SHADES: [char; 5] = ['·', '░', '▒', '▓', '█'];
    const COLOURS: [Color; 5] = [Color::Blue, Color::Cyan, Color::Green, Color::Yellow, Color::Red];
    let rows = inner.height as usize - 1;
    let mut lines: Vec<Line> = layers
        .iter()
        .enumerate()
        .take(rows)
        .map(|(row, l)| {
            let (lo, hi) = range_of(row);
            let (mid, span) = ((lo + hi) / 2.0, (hi - lo).max(0.02 * lo.abs().max(hi.abs())));
            let mut spans = vec![Span::styled(format!("L{l:<3} "), DIM)];
            spans.extend(grid.iter().map(|col| match col.get(row).copied().filter(|x| x.is_finite()) {
                Some(x) => {
                    let t = if span > 0.0 { (x - mid) / span + 0.5 } else { 0.5 };
                    let i = ((t * 4.0).round() as usize).min(4);
                    Span::styled(SHADES[i].to_string().repeat(cell), Style::new().fg(COLOURS[i]))
                }
                None => Span::raw(" ".repeat(cell)),
            }));
            Line::from(spans)
        })
        .collect();
    let first = shown.first().map_or(0, |p| p.step);
    let last = shown.last().map_or(0, |p| p.step);
    lines.push(Line::styled(format!("steps {first}–{last} · each layer from its min · to max █"), DIM));
    f.render_widget(Paragraph::new(lines), inner);
}

fn draw_samples(f: &mut Frame, area: Rect, s: &RunState) {
    let mut lines = Vec::new();
    for x in s.samples.iter().rev() {
        let mut head = vec![Span::styled(format!("step {}", x.step), DIM)];
        if let Some(r) = x.reward {
            head.push(Span::styled(format!("  reward {r:.3}"), Style::new().fg(if r > 0.0 { Color::Green } else { Color::Red })));
        }
        if let Some(e) = &x.expected {
            let ok = e.trim() == x.completion.trim();
            head.push(Span::styled(format!("  expected {e:?}"), Style::new().fg(if ok { Color::Green } else { Color::Yellow })));
        }
        lines.push(Line::from(head));
        lines.push(Line::from(vec![Span::styled(format!("{:?}", x.prompt), Style::new().fg(ACCENT)), Span::raw(" → "), Span::raw(format!("{:?}", x.completion))]));
    }
    if lines.is_empty() {
        lines.push(Line::styled("no samples yet (eval samples and GRPO rollouts appear here)", DIM));
    }
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }).block(Block::bordered().title("latest samples (newest first)")), area);
}

fn draw_events(f: &mut Frame, area: Rect, s: &RunState) {
    // Long messages wrap under their text column; the newest lines stay in view.
    let rows = area.height.saturating_sub(2) as usize;
    let text_width = (area.width as usize).saturating_sub(2 + 13).max(8);
    let mut lines: Vec<Line> = Vec::new();
    for l in &s.log {
        let (tag, style) = match l.level {
            Level::Info => ("     ", Style::new()),
            Level::Warn => ("warn ", Style::new().fg(Color::Yellow)),
            Level::Error => ("ERROR", Style::new().fg(Color::Red).add_modifier(Modifier::BOLD)),
        };
        for (i, piece) in wrap_words(&l.text, text_width).into_iter().enumerate() {
            let head = if i == 0 { Span::styled(format!("{:>6} ", l.step), DIM) } else { Span::raw(" ".repeat(7)) };
            let tag = if i == 0 { tag } else { "     " };
            lines.push(Line::from(vec![head, Span::styled(format!("{tag} {piece}"), style)]));
        }
    }
    let skip = lines.len().saturating_sub(rows);
    f.render_widget(Paragraph::new(lines.split_off(skip)).block(Block::bordered().title("events")), area);
}

/// Greedy word wrap to `width` characters; a word longer than a line is cut.
fn wrap_words(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let line = lines.last_mut().map_or(0, |l| l.chars().count());
            let gap = usize::from(line > 0);
            if line + gap + word.len() <= width {
                let last = lines.len() - 1;
                if gap == 1 {
                    lines[last].push(' ');
                }
                lines[last].extend(word.iter());
                break;
            }
            if line > 0 {
                lines.push(String::new());
                continue;
            }
            // A word longer than a whole line.
            let rest = word.split_off(width.min(word.len()));
            let last = lines.len() - 1;
            lines[last].extend(word.iter());
            lines.push(String::new());
            word = rest;
            if word.is_empty() {
                break;
            }
        }
    }
    if lines.len() > 1 && lines.last().is_some_and(String::is_empty) {
        lines.pop();
    }
    lines
}

fn draw_help(f: &mut Frame, area: Rect) {
    let text = [
        "?        this help (any key closes it)",
        "q, Esc   quit the viewer (training goes on)",
        "tab, 1-5 switch panels",
        "p        pause / resume training",
        "s        save a checkpoint now",
        "x        stop after the current step",
        "l        log scale on loss charts",
        "z        zoom: whole run, last 1000/200/50 steps",
        "[ ]      previous / next probe signal",
        "",
        "p, s and x write RUN/control; the trainer",
        "acts on it between steps, so they work from",
        "any terminal watching the same run.",
    ];
    let w = 50.min(area.width);
    let h = (text.len() as u16 + 2).min(area.height);
    let rect = Rect { x: area.x + (area.width - w) / 2, y: area.y + (area.height - h) / 2, width: w, height: h };
    f.render_widget(Clear, rect);
    f.render_widget(Paragraph::new(text.iter().map(|t| Line::raw(*t)).collect::<Vec<_>>()).block(Block::bordered().title(" keys ")), rect);
}

/// One line on a chart.
struct Series<'a> {
    name: &'a str,
    color: Color,
    data: &'a [(f64, f64)],
    scatter: bool,
}

impl<'a> Series<'a> {
    fn line(name: &'a str, color: Color, data: &'a [(f64, f64)]) -> Self {
        Self { name, color, data, scatter: false }
    }

    fn points(name: &'a str, color: Color, data: &'a [(f64, f64)]) -> Self {
        Self { name, color, data, scatter: true }
    }
}

/// A line chart of `series` with axes fitted to the data inside the zoom window; `log` plots
/// log10(y) (non-positive values dropped) and labels the axis in the original units.
fn chart(f: &mut Frame, area: Rect, title: &str, series: &[Series], log: bool, zoom: Option<usize>) {
    let block = Block::bordered().title(title.to_string());
    let max_x = series.iter().flat_map(|s| s.data.iter().map(|p| p.0)).fold(f64::NEG_INFINITY, f64::max);
    let from = zoom.map_or(f64::NEG_INFINITY, |n| max_x - n as f64);
    let data: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.data
                .iter()
                .filter(|p| p.0 >= from && p.1.is_finite() && (!log || p.1 > 0.0))
                .map(|&(x, y)| (x, if log { y.log10() } else { y }))
                .collect()
        })
        .collect();
    let all = data.iter().flatten();
    let (x0, x1, y0, y1) = all.fold((f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY), |(a, b, c, d), p| (a.min(p.0), b.max(p.0), c.min(p.1), d.max(p.1)));
    if !x0.is_finite() {
        f.render_widget(Paragraph::new("no data yet").style(DIM).block(block), area);
        return;
    }
    let (x1, pad) = (if x1 > x0 { x1 } else { x0 + 1.0 }, if y1 > y0 { (y1 - y0) * 0.05 } else { y0.abs().max(1e-3) * 0.1 });
    // Padding never pushes a non-negative series below zero.
    let (y0, y1) = (if y0 >= 0.0 && !log { (y0 - pad).max(0.0) } else { y0 - pad }, y1 + pad);
    let label = |y: f64| if log { compact(10f64.powf(y)) } else { compact(y) };
    let datasets: Vec<Dataset> = series
        .iter()
        .zip(&data)
        .filter(|(_, d)| !d.is_empty())
        .map(|(s, d)| {
            Dataset::default()
                .name(s.name.to_string())
                .marker(if s.scatter { Marker::Dot } else { Marker::Braille })
                .graph_type(if s.scatter { GraphType::Scatter } else { GraphType::Line })
                .style(Style::new().fg(s.color))
                .data(d)
        })
        .collect();
    let chart = Chart::new(datasets)
        .block(block)
        .x_axis(Axis::default().bounds([x0, x1]).labels([format!("{x0}"), format!("{x1}")]).style(DIM))
        .y_axis(Axis::default().bounds([y0, y1]).labels([label(y0), label(y1)]).style(DIM));
    f.render_widget(chart, area);
}

fn zoom_note(app: &App) -> String {
    app.zoom_steps().map_or(String::new(), |n| format!(" · last {n} steps"))
}

/// Four significant figures in at most about eight characters.
pub fn compact(x: f64) -> String {
    if !x.is_finite() {
        return "—".into();
    }
    let a = x.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) { format!("{x:.2e}") } else if a >= 100.0 { format!("{x:.1}") } else { format!("{x:.3}") }
}

/// 12.3k, 4.5M.
pub fn si(x: f64) -> String {
    match x {
        x if !x.is_finite() => "—".into(),
        x if x >= 1e9 => format!("{:.1}G", x / 1e9),
        x if x >= 1e6 => format!("{:.1}M", x / 1e6),
        x if x >= 1e4 => format!("{:.1}k", x / 1e3),
        x => format!("{x:.0}"),
    }
}

pub fn bytes(b: u64) -> String {
    match b {
        0 => "—".into(),
        b if b >= 1 << 30 => format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64),
        b => format!("{:.0} MiB", b as f64 / (1u64 << 20) as f64),
    }
}

pub fn duration(s: f64) -> String {
    if !s.is_finite() || s < 0.0 {
        return "—".into();
    }
    let s = s.round() as u64;
    match s {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// The last `max` characters of a path, with an ellipsis when cut.
fn short_path(p: &str, max: usize) -> String {
    let n = p.chars().count();
    if n <= max { p.to_string() } else { format!("…{}", p.chars().skip(n - max + 1).collect::<String>()) }
}

#[cfg(test)]
mod tests {
    use super::wrap_words;

    #[test]
    fn words_wrap_and_long_words_are_cut() {
        assert_eq!(wrap_words("one two three", 7), ["one two", "three"]);
        assert_eq!(wrap_words("abcdefghij x", 4), ["abcd", "efgh", "ij x"]);
        assert_eq!(wrap_words("", 5), [""]);
        assert!(wrap_words(&"w ".repeat(100), 8).iter().all(|l| l.chars().count() <= 8));
    }
}
