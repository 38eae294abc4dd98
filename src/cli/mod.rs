//! The `kiln` command line: argument parsing and one module per subcommand, each turning its
//! arguments into library calls. Errors travel as `anyhow` with context; `main.rs` prints them
//! once and picks the exit code.

mod bench;
mod bench_fused;
mod bench_kernels;
mod eval;
mod export;
mod forward;
mod fuse;
mod generate;
mod inspect;
mod plan;
mod recipe;
mod report;
mod train;
mod watch;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::backend::DeviceSpec;
use crate::quant::affine::QuantSpec;

#[derive(Debug, Parser)]
#[command(name = "kiln", version, about = "Fine-tune open-weight language models", propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fine-tune a model as a recipe describes; leaves a run directory.
    Train(train::Args),
    /// The live dashboard over a run directory (works on finished runs too).
    Watch(watch::Args),
    /// Summarise runs (best eval, perplexity, throughput, rewards) as a table or charts.
    Report(report::Args),
    /// Validate or print a recipe.
    Recipe(recipe::Args),
    /// Loss and perplexity of a model on a dataset.
    Eval(eval::Args),
    /// Fold a LoRA adapter into its base model.
    Fuse(fuse::Args),
    /// Run one forward pass over token ids and print the most likely next tokens.
    Forward(forward::Args),
    /// Generate text from a prompt, streaming tokens to stdout.
    Generate(generate::Args),
    /// Write a model as a GGUF file (llama.cpp, Ollama) or an MLX-quantised directory.
    Export(export::Args),
    /// Describe a model directory or a GGUF file.
    Inspect(inspect::Args),
    /// Measure prefill and decode speed.
    Bench(bench::Args),
    /// Predict a recipe's peak training memory and speed on a device; say whether it fits.
    Plan(plan::Args),
}

/// Where the model runs; shared by every subcommand that computes.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArg {
    /// cpu, wgpu (Vulkan/Metal/DX12; wgpu:cpu for a software adapter), cuda[:N] or rocm[:N].
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceSpec,
}

/// A model directory and an optional adapter on top; shared by the commands that run a model.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// Hugging Face model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// A PEFT adapter directory to apply on top of the model.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// Quantise the projections at load time and run them on the quantised kernels:
    /// q4_g32, q4_g64, q4_g128, q8_g32, q8_g64, q8_g128, gguf:q8_0, gguf:q4_0 or gguf:q4_k.
    #[arg(long, value_parser = parse_quantize)]
    pub quantize: Option<QuantSpec>,
}

impl ModelArgs {
    /// Checks the directory exists before a backend starts.
    pub fn check(&self) -> anyhow::Result<()> {
        model_dir(&self.model).map(|_| ())
    }

    pub fn load<B: crate::backend::QuantMatmul>(&self, device: &B::Device) -> anyhow::Result<crate::model::Model<B>> {
        load_model(&self.model, self.adapter.as_deref(), self.quantize, device)
    }
}

fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    s.parse::<DeviceSpec>().map_err(|e| e.to_string())
}

pub fn parse_quantize(s: &str) -> Result<QuantSpec, String> {
    QuantSpec::parse(s).ok_or_else(|| format!("unknown quantisation `{s}`: expected one of {}", QuantSpec::NAMES))
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train(args) => train::run(args),
        Command::Watch(args) => watch::run(args),
        Command::Report(args) => report::run(args),
        Command::Recipe(args) => recipe::run(args),
        Command::Eval(args) => eval::run(args),
        Command::Fuse(args) => fuse::run(args),
        Command::Forward(args) => forward::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Export(args) => export::run(args),
        Command::Plan(args) => plan::run(args),
        Command::Inspect(args) => inspect::run(args),
        Command::Bench(args) => bench::run(args),
    }
}

/// Checks that a model directory exists before a backend starts, so the message is about
/// the path and not about a tensor.
pub fn model_dir(path: &PathBuf) -> anyhow::Result<&PathBuf> {
    if !path.is_dir() {
        anyhow::bail!("{}: not a model directory (expected config.json and model.safetensors in it)", path.display());
    }
    Ok(path)
}

/// Loads a model directory (quantised if asked) and, when given, a PEFT adapter on top.
pub fn load_model<B: crate::backend::QuantMatmul>(dir: &std::path::Path, adapter: Option<&std::path::Path>, quantize: Option<QuantSpec>, device: &B::Device) -> anyhow::Result<crate::model::Model<B>> {
    use anyhow::Context;
    // A QLoRA adapter was trained over one quantised base; it runs and fuses over that one.
    let recorded = match adapter {
        Some(a) => crate::lora::peft::base_quantization(a)?,
        None => None,
    };
    let quantize = match (quantize, recorded) {
        (Some(asked), Some(trained)) if asked != trained => {
            eprintln!("warning: the adapter was trained over a {trained} base; running it over {asked} as asked");
            Some(asked)
        }
        (None, Some(trained)) => {
            eprintln!("the adapter was trained over a {trained} base (QLoRA): loading the base quantised the same way");
            Some(trained)
        }
        (asked, _) => asked,
    };
    let model = crate::model::Model::<B>::load_quantized(dir, quantize, device).with_context(|| format!("loading {}", dir.display()))?;
    match adapter {
        Some(a) => {
            let (model, _) = crate::lora::peft::load(model, a).with_context(|| format!("loading adapter {}", a.display()))?;
            Ok(model)
        }
        None => Ok(model),
    }
}
