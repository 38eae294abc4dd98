//! Training a small byte-level BPE tokenizer on a dataset, for models trained from scratch.
//!
//! The result is a Hugging Face model directory's tokenizer half (`tokenizer.json` and
//! `tokenizer_config.json` with a ChatML template), so [`crate::tokenizer::Tokenizer::load`] and
//! transformers read it like any other. The alphabet is the characters seen rather than all 256
//! bytes, because toy vocabularies (say 96 tokens) could not hold the byte alphabet at all;
//! characters never seen in training are then dropped when encoding.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};
use tokenizers::models::TrainerWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use super::DataError;
use super::load::{Line, read_lines};

/// End of text; also the padding token.
const EOS: &str = "<|endoftext|>";
/// The special tokens, in id order.
const SPECIAL_TOKENS: [&str; 3] = [EOS, "<|im_start|>", "<|im_end|>"];
/// ChatML, the template of tests/fixtures/models/qwen2.
const CHAT_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Trains a byte-level BPE tokenizer of at most `vocab_size` tokens (special tokens included;
/// more if the alphabet alone is larger) on every string value of every JSON line of `files`,
/// and writes `out_dir/tokenizer.json` and `out_dir/tokenizer_config.json`. Deterministic for
/// the same input.
pub fn train_tokenizer(files: &[PathBuf], vocab_size: usize, out_dir: &Path) -> Result<(), DataError> {
    if files.is_empty() {
        return Err(DataError::TrainTokenizer("no data files given".into()));
    }
    // The ChatML template writes newlines even when no training string holds one.
    let mut texts: Vec<String> = vec!["\n".into()];
    for path in files {
        for (line, text) in read_lines(path)? {
            let obj = Line { path, line }.parse_object(&text)?;
            collect_strings(&Value::Object(obj), &mut texts);
        }
    }

    let trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .show_progress(false)
        .special_tokens(SPECIAL_TOKENS.iter().map(|t| AddedToken::from(*t, true)).collect())
        .build();
    let mut trainer = TrainerWrapper::BpeTrainer(trainer);
    let mut tokenizer = tokenizers::Tokenizer::new(BPE::default());
    let byte_level = ByteLevel::new(false, true, true);
    tokenizer.with_pre_tokenizer(Some(byte_level));
    tokenizer.with_decoder(Some(byte_level));
    tokenizer
        .train(&mut trainer, texts.iter())
        .map_err(|e| DataError::TrainTokenizer(e.to_string()))?;
    let actual = tokenizer.get_vocab_size(true);
    if actual > vocab_size {
        tracing::warn!("the data has {actual} distinct characters and special tokens, more than vocab_size = {vocab_size}: the vocabulary has {actual} tokens");
    }

    let tokenizer_json = tokenizer.to_string(true).map_err(|e| DataError::TrainTokenizer(e.to_string()))?;
    write(&out_dir.join("tokenizer.json"), tokenizer_json.as_bytes())?;
    let config = tokenizer_config(&tokenizer);
    let config = serde_json::to_string_pretty(&config).map_err(|e| DataError::TrainTokenizer(e.to_string()))?;
    write(&out_dir.join("tokenizer_config.json"), config.as_bytes())
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    crate::fsutil::write_atomic(path, bytes).map_err(|source| DataError::Io { path: path.to_path_buf(), source })
}

/// Every string value in `v`, depth first (prompts, completions, texts, roles and contents).
fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| collect_strings(i, out)),
        Value::Object(map) => map.values().for_each(|i| collect_strings(i, out)),
        _ => {}
    }
}

/// A transformers `tokenizer_config.json` for the trained tokenizer.
fn tokenizer_config(tokenizer: &tokenizers::Tokenizer) -> Value {
    let mut added = serde_json::Map::new();
    for token in SPECIAL_TOKENS {
        if let Some(id) = tokenizer.token_to_id(token) {
            added.insert(
                id.to_string(),
                json!({
                    "content": token,
                    "lstrip": false,
                    "normalized": false,
                    "rstrip": false,
                    "single_word": false,
                    "special": true,
                }),
            );
        }
    }
    json!({
        "add_bos_token": false,
        "add_eos_token": false,
        "added_tokens_decoder": added,
        "bos_token": null,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": null,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 1_000_000_000_000_000_000u64,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    })
}
