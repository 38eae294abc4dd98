//! The step loop shared by every training method: batches in, gradient accumulation, global
//! clipping, AdamW, schedule, eval, checkpoints, resume and the stop check.
//!
//! Kept small enough to hold in one's head, as mlx-lm's trainer: [`train`] prepares the run
//! (model, data, adapter, optimizer, or a checkpoint to resume), then each step is: take
//! `grad_accum` micro-batches at the data cursor, sum their token losses (divided by the step's
//! target-token count, so accumulation equals one big batch), clip by the global norm, update.
//! Everything the loop reports goes out as [`Event`]s; nothing here prints.

pub mod checkpoint;
pub mod distill;
pub mod eval;
pub mod grpo;
pub mod optim;
pub mod plan;
pub mod rollout;
pub mod schedule;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::prelude::*;
use serde_json::json;

use self::checkpoint::LoopState;
use self::optim::{AdamW, AdamWConfig};
use self::schedule::LrSchedule;
use crate::backend::{QuantMatmul, TrainBackend};
use crate::data::{self, Batch, Example, LoadOptions, PromptAnswer};
use crate::lora::{self, LoraSpec};
use crate::model::{Model, ModelConfig, ModelError};
use crate::recipe::{Method, Recipe};
use crate::run::control::{self, Command};
use crate::run::{Event, EventSink, JsonlSink, Tee};
use crate::tokenizer::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    #[error(transparent)]
    Data(#[from] crate::data::DataError),
    #[error(transparent)]
    Adapter(#[from] crate::lora::peft::AdapterError),
    #[error(transparent)]
    Export(#[from] crate::gguf::ExportError),
    #[error("{path}: corrupt checkpoint: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("{dir} already holds a run; pass --resume to continue it or --overwrite to start over")]
    RunExists { dir: PathBuf },
    #[error("--resume: {dir} has no complete checkpoint to resume from")]
    NothingToResume { dir: PathBuf },
    #[error("{path}: the recipe names no model: set `model.path` or a `[model.init]` table")]
    NoModel { path: PathBuf },
    #[error("{path}: no training examples")]
    NoExamples { path: PathBuf },
    #[error(transparent)]
    Reward(#[from] crate::reward::RewardError),
    #[error("teacher {teacher} and student {student} tokenize differently ({message}); distillation compares their next-token distributions id by id, so both need the same tokenizer")]
    TeacherVocab { teacher: PathBuf, student: PathBuf, message: String },
    #[error("{path}: no prompts: GRPO and on-policy distillation need prompts with answers ({{\"prompt\", \"completion\"}} or chat records)")]
    NoPrompts { path: PathBuf },
    #[error("stopped after {count} steps in a row with a non-finite loss or gradient (train.max_bad_steps); lower train.learning_rate or check the data")]
    Diverged { count: usize },
    #[error("reading the step's loss from the device failed: {0}")]
    DeviceRead(String),
}

/// What one step computed: its gradients (None when no token carried loss), the loss value,
/// and the positions processed (for tokens/s).
#[derive(Default)]
pub struct StepGrads {
    pub grads: Option<GradientsParams>,
    pub loss: f64,
    pub tokens: usize,
}

/// An SFT step whose forward and backward are queued: the data cursor after its micro-batches,
/// its gradients and its losses.
struct Queued<B: TrainBackend> {
    cursor: usize,
    out: StepGrads,
    losses: Vec<Tensor<B, 1>>,
}

/// Dropout masks depend on the step only, so a resumed run draws the same ones.
fn seed_step<B: TrainBackend>(device: &B::Device, seed: u64, step: usize) {
    B::seed(device, seed.wrapping_add(step as u64).wrapping_mul(0x9E37_79B9));
}

/// The step's loss (its micro-batches' losses summed; 0 where there are none) and squared
/// gradient norm, copied to the host in one read queued now ([`DeviceMemory::read_later`]).
fn read_step<B: QuantMatmul>(losses: Vec<Tensor<B, 1>>, square_sum: Option<Tensor<B, 1>>) -> impl FnOnce() -> Result<(f64, f64), TrainError> {
    let loss = losses.into_iter().reduce(|a, b| a + b);
    let (has_loss, has_norm) = (loss.is_some(), square_sum.is_some());
    let parts: Vec<Tensor<B, 1>> = [loss, square_sum].into_iter().flatten().collect();
    let reading = (!parts.is_empty()).then(|| B::read_later(Tensor::cat(parts, 0).into_primitive().tensor()));
    move || {
        let values = reading.map(|r| r.wait().map_err(TrainError::DeviceRead)).transpose()?.unwrap_or_default();
        let value = |i: usize| values.get(i).map_or(f64::NAN, |v| *v as f64);
        let loss = if has_loss { value(0) } else { 0.0 };
        let norm = if has_norm { value(has_loss as usize).sqrt() } else { 0.0 };
        Ok((loss, norm))
    }
}

/// Adds a micro-batch's gradients to the step's.
pub(crate) fn add_grads<B: TrainBackend>(model: &Model<B>, acc: &mut Option<GradientsParams>, g: GradientsParams) {
    match acc {
        Some(acc) => optim::accumulate(model, acc, g),
        None => *acc = Some(g),
    }
}

/// The method-specific half of a run: how a step's gradients are made.
enum Objective<I: QuantMatmul> {
    /// Supervised fine-tuning (`lora`, `full`): cross-entropy on the dataset's targets.
    Sft,
    Grpo(Box<grpo::Grpo<I>>),
    Distill(Box<distill::Distill<I>>),
}

/// Command-line choices that are not part of the recipe.
#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    pub resume: bool,
    pub overwrite: bool,
    /// Stop (with a checkpoint) once this many steps are done; the schedule is unchanged, so
    /// `--resume` later continues the same run.
    pub max_steps: Option<usize>,
    /// Plain tensor operations instead of kiln's fused ones: the loss over the full logits
    /// rather than the chunked LM-head loss, and attention that keeps its `[b, h, s, t]` scores
    /// rather than the flash-style operation. The reference the fused path is checked against.
    pub reference_ops: bool,
}

/// What a finished (or stopped) run reports.
#[derive(Debug, Clone)]
pub struct TrainOutcome {
    pub run_dir: PathBuf,
    pub steps: usize,
    pub reason: String,
    pub final_eval: Option<eval::EvalResult>,
    pub accuracy_before: Option<f64>,
    pub accuracy_after: Option<f64>,
}

/// The base model's directory and its config.json as JSON (written again by fuse/export).
struct Base {
    dir: PathBuf,
    config: ModelConfig,
    config_json: serde_json::Value,
}

/// For `[model.init]`: trains a tokenizer on the recipe's data and writes config.json into
/// `RUN/base/`, so the fresh model has a directory like any downloaded one.
fn prepare_init_base(recipe: &Recipe, init: &crate::recipe::InitSection, run_dir: &Path) -> Result<Base, TrainError> {
    let dir = run_dir.join("base");
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TrainError::Io { path, source }
    };
    if let Some(d) = &recipe.distill {
        // A student distilled from scratch speaks its teacher's tokenizer.
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"] {
            let from = d.teacher.join(name);
            if from.exists() {
                std::fs::copy(&from, dir.join(name)).map_err(io(&from))?;
            }
        }
    } else if !dir.join("tokenizer.json").exists() {
        let mut files = vec![recipe.data.train.clone()];
        files.extend(recipe.data.valid.clone());
        data::train_tokenizer(&files, init.vocab_size, &dir)?;
    }
    let tokenizer = Tokenizer::load(&dir)?;
    let eos = tokenizer.eos_ids().first().copied();
    let config_json = json!({
        "architectures": [match init.arch.as_str() { "qwen2" => "Qwen2ForCausalLM", "qwen3" => "Qwen3ForCausalLM", "gemma3" => "Gemma3ForCausalLM", _ => "LlamaForCausalLM" }],
        "model_type": if init.arch == "gemma3" { "gemma3_text" } else { init.arch.as_str() },
        "vocab_size": tokenizer.vocab_size(),
        "hidden_size": init.hidden_size,
        "intermediate_size": init.intermediate_size,
        "num_hidden_layers": init.num_layers,
        "num_attention_heads": init.num_heads,
        "num_key_value_heads": init.num_kv_heads,
        "head_dim": init.hidden_size / init.num_heads,
        "max_position_embeddings": init.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": init.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "bos_token_id": null,
        "eos_token_id": eos,
        "pad_token_id": eos,
        "dtype": "float32",
    });
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(&config_json).unwrap_or_default()).map_err(io(&path))?;
    let config = ModelConfig::from_dir(&dir)?;
    Ok(Base { dir, config, config_json })
}

