//! The external reward program: started once, spoken to in JSON lines, never trusted.
//!
//! A reader thread forwards the program's stdout lines over a channel, so a program that
//! hangs costs one timeout, not the run. A timeout kills it; a crash or a timeout restarts it on
//! the next call; a line that is not `{"reward": number|null}` is a null reward for that
//! completion. Each failure comes back as a message for a warning event.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use serde_json::{json, Value};

use super::Sample;

pub struct CommandReward {
    argv: Vec<String>,
    timeout: Duration,
    running: Option<Running>,
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    lines: Receiver<String>,
}

impl CommandReward {
    pub fn new(argv: Vec<String>, timeout: Duration) -> Self {
        Self { argv, timeout, running: None }
    }

    fn start(&self) -> Result<Running, String> {
        let mut child = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("reward command `{}` could not start: {e}", self.argv[0]))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            let _ = child.kill();
            return Err(format!("reward command `{}`: no pipes to talk to it", self.argv[0]));
        };
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Running { child, stdin, lines })
    }

    fn stop(&mut self) {
        if let Some(mut r) = self.running.take() {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }

    /// The program's reward for one completion: `Ok(None)` when it answered `null`, `Err`
    /// (with the reason) when it failed to answer.
    pub fn score(&mut self, sample: &Sample) -> Result<Option<f64>, String> {
        if self.running.is_none() {
            self.running = Some(self.start()?);
        }
        let name = self.argv[0].clone();
        let request = json!({ "prompt": sample.prompt, "completion": sample.completion, "answer": sample.answer, "tokens": sample.tokens });
        let Some(running) = self.running.as_mut() else { return Err(format!("reward command `{name}` is not running")) };
        if writeln!(running.stdin, "{request}").and_then(|_| running.stdin.flush()).is_err() {
            self.stop();
            return Err(format!("reward command `{name}` exited before reading a request; restarting it for the next one"));
        }
        match running.lines.recv_timeout(self.timeout) {
            Ok(line) => parse_reply(&line).map_err(|why| format!("reward command `{name}`: {why}")),
            Err(RecvTimeoutError::Timeout) => {
                self.stop();
                Err(format!("reward command `{name}` gave no answer within {:.1} s; killed, and restarted for the next completion", self.timeout.as_secs_f64()))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = running.child.wait().map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                self.running = None;
                Err(format!("reward command `{name}` exited ({status}) without answering; restarting it for the next completion"))
            }
        }
    }
}

impl Drop for CommandReward {
    fn drop(&mut self) {
        self.stop();
    }
}

fn parse_reply(line: &str) -> Result<Option<f64>, String> {
    let shown: String = line.chars().take(80).collect();
    let value: Value = serde_json::from_str(line).map_err(|_| format!("answered {shown:?}, not a JSON line like {{\"reward\": 1.0}}"))?;
    match value.get("reward") {
        Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_f64().filter(|v| v.is_finite()).map(Some).ok_or_else(|| format!("reward {n} is not a finite number")),
        _ => Err(format!("answered {shown:?}, which has no numeric `reward`")),
    }
}
