//! The dashboard's state besides the run: which panel, which probe signal, zoom and scale; and
//! what a key does. No terminal here either: keys in, [`Action`]s out.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

use super::state::RunState;
use crate::run::control::Command;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Panel {
    Overview,
    /// GRPO rewards or distillation losses.
    Method,
    Probes,
    Samples,
    Events,
}

impl Panel {
    pub const ALL: [Panel; 5] = [Panel::Overview, Panel::Method, Panel::Probes, Panel::Samples, Panel::Events];

    pub fn title(self, state: &RunState) -> &'static str {
        match self {
            Panel::Overview => "Overview",
            Panel::Method if state.is_grpo() => "Rewards",
            Panel::Method if state.is_distill() => "Distill",
            Panel::Method => "Method",
            Panel::Probes => "Probes",
            Panel::Samples => "Samples",
            Panel::Events => "Events",
        }
    }

    fn index(self) -> usize {
        Panel::ALL.iter().position(|p| *p == self).unwrap_or(0)
    }
}

/// Zoom levels for the step axis: the whole run, then the last N steps.
pub const ZOOMS: [Option<usize>; 4] = [None, Some(1000), Some(200), Some(50)];

/// What the event loop should do after a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    None,
    Quit,
    Send(Command),
}

pub struct App {
    pub state: RunState,
    pub panel: Panel,
    pub log_scale: bool,
    pub zoom: usize,
    /// Index into the run's probe signals (sorted by name).
    pub signal: usize,
    pub help: bool,
    /// A one-line message for the footer (what a key did).
    pub status: String,
    /// Unix time "now" for elapsed time while the run is live (fixed in snapshot tests).
    pub now: f64,
}

impl App {
    pub fn new(state: RunState) -> Self {
        Self { state, panel: Panel::Overview, log_scale: false, zoom: 0, signal: 0, help: false, status: String::new(), now: 0.0 }
    }

    pub fn zoom_steps(&self) -> Option<usize> {
        ZOOMS[self.zoom % ZOOMS.len()]
    }

    /// The probe signal on show, if the run has any.
    pub fn signal_name(&self) -> Option<&str> {
        let n = self.state.probes.len();
        (n > 0).then(|| self.state.probes.keys().nth(self.signal % n).map(String::as_str)).flatten()
    }

    pub fn on_key(&mut self, key: KeyEvent) -> Action {
        if key.modifiers.contains(KeyModifiers::CONTROL) && key.code == KeyCode::Char('c') {
            return Action::Quit;
        }
        if self.help && key.code != KeyCode::Char('q') {
            self.help = false;
            return Action::None;
        }
        let n_signals = self.state.probes.len().max(1);
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => return Action::Quit,
            KeyCode::Char('?') | KeyCode::Char('h') => self.help = true,
            KeyCode::Tab | KeyCode::Right if !(key.code == KeyCode::Right && self.panel == Panel::Probes) => {
                self.panel = Panel::ALL[(self.panel.index() + 1) % Panel::ALL.len()]
            }
            KeyCode::BackTab | KeyCode::Left if !(key.code == KeyCode::Left && self.panel == Panel::Probes) => {
                self.panel = Panel::ALL[(self.panel.index() + Panel::ALL.len() - 1) % Panel::ALL.len()]
            }
            KeyCode::Char(c @ '1'..='5') => self.panel = Panel::ALL[c as usize - '1' as usize],
            KeyCode::Char(']') | KeyCode::Right => self.signal = (self.signal + 1) % n_signals,
            KeyCode::Char('[') | KeyCode::Left => self.signal = (self.signal + n_signals - 1) % n_signals,
            KeyCode::Char('l') => self.log_scale = !self.log_scale,
            KeyCode::Char('z') => self.zoom = (self.zoom + 1) % ZOOMS.len(),
            KeyCode::Char(c @ ('p' | 's' | 'x')) => {
                if let Some(reason) = &self.state.ended {
                    self.status = format!("the run has ended ({reason}): nothing to control");
                    return Action::None;
                }
                let command = match c {
                    'p' if self.state.paused => Command::Resume,
                    'p' => Command::Pause,
                    's' => Command::Save,
                    _ => Command::Stop,
                };
                return Action::Send(command);
            }
            _ => {}
        }
        Action::None
    }
}
