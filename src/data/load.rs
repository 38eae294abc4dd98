//! Reading JSONL data files into tokenised examples with training masks.
//!
//! Lines are parsed and tokenised in parallel (chat templates are slow to render) but results
//! keep file order, and when several lines are bad the first one in the file is reported.

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rayon::prelude::*;
use serde_json::{Map, Value};

use super::{DataError, DataFormat, Example, LoadOptions, PromptAnswer, TrainOn, json_type};
use crate::tokenizer::{ChatOptions, Tokenizer, TokenizerError};

type Object = Map<String, Value>;

/// Reads a JSONL file (one JSON object per line; blank lines skipped) and tokenises it in
/// parallel, preserving order. See the module docs of [`super`] for the formats.
pub fn load_examples(
    path: &Path,
    opts: &LoadOptions,
    tok: &Tokenizer,
    eos_id: Option<u32>,
) -> Result<Vec<Example>, DataError> {
    let lines = read_lines(path)?;
    let format = resolve_format(path, opts.format, &lines)?;
    let eos = if opts.add_eos { eos_id } else { None };
    let results: Vec<Result<Example, DataError>> = lines
        .par_iter()
        .map(|(line, text)| {
            let ctx = Line { path, line: *line };
            let obj = ctx.parse_object(text)?;
            match format {
                DataFormat::Text => text_example(&ctx, &obj, tok, eos),
                DataFormat::Completion => completion_example(&ctx, &obj, tok, eos, opts.train_on),
                // Auto has been resolved; chat is the only format left.
                DataFormat::Chat | DataFormat::Auto => chat_example(&ctx, &obj, tok, opts.train_on),
            }
        })
        .collect();
    let examples = results.into_iter().collect::<Result<Vec<_>, _>>()?;

    // An example whose targets all lie past the truncation point would only add padding to a
    // batch and a zero-token row to the loss; drop it here where its line can still be named.
    let total = examples.len();
    let limit = if opts.max_seq_len == 0 { usize::MAX } else { opts.max_seq_len.saturating_add(1) };
    let kept: Vec<Example> = examples
        .into_iter()
        .filter(|ex| ex.train_mask.iter().take(limit).skip(1).any(|&t| t))
        .collect();
    if kept.is_empty() {
        return Err(DataError::NoTargets { path: path.to_path_buf(), max_seq_len: opts.max_seq_len });
    }
    if kept.len() < total {
        let within = match opts.max_seq_len {
            0 => String::new(),
            n => format!(" within the first {} tokens (max_seq_len + 1)", n + 1),
        };
        tracing::warn!(
            "{}: skipped {} of {total} examples with no training target{within}",
            path.display(),
            total - kept.len(),
        );
    }
    // Said here, once a file, rather than by every epoch's and every evaluation's batching.
    let truncated = kept.iter().filter(|ex| ex.ids.len() > limit).count();
    if truncated > 0 {
        tracing::warn!("{}: {truncated} of {} examples are longer than max_seq_len + 1 = {limit} tokens and are truncated", path.display(), kept.len());
    }
    Ok(kept)
}

/// Held-out prompts with their expected answers, for exact-match accuracy.
///
/// Completion format: the prompt is encoded with special tokens and the answer is the trimmed
/// completion. Chat: every message before the last assistant message, rendered with
/// `add_generation_prompt`, is the prompt and that assistant message's content the answer.
pub fn load_prompts(path: &Path, format: DataFormat, tok: &Tokenizer) -> Result<Vec<PromptAnswer>, DataError> {
    let lines = read_lines(path)?;
    let format = resolve_format(path, format, &lines)?;
    if format == DataFormat::Text {
        return Err(DataError::Unsupported {
            path: path.to_path_buf(),
            message: "text lines have no answer to check: exact-match prompts need the completion \
                      ({\"prompt\", \"completion\"}) or chat ({\"messages\"}) format"
                .into(),
        });
    }
    let results: Vec<Result<PromptAnswer, DataError>> = lines
        .par_iter()
        .map(|(line, text)| {
            let ctx = Line { path, line: *line };
            let obj = ctx.parse_object(text)?;
            if format == DataFormat::Completion {
                let prompt = ctx.string(&obj, "prompt", " for the completion format")?;
                let completion = ctx.string(&obj, "completion", " for the completion format")?;
                let prompt_ids = tok.encode(prompt, true).map_err(|e| ctx.tokenizer(e))?;
                return Ok(PromptAnswer { prompt_ids, answer: completion.trim().to_string() });
            }
            let chat = ctx.chat(&obj)?;
            let last = chat
                .messages
                .iter()
                .rposition(|m| m.role == "assistant")
                .ok_or_else(|| DataError::NoAssistant { path: path.to_path_buf(), line: *line })?;
            let answer = chat.messages[last].content.ok_or_else(|| DataError::WrongType {
                path: path.to_path_buf(),
                line: *line,
                key: format!("messages[{last}].content"),
                expected: "a string",
                found: "null",
            })?;
            let opts = ChatOptions { add_generation_prompt: true, tools: chat.tools.clone(), ..Default::default() };
            let prompt = tok
                .apply_chat_template(&Value::Array(chat.raw[..last].to_vec()), &opts)
                .map_err(|e| ctx.tokenizer(e))?;
            let prompt_ids = tok.encode(&prompt, false).map_err(|e| ctx.tokenizer(e))?;
            Ok(PromptAnswer { prompt_ids, answer: answer.to_string() })
        })
        .collect();
    results.into_iter().collect()
}

