use std::path::{Path, PathBuf};

use serde_json::json;

use super::*;
use crate::tokenizer::{ChatOptions, Tokenizer};

fn fixture_tokenizer(name: &str) -> Tokenizer {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models").join(name);
    Tokenizer::load(&dir).unwrap()
}

fn write(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

fn opts(format: DataFormat, train_on: TrainOn) -> LoadOptions {
    LoadOptions { format, train_on, add_eos: true, max_seq_len: 1024 }
}

/// The decoded runs of consecutive target tokens.
fn target_runs(tok: &Tokenizer, ex: &Example) -> Vec<String> {
    let mut runs = Vec::new();
    let mut current = Vec::new();
    for (&id, &t) in ex.ids.iter().zip(&ex.train_mask) {
        if t {
            current.push(id);
        } else if !current.is_empty() {
            runs.push(tok.decode(&std::mem::take(&mut current), false).unwrap());
        }
    }
    if !current.is_empty() {
        runs.push(tok.decode(&current, false).unwrap());
    }
    runs
}

fn two_turn_chat() -> serde_json::Value {
    json!({"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Four."},
        {"role": "user", "content": "And the capital of France?"},
        {"role": "assistant", "content": "Paris, of course."},
    ]})
}

#[test]
fn multi_turn_chat_trains_on_every_assistant_turn_and_its_end_marker() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(tmp.path(), "chat.jsonl", &[two_turn_chat().to_string()]);
    for (model, end) in [("qwen2", "<|im_end|>"), ("llama", "<|eot_id|>")] {
        let tok = fixture_tokenizer(model);
        let examples = load_examples(&path, &opts(DataFormat::Auto, TrainOn::Completion), &tok, None).unwrap();
        assert_eq!(examples.len(), 1);
        let ex = &examples[0];
        assert_eq!(ex.line, 1);
        assert_eq!(ex.ids.len(), ex.train_mask.len());
        // The whole example is the chat template's rendering, tokenised without extra specials.
        let rendered = tok
            .apply_chat_template(&two_turn_chat()["messages"], &ChatOptions::default())
            .unwrap();
        assert_eq!(ex.ids, tok.encode(&rendered, false).unwrap(), "{model}");
        assert_eq!(target_runs(&tok, ex), [format!("Four.{end}"), format!("Paris, of course.{end}")], "{model}");

        let all = load_examples(&path, &opts(DataFormat::Chat, TrainOn::All), &tok, None).unwrap();
        assert!(all[0].train_mask.iter().all(|&t| t));
        assert_eq!(all[0].ids, ex.ids);
    }
}

#[test]
fn chat_without_assistant_is_an_error_when_training_on_completions() {
    let tmp = tempfile::tempdir().unwrap();
    let line = json!({"messages": [{"role": "user", "content": "hi"}]}).to_string();
    let path = write(tmp.path(), "chat.jsonl", &[line]);
    let tok = fixture_tokenizer("qwen2");
    let err = load_examples(&path, &opts(DataFormat::Auto, TrainOn::Completion), &tok, None).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, DataError::NoAssistant { line: 1, .. }), "{msg}");
    assert!(msg.contains("chat.jsonl") && msg.contains("line 1"), "{msg}");
    assert!(load_examples(&path, &opts(DataFormat::Auto, TrainOn::All), &tok, None).is_ok());
}

