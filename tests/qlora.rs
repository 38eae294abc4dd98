//! QLoRA: LoRA over a base whose projections run on the quantised kernels. The layer's
//! gradients against the same layer over the dequantised dense weight; a QLoRA run against a
//! LoRA run on the dequantised base (same seed, same data: the loss curves must agree); MLX
//! checkpoints loaded as stored; fusing into the dequantised base; recipe errors.

mod common;

use std::path::Path;
use std::sync::atomic::AtomicBool;

use burn::backend::Autodiff;
use burn::module::Param;
use burn::prelude::*;
use burn::tensor::TensorData;
use common::*;
use kiln::backend::{Cpu, QuantMatmul};
use kiln::lora::Lora;
use kiln::model::layers::{Linear, LinearWeight};
use kiln::model::Model;
use kiln::quant::affine::QuantSpec;
use kiln::recipe::Recipe;
use kiln::run::{Event, Recorder};
use kiln::train::{train, TrainOptions};
use rand::{Rng, SeedableRng};

fn values<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec().unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// The same float weights as a quantised layer and as a dense layer over the dequantised
/// weight, both with the same adapter; returns the gradients of sum(c ⊙ y) w.r.t. x, A and B.
fn layer_grads<A: burn::tensor::backend::AutodiffBackend + QuantMatmul>(spec: QuantSpec, quantised: bool, device: &A::Device) -> Vec<Vec<f32>> {
    let (m, d_in, d_out, rank) = (7, 256, 45, 4); // 256: one Q4_K super-block per row
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut normal = |n: usize, s: f32| -> Vec<f32> { (0..n).map(|_| s * (rng.random::<f32>() - 0.5)).collect() };
    let w = normal(d_out * d_in, 0.2);
    let (x, c, a, b, bias) = (normal(m * d_in, 2.0), normal(m * d_out, 2.0), normal(d_in * rank, 0.5), normal(rank * d_out, 0.5), normal(d_out, 0.1));
    let q = spec.quantize(&w, d_out, d_in).unwrap();
    let bias = Some(Param::from_tensor(Tensor::<A, 1>::from_data(TensorData::new(bias, [d_out]), device)));
    let mut layer = if quantised {
        Linear::<A>::from_quant(&q, bias, device)
    } else {
        Linear::<A>::from_hf(&q.dequantize(), d_out, d_in, bias.map(|b| b.val()), device)
    };
    assert_eq!(matches!(layer.weight, LinearWeight::Quant(_)), quantised);
    let param = |v: Vec<f32>, shape: [usize; 2]| Param::from_tensor(Tensor::<A, 2>::from_data(TensorData::new(v, shape), device).require_grad());
    layer.lora = Some(Lora { a: param(a, [d_in, rank]), b: param(b, [rank, d_out]), scale: 2.0, dropout: 0.0 });
    let layer = layer.no_grad_base();
    let xt = Tensor::<A, 3>::from_data(TensorData::new(x, [1, m, d_in]), device).require_grad();
    let ct = Tensor::<A, 3>::from_data(TensorData::new(c, [1, m, d_out]), device);
    let y = layer.forward(xt.clone());
    let grads = (y.clone() * ct).sum().backward();
    let lora = layer.lora.as_ref().unwrap();
    vec![
        values(y.inner()),
        values(xt.grad(&grads).unwrap()),
        values(lora.a.val().grad(&grads).unwrap()),
        values(lora.b.val().grad(&grads).unwrap()),
    ]
}

trait NoGradBase {
    fn no_grad_base(self) -> Self;
}

impl<B: Backend> NoGradBase for Linear<B> {
    /// Freezes the dense base as `lora::attach` does, keeping the adapter trainable.
    fn no_grad_base(mut self) -> Self {
        if let LinearWeight::Dense(w) = self.weight {
            self.weight = LinearWeight::Dense(w.set_require_grad(false));
        }
        self
    }
}

#[test]
fn quant_linear_gradients_equal_the_dequantised_dense_layer() {
    let device = Default::default();
    for spec in ["q4_g64", "q8_g32", "gguf:q4_k", "gguf:q8_0"].map(|s| QuantSpec::parse(s).unwrap()) {
        let q = layer_grads::<Autodiff<Cpu>>(spec, true, &device);
        let d = layer_grads::<Autodiff<Cpu>>(spec, false, &device);
        for (name, (a, b)) in ["output", "grad x", "grad lora A", "grad lora B"].iter().zip(q.iter().zip(&d)) {
            let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let diff = max_diff(a, b);
            assert!(diff <= 1e-5 * scale.max(1.0), "{spec} {name}: quantised layer differs from the dense one by {diff:e} (scale {scale})");
        }
    }
}

