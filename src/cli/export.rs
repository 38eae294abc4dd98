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
    FileType::parse(s).ok_or_else(|| format!("unknown GGUF type: {}", FileType::explain_unknown(s)))
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
    if model.quantize.is_some() && model.adapter.is_none() {
        anyhow::bail!("--quantize sets the base a QLoRA adapter is fused into; without --adapter it has nothing to do (the export's own format is --type for GGUF, --bits/--group-size for MLX)");
    }
    match &model.adapter {
        None => Ok(TensorSource::Files(WeightFiles::open(&model.model).with_context(|| format!("reading {}", model.model.display()))?)),
        Some(adapter) => {
            let device = Default::default();
            let loaded = super::load_model::<Cpu>(&model.model, Some(adapter), model.quantize, &device)?;
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
        let text = gguf::modelfile(&name, &export.stop_strings(), export.chat_template());
        crate::fsutil::write_atomic(&modelfile_path, text.as_bytes()).with_context(|| format!("writing {}", modelfile_path.display()))?;
        eprintln!("wrote {}", modelfile_path.display());
    }
    Ok(())
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

/// `kiln bench export`: seconds and MB/s (of source weights, as stored) per GGUF type, and the
/// same for llama.cpp's `llama_model_quantize` on kiln's F32 export of the model when
/// llama-cpp-python is installed (llama.cpp quantises from a GGUF, not from safetensors).
pub fn bench(model: Option<&Path>, types: &[String], json_out: bool) -> anyhow::Result<()> {
    let types = types.iter().map(|t| parse_file_type(t).map_err(anyhow::Error::msg)).collect::<anyhow::Result<Vec<_>>>()?;
    let scratch = tempfile::tempdir()?;
    let model = match model {
        Some(m) => model_dir(&m.to_path_buf())?.clone(),
        None => {
            eprintln!("creating a random Qwen3-0.6B-shaped model (bf16) ...");
            random_qwen3_0_6b(&scratch.path().join("model"))?
        }
    };
    let files = WeightFiles::open(&model)?;
    let source_bytes: u64 = files.names().filter_map(|n| files.raw_bytes(n)).map(|b| b.len() as u64).sum();
    let params: u64 = files.names().filter_map(|n| files.shape(n)).map(|s| s.iter().product::<usize>() as u64).sum();
    drop(files);
    let threads = rayon::current_num_threads();
    let mut rows = Vec::new();
    for ty in &types {
        let out = scratch.path().join(format!("kiln-{}.gguf", ty.name()));
        let started = std::time::Instant::now();
        let export = Export::plan(&model, TensorSource::Files(WeightFiles::open(&model)?), *ty, None)?;
        export.write(&out, |_, _| {})?;
        let secs = started.elapsed().as_secs_f64();
        let out_bytes = std::fs::metadata(&out)?.len();
        rows.push(serde_json::json!({"tool": "kiln", "type": ty.name(), "seconds": secs, "mb_per_s": source_bytes as f64 / 1e6 / secs, "out_mb": out_bytes as f64 / 1e6}));
    }
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("bench/llama_quantize.py");
    let has_llama_cpp = std::process::Command::new("python3").args(["-c", "import llama_cpp"]).output().is_ok_and(|o| o.status.success());
    if has_llama_cpp && script.exists() {
        // llama.cpp quantises from a GGUF; F32 holds bf16 weights exactly (F16 would round the
        // smallest ones), so both tools see the same values.
        let f16 = scratch.path().join("f32.gguf");
        Export::plan(&model, TensorSource::Files(WeightFiles::open(&model)?), FileType::F32, None)?.write(&f16, |_, _| {})?;
        for ty in &types {
            let out = scratch.path().join(format!("llama-{}.gguf", ty.name()));
            let r = std::process::Command::new("python3").arg(&script).arg(&f16).arg(&out).arg(ty.name()).arg(threads.to_string()).output()?;
            if !r.status.success() {
                anyhow::bail!("llama_quantize.py failed: {}", String::from_utf8_lossy(&r.stderr));
            }
            let secs: f64 = String::from_utf8_lossy(&r.stdout).trim().parse().context("llama_quantize.py printed no time")?;
            // Same input values (bf16 → f16 is exact), so every tensor should be byte-identical.
            let (ours, theirs) = (crate::gguf::GgufFile::open(&scratch.path().join(format!("kiln-{}.gguf", ty.name())))?, crate::gguf::GgufFile::open(&out)?);
            let identical = ours.tensors.iter().filter(|t| theirs.tensor(&t.name).is_some_and(|u| u.ty == t.ty && theirs.tensor_bytes(u) == ours.tensor_bytes(t))).count();
            rows.push(serde_json::json!({"tool": "llama.cpp", "type": ty.name(), "seconds": secs, "mb_per_s": source_bytes as f64 / 1e6 / secs, "out_mb": std::fs::metadata(&out)?.len() as f64 / 1e6,
                "tensors_byte_identical_to_kiln": format!("{identical}/{}", ours.tensors.len())}));
            std::fs::remove_file(&out)?;
        }
    } else {
        eprintln!("llama-cpp-python not installed: no llama.cpp reference in this run");
    }
    if json_out {
        println!("{}", serde_json::json!({"model": model.display().to_string(), "parameters": params, "source_mb": source_bytes as f64 / 1e6, "threads": threads, "results": rows}));
        return Ok(());
    }
    println!("{} ({} parameters, {:.0} MB as stored), {threads} threads", model.display(), crate::cli::inspect::human_count(params as usize), source_bytes as f64 / 1e6);
    for r in &rows {
        let same = r["tensors_byte_identical_to_kiln"].as_str().map(|s| format!("  ({s} tensors byte-identical to kiln's)")).unwrap_or_default();
        println!(
            "  {:<10} {:<7} {:>7.2} s  {:>7.1} MB/s  -> {:.0} MB{same}",
            r["tool"].as_str().unwrap_or(""),
            r["type"].as_str().unwrap_or(""),
            r["seconds"].as_f64().unwrap_or(0.0),
            r["mb_per_s"].as_f64().unwrap_or(0.0),
            r["out_mb"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(())
}

/// A Qwen3-0.6B geometry (hidden 1024, 28 layers, 16/8 heads of 128, MLP 3072, vocab 151936,
/// tied) with random bf16 weights and a byte-level tokenizer stub large enough to name
/// every row, so the export runs the same path as for a real checkpoint.
pub(super) fn random_qwen3_0_6b(dir: &Path) -> anyhow::Result<PathBuf> {
    use rand::{Rng, SeedableRng};
    use safetensors::Dtype;

    use crate::model::weights::{save_raw, RawTensor};
    let (h, layers, heads, kv, hd, ff, vocab) = (1024usize, 28usize, 16usize, 8usize, 128usize, 3072usize, 151936usize);
    std::fs::create_dir_all(dir)?;
    let config = serde_json::json!({
        "model_type": "qwen3", "vocab_size": vocab, "hidden_size": h, "intermediate_size": ff,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": hd,
        "rms_norm_eps": 1e-6, "max_position_embeddings": 40960, "tie_word_embeddings": true, "rope_theta": 1e6,
        "eos_token_id": 0, "dtype": "bfloat16"
    });
    std::fs::write(dir.join("config.json"), config.to_string())?;
    // A GPT-2 style byte-level vocabulary of distinct made-up tokens, one per embedding row.
    let tokens: serde_json::Map<String, serde_json::Value> = (0..vocab).map(|i| (format!("t{i}"), serde_json::json!(i))).collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null, "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "vocab": tokens, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string())?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let mut tensor = |name: String, shape: Vec<usize>, std: f32| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if std == 0.0 { vec![1.0; n] } else { (0..n).map(|_| (rng.random::<f32>() - 0.5) * std * 3.46).collect() };
        RawTensor::from_f32(name, shape, &data, Dtype::BF16)
    };
    let mut all = vec![tensor("model.embed_tokens.weight".into(), vec![vocab, h], 0.02), tensor("model.norm.weight".into(), vec![h], 0.0)];
    for i in 0..layers {
        let p = format!("model.layers.{i}");
        for (name, shape) in [
            ("self_attn.q_proj.weight", vec![heads * hd, h]),
            ("self_attn.k_proj.weight", vec![kv * hd, h]),
            ("self_attn.v_proj.weight", vec![kv * hd, h]),
            ("self_attn.o_proj.weight", vec![h, heads * hd]),
            ("mlp.gate_proj.weight", vec![ff, h]),
            ("mlp.up_proj.weight", vec![ff, h]),
            ("mlp.down_proj.weight", vec![h, ff]),
        ] {
            all.push(tensor(format!("{p}.{name}"), shape, 0.02));
        }
        for (name, n) in [("input_layernorm.weight", h), ("post_attention_layernorm.weight", h), ("self_attn.q_norm.weight", hd), ("self_attn.k_norm.weight", hd)] {
            all.push(tensor(format!("{p}.{name}"), vec![n], 0.0));
        }
    }
    save_raw(&dir.join("model.safetensors"), &all, None)?;
    Ok(dir.to_path_buf())
}