fn load_base(dir: &Path) -> Result<Base, TrainError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| TrainError::Io { path: path.clone(), source })?;
    let config_json = serde_json::from_str(&text).map_err(|e| ModelError::Config { path: path.clone(), message: e.to_string() })?;
    Ok(Base { dir: dir.to_path_buf(), config: ModelConfig::from_dir(dir)?, config_json })
}

pub fn lora_spec(recipe: &Recipe) -> LoraSpec {
    let l = &recipe.lora;
    LoraSpec {
        rank: l.rank,
        alpha: l.alpha,
        dropout: l.dropout,
        rslora: l.rslora,
        targets: l.targets.clone(),
        layers: l.layers.map(|[a, b]| (a, b)),
        experts: l.experts,
    }
}

/// The data of a run, tokenised.
struct RunData {
    train: Vec<Example>,
    valid: Vec<Example>,
    prompts: Vec<PromptAnswer>,
}

fn load_data(recipe: &Recipe, tokenizer: &Tokenizer, eos: Option<u32>) -> Result<RunData, TrainError> {
    let d = &recipe.data;
    let opts = LoadOptions { format: d.format, train_on: d.train_on, add_eos: d.add_eos, max_seq_len: d.max_seq_len };
    let all = data::load_examples(&d.train, &opts, tokenizer, eos)?;
    let (train, valid) = match &d.valid {
        Some(path) => (all, data::load_examples(path, &opts, tokenizer, eos)?),
        None => data::split_valid(all, d.valid_fraction, recipe.run.seed),
    };
    if train.is_empty() {
        return Err(TrainError::NoExamples { path: d.train.clone() });
    }
    let mut prompts = match (&d.test, recipe.eval.exact_match) {
        (Some(path), true) => data::load_prompts(path, d.format, tokenizer)?,
        _ => Vec::new(),
    };
    prompts.truncate(recipe.eval.exact_match_samples);
    Ok(RunData { train, valid, prompts })
}

