//! Probe signals against values computed directly from transformers' hidden states and
//! attention weights (tests/fixtures/make_probes.py), and the parameter / gradient probes
//! against their dense definitions.

mod common;

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::prelude::*;
use burn::tensor::TensorData;
use serde_json::Value;

use common::model_dir;
use kiln::backend::Cpu;
use kiln::lora::{self, LoraSpec};
use kiln::model::Model;
use kiln::run::Event;

fn expected(name: &str) -> Value {
    let text = std::fs::read_to_string(model_dir(name).join("probes.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn examples(v: &Value) -> Vec<Vec<u32>> {
    v["examples"].as_array().unwrap().iter().map(|e| e.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect()).collect()
}

/// The probe event named `signal`, flattened layer by layer.
fn signal(events: &[Event], signal: &str) -> Vec<f64> {
    events
        .iter()
        .find_map(|e| match e {
            Event::Probe { signal: s, values, .. } if s == signal => Some(values.iter().flatten().copied().collect()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no {signal} event"))
}

fn flat(v: &Value) -> Vec<f64> {
    match v {
        Value::Array(a) => a.iter().flat_map(flat).collect(),
        x => vec![x.as_f64().unwrap()],
    }
}

fn assert_close(name: &str, ours: &[f64], theirs: &[f64], tol: f64) {
    assert_eq!(ours.len(), theirs.len(), "{name}: length");
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert!((a - b).abs() <= tol * (1.0 + b.abs()), "{name}[{i}]: kiln {a}, transformers {b}");
    }
}

fn check_forward_signals(name: &str, model: &Model<Cpu>, base: Option<&Model<Cpu>>) -> Vec<Event> {
    let want = expected(name);
    let events = kiln::probe::forward_signals(model, base, &examples(&want), 7);
    assert!(events.iter().all(|e| e.step() == 7));
    for key in ["residual_rms", "layer_coherence", "attention_entropy", "attention_distance", "logit_entropy"] {
        assert_close(&format!("{name} {key}"), &signal(&events, key), &flat(&want[key]), 1e-4);
    }
    events
}

#[test]
fn forward_probes_match_transformers_llama() {
    let model = Model::<Cpu>::load(&model_dir("llama"), &Default::default()).unwrap();
    let events = check_forward_signals("llama", &model, None);
    assert!(!events.iter().any(|e| matches!(e, Event::Probe { signal, .. } if signal == "kl_to_base")));
    // Per-head signals carry one label per head.
    let heads = events.iter().find_map(|e| match e { Event::Probe { signal, labels, .. } if signal == "attention_entropy" => Some(labels.clone()), _ => None }).unwrap();
    assert_eq!(heads, (0..model.config.num_heads).map(|h| format!("h{h}")).collect::<Vec<_>>());
}

/// Gemma 3: scaled embeddings, pre/post norms and sliding-window attention.
#[test]
fn forward_probes_match_transformers_gemma3() {
    let model = Model::<Cpu>::load(&model_dir("gemma3"), &Default::default()).unwrap();
    check_forward_signals("gemma3", &model, None);
}

/// With a PEFT adapter: the forward signals of the adapted model, KL to the base, and the
/// update norms ‖scale·B·A‖ per module.
#[test]
fn adapter_probes_match_transformers_and_peft() {
    let device = Default::default();
    let base = Model::<Cpu>::load(&model_dir("llama"), &device).unwrap();
    let (model, _) = kiln::lora::peft::load(base.clone(), &model_dir("llama-lora")).unwrap();
    let events = check_forward_signals("llama-lora", &model, Some(&base));
    let want = expected("llama-lora");
    assert_close("kl_to_base", &signal(&events, "kl_to_base"), &[want["kl_to_base"].as_f64().unwrap()], 1e-4);

    let Some(Event::Probe { layers, values, labels, .. }) = kiln::probe::lora_update_norms(&model, 3) else { panic!("no lora_update_norm event") };
    let norms = want["lora_update_norm"].as_object().unwrap();
    assert_eq!(layers.len() * labels.len(), norms.len());
    for (layer, row) in layers.iter().zip(&values) {
        for (label, ours) in labels.iter().zip(row) {
            let theirs = norms[&format!("model.layers.{layer}.{label}")].as_f64().unwrap();
            assert!((ours - theirs).abs() < 1e-4 * theirs, "{layer}.{label}: kiln {ours}, peft {theirs}");
        }
    }
}

/// Per-layer gradient norms add up (in squares) to the global norm when only layers train.
#[test]
fn layer_grad_norms_add_up_to_the_global_norm() {
    type Ad = burn::backend::Autodiff<Cpu>;
    let device = Default::default();
    let base = Model::<Ad>::load(&model_dir("llama"), &device).unwrap();
    let spec = LoraSpec { rank: 4, alpha: 8.0, dropout: 0.0, rslora: false, targets: vec!["all-linear".into()], layers: None, experts: false };
    // Only the adapters train (B starts at zero, so only B's gradients are non-zero).
    let model = lora::attach(base, &spec, 1);
    let ids = Tensor::<Ad, 2, Int>::from_data(TensorData::new(vec![5i64, 9, 14, 3, 77, 120], [1, 6]), &device);
    let loss = model.forward(ids, None).powi_scalar(2).mean();
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let Some(Event::Probe { layers, values, .. }) = kiln::probe::layer_grad_norms(&model, &grads, 1) else { panic!("no grad_norm event") };
    assert_eq!(layers, vec![0, 1]);
    let sum_sq: f64 = values.iter().map(|v| v[0] * v[0]).sum();
    let global = kiln::train::optim::global_grad_norm(&model, &grads);
    assert!(global > 0.0);
    assert!((sum_sq.sqrt() - global).abs() < 1e-6 * global, "{} vs {global}", sum_sq.sqrt());
    // No adapters, nothing to report.
    assert!(kiln::probe::lora_update_norms(&model.valid(), 1).is_some());
    let plain = Model::<Cpu>::load(&model_dir("llama"), &device).unwrap();
    assert!(kiln::probe::lora_update_norms(&plain, 1).is_none());
}

/// A rank above a module's size (the Gram matrices larger than the update itself) gives the
/// same norms, through the dense update: the fixture's 64-wide projections at rank 72 take that
/// form, the 160-wide MLP ones the Gram form.
#[test]
fn update_norms_at_a_rank_above_the_module_size() {
    let device = Default::default();
    let base = Model::<Cpu>::load(&model_dir("llama"), &device).unwrap();
    let spec = LoraSpec { rank: 72, alpha: 16.0, dropout: 0.0, rslora: false, targets: vec!["all-linear".into()], layers: None, experts: false };
    let mut model = lora::attach(base, &spec, 1);
    let mut expected = Vec::new();
    for layer in 0..model.layers.len() {
        for (_, linear) in lora::projections_mut(&mut model, layer) {
            let lora = linear.lora.as_mut().unwrap();
            // B starts at zero; any values will do.
            let b = lora.b.val();
            lora.b = burn::module::Param::from_tensor(Tensor::random(b.shape(), burn::tensor::Distribution::Normal(0.0, 0.1), &device));
            expected.push(lora.delta().powi_scalar(2).sum().into_scalar().sqrt() as f64);
        }
    }
    let Some(Event::Probe { values, .. }) = kiln::probe::lora_update_norms(&model, 1) else { panic!("no lora_update_norm event") };
    let ours: Vec<f64> = values.into_iter().flatten().collect();
    assert_eq!(ours.len(), expected.len());
    for (ours, theirs) in ours.iter().zip(&expected) {
        assert!(theirs > &0.0 && (ours - theirs).abs() < 1e-4 * theirs, "kiln {ours}, dense {theirs}");
    }
}
