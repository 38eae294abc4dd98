//! `kiln report RUN_DIR... [--format md|json|csv|parquet] [--plot FILE]`.

use std::path::PathBuf;

use anyhow::Context;

use crate::report::{self, Run};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Md,
    Json,
    Csv,
    Parquet,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// One or more run directories; several are compared side by side.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "md")]
    format: Format,
    /// Where `--format parquet` writes (default: report.parquet in the current directory).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Also draw loss, eval perplexity and rewards to this PNG or SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let runs = args.runs.iter().map(|d| Run::load(d).with_context(|| format!("reading {}", d.display()))).collect::<anyhow::Result<Vec<_>>>()?;
    for run in &runs {
        for m in &run.skipped {
            eprintln!("note: {}: skipped {m}", run.dir.display());
        }
    }
    let rows = runs.iter().map(report::summarize).collect::<Result<Vec<_>, _>>()?;
    if let Some(path) = &args.plot {
        report::plot(&runs, path)?;
        eprintln!("charts written to {}", path.display());
    }
    match args.format {
        Format::Md => print!("{}", report::markdown(&rows)),
        Format::Csv => print!("{}", report::csv(&rows)?),
        Format::Json => {
            let value = match rows.as_slice() {
                [one] => one.to_json(),
                many => serde_json::Value::Array(many.iter().map(|r| r.to_json()).collect()),
            };
            println!("{value}");
        }
        Format::Parquet => {
            let out = args.out.clone().unwrap_or_else(|| PathBuf::from("report.parquet"));
            report::write_parquet(&rows, &out)?;
            eprintln!("{} run(s) written to {}", rows.len(), out.display());
        }
    }
    Ok(())
}