/// Remembers the step of the latest event, so an error is reported where it happened.
struct LastStep(usize);

impl EventSink for LastStep {
    fn emit(&mut self, event: &Event) {
        self.0 = self.0.max(event.step());
    }
}

/// The micro-batches of one epoch: shuffled by `seed + epoch`, so any epoch can be rebuilt on
/// resume.
fn epoch_batches(recipe: &Recipe, train: &[Example], epoch: usize) -> Vec<Batch> {
    let d = &recipe.data;
    data::make_batches(train, recipe.train.batch_size, d.max_seq_len, d.packing, Some(recipe.run.seed.wrapping_add(epoch as u64)))
}

/// Runs (or resumes) the recipe's training on backend `B`; events go to `sink` and to
/// `RUN/events.jsonl`. `stop` is checked once per step (Ctrl-C, the dashboard).
pub fn train<B: TrainBackend>(recipe: &Recipe, options: &TrainOptions, device: &B::Device, sink: &mut dyn EventSink, stop: &AtomicBool) -> Result<TrainOutcome, TrainError> {
    let run_dir = recipe.run_dir();
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TrainError::Io { path, source }
    };
    let resuming = options.resume && !checkpoint::list(&run_dir).is_empty();
    if options.resume && !resuming && run_dir.join("events.jsonl").exists() {
        return Err(TrainError::NothingToResume { dir: run_dir });
    }
    if !options.resume && run_dir.join("events.jsonl").exists() {
        if !options.overwrite {
            return Err(TrainError::RunExists { dir: run_dir });
        }
        std::fs::remove_dir_all(&run_dir).map_err(io(&run_dir))?;
    }
    std::fs::create_dir_all(&run_dir).map_err(io(&run_dir))?;
    let recipe_copy = run_dir.join("recipe.toml");
    crate::fsutil::write_atomic(&recipe_copy, recipe.to_toml().as_bytes()).map_err(io(&recipe_copy))?;
    let mut jsonl = JsonlSink::open(&run_dir.join("events.jsonl")).map_err(io(&run_dir))?;
    let mut last = LastStep(0);
    let result = {
        let mut sink = Tee(vec![sink, &mut jsonl, &mut last]);
        run_loop::<B>(recipe, options, device, &run_dir, resuming, &mut sink, stop)
    };
    if let Err(e) = &result {
        let error = Event::Error { step: last.0, message: e.to_string() };
        sink.emit(&error);
        jsonl.emit(&error);
    }
    result
}

