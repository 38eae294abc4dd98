//! `kiln train RECIPE [--resume] [--max-steps N] [--tui]`: run a recipe, leaving a run
//! directory.
//!
//! Ctrl-C stops after the current step with a checkpoint, so `--resume` continues the run. With
//! `--tui` the trainer runs on a thread and the dashboard owns the terminal; quitting the
//! dashboard leaves the training running, with plain progress lines from then on.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;

use crate::backend::DeviceSpec;
use crate::recipe::Recipe;
use crate::run::{EventSink, ProgressSink};
use crate::train::{train, TrainOptions};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The recipe (TOML).
    recipe: PathBuf,
    /// Continue from the run's latest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Replace an existing run directory of the same name.
    #[arg(long, conflicts_with = "resume")]
    overwrite: bool,
    /// Stop after this many steps (with a checkpoint); the schedule stays that of the whole
    /// run, so `--resume` continues it.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Override the recipe's `run.device`.
    #[arg(long)]
    device: Option<String>,
    /// Plain tensor operations instead of the fused ones: the loss over the full logits, and
    /// attention that keeps its score matrix (to compare the two; uses far more memory).
    #[arg(long)]
    reference_ops: bool,
    /// Show the dashboard (as `kiln watch`) while training.
    #[arg(long)]
    tui: bool,
}

/// Progress lines, held back while the dashboard owns the terminal.
struct Muted {
    quiet: Arc<AtomicBool>,
    inner: ProgressSink,
}

impl EventSink for Muted {
    fn emit(&mut self, event: &crate::run::Event) {
        if !self.quiet.load(Ordering::Relaxed) {
            self.inner.emit(event);
        }
    }
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let recipe = Recipe::load(&args.recipe)?;
    let device_name = args.device.clone().unwrap_or_else(|| recipe.run.device.clone());
    let device: DeviceSpec = device_name.parse()?;
    device.check()?;
    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second Ctrl-C while the checkpoint is written falls through to the default
        // behaviour only after the handler is replaced; ignore errors (no terminal, tests).
        let _ = ctrlc::set_handler(move || {
            if stop.swap(true, Ordering::SeqCst) {
                std::process::exit(130);
            }
            eprintln!("\nstopping after this step (Ctrl-C again to abort without a checkpoint)");
        });
    }
    let options = TrainOptions { resume: args.resume, overwrite: args.overwrite, max_steps: args.max_steps, reference_ops: args.reference_ops };
    let quiet = Arc::new(AtomicBool::new(args.tui));
    let done = Arc::new(AtomicBool::new(false));
    let trainer = {
        let (recipe, quiet, done, stop) = (recipe.clone(), quiet.clone(), done.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut progress = Muted { quiet, inner: ProgressSink::new() };
            let outcome = crate::with_backend!(device, |B, dev| train::<burn::backend::Autodiff<B>>(&recipe, &options, &dev, &mut progress, &stop));
            done.store(true, Ordering::SeqCst);
            outcome
        })
    };
    if args.tui {
        let shown = crate::tui::watch(&recipe.run_dir(), &|| done.load(Ordering::SeqCst));
        quiet.store(false, Ordering::SeqCst);
        if let Err(e) = shown {
            eprintln!("the dashboard failed ({e}); training continues here");
        } else if !done.load(Ordering::SeqCst) {
            eprintln!("dashboard closed; training continues (Ctrl-C stops after the current step; `kiln watch {}` reopens the dashboard)", recipe.run_dir().display());
        }
    }
    let outcome = trainer
        .join()
        .map_err(|_| anyhow::anyhow!("the training thread panicked"))?
        .with_context(|| format!("training {}", args.recipe.display()))?;
    if let (Some(before), Some(after)) = (outcome.accuracy_before, outcome.accuracy_after) {
        eprintln!("exact match: {:.1}% before, {:.1}% after", before * 100.0, after * 100.0);
    }
    eprintln!("run directory: {}", outcome.run_dir.display());
    Ok(())
}
