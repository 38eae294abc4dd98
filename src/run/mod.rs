//! The run directory and its event stream.
//!
//! Events are the contract between the trainer, the dashboard and reports: the trainer emits
//! typed [`Event`]s into an [`EventSink`] and never knows who listens. [`JsonlSink`] appends them
//! to `events.jsonl` (one object a line, flushed as written), [`ProgressSink`] shows them on the
//! terminal, [`Tee`] sends them to several sinks. Readers (the dashboard, `kiln report`) follow
//! the file with [`follow::EventFile`]; the dashboard steers the trainer through
//! [`control`].

pub mod control;
pub mod follow;

use std::fs::{File, OpenOptions};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use serde_json::{json, Value};

/// One thing that happened in a run. Serialised with `"kind"` naming the variant.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// `dtype`: what the frozen weights are multiplied in (`f32`, or `bf16` under `run.dtype`).
    Start { step: usize, total_steps: usize, run: String, method: String, model: String, device: String, dtype: String, trainable_params: usize, total_params: usize, train_examples: usize, valid_examples: usize, resumed: bool },
    /// `rss_bytes`: the process's peak resident memory so far (host memory). `device_bytes`: on
    /// a GPU, the most device memory its allocator has held so far ([`peak_device_bytes`]).
    Train {
        step: usize,
        epoch: usize,
        loss: f64,
        lr: f64,
        grad_norm: f64,
        tokens: usize,
        tokens_per_s: f64,
        elapsed_s: f64,
        rss_bytes: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        device_bytes: Option<u64>,
    },
    Eval { step: usize, loss: f64, ppl: f64, tokens: usize, best: bool },
    /// Exact-match accuracy of greedy answers on held-out prompts.
    Accuracy { step: usize, correct: usize, total: usize, accuracy: f64 },
    /// Evaluation of the distillation teacher on the validation set (once: it is frozen).
    TeacherEval { step: usize, loss: f64, ppl: f64, tokens: usize },
    Sample {
        step: usize,
        prompt: String,
        completion: String,
        expected: Option<String>,
        /// The reward a GRPO rollout earned.
        #[serde(skip_serializing_if = "Option::is_none")]
        reward: Option<f64>,
    },
    /// One GRPO step: the rollouts' rewards and lengths, and what the objective saw.
    Grpo(Box<GrpoStats>),
    /// One distillation step.
    Distill { step: usize, loss: f64, kd_loss: f64, ce_loss: f64, on_policy: bool },
    /// A signal measured inside the model on the fixed probe batch (`probe/`): `values[i]` is
    /// layer `layers[i]`'s vector (one number for a per-layer scalar, one per expert or head).
    /// `labels` names the entries of each vector where they are not plain indices (heads,
    /// modules); empty otherwise.
    Probe {
        step: usize,
        signal: String,
        layers: Vec<usize>,
        values: Vec<Vec<f64>>,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        labels: Vec<String>,
    },
    /// The trainer acted on the run directory's control file: `paused`, `resumed`, `save`,
    /// `stop`.
    Control { step: usize, action: String },
    Checkpoint { step: usize, path: String },
    Warning { step: usize, message: String },
    End { step: usize, reason: String, elapsed_s: f64 },
    Error { step: usize, message: String },
}

impl Event {
    pub fn step(&self) -> usize {
        match self {
            Event::Start { step, .. }
            | Event::Train { step, .. }
            | Event::Eval { step, .. }
            | Event::Accuracy { step, .. }
            | Event::TeacherEval { step, .. }
            | Event::Sample { step, .. }
            | Event::Distill { step, .. }
            | Event::Probe { step, .. }
            | Event::Control { step, .. }
            | Event::Checkpoint { step, .. }
            | Event::Warning { step, .. }
            | Event::End { step, .. }
            | Event::Error { step, .. } => *step,
            Event::Grpo(g) => g.step,
        }
    }

    /// The JSON line written to events.jsonl: the event's fields plus `t` (unix seconds).
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self).unwrap_or_else(|_| json!({}));
        let t = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0);
        if let Some(map) = v.as_object_mut() {
            map.insert("t".into(), json!(t));
        }
        v
    }
}

