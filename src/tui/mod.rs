//! The terminal dashboard over a run directory (`kiln watch RUN`, `kiln train RECIPE --tui`).
//!
//! Cut as ratatui's examples and gitui: [`state`] folds events into what is shown, [`app`] turns
//! keys into actions, [`ui`] draws, and [`watch`] owns the terminal and the loop between them.
//! It reads only `RUN/events.jsonl` and writes only `RUN/control`, so the trainer never knows it
//! exists and the same dashboard works on a live run, a finished one or one that died.

pub mod app;
pub mod state;
pub mod ui;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ratatui::crossterm::event::{self, Event as TermEvent, KeyEventKind};
use ratatui::DefaultTerminal;

use self::app::{Action, App};
use self::state::RunState;
use crate::run::control;
use crate::run::follow::EventFile;

/// How often the events file is polled and the clock redrawn.
const TICK: Duration = Duration::from_millis(250);
/// A half-written last line older than this is reported as malformed (the writer died).
const PARTIAL_GRACE: Duration = Duration::from_secs(2);

/// Reads what is in `RUN/events.jsonl` now into a dashboard state; a trailing unfinished line
/// counts as malformed. What the snapshot tests render.
pub fn load(run_dir: &Path) -> std::io::Result<App> {
    let (events, bad) = crate::run::follow::read_all(&run_dir.join("events.jsonl"))?;
    let mut state = RunState::from_events(&events);
    bad.into_iter().for_each(|m| state.note_malformed(m));
    Ok(App::new(state))
}

/// Runs the dashboard on `run_dir` until the viewer quits. `finished` (for `train --tui`) says
/// whether the trainer in this process is done; the dashboard stays up until `q` either way.
pub fn watch(run_dir: &Path, finished: &dyn Fn() -> bool) -> std::io::Result<()> {
    let mut terminal = ratatui::try_init()?;
    let result = run(&mut terminal, run_dir, finished);
    ratatui::restore();
    result
}

fn run(terminal: &mut DefaultTerminal, run_dir: &Path, finished: &dyn Fn() -> bool) -> std::io::Result<()> {
    let mut file = EventFile::new(&run_dir.join("events.jsonl"));
    let mut app = App::new(RunState::default());
    let mut partial_since: Option<Instant> = None;
    let mut announced_finish = false;
    loop {
        let poll = file.poll()?;
        if poll.reset {
            app.state = RunState::default();
        }
        for record in poll.records {
            match record {
                Ok(v) => app.state.apply(&v),
                Err(m) => app.state.note_malformed(m),
            }
        }
        // A line half written for a while (or at the end of a run) was cut off.
        match (file.has_partial(), partial_since) {
            (true, None) => partial_since = Some(Instant::now()),
            (true, Some(since)) if since.elapsed() > PARTIAL_GRACE || app.state.ended.is_some() => {
                if let Some(m) = file.take_partial() {
                    app.state.note_malformed(m);
                }
                partial_since = None;
            }
            (false, _) => partial_since = None,
            _ => {}
        }
        if finished() && !announced_finish {
            announced_finish = true;
            if app.state.ended.is_none() {
                app.status = "the trainer has exited; press q to leave".into();
            }
        }
        app.now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        terminal.draw(|f| ui::draw(f, &app))?;
        if !event::poll(TICK)? {
            continue;
        }
        // Drain every pending terminal event before the next draw (resizes, key repeat).
        loop {
            match event::read()? {
                TermEvent::Key(key) if key.kind != KeyEventKind::Release => match app.on_key(key) {
                    Action::Quit => return Ok(()),
                    Action::Send(command) => {
                        app.status = match control::send(run_dir, command) {
                            Ok(()) => format!("sent `{}` to the trainer (through {})", command.as_str(), control::path(run_dir).display()),
                            Err(e) => format!("cannot write {}: {e}", control::path(run_dir).display()),
                        };
                    }
                    Action::None => {}
                },
                _ => {}
            }
            if !event::poll(Duration::ZERO)? {
                break;
            }
        }
    }
}
