//! Adapters in PEFT's format: `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.model.layers.N.<self_attn|mlp>.<proj>.lora_A.weight` (`[r, in]`) and
//! `lora_B.weight` (`[out, r]`), so `peft.PeftModel.from_pretrained` loads what kiln saves and
//! kiln loads what PEFT saves.

use std::path::{Path, PathBuf};

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;
use serde_json::{json, Value};

use super::{projections, projections_mut, Lora, LoraSpec, TARGETS};
use crate::model::layers::transpose_host;
use crate::model::weights::{save_f32, WeightFiles};
use crate::model::{Model, ModelError};
use crate::quant::affine::QuantSpec;

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: this adapter uses {feature}, which kiln does not support")]
    Unsupported { path: PathBuf, feature: String },
    #[error(transparent)]
    Weights(#[from] ModelError),
    #[error("{path}: the adapter holds no LoRA weights for this model (is it for a different architecture?)")]
    Empty { path: PathBuf },
}

fn module_path(layer: usize, path: &str) -> String {
    format!("base_model.model.model.layers.{layer}.{path}")
}

/// Writes the model's adapters to `dir` in PEFT format (files written atomically).
/// `base_quantization` is the quantisation the base was trained under (QLoRA); it is recorded
/// in `kiln_adapter.json` so that fusing and exporting use the same dequantised base.
pub fn save<B: Backend>(model: &Model<B>, spec: &LoraSpec, base_model: &str, base_quantization: Option<QuantSpec>, dir: &Path) -> Result<(), AdapterError> {
    let mut tensors = Vec::new();
    let mut targets: Vec<String> = Vec::new();
    for i in 0..model.layers.len() {
        for (path, linear) in projections(model, i) {
            let Some(lora) = &linear.lora else { continue };
            let name = super::proj_name(&path);
            if !targets.iter().any(|t| t == name) {
                targets.push(name.to_string());
            }
            let key = module_path(i, &path);
            let a = lora.a.val().transpose(); // [in, r] -> [r, in]
            let b = lora.b.val().transpose(); // [r, out] -> [out, r]
            tensors.push((format!("{key}.lora_A.weight"), a.dims().to_vec(), to_vec(a)));
            tensors.push((format!("{key}.lora_B.weight"), b.dims().to_vec(), to_vec(b)));
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| AdapterError::Io { path: dir.to_path_buf(), source })?;
    save_f32(&dir.join("adapter_model.safetensors"), &tensors)?;
    let layers: Value = match spec.layers {
        Some((a, b)) => json!((a..b).collect::<Vec<_>>()),
        None => Value::Null,
    };
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_rslora": spec.rslora,
        "target_modules": targets,
        "layers_to_transform": layers,
        "bias": "none",
        "fan_in_fan_out": false,
        "init_lora_weights": true,
        "inference_mode": true,
        "modules_to_save": null,
        "use_dora": false,
        "revision": null,
    });
    let path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&config).unwrap_or_default();
    crate::fsutil::write_atomic(&path, text.as_bytes()).map_err(|source| AdapterError::Io { path, source })?;
    // PEFT's config has no field for this, and PEFT refuses keys it does not know: a side file.
    let path = dir.join(KILN_SIDE_FILE);
    match base_quantization {
        Some(q) => {
            let text = serde_json::to_string_pretty(&json!({ "base_quantization": q.to_string() })).unwrap_or_default();
            crate::fsutil::write_atomic(&path, text.as_bytes()).map_err(|source| AdapterError::Io { path, source })
        }
        None if path.exists() => std::fs::remove_file(&path).map_err(|source| AdapterError::Io { path, source }),
        None => Ok(()),
    }
}

/// What kiln records beside a PEFT adapter.
const KILN_SIDE_FILE: &str = "kiln_adapter.json";

/// The quantisation the adapter's base was trained under, if it was a QLoRA adapter.
pub fn base_quantization(dir: &Path) -> Result<Option<QuantSpec>, AdapterError> {
    let path = dir.join(KILN_SIDE_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|source| AdapterError::Io { path: path.clone(), source })?;
    let value: Value = serde_json::from_str(&text).map_err(|e| AdapterError::Config { path: path.clone(), message: e.to_string() })?;
    match value.get("base_quantization") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => QuantSpec::parse(s)
            .map(Some)
            .ok_or_else(|| AdapterError::Config { path, message: format!("base_quantization: unknown quantisation {s:?} (expected one of {})", QuantSpec::NAMES) }),
        Some(other) => Err(AdapterError::Config { path, message: format!("base_quantization: expected a string such as \"q4_g64\", found {other}") }),
    }
}

