//! The command-line contract and bad input: each mistake ends in one clear message and a
//! non-zero exit code, never a panic.

mod common;

use std::path::Path;

use common::*;
use safetensors::SafeTensors;

fn copy_model(name: &str, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(model_dir(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

fn assert_clean_error(code: i32, stderr: &str, needles: &[&str]) {
    assert_ne!(code, 0, "expected failure, stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic instead of an error: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr lacks {n:?}: {stderr}");
    }
}

#[test]
fn forward_writes_logits_like_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("logits.safetensors");
    let (_, ids) = reference_ids("qwen2", "input_ids");
    let first: Vec<String> = ids[..24].iter().map(|i| i.to_string()).collect();
    let dir = model_dir("qwen2");
    let (code, stdout, stderr) = kiln(&["forward", "--model", dir.to_str().unwrap(), "--ids", &first.join(","), "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("top-5"), "{stdout}");
    let bytes = std::fs::read(&out).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.shape(), &[1, 24, 384]);
    let got: Vec<f32> = t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    let (_, want) = reference("qwen2", "logits");
    assert!(max_abs_diff(&got, &want[..24 * 384]) < 1e-4);
}

#[test]
fn generate_json_reproduces_greedy_ids() {
    let (_, prompt) = reference_ids("llama", "greedy_prompt");
    let (_, expected) = reference_ids("llama", "greedy_ids");
    let prompt_arg: Vec<String> = prompt.iter().map(|i| i.to_string()).collect();
    let dir = model_dir("llama");
    let (code, stdout, stderr) = kiln(&[
        "generate", "--model", dir.to_str().unwrap(), "--prompt-ids", &prompt_arg.join(","),
        "--max-new-tokens", "16", "--temperature", "0", "--ignore-eos", "--json",
    ]);
    assert_eq!(code, 0, "{stderr}");
    let last: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let ids: Vec<u32> = last["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    assert_eq!(ids, expected[prompt.len()..]);
    assert!(last["text"].is_string());
}

#[test]
fn generate_streams_chat_text() {
    let dir = model_dir("qwen3");
    let (code, stdout, stderr) = kiln(&[
        "generate", "--model", dir.to_str().unwrap(), "--chat", r#"[{"role":"user","content":"Hi"}]"#,
        "--max-new-tokens", "8", "--temperature", "0.8", "--top-p", "0.9", "--seed", "1",
    ]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!stdout.is_empty());
}

#[test]
fn inspect_json_describes_the_model() {
    let dir = model_dir("gemma3");
    let (code, stdout, stderr) = kiln(&["inspect", dir.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["architecture"], "gemma3");
    assert_eq!(v["layers"], 2);
    assert_eq!(v["vocab_size"], 384);
    assert_eq!(v["chat_template"], true);
    assert_eq!(v["parameters"], 111232);
}

#[test]
fn missing_config_key() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model("llama", tmp.path());
    let cfg = tmp.path().join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("num_attention_heads");
    std::fs::write(&cfg, v.to_string()).unwrap();
    let (code, _, stderr) = kiln(&["forward", "--model", tmp.path().to_str().unwrap(), "--ids", "1,2"]);
    assert_clean_error(code, &stderr, &["config.json", "num_attention_heads"]);
}

#[test]
fn implausible_config_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model("llama", tmp.path());
    let cfg = tmp.path().join("config.json");
    let original = std::fs::read_to_string(&cfg).unwrap();
    let cases = [
        (serde_json::json!({ "hidden_size": 1u64 << 40 }), "hidden_size", "1099511627776 is larger than any model"),
        (serde_json::json!({ "head_dim": 1 << 16, "num_attention_heads": 64 }), "head_dim", "num_attention_heads × head_dim = 4194304"),
    ];
    for (patch, key, needle) in cases {
        let mut json: serde_json::Value = serde_json::from_str(&original).unwrap();
        for (k, v) in patch.as_object().unwrap() {
            json[k] = v.clone();
        }
        std::fs::write(&cfg, json.to_string()).unwrap();
        let (code, _, stderr) = kiln(&["forward", "--model", tmp.path().to_str().unwrap(), "--ids", "1,2"]);
        assert_clean_error(code, &stderr, &["config.json", key, needle]);
    }
}

#[test]
fn unknown_architecture() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model("llama", tmp.path());
    let cfg = tmp.path().join("config.json");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("\"llama\"", "\"falcon_mamba\"");
    std::fs::write(&cfg, text).unwrap();
    let (code, _, stderr) = kiln(&["inspect", tmp.path().to_str().unwrap()]);
    assert_clean_error(code, &stderr, &["falcon_mamba", "not supported"]);
}

#[test]
fn truncated_safetensors() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model("llama", tmp.path());
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let (code, _, stderr) = kiln(&["forward", "--model", tmp.path().to_str().unwrap(), "--ids", "1,2"]);
    assert_clean_error(code, &stderr, &["model.safetensors", "truncated"]);
    // Something else under the name (a header length beyond any file), and text.
    for junk in [&u64::MAX.to_le_bytes()[..], b"not a tensor file\n"] {
        std::fs::write(&path, junk).unwrap();
        let (code, _, stderr) = kiln(&["forward", "--model", tmp.path().to_str().unwrap(), "--ids", "1,2"]);
        assert_clean_error(code, &stderr, &["model.safetensors", "not a safetensors file"]);
    }
}