#[test]
fn completion_masks_the_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let lines = [
        json!({"prompt": "12+7=", "completion": "19"}).to_string(),
        String::new(),
        json!({"prompt": "Say hi:", "completion": " hello there"}).to_string(),
    ];
    let path = write(tmp.path(), "c.jsonl", &lines);
    let tok = fixture_tokenizer("qwen2");
    let eos = tok.token_to_id("<|endoftext|>");
    let examples = load_examples(&path, &opts(DataFormat::Auto, TrainOn::Completion), &tok, eos).unwrap();
    assert_eq!(examples.len(), 2);
    assert_eq!(examples[1].line, 3, "blank lines are skipped but counted");
    for (ex, (prompt, completion)) in examples.iter().zip([("12+7=", "19"), ("Say hi:", " hello there")]) {
        let p = tok.encode(prompt, true).unwrap();
        let c = tok.encode(completion, false).unwrap();
        let mut ids = p.clone();
        ids.extend(&c);
        ids.extend(eos);
        assert_eq!(ex.ids, ids);
        let mask: Vec<bool> = (0..ids.len()).map(|i| i >= p.len()).collect();
        assert_eq!(ex.train_mask, mask);
        assert_eq!(target_runs(&tok, ex), [format!("{completion}<|endoftext|>")]);
    }
    let all = load_examples(&path, &opts(DataFormat::Completion, TrainOn::All), &tok, eos).unwrap();
    assert!(all.iter().all(|ex| ex.train_mask.iter().all(|&t| t)));

    let no_eos = LoadOptions { add_eos: false, ..opts(DataFormat::Auto, TrainOn::Completion) };
    let examples_no_eos = load_examples(&path, &no_eos, &tok, eos).unwrap();
    assert_eq!(examples_no_eos[0].ids.len() + 1, examples[0].ids.len());
}

#[test]
fn text_format_trains_on_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let path = write(tmp.path(), "t.jsonl", &[json!({"text": "The cat sat on the mat."}).to_string()]);
    let tok = fixture_tokenizer("llama");
    let eos = tok.token_to_id("<|eot_id|>");
    // train_on is ignored for text.
    let examples = load_examples(&path, &opts(DataFormat::Auto, TrainOn::Completion), &tok, eos).unwrap();
    let mut ids = tok.encode("The cat sat on the mat.", true).unwrap();
    ids.extend(eos);
    assert_eq!(examples[0].ids, ids);
    assert!(examples[0].train_mask.iter().all(|&t| t));
}

#[test]
fn load_prompts_for_completion_and_chat() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = fixture_tokenizer("qwen2");
    let path = write(tmp.path(), "c.jsonl", &[json!({"prompt": "1+1=", "completion": " 2\n"}).to_string()]);
    let prompts = load_prompts(&path, DataFormat::Auto, &tok).unwrap();
    assert_eq!(prompts, [PromptAnswer { prompt_ids: tok.encode("1+1=", true).unwrap(), answer: "2".into() }]);

    let path = write(tmp.path(), "chat.jsonl", &[two_turn_chat().to_string()]);
    let prompts = load_prompts(&path, DataFormat::Auto, &tok).unwrap();
    let history = json!(two_turn_chat()["messages"].as_array().unwrap()[..4]);
    let rendered =
        tok.apply_chat_template(&history, &ChatOptions { add_generation_prompt: true, ..Default::default() }).unwrap();
    assert!(rendered.ends_with("<|im_start|>assistant\n"));
    assert_eq!(prompts[0].prompt_ids, tok.encode(&rendered, false).unwrap());
    assert_eq!(prompts[0].answer, "Paris, of course.");

    let path = write(tmp.path(), "t.jsonl", &[json!({"text": "x"}).to_string()]);
    assert!(matches!(load_prompts(&path, DataFormat::Auto, &tok), Err(DataError::Unsupported { .. })));
}

