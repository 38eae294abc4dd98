//! What the dashboard knows about a run: events folded into series and latest values. Pure
//! data, no terminal: the snapshot tests and `kiln report` read runs through it too.

use std::collections::{BTreeMap, VecDeque};

use serde_json::Value;

use crate::run::follow::{num, text, uint, Malformed};

/// How many samples and log lines are kept.
const KEEP_SAMPLES: usize = 64;
const KEEP_LOG: usize = 500;
/// The smoothed loss is an exponential moving average with this weight on the past
/// (debiased, as TensorBoard's smoothing).
const SMOOTHING: f64 = 0.8;

/// One GRPO step.
#[derive(Debug, Clone, Default)]
pub struct GrpoPoint {
    pub step: f64,
    pub reward_mean: f64,
    pub reward_std: f64,
    /// Per reward function: name, mean, std.
    pub rewards: Vec<(String, f64, f64)>,
    pub kl: f64,
    pub clip_low: f64,
    pub clip_high: f64,
    pub len_mean: f64,
    pub len_min: f64,
    pub len_max: f64,
    pub zero_std_frac: f64,
    pub truncated_frac: f64,
}

/// One `probe` event.
#[derive(Debug, Clone, Default)]
pub struct ProbePoint {
    pub step: usize,
    pub layers: Vec<usize>,
    pub values: Vec<Vec<f64>>,
    pub labels: Vec<String>,
}

