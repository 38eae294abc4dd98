//! MLX checkpoints as mlx-lm writes them: every linear and embedding weight whose rows split
//! into whole groups is affine-quantised (`weight` as packed uint32, `scales`, `biases`);
//! everything else stays in the model's dtype; config.json gains a `quantization` block.

use std::collections::HashMap;
use std::path::Path;

use safetensors::Dtype;
use serde_json::{json, Value};

use super::save::{write_config_and_side_files, DirError};
use super::weights::{save_raw, RawTensor, TensorSource};
use super::ModelError;
use crate::quant::mlx;

/// What an MLX export did.
#[derive(Debug, Clone, Copy)]
pub struct MlxSummary {
    pub matrices: usize,
    pub quantized: usize,
    pub bytes: u64,
}

/// Whether mlx-lm would quantise this tensor: 2-D weights of linear and embedding layers
/// (norm weights are 1-D) whose rows split into whole groups.
fn quantizable(name: &str, shape: &[usize], group_size: usize) -> bool {
    shape.len() == 2 && name.ends_with(".weight") && !name.contains("norm") && shape[1] % group_size == 0
}

/// The dtype the model was saved in, which MLX keeps for scales, biases and unquantised
/// tensors.
fn model_dtype(config: &Value) -> Dtype {
    let name = config.get("dtype").or_else(|| config.get("torch_dtype")).and_then(Value::as_str).unwrap_or("float32");
    match name {
        "bfloat16" => Dtype::BF16,
        "float16" => Dtype::F16,
        _ => Dtype::F32,
    }
}

/// Writes the tensors of `source` as an MLX directory at `out` (atomically), with config and
/// tokenizer files from `model_dir`.
pub fn save_quantized(model_dir: &Path, source: &TensorSource, bits: u32, group_size: usize, out: &Path) -> Result<MlxSummary, ModelError> {
    if !matches!(bits, 4 | 8) {
        return Err(ModelError::InvalidConfigValue { path: out.to_path_buf(), key: "bits".into(), message: format!("{bits}: MLX export supports 4 or 8 bits") });
    }
    if !matches!(group_size, 32 | 64 | 128) {
        return Err(ModelError::InvalidConfigValue { path: out.to_path_buf(), key: "group_size".into(), message: format!("{group_size}: MLX export supports groups of 32, 64 or 128") });
    }
    let config_path = model_dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io { path: config_path.clone(), source })?;
    let mut config: Value = serde_json::from_str(&text).map_err(|e| ModelError::Config { path: config_path.clone(), message: e.to_string() })?;
    let dtype = model_dtype(&config);
    let mut summary = MlxSummary { matrices: 0, quantized: 0, bytes: 0 };
    let mut tensors = Vec::new();
    for name in source.names() {
        let shape = source.shape(&name).unwrap_or_default();
        let data = source.load(&name)?;
        if shape.len() == 2 && !name.contains("norm") {
            summary.matrices += 1;
        }
        if !quantizable(&name, &shape, group_size) {
            tensors.push(RawTensor::from_f32(name, shape, &data, dtype));
            continue;
        }
        let (rows, cols) = (shape[0], shape[1]);
        let q = mlx::quantize(&data, rows, cols, bits, group_size).map_err(|e| ModelError::BadSafetensors { path: out.to_path_buf(), message: format!("tensor `{name}`: {e}") })?;
        let base = name.trim_end_matches(".weight");
        let groups = cols / group_size;
        tensors.push(RawTensor {
            name: name.clone(),
            dtype: Dtype::U32,
            shape: vec![rows, cols * bits as usize / 32],
            bytes: q.weight.iter().flat_map(|w| w.to_le_bytes()).collect(),
        });
        tensors.push(RawTensor::from_f32(format!("{base}.scales"), vec![rows, groups], &q.scales, dtype));
        tensors.push(RawTensor::from_f32(format!("{base}.biases"), vec![rows, groups], &q.biases, dtype));
        summary.quantized += 1;
    }
    summary.bytes = tensors.iter().map(|t| t.bytes.len() as u64).sum();
    if let Some(map) = config.as_object_mut() {
        let quantization = json!({"group_size": group_size, "bits": bits, "mode": "affine"});
        map.insert("quantization".into(), quantization.clone());
        map.insert("quantization_config".into(), quantization);
    }
    let metadata = HashMap::from([("format".to_string(), "mlx".to_string())]);
    crate::fsutil::write_dir_atomic(out, |tmp| -> Result<(), DirError> {
        save_raw(&tmp.join("model.safetensors"), &tensors, Some(metadata))?;
        write_config_and_side_files(tmp, &config, model_dir)
    })
    .map_err(|e| match e {
        DirError::Model(e) => e,
        DirError::Io(source) => ModelError::Io { path: out.to_path_buf(), source },
    })?;
    Ok(summary)
}
