//! The tokenizer as llama.cpp wants it inside a GGUF file: the vocabulary in id order with
//! token types, BPE merges, special ids, BOS/EOS flags, the pre-tokenizer's name and the chat
//! template.
//!
//! llama.cpp re-implements each pre-tokenizer's regex by name, so the name must be right:
//! kiln reads the split regex from tokenizer.json and refuses a tokenizer it cannot name
//! rather than writing a file whose tokenisation silently differs.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde_json::Value as Json;

use super::file::{Value, ValueType};
use crate::model::ModelConfig;
use crate::tokenizer::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum VocabError {
    #[error("{path}: {message}")]
    Read { path: PathBuf, message: String },
    #[error(
        "{path}: kiln does not recognise this pre-tokenizer, so llama.cpp would split text differently \
         from the original tokenizer. Found: {found}. Known: {known}"
    )]
    UnknownPreTokenizer { path: PathBuf, found: String, known: String },
    #[error("{path}: {message}")]
    Unsupported { path: PathBuf, message: String },
}

/// llama.cpp's token types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    Normal = 1,
    Control = 3,
    UserDefined = 4,
    Unused = 5,
}

/// Pre-tokenizers llama.cpp implements, recognised by their split regex (as written in
/// tokenizer.json). `None` stands for a bare ByteLevel pre-tokenizer with its built-in GPT-2
/// regex.
const PRE_TOKENIZERS: &[(&str, Option<&str>)] = &[
    ("gpt-2", None),
    (
        "llama-bpe",
        Some(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    ),
    (
        "qwen2",
        Some(r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
    ),
];

/// The parsed parts of tokenizer.json that the file needs.
struct TokenizerJson {
    path: PathBuf,
    vocab: HashMap<String, u32>,
    merges: Vec<String>,
    /// id → (content, special)
    added: BTreeMap<u32, (String, bool)>,
    pre: &'static str,
}

fn read(path: &Path) -> Result<TokenizerJson, VocabError> {
    let err = |message: String| VocabError::Read { path: path.to_path_buf(), message };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let json: Json = serde_json::from_str(&text).map_err(|e| err(format!("not valid JSON: {e}")))?;
    let model = json.get("model").ok_or_else(|| err("no `model` section".into()))?;
    let kind = model.get("type").and_then(Json::as_str).unwrap_or("?");
    let unsupported = |message: String| VocabError::Unsupported { path: path.to_path_buf(), message };
    if kind != "BPE" {
        return Err(unsupported(format!("tokenizer model `{kind}`: kiln's GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen, GPT-2 style)")));
    }
    if model.get("byte_fallback").and_then(Json::as_bool) == Some(true) {
        return Err(unsupported(
            "a SentencePiece-style BPE (byte_fallback) tokenizer: kiln's GGUF export supports byte-level BPE tokenizers (Llama 3, Qwen, GPT-2 style) only".into(),
        ));
    }
    let vocab = model
        .get("vocab")
        .and_then(Json::as_object)
        .ok_or_else(|| err("`model.vocab` is missing".into()))?
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_u64()? as u32)))
        .collect();
    let merges = model
        .get("merges")
        .and_then(Json::as_array)
        .map(|m| {
            m.iter()
                .filter_map(|entry| match entry {
                    Json::String(s) => Some(s.clone()),
                    // Newer tokenizer.json files write each merge as a pair; a space inside a part
                    // becomes its byte-level form so the space stays the separator.
                    Json::Array(pair) if pair.len() == 2 => {
                        let part = |v: &Json| v.as_str().map(|p| p.replace(' ', "\u{0120}"));
                        Some(format!("{} {}", part(&pair[0])?, part(&pair[1])?))
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let added = json
        .get("added_tokens")
        .and_then(Json::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|t| {
                    let id = t.get("id")?.as_u64()? as u32;
                    let content = t.get("content")?.as_str()?.to_string();
                    let special = t.get("special").and_then(Json::as_bool).unwrap_or(false);
                    Some((id, (content, special)))
                })
                .collect()
        })
        .unwrap_or_default();
    let pre = pre_tokenizer_name(path, json.get("pre_tokenizer"))?;
    Ok(TokenizerJson { path: path.to_path_buf(), vocab, merges, added, pre })
}

/// Names the pre-tokenizer from its split regex, or refuses.
fn pre_tokenizer_name(path: &Path, pre: Option<&Json>) -> Result<&'static str, VocabError> {
    let mut regexes = Vec::new();
    let mut byte_level_regex = false;
    let mut other = Vec::new();
    collect_pre(pre, &mut regexes, &mut byte_level_regex, &mut other);
    let known = || PRE_TOKENIZERS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
    let found = || {
        let mut parts: Vec<String> = regexes.iter().map(|r| format!("Split regex {r:?}")).collect();
        if byte_level_regex {
            parts.push("ByteLevel with its GPT-2 regex".into());
        }
        parts.extend(other.iter().cloned());
        if parts.is_empty() { "no pre-tokenizer".to_string() } else { parts.join(" + ") }
    };
    if other.is_empty() {
        let key = match (regexes.as_slice(), byte_level_regex) {
            ([], true) => Some(None),
            ([r], false) => Some(Some(r.as_str())),
            _ => None,
        };
        if let Some(key) = key
            && let Some((name, _)) = PRE_TOKENIZERS.iter().find(|(_, r)| *r == key)
        {
            return Ok(name);
        }
    }
    Err(VocabError::UnknownPreTokenizer { path: path.to_path_buf(), found: found(), known: known() })
}

fn collect_pre(pre: Option<&Json>, regexes: &mut Vec<String>, byte_level_regex: &mut bool, other: &mut Vec<String>) {
    let Some(pre) = pre.filter(|p| !p.is_null()) else { return };
    match pre.get("type").and_then(Json::as_str) {
        Some("Sequence") => {
            for p in pre.get("pretokenizers").and_then(Json::as_array).into_iter().flatten() {
                collect_pre(Some(p), regexes, byte_level_regex, other);
            }
        }
        Some("Split") => match pre.get("pattern").and_then(|p| p.get("Regex")).and_then(Json::as_str) {
            Some(r) => regexes.push(r.to_string()),
            None => other.push(format!("Split {}", pre.get("pattern").map(|p| p.to_string()).unwrap_or_default())),
        },
        Some("ByteLevel") => {
            if pre.get("use_regex").and_then(Json::as_bool).unwrap_or(true) {
                *byte_level_regex = true;
            }
            if pre.get("add_prefix_space").and_then(Json::as_bool) == Some(true) {
                other.push("ByteLevel with add_prefix_space".into());
            }
        }
        Some(t) => other.push(t.to_string()),
        None => other.push(pre.to_string()),
    }
}

/// Added tokens that llama.cpp's converter treats as control tokens even when they are not
/// flagged special (`does_token_look_special`).
fn looks_special(token: &str) -> bool {
    let bracketed = |open: &str, close: &str| token.starts_with(open) && token.ends_with(close) && token.len() >= open.len() + close.len();
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || bracketed("<|", "|>")
        || bracketed("<\u{ff5c}", "\u{ff5c}>")
        || (token.starts_with("<unused") && token.ends_with('>'))
}

/// `tokenizer.*` metadata for the model directory `dir`.
pub fn metadata(dir: &Path, cfg: &ModelConfig) -> Result<Vec<(String, Value)>, VocabError> {
    let tok = read(&dir.join("tokenizer.json"))?;
    let hf = Tokenizer::load(dir).map_err(|e| VocabError::Read { path: dir.join("tokenizer.json"), message: e.to_string() })?;
    let max_id = tok.vocab.values().chain(tok.added.keys()).copied().max().map_or(0, |m| m as usize + 1);
    if max_id > cfg.vocab_size {
        return Err(VocabError::Unsupported {
            path: tok.path.clone(),
            message: format!("the tokenizer has ids up to {} but the model's vocab_size is {}", max_id - 1, cfg.vocab_size),
        });
    }
    let mut by_id: Vec<Option<&str>> = vec![None; cfg.vocab_size];
    for (text, &id) in &tok.vocab {
        by_id[id as usize] = Some(text);
    }
    for (&id, (text, _)) in &tok.added {
        by_id[id as usize] = Some(text);
    }
    let mut tokens = Vec::with_capacity(cfg.vocab_size);
    let mut types = Vec::with_capacity(cfg.vocab_size);
    for (id, text) in by_id.iter().enumerate() {
        let (text, ty) = match (text, tok.added.get(&(id as u32))) {
            // Embedding rows beyond the tokenizer (vocab padded for speed) get placeholder names.
            (None, _) => (format!("[PAD{id}]"), TokenType::Unused),
            (Some(t), Some((_, special))) if *special || looks_special(t) => (t.to_string(), TokenType::Control),
            (Some(t), Some(_)) => (t.replace('\u{2581}', " "), TokenType::UserDefined),
            (Some(t), None) => (t.to_string(), TokenType::Normal),
        };
        tokens.push(Value::String(text));
        types.push(Value::I32(ty as i32));
    }

    let id_of = |name: Option<&str>| name.and_then(|n| hf.token_to_id(n));
    // As llama.cpp's converter: config.json ids only when given as one number (a list is
    // ambiguous and ignored).
    let config = read_config_json(dir);
    let config_id = |key: &str| config.as_ref().and_then(|c| c.get(key)).and_then(Json::as_u64).map(|id| id as u32);
    let bos = id_of(hf.bos_token.as_deref()).or_else(|| config_id("bos_token_id"));
    let eos = id_of(hf.eos_token.as_deref()).or_else(|| config_id("eos_token_id"));
    let pad = id_of(hf.pad_token.as_deref()).or_else(|| config_id("pad_token_id"));
    // What the HF tokenizer does when asked to add special tokens is the ground truth for the
    // flags, whichever file they came from.
    let probe = hf.encode("a", true).unwrap_or_default();
    let bare = hf.encode("a", false).unwrap_or_default();
    let add_bos = probe.len() > bare.len() && bos.is_some_and(|b| probe.first() == Some(&b));
    let add_eos = probe.len() > bare.len() && eos.is_some_and(|e| probe.last() == Some(&e));

    let mut m = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String(tok.pre.into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(ValueType::String, tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(ValueType::I32, types)),
        ("tokenizer.ggml.merges".into(), Value::strings(tok.merges)),
    ];
    for (key, id) in [("bos_token_id", bos), ("eos_token_id", eos), ("padding_token_id", pad)] {
        if let Some(id) = id {
            m.push((format!("tokenizer.ggml.{key}"), Value::U32(id)));
        }
    }
    if let Some(eot) = end_of_turn(&hf).filter(|&t| Some(t) != eos) {
        m.push(("tokenizer.ggml.eot_token_id".into(), Value::U32(eot)));
    }
    m.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add_bos)));
    m.push(("tokenizer.ggml.add_eos_token".into(), Value::Bool(add_eos)));
    if let Some(template) = &hf.chat_template {
        m.push(("tokenizer.chat_template".into(), Value::String(template.clone())));
    }
    Ok(m)
}

/// The token a chat model ends its turn with: the first special token the chat template
/// writes right after an assistant message's text. It is what generation must stop at.
pub fn end_of_turn(hf: &Tokenizer) -> Option<u32> {
    let marker = "kiln-end-of-turn-probe";
    let messages = serde_json::json!([
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": marker},
    ]);
    let text = hf.apply_chat_template(&messages, &Default::default()).ok()?;
    let after = &text[text.find(marker)? + marker.len()..];
    let ids = hf.encode(after.trim_start_matches([' ', '\n']), false).ok()?;
    let first = *ids.first()?;
    let piece = hf.decode(&[first], false).ok()?;
    let decoded_plain = hf.decode(&[first], true).ok()?;
    // A special token disappears when special tokens are skipped.
    (decoded_plain.is_empty() && !piece.is_empty()).then_some(first)
}

fn read_config_json(dir: &Path) -> Option<Json> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).ok()?).ok()
}