/// What a `grpo` event carries. Means and spreads are over the step's completions; NaN (written
/// as null) where nothing was measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GrpoStats {
    pub step: usize,
    pub loss: f64,
    pub reward_mean: f64,
    pub reward_std: f64,
    /// Per reward function, in recipe order: its name, mean and std (nulls left out).
    pub rewards: Vec<RewardStat>,
    /// Completions whose reward was null (a failed reward command); they carry no gradient.
    pub null_rewards: usize,
    /// Share of groups whose rewards are all equal (they teach nothing).
    pub zero_std_frac: f64,
    /// Mean k3 estimate of KL(policy ‖ reference) per completion token.
    pub kl: f64,
    /// Share of completion tokens where the ratio was clipped (low + high).
    pub clip_ratio: f64,
    pub clip_low: f64,
    pub clip_high: f64,
    pub completion_len_mean: f64,
    pub completion_len_min: usize,
    pub completion_len_max: usize,
    /// Share of completions cut at `max_completion_length`.
    pub truncated_frac: f64,
    /// Mean entropy (nats) of the policy over completion tokens.
    pub entropy: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct RewardStat {
    pub name: String,
    pub mean: f64,
    pub std: f64,
}

/// The process's peak resident set size (Linux `VmHWM`); 0 where it cannot be read.
pub fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

static DEVICE_PEAK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static DEVICE_IN_USE_PEAK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Reads the device allocator (as of the work queued so far; no wait for the GPU, so that a
/// poll inside a step does not drain its queue) and keeps the largest figure seen:
/// bytes the allocator holds from the device (its pages are kept for reuse, so this is the
/// high-water mark of what the process took, as `nvidia-smi` would show less the CUDA
/// context). `None` on the CPU backend, which has no device allocator.
pub fn poll_device_memory<B: crate::backend::QuantMatmul>(device: &B::Device) -> Option<u64> {
    let stats = B::memory_stats(device)?;
    DEVICE_IN_USE_PEAK.fetch_max(stats.in_use, std::sync::atomic::Ordering::Relaxed);
    let before = DEVICE_PEAK.fetch_max(stats.reserved, std::sync::atomic::Ordering::Relaxed);
    Some(before.max(stats.reserved))
}

/// The most bytes in live tensors [`poll_device_memory`] has seen. Only read where it polls (the
/// end of each forward and backward), so it can miss a peak between polls; what the pool holds
/// ([`peak_device_bytes`]) bounds it from above.
pub fn peak_device_in_use_bytes() -> Option<u64> {
    Some(DEVICE_IN_USE_PEAK.load(std::sync::atomic::Ordering::Relaxed)).filter(|&b| b > 0)
}

/// The largest device-memory figure [`poll_device_memory`] has read in this process.
pub fn peak_device_bytes() -> Option<u64> {
    Some(DEVICE_PEAK.load(std::sync::atomic::Ordering::Relaxed)).filter(|&b| b > 0)
}

/// Where events go.
pub trait EventSink {
    fn emit(&mut self, event: &Event);
}

/// Appends events to `events.jsonl`.
pub struct JsonlSink {
    file: File,
    path: PathBuf,
}

impl JsonlSink {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self { file, path: path.to_path_buf() })
    }
}

impl EventSink for JsonlSink {
    fn emit(&mut self, event: &Event) {
        let line = format!("{}\n", event.to_json());
        if let Err(e) = self.file.write_all(line.as_bytes()).and_then(|_| self.file.flush()) {
            tracing::warn!("cannot write {}: {e}", self.path.display());
        }
    }
}

/// Keeps events in memory (tests, benchmarks).
#[derive(Default)]
pub struct Recorder {
    pub events: Vec<Event>,
}

impl EventSink for Recorder {
    fn emit(&mut self, event: &Event) {
        self.events.push(event.clone());
    }
}

/// Sends every event to each sink in turn.
pub struct Tee<'a>(pub Vec<&'a mut dyn EventSink>);

impl EventSink for Tee<'_> {
    fn emit(&mut self, event: &Event) {
        for sink in self.0.iter_mut() {
            sink.emit(event);
        }
    }
}