fn run_loop<B: TrainBackend>(
    recipe: &Recipe,
    options: &TrainOptions,
    device: &B::Device,
    run_dir: &Path,
    resuming: bool,
    sink: &mut dyn EventSink,
    stop: &AtomicBool,
) -> Result<TrainOutcome, TrainError> {
    let started = Instant::now();
    let seed = recipe.run.seed;
    B::seed(device, seed);

    // Model and tokenizer.
    let base = match (&recipe.model.path, &recipe.model.init) {
        (Some(path), _) => load_base(path)?,
        (None, Some(init)) => prepare_init_base(recipe, init, run_dir)?,
        // Recipe validation guarantees one of the two.
        (None, None) => return Err(TrainError::NoModel { path: recipe.path.clone() }),
    };
    let tokenizer = Tokenizer::load(&base.dir)?;
    let mut eos_ids = base.config.eos_token_ids.clone();
    eos_ids.extend(tokenizer.eos_ids().into_iter().filter(|id| !base.config.eos_token_ids.contains(id)));
    let model: Model<B> = match &recipe.model.path {
        Some(path) => Model::load_quantized(path, recipe.model.quantize_spec(), device)?,
        None => Model::init_random(base.config.clone(), seed, device),
    };
    tracing::info!("model loaded in {:.1} s", started.elapsed().as_secs_f64());
    let model = if options.reference_ops { model.use_reference_ops() } else { model };
    let spec = lora_spec(recipe);
    // With every weight training, GRPO's reference is the starting point, kept frozen.
    let frozen = (recipe.method == Method::Grpo && !recipe.trains_lora()).then(|| model.valid());
    let model = if recipe.trains_lora() { lora::attach(model, &spec, seed) } else { model };
    let (mut model, precision_warning) = with_precision(model, recipe, device);
    let data = load_data(recipe, &tokenizer, eos_ids.first().copied())?;
    tracing::info!("adapters attached and data loaded at {:.1} s", started.elapsed().as_secs_f64());
    let t = &recipe.train;
    let mut objective = make_objective::<B>(recipe, &base, &tokenizer, &eos_ids, frozen, device)?;

    // Schedule.
    let batches_per_epoch = match &objective {
        Objective::Grpo(g) => g.batches_per_epoch(),
        _ => epoch_batches(recipe, &data.train, 0).len().max(1),
    };
    let steps_per_epoch = batches_per_epoch.div_ceil(t.grad_accum);
    let total_steps = if t.steps > 0 { t.steps } else { t.epochs.max(1) * steps_per_epoch };
    let schedule = LrSchedule { kind: t.lr_schedule, lr: t.learning_rate, warmup: t.warmup_steps, total: total_steps, min_ratio: t.min_lr_ratio };
    let mut opt = AdamW::<B::InnerBackend>::new(AdamWConfig { beta1: t.beta1, beta2: t.beta2, eps: t.eps, weight_decay: t.weight_decay });

    let mut state = LoopState::default();
    if resuming {
        let (_, dir) = checkpoint::list(run_dir).pop().ok_or_else(|| TrainError::NothingToResume { dir: run_dir.to_path_buf() })?;
        let loaded = checkpoint::load(&dir)?;
        let (m, n) = optim::load_named(model, &loaded.trainable, device);
        if n != loaded.trainable.len() {
            return Err(TrainError::Checkpoint { path: dir, message: format!("{} saved tensors, {n} matched the model (was the recipe changed?)", loaded.trainable.len()) });
        }
        model = m;
        checkpoint::restore_moments(&mut opt, loaded.moments, device);
        opt.step = loaded.state.adam_step;
        state = loaded.state;
    }

    let (trainable, total) = optim::param_counts(&model);
    sink.emit(&Event::Start {
        step: state.step,
        total_steps,
        run: recipe.run.name.clone(),
        method: format!("{:?}", recipe.method).to_lowercase(),
        model: recipe.model.path.as_ref().map_or_else(|| "init".to_string(), |p| p.display().to_string()),
        device: recipe.run.device.clone(),
        dtype: if model.matmul_dtype == burn::tensor::FloatDType::BF16 { "bf16" } else { "f32" }.into(),
        trainable_params: trainable,
        total_params: total,
        train_examples: data.train.len(),
        valid_examples: data.valid.len(),
        resumed: resuming,
    });
    if let Some(message) = precision_warning {
        sink.emit(&Event::Warning { step: state.step, message });
    }
    let context = model.config.max_position_embeddings;
    if recipe.data.max_seq_len > context && data.train.iter().any(|ex| ex.ids.len() > context + 1) {
        let message = format!("data.max_seq_len = {} is beyond the model's context length {context} (max_position_embeddings), and some examples are longer than that: they train positions the model has never seen", recipe.data.max_seq_len);
        sink.emit(&Event::Warning { step: state.step, message });
    }
    if recipe.trains_lora() && spec.experts && !model.config.has_experts() {
        sink.emit(&Event::Warning { step: state.step, message: format!("lora.experts = true, but {} has no experts: only attention and MLP projections are adapted", model.config.model_type) });
    }
    if let (Objective::Distill(d), false) = (&objective, data.valid.is_empty()) {
        let r = eval::evaluate(d.teacher(), &data.valid, t.batch_size, recipe.data.max_seq_len, recipe.eval.max_batches);
        sink.emit(&Event::TeacherEval { step: state.step, loss: r.loss, ppl: r.ppl, tokens: r.tokens });
    }

    let mut accuracy_before = None;
    if !resuming {
        accuracy_before = report_accuracy(&model.valid(), &tokenizer, &data.prompts, &eos_ids, recipe, 0, sink);
    }
    let probe_ids = crate::probe::probe_batch(if data.valid.is_empty() { &data.train } else { &data.valid }, recipe.probes.examples, recipe.data.max_seq_len);
    let probes_due = |step: usize| recipe.probes.every > 0 && (step.is_multiple_of(recipe.probes.every) || step == total_steps);
    if !resuming && recipe.probes.every > 0 {
        emit_probes(&model, recipe, &probe_ids, state.step, sink);
    }

    let mut epoch_cache: Option<(usize, Vec<Batch>)> = None;
    // The next SFT step, queued behind this one's update before its loss is read, with the
    // parameters and dropout seed it would have had if queued later. Its cursor is committed to
    // `state` only when it is taken: a run that stops first, or drops it, saves none of it.
    let mut queued: Option<Queued<B>> = None;
    let mut train_time = 0.0f64;
    let mut reason = "completed".to_string();
    let mut last_eval = None;
    while state.step < total_steps {
        if stop.load(Ordering::Relaxed) {
            reason = "interrupted".into();
            break;
        }
        if options.max_steps.is_some_and(|m| state.step >= m) {
            reason = "max_steps".into();
            break;
        }
        if obey_control(&model, &opt, &state, recipe, run_dir, sink, stop)? {
            reason = "stopped".into();
            break;
        }
        let step_start = Instant::now();
        let next = state.step + 1;
        // SFT's losses stay on the device until the step's gradient norm is queued too: reading
        // a loss waits for the GPU, and then nothing would be queued behind the backward.
        let mut pending_losses = Vec::new();
        let mut out = match &mut objective {
            Objective::Sft => {
                let q = match queued.take() {
                    Some(q) => q,
                    None => queue_sft(&model, recipe, &data.train, state.cursor, &mut epoch_cache, batches_per_epoch, device, options.reference_ops, state.step),
                };
                state.cursor = q.cursor;
                pending_losses = q.losses;
                q.out
            }
            Objective::Distill(d) => {
                seed_step::<B>(device, seed, state.step);
                let on_policy = d.on_policy(state.step);
                let micro = match on_policy {
                    true => d.student_batches(&model.valid(), state.step, t.grad_accum),
                    false => next_micro_batches(recipe, &data.train, &mut state.cursor, &mut epoch_cache, batches_per_epoch),
                };
                let (out, sums) = d.step(&model, &micro, on_policy);
                let step_tokens: usize = micro.iter().map(|b| b.tokens).sum();
                let per_token = |v: f64| v / step_tokens.max(1) as f64;
                let ce_loss = if on_policy { f64::NAN } else { per_token(sums.ce) };
                sink.emit(&Event::Distill { step: next, loss: out.loss, kd_loss: per_token(sums.kd), ce_loss, on_policy });
                out
            }
            Objective::Grpo(g) => {
                seed_step::<B>(device, seed, state.step);
                let mut warnings = Vec::new();
                let (out, mut stats) = g.step(&model, &mut state, &tokenizer, &mut |w| warnings.push(w));
                for message in warnings {
                    sink.emit(&Event::Warning { step: next, message });
                }
                stats.step = next;
                sink.emit(&Event::Grpo(Box::new(stats)));
                out
            }
        };
        let epoch = state.cursor.saturating_sub(1) / batches_per_epoch;
        let Some(mut grads) = out.grads else {
            sink.emit(&Event::Warning { step: state.step, message: "step had no target tokens; skipped".into() });
            state.step += 1;
            continue;
        };
        // The probe reads the gradients that the update consumes.
        let grad_probe = if probes_due(next) { crate::probe::layer_grad_norms(&model, &grads, next) } else { None };
        // Queued before anything is read, so the device goes from the backward straight into
        // the update, then (SFT with adapters) into the next step's forward and backward while
        // the host waits for this step's loss and norm. A non-finite loss or norm, known only
        // after the read, reverts the update, and the next step is queued again.
        let lr = schedule.at(state.step);
        let (updated, pending) = opt.update(model, &mut grads, lr, t.max_grad_norm);
        model = updated;
        let read = read_step::<B::InnerBackend>(pending_losses.into_iter().map(|l| l.inner()).collect(), pending.square_sum());
        // The update's undo copies (`pending`) stay alive through the next step's backward:
        // small for adapters, three copies of the weights when every weight trains.
        let queue_next = matches!(objective, Objective::Sft) && recipe.trains_lora() && next < total_steps && options.max_steps.is_none_or(|m| next < m) && !stop.load(Ordering::Relaxed);
        if queue_next {
            queued = Some(queue_sft(&model, recipe, &data.train, state.cursor, &mut epoch_cache, batches_per_epoch, device, options.reference_ops, next));
        }
        let (loss, grad_norm) = read()?;
        out.loss += loss;
        let loss_value = out.loss;
        if !loss_value.is_finite() || !grad_norm.is_finite() {
            model = opt.revert(model, pending);
            // Computed with the rejected parameters: queued again from the same cursor.
            queued = None;
            state.bad_in_row += 1;
            sink.emit(&Event::Warning { step: state.step, message: format!("non-finite loss ({loss_value}) or gradient norm ({grad_norm}); step skipped") });
            if state.bad_in_row >= t.max_bad_steps.max(1) {
                return Err(TrainError::Diverged { count: state.bad_in_row });
            }
            state.step += 1;
            continue;
        }
        drop(pending);
        state.bad_in_row = 0;
        crate::run::poll_device_memory::<B>(device);
        state.adam_step = opt.step;
        state.step += 1;
        train_time += step_start.elapsed().as_secs_f64();
        tracing::debug!("step {} took {:.3} s", state.step, step_start.elapsed().as_secs_f64());

        state.window_loss += loss_value;
        state.window_steps += 1;
        state.window_tokens += out.tokens;
        if state.step % t.log_every == 0 || state.step == total_steps {
            sink.emit(&Event::Train {
                step: state.step,
                epoch,
                loss: state.window_loss / state.window_steps as f64,
                lr,
                grad_norm,
                tokens: state.window_tokens,
                tokens_per_s: state.window_tokens as f64 / train_time.max(1e-9),
                elapsed_s: started.elapsed().as_secs_f64(),
                rss_bytes: crate::run::peak_rss_bytes(),
                device_bytes: crate::run::peak_device_bytes(),
            });
            state.window_loss = 0.0;
            state.window_steps = 0;
            state.window_tokens = 0;
            train_time = 0.0;
        }

        if probes_due(state.step) {
            if let Some(e) = grad_probe {
                sink.emit(&e);
            }
            emit_probes(&model, recipe, &probe_ids, state.step, sink);
        }

        let every = recipe.eval.every;
        if every > 0 && state.step % every == 0 && state.step < total_steps && !data.valid.is_empty() {
            let r = eval_step(&model.valid(), &data.valid, recipe, &mut state, sink);
            last_eval = Some(r);
            emit_rollout_samples(&objective, &state, &tokenizer, sink);
            if recipe.checkpoint.early_stop_patience > 0 && state.evals_since_best >= recipe.checkpoint.early_stop_patience {
                reason = "early_stop".into();
                break;
            }
        }
        let ck = recipe.checkpoint.every;
        if ck > 0 && state.step % ck == 0 && state.step < total_steps {
            save_checkpoint(&model, &opt, &state, recipe, run_dir, sink)?;
        }
    }

    // The end: a last eval and checkpoint, then the exports.
    let valid_model = model.valid();
    if !data.valid.is_empty() && reason != "interrupted" && reason != "stopped" {
        last_eval = Some(eval_step(&valid_model, &data.valid, recipe, &mut state, sink));
    }
    save_checkpoint(&model, &opt, &state, recipe, run_dir, sink)?;
    emit_rollout_samples(&objective, &state, &tokenizer, sink);
    let mut accuracy_after = None;
    if reason == "completed" || reason == "early_stop" {
        accuracy_after = report_accuracy(&valid_model, &tokenizer, &data.prompts, &eos_ids, recipe, state.step, sink);
        export(&valid_model, &base, recipe, &spec, run_dir, sink, state.step)?;
    }
    sink.emit(&Event::End { step: state.step, reason: reason.clone(), elapsed_s: started.elapsed().as_secs_f64() });
    Ok(TrainOutcome { run_dir: run_dir.to_path_buf(), steps: state.step, reason, final_eval: last_eval, accuracy_before, accuracy_after })
}

