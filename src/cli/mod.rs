//! The `kiln` command line: argument parsing and one module per subcommand, each turning its
//! arguments into library calls. Errors travel as `anyhow` with context; `main.rs` prints them
//! once and picks the exit code.

mod bench;
mod forward;
mod generate;
mod inspect;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::backend::DeviceSpec;

#[derive(Debug, Parser)]
#[command(name = "kiln", version, about = "Fine-tune open-weight language models", propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run one forward pass over token ids and print the most likely next tokens.
    Forward(forward::Args),
    /// Generate text from a prompt, streaming tokens to stdout.
    Generate(generate::Args),
    /// Describe a model directory.
    Inspect(inspect::Args),
    /// Measure prefill and decode speed.
    Bench(bench::Args),
}

/// Where the model runs; shared by every subcommand that computes.
#[derive(Debug, Clone, clap::Args)]
pub struct DeviceArg {
    /// cpu, wgpu (Vulkan/Metal/DX12; wgpu:cpu for a software adapter), cuda[:N] or rocm[:N].
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceSpec,
}

fn parse_device(s: &str) -> Result<DeviceSpec, String> {
    s.parse::<DeviceSpec>().map_err(|e| e.to_string())
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Forward(args) => forward::run(args),
        Command::Generate(args) => generate::run(args),
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
