//! `kiln fuse --model BASE --adapter DIR --out DIR`: fold a PEFT adapter into the base weights
//! and write a Hugging Face directory (weights, config, tokenizer files).

use std::path::PathBuf;

use anyhow::Context;

use super::model_dir;
use crate::backend::Cpu;
use crate::lora;
use crate::model::layers::describe;
use crate::model::save::save_hf_dir;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    adapter: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// Replace `--out` if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    model_dir(&args.model)?;
    if args.out.exists() && !args.force {
        anyhow::bail!("{} exists; pass --force to replace it", args.out.display());
    }
    // Fusing is a few matrix products per layer: the CPU does it exactly, on any machine.
    let device = Default::default();
    let model = super::load_model::<Cpu>(&args.model, Some(&args.adapter), None, &device)?;
    let quantized = lora::quantized_formats(&model);
    if let Some(format) = quantized.first() {
        eprintln!("the base is quantised ({}): fusing into the dequantised weights, which is what the adapter was trained against, not into the original float weights", describe(*format));
    }
    let fused = lora::fuse(model);
    let config_path = args.model.join("config.json");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&config_path).with_context(|| format!("reading {}", config_path.display()))?)
        .with_context(|| format!("{} is not valid JSON", config_path.display()))?;
    save_hf_dir(&fused, &config, &args.model, &args.out)?;
    eprintln!("fused {} into {} -> {}", args.adapter.display(), args.model.display(), args.out.display());
    Ok(())
}
