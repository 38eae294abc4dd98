//! Recipe errors, and finding where in the file they are.
//!
//! Every error carries `file:line:column` and the dotted key it is about, so the message reads
//! like a compiler's: `recipes/x.toml:12:1: lora.rnak: unknown key; did you mean `rank`?`.
//! toml gives byte spans for syntax and serde errors; for errors found after deserialisation
//! (ranges, missing files) the key is looked up again in a spanned parse of the text
//! ([`toml::de::DeTable`]).

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};

/// A position in a recipe file; line and column count from 1, columns in characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("{}: cannot read recipe: {source}", path.display())]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{at}: TOML syntax error: {message}")]
    Syntax { at: Location, message: String },
    #[error("{}: unknown key{}", head(at, key), unknown_tail(suggestion.as_deref(), valid))]
    UnknownKey { at: Location, key: String, suggestion: Option<String>, valid: Vec<String> },
    #[error("{}: wrong type: {message}", head(at, key))]
    WrongType { at: Location, key: String, message: String },
    /// A value of the right type that is out of range, not one of the allowed names, or at odds
    /// with another key.
    #[error("{}: {message}", head(at, key))]
    Invalid { at: Location, key: String, message: String },
    #[error("{}: missing key: {message}", head(at, key))]
    MissingKey { at: Location, key: String, message: String },
    #[error("{}: file not found: `{}` (resolved to `{}`){}", head(at, key), written.display(), resolved.display(), tilde_hint(written))]
    MissingFile { at: Location, key: String, written: PathBuf, resolved: PathBuf },
}

impl RecipeError {
    /// Where in the recipe the error is; `None` when the file could not be read.
    pub fn location(&self) -> Option<&Location> {
        match self {
            Self::Read { .. } => None,
            Self::Syntax { at, .. }
            | Self::UnknownKey { at, .. }
            | Self::WrongType { at, .. }
            | Self::Invalid { at, .. }
            | Self::MissingKey { at, .. }
            | Self::MissingFile { at, .. } => Some(at),
        }
    }

    /// The dotted key the error is about (`lora.rank`), when there is one.
    pub fn key(&self) -> Option<&str> {
        match self {
            Self::Read { .. } | Self::Syntax { .. } => None,
            Self::UnknownKey { key, .. }
            | Self::WrongType { key, .. }
            | Self::Invalid { key, .. }
            | Self::MissingKey { key, .. }
            | Self::MissingFile { key, .. } => Some(key.as_str()).filter(|k| !k.is_empty()),
        }
    }
}

fn head(at: &Location, key: &str) -> String {
    if key.is_empty() { at.to_string() } else { format!("{at}: {key}") }
}

fn tilde_hint(written: &Path) -> &'static str {
    if written.starts_with("~") { "; `~` is not expanded in recipes, write the full path" } else { "" }
}

fn unknown_tail(suggestion: Option<&str>, valid: &[String]) -> String {
    let mut s = String::new();
    if let Some(sug) = suggestion {
        s.push_str(&format!("; did you mean `{sug}`?"));
    }
    if !valid.is_empty() {
        s.push_str(&format!(" (valid keys: {})", valid.join(", ")));
    }
    s
}

/// The recipe text and its file name: everything needed to turn a key or a byte offset into a
/// [`Location`].
pub(crate) struct Source<'a> {
    pub text: &'a str,
    pub path: &'a Path,
}