#[test]
fn malformed_lines_name_the_file_and_line() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = fixture_tokenizer("qwen2");
    let ok = json!({"prompt": "a", "completion": "b"}).to_string();
    let o = opts(DataFormat::Auto, TrainOn::Completion);
    let check = |name: &str, lines: &[String], format: DataFormat, want: &[&str]| {
        let path = write(tmp.path(), name, lines);
        let err = load_examples(&path, &LoadOptions { format, ..o.clone() }, &tok, None).unwrap_err().to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
        for w in want {
            assert!(err.contains(w), "{err:?} should contain {w:?}");
        }
    };
    check("json.jsonl", &[ok.clone(), ok.clone(), "{\"prompt\": \"a\",".into()], DataFormat::Auto, &["line 3", "invalid JSON"]);
    // Several bad lines: the first one in the file is reported.
    check("first.jsonl", &[ok.clone(), "[1]".into(), "{".into()], DataFormat::Auto, &["line 2", "expected a JSON object, found an array"]);
    check(
        "missing.jsonl",
        &[ok.clone(), ok.clone(), ok.clone(), ok.clone(), ok.clone(), ok.clone(), json!({"prompt": "x"}).to_string()],
        DataFormat::Auto,
        &["line 7: expected \"completion\""],
    );
    check("type.jsonl", &[json!({"prompt": "x", "completion": 3}).to_string()], DataFormat::Auto, &["line 1", "\"completion\" must be a string, found a number"]);
    check("unknown.jsonl", &[json!({"question": "x"}).to_string()], DataFormat::Auto, &["line 1", "\"question\"", "cannot tell the data format"]);
    check("text.jsonl", &[ok.clone()], DataFormat::Text, &["line 1: expected \"text\""]);
    check("role.jsonl", &[json!({"messages": [{"content": "x"}]}).to_string()], DataFormat::Auto, &["line 1: expected \"role\" in messages[0]"]);
    check("msgs.jsonl", &[json!({"messages": "hi"}).to_string()], DataFormat::Auto, &["\"messages\" must be an array of messages, found a string"]);
    check("empty.jsonl", &["".into(), "  ".into()], DataFormat::Auto, &["empty"]);

    let missing = tmp.path().join("nope.jsonl");
    let err = load_examples(&missing, &o, &tok, None).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }) && err.to_string().contains("nope.jsonl"), "{err}");

    let parquet = tmp.path().join("x.parquet");
    std::fs::write(&parquet, "not parquet").unwrap();
    let err = load_examples(&parquet, &o, &tok, None).unwrap_err();
    assert!(matches!(err, DataError::Parquet { .. }) && err.to_string().contains("x.parquet"), "{err}");
}

#[test]
fn parquet_rows_read_like_jsonl_lines() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let tok = Tokenizer::load(&root.join("tests/fixtures/models/qwen2")).unwrap();
    let o = LoadOptions { format: DataFormat::Auto, train_on: TrainOn::Completion, add_eos: true, max_seq_len: 512 };
    let tmp = tempfile::tempdir().unwrap();
    for (parquet, jsonl, n) in [("arith.parquet", "datasets/arith/valid.jsonl", 20), ("chat.parquet", "datasets/chat-small/valid.jsonl", 10)] {
        let from_parquet = load_examples(&root.join("tests/fixtures/data").join(parquet), &o, &tok, Some(2)).unwrap();
        let lines: Vec<String> = std::fs::read_to_string(root.join(jsonl)).unwrap().lines().take(n).map(String::from).collect();
        let copy = tmp.path().join(format!("{parquet}.jsonl"));
        std::fs::write(&copy, lines.join("\n")).unwrap();
        let from_jsonl = load_examples(&copy, &o, &tok, Some(2)).unwrap();
        assert_eq!(from_parquet.len(), n);
        assert_eq!(from_parquet, from_jsonl, "{parquet}");
    }
}

fn example(len: usize, first_target: usize, seed: u32) -> Example {
    Example {
        ids: (0..len as u32).map(|i| 100 + seed * 10 + i).collect(),
        train_mask: (0..len).map(|i| i >= first_target).collect(),
        line: seed as usize + 1,
    }
}

fn target_count(ex: &Example, max_seq_len: usize) -> usize {
    ex.train_mask.iter().take(max_seq_len + 1).skip(1).filter(|&&t| t).count()
}

