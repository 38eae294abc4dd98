//! `kiln bench forward|decode`: prefill and decode throughput, median of several timed runs
//! after a warm-up (the first run on a GPU compiles and autotunes its kernels).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use burn::prelude::*;
use serde_json::json;

use super::model_dir;
use crate::backend::{DeviceSpec, QuantMatmul};
use crate::generate::{argmax, ids_tensor, Sampler, SamplingConfig, StopConfig};
use crate::model::layers::LinearWeight;
use crate::model::Model;
use crate::quant::affine::QuantSpec;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum What {
    /// Prefill: one forward pass over the prompt.
    Forward,
    /// Prefill, then greedy decoding one token at a time with the KV cache.
    Decode,
    /// Batched sampling as GRPO rollouts run it: one prompt, `--batch` rows decoded side by side
    /// with the KV cache for `--new-tokens` each (temperature 1, top-k 50, no stop token).
    Sample,
    /// Training steps of a recipe (`--recipe`): tokens/s and peak memory.
    Train,
    /// The probe signals' cost on a recipe (`--recipe`): step time with probes off and on.
    Probes,
    /// The quantised-matmul kernels: decode GB/s against copy bandwidth, prefill TFLOP/s
    /// against Burn's dense matmul, per format and shape.
    Kernels,
    /// Burn's dense matmul at a LoRA training step's shapes (8192 rows through the Qwen2.5-0.5B
    /// and Llama-3.2-1B projections, forward `x·W` and backward `dy·Wᵀ`), f32 and bf16: TFLOP/s.
    Matmul,
    /// kiln's fused operations (the chunked LM-head loss) against the plain composition on the
    /// device: forward and gradients checked, then both timed.
    Fused,
    /// GGUF export speed (MB/s) per `--types`, next to llama.cpp's quantiser when
    /// llama-cpp-python is installed. Without `--model`, a random Qwen3-0.6B-shaped model.
    Export,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    what: What,
    /// Hugging Face model directory (forward, decode; a random Qwen3-0.6B-shaped model when
    /// left out).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The recipe to time (train).
    #[arg(long)]
    recipe: Option<PathBuf>,
    /// fused: only the cases of these operations, separated by commas (attention,
    /// lm_head_loss, rope, gated_act, gated_down, rms_norm, frozen_matmul, frozen_lora).
    #[arg(long)]
    only: Option<String>,
    /// Training steps to time (train); the first two are warm-up and not counted.
    #[arg(long, default_value_t = 12)]
    steps: usize,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens to decode (decode, sample).
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Rows sampled side by side (sample).
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Timed runs; the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// GGUF types to time (export).
    #[arg(long, value_delimiter = ',', default_value = "q4_k_m,q8_0")]
    types: Vec<String>,
    /// Also run the model quantised (forward, decode), next to the float model.
    #[arg(long, value_parser = super::parse_quantize)]
    quantize: Option<QuantSpec>,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
    /// cpu, wgpu (Vulkan/Metal/DX12; wgpu:cpu for a software adapter), cuda[:N] or rocm[:N].
    /// Train and probes default to the recipe's `run.device`, the others to cpu.
    #[arg(long, value_parser = super::parse_device)]
    device: Option<DeviceSpec>,
}

