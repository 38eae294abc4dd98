//! `kiln generate`: stream a completion to stdout.
//!
//! Stable contract: with `--json`, the last stdout line is a JSON object with at least `ids`
//! (generated ids, prompt excluded) and `text`.

use std::io::Write;

use anyhow::Context;
use serde_json::{json, Value};

use super::{DeviceArg, ModelArgs};
use crate::backend::QuantMatmul;
use crate::generate::{generate, Sampler, SamplingConfig, StopConfig};
use crate::tokenizer::{ChatOptions, Tokenizer};

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Plain-text prompt (tokenised with the tokenizer's special tokens, e.g. BOS).
    #[arg(long, conflicts_with_all = ["chat", "prompt_ids"])]
    prompt: Option<String>,
    /// A chat as JSON (`[{"role": "user", "content": "..."}]`) or a path to a JSON file;
    /// rendered with the model's chat template and a generation prompt.
    #[arg(long, conflicts_with = "prompt_ids")]
    chat: Option<String>,
    /// The prompt as token ids, comma-separated.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    #[arg(long, default_value_t = 256)]
    max_new_tokens: usize,
    /// 0 for greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sample among the k most likely tokens (0: all).
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    /// Sample from the smallest set of tokens whose probability reaches p.
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the output contains this text (repeatable); the text is not printed.
    #[arg(long)]
    stop: Vec<String>,
    /// Keep going past the model's end-of-sequence tokens.
    #[arg(long)]
    ignore_eos: bool,
    /// Print one JSON object (ids, text, timings) instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Extra chat-template variables as JSON, e.g. '{"enable_thinking": false}'.
    #[arg(long)]
    template_kwargs: Option<String>,
    #[command(flatten)]
    device: DeviceArg,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    args.device.device.check()?;
    args.model.check()?;
    if !(args.top_p > 0.0 && args.top_p <= 1.0) {
        anyhow::bail!("--top-p must be in (0, 1], got {}", args.top_p);
    }
    if args.temperature < 0.0 {
        anyhow::bail!("--temperature must be 0 (greedy) or positive, got {}", args.temperature);
    }
    crate::with_backend!(args.device.device, |B, device| run_on::<B>(&args, &device))
}

fn prompt_ids(args: &Args, tokenizer: Option<&Tokenizer>) -> anyhow::Result<Vec<u32>> {
    if let Some(ids) = &args.prompt_ids {
        return Ok(ids.clone());
    }
    let tokenizer = tokenizer.with_context(|| format!("{}: no usable tokenizer.json; pass --prompt-ids instead", args.model.model.display()))?;
    if let Some(chat) = &args.chat {
        let text = if chat.trim_start().starts_with(['[', '{']) {
            chat.clone()
        } else {
            std::fs::read_to_string(chat).with_context(|| format!("reading chat file {chat}"))?
        };
        let parsed: Value = serde_json::from_str(&text).context("--chat is not valid JSON")?;
        let (messages, tools) = match parsed {
            Value::Array(_) => (parsed, None),
            Value::Object(ref map) if map.contains_key("messages") => (map["messages"].clone(), map.get("tools").cloned()),
            _ => anyhow::bail!("--chat must be a list of messages or an object with `messages`"),
        };
        let extra = match &args.template_kwargs {
            Some(kw) => match serde_json::from_str(kw).context("--template-kwargs is not valid JSON")? {
                Value::Object(map) => map,
                _ => anyhow::bail!("--template-kwargs must be a JSON object"),
            },
            None => Default::default(),
        };
        let options = ChatOptions { add_generation_prompt: true, tools, extra };
        return Ok(tokenizer.encode_chat(&messages, &options)?);
    }
    match &args.prompt {
        Some(p) => Ok(tokenizer.encode(p, true)?),
        None => anyhow::bail!("give a prompt: --prompt TEXT, --chat JSON or --prompt-ids 1,2,3"),
    }
}

fn run_on<B: QuantMatmul>(args: &Args, device: &B::Device) -> anyhow::Result<()> {
    let tokenizer = match Tokenizer::load(&args.model.model) {
        Ok(t) => Some(t),
        Err(e) if args.prompt_ids.is_some() => {
            tracing::warn!("{e}; output text will be empty");
            None
        }
        Err(e) => return Err(e.into()),
    };
    let prompt = prompt_ids(args, tokenizer.as_ref())?;
    if prompt.is_empty() {
        anyhow::bail!("the prompt is empty after tokenisation");
    }
    let model = args.model.load::<B>(device)?;
    if let Some(bad) = prompt.iter().find(|&&i| i as usize >= model.config.vocab_size) {
        anyhow::bail!("token id {bad} is outside the vocabulary (size {})", model.config.vocab_size);
    }
    let context = model.config.max_position_embeddings;
    if prompt.len() + args.max_new_tokens > context {
        tracing::warn!(
            "the prompt ({} tokens) and --max-new-tokens {} run past the model's context length {context} (max_position_embeddings): positions beyond it are ones the model was not trained on",
            prompt.len(),
            args.max_new_tokens
        );
    }
    let mut eos_ids = model.config.eos_token_ids.clone();
    if let Some(t) = &tokenizer {
        eos_ids.extend(t.eos_ids().into_iter().filter(|id| !model.config.eos_token_ids.contains(id)));
    }
    let stop = StopConfig {
        max_new_tokens: args.max_new_tokens,
        eos_ids: if args.ignore_eos { Vec::new() } else { eos_ids },
    };
    let mut sampler = Sampler::new(SamplingConfig {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    });

    let decode = |ids: &[u32]| -> String {
        tokenizer.as_ref().and_then(|t| t.decode(ids, true).ok()).unwrap_or_default()
    };
    let mut stdout = std::io::stdout().lock();
    let mut generated: Vec<u32> = Vec::new();
    let mut printed = 0usize; // bytes of decoded text already written
    let mut stopped_by_string = false;
    let start = std::time::Instant::now();
    let ids = generate(&model, &prompt, &mut sampler, &stop, |id| {
        generated.push(id);
        let text = decode(&generated);
        if let Some(cut) = args.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            if !args.json && cut > printed {
                let _ = write!(stdout, "{}", &text[printed..cut]);
            }
            stopped_by_string = true;
            return false;
        }
        // Hold back text that might be the start of a stop string or an unfinished UTF-8
        // sequence (the tokenizer renders those as U+FFFD until the rest arrives).
        let hold = args.stop.iter().map(|s| s.len().saturating_sub(1)).max().unwrap_or(0);
        let mut safe = text.len().saturating_sub(hold);
        while safe > printed && !text.is_char_boundary(safe) {
            safe -= 1;
        }
        if text[..safe].ends_with('\u{FFFD}') {
            return true;
        }
        if !args.json && safe > printed {
            let _ = write!(stdout, "{}", &text[printed..safe]);
            let _ = stdout.flush();
            printed = safe;
        }
        true
    });
    let elapsed = start.elapsed().as_secs_f64();
    let mut text = decode(&ids);
    if stopped_by_string {
        if let Some(cut) = args.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
        }
    }
    if args.json {
        let out = json!({
            "ids": ids,
            "text": text,
            "prompt_tokens": prompt.len(),
            "new_tokens": ids.len(),
            "seconds": elapsed,
        });
        writeln!(stdout, "{out}")?;
    } else {
        if !stopped_by_string && text.len() > printed {
            write!(stdout, "{}", &text[printed..])?;
        }
        writeln!(stdout)?;
        tracing::info!("{} tokens in {elapsed:.2}s ({:.1} tokens/s)", ids.len(), ids.len() as f64 / elapsed.max(1e-9));
    }
    Ok(())
}
