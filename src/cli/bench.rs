//! `kiln bench forward|decode`: prefill and decode throughput, median of several timed runs
//! after a warm-up (the first run on a GPU compiles and autotunes its kernels).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use burn::prelude::*;
use serde_json::json;

use super::{model_dir, DeviceArg};
use crate::generate::{argmax, ids_tensor};
use crate::model::Model;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum What {
    /// Prefill: one forward pass over the prompt.
    Forward,
    /// Prefill, then greedy decoding one token at a time with the KV cache.
    Decode,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    what: What,
    /// Hugging Face model directory.
    #[arg(long)]
    model: PathBuf,
    /// Prompt length in tokens.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens to decode (decode only).
    #[arg(long, default_value_t = 64)]
    new_tokens: usize,
    /// Timed runs; the median is reported.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Print one JSON line instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArg,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    args.device.device.check()?;
    model_dir(&args.model)?;
    if args.prompt_len == 0 || args.runs == 0 {
        anyhow::bail!("--prompt-len and --runs must be at least 1");
    }
    crate::with_backend!(args.device.device, |B, device| run_on::<B>(&args, &device))
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

fn run_on<B: Backend>(args: &Args, device: &B::Device) -> anyhow::Result<()> {
    let model = Model::<B>::load(&args.model, device).with_context(|| format!("loading {}", args.model.display()))?;
    let vocab = model.config.vocab_size as u32;
    // A fixed pseudo-random prompt: the same tokens on every backend and run.
    let prompt: Vec<u32> = (0..args.prompt_len as u32).map(|i| (i.wrapping_mul(2654435761) >> 7) % vocab).collect();

    let prefill = || -> anyhow::Result<(f64, Vec<f32>)> {
        let t = Instant::now();
        let mut cache = model.make_cache();
        let logits = model.forward_last(ids_tensor::<B>(&prompt, device), Some(&mut cache));
        let row = logits.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        Ok((t.elapsed().as_secs_f64(), row))
    };
    let decode = || -> anyhow::Result<f64> {
        let mut cache = model.make_cache();
        let logits = model.forward_last(ids_tensor::<B>(&prompt, device), Some(&mut cache));
        let mut row = logits.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let t = Instant::now();
        for _ in 0..args.new_tokens {
            let next = argmax(&row);
            let logits = model.forward_last(ids_tensor::<B>(&[next], device), Some(&mut cache));
            row = logits.into_data().convert::<f32>().into_vec::<f32>().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        }
        Ok(t.elapsed().as_secs_f64())
    };

    // Warm-up: compiles kernels for these shapes on GPU backends.
    prefill()?;
    let mut prefill_times = Vec::new();
    for _ in 0..args.runs {
        prefill_times.push(prefill()?.0);
    }
    let prefill_tps = args.prompt_len as f64 / median(prefill_times);
    let mut result = json!({
        "model": args.model.display().to_string(),
        "device": args.device.device.to_string(),
        "prompt_len": args.prompt_len,
        "runs": args.runs,
        "prefill_tokens_per_s": prefill_tps,
    });
    if args.what == What::Decode {
        if args.new_tokens == 0 {
            anyhow::bail!("--new-tokens must be at least 1 for `bench decode`");
        }
        decode()?;
        let mut times = Vec::new();
        for _ in 0..args.runs {
            times.push(decode()?);
        }
        result["new_tokens"] = json!(args.new_tokens);
        result["decode_tokens_per_s"] = json!(args.new_tokens as f64 / median(times));
    }
    if args.json {
        println!("{result}");
    } else {
        println!("model   {}  ({} params, device {})", args.model.display(), super::inspect::human_count(model.config.num_params_estimate()), args.device.device);
        println!("prefill {:>10.1} tokens/s  (prompt {} tokens, median of {})", prefill_tps, args.prompt_len, args.runs);
        if let Some(d) = result.get("decode_tokens_per_s").and_then(|v| v.as_f64()) {
            println!("decode  {:>10.1} tokens/s  ({} new tokens, median of {})", d, args.new_tokens, args.runs);
        }
    }
    Ok(())
}