/// A LoRA recipe on the trained arith-256 fixture (256 wide: groups of 64 fit every
/// projection), subtraction data, no dropout.
fn recipe(out: &Path, model: &Path, quantize: Option<&str>) -> Recipe {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let quantize = quantize.map(|q| format!("quantize = \"{q}\"")).unwrap_or_default();
    let text = format!(
        r#"method = "lora"
[run]
name = "q"
output_dir = "{out}"
seed = 3
[model]
path = "{model}"
{quantize}
[data]
train = "{data}/train.jsonl"
valid = "{data}/valid.jsonl"
max_seq_len = 64
[lora]
rank = 8
alpha = 16
dropout = 0.0
targets = ["all-linear"]
[train]
steps = 16
batch_size = 4
learning_rate = 2e-3
warmup_steps = 2
log_every = 1
[eval]
every = 8
max_batches = 2
[checkpoint]
every = 0
[export]
adapter = true
fused = true
"#,
        out = out.display(),
        model = model.display(),
        data = root.join("datasets/arith-sub").display(),
    );
    Recipe::from_str(&text, &out.join("q.toml")).unwrap()
}

fn losses(events: &[Event]) -> Vec<f64> {
    events.iter().filter_map(|e| match e { Event::Train { loss, .. } => Some(*loss), _ => None }).collect()
}

#[test]
fn qlora_tracks_lora_on_the_dequantised_base() {
    let base = model_dir("arith-256");
    let spec = QuantSpec::parse("q4_g64").unwrap();
    let tmp = tempfile::tempdir().unwrap();
    // The dequantised base as a float checkpoint: what QLoRA's forward computes, in dense form.
    let dequantised = tmp.path().join("dequantised");
    let model = Model::<Cpu>::load_quantized(&base, Some(spec), &Default::default()).unwrap();
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    kiln::model::save::save_hf_dir(&model, &config, &base, &dequantised).unwrap();

    let stop = AtomicBool::new(false);
    let run = |model: &Path, quantize: Option<&str>, out: &Path| {
        let mut rec = Recorder::default();
        train::<Autodiff<Cpu>>(&recipe(out, model, quantize), &TrainOptions::default(), &Default::default(), &mut rec, &stop).unwrap();
        rec.events
    };
    let qlora = run(&base, Some("q4_g64"), &tmp.path().join("qlora"));
    let lora = run(&dequantised, None, &tmp.path().join("lora"));
    let (q, l) = (losses(&qlora), losses(&lora));
    assert_eq!(q.len(), 16);
    assert_eq!(q.len(), l.len());
    // The same function, computed by the quantised kernels in one run and by a dense matmul in
    // the other: the curves agree to float rounding, step after step (measured: 2e-5 relative;
    // LoRA on the original float base is 6e-2 away, so this tells the two bases apart).
    for (i, (a, b)) in q.iter().zip(&l).enumerate() {
        assert!((a - b).abs() <= 5e-4 * b.abs(), "step {}: QLoRA loss {a} vs LoRA on the dequantised base {b}\n{q:?}\n{l:?}", i + 1);
    }
    let first = q[..4].iter().sum::<f64>() / 4.0;
    let last = q[q.len() - 4..].iter().sum::<f64>() / 4.0;
    assert!(last < first, "QLoRA loss did not fall: {q:?}");
    assert!(qlora.iter().any(|e| matches!(e, Event::Warning { message, .. } if message.contains("dequantised q4_g64"))), "no warning that the fused model is the dequantised base");

    // The adapter remembers its base's quantisation: eval through the command line picks it
    // up and says so.
    let adapter = tmp.path().join("qlora/q/adapter");
    let side: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(adapter.join("kiln_adapter.json")).unwrap()).unwrap();
    assert_eq!(side["base_quantization"], "q4_g64");
    let (code, _, stderr) = kiln(&["forward", "--model", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--ids", "1,2,3"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("q4_g64"), "{stderr}");

    // `kiln fuse` folds the adapter into the dequantised base, says so, and the fused model
    // computes what the base + adapter did; the run's own fused model is the same.
    let fused = tmp.path().join("fused");
    let (code, _, stderr) = kiln(&["fuse", "--model", base.to_str().unwrap(), "--adapter", adapter.to_str().unwrap(), "--out", fused.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("dequantised"), "{stderr}");
    let device = Default::default();
    let ids = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(vec![1i64, 5, 9, 2, 7, 3], [1, 6]), &device);
    let with_adapter = kiln::lora::peft::load(Model::<Cpu>::load_quantized(&base, Some(spec), &device).unwrap(), &adapter).unwrap().0;
    let want = values(with_adapter.forward(ids.clone(), None));
    for dir in [fused, tmp.path().join("qlora/q/final")] {
        let got = values(Model::<Cpu>::load(&dir, &device).unwrap().forward(ids.clone(), None));
        let diff = max_diff(&got, &want);
        assert!(diff < 1e-4, "{}: fused logits differ from base + adapter by {diff:e}", dir.display());
    }
}

#[test]
fn mlx_quantised_checkpoint_runs_as_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mlx");
    let (code, _, stderr) = kiln(&["export", "mlx", "--model", model_dir("arith-256").to_str().unwrap(), "--bits", "4", "--group-size", "64", "--out", out.to_str().unwrap()]);
    assert_eq!(code, 0, "{stderr}");
    let device = Default::default();
    let model = Model::<Cpu>::load(&out, &device).unwrap();
    let quantised = (0..model.layers.len()).flat_map(|i| kiln::lora::projections(&model, i)).filter(|(_, l)| l.quant_format().is_some()).count();
    assert_eq!(quantised, 7 * model.layers.len(), "every projection should stay quantised");
    // Against the same weights dequantised into a dense model (embeddings, stored quantised
    // too, are dequantised on load either way).
    let dense_dir = tmp.path().join("dense");
    let config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    kiln::model::save::save_hf_dir(&model, &config, &out, &dense_dir).unwrap();
    let dense = Model::<Cpu>::load(&dense_dir, &device).unwrap();
    assert!(kiln::lora::quantized_formats(&dense).is_empty());
    let ids = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(vec![1i64, 4, 6, 2, 8, 3, 3], [1, 7]), &device);
    let diff = max_diff(&values(model.forward(ids.clone(), None)), &values(dense.forward(ids, None)));
    assert!(diff < 1e-4, "MLX q4 checkpoint on the kernels vs dequantised dense: {diff:e}");
    // Asking for another quantisation of an already-quantised checkpoint is refused.
    let err = Model::<Cpu>::load_quantized(&out, QuantSpec::parse("q8_g64"), &device).unwrap_err().to_string();
    assert!(err.contains("stored quantised as q4_g64"), "{err}");
}

