//! `kiln eval --model DIR [--adapter DIR] --data FILE [--json]`: loss, perplexity and tokens/s
//! of a model (with an optional PEFT adapter) on a dataset, targets masked as in training.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use super::{DeviceArg, ModelArgs};
use crate::backend::QuantMatmul;
use crate::data::{load_examples, DataFormat, LoadOptions, TrainOn};
use crate::tokenizer::Tokenizer;
use crate::train::eval::evaluate;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// A JSONL dataset (text, prompt/completion or messages).
    #[arg(long)]
    data: PathBuf,
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[arg(long, default_value_t = 2048)]
    max_seq_len: usize,
    /// Score every token, not only completions / assistant turns.
    #[arg(long)]
    all_tokens: bool,
    /// Print `{"loss":..,"ppl":..,"tokens":..}` as the last line.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    device: DeviceArg,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    args.device.device.check()?;
    args.model.check()?;
    if args.batch_size == 0 || args.max_seq_len == 0 {
        anyhow::bail!("--batch-size and --max-seq-len must be at least 1");
    }
    crate::with_backend!(args.device.device, |B, device| run_on::<B>(&args, &device))
}

fn run_on<B: QuantMatmul>(args: &Args, device: &B::Device) -> anyhow::Result<()> {
    let tokenizer = Tokenizer::load(&args.model.model)?;
    let model = args.model.load::<B>(device)?;
    let eos = model.config.eos_token_ids.first().copied().or_else(|| tokenizer.eos_ids().first().copied());
    let opts = LoadOptions {
        format: DataFormat::Auto,
        train_on: if args.all_tokens { TrainOn::All } else { TrainOn::Completion },
        add_eos: true,
        max_seq_len: args.max_seq_len,
    };
    let examples = load_examples(&args.data, &opts, &tokenizer, eos).with_context(|| format!("reading {}", args.data.display()))?;
    let r = evaluate(&model, &examples, args.batch_size, args.max_seq_len, 0);
    if args.json {
        println!("{}", json!({"loss": r.loss, "ppl": r.ppl, "tokens": r.tokens, "tokens_per_s": r.tokens_per_s}));
    } else {
        println!("loss {:.4}  ppl {:.3}  over {} target tokens  ({:.0} tokens/s)", r.loss, r.ppl, r.tokens, r.tokens_per_s);
    }
    Ok(())
}
