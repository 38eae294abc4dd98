//! `kiln watch RUN_DIR`: the dashboard over a run directory, live or finished.

use std::path::PathBuf;

use anyhow::Context;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The run directory (RUN/events.jsonl is followed as it grows).
    run_dir: PathBuf,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if !args.run_dir.is_dir() {
        anyhow::bail!("{}: not a run directory (`kiln train` creates it: output_dir/name)", args.run_dir.display());
    }
    crate::tui::watch(&args.run_dir, &|| false).with_context(|| format!("watching {}", args.run_dir.display()))
}