fn to_vec<B: Backend>(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap_or_default()
}

/// Reads `adapter_config.json` into a [`LoraSpec`].
pub fn read_spec(dir: &Path) -> Result<LoraSpec, AdapterError> {
    let path = dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| AdapterError::Io { path: path.clone(), source })?;
    let cfg: Value = serde_json::from_str(&text).map_err(|e| AdapterError::Config { path: path.clone(), message: e.to_string() })?;
    let bad = |message: &str| AdapterError::Config { path: path.clone(), message: message.to_string() };
    if cfg.get("peft_type").and_then(Value::as_str).is_some_and(|t| t != "LORA") {
        return Err(AdapterError::Unsupported { path, feature: format!("peft_type {}", cfg["peft_type"]) });
    }
    for (key, feature) in [("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out")] {
        if cfg.get(key).and_then(Value::as_bool) == Some(true) {
            return Err(AdapterError::Unsupported { path, feature: feature.into() });
        }
    }
    if cfg.get("bias").and_then(Value::as_str).is_some_and(|b| b != "none") {
        return Err(AdapterError::Unsupported { path, feature: "trained biases".into() });
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if cfg.get(key).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
            return Err(AdapterError::Unsupported { path, feature: key.into() });
        }
    }
    let rank = match cfg.get("r") {
        None => return Err(bad("missing `r`")),
        Some(r) => r.as_u64().filter(|&r| r > 0).ok_or_else(|| bad(&format!("`r`: expected an integer > 0, found {r}")))? as usize,
    };
    // PEFT's defaults where a key is absent; a key of the wrong type is an error, not a default.
    let number = |key: &str, default: f64| match cfg.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_f64().ok_or_else(|| bad(&format!("`{key}`: expected a number, found {v}"))),
    };
    let alpha = number("lora_alpha", 8.0)?;
    let dropout = number("lora_dropout", 0.0)?;
    let rslora = match cfg.get("use_rslora") {
        None | Some(Value::Null) => false,
        Some(v) => v.as_bool().ok_or_else(|| bad(&format!("`use_rslora`: expected true or false, found {v}")))?,
    };
    let targets = match cfg.get("target_modules") {
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).map(String::from).collect(),
        Some(Value::String(s)) if s == "all-linear" => vec!["all-linear".to_string()],
        _ => TARGETS.iter().map(|s| s.to_string()).collect(),
    };
    Ok(LoraSpec {
        rank,
        alpha,
        dropout,
        rslora,
        targets,
        layers: None,
        experts: false,
    })
}

/// Loads a PEFT adapter from `dir` onto `model` (the base stays as it is; every layer that has
/// weights in the file gets an adapter).
pub fn load<B: Backend>(model: Model<B>, dir: &Path) -> Result<(Model<B>, LoraSpec), AdapterError> {
    let spec = read_spec(dir)?;
    let path = dir.join("adapter_model.safetensors");
    let files = WeightFiles::open_files(std::slice::from_ref(&path))?;
    let mut model = model;
    let device = model.embed_tokens.device();
    let mut attached = 0;
    let mut experts = false;
    for i in 0..model.layers.len() {
        for (path, linear) in projections_mut(&mut model, i) {
            let key = module_path(i, &path);
            let a_key = format!("{key}.lora_A.weight");
            if !files.contains(&a_key) {
                continue;
            }
            let (d_in, d_out) = (linear.d_in(), linear.d_out());
            let a = files.f32(&a_key, &[spec.rank, d_in])?;
            let b = files.f32(&format!("{key}.lora_B.weight"), &[d_out, spec.rank])?;
            // Transposed on the host so the device tensors are laid out for the matmul.
            let a = Tensor::<B, 2>::from_data(TensorData::new(transpose_host(&a, spec.rank, d_in), [d_in, spec.rank]), &device);
            let b = Tensor::<B, 2>::from_data(TensorData::new(transpose_host(&b, d_out, spec.rank), [spec.rank, d_out]), &device);
            linear.lora = Some(Lora { a: Param::from_tensor(a), b: Param::from_tensor(b), scale: spec.scale(), dropout: 0.0 });
            attached += 1;
            experts |= super::in_expert(&path);
        }
    }
    if attached == 0 {
        return Err(AdapterError::Empty { path });
    }
    Ok((model, LoraSpec { experts, ..spec }))
}
