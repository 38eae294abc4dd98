//! Reading `events.jsonl` as it grows: what the dashboard and `kiln report` see of a run.
//!
//! Events are read as JSON values rather than typed [`super::Event`]s: the file may come from
//! an older or newer kiln, and NaN figures are written as `null`. A line that is not a JSON
//! object (a run killed mid-write, a hand edit) becomes a [`Malformed`] note, never an error.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde_json::Value;

/// A line of events.jsonl that could not be read.
#[derive(Debug, Clone, PartialEq)]
pub struct Malformed {
    /// 1-based.
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "events.jsonl line {}: {}", self.line, self.message)
    }
}

pub type Record = Result<Value, Malformed>;

/// What one poll found.
#[derive(Debug, Default)]
pub struct Poll {
    /// The file shrank (the run was started over): forget what was read before.
    pub reset: bool,
    pub records: Vec<Record>,
}

/// Follows an events file: each [`EventFile::poll`] returns the complete lines added since the
/// last one. A last line without its newline is held back until it is finished, or handed out
/// as malformed by [`EventFile::take_partial`].
pub struct EventFile {
    path: PathBuf,
    offset: u64,
    line: usize,
    partial: Vec<u8>,
}

impl EventFile {
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf(), offset: 0, line: 0, partial: Vec::new() }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// New complete lines. A missing file is no lines yet (the run may not have started).
    pub fn poll(&mut self) -> std::io::Result<Poll> {
        let mut poll = Poll::default();
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(poll),
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        if len < self.offset {
            *self = Self::new(&self.path);
            poll.reset = true;
        }
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        self.offset += bytes.len() as u64;
        self.partial.extend_from_slice(&bytes);
        let Some(last_newline) = self.partial.iter().rposition(|&b| b == b'\n') else { return Ok(poll) };
        let rest = self.partial.split_off(last_newline + 1);
        let complete = std::mem::replace(&mut self.partial, rest);
        // `complete` ends with its newline: every piece before it is one line (blank ones too).
        for raw in complete[..complete.len() - 1].split(|&b| b == b'\n') {
            self.line += 1;
            if !raw.iter().all(u8::is_ascii_whitespace) {
                poll.records.push(parse(raw, self.line));
            }
        }
        Ok(poll)
    }

    /// True while a line is half written.
    pub fn has_partial(&self) -> bool {
        !self.partial.is_empty()
    }

    /// The unfinished last line as a malformed record (a run that will write no more).
    pub fn take_partial(&mut self) -> Option<Malformed> {
        if self.partial.is_empty() {
            return None;
        }
        self.line += 1;
        let text = String::from_utf8_lossy(&std::mem::take(&mut self.partial)).into_owned();
        Some(Malformed { line: self.line, message: format!("unfinished line ({} bytes, no newline): the run was probably killed mid-write", text.len()) })
    }
}

fn parse(raw: &[u8], line: usize) -> Record {
    match serde_json::from_slice::<Value>(raw) {
        Ok(v) if v.get("kind").and_then(Value::as_str).is_some() => Ok(v),
        Ok(_) => Err(Malformed { line, message: "not an event (a JSON object with a \"kind\")".into() }),
        Err(e) => Err(Malformed { line, message: format!("not valid JSON ({e})") }),
    }
}

/// Every event of a finished file, and the lines skipped.
pub fn read_all(path: &Path) -> std::io::Result<(Vec<Value>, Vec<Malformed>)> {
    if !path.exists() {
        return Err(std::io::Error::new(std::io::ErrorKind::NotFound, format!("{} does not exist", path.display())));
    }
    let mut file = EventFile::new(path);
    let poll = file.poll()?;
    let (mut events, mut bad) = (Vec::new(), Vec::new());
    for r in poll.records {
        match r {
            Ok(v) => events.push(v),
            Err(m) => bad.push(m),
        }
    }
    bad.extend(file.take_partial());
    Ok((events, bad))
}

/// A number field; `null` (how NaN is written) and a missing field are NaN.
pub fn num(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

pub fn uint(v: &Value, key: &str) -> usize {
    v.get(key).and_then(Value::as_u64).unwrap_or(0) as usize
}

pub fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn follows_growth_holds_partial_lines_and_skips_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        let mut f = std::fs::File::create(&path).unwrap();
        let mut ev = EventFile::new(&path);
        f.write_all(b"{\"kind\":\"start\",\"step\":0}\n{\"kind\":\"tra").unwrap();
        let p = ev.poll().unwrap();
        assert_eq!(p.records.len(), 1);
        assert!(ev.has_partial());
        f.write_all(b"in\",\"step\":1,\"loss\":null}\nnot json\n\n[1]\n").unwrap();
        let p = ev.poll().unwrap();
        assert_eq!(p.records.len(), 3);
        let train = p.records[0].as_ref().unwrap();
        assert!(num(train, "loss").is_nan());
        assert_eq!(uint(train, "step"), 1);
        assert_eq!(p.records[1].as_ref().unwrap_err().line, 3);
        assert_eq!(p.records[2].as_ref().unwrap_err().line, 5);
        f.write_all(b"{\"kind\":\"end\"").unwrap();
        assert!(ev.poll().unwrap().records.is_empty());
        assert_eq!(ev.take_partial().unwrap().line, 6);
        let (events, bad) = read_all(&path).unwrap();
        assert_eq!((events.len(), bad.len()), (2, 3));
    }
}
