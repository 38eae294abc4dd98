//! Tokenizers and chat templates against the references transformers produced: every case in
//! each fixture's chat_reference.json renders to the identical string and token ids.

mod common;

use common::fixture;
use kiln::tokenizer::{ChatOptions, Tokenizer};
use serde_json::Value;

fn check_dir(rel: &str) {
    let dir = fixture(rel);
    let tok = Tokenizer::load(&dir).unwrap();
    let reference: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("chat_reference.json")).unwrap()).unwrap();
    let cases = reference["chat"].as_array().unwrap();
    assert!(!cases.is_empty());
    for (i, case) in cases.iter().enumerate() {
        let mut options = ChatOptions {
            add_generation_prompt: case["add_generation_prompt"].as_bool().unwrap_or(false),
            tools: case.get("tools").cloned(),
            extra: Default::default(),
        };
        for (k, v) in case.as_object().unwrap() {
            if !["messages", "add_generation_prompt", "tools", "text", "ids"].contains(&k.as_str()) {
                options.extra.insert(k.clone(), v.clone());
            }
        }
        let text = tok.apply_chat_template(&case["messages"], &options).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap(), "{rel}: chat case {i} renders differently");
        let ids: Vec<u64> = tok.encode_chat(&case["messages"], &options).unwrap().into_iter().map(u64::from).collect();
        let want: Vec<u64> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(ids, want, "{rel}: chat case {i} tokenises differently");
    }
    let encode = match &reference["encode"] {
        Value::Array(items) => items.clone(),
        obj @ Value::Object(_) => vec![obj.clone()],
        _ => vec![],
    };
    for case in encode {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u64> = tok.encode(text, false).unwrap().into_iter().map(u64::from).collect();
        let want: Vec<u64> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        assert_eq!(ids, want, "{rel}: encoding {text:?}");
        if let Some(with) = case.get("ids_with_special").and_then(Value::as_array) {
            let ids: Vec<u64> = tok.encode(text, true).unwrap().into_iter().map(u64::from).collect();
            let want: Vec<u64> = with.iter().map(|v| v.as_u64().unwrap()).collect();
            assert_eq!(ids, want, "{rel}: encoding {text:?} with special tokens");
        }
        assert_eq!(tok.decode(&tok.encode(text, false).unwrap(), false).unwrap(), text, "{rel}: decode round trip");
    }
}

#[test]
fn llama_template() {
    check_dir("models/llama");
}

#[test]
fn mistral_template() {
    check_dir("models/mistral");
}

#[test]
fn qwen2_template() {
    check_dir("models/qwen2");
}

#[test]
fn qwen3_template() {
    check_dir("models/qwen3");
}

#[test]
fn gemma3_template() {
    check_dir("models/gemma3");
}

#[test]
fn real_qwen3_tokenizer_tools_and_thinking() {
    check_dir("tokenizers/qwen3");
}

#[test]
fn template_errors_are_reported_not_panics() {
    let tok = Tokenizer::load(&fixture("models/qwen2")).unwrap();
    // Adding an undefined `content` to a string fails in Jinja2 too.
    let err = tok.apply_chat_template(&serde_json::json!([{"role": "user"}]), &ChatOptions::default()).unwrap_err();
    assert!(err.to_string().starts_with("chat template:"), "{err}");
}