impl ProbePoint {
    /// One figure per layer: the mean of the layer's vector (NaN entries left out).
    pub fn per_layer(&self) -> Vec<f64> {
        self.values
            .iter()
            .map(|v| {
                let finite: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
                if finite.is_empty() { f64::NAN } else { finite.iter().sum::<f64>() / finite.len() as f64 }
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct Sample {
    pub step: usize,
    pub prompt: String,
    pub completion: String,
    pub expected: Option<String>,
    pub reward: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Info,
    Warn,
    Error,
}

#[derive(Debug, Clone)]
pub struct LogLine {
    pub step: usize,
    pub level: Level,
    pub text: String,
}

/// Everything the dashboard shows, folded from events in file order.
#[derive(Debug, Clone, Default)]
pub struct RunState {
    pub run: String,
    pub method: String,
    pub model: String,
    pub device: String,
    pub trainable_params: usize,
    pub total_params: usize,
    pub total_steps: usize,
    pub step: usize,
    pub epoch: usize,
    /// Unix time of the first event and of the latest one.
    pub first_t: Option<f64>,
    pub last_t: f64,
    /// Seconds the trainer reported (train / end events).
    pub elapsed_s: f64,
    /// Step and elapsed time of the first train event of this session of the run (ETA).
    rate_origin: Option<(usize, f64)>,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub rss_bytes: u64,
    /// The GPU allocator's high-water mark, when training runs on a GPU.
    pub device_bytes: Option<u64>,
    pub train_loss: Vec<(f64, f64)>,
    pub smooth_loss: Vec<(f64, f64)>,
    smooth: (f64, f64),
    pub eval_loss: Vec<(f64, f64)>,
    pub eval_ppl: Vec<(f64, f64)>,
    /// (step, loss, ppl) of the lowest eval loss.
    pub best_eval: Option<(f64, f64, f64)>,
    pub lr: Vec<(f64, f64)>,
    pub grad_norm: Vec<(f64, f64)>,
    pub accuracy: Vec<(f64, f64)>,
    pub grpo: Vec<GrpoPoint>,
    /// (step, kd loss, ce loss)
    pub distill: Vec<(f64, f64, f64)>,
    pub teacher_ppl: Option<f64>,
    pub probes: BTreeMap<String, Vec<ProbePoint>>,
    pub samples: VecDeque<Sample>,
    pub log: VecDeque<LogLine>,
    pub paused: bool,
    /// Why the run ended, once it has.
    pub ended: Option<String>,
    pub error: Option<String>,
    pub malformed: Vec<Malformed>,
    pub events: usize,
}

impl RunState {
    pub fn from_events<'a>(events: impl IntoIterator<Item = &'a Value>) -> Self {
        let mut s = Self::default();
        events.into_iter().for_each(|v| s.apply(v));
        s
    }

    pub fn is_grpo(&self) -> bool {
        !self.grpo.is_empty() || self.method == "grpo"
    }

    pub fn is_distill(&self) -> bool {
        !self.distill.is_empty() || self.method == "distill"
    }

    /// Seconds left at the current rate; None before two train events or after the end.
    pub fn eta_s(&self) -> Option<f64> {
        let (s0, t0) = self.rate_origin?;
        let done = self.step.checked_sub(s0).filter(|&d| d > 0)?;
        (self.ended.is_none() && self.total_steps > self.step).then(|| (self.elapsed_s - t0) / done as f64 * (self.total_steps - self.step) as f64)
    }

    pub fn note_malformed(&mut self, m: Malformed) {
        self.push_log(self.step, Level::Warn, format!("skipped {m}"));
        self.malformed.push(m);
    }

    fn push_log(&mut self, step: usize, level: Level, text: String) {
        if self.log.len() == KEEP_LOG {
            self.log.pop_front();
        }
        self.log.push_back(LogLine { step, level, text });
    }

    pub fn apply(&mut self, v: &Value) {
        self.events += 1;
        let step = uint(v, "step");
        let x = step as f64;
        if let Some(t) = v.get("t").and_then(Value::as_f64) {
            self.first_t.get_or_insert(t);
            self.last_t = t;
        }
        match text(v, "kind") {
            "start" => {
                let resumed = v.get("resumed").and_then(Value::as_bool).unwrap_or(false);
                self.run = text(v, "run").to_string();
                self.method = text(v, "method").to_string();
                self.model = text(v, "model").to_string();
                self.device = text(v, "device").to_string();
                self.total_steps = uint(v, "total_steps");
                self.trainable_params = uint(v, "trainable_params");
                self.total_params = uint(v, "total_params");
                self.step = step;
                self.ended = None;
                self.error = None;
                self.paused = false;
                self.rate_origin = None;
                // A resumed run repeats the steps after its checkpoint: forget the first telling.
                if resumed {
                    self.truncate_after(x);
                }
                let what = if resumed { format!("resumed at step {step}") } else { "started".into() };
                self.push_log(step, Level::Info, format!("{what}: {} on {} ({})", self.method, self.model, self.device));
            }
            "train" => {
                let loss = num(v, "loss");
                self.step = step;
                self.epoch = uint(v, "epoch");
                self.elapsed_s = num(v, "elapsed_s");
                self.tokens += uint(v, "tokens");
                self.tokens_per_s = num(v, "tokens_per_s");
                self.rss_bytes = v.get("rss_bytes").and_then(Value::as_u64).unwrap_or(self.rss_bytes);
                self.device_bytes = v.get("device_bytes").and_then(Value::as_u64).or(self.device_bytes);
                self.rate_origin.get_or_insert((step, self.elapsed_s));
                if loss.is_finite() {
                    self.train_loss.push((x, loss));
                    let (avg, weight) = self.smooth;
                    let (avg, weight) = (avg * SMOOTHING + loss * (1.0 - SMOOTHING), weight * SMOOTHING + (1.0 - SMOOTHING));
                    self.smooth = (avg, weight);
                    self.smooth_loss.push((x, avg / weight));
                }
                push_finite(&mut self.lr, x, num(v, "lr"));
                push_finite(&mut self.grad_norm, x, num(v, "grad_norm"));
            }
            "eval" => {
                let (loss, ppl) = (num(v, "loss"), num(v, "ppl"));
                push_finite(&mut self.eval_loss, x, loss);
                push_finite(&mut self.eval_ppl, x, ppl);
                if loss.is_finite() && self.best_eval.is_none_or(|(_, b, _)| loss < b) {
                    self.best_eval = Some((x, loss, ppl));
                }
            }
            "accuracy" => push_finite(&mut self.accuracy, x, num(v, "accuracy")),
            "teacher_eval" => self.teacher_ppl = Some(num(v, "ppl")),
            "grpo" => {
                let rewards = v
                    .get("rewards")
                    .and_then(Value::as_array)
                    .map(|a| a.iter().map(|r| (text(r, "name").to_string(), num(r, "mean"), num(r, "std"))).collect())
                    .unwrap_or_default();
                self.grpo.push(GrpoPoint {
                    step: x,
                    reward_mean: num(v, "reward_mean"),
                    reward_std: num(v, "reward_std"),
                    rewards,
                    kl: num(v, "kl"),
                    clip_low: num(v, "clip_low"),
                    clip_high: num(v, "clip_high"),
                    len_mean: num(v, "completion_len_mean"),
                    len_min: num(v, "completion_len_min"),
                    len_max: num(v, "completion_len_max"),
                    zero_std_frac: num(v, "zero_std_frac"),
                    truncated_frac: num(v, "truncated_frac"),
                });
            }
            "distill" => self.distill.push((x, num(v, "kd_loss"), num(v, "ce_loss"))),
            "probe" => {
                let values = v
                    .get("values")
                    .and_then(Value::as_array)
                    .map(|rows| rows.iter().map(|r| r.as_array().map(|r| r.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect()).unwrap_or_default()).collect())
                    .unwrap_or_default();
                let list = |key: &str| v.get(key).and_then(Value::as_array).cloned().unwrap_or_default();
                let point = ProbePoint {
                    step,
                    layers: list("layers").iter().map(|l| l.as_u64().unwrap_or(0) as usize).collect(),
                    values,
                    labels: list("labels").iter().map(|l| l.as_str().unwrap_or("").to_string()).collect(),
                };
                self.probes.entry(text(v, "signal").to_string()).or_default().push(point);
            }
            "sample" => {
                if self.samples.len() == KEEP_SAMPLES {
                    self.samples.pop_front();
                }
                self.samples.push_back(Sample {
                    step,
                    prompt: text(v, "prompt").to_string(),
                    completion: text(v, "completion").to_string(),
                    expected: v.get("expected").and_then(Value::as_str).map(str::to_string),
                    reward: v.get("reward").and_then(Value::as_f64),
                });
            }
            "checkpoint" => self.push_log(step, Level::Info, format!("checkpoint {}", text(v, "path"))),
            "warning" => self.push_log(step, Level::Warn, text(v, "message").to_string()),
            "control" => {
                let action = text(v, "action");
                match action {
                    "paused" => self.paused = true,
                    "resumed" | "stop" => self.paused = false,
                    _ => {}
                }
                self.push_log(step, Level::Info, format!("control: {action}"));
            }
            "end" => {
                let reason = text(v, "reason").to_string();
                self.elapsed_s = num(v, "elapsed_s");
                self.step = step;
                self.paused = false;
                self.push_log(step, Level::Info, format!("finished ({reason}) in {:.1}s", self.elapsed_s));
                self.ended = Some(reason);
            }
            "error" => {
                let message = text(v, "message").to_string();
                self.push_log(step, Level::Error, message.clone());
                self.step = self.step.max(step);
                self.error = Some(message);
                self.ended = Some("error".into());
                self.paused = false;
            }
            _ => {}
        }
    }

    /// Drops every point after step `x` (a resumed run tells those steps again).
    fn truncate_after(&mut self, x: f64) {
        for series in [&mut self.train_loss, &mut self.smooth_loss, &mut self.eval_loss, &mut self.eval_ppl, &mut self.lr, &mut self.grad_norm, &mut self.accuracy] {
            series.retain(|p| p.0 <= x);
        }
        self.grpo.retain(|g| g.step <= x);
        self.distill.retain(|d| d.0 <= x);
        self.probes.values_mut().for_each(|p| p.retain(|p| p.step as f64 <= x));
        self.best_eval = self.eval_loss.iter().zip(&self.eval_ppl).fold(None, |best: Option<(f64, f64, f64)>, (&(s, l), &(_, p))| match best {
            Some(b) if b.1 <= l => Some(b),
            _ => Some((s, l, p)),
        });
        self.smooth = self.smooth_loss.last().map_or((0.0, 0.0), |&(_, l)| (l, 1.0));
    }
}

fn push_finite(series: &mut Vec<(f64, f64)>, x: f64, y: f64) {
    if y.is_finite() {
        series.push((x, y));
    }
}
