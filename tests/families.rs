//! Gemma 4 and mixture-of-experts models through the whole workflow: a LoRA recipe trains
//! them and lowers the loss, the adapter saves and loads, `kiln fuse` folds it into a
//! checkpoint that computes what the adapted model computes, and the routers report what they
//! did.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::TensorData;
use common::*;
use kiln::backend::Cpu;
use kiln::lora;
use kiln::model::Model;
use kiln::recipe::Recipe;
use kiln::run::{Event, Recorder};
use kiln::train::{train, TrainOptions};

/// A LoRA recipe on fixture `model` and the arithmetic data (its tokenizer is every fixture's).
fn recipe(model: &str, out: &Path, experts: bool) -> Recipe {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = format!(
        r#"method = "lora"
[run]
name = "tiny"
output_dir = "{out}"
seed = 3
[model]
path = "{model}"
[data]
train = "{data}/train.jsonl"
valid = "{data}/valid.jsonl"
max_seq_len = 64
[lora]
rank = 4
alpha = 8
targets = ["all-linear"]
experts = {experts}
[train]
steps = 12
batch_size = 4
learning_rate = 3e-3
warmup_steps = 2
log_every = 1
[eval]
every = 6
max_batches = 2
[probes]
every = 6
"#,
        out = out.display(),
        model = model_dir(model).display(),
        data = root.join("datasets/arith").display(),
    );
    Recipe::from_str(&text, &out.join("tiny.toml")).unwrap()
}