#[test]
fn packing_keeps_examples_apart() {
    let examples: Vec<Example> =
        [5, 9, 3, 12, 7, 2, 16, 4].iter().enumerate().map(|(i, &n)| example(n, 2, i as u32)).collect();
    let max_seq_len = 16;
    for seed in [None, Some(7)] {
        let batches = make_batches(&examples, 2, max_seq_len, true, seed);
        let mut total_tokens = 0;
        let mut seen_inputs = 0;
        for b in &batches {
            assert_eq!(b.seq, max_seq_len, "every row is exactly max_seq_len");
            assert!(b.batch >= 1 && b.batch <= 2);
            for v in [b.ids.len(), b.targets.len(), b.loss_mask.len(), b.positions.len(), b.segments.len()] {
                assert_eq!(v, b.batch * b.seq);
            }
            assert_eq!(b.tokens, b.loss_mask.iter().filter(|&&m| m == 1.0).count());
            total_tokens += b.tokens;
            for r in 0..b.batch {
                let row = r * b.seq..(r + 1) * b.seq;
                let (ids, pos, seg, mask) = (&b.ids[row.clone()], &b.positions[row.clone()], &b.segments[row.clone()], &b.loss_mask[row.clone()]);
                let targets = &b.targets[row];
                // Real tokens come first, examples back to back; padding after.
                let real = ids.iter().take_while(|&&id| id != 0).count();
                seen_inputs += real;
                assert!(ids[real..].iter().all(|&id| id == 0));
                assert!(mask[real..].iter().all(|&m| m == 0.0));
                assert!(targets[real..].iter().all(|&t| t == 0));
                for i in 0..real {
                    if i == 0 || seg[i] != seg[i - 1] {
                        assert_eq!(pos[i], 0, "positions restart at each example");
                        if i > 0 {
                            assert_ne!(seg[i], seg[i - 1]);
                        }
                    } else {
                        assert_eq!(pos[i], pos[i - 1] + 1);
                        // Within an example, the next input is this position's target.
                        assert_eq!(ids[i], targets[i - 1]);
                    }
                }
                // Distinct examples in the row have distinct segments.
                let mut starts: Vec<u32> = (0..real).filter(|&i| pos[i] == 0).map(|i| seg[i]).collect();
                let n = starts.len();
                starts.dedup();
                assert_eq!(starts.len(), n);
                // Each padding position has a segment of its own.
                let mut all: Vec<u32> = seg[real..].to_vec();
                all.extend(&starts);
                all.sort_unstable();
                all.dedup();
                assert_eq!(all.len(), (b.seq - real) + n);
            }
        }
        let expected: usize = examples.iter().map(|e| target_count(e, max_seq_len)).sum();
        assert_eq!(total_tokens, expected, "every target appears once");
        assert_eq!(seen_inputs, examples.iter().map(|e| e.ids.len() - 1).sum::<usize>());
    }
}

#[test]
fn packed_rows_are_no_longer_than_the_whole_dataset() {
    // 4 + 6 input tokens in all under a max_seq_len of a hundred million: one row of 10.
    let examples = vec![example(5, 1, 0), example(7, 1, 1)];
    for seed in [None, Some(3)] {
        let batches = make_batches(&examples, 4, 100_000_000, true, seed);
        assert_eq!(batches.len(), 1);
        assert_eq!((batches[0].batch, batches[0].seq), (1, 10));
        assert_eq!(batches[0].tokens, 4 + 6);
    }
}

#[test]
fn truncation_keeps_max_seq_len_plus_one_tokens() {
    let examples = vec![example(40, 0, 0), example(5, 0, 1)];
    for packing in [true, false] {
        let batches = make_batches(&examples, 4, 8, packing, None);
        let total: usize = batches.iter().map(|b| b.tokens).sum();
        assert_eq!(total, 8 + 4, "packing={packing}");
        assert!(batches.iter().all(|b| b.seq <= 8));
    }
}

