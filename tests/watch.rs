//! Steering a live run through its control file: the trainer (a real `kiln train` process)
//! honours pause, save, resume and stop; and `kiln watch` in a real terminal (tmux) turns the
//! keys p, s and x into those commands and shows what happened.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::fixture;
use kiln::run::control::{self, Command as Ctl};
use kiln::run::follow::{read_all, text};
use serde_json::Value;

/// A run that trains a tiny model for far longer than any test waits (stopped with `x`), with
/// probes every few steps so the dashboard has everything to draw.
fn long_recipe(dir: &Path) -> PathBuf {
    let data = fixture("../../datasets/arith");
    let recipe = format!(
        r#"method = "full"
[run]
name = "live"
output_dir = "{out}"
[model.init]
arch = "llama"
hidden_size = 32
num_layers = 2
num_heads = 2
num_kv_heads = 1
intermediate_size = 64
vocab_size = 16
[data]
train = "{data}/train.jsonl"
valid = "{data}/valid.jsonl"
max_seq_len = 32
[train]
steps = 1000000
batch_size = 4
log_every = 1
[eval]
every = 0
exact_match = false
[checkpoint]
every = 0
[probes]
every = 5
examples = 2
"#,
        out = dir.display(),
        data = data.display()
    );
    let path = dir.join("live.toml");
    std::fs::write(&path, recipe).unwrap();
    path
}

struct Trainer {
    child: Child,
    run_dir: PathBuf,
}

impl Trainer {
    fn start(dir: &Path) -> Self {
        let recipe = long_recipe(dir);
        let child = Command::new(env!("CARGO_BIN_EXE_kiln")).arg("train").arg(&recipe).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        Trainer { child, run_dir: dir.join("live") }
    }

    fn events(&self) -> Vec<Value> {
        read_all(&self.run_dir.join("events.jsonl")).map(|(e, _)| e).unwrap_or_default()
    }

    fn count(&self, kind: &str) -> usize {
        self.events().iter().filter(|e| text(e, "kind") == kind).count()
    }

    fn has_control(&self, action: &str) -> bool {
        self.events().iter().any(|e| text(e, "kind") == "control" && text(e, "action") == action)
    }

    /// Waits up to 60 s for `ok`, failing with `what`.
    fn wait(&self, what: &str, ok: impl Fn(&Self) -> bool) {
        let start = Instant::now();
        while !ok(self) {
            assert!(start.elapsed() < Duration::from_secs(60), "timed out waiting for {what}; events: {:#?}", self.events().iter().rev().take(5).collect::<Vec<_>>());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits for the process to exit and returns the `end` event's reason.
    fn finish(mut self) -> String {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "kiln train exited with {status}");
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "kiln train did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
        let events = self.events();
        let end = events.iter().rfind(|e| text(e, "kind") == "end").expect("an end event");
        text(end, "reason").to_string()
    }
}

impl Drop for Trainer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The commands in the order a person would give them; after each, what the trainer did.
/// `settled` runs once the trainer has acted on a command (the dashboard test waits there
/// until the screen shows it).
fn pause_save_resume_stop(t: &Trainer, send: &dyn Fn(Ctl), settled: &dyn Fn(Ctl)) {
    t.wait("training steps", |t| t.count("train") >= 3);
    send(Ctl::Pause);
    t.wait("the trainer to pause", |t| t.has_control("paused"));
    settled(Ctl::Pause);
    let steps = t.count("train");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(t.count("train"), steps, "no step while paused");
    let checkpoints = t.count("checkpoint");
    send(Ctl::Save);
    t.wait("a checkpoint saved while paused", |t| t.has_control("save") && t.count("checkpoint") > checkpoints);
    assert!(t.run_dir.join("checkpoints").read_dir().unwrap().next().is_some());
    send(Ctl::Resume);
    t.wait("training to resume", |t| t.has_control("resumed") && t.count("train") > steps);
    settled(Ctl::Resume);
    send(Ctl::Stop);
    t.wait("the stop to be acknowledged", |t| t.has_control("stop"));
}

#[test]
fn trainer_honours_pause_save_resume_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let t = Trainer::start(dir.path());
    let run_dir = t.run_dir.clone();
    pause_save_resume_stop(&t, &|c| control::send(&run_dir, c).unwrap(), &|_| {});
    assert_eq!(t.finish(), "stopped");
}

fn tmux(args: &[&str]) -> String {
    let out = Command::new("tmux").args(args).output().expect("tmux runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `kiln watch` in a 100×30 tmux pane: the keys write the control file, the trainer obeys, and
/// the pane shows it.
#[test]
fn watch_in_tmux_drives_the_trainer() {
    if Command::new("tmux").arg("-V").output().is_err() {
        assert!(std::env::var_os("KILN_REQUIRE_INTEROP").is_none(), "tmux is required (KILN_REQUIRE_INTEROP is set)");
        eprintln!("skipping: tmux is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let t = Trainer::start(dir.path());
    t.wait("training steps", |t| t.count("train") >= 1);
    let session = format!("kiln-watch-{}", std::process::id());
    let socket = dir.path().join("tmux.sock");
    let socket = socket.to_str().unwrap();
    let watch = format!("{} watch {}", env!("CARGO_BIN_EXE_kiln"), t.run_dir.display());
    tmux(&["-S", socket, "new-session", "-d", "-s", &session, "-x", "100", "-y", "30", &watch]);
    let pane = || tmux(&["-S", socket, "capture-pane", "-p", "-t", &session]);
    let wait_pane = |what: &str| {
        let start = Instant::now();
        while !pane().contains(what) {
            assert!(start.elapsed() < Duration::from_secs(60), "the pane never showed {what:?}:\n{}", pane());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_pane("running");
    let keys = |c: Ctl| {
        let key = match c {
            Ctl::Pause | Ctl::Resume => "p",
            Ctl::Save => "s",
            Ctl::Stop => "x",
        };
        tmux(&["-S", socket, "send-keys", "-t", &session, key]);
    };
    let settled = |c: Ctl| match c {
        Ctl::Pause => wait_pane("PAUSED"),
        Ctl::Resume => wait_pane("running"),
        _ => {}
    };
    pause_save_resume_stop(&t, &keys, &settled);
    wait_pane("ended: stopped");
    tmux(&["-S", socket, "send-keys", "-t", &session, "q"]);
    let start = Instant::now();
    while tmux(&["-S", socket, "list-sessions"]).contains(&session) {
        assert!(start.elapsed() < Duration::from_secs(10), "q did not close the dashboard");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(t.finish(), "stopped");
}
