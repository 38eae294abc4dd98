//! Hugging Face decoder models: config, weights, and the forward pass as Burn modules.
//!
//! `config` turns config.json into a [`ModelConfig`]; `arch/` holds what each family reads
//! differently; `layers` the pieces every decoder shares (linear, RMSNorm, rope, masks);
//! `decoder` the transformer itself with its KV cache; `weights` the safetensors files.

pub mod arch;
pub mod config;
pub mod decoder;
pub mod layers;
pub mod mlx;
pub mod moe;
pub mod save;
pub mod weights;

use std::path::PathBuf;

pub use config::{Arch, ModelConfig};
pub use decoder::{KvCache, Model};

/// Everything that can be wrong with a model directory.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not valid JSON: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{path}: missing key `{key}`")]
    MissingConfigKey { path: PathBuf, key: String },
    #[error("{path}: `{key}`: {message}")]
    InvalidConfigValue { path: PathBuf, key: String, message: String },
    #[error("{path}: model_type `{model_type}` is not supported (supported: llama, mistral, qwen2, qwen3, qwen3_moe, gemma3_text, gemma4_text)")]
    UnknownArchitecture { path: PathBuf, model_type: String },
    #[error("{dir}: no model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    #[error("{path}: {message}")]
    BadSafetensors { path: PathBuf, message: String },
    #[error("{index}: shard `{shard}` points outside the model directory; refusing to read it")]
    ShardOutsideModel { index: PathBuf, shard: String },
    #[error("tensor `{name}` (shape {expected:?}) is missing from the checkpoint")]
    MissingTensor { name: String, expected: Vec<usize> },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    TensorShape { name: String, path: PathBuf, expected: Vec<usize>, found: Vec<usize> },
    #[error("tensor `{name}` is stored quantised as {stored}; it cannot be loaded as {requested} (leave out the quantize setting to run it as stored)")]
    AlreadyQuantized { name: String, stored: String, requested: String },
    #[error("cannot quantise tensor `{name}`: {message}")]
    Quantize { name: String, message: String },
    #[error("{path}: tensor `{name}` is stored as {dtype}, which kiln cannot read as a float weight")]
    UnsupportedDtype { name: String, path: PathBuf, dtype: String },
}