#[test]
fn padding_mode_groups_lengths() {
    let lens = [3, 10, 4, 9, 5, 2, 8, 6, 7];
    let examples: Vec<Example> = lens.iter().enumerate().map(|(i, &n)| example(n, 1, i as u32)).collect();
    let batches = make_batches(&examples, 2, 64, false, None);
    // 9 examples in batches of 2: the last partial batch is kept.
    assert_eq!(batches.iter().map(|b| b.batch).collect::<Vec<_>>(), [2, 2, 2, 2, 1]);
    // Without a seed: one chunk sorted by length, so rows pair neighbours in length.
    let seqs: Vec<usize> = batches.iter().map(|b| b.seq).collect();
    assert_eq!(seqs, [2, 4, 6, 8, 9]);
    let mut tokens = 0;
    for b in &batches {
        tokens += b.tokens;
        let lens: Vec<usize> = (0..b.batch).map(|r| b.ids[r * b.seq..(r + 1) * b.seq].iter().take_while(|&&i| i != 0).count()).collect();
        assert_eq!(*lens.iter().max().unwrap(), b.seq, "padded to the longest row");
        for (r, &len) in lens.iter().enumerate() {
            let row = r * b.seq..(r + 1) * b.seq;
            assert_eq!(&b.positions[row.clone()][..len], (0..len as u32).collect::<Vec<_>>());
            assert!(b.segments[row.clone()][..len].iter().all(|&s| s == b.segments[r * b.seq]));
            let pads = &b.segments[row.clone()][len..];
            let mut distinct = pads.to_vec();
            distinct.push(b.segments[r * b.seq]);
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), pads.len() + 1);
            assert!(b.loss_mask[row][len..].iter().all(|&m| m == 0.0));
        }
    }
    assert_eq!(tokens, examples.iter().map(|e| target_count(e, 64)).sum::<usize>());

    // Chunks of 32 * batch_size: with a seed the batches hold similar lengths still.
    let many: Vec<Example> = (0..200).map(|i| example(2 + (i * 37) % 50, 1, i as u32)).collect();
    let batches = make_batches(&many, 4, 64, false, Some(3));
    assert_eq!(batches.iter().map(|b| b.batch).sum::<usize>(), 200);
    let padding: usize = batches.iter().map(|b| b.ids.iter().filter(|&&i| i == 0).count()).sum();
    let real: usize = many.iter().map(|e| e.ids.len() - 1).sum();
    assert!(padding * 10 < real, "grouping keeps padding small: {padding} pads for {real} tokens");
}

#[test]
fn seeded_shuffles_are_deterministic() {
    let examples: Vec<Example> = (0..50).map(|i| example(3 + i % 7, 1, i as u32)).collect();
    let (t1, v1) = split_valid(examples.clone(), 0.1, 42);
    let (t2, v2) = split_valid(examples.clone(), 0.1, 42);
    assert_eq!((&t1, &v1), (&t2, &v2));
    assert_eq!(v1.len(), 5);
    assert_eq!(t1.len() + v1.len(), 50);
    let (_, v3) = split_valid(examples.clone(), 0.1, 43);
    assert_ne!(v1, v3);
    // At least one validation example whenever there can be one, never all of them.
    assert_eq!(split_valid(examples[..2].to_vec(), 0.01, 1).1.len(), 1);
    assert_eq!(split_valid(examples[..2].to_vec(), 1.0, 1).0.len(), 1);
    assert_eq!(split_valid(examples[..1].to_vec(), 0.5, 1).1.len(), 0);
    assert_eq!(split_valid(examples.clone(), 0.0, 1).1.len(), 0);

    for packing in [true, false] {
        let a = make_batches(&examples, 3, 16, packing, Some(9));
        let b = make_batches(&examples, 3, 16, packing, Some(9));
        let c = make_batches(&examples, 3, 16, packing, Some(10));
        let plain = make_batches(&examples, 3, 16, packing, None);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, plain);
        assert_eq!(plain, make_batches(&examples, 3, 16, packing, None));
    }
}

