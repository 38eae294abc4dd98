//! `kiln export gguf|mlx`: a model directory (optionally with an adapter fused on the fly) as
//! a GGUF file for llama.cpp / Ollama, or as an MLX-quantised directory for mlx-lm.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::Context;

use super::{model_dir, ModelArgs};
use crate::backend::Cpu;
use crate::gguf::{self, Export, FileType};
use crate::lora;
use crate::model::save::hf_tensors;
use crate::model::weights::{TensorSource, WeightFiles};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    format: Format,
}

#[derive(Debug, clap::Subcommand)]
enum Format {
    /// A GGUF file that llama.cpp and Ollama load.
    Gguf(GgufArgs),
    /// An MLX directory with affine-quantised weights (mlx-lm's format).
    Mlx(MlxArgs),
}

#[derive(Debug, clap::Args)]
struct GgufArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, q4_k_s, q4_k_m or q5_k_m.
    #[arg(long = "type", value_parser = parse_file_type)]
    file_type: FileType,
    #[arg(long)]
    out: PathBuf,
    /// Also write an Ollama Modelfile beside the GGUF file.
    #[arg(long)]
    modelfile: bool,
    /// `general.name` in the file (default: the model directory's name).
    #[arg(long)]
    name: Option<String>,
    /// Replace `--out` if it exists.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, clap::Args)]
struct MlxArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Bits per weight: 4 or 8.
    #[arg(long, default_value_t = 4)]
    bits: u32,
    /// Weights per scale and bias: 32, 64 or 128.
    #[arg(long, default_value_t = 64)]
    group_size: usize,
    #[arg(long)]
    out: PathBuf,
    /// Replace `--out` if it exists.
    #[arg(long)]
    force: bool,
}

fn parse_file_type(s: &str) -> Result<FileType, String> {
    FileType::parse(s).ok_or_else(|| {
        let all: Vec<&str> = FileType::ALL.iter().map(|t| t.name()).collect();
        format!("unknown GGUF type `{s}`; expected one of {}", all.join(", "))
    })
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.format {
        Format::Gguf(a) => gguf(a),
        Format::Mlx(a) => mlx(a),
    }
}

fn refuse_overwrite(out: &Path, force: bool) -> anyhow::Result<()> {
    if out.exists() && !force {
        anyhow::bail!("{} exists; pass --force to replace it", out.display());
    }
    Ok(())
}

/// The checkpoint's tensors, or with an adapter the fused ones (fused on the CPU: a few
/// matrix products per layer, exact on any machine).
fn weights(model: &ModelArgs) -> anyhow::Result<TensorSource> {
    match &model.adapter {
        None => Ok(TensorSource::Files(WeightFiles::open(&model.model).with_context(|| format!("reading {}", model.model.display()))?)),
        Some(adapter) => {
            let device = Default::default();
            let loaded = super::load_model::<Cpu>(&model.model, Some(adapter), &device)?;
            eprintln!("fusing {} into {}", adapter.display(), model.model.display());
            Ok(TensorSource::from_tensors(hf_tensors(&lora::fuse(loaded))))
        }
    }
}

fn gguf(args: GgufArgs) -> anyhow::Result<()> {
    model_dir(&args.model.model)?;
    refuse_overwrite(&args.out, args.force)?;
    let modelfile_path = args.out.with_file_name("Modelfile");
    if args.modelfile {
        refuse_overwrite(&modelfile_path, args.force)?;
    }
    let export = Export::plan(&args.model.model, weights(&args.model)?, args.file_type, args.name.clone())?;
    for f in export.fallbacks() {
        eprintln!(
            "note: {} has rows of {} values, not a multiple of 256: {} instead of {} (as llama.cpp does)",
            f.tensor,
            f.row,
            f.got.name(),
            f.wanted.name()
        );
    }
    let total = export.data_bytes();
    let progress = Progress::new(total, "writing");
    let started = std::time::Instant::now();
    export.write(&args.out, |done, name| progress.set(done, name))?;
    progress.finish();
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "wrote {} ({}, {} tensors, {:.1} MB) in {secs:.1}s",
        args.out.display(),
        args.file_type.name(),
        export.tensor_plan().len(),
        total as f64 / 1e6
    );
    if args.modelfile {
        let name = args.out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let text = gguf::modelfile(&name, &stop_strings(&export));
        crate::fsutil::write_atomic(&modelfile_path, text.as_bytes()).with_context(|| format!("writing {}", modelfile_path.display()))?;
        eprintln!("wrote {}", modelfile_path.display());
    }
    Ok(())
}

/// The texts of the end-of-turn and end-of-text tokens in the planned metadata.
fn stop_strings(export: &Export) -> Vec<String> {
    let get = |key: &str| export.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v);
    let Some(gguf::Value::Array(_, tokens)) = get("tokenizer.ggml.tokens") else { return Vec::new() };
    let mut stops: Vec<String> = Vec::new();
    for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eos_token_id"] {
        if let Some(text) = get(key).and_then(|v| v.as_u64()).and_then(|id| tokens.get(id as usize)).and_then(|t| t.as_str())
            && !stops.iter().any(|s| s == text)
        {
            stops.push(text.to_string());
        }
    }
    stops
}

fn mlx(args: MlxArgs) -> anyhow::Result<()> {
    model_dir(&args.model.model)?;
    refuse_overwrite(&args.out, args.force)?;
    let source = weights(&args.model)?;
    let summary = crate::model::mlx::save_quantized(&args.model.model, &source, args.bits, args.group_size, &args.out)?;
    eprintln!(
        "wrote {} (MLX affine q{} group {}: {} of {} weight matrices quantised, {:.1} MB)",
        args.out.display(),
        args.bits,
        args.group_size,
        summary.quantized,
        summary.matrices,
        summary.bytes as f64 / 1e6
    );
    Ok(())
}

/// An indicatif bar over bytes on a terminal; a line every ~10 % otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    last_tenth: std::cell::Cell<u64>,
}

impl Progress {
    fn new(total: u64, what: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:30} {bytes}/{total_bytes} {bytes_per_sec} {msg} [{elapsed_precise} < {eta_precise}]")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_message(what.to_string());
            bar
        });
        Self { bar, total: total.max(1), last_tenth: std::cell::Cell::new(0) }
    }

    fn set(&self, done: u64, name: &str) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(done);
                bar.set_message(name.to_string());
            }
            None => {
                let tenth = done * 10 / self.total;
                if tenth > self.last_tenth.get() {
                    self.last_tenth.set(tenth);
                    eprintln!("{:>3}%  {name}", tenth * 10);
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