/// Splits off a validation set when no validation file is given: a seeded shuffle of the
/// indices picks `round(len * fraction)` examples (at least 1 when `fraction > 0` and there
/// are at least 2, and never all of them). Both parts keep file order.
pub fn split_valid(examples: Vec<Example>, fraction: f64, seed: u64) -> (Vec<Example>, Vec<Example>) {
    let n = examples.len();
    // `!(fraction > 0.0)` also catches NaN.
    if !(fraction > 0.0) || n < 2 {
        return (examples, Vec::new());
    }
    let wanted = (n as f64 * fraction.min(1.0)).round() as usize;
    let k = wanted.clamp(1, n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut is_valid = vec![false; n];
    for &i in &order[..k] {
        is_valid[i] = true;
    }
    let (mut train, mut valid) = (Vec::with_capacity(n - k), Vec::with_capacity(k));
    for (ex, v) in examples.into_iter().zip(is_valid) {
        if v { valid.push(ex) } else { train.push(ex) }
    }
    (train, valid)
}

/// The non-blank lines of a data file with their 1-based line numbers.
pub(super) fn read_lines(path: &Path) -> Result<Vec<(usize, String)>, DataError> {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet")) {
        return read_parquet_rows(path);
    }
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    // Editors on Windows may start the file with a byte-order mark, which JSON does not allow.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let lines: Vec<(usize, String)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| (i + 1, l.to_string()))
        .collect();
    if lines.is_empty() {
        return Err(DataError::Empty { path: path.to_path_buf() });
    }
    Ok(lines)
}

/// The file's format: as set, or from the keys of its first non-blank line.
pub(super) fn resolve_format(
    path: &Path,
    format: DataFormat,
    lines: &[(usize, String)],
) -> Result<DataFormat, DataError> {
    if format != DataFormat::Auto {
        return Ok(format);
    }
    let Some((line, text)) = lines.first() else {
        return Err(DataError::Empty { path: path.to_path_buf() });
    };
    let obj = Line { path, line: *line }.parse_object(text)?;
    if obj.contains_key("messages") {
        Ok(DataFormat::Chat)
    } else if obj.contains_key("prompt") || obj.contains_key("completion") {
        // Either key is enough: a line missing the other is then reported as such.
        Ok(DataFormat::Completion)
    } else if obj.contains_key("text") {
        Ok(DataFormat::Text)
    } else {
        let keys: Vec<String> = obj.keys().map(|k| format!("\"{k}\"")).collect();
        let keys = if keys.is_empty() { "{}".to_string() } else { format!("[{}]", keys.join(", ")) };
        Err(DataError::UnknownFormat { path: path.to_path_buf(), line: *line, keys })
    }
}

/// Where a line came from, to build errors that name it.
pub(super) struct Line<'a> {
    pub path: &'a Path,
    pub line: usize,
}

/// One chat message, validated.
struct Message<'a> {
    role: &'a str,
    /// None where the content is null (assistant tool calls).
    content: Option<&'a str>,
}

/// A validated chat line: the messages as given (passed to the template untouched) and their
/// roles and contents.
struct Chat<'a> {
    raw: &'a [Value],
    messages: Vec<Message<'a>>,
    tools: Option<Value>,
}