#[test]
fn adapter_config_of_the_wrong_type() {
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("adapter");
    let model = model_dir("llama");
    for (key, value, needle) in [("lora_alpha", "\"x\"", "`lora_alpha`: expected a number"), ("r", "0", "`r`: expected an integer > 0"), ("use_rslora", "1", "`use_rslora`: expected true or false")] {
        copy_model("llama-lora", &adapter);
        let cfg = adapter.join("adapter_config.json");
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        json[key] = serde_json::from_str(value).unwrap();
        std::fs::write(&cfg, json.to_string()).unwrap();
        let (code, _, stderr) = kiln(&["forward", "--model", model.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--ids", "1,2"]);
        assert_clean_error(code, &stderr, &["adapter_config.json", needle]);
    }
}

#[test]
fn shard_escaping_the_model_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    copy_model("llama", &dir);
    std::fs::rename(dir.join("model.safetensors"), tmp.path().join("outside.safetensors")).unwrap();
    let index = serde_json::json!({"metadata": {}, "weight_map": {"model.embed_tokens.weight": "../outside.safetensors"}});
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let (code, _, stderr) = kiln(&["forward", "--model", dir.to_str().unwrap(), "--ids", "1,2"]);
    assert_clean_error(code, &stderr, &["../outside.safetensors", "outside the model directory"]);
}

#[test]
fn sharded_checkpoint_loads() {
    // Split the llama fixture into two shards with an index, as large checkpoints come.
    let tmp = tempfile::tempdir().unwrap();
    copy_model("llama", tmp.path());
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    let (a, b) = names.split_at(names.len() / 2);
    let mut map = serde_json::Map::new();
    for (file, part) in [("model-00001-of-00002.safetensors", a), ("model-00002-of-00002.safetensors", b)] {
        let views: Vec<(String, safetensors::tensor::TensorView)> = part.iter().map(|n| (n.clone(), st.tensor(n).unwrap())).collect();
        safetensors::serialize_to_file(views, None, &tmp.path().join(file)).unwrap();
        for n in part {
            map.insert(n.clone(), serde_json::Value::String(file.into()));
        }
    }
    std::fs::remove_file(&path).unwrap();
    std::fs::write(tmp.path().join("model.safetensors.index.json"), serde_json::json!({"weight_map": map}).to_string()).unwrap();
    let out = tmp.path().join("logits.safetensors");
    let (code, _, stderr) = kiln(&["forward", "--model", tmp.path().to_str().unwrap(), "--ids", "1,2,3", "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
}

#[test]
fn wrong_shaped_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    copy_model("llama", tmp.path());
    let path = tmp.path().join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let name = "model.layers.0.self_attn.k_proj.weight";
    let views: Vec<(String, safetensors::tensor::TensorView)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            if n == name {
                let reshaped = safetensors::tensor::TensorView::new(v.dtype(), vec![64, 32], v.data()).unwrap();
                (n, reshaped)
            } else {
                (n, v)
            }
        })
        .collect();
    let data = safetensors::serialize(views, None).unwrap();
    std::fs::write(&path, data).unwrap();
    let (code, _, stderr) = kiln(&["forward", "--model", tmp.path().to_str().unwrap(), "--ids", "1,2"]);
    assert_clean_error(code, &stderr, &[name, "[64, 32]", "expected [32, 64]"]);
}

#[test]
fn token_id_outside_vocabulary() {
    let dir = model_dir("llama");
    let (code, _, stderr) = kiln(&["forward", "--model", dir.to_str().unwrap(), "--ids", "1,99999"]);
    assert_clean_error(code, &stderr, &["99999", "vocabulary"]);
}

#[test]
fn backend_not_compiled_in_names_the_feature() {
    if cfg!(feature = "rocm") {
        return;
    }
    let dir = model_dir("llama");
    let (code, _, stderr) = kiln(&["forward", "--model", dir.to_str().unwrap(), "--ids", "1", "--device", "rocm"]);
    assert_clean_error(code, &stderr, &["`rocm` feature"]);
}