impl Source<'_> {
    /// Line and column of a byte offset (clamped to the text, snapped back to a char boundary).
    pub fn location(&self, offset: usize) -> Location {
        let mut offset = offset.min(self.text.len());
        while !self.text.is_char_boundary(offset) {
            offset -= 1;
        }
        let before = &self.text[..offset];
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        Location {
            file: self.path.to_path_buf(),
            line: before.matches('\n').count() + 1,
            column: before[line_start..].chars().count() + 1,
        }
    }

    /// Where `key` (dotted) is written: the key itself when present, else the header of the
    /// deepest enclosing table that is, else the start of the file.
    pub fn locate(&self, key: &str) -> Location {
        let offset = DeTable::parse(self.text).ok().and_then(|doc| {
            let mut table = doc.get_ref();
            let mut found = None;
            for part in key.split('.') {
                let Some((k, v)) = table.iter().find(|(k, _)| k.get_ref() == part) else { break };
                match v.get_ref() {
                    DeValue::Table(t) => {
                        // A `[section]` header spans the header; a dotted or implicit table has
                        // no header of its own, so point at its key.
                        found = Some(if v.span().is_empty() { k.span().start } else { v.span().start });
                        table = t;
                    }
                    _ => {
                        found = Some(k.span().start);
                        break;
                    }
                }
            }
            found
        });
        self.location(offset.unwrap_or(0))
    }

    /// The dotted key whose key or value span holds `offset` (`""` when none does).
    pub fn key_at(&self, offset: usize) -> String {
        DeTable::parse(self.text)
            .ok()
            .and_then(|doc| find_key(doc.get_ref(), offset, ""))
            .unwrap_or_default()
    }
}

fn contains(span: &Range<usize>, offset: usize) -> bool {
    span.start <= offset && offset < span.end.max(span.start + 1)
}

/// Children before parents, so the innermost key wins; spans of sibling keys do not overlap.
fn find_key(table: &DeTable<'_>, offset: usize, prefix: &str) -> Option<String> {
    for (k, v) in table.iter() {
        let name = if prefix.is_empty() { k.get_ref().to_string() } else { format!("{prefix}.{}", k.get_ref()) };
        if let Some(inner) = find_in_value(v.get_ref(), offset, &name) {
            return Some(inner);
        }
        if contains(&k.span(), offset) || contains(&v.span(), offset) {
            return Some(name);
        }
    }
    None
}

fn find_in_value(value: &DeValue<'_>, offset: usize, name: &str) -> Option<String> {
    match value {
        DeValue::Table(t) => find_key(t, offset, name),
        DeValue::Array(items) => items.iter().enumerate().find_map(|(i, item)| {
            let indexed = format!("{name}[{i}]");
            find_in_value(item.get_ref(), offset, &indexed)
                .or_else(|| contains(&item.span(), offset).then_some(indexed))
        }),
        _ => None,
    }
}

/// The closest of `candidates` to `word`, if close enough to be worth suggesting.
pub(crate) fn suggest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<String> {
    let norm = |s: &str| s.to_ascii_lowercase().replace('-', "_");
    let w = norm(word);
    let candidates: Vec<&str> = candidates.into_iter().collect();
    // Names people bring from transformers / PEFT configs.
    let alias = ALIASES.iter().find(|(from, _)| *from == w).map(|(_, to)| *to);
    if let Some(to) = alias.filter(|to| candidates.contains(to)) {
        return Some(to.to_string());
    }
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(&w, &norm(c)), c))
        .filter(|(score, _)| *score >= 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| c.to_string())
}

const ALIASES: &[(&str, &str)] = &[
    ("r", "rank"),
    ("lora_r", "rank"),
    ("lora_rank", "rank"),
    ("lora_alpha", "alpha"),
    ("lora_dropout", "dropout"),
    ("use_rslora", "rslora"),
    ("target_modules", "targets"),
    ("layers_to_transform", "layers"),
    ("lr", "learning_rate"),
    ("max_steps", "steps"),
    ("num_train_epochs", "epochs"),
    ("num_epochs", "epochs"),
    ("per_device_train_batch_size", "batch_size"),
    ("gradient_accumulation_steps", "grad_accum"),
    ("lr_scheduler_type", "lr_schedule"),
    ("scheduler", "lr_schedule"),
    ("adam_beta1", "beta1"),
    ("adam_beta2", "beta2"),
    ("adam_epsilon", "eps"),
    ("max_grad_norm", "max_grad_norm"),
    ("logging_steps", "log_every"),
    ("eval_steps", "every"),
    ("save_steps", "every"),
    ("save_total_limit", "keep_last"),
    ("seq_len", "max_seq_len"),
    ("max_length", "max_seq_len"),
    ("output", "output_dir"),
    ("model_path", "path"),
    ("validation", "valid"),
    ("num_hidden_layers", "num_layers"),
    ("num_attention_heads", "num_heads"),
    ("num_key_value_heads", "num_kv_heads"),
];