impl Line<'_> {
    fn path(&self) -> PathBuf {
        self.path.to_path_buf()
    }

    pub(super) fn parse_object(&self, text: &str) -> Result<Object, DataError> {
        let value: Value = serde_json::from_str(text).map_err(|e| DataError::Json {
            path: self.path(),
            line: self.line,
            message: e.to_string(),
        })?;
        match value {
            Value::Object(map) => Ok(map),
            other => Err(DataError::NotObject { path: self.path(), line: self.line, found: json_type(&other) }),
        }
    }

    fn string<'o>(&self, obj: &'o Object, key: &str, context: &str) -> Result<&'o str, DataError> {
        match obj.get(key) {
            None => Err(DataError::MissingKey {
                path: self.path(),
                line: self.line,
                key: key.into(),
                context: context.into(),
            }),
            Some(Value::String(s)) => Ok(s),
            Some(other) => Err(self.wrong_type(key, "a string", other)),
        }
    }

    fn wrong_type(&self, key: &str, expected: &'static str, found: &Value) -> DataError {
        DataError::WrongType { path: self.path(), line: self.line, key: key.into(), expected, found: json_type(found) }
    }

    fn tokenizer(&self, source: TokenizerError) -> DataError {
        DataError::Tokenizer { path: self.path(), line: self.line, source }
    }

    fn chat<'o>(&self, obj: &'o Object) -> Result<Chat<'o>, DataError> {
        let raw = match obj.get("messages") {
            None => {
                return Err(DataError::MissingKey {
                    path: self.path(),
                    line: self.line,
                    key: "messages".into(),
                    context: " for the chat format".into(),
                });
            }
            Some(Value::Array(items)) => items.as_slice(),
            Some(other) => return Err(self.wrong_type("messages", "an array of messages", other)),
        };
        let mut messages = Vec::with_capacity(raw.len());
        for (i, m) in raw.iter().enumerate() {
            let Value::Object(m) = m else {
                return Err(self.wrong_type(&format!("messages[{i}]"), "an object", m));
            };
            let role = self.string(m, "role", &format!(" in messages[{i}]"))?;
            let content = match m.get("content") {
                Some(Value::String(s)) => Some(s.as_str()),
                // Assistant messages that only call tools carry no content.
                Some(Value::Null) => None,
                None if m.contains_key("tool_calls") => None,
                None => {
                    return Err(DataError::MissingKey {
                        path: self.path(),
                        line: self.line,
                        key: "content".into(),
                        context: format!(" in messages[{i}]"),
                    });
                }
                Some(other) => return Err(self.wrong_type(&format!("messages[{i}].content"), "a string", other)),
            };
            messages.push(Message { role, content });
        }
        let tools = match obj.get("tools") {
            None | Some(Value::Null) => None,
            Some(t @ Value::Array(_)) => Some(t.clone()),
            Some(other) => return Err(self.wrong_type("tools", "an array of tool definitions", other)),
        };
        Ok(Chat { raw, messages, tools })
    }
}

fn text_example(ctx: &Line, obj: &Object, tok: &Tokenizer, eos: Option<u32>) -> Result<Example, DataError> {
    let text = ctx.string(obj, "text", " for the text format")?;
    let mut ids = tok.encode(text, true).map_err(|e| ctx.tokenizer(e))?;
    ids.extend(eos);
    let train_mask = vec![true; ids.len()];
    Ok(Example { ids, train_mask, line: ctx.line })
}

fn completion_example(
    ctx: &Line,
    obj: &Object,
    tok: &Tokenizer,
    eos: Option<u32>,
    train_on: TrainOn,
) -> Result<Example, DataError> {
    let prompt = ctx.string(obj, "prompt", " for the completion format")?;
    let completion = ctx.string(obj, "completion", " for the completion format")?;
    let mut ids = tok.encode(prompt, true).map_err(|e| ctx.tokenizer(e))?;
    let prompt_len = ids.len();
    ids.extend(tok.encode(completion, false).map_err(|e| ctx.tokenizer(e))?);
    ids.extend(eos);
    let train_mask = (0..ids.len()).map(|i| train_on == TrainOn::All || i >= prompt_len).collect();
    Ok(Example { ids, train_mask, line: ctx.line })
}