/// The method's half of the run: GRPO's prompts and rewards, or the distillation teacher.
fn make_objective<B: TrainBackend>(
    recipe: &Recipe,
    base: &Base,
    tokenizer: &Tokenizer,
    eos_ids: &[u32],
    frozen: Option<Model<B::InnerBackend>>,
    device: &B::Device,
) -> Result<Objective<B::InnerBackend>, TrainError> {
    let d = &recipe.data;
    let prompts = || -> Result<Vec<PromptAnswer>, TrainError> {
        let mut prompts = data::load_prompts(&d.train, d.format, tokenizer)?;
        // Nothing predicts a first token without context.
        let before = prompts.len();
        prompts.retain(|p| !p.prompt_ids.is_empty());
        if prompts.len() < before {
            tracing::warn!("{}: {} records with an empty prompt are skipped", d.train.display(), before - prompts.len());
        }
        if prompts.is_empty() {
            return Err(TrainError::NoPrompts { path: d.train.clone() });
        }
        Ok(prompts)
    };
    Ok(match (&recipe.grpo, &recipe.distill) {
        (Some(g), _) if recipe.method == Method::Grpo => {
            Objective::Grpo(Box::new(grpo::Grpo::new(g, prompts()?, tokenizer, eos_ids, frozen, &recipe.train, recipe.run.seed)?))
        }
        (_, Some(dc)) if recipe.method == Method::Distill => {
            let teacher_tokenizer = Tokenizer::load(&dc.teacher)?;
            if let Some(message) = tokenizer.vocab_difference(&teacher_tokenizer) {
                return Err(TrainError::TeacherVocab { teacher: dc.teacher.clone(), student: base.dir.clone(), message });
            }
            let q = dc.teacher_quantize.as_deref().and_then(crate::quant::affine::QuantSpec::parse);
            let teacher = Model::<B>::load_quantized(&dc.teacher, q, device)?.valid();
            let vocab = teacher.config.vocab_size.min(base.config.vocab_size);
            if tokenizer.vocab_size() > vocab {
                let message = format!("the tokenizer has {} tokens but one model has only {vocab} logits", tokenizer.vocab_size());
                return Err(TrainError::TeacherVocab { teacher: dc.teacher.clone(), student: base.dir.clone(), message });
            }
            let on_policy_prompts = if dc.lmbda > 0.0 { prompts()? } else { Vec::new() };
            Objective::Distill(Box::new(distill::Distill::new(dc, teacher, vocab, on_policy_prompts, eos_ids, recipe.train.batch_size, recipe.run.seed)))
        }
        _ => Objective::Sft,
    })
}