#[test]
fn a_missing_recipe_names_its_cause_once() {
    let (code, _, stderr) = kiln(&["train", "/nonexistent/recipe.toml"]);
    assert_clean_error(code, &stderr, &["/nonexistent/recipe.toml", "cannot read recipe"]);
    assert_eq!(stderr.matches("No such file or directory").count(), 1, "{stderr}");
}

#[test]
fn missing_model_directory() {
    let (code, _, stderr) = kiln(&["generate", "--model", "/nonexistent/model", "--prompt", "hi"]);
    assert_clean_error(code, &stderr, &["/nonexistent/model", "not a model directory"]);
}

/// `kiln plan --json` and `kiln bench train --json`: the last line is one JSON object with the
/// documented keys; the plan's figures add up, a tiny device does not fit and gets suggestions.
#[test]
fn plan_and_bench_train_print_their_json_contract() {
    let recipe = concat!(env!("CARGO_MANIFEST_DIR"), "/recipes/quickstart.toml");
    let last = |out: &str| -> serde_json::Value { serde_json::from_str(out.trim().lines().last().unwrap()).unwrap() };

    let (code, out, err) = common::kiln(&["plan", recipe, "--device", "cpu", "--json"]);
    assert_eq!(code, 0, "{err}");
    let plan = last(&out);
    let parts: u64 = ["weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "backward_bytes", "logits_bytes"].iter().map(|k| plan[*k].as_u64().unwrap()).sum();
    assert_eq!(plan["live_bytes"].as_u64().unwrap(), parts);
    // The CPU allocates tensor by tensor: its peak is the tensors themselves.
    assert_eq!(plan["peak_bytes"].as_u64().unwrap(), parts);
    assert_eq!(plan["fits"], serde_json::json!(true));

    // A GPU's peak is what CubeCL's pool reserves for the same tensors.
    let (code, out, err) = common::kiln(&["plan", recipe, "--device", "wgpu", "--json"]);
    assert_eq!(code, 0, "{err}");
    let gpu = last(&out);
    let live = gpu["live_bytes"].as_u64().unwrap();
    assert_eq!(gpu["peak_bytes"].as_u64().unwrap(), (live as f64 * kiln::train::plan::pool_factor(kiln::backend::DeviceSpec::Wgpu(kiln::backend::WgpuPick::Default))) as u64);

    let (code, out, err) = common::kiln(&["plan", recipe, "--memory-gib", "0.06", "--json"]);
    assert_eq!(code, 0, "{err}");
    let small = last(&out);
    assert_eq!(small["fits"], serde_json::json!(false));
    assert!(!small["suggestions"].as_array().unwrap().is_empty(), "{small}");

    let (code, _, err) = common::kiln(&["plan", recipe, "--memory-gib=0"]);
    assert_ne!(code, 0);
    assert!(err.contains("--memory-gib must be positive"), "{err}");

    let (code, out, err) = common::kiln(&["bench", "train", "--recipe", recipe, "--steps", "4", "--json"]);
    assert_eq!(code, 0, "{err}");
    let bench = last(&out);
    for key in ["tokens_per_s", "step_s", "peak_bytes"] {
        assert!(bench[key].as_f64().is_some_and(|v| v > 0.0), "{key} missing in {bench}");
    }
    assert_eq!(bench["peak_of"], "host_rss");

    // The recipe's `run.device` is the one timed: asking for ROCm fails in a build without it.
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(recipe).unwrap().replace("device = \"cpu\"", "device = \"rocm\"");
    let rocm = dir.path().join("rocm.toml");
    std::fs::write(&rocm, text.replace("\"../datasets/", &format!("\"{}/datasets/", env!("CARGO_MANIFEST_DIR")))).unwrap();
    let (code, _, err) = common::kiln(&["bench", "train", "--recipe", rocm.to_str().unwrap(), "--steps", "3", "--json"]);
    assert_clean_error(code, &err, &["`rocm` feature"]);
}

#[test]
fn bench_fused_checks_the_listed_operations_and_rejects_unknown_ones() {
    let (code, stdout, stderr) = kiln(&["bench", "fused", "--device", "cpu", "--runs", "1", "--only", "rope, rms_norm", "--json"]);
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or_default()).unwrap();
    let ops: std::collections::BTreeSet<&str> = report["cases"].as_array().unwrap().iter().map(|c| c["op"].as_str().unwrap()).collect();
    assert_eq!(ops, ["rms_norm", "rope"].into_iter().collect());
    assert_eq!(report["pass"], true, "{stdout}");
    let (code, _, stderr) = kiln(&["bench", "fused", "--device", "cpu", "--only", "rope,ropes"]);
    assert_clean_error(code, &stderr, &["--only ropes", "rms_norm"]);
}
