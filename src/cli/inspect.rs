//! `kiln inspect`: what a model directory holds.

use std::path::PathBuf;

use anyhow::Context;
use serde_json::json;

use crate::model::weights::WeightFiles;
use crate::model::ModelConfig;
use crate::tokenizer::Tokenizer;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A Hugging Face model directory or a .gguf file.
    path: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let dir = &args.path;
    if dir.is_file() && dir.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        return inspect_gguf(dir, args.json);
    }
    if !dir.is_dir() {
        anyhow::bail!("{}: not a directory (kiln inspect takes a Hugging Face model directory or a .gguf file)", dir.display());
    }
    let cfg = ModelConfig::from_dir(dir)?;
    let files = WeightFiles::open(dir).with_context(|| format!("reading weights of {}", dir.display()))?;
    let params: usize = files.names().filter_map(|n| files.shape(n)).map(|s| s.iter().product::<usize>()).sum();
    let stored_dtype = files.main_dtype().unwrap_or_else(|| cfg.dtype.clone());
    let tokenizer = Tokenizer::load(dir).ok();
    let chat_template = tokenizer.as_ref().is_some_and(|t| t.chat_template.is_some());
    let sliding = cfg.layers.iter().filter(|l| l.sliding_window.is_some()).count();
    let info = json!({
        "path": dir.display().to_string(),
        "architecture": cfg.arch.name(),
        "model_type": cfg.model_type,
        "parameters": params,
        "dtype": stored_dtype,
        "config_dtype": cfg.dtype,
        "layers": cfg.num_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "attention_heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings,
        "tied_embeddings": cfg.tie_word_embeddings,
        "sliding_window_layers": sliding,
        "rope_theta": cfg.ropes.iter().map(|r| r.theta).collect::<Vec<_>>(),
        "eos_token_ids": cfg.eos_token_ids,
        "tokenizer": tokenizer.is_some(),
        "chat_template": chat_template,
        "experts": cfg.moe.as_ref().map(|m| json!({"count": m.num_experts, "per_token": m.top_k, "width": m.width, "moe_layers": cfg.layers.iter().filter(|l| l.moe).count()})),
        "full_attention_head_dim": cfg.layers.iter().find(|l| l.sliding_window.is_none()).map(|l| l.head_dim),
        "kv_shared_layers": cfg.layers.iter().filter(|l| l.kv_source.is_some()).count(),
        "per_layer_input_dim": cfg.per_layer_input.as_ref().map(|p| p.dim),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!("{}", dir.display());
    println!("  architecture     {} ({})", cfg.arch.name(), cfg.model_type);
    println!("  parameters       {} ({})", human_count(params), params);
    println!("  dtype            {stored_dtype}");
    println!("  layers           {}{}", cfg.num_layers, if sliding > 0 { format!(" ({sliding} sliding-window)") } else { String::new() });
    println!("  hidden / mlp     {} / {}", cfg.hidden_size, cfg.intermediate_size);
    println!("  heads            {} query, {} key/value, head_dim {}", cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
    // Layers that differ from the first: Gemma 4's full-attention geometry and KV sharing.
    let differ: Vec<String> = cfg
        .layers
        .iter()
        .enumerate()
        .filter(|(_, l)| l.head_dim != cfg.head_dim || l.num_kv_heads != cfg.num_kv_heads || l.kv_source.is_some())
        .map(|(i, l)| {
            let shared = l.kv_source.map(|j| format!(", keys/values of layer {j}")).unwrap_or_default();
            format!("{i}: head_dim {}, {} key/value{shared}", l.head_dim, l.num_kv_heads)
        })
        .collect();
    if !differ.is_empty() {
        println!("  layers differing {}", differ.join("; "));
    }
    if let Some(m) = &cfg.moe {
        let n = cfg.layers.iter().filter(|l| l.moe).count();
        println!("  experts          {} per layer, {} per token, width {} ({n} MoE layers)", m.num_experts, m.top_k, m.width);
    }
    if let Some(p) = &cfg.per_layer_input {
        println!("  per-layer input  {} per layer (vocab {})", p.dim, p.vocab);
    }
    println!("  vocab            {}", cfg.vocab_size);
    println!("  context length   {}", cfg.max_position_embeddings);
    println!("  tied embeddings  {}", if cfg.tie_word_embeddings { "yes" } else { "no" });
    println!("  tokenizer        {}", if tokenizer.is_some() { "tokenizer.json" } else { "missing" });
    println!("  chat template    {}", if chat_template { "yes" } else { "no" });
    Ok(())
}

pub fn human_count(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.2}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}K", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// Metadata and tensors of a GGUF file.
fn inspect_gguf(path: &std::path::Path, json_out: bool) -> anyhow::Result<()> {
    let file = crate::gguf::GgufFile::open(path)?;
    let params: u64 = file.tensors.iter().map(|t| t.elements()).sum();
    if json_out {
        let metadata: serde_json::Map<String, serde_json::Value> = file.metadata.iter().map(|(k, v)| (k.clone(), v.to_json(false))).collect();
        let tensors: Vec<serde_json::Value> = file
            .tensors
            .iter()
            .map(|t| json!({"name": t.name, "type": t.ty.name(), "dims": t.dims, "offset": t.offset, "bytes": t.byte_len()}))
            .collect();
        let info = json!({
            "path": path.display().to_string(),
            "version": file.version,
            "alignment": file.alignment,
            "parameters": params,
            "metadata": metadata,
            "tensors": tensors,
        });
        println!("{}", serde_json::to_string(&info)?);
        return Ok(());
    }
    println!("{}  (GGUF v{}, {} tensors, {} parameters)", path.display(), file.version, file.tensors.len(), human_count(params as usize));
    println!("metadata:");
    let width = file.metadata.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (key, value) in &file.metadata {
        println!("  {key:<width$}  {}", value.short());
    }
    println!("tensors:");
    let width = file.tensors.iter().map(|t| t.name.len()).max().unwrap_or(0);
    for t in &file.tensors {
        let dims: Vec<String> = t.dims.iter().map(u64::to_string).collect();
        println!("  {:<width$}  {:<5}  [{}]", t.name, t.ty.name(), dims.join(", "));
    }
    Ok(())
}