/// Queues SFT step `step` (0-based): its dropout seed, its micro-batches at `cursor`, their
/// forward and backward.
#[allow(clippy::too_many_arguments)]
fn queue_sft<B: TrainBackend>(
    model: &Model<B>,
    recipe: &Recipe,
    train: &[Example],
    mut cursor: usize,
    cache: &mut Option<(usize, Vec<Batch>)>,
    batches_per_epoch: usize,
    device: &B::Device,
    reference_ops: bool,
    step: usize,
) -> Queued<B> {
    seed_step::<B>(device, recipe.run.seed, step);
    let micro = next_micro_batches(recipe, train, &mut cursor, cache, batches_per_epoch);
    let (out, losses) = sft_grads(model, &micro, device, reference_ops);
    Queued { cursor, out, losses }
}

/// The step's `grad_accum` micro-batches at the data cursor, which they advance.
fn next_micro_batches(recipe: &Recipe, train: &[Example], cursor: &mut usize, cache: &mut Option<(usize, Vec<Batch>)>, batches_per_epoch: usize) -> Vec<Batch> {
    let mut micro = Vec::with_capacity(recipe.train.grad_accum);
    for _ in 0..recipe.train.grad_accum {
        let epoch = *cursor / batches_per_epoch;
        if cache.as_ref().is_some_and(|(e, _)| *e != epoch) {
            *cache = None;
        }
        let (_, batches) = cache.get_or_insert_with(|| (epoch, epoch_batches(recipe, train, epoch)));
        // Packing a different shuffle can give an epoch one batch fewer than epoch 0.
        micro.push(batches[(*cursor % batches_per_epoch).min(batches.len() - 1)].clone());
        *cursor += 1;
    }
    micro
}