impl Args {
    /// `--device`, else the recipe's `run.device` (train, probes), else the CPU.
    fn device(&self, recipe: Option<&crate::recipe::Recipe>) -> anyhow::Result<DeviceSpec> {
        let device = match (self.device, recipe) {
            (Some(d), _) => d,
            (None, Some(r)) => r.run.device.parse()?,
            (None, None) => DeviceSpec::Cpu,
        };
        device.check()?;
        Ok(device)
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.what == What::Train {
        return bench_train(&args);
    }
    if args.what == What::Probes {
        return bench_probes(&args);
    }
    let device = args.device(None)?;
    if args.what == What::Kernels {
        return super::bench_kernels::run(device, args.json);
    }
    if args.what == What::Matmul {
        return super::bench_kernels::run_matmul(device, args.json);
    }
    if args.what == What::Fused {
        return super::bench_fused::run(device, args.runs, args.json, args.only.as_deref());
    }
    if args.what == What::Export {
        return super::export::bench(args.model.as_deref(), &args.types, args.json);
    }
    if args.prompt_len == 0 || args.runs == 0 {
        anyhow::bail!("--prompt-len and --runs must be at least 1");
    }
    if matches!(args.what, What::Decode | What::Sample) && args.new_tokens == 0 {
        anyhow::bail!("--new-tokens must be at least 1 for `bench decode` and `bench sample`");
    }
    if args.what == What::Sample && args.batch == 0 {
        anyhow::bail!("--batch must be at least 1 for `bench sample`");
    }
    let scratch = tempfile::tempdir()?;
    let dir = match &args.model {
        Some(m) => model_dir(m)?.clone(),
        None => {
            eprintln!("no --model: creating a random Qwen3-0.6B-shaped model ...");
            super::export::random_qwen3_0_6b(&scratch.path().join("model"))?
        }
    };
    crate::with_backend!(device, |B, dev| run_on::<B>(&args, &dir, device, &dev))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// With `--quantize`, the float model is measured first in the same run as the reference.
fn run_on<B: QuantMatmul>(args: &Args, dir: &Path, spec: DeviceSpec, device: &B::Device) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    if args.quantize.is_some() {
        rows.push(measure::<B>(args, dir, None, device)?);
    }
    rows.push(measure::<B>(args, dir, args.quantize, device)?);
    let result = json!({
        "model": dir.display().to_string(),
        "device": spec.to_string(),
        "prompt_len": args.prompt_len,
        "new_tokens": matches!(args.what, What::Decode | What::Sample).then_some(args.new_tokens),
        "batch": (args.what == What::Sample).then_some(args.batch),
        "runs": args.runs,
        "results": rows,
    });
    if args.json {
        println!("{result}");
        return Ok(());
    }
    println!("model   {}  (device {}, prompt {} tokens, median of {} runs)", dir.display(), spec, args.prompt_len, args.runs);
    for r in &rows {
        let decode = r["decode_tokens_per_s"].as_f64().map(|d| format!("  decode {d:>8.1} tokens/s")).unwrap_or_default();
        let sample = r["sample_tokens_per_s"].as_f64().map(|d| format!("  sampling {} × {} {d:>8.1} tokens/s", args.batch, args.new_tokens)).unwrap_or_default();
        println!(
            "  {:<10} prefill {:>9.1} tokens/s{decode}{sample}  weights {:>8.1} MiB",
            r["weights"].as_str().unwrap_or(""),
            r["prefill_tokens_per_s"].as_f64().unwrap_or(0.0),
            r["weight_bytes"].as_f64().unwrap_or(0.0) / (1024.0 * 1024.0)
        );
    }
    if let [dense, quant] = rows.as_slice() {
        let ratio = |key: &str| Some(quant[key].as_f64()? / dense[key].as_f64()?);
        if let Some(r) = ratio("decode_tokens_per_s") {
            println!("  decode speed {r:.2}× the float model's");
        }
        if let Some(r) = ratio("weight_bytes") {
            println!("  weights {:.2}× the float model's size", r);
        }
    }
    Ok(())
}

/// Prefill (and decode) speed of the model at `dir`, loaded float or quantised.
fn measure<B: QuantMatmul>(args: &Args, dir: &Path, quantize: Option<QuantSpec>, device: &B::Device) -> anyhow::Result<serde_json::Value> {
    let model = Model::<B>::load_quantized(dir, quantize, device).with_context(|| format!("loading {}", dir.display()))?;
    let vocab = model.config.vocab_size as u32;
    // A fixed pseudo-random prompt: the same tokens on every backend and run.
    let prompt: Vec<u32> = (0..args.prompt_len as u32).map(|i| (i.wrapping_mul(2654435761) >> 7) % vocab).collect();
    let host = |logits: Tensor<B, 2>| logits.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"));

    let prefill = || -> anyhow::Result<f64> {
        let t = Instant::now();
        let mut cache = model.make_cache();
        host(model.forward_last(ids_tensor::<B>(&prompt, device), Some(&mut cache)))?;
        Ok(t.elapsed().as_secs_f64())
    };
    let decode = || -> anyhow::Result<f64> {
        let mut cache = model.make_cache();
        let mut row = host(model.forward_last(ids_tensor::<B>(&prompt, device), Some(&mut cache)))?;
        let t = Instant::now();
        for _ in 0..args.new_tokens {
            let next = argmax(&row);
            row = host(model.forward_last(ids_tensor::<B>(&[next], device), Some(&mut cache)))?;
        }
        Ok(t.elapsed().as_secs_f64())
    };

    // Warm-up: compiles kernels for these shapes on GPU backends.
    prefill()?;
    let prefill_tps = args.prompt_len as f64 / median((0..args.runs).map(|_| prefill()).collect::<anyhow::Result<_>>()?);
    let mut row = json!({
        "weights": quantize.map_or_else(|| "float".to_string(), |q| q.to_string()),
        "weight_bytes": weight_bytes(&model),
        "prefill_tokens_per_s": prefill_tps,
    });
    if args.what == What::Decode {
        decode()?;
        let times = (0..args.runs).map(|_| decode()).collect::<anyhow::Result<Vec<_>>>()?;
        row["decode_tokens_per_s"] = json!(args.new_tokens as f64 / median(times));
    }
    if args.what == What::Sample {
        // Prefill included, as a rollout pays it; no stop token, so every row runs to the end.
        let stop = StopConfig { max_new_tokens: args.new_tokens, eos_ids: Vec::new() };
        let sample = |seed: u64| {
            let mut sampler = Sampler::new(SamplingConfig { temperature: 1.0, top_k: 50, top_p: 1.0, seed });
            let t = Instant::now();
            let rows = crate::train::rollout::rollout_group(&model, &prompt, args.batch, &mut sampler, &stop);
            (t.elapsed().as_secs_f64(), rows.iter().map(|r| r.ids.len()).sum::<usize>())
        };
        sample(0);
        let runs: Vec<(f64, usize)> = (1..=args.runs as u64).map(sample).collect();
        let tokens = runs[0].1;
        row["sample_tokens_per_s"] = json!(tokens as f64 / median(runs.iter().map(|r| r.0).collect()));
        row["sample_tokens"] = json!(tokens);
    }
    Ok(row)
}

/// Bytes the model's weights take on the device: float parameters at the backend's float
/// width, quantised projections as their words, scales and biases.
fn weight_bytes<B: QuantMatmul>(model: &Model<B>) -> u64 {
    use burn::module::Module;
    let float = model.embed_tokens.val().dtype().size() as u64;
    let mut bytes = model.num_params() as u64 * float;
    for i in 0..model.layers.len() {
        for (_, l) in crate::lora::projections(model, i) {
            if let LinearWeight::Quant(q) = &l.weight {
                let size = |dims: [usize; 2], elem: usize| (dims[0] * dims[1] * elem) as u64;
                bytes += size(q.words.dims(), q.words.dtype().size()) + size(q.scales.dims(), q.scales.dtype().size()) + size(q.biases.dims(), q.biases.dtype().size());
            }
        }
    }
    bytes
}

/// The recipe at `--recipe`, set up to time `steps` steps in a scratch run directory: every
/// step logged, no evals, checkpoints or exports.
fn timing_recipe(args: &Args, steps: usize) -> anyhow::Result<crate::recipe::Recipe> {
    let Some(path) = &args.recipe else { anyhow::bail!("`bench {}` needs --recipe FILE", if args.what == What::Probes { "probes" } else { "train" }) };
    let mut recipe = crate::recipe::Recipe::load(path)?;
    recipe.run.output_dir = std::env::temp_dir().join(format!("kiln-bench-{}", std::process::id()));
    recipe.run.name = "bench".into();
    recipe.train.log_every = 1;
    recipe.eval.every = 0;
    recipe.eval.exact_match = false;
    recipe.data.test = None;
    // Without a validation set the run ends without its final eval, which is not training time.
    recipe.data.valid = None;
    recipe.data.valid_fraction = 0.0;
    recipe.checkpoint.every = 0;
    recipe.export.adapter = false;
    recipe.export.fused = false;
    if recipe.train.steps > 0 && recipe.train.steps < steps {
        recipe.train.steps = steps;
    }
    Ok(recipe)
}

/// Trains `steps` steps of `recipe` and returns its events (the scratch directory is removed).
fn timed_run(recipe: &crate::recipe::Recipe, steps: usize, device: DeviceSpec) -> anyhow::Result<Vec<crate::run::Event>> {
    use crate::train::{train, TrainOptions};
    let options = TrainOptions { max_steps: Some(steps), overwrite: true, ..Default::default() };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let mut rec = crate::run::Recorder::default();
    let result = crate::with_backend!(device, |B, dev| train::<burn::backend::Autodiff<B>>(recipe, &options, &dev, &mut rec, &stop));
    let _ = std::fs::remove_dir_all(&recipe.run.output_dir);
    result?;
    Ok(rec.events)
}

/// Runs `--steps` training steps of the recipe in a scratch run directory (no evals, no
/// exports) and reports the median step of those after a two-step warm-up: tokens/s, seconds,
/// and the peak memory (the GPU allocator's high-water mark on a GPU, resident memory on the CPU).
fn bench_train(args: &Args) -> anyhow::Result<()> {
    use crate::run::Event;
    if args.steps < 3 {
        anyhow::bail!("--steps must be at least 3 (two are warm-up)");
    }
    let mut recipe = timing_recipe(args, args.steps)?;
    recipe.probes.every = 0;
    let device = args.device(Some(&recipe))?;
    let events = timed_run(&recipe, args.steps, device)?;
    // (tokens/s, seconds) of each timed step: with log_every = 1 an event covers one step.
    let steps: Vec<(f64, f64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Train { step, tokens_per_s, tokens, .. } if *step > 2 => Some((*tokens_per_s, *tokens as f64 / tokens_per_s.max(1e-12))),
            _ => None,
        })
        .collect();
    if steps.is_empty() {
        anyhow::bail!("no timed steps");
    }
    let losses: Vec<f64> = events.iter().filter_map(|e| if let Event::Train { loss, .. } = e { Some(*loss) } else { None }).collect();
    let dtype = events.iter().find_map(|e| if let Event::Start { dtype, .. } = e { Some(dtype.clone()) } else { None }).unwrap_or_default();
    for e in &events {
        if let Event::Warning { message, .. } = e {
            eprintln!("warning: {message}");
        }
    }
    let tokens_per_s = median(steps.iter().map(|s| s.0).collect());
    let step_s = median(steps.iter().map(|s| s.1).collect());
    let (peak_bytes, peak_of) = match crate::run::peak_device_bytes() {
        Some(b) => (b, "device"),
        None => (crate::run::peak_rss_bytes(), "host_rss"),
    };
    // What `kiln plan` predicted for this recipe and device, for the measured peak to be held to.
    let planned = crate::train::plan::recipe_geometry(&recipe).ok().map(|g| crate::train::plan::plan(&recipe, &g, device, None).peak_bytes);
    let out = json!({
        "recipe": recipe.path.display().to_string(),
        "device": device.to_string(),
        "method": recipe.method.as_str(),
        "dtype": dtype,
        "losses": losses,
        "plan_peak_bytes": planned,
        "peak_over_plan": planned.map(|p| peak_bytes as f64 / p.max(1) as f64),
        "steps_timed": steps.len(),
        "batch_size": recipe.train.batch_size,
        "max_seq_len": recipe.data.max_seq_len,
        "tokens_per_s": tokens_per_s,
        "step_s": step_s,
        "peak_bytes": peak_bytes,
        "peak_of": peak_of,
        "peak_in_use_bytes": crate::run::peak_device_in_use_bytes(),
        "peak_host_rss_bytes": crate::run::peak_rss_bytes(),
        "cublas_products": kiln_kernels::cublas_counts().0,
        "cublas_fallbacks": kiln_kernels::cublas_counts().1,
        "tensor_core_attention": kiln_kernels::tensor_core_attention_count(),
    });
    if args.json {
        println!("{out}");
    } else {
        println!("train   {tokens_per_s:>10.1} tokens/s  {:.3} s/step  (median of {} steps after 2 warm-up, {} on {}, {dtype})", step_s, steps.len(), recipe.method.as_str(), device);
        println!("loss    {}", losses.iter().map(|l| format!("{l:.4}")).collect::<Vec<_>>().join(" "));
        let what = if peak_of == "device" { "peak device memory (allocator high-water mark)" } else { "peak resident memory (host)" };
        println!("memory  {:>10.1} MiB {what}", peak_bytes as f64 / (1024.0 * 1024.0));
        if let Some(b) = crate::run::peak_device_in_use_bytes() {
            println!("        {:>10.1} MiB in live tensors at the end of a forward or backward", b as f64 / (1024.0 * 1024.0));
        }
        if let Some(p) = planned {
            println!("plan    {:>10.1} MiB predicted by `kiln plan` (measured / predicted = {:.2})", p as f64 / (1024.0 * 1024.0), peak_bytes as f64 / p.max(1) as f64);
        }
    }
    Ok(())
}

