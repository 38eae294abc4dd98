//! `kiln plan RECIPE`: the predicted peak memory and speed class of the recipe's training step
//! on a device, whether it fits, and what would fit if not.

use std::path::PathBuf;

use crate::backend::DeviceSpec;
use crate::recipe::Recipe;
use crate::train::plan::{plan, recipe_geometry};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The recipe to plan.
    recipe: PathBuf,
    /// The device to plan for (the recipe's `run.device` when left out).
    #[arg(long, value_parser = super::parse_device)]
    device: Option<DeviceSpec>,
    /// The device memory to fit into, in GiB (default: read from the CUDA driver, or the host's
    /// memory for the CPU; needed for wgpu).
    #[arg(long)]
    memory_gib: Option<f64>,
    /// Print the plan as one JSON line.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let recipe = Recipe::load(&args.recipe)?;
    let device = match args.device {
        Some(d) => d,
        None => recipe.run.device.parse()?,
    };
    let capacity = match args.memory_gib {
        Some(g) if g > 0.0 => Some((g * (1u64 << 30) as f64) as u64),
        Some(g) => anyhow::bail!("--memory-gib must be positive, got {g}"),
        None => device_capacity(device),
    };
    let geom = recipe_geometry(&recipe)?;
    let p = plan(&recipe, &geom, device, capacity);
    if args.json {
        println!("{}", serde_json::to_string(&p)?);
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    println!("plan    {} ({}), batch {} × {} tokens on {}", p.recipe, p.method, p.batch_size, p.seq_len, p.device);
    println!("  parameters   {:>12} ({} trainable)", p.params, p.trainable_params);
    for (what, b) in [("weights", p.weights_bytes), ("gradients", p.gradients_bytes), ("optimizer", p.optimizer_bytes), ("activations", p.activations_bytes), ("backward", p.backward_bytes), ("logits", p.logits_bytes)] {
        println!("  {what:<12} {:>9.2} GiB", gib(b));
    }
    let verdict = match (p.fits, p.capacity_bytes) {
        (Some(true), Some(c)) => format!("fits in {:.1} GiB", gib(c)),
        (Some(false), Some(c)) => format!("does NOT fit in {:.1} GiB", gib(c)),
        _ => "device memory unknown (pass --memory-gib)".to_string(),
    };
    println!("  tensors      {:>9.2} GiB  at the peak", gib(p.live_bytes));
    let pool = if p.peak_bytes != p.live_bytes { format!(" (the GPU allocator's pool: tensors × {:.2}, measured)", crate::train::plan::pool_factor(device)) } else { String::new() };
    println!("  peak         {:>9.2} GiB  {verdict}{pool}", gib(p.peak_bytes));
    println!("  speed        {} ({:.2} GFLOP per token)", p.tokens_per_s_class, p.flops_per_token / 1e9);
    for s in &p.suggestions {
        println!("  would fit:   {s}");
    }
    Ok(())
}

/// Total memory of the device: the CUDA driver's figure, the host's for the CPU.
fn device_capacity(device: DeviceSpec) -> Option<u64> {
    match device {
        DeviceSpec::Cpu => {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            let kb: u64 = info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.trim().trim_end_matches("kB").trim().parse().ok()?;
            Some(kb * 1024)
        }
        #[cfg(feature = "cuda")]
        DeviceSpec::Cuda(i) => {
            device.check().ok()?;
            kiln_kernels::cuda_total_memory(i)
        }
        _ => None,
    }
}