#[test]
fn trained_tokenizer_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let mut lines: Vec<String> = (0..200)
        .map(|i| json!({"prompt": format!("{}+{}=", i % 13, i % 7), "completion": format!("{}", i % 13 + i % 7)}).to_string())
        .collect();
    lines.push(json!({"text": "hello world"}).to_string());
    lines.push(two_turn_chat().to_string());
    let data = write(tmp.path(), "train.jsonl", &lines);
    let out = tmp.path().join("tok");
    train_tokenizer(std::slice::from_ref(&data), 96, &out).unwrap();

    let tok = Tokenizer::load(&out).unwrap();
    assert!(tok.vocab_size() <= 96, "vocab {}", tok.vocab_size());
    let ids = tok.encode("12+7=19", false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), "12+7=19");
    let eos = tok.encode("<|endoftext|>", false).unwrap();
    assert_eq!(eos.len(), 1);
    assert_eq!(tok.eos_ids(), eos);
    assert_eq!(tok.token_to_id("<|im_start|>").map(|_| ()), Some(()));

    // The ChatML template renders, and the chat round-trips through the vocabulary.
    let messages = &two_turn_chat()["messages"];
    let rendered = tok.apply_chat_template(messages, &ChatOptions::default()).unwrap();
    let reference = fixture_tokenizer("qwen2").apply_chat_template(messages, &ChatOptions::default()).unwrap();
    assert_eq!(rendered, reference);
    let ids = tok.encode(&rendered, false).unwrap();
    assert_eq!(tok.decode(&ids, false).unwrap(), rendered);
    // And the masking works with the trained tokenizer too.
    let chat = write(tmp.path(), "chat.jsonl", &[two_turn_chat().to_string()]);
    let examples = load_examples(&chat, &opts(DataFormat::Auto, TrainOn::Completion), &tok, None).unwrap();
    assert_eq!(target_runs(&tok, &examples[0]), ["Four.<|im_end|>", "Paris, of course.<|im_end|>"]);

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(config["eos_token"], "<|endoftext|>");
    assert_eq!(config["pad_token"], "<|endoftext|>");
    assert!(config["bos_token"].is_null());

    // Deterministic.
    let again = tmp.path().join("tok2");
    train_tokenizer(&[data], 96, &again).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(again.join(f)).unwrap(), "{f}");
    }
}

#[test]
fn templates_that_rewrite_history_fall_back_to_locating_the_content() {
    // The message count at the top changes with every prefix, so no prefix rendering is a
    // prefix of the full one.
    let tmp = tempfile::tempdir().unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/qwen2");
    std::fs::copy(src.join("tokenizer.json"), tmp.path().join("tokenizer.json")).unwrap();
    let template = "{{ messages|length }} messages\n{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let config = json!({"eos_token": "<|im_end|>", "bos_token": null, "chat_template": template});
    std::fs::write(tmp.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let tok = Tokenizer::load(tmp.path()).unwrap();
    let path = write(tmp.path(), "chat.jsonl", &[two_turn_chat().to_string()]);
    let examples = load_examples(&path, &opts(DataFormat::Chat, TrainOn::Completion), &tok, None).unwrap();
    assert_eq!(target_runs(&tok, &examples[0]), ["Four.<|im_end|>", "Paris, of course.<|im_end|>"]);
}

#[test]
fn bundled_datasets_load() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets");
    let tok = fixture_tokenizer("qwen2");
    let eos = tok.token_to_id("<|endoftext|>");
    let o = opts(DataFormat::Auto, TrainOn::Completion);
    for (file, lines) in [("arith/valid.jsonl", 200), ("arith-sub/test.jsonl", 200), ("chat-small/train.jsonl", 400)] {
        let examples = load_examples(&root.join(file), &o, &tok, eos).unwrap();
        assert_eq!(examples.len(), lines, "{file}");
    }
    let prompts = load_prompts(&root.join("chat-small/valid.jsonl"), DataFormat::Auto, &tok).unwrap();
    assert_eq!(prompts.len(), 40);
}