/// Progress for people: an indicatif bar on a terminal, plain lines otherwise (logs, CI).
pub struct ProgressSink {
    bar: Option<indicatif::ProgressBar>,
    /// The latest GRPO / distillation figures, shown with the next `train` line.
    extra: String,
}

impl ProgressSink {
    pub fn new() -> Self {
        Self { bar: None, extra: String::new() }
    }

    fn line(&self, text: String) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }
}

impl Default for ProgressSink {
    fn default() -> Self {
        Self::new()
    }
}

impl EventSink for ProgressSink {
    fn emit(&mut self, event: &Event) {
        match event {
            Event::Start { step, total_steps, run, method, model, device, dtype, trainable_params, total_params, train_examples, valid_examples, resumed } => {
                self.line(format!(
                    "{} {run}: {method} on {model} ({device}, {dtype}); {trainable_params} of {total_params} parameters trainable; {train_examples} train / {valid_examples} valid examples",
                    if *resumed { "resuming" } else { "training" }
                ));
                if std::io::stderr().is_terminal() {
                    let bar = indicatif::ProgressBar::new(*total_steps as u64);
                    bar.set_style(
                        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]")
                            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
                    );
                    bar.set_position(*step as u64);
                    self.bar = Some(bar);
                }
            }
            Event::Train { step, epoch, loss, lr, grad_norm, tokens_per_s, .. } => {
                let msg = format!("loss {loss:.4}  lr {lr:.2e}  |g| {grad_norm:.3}  {tokens_per_s:.0} tok/s{}", self.extra);
                match &self.bar {
                    Some(bar) => {
                        bar.set_position(*step as u64);
                        bar.set_message(msg);
                    }
                    None => eprintln!("step {step:>6}  epoch {epoch}  {msg}"),
                }
            }
            Event::Eval { step, loss, ppl, best, .. } => {
                self.line(format!("step {step:>6}  eval loss {loss:.4}  ppl {ppl:.3}{}", if *best { "  (best)" } else { "" }))
            }
            Event::Accuracy { step, correct, total, accuracy } => {
                self.line(format!("step {step:>6}  exact match {correct}/{total} = {:.1}%", accuracy * 100.0))
            }
            Event::Sample { prompt, completion, expected, reward, .. } => self.line(format!(
                "  sample: {prompt:?} -> {completion:?}{}{}",
                expected.as_ref().map(|e| format!(" (expected {e:?})")).unwrap_or_default(),
                reward.map(|r| format!(" reward {r:.3}")).unwrap_or_default()
            )),
            Event::TeacherEval { step, loss, ppl, .. } => self.line(format!("step {step:>6}  teacher eval loss {loss:.4}  ppl {ppl:.3}")),
            Event::Grpo(g) => {
                self.extra = format!("  reward {:.3} ± {:.3}  kl {:.4}  len {:.1}", g.reward_mean, g.reward_std, g.kl, g.completion_len_mean)
            }
            Event::Distill { kd_loss, ce_loss, .. } => self.extra = format!("  kd {kd_loss:.4}  ce {ce_loss:.4}"),
            // Per-layer vectors are for the dashboard and reports; a log line gets the
            // single-number signals.
            Event::Probe { step, signal, values, .. } => {
                if let [v] = values.as_slice()
                    && let [x] = v.as_slice()
                {
                    self.line(format!("step {step:>6}  probe {signal} {x:.4}"))
                }
            }
            Event::Control { step, action } => self.line(format!("step {step:>6}  control: {action}")),
            Event::Checkpoint { step, path } => self.line(format!("step {step:>6}  checkpoint {path}")),
            Event::Warning { step, message } => self.line(format!("step {step:>6}  warning: {message}")),
            Event::End { step, reason, elapsed_s } => {
                if let Some(bar) = self.bar.take() {
                    bar.finish_and_clear();
                }
                eprintln!("finished at step {step} ({reason}) in {elapsed_s:.1}s");
            }
            Event::Error { step, message } => self.line(format!("step {step:>6}  error: {message}")),
        }
    }
}