/// Applies `run.dtype`: with `bf16`, the frozen projections go to bf16 where the device has
/// it. Where it cannot apply, the run trains in f32 and the returned warning says why.
fn with_precision<B: TrainBackend>(model: Model<B>, recipe: &Recipe, device: &B::Device) -> (Model<B>, Option<String>) {
    if !recipe.run.bf16() {
        return (model, None);
    }
    if !recipe.trains_lora() {
        return (model, Some("run.dtype = \"bf16\" puts the frozen base weights in bf16, and this run trains every weight: training in f32".into()));
    }
    if !B::supports_dtype(device, burn::tensor::DType::BF16) {
        let why = "the CPU backend computes in f32 and wgpu's shader language (WGSL) has no bf16";
        return (model, Some(format!("run.dtype = \"bf16\": this device ({}) has no bf16 ({why}): training in f32", B::name(device))));
    }
    let (model, n) = model.to_bf16_matmuls();
    tracing::info!("{n} frozen weights stored and multiplied in bf16");
    (model, None)
}

/// Cross-entropy gradients of the micro-batches, each loss divided by the step's target-token
/// count so that accumulation equals one big batch. The losses come back as device tensors, not
/// yet in [`StepGrads::loss`]: their sum is the step's loss.
fn sft_grads<B: TrainBackend>(model: &Model<B>, micro: &[Batch], device: &B::Device, reference_ops: bool) -> (StepGrads, Vec<Tensor<B, 1>>) {
    let step_tokens: usize = micro.iter().map(|b| b.tokens).sum();
    let (mut out, mut losses) = (StepGrads::default(), Vec::new());
    for batch in micro.iter().filter(|b| b.tokens > 0) {
        let loss = if reference_ops { eval::loss_sum_unfused(model, eval::batch_hidden(model, batch, device), batch, device) } else { eval::loss_sum(model, batch, device) };
        let loss = loss.div_scalar(step_tokens as f64);
        out.tokens += batch.batch * batch.seq;
        // Device memory peaks at the end of the forward (every activation held) or in the
        // backward (activations and gradients): read it at both ends.
        crate::run::poll_device_memory::<B>(device);
        let grads = loss.backward();
        crate::run::poll_device_memory::<B>(device);
        losses.push(loss);
        add_grads(model, &mut out.grads, GradientsParams::from_grads(grads, model));
    }
    (out, losses)
}

fn emit_rollout_samples<I: QuantMatmul>(objective: &Objective<I>, state: &LoopState, tokenizer: &Tokenizer, sink: &mut dyn EventSink) {
    if let (Objective::Grpo(g), Some(r)) = (objective, &state.rollouts) {
        for e in g.samples(r, tokenizer, state.step) {
            sink.emit(&e);
        }
    }
}

fn eval_step<B: QuantMatmul>(model: &Model<B>, valid: &[Example], recipe: &Recipe, state: &mut LoopState, sink: &mut dyn EventSink) -> eval::EvalResult {
    let r = eval::evaluate(model, valid, recipe.train.batch_size, recipe.data.max_seq_len, recipe.eval.max_batches);
    let best = state.best_eval.is_none_or(|b| r.loss < b);
    if best {
        state.best_eval = Some(r.loss);
        state.best_step = Some(state.step);
        state.evals_since_best = 0;
    } else {
        state.evals_since_best += 1;
    }
    sink.emit(&Event::Eval { step: state.step, loss: r.loss, ppl: r.ppl, tokens: r.tokens, best });
    r
}

/// The probe signals of the model as it is now (docs/probes.md); KL to the base when the base
/// is the model without its adapters.
fn emit_probes<B: TrainBackend>(model: &Model<B>, recipe: &Recipe, probe_ids: &[Vec<u32>], step: usize, sink: &mut dyn EventSink) {
    let policy = model.valid();
    let base = recipe.trains_lora().then(|| lora::without_adapters(policy.clone()));
    for e in crate::probe::forward_signals(&policy, base.as_ref(), probe_ids, step) {
        sink.emit(&e);
    }
    if let Some(e) = crate::probe::lora_update_norms(&policy, step) {
        sink.emit(&e);
    }
}

