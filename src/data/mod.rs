//! Training data: JSONL or Parquet files → tokenised examples with loss masks → batches for the
//! model.
//!
//! A data file holds one JSON object per line (or one Parquet row, read as the same object) in
//! one of three formats, told apart by the keys
//! of its first line (or set explicitly): `{"text"}` (plain language modelling), `{"prompt",
//! "completion"}` and `{"messages"}` (chat, rendered with the model's own chat template). Each
//! line becomes an [`Example`]: the token ids plus a mask saying which tokens are targets, so
//! that a fine-tune learns the answers rather than the questions. [`make_batches`] then shifts,
//! packs or pads the examples into rectangular [`Batch`]es.
//!
//! Errors name the file and the 1-based line, because data files are written by hand or by
//! scripts and a bad line deep in a large file must be easy to find.
//!
//! [`train_tokenizer`] builds a small byte-level BPE tokenizer from the same files, for models
//! trained from scratch.

mod batch;
mod load;
mod train_tokenizer;

#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use batch::{Batch, make_batches, rows_in_order};
pub use load::{load_examples, load_prompts, split_valid};
pub use train_tokenizer::train_tokenizer;

use crate::tokenizer::TokenizerError;

// The recipe owns the user-facing settings; this module interprets them.
pub use crate::recipe::{DataFormat, TrainOn};

/// One tokenised training example.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub ids: Vec<u32>,
    /// Same length as `ids`: true where `ids[i]` is a training target.
    pub train_mask: Vec<bool>,
    /// 1-based line in the source file.
    pub line: usize,
}

/// A held-out prompt and its expected answer, for exact-match accuracy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptAnswer {
    pub prompt_ids: Vec<u32>,
    pub answer: String,
}

/// How [`load_examples`] reads and tokenises a file.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub format: DataFormat,
    pub train_on: TrainOn,
    /// Append the EOS id to text and completion examples (chat templates end turns themselves).
    pub add_eos: bool,
    /// Examples with no target within the first `max_seq_len + 1` tokens are dropped (with a
    /// warning), since truncation in [`make_batches`] would leave them nothing to learn; 0 means
    /// no limit.
    pub max_seq_len: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: the file has no data (it is empty or only blank lines)")]
    Empty { path: PathBuf },
    #[error("{path}: line {line}: invalid JSON: {message}")]
    Json { path: PathBuf, line: usize, message: String },
    #[error("{path}: line {line}: expected a JSON object, found {found}")]
    NotObject { path: PathBuf, line: usize, found: &'static str },
    #[error("{path}: line {line}: expected \"{key}\"{context}")]
    MissingKey { path: PathBuf, line: usize, key: String, context: String },
    #[error("{path}: line {line}: \"{key}\" must be {expected}, found {found}")]
    WrongType { path: PathBuf, line: usize, key: String, expected: &'static str, found: &'static str },
    #[error(
        "{path}: line {line}: cannot tell the data format from the keys {keys}: expected \"text\", \
         \"prompt\" and \"completion\", or \"messages\" (or set the format explicitly)"
    )]
    UnknownFormat { path: PathBuf, line: usize, keys: String },
    #[error(
        "{path}: line {line}: the chat has no assistant message, so there is nothing to train on \
         (add one, or train on all tokens)"
    )]
    NoAssistant { path: PathBuf, line: usize },
    #[error("{path}: line {line}: cannot find assistant message {index} in the rendered chat template")]
    AssistantNotFound { path: PathBuf, line: usize, index: usize },
    #[error("{path}: line {line}: {source}")]
    Tokenizer { path: PathBuf, line: usize, source: TokenizerError },
    #[error("{path}: {message}")]
    Unsupported { path: PathBuf, message: String },
    #[error("{path}: not a readable Parquet file: {message}")]
    Parquet { path: PathBuf, message: String },
    #[error("{path}: no example has a training target (in its first max_seq_len + 1 tokens; max_seq_len = {max_seq_len})")]
    NoTargets { path: PathBuf, max_seq_len: usize },
    #[error("training the tokenizer failed: {0}")]
    TrainTokenizer(String),
}

/// The JSON type of `v`, in words, for error messages.
fn json_type(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