fn chat_example(ctx: &Line, obj: &Object, tok: &Tokenizer, train_on: TrainOn) -> Result<Example, DataError> {
    let chat = ctx.chat(obj)?;
    let opts = ChatOptions { add_generation_prompt: false, tools: chat.tools.clone(), ..Default::default() };
    let full = tok.apply_chat_template(&Value::Array(chat.raw.to_vec()), &opts).map_err(|e| ctx.tokenizer(e))?;
    // As `Tokenizer::encode_chat`: the template writes any BOS itself.
    let (ids, offsets) = tok.encode_with_offsets(&full, false).map_err(|e| ctx.tokenizer(e))?;
    if train_on == TrainOn::All {
        let train_mask = vec![true; ids.len()];
        return Ok(Example { ids, train_mask, line: ctx.line });
    }
    let assistant: Vec<usize> =
        chat.messages.iter().enumerate().filter(|(_, m)| m.role == "assistant").map(|(i, _)| i).collect();
    if assistant.is_empty() {
        return Err(DataError::NoAssistant { path: ctx.path(), line: ctx.line });
    }
    let spans = assistant_spans(ctx, &chat, &opts, &full, &assistant, tok)?;
    let train_mask = offsets
        .iter()
        .map(|&(start, end)| spans.iter().any(|&(a, b)| start < b && end > a))
        .collect();
    Ok(Example { ids, train_mask, line: ctx.line })
}

/// Byte spans of `full` (the rendered chat) that hold each assistant turn: its content and the
/// template's end-of-turn marker, without the role header before it or the whitespace after.
fn assistant_spans(
    ctx: &Line,
    chat: &Chat,
    opts: &ChatOptions,
    full: &str,
    assistant: &[usize],
    tok: &Tokenizer,
) -> Result<Vec<(usize, usize)>, DataError> {
    let with_prompt = ChatOptions { add_generation_prompt: true, ..opts.clone() };
    let render = |messages: &[Value], o: &ChatOptions| tok.apply_chat_template(&Value::Array(messages.to_vec()), o).ok();
    let mut spans = Vec::with_capacity(assistant.len());
    let mut from = 0;
    for &i in assistant {
        // What the template writes for turn i is what rendering i+1 messages adds to rendering
        // i messages plus the generation prompt (the role header), provided the template
        // renders earlier turns the same way whatever follows them.
        let by_prefix = render(&chat.raw[..i], &with_prompt)
            .zip(render(&chat.raw[..=i], opts))
            .filter(|(p, q)| q.len() > p.len() && p.len() >= from && full.starts_with(p.as_str()) && full.starts_with(q.as_str()))
            .map(|(p, q)| (p.len(), q.len()));
        // Templates that rewrite earlier turns (dropping reasoning, say): find the content.
        let span = by_prefix
            .or_else(|| locate_content(full, from, chat.messages[i].content?, tok.eos_token.as_deref()))
            .ok_or_else(|| DataError::AssistantNotFound { path: ctx.path(), line: ctx.line, index: i })?;
        let (start, end) = span;
        // The newline after an end-of-turn marker is never generated: the model stops at the
        // marker, so it is not a target.
        let trimmed = start + full[start..end].trim_end().len();
        let end = if trimmed > start { trimmed } else { end };
        spans.push((start, end));
        from = end;
    }
    Ok(spans)
}

/// The span of `content` (as templates that `trim` it write it) in `full` after byte `from`,
/// extended over an EOS token that follows it.
fn locate_content(full: &str, from: usize, content: &str, eos: Option<&str>) -> Option<(usize, usize)> {
    let needle = content.trim();
    if needle.is_empty() {
        return None;
    }
    let start = from + full.get(from..)?.find(needle)?;
    let mut end = start + needle.len();
    if let Some(eos) = eos.filter(|e| !e.is_empty()) {
        let rest = &full[end..];
        let after_ws = rest.trim_start();
        if after_ws.starts_with(eos) {
            end += rest.len() - after_ws.len() + eos.len();
        }
    }
    Some((start, end))
}

/// The rows of a Parquet file as JSON objects, numbered from 1 like lines, so every format and
/// error path is the one JSONL takes (list and struct columns become JSON arrays and objects:
/// a `messages` column of `list<struct<role, content>>` reads as a chat).
fn read_parquet_rows(path: &Path) -> Result<Vec<(usize, String)>, DataError> {
    use parquet::file::reader::SerializedFileReader;
    let bad = |message: String| DataError::Parquet { path: path.to_path_buf(), message };
    let file = std::fs::File::open(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })?;
    let reader = SerializedFileReader::new(file).map_err(|e| bad(e.to_string()))?;
    let mut rows = Vec::new();
    for (i, row) in reader.into_iter().enumerate() {
        let row = row.map_err(|e| bad(format!("row {}: {e}", i + 1)))?;
        rows.push((i + 1, row.to_json_value().to_string()));
    }
    if rows.is_empty() {
        return Err(DataError::Empty { path: path.to_path_buf() });
    }
    Ok(rows)
}