#[test]
fn quantised_forward_on_wgpu_matches_the_cpu() {
    if !wgpu_available() {
        eprintln!("no Vulkan driver: skipping the wgpu QuantLinear check");
        return;
    }
    let spec = QuantSpec::parse("q4_g32");
    let ids = vec![1i64, 5, 9, 2, 7, 3, 11, 4];
    let cpu = Model::<Cpu>::load_quantized(&model_dir("llama"), spec, &Default::default()).unwrap();
    let want = values(cpu.forward(Tensor::from_data(TensorData::new(ids.clone(), [1, 8]), &Default::default()), None));
    let device = Default::default();
    let gpu = Model::<kiln::backend::Wgpu>::load_quantized(&model_dir("llama"), spec, &device).unwrap();
    let got = values(gpu.forward(Tensor::from_data(TensorData::new(ids, [1, 8]), &device), None));
    let diff = max_diff(&got, &want);
    assert!(diff < 1e-4, "wgpu vs cpu quantised logits: {diff:e}");
}

#[test]
fn quantize_setting_errors_are_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| {
        let path = tmp.path().join(name);
        std::fs::write(&path, body).unwrap();
        path
    };
    let model = model_dir("arith-256");
    let typo = write("typo.toml", &format!("method = \"lora\"\n[model]\npath = \"{}\"\nquantize = \"q4_g46\"\n[data]\ntrain = \"x.jsonl\"\n", model.display()));
    let err = Recipe::load(&typo).unwrap_err().to_string();
    assert!(err.contains("typo.toml") && err.contains("model.quantize") && err.contains("q4_g64"), "{err}");
    let full = write("full.toml", &format!("method = \"full\"\n[model]\npath = \"{}\"\nquantize = \"q4_g64\"\n[data]\ntrain = \"x.jsonl\"\n", model.display()));
    let err = Recipe::load(&full).unwrap_err().to_string();
    assert!(err.contains("model.quantize") && err.contains("QLoRA"), "{err}");
    // A group that does not divide the rows names the tensor and the groups that would.
    let (code, _, stderr) = kiln(&["forward", "--model", model_dir("llama").to_str().unwrap(), "--ids", "1,2", "--quantize", "q4_g64"]);
    assert_ne!(code, 0);
    assert!(stderr.contains("down_proj") && stderr.contains("q4_g32"), "{stderr}");
}