/// Acts on the run directory's control file (docs: [`control`]): pause blocks here until
/// resume (or stop, or Ctrl-C), save writes a checkpoint now. True when asked to stop.
#[allow(clippy::too_many_arguments)]
fn obey_control<B: TrainBackend>(
    model: &Model<B>,
    opt: &AdamW<B::InnerBackend>,
    state: &LoopState,
    recipe: &Recipe,
    run_dir: &Path,
    sink: &mut dyn EventSink,
    stop: &AtomicBool,
) -> Result<bool, TrainError> {
    let mut paused = false;
    loop {
        let (commands, unknown) = control::take(run_dir);
        for line in unknown {
            sink.emit(&Event::Warning { step: state.step, message: format!("control file: unknown command {line:?} (expected pause, resume, save or stop)") });
        }
        for command in commands {
            let action = match command {
                Command::Pause => {
                    paused = true;
                    "paused"
                }
                Command::Resume => {
                    paused = false;
                    "resumed"
                }
                Command::Save => "save",
                Command::Stop => "stop",
            };
            sink.emit(&Event::Control { step: state.step, action: action.into() });
            match command {
                Command::Save => save_checkpoint(model, opt, state, recipe, run_dir, sink)?,
                Command::Stop => return Ok(true),
                _ => {}
            }
        }
        if !paused || stop.load(Ordering::Relaxed) {
            return Ok(false);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn report_accuracy<B: QuantMatmul>(model: &Model<B>, tokenizer: &Tokenizer, prompts: &[PromptAnswer], eos_ids: &[u32], recipe: &Recipe, step: usize, sink: &mut dyn EventSink) -> Option<f64> {
    if prompts.is_empty() {
        return None;
    }
    let answers = eval::exact_match(model, tokenizer, prompts, eos_ids, recipe.eval.max_new_tokens);
    for a in answers.iter().take(3) {
        sink.emit(&Event::Sample { step, prompt: a.prompt.clone(), completion: a.completion.clone(), expected: Some(a.expected.clone()), reward: None });
    }
    let correct = answers.iter().filter(|a| a.correct).count();
    let accuracy = correct as f64 / answers.len() as f64;
    sink.emit(&Event::Accuracy { step, correct, total: answers.len(), accuracy });
    Some(accuracy)
}

fn save_checkpoint<B: TrainBackend>(model: &Model<B>, opt: &AdamW<B::InnerBackend>, state: &LoopState, recipe: &Recipe, run_dir: &Path, sink: &mut dyn EventSink) -> Result<(), TrainError> {
    let path = checkpoint::save(run_dir, optim::trainable_tensors(model), opt, state)?;
    let best = if recipe.checkpoint.keep_best { state.best_step } else { None };
    checkpoint::prune(run_dir, recipe.checkpoint.keep_last, best);
    sink.emit(&Event::Checkpoint { step: state.step, path: path.display().to_string() });
    Ok(())
}

/// Writes the results: the PEFT adapter (LoRA) and/or a fused or fully trained HF directory.
fn export<B: QuantMatmul>(model: &Model<B>, base: &Base, recipe: &Recipe, spec: &LoraSpec, run_dir: &Path, sink: &mut dyn EventSink, step: usize) -> Result<(), TrainError> {
    let base_name = base.dir.display().to_string();
    if recipe.trains_lora() && recipe.export.adapter {
        let dir = run_dir.join("adapter");
        lora::peft::save(model, spec, &base_name, recipe.model.quantize_spec(), &dir)?;
        sink.emit(&Event::Checkpoint { step, path: dir.display().to_string() });
    }
    if let Some(q) = recipe.model.quantize_spec().filter(|_| recipe.export.fused || recipe.export.gguf.is_some()) {
        let message = format!("the adapter was trained over a {q} base: the fused model is the dequantised {q} weights plus the update, not the original float weights");
        sink.emit(&Event::Warning { step, message });
    }
    let exports_base = recipe.export.fused || recipe.export.gguf.is_some();
    if model.matmul_dtype == burn::tensor::FloatDType::BF16 && base.config.dtype != "bfloat16" && exports_base {
        let message = format!("the adapter was trained over the base weights rounded to bf16 (run.dtype); the fused model holds those plus the update, not the original {} weights", base.config.dtype);
        sink.emit(&Event::Warning { step, message });
    }
    if !recipe.trains_lora() || recipe.export.fused {
        let dir = run_dir.join("final");
        let fused = lora::fuse(model.clone());
        crate::model::save::save_hf_dir(&fused, &base.config_json, &base.dir, &dir)?;
        sink.emit(&Event::Checkpoint { step, path: dir.display().to_string() });
    }
    if let Some(file_type) = recipe.export.gguf.as_deref().and_then(crate::gguf::FileType::parse) {
        // The GGUF is made from a Hugging Face directory: the final one when written, else a
        // fused copy in a temporary directory.
        let scratch;
        let dir = if !recipe.trains_lora() || recipe.export.fused {
            run_dir.join("final")
        } else {
            scratch = tempfile::tempdir_in(run_dir).map_err(|source| TrainError::Io { path: run_dir.to_path_buf(), source })?;
            let dir = scratch.path().join("fused");
            crate::model::save::save_hf_dir(&lora::fuse(model.clone()), &base.config_json, &base.dir, &dir)?;
            dir
        };
        let out = run_dir.join(format!("model-{}.gguf", file_type.name()));
        let export = crate::gguf::export_dir(&dir, file_type, &out, Some(recipe.run.name.clone()))?;
        let fallbacks = export.fallbacks();
        if !fallbacks.is_empty() {
            let message = format!(
                "{} of {} GGUF tensors have rows that are not a multiple of 256 and use {} instead of {} (as llama.cpp does)",
                fallbacks.len(),
                export.tensor_plan().len(),
                fallbacks[0].got.name(),
                fallbacks[0].wanted.name()
            );
            sink.emit(&Event::Warning { step, message });
        }
        sink.emit(&Event::Checkpoint { step, path: out.display().to_string() });
    }
    Ok(())
}