/// Turns a toml/serde deserialisation error into a [`RecipeError`] naming the key.
pub(crate) fn from_toml(src: &Source<'_>, err: &toml::de::Error) -> RecipeError {
    let offset = err.span().map_or(0, |s| s.start);
    let at = src.location(offset);
    let key = src.key_at(offset);
    let msg = err.message().trim();
    if let Some(rest) = msg.strip_prefix("unknown field ") {
        // "unknown field `x`, expected one of `a`, `b`" / "expected `a`" / "there are no fields"
        // Split at serde's own "`, " so that a quoted key holding ", " stays whole.
        let (field, expected) = rest.split_once("`, ").unwrap_or((rest, ""));
        let field = field.trim_matches('`');
        let valid = backticked(expected);
        let suggestion = suggest(field, valid.iter().map(String::as_str));
        return RecipeError::UnknownKey { at, key, suggestion, valid };
    }
    if let Some(rest) = msg.strip_prefix("unknown variant ") {
        let (value, expected) = rest.split_once("`, ").unwrap_or((rest, ""));
        let value = format!("`{}`", value.trim_matches('`'));
        let value = value.as_str();
        let allowed = backticked(expected);
        let mut message = format!("unknown value {value}; expected one of {}", allowed.join(", "));
        if let Some(s) = suggest(value.trim_matches('`'), allowed.iter().map(String::as_str)) {
            message = format!("unknown value {value}; did you mean `{s}`? (expected one of {})", allowed.join(", "));
        }
        return RecipeError::Invalid { at, key, message };
    }
    for (prefix, wrong_type) in [("invalid type: ", true), ("invalid length ", true), ("invalid value: ", false)] {
        if let Some(rest) = msg.strip_prefix(prefix) {
            let message = match rest.rsplit_once(", expected ") {
                Some((found, expected)) if prefix == "invalid length " => {
                    format!("expected {}, found an array of length {found}", describe(expected))
                }
                Some((found, expected)) => format!("expected {}, found {found}", describe(expected)),
                None => msg.to_string(),
            };
            return if wrong_type {
                RecipeError::WrongType { at, key, message }
            } else {
                RecipeError::Invalid { at, key, message }
            };
        }
    }
    if msg.starts_with("missing field") {
        return RecipeError::MissingKey { at, key, message: msg.to_string() };
    }
    // Anything else that toml rejects while deserialising (duplicate keys, bad dates, ...)
    // is about the text itself.
    if key.is_empty() {
        RecipeError::Syntax { at, message: msg.to_string() }
    } else {
        RecipeError::Invalid { at, key, message: msg.to_string() }
    }
}

/// Serde's type names, said the way a recipe author thinks of TOML values.
fn describe(expected: &str) -> String {
    let e = expected.trim();
    let d = match e {
        "usize" | "u64" | "u32" | "u16" | "u8" => "a non-negative integer",
        "isize" | "i64" | "i32" => "an integer",
        "f64" | "f32" => "a number",
        "a boolean" => "true or false",
        "path string" | "a borrowed path" => "a path (a string)",
        "a sequence" => "an array",
        _ if e.starts_with("struct ") => "a table",
        _ if e.starts_with("enum ") => "a string",
        _ => e,
    };
    d.to_string()
}

fn backticked(s: &str) -> Vec<String> {
    s.split('`').skip(1).step_by(2).map(String::from).collect()
}