/// Trains `name` with a LoRA recipe; checks the loss falls, then that the saved adapter, loaded
/// again and fused by `kiln fuse`, gives the trained model's logits.
fn fine_tune_and_fuse(name: &str, experts: bool, adapters: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let mut rec = Recorder::default();
    train::<Autodiff<Cpu>>(&recipe(name, tmp.path(), experts), &TrainOptions::default(), &Default::default(), &mut rec, &AtomicBool::new(false)).unwrap();
    let evals: Vec<f64> = rec.events.iter().filter_map(|e| match e { Event::Eval { loss, .. } => Some(*loss), _ => None }).collect();
    assert!(evals.len() >= 2 && evals.iter().all(|l| l.is_finite()), "{name}: {evals:?}");
    assert!(evals.last().unwrap() < evals.first().unwrap(), "{name}: eval loss did not fall: {evals:?}");
    // Each probe measurement (steps 0, 6 and 12) of an MoE model reports its routers; every
    // model reports KL to its base (the model without adapters).
    let probes: Vec<(&str, usize, usize)> = rec.events.iter().filter_map(|e| match e { Event::Probe { step, signal, values, .. } => Some((signal.as_str(), *step, values.len())), _ => None }).collect();
    let moe_layers = Model::<Cpu>::load(&model_dir(name), &Default::default()).unwrap().config.layers.iter().filter(|l| l.moe).count();
    let routers: Vec<_> = probes.iter().filter(|(s, ..)| ["expert_load", "router_entropy"].contains(s)).collect();
    if moe_layers > 0 {
        assert_eq!(routers.iter().map(|p| p.1).collect::<Vec<_>>(), vec![0, 0, 6, 6, 12, 12], "{name}: {probes:?}");
        assert!(routers.iter().all(|p| p.2 == moe_layers), "{probes:?}");
    } else {
        assert!(routers.is_empty(), "{name}: {probes:?}");
    }
    let kl: Vec<usize> = probes.iter().filter(|p| p.0 == "kl_to_base").map(|p| p.1).collect();
    assert_eq!(kl, vec![0, 6, 12], "{name}");

    let device = Default::default();
    let adapter = tmp.path().join("tiny/adapter");
    let base = Model::<Cpu>::load(&model_dir(name), &device).unwrap();
    let (adapted, spec) = lora::peft::load(base, &adapter).unwrap();
    assert_eq!(lora::count(&adapted), adapters, "{name}: adapters attached");
    assert_eq!(spec.experts, experts);
    let want: Vec<f64> = logits_of(&adapted, name).iter().map(|&x| x as f64).collect();
    let base_logits = logits_of(&Model::<Cpu>::load(&model_dir(name), &device).unwrap(), name);
    assert!(max_abs_diff(&base_logits, &want) > 1e-3, "{name}: the trained adapter changes nothing");

    let fused = tmp.path().join("fused");
    let (code, _, stderr) = kiln(&["fuse", "--model", model_dir(name).to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", fused.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let model = Model::<Cpu>::load(&fused, &device).unwrap();
    assert_eq!(lora::count(&model), 0);
    // Fusing rounds `W + s·B·A` to f32 once per weight; the layers' norms carry that rounding
    // to the logits as up to ~1e-5 of their size (measured: 4.5e-5 on logits up to 4.9 for
    // gemma4-kv-shared, 1.3e-5 on 5.3 for gemma4-moe). The trained adapters move them by more
    // than 1e-3 (asserted above).
    let scale = want.iter().fold(1f64, |m, x| m.max(x.abs()));
    let diff = max_abs_diff(&logits_of(&model, name), &want);
    assert!(diff < 1e-4 * scale, "{name}: fused checkpoint differs from the adapted model by {diff:e} (logits up to {scale:.2})");
}

#[test]
fn gemma4_lora_fine_tune_lowers_the_loss_and_fuses() {
    // 4 layers × 7 projections.
    fine_tune_and_fuse("gemma4", false, 28);
}

#[test]
fn qwen3_moe_lora_on_attention_and_every_expert() {
    // 2 layers × (4 attention + 4 experts × 3) projections.
    fine_tune_and_fuse("qwen3-moe", true, 32);
}

#[test]
fn gemma4_moe_lora_on_stacked_experts_fuses_back_into_them() {
    // 4 layers × (7 dense + 4 experts × 3) projections.
    fine_tune_and_fuse("gemma4-moe", true, 76);
}

#[test]
fn gemma4_kv_sharing_layers_have_no_key_value_adapters() {
    // 6 layers × 7 projections, less k and v on the 2 sharing layers.
    fine_tune_and_fuse("gemma4-kv-shared", false, 38);
}

#[test]
fn qwen3_moe_lora_without_experts_adapts_attention_only() {
    let spec = lora::LoraSpec { rank: 2, alpha: 4.0, dropout: 0.0, rslora: false, targets: vec!["all-linear".into()], layers: None, experts: false };
    let model = lora::attach(Model::<Cpu>::load(&model_dir("qwen3-moe"), &Default::default()).unwrap(), &spec, 0);
    assert_eq!(lora::count(&model), 8);
}

/// Saving a model writes back exactly the checkpoint it was loaded from: every tensor name,
/// shape and value (stacked experts, per-layer inputs and layer scalars included).
#[test]
fn save_round_trips_every_tensor() {
    use kiln::model::weights::WeightFiles;
    for name in ["gemma4", "gemma4-kv-shared", "gemma4-k-eq-v", "gemma4-moe", "qwen3-moe", "qwen3-moe-mixed"] {
        let model = Model::<Cpu>::load(&model_dir(name), &Default::default()).unwrap();
        let saved = kiln::model::save::hf_tensors(&model);
        let original = WeightFiles::open(&model_dir(name)).unwrap();
        let mut names: Vec<&str> = original.names().collect();
        names.sort();
        let mut ours: Vec<&str> = saved.iter().map(|(n, _, _)| n.as_str()).collect();
        ours.sort();
        assert_eq!(ours, names, "{name}: tensor names");
        for (tensor, shape, data) in &saved {
            assert_eq!(original.shape(tensor).as_ref(), Some(shape), "{name}: {tensor}");
            assert_eq!(&original.f32(tensor, shape).unwrap(), data, "{name}: {tensor}");
        }
    }
}

/// The router statistics are what the router's own softmax says: loads count each token's top
/// k, and the entropy is the mean entropy of the full distribution.
#[test]
fn router_stats_match_the_router() {
    let device = Default::default();
    let model = Model::<Cpu>::load(&model_dir("qwen3-moe"), &device).unwrap();
    let (shape, ids) = reference_ids("qwen3-moe", "input_ids");
    let data: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
    let ids = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(data, [shape[0], shape[1]]), &device);
    let stats = model.router_stats(ids);
    assert_eq!(stats.iter().map(|s| s.layer).collect::<Vec<_>>(), vec![0, 1]);
    for s in &stats {
        assert_eq!(s.tokens, 48);
        assert_eq!(s.load.len(), 4);
        assert!((s.load.iter().sum::<f64>() - 2.0).abs() < 1e-9, "top-2 loads sum to 2: {:?}", s.load);
        assert!(s.entropy > 0.0 && s.entropy <= 4f64.ln() + 1e-9, "{}", s.entropy);
    }
    let dense = Model::<Cpu>::load(&model_dir("llama"), &device).unwrap();
    let ids = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(vec![1i64, 2, 3], [1, 3]), &device);
    assert!(dense.router_stats(ids).is_empty());
}
