//! The run directory's `control` file: how a dashboard (in this process or another terminal)
//! asks the trainer to pause, resume, save a checkpoint now, or stop after the current step.
//!
//! A writer appends one command a line. The trainer takes the file by renaming it (so a command
//! appended meanwhile lands in a fresh file and is read next time), reads the commands in order
//! and deletes it. Unknown lines are ignored with a warning event, never an error.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FILE_NAME: &str = "control";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Save,
    Stop,
}

impl Command {
    pub fn as_str(self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Save => "save",
            Command::Stop => "stop",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s.trim() {
            "pause" => Command::Pause,
            "resume" => Command::Resume,
            "save" => Command::Save,
            "stop" => Command::Stop,
            _ => return None,
        })
    }
}

pub fn path(run_dir: &Path) -> PathBuf {
    run_dir.join(FILE_NAME)
}

/// Appends `command` to `RUN/control`.
pub fn send(run_dir: &Path, command: Command) -> std::io::Result<()> {
    let mut f = OpenOptions::new().create(true).append(true).open(path(run_dir))?;
    f.write_all(format!("{}\n", command.as_str()).as_bytes())
}

/// Takes the pending commands (oldest first) and the lines that were not commands. Nothing
/// pending (or an unreadable file) is an empty list.
pub fn take(run_dir: &Path) -> (Vec<Command>, Vec<String>) {
    let taken = run_dir.join(format!("{FILE_NAME}.taken"));
    if std::fs::rename(path(run_dir), &taken).is_err() {
        return (Vec::new(), Vec::new());
    }
    let text = std::fs::read_to_string(&taken).unwrap_or_default();
    let _ = std::fs::remove_file(&taken);
    let mut commands = Vec::new();
    let mut unknown = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match Command::parse(line) {
            Some(c) => commands.push(c),
            None => unknown.push(line.trim().to_string()),
        }
    }
    (commands, unknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_taken_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(take(dir.path()), (vec![], vec![]));
        send(dir.path(), Command::Pause).unwrap();
        send(dir.path(), Command::Save).unwrap();
        std::fs::OpenOptions::new().append(true).open(path(dir.path())).unwrap().write_all(b"explode\n").unwrap();
        send(dir.path(), Command::Stop).unwrap();
        assert_eq!(take(dir.path()), (vec![Command::Pause, Command::Save, Command::Stop], vec!["explode".to_string()]));
        assert_eq!(take(dir.path()), (vec![], vec![]));
        assert!(!path(dir.path()).exists());
    }
}