/// The cost of the probe signals, from one run that measures them every `CADENCE` steps with
/// every step logged: a probe's work lands in the two step intervals around its step (the
/// gradient-norm probe before the update, the forward probes after it), so its cost is the
/// median extra time of those intervals over the median of all other intervals. The overhead is
/// that cost spread over the recipe's `probes.every` steps (50 when the recipe turns probes off).
fn bench_probes(args: &Args) -> anyhow::Result<()> {
    use crate::run::Event;
    const CADENCE: usize = 10;
    let steps = (args.runs.max(2) * 2 * CADENCE + 1).max(10 * CADENCE + 1);
    let mut recipe = timing_recipe(args, steps)?;
    let every = if recipe.probes.every > 0 { recipe.probes.every } else { 50 };
    recipe.probes.every = CADENCE;
    let device = args.device(Some(&recipe))?;
    let events = timed_run(&recipe, steps, device)?;
    let at: Vec<(usize, f64)> = events.iter().filter_map(|e| match e { Event::Train { step, elapsed_s, .. } => Some((*step, *elapsed_s)), _ => None }).collect();
    // (interval's first step, seconds), skipping the warm-up steps.
    let intervals: Vec<(usize, f64)> = at.windows(2).filter(|w| w[0].0 >= 3).map(|w| (w[0].0, w[1].1 - w[0].1)).collect();
    let probe_step = |s: usize| s.is_multiple_of(CADENCE) || (s + 1).is_multiple_of(CADENCE);
    let plain: Vec<f64> = intervals.iter().filter(|(s, _)| !probe_step(*s)).map(|i| i.1).collect();
    let before: Vec<f64> = intervals.iter().filter(|(s, _)| (s + 1).is_multiple_of(CADENCE)).map(|i| i.1).collect();
    let after: Vec<f64> = intervals.iter().filter(|(s, _)| s.is_multiple_of(CADENCE)).map(|i| i.1).collect();
    if plain.is_empty() || before.is_empty() || after.is_empty() {
        anyhow::bail!("too few timed steps");
    }
    let step_s = median(plain.clone());
    let probe_s = (median(before.clone()) - step_s) + (median(after.clone()) - step_s);
    let overhead = probe_s / (every as f64 * step_s);
    // The noise floor: the median absolute deviation of plain steps.
    let spread = median(plain.iter().map(|x| (x - step_s).abs()).collect());
    let out = json!({
        "recipe": recipe.path.display().to_string(),
        "device": device.to_string(),
        "probes_every": every,
        "probe_examples": recipe.probes.examples,
        "step_s": step_s,
        "probe_s": probe_s,
        "probes_measured": after.len(),
        "step_spread_s": spread,
        "overhead": overhead,
    });
    if args.json {
        println!("{out}");
    } else {
        println!(
            "probes  {:+.2}% step time at probes.every = {every} ({} examples): one probe measurement {:.1} ms (median of {}) against {:.1} ms per step (median of {} steps, ±{:.1} ms median deviation)",
            overhead * 100.0,
            recipe.probes.examples,
            probe_s * 1e3,
            after.len(),
            step_s * 1e3,
            plain.len(),
            spread * 1e3
        );
    }
    Ok(())
}
