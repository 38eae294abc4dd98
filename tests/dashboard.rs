//! The dashboard rendered with ratatui's TestBackend from recorded runs (tests/fixtures/runs:
//! an SFT run, a GRPO run, a distillation run, and a run that ended in an error with a
//! truncated last line), at
//! 80×24 and 160×48, compared with the text snapshots in tests/snapshots/dashboard/.
//!
//! `KILN_UPDATE_SNAPSHOTS=1 cargo test --test dashboard` rewrites the snapshots (review the
//! diff before committing); a mismatch leaves the new rendering beside the old as `.new`.

mod common;

use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;

use common::fixture;
use kiln::run::control::Command;
use kiln::tui::app::{Action, App, Panel};

fn render(app: &App, width: u16, height: u16) -> String {
    let mut terminal = Terminal::new(TestBackend::new(width, height)).unwrap();
    terminal.draw(|f| kiln::tui::ui::draw(f, app)).unwrap();
    let buf = terminal.backend().buffer();
    (0..height).map(|y| (0..width).map(|x| buf[(x, y)].symbol()).collect::<String>().trim_end().to_string()).collect::<Vec<_>>().join("\n") + "\n"
}

fn check_snapshot(name: &str, text: &str) {
    let dir = fixture("../snapshots/dashboard");
    let path = dir.join(format!("{name}.txt"));
    if std::env::var_os("KILN_UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&path, text).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("{} missing: run with KILN_UPDATE_SNAPSHOTS=1", path.display()));
    if want != text {
        let new = path.with_extension("txt.new");
        std::fs::write(&new, text).unwrap();
        panic!("{name}: the dashboard renders differently from {}; the new rendering is in {}", path.display(), new.display());
    }
}

fn load(run: &str) -> App {
    kiln::tui::load(&fixture(&format!("runs/{run}"))).unwrap()
}

fn snapshots(run: &str, panels: &[Panel]) {
    let mut app = load(run);
    for &panel in panels {
        app.panel = panel;
        for (w, h) in [(80, 24), (160, 48)] {
            let text = render(&app, w, h);
            check_snapshot(&format!("{run}-{}-{w}x{h}", app.panel.title(&app.state).to_lowercase()), &text);
        }
    }
}

#[test]
fn sft_run_snapshots() {
    snapshots("sft", &[Panel::Overview, Panel::Probes, Panel::Samples]);
}

#[test]
fn grpo_run_snapshots() {
    snapshots("grpo", &[Panel::Overview, Panel::Method, Panel::Probes, Panel::Samples]);
}

#[test]
fn distill_run_snapshots() {
    snapshots("distill", &[Panel::Method]);
}

#[test]
fn error_run_snapshots() {
    snapshots("error", &[Panel::Overview, Panel::Events]);
}

/// The error run's events.jsonl has a garbage line and ends mid-line (the process was killed
/// while writing): both are skipped with a note, and everything else is read.
#[test]
fn malformed_lines_are_skipped_with_a_note() {
    let app = load("error");
    assert_eq!(app.state.malformed.len(), 2, "{:?}", app.state.malformed);
    assert!(app.state.error.is_some());
    let text = render(&app, 80, 24);
    assert!(text.contains("2 malformed line(s) skipped"), "{text}");
    let mut app = app;
    app.panel = Panel::Events;
    let text = render(&app, 160, 48);
    assert!(text.contains("skipped events.jsonl line"), "{text}");
    assert!(text.contains("unfinished line"), "{text}");
}

/// Every panel draws at sizes from tiny to large without panicking.
#[test]
fn every_panel_draws_at_any_size() {
    for run in ["sft", "grpo", "distill", "error"] {
        let mut app = load(run);
        for panel in Panel::ALL {
            app.panel = panel;
            for (w, h) in [(1, 1), (20, 5), (40, 12), (80, 24), (120, 30), (200, 60)] {
                render(&app, w, h);
                app.help = true;
                render(&app, w, h);
                app.help = false;
            }
        }
    }
}

fn key(code: KeyCode) -> KeyEvent {
    KeyEvent::new(code, KeyModifiers::NONE)
}

#[test]
fn keys_switch_panels_and_send_control_commands() {
    let mut app = load("sft");
    // A finished run has nothing to control.
    assert_eq!(app.on_key(key(KeyCode::Char('p'))), Action::None);
    assert!(app.status.contains("ended"));
    // Pretend it is live.
    app.state.ended = None;
    assert_eq!(app.on_key(key(KeyCode::Char('p'))), Action::Send(Command::Pause));
    app.state.paused = true;
    assert_eq!(app.on_key(key(KeyCode::Char('p'))), Action::Send(Command::Resume));
    assert_eq!(app.on_key(key(KeyCode::Char('s'))), Action::Send(Command::Save));
    assert_eq!(app.on_key(key(KeyCode::Char('x'))), Action::Send(Command::Stop));
    assert_eq!(app.on_key(key(KeyCode::Tab)), Action::None);
    assert_eq!(app.panel, Panel::Method);
    app.on_key(key(KeyCode::Char('3')));
    assert_eq!(app.panel, Panel::Probes);
    let first = app.signal_name().unwrap().to_string();
    app.on_key(key(KeyCode::Char(']')));
    assert_ne!(app.signal_name().unwrap(), first);
    app.on_key(key(KeyCode::Char('[')));
    assert_eq!(app.signal_name().unwrap(), first);
    app.on_key(key(KeyCode::Char('l')));
    assert!(app.log_scale);
    app.on_key(key(KeyCode::Char('?')));
    assert!(app.help);
    assert_eq!(app.on_key(key(KeyCode::Char('x'))), Action::None, "a key closes the help first");
    assert!(!app.help);
    assert_eq!(app.on_key(key(KeyCode::Char('q'))), Action::Quit);
    assert_eq!(app.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)), Action::Quit);
}
