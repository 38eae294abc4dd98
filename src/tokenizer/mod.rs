//! Tokenizer and chat template of a Hugging Face model directory.
//!
//! `tokenizer.json` goes through the `tokenizers` crate unchanged; special tokens and the chat
//! template come from `tokenizer_config.json` (or `chat_template.jinja` / `chat_template.json`,
//! where transformers 5 puts them) and are rendered by [`chat`] with Hugging Face semantics.

pub mod chat;

use std::path::{Path, PathBuf};

use serde_json::Value;

pub use chat::ChatOptions;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: cannot load tokenizer: {message}")]
    Load { path: PathBuf, message: String },
    #[error("{path}: not valid JSON: {message}")]
    Json { path: PathBuf, message: String },
    #[error("tokenizer failed: {0}")]
    Encode(String),
    #[error("{dir}: the model has no chat template (tokenizer_config.json has no `chat_template`)")]
    NoChatTemplate { dir: PathBuf },
    #[error("chat template: {0}")]
    Template(String),
}

/// A model's tokenizer with its special tokens and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    dir: PathBuf,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
}

impl Tokenizer {
    pub fn load(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(TokenizerError::Load { path, message: "file not found".into() });
        }
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| TokenizerError::Load { path: path.clone(), message: e.to_string() })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text)
                .map_err(|e| TokenizerError::Json { path: config_path.clone(), message: e.to_string() })?,
            Err(_) => Value::Null,
        };
        let chat_template = read_chat_template(dir, &config)?;
        Ok(Self {
            inner,
            dir: dir.to_path_buf(),
            chat_template,
            bos_token: special_token(config.get("bos_token")),
            eos_token: special_token(config.get("eos_token")),
            pad_token: special_token(config.get("pad_token")),
        })
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` with each token's byte span in `text`, to map character ranges
    /// (such as a chat's assistant turns) onto tokens. Tokens added by the post-processor
    /// have empty spans.
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, Vec<(usize, usize)>), TokenizerError> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| TokenizerError::Encode(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| TokenizerError::Encode(e.to_string()))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Why `other` would read token ids differently, or None when both map every token
    /// (added tokens included) to the same id.
    pub fn vocab_difference(&self, other: &Tokenizer) -> Option<String> {
        let (a, b) = (self.inner.get_vocab(true), other.inner.get_vocab(true));
        if a.len() != b.len() {
            return Some(format!("{} tokens vs {}", a.len(), b.len()));
        }
        let mut tokens: Vec<(&String, &u32)> = a.iter().collect();
        tokens.sort_by_key(|(_, id)| **id);
        tokens.into_iter().find_map(|(token, id)| match b.get(token) {
            Some(other_id) if other_id == id => None,
            Some(other_id) => Some(format!("token {token:?} is id {id} vs {other_id}")),
            None => Some(format!("token {token:?} (id {id}) is missing from the other")),
        })
    }

    /// Renders `messages` with the model's chat template.
    pub fn apply_chat_template(&self, messages: &Value, options: &ChatOptions) -> Result<String, TokenizerError> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| TokenizerError::NoChatTemplate { dir: self.dir.clone() })?;
        chat::render(template, messages, options, self.bos_token.as_deref(), self.eos_token.as_deref())
    }

    /// Renders and tokenises a chat as transformers' `apply_chat_template(tokenize=True)`
    /// does: the template writes any BOS itself, so no special tokens are added.
    pub fn encode_chat(&self, messages: &Value, options: &ChatOptions) -> Result<Vec<u32>, TokenizerError> {
        self.encode(&self.apply_chat_template(messages, options)?, false)
    }

    /// Ids of the model's end-of-turn tokens named in tokenizer_config.json.
    pub fn eos_ids(&self) -> Vec<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t)).into_iter().collect()
    }
}

/// A special token given as a string or as `{"content": ...}`.
fn special_token(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Object(map) => map.get("content").and_then(Value::as_str).map(String::from),
        _ => None,
    }
}

/// The default chat template: from `chat_template.jinja`, `chat_template.json`, or
/// `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates).
fn read_chat_template(dir: &Path, config: &Value) -> Result<Option<String>, TokenizerError> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|source| TokenizerError::Io { path: jinja, source });
    }
    let json = dir.join("chat_template.json");
    if json.exists() {
        let text = std::fs::read_to_string(&json).map_err(|source| TokenizerError::Io { path: json.clone(), source })?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| TokenizerError::Json { path: json.clone(), message: e.to_string() })?;
        return Ok(template_value(value.get("chat_template")));
    }
    Ok(template_value(config.get("chat_template")))
}

fn template_value(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(s) => Some(s.clone()),
        Value::Array(items) => {
            let named = |name: &str| {
                items.iter().find(|t| t.get("name").and_then(Value::as_str) == Some(name))
            };
            named("default")
                .or_else(|| items.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str)
                .map(String::from)
        }
        _ => None,
    }
}
