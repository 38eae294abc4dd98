//! `kiln forward`: one forward pass, logits to a safetensors file, top-5 next tokens.
//!
//! Part of the stable command-line contract: `--out` holds tensor `logits`, f32, `[1, n, v]`.

use std::path::PathBuf;


use super::{DeviceArg, ModelArgs};
use crate::backend::QuantMatmul;
use crate::generate::ids_tensor;
use crate::model::weights;
use crate::tokenizer::Tokenizer;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Token ids, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    ids: Vec<u32>,
    /// Write the logits here (tensor `logits`, f32, [1, n, vocab]).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    device: DeviceArg,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    args.device.device.check()?;
    args.model.check()?;
    if args.ids.is_empty() {
        anyhow::bail!("--ids is empty: give at least one token id");
    }
    crate::with_backend!(args.device.device, |B, device| run_on::<B>(&args, &device))
}

fn run_on<B: QuantMatmul>(args: &Args, device: &B::Device) -> anyhow::Result<()> {
    let model = args.model.load::<B>(device)?;
    let vocab = model.config.vocab_size;
    if let Some(bad) = args.ids.iter().find(|&&i| i as usize >= vocab) {
        anyhow::bail!("token id {bad} is outside the vocabulary (size {vocab})");
    }
    let n = args.ids.len();
    let logits = model.forward(ids_tensor::<B>(&args.ids, device), None); // [1, n, v]
    let values: Vec<f32> = logits.into_data().convert::<f32>().into_vec().map_err(|e| anyhow::anyhow!("{e:?}"))?;
    if let Some(out) = &args.out {
        weights::save_f32(out, &[("logits".to_string(), vec![1, n, vocab], values.clone())])?;
        eprintln!("wrote logits [1, {n}, {vocab}] to {}", out.display());
    }
    let last = &values[(n - 1) * vocab..];
    let mut order: Vec<usize> = (0..vocab).collect();
    order.sort_by(|&a, &b| last[b].total_cmp(&last[a]).then(a.cmp(&b)));
    let tokenizer = Tokenizer::load(&args.model.model).ok();
    println!("top-5 next tokens after {n} ids:");
    for &id in order.iter().take(5) {
        let text = tokenizer
            .as_ref()
            .and_then(|t| t.decode(&[id as u32], false).ok())
            .map(|s| format!("{s:?}"))
            .unwrap_or_default();
        println!("  {id:>8}  {:>10.4}  {text}", last[id]);
    }
    Ok(())
}
