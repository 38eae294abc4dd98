//! `kiln bench fused`: kiln's fused operations against the plain composition on any device,
//! forward and gradients checked on fresh random inputs, then both timed (forward + backward).
//! The same checks as `tests/fused_ops.rs`, for devices CI cannot reach (CUDA), at the sizes a
//! Qwen2.5-0.5B training step runs them.

use std::time::Instant;

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, FloatDType, TensorData};
use kiln_kernels::attention::{attention_composition, set_attention_path, AttentionPath};
use kiln_kernels::gated::activate;
use kiln_kernels::loss::lm_head_loss_composition;
use kiln_kernels::norm::rms_norm_composition;
use kiln_kernels::rope::rope_composition;
use kiln_kernels::{chunk_rows, flash_attention, frozen_matmul, gated_act, gated_down, lm_head_loss, rms_norm_as, rope, AttentionSpec, GateActivation, HeadLayout, HeadLoss};
use serde_json::json;

use crate::backend::{DeviceSpec, QuantMatmul};
use crate::model::layers::{causal_mask, rope_tables};

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap_or_default()
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    if a.len() != b.len() || a.iter().any(|x| !x.is_finite()) {
        return f64::INFINITY;
    }
    (num / den.max(1e-30)).sqrt()
}

/// One forward + backward of an operation, fused or plain: the seconds it took (synchronised)
/// and its outputs, named.
type Run<'a> = dyn Fn(bool) -> (f64, Vec<(&'static str, Vec<f32>)>) + 'a;

/// Relative error of each output of the fused run against the plain one, then the median
/// seconds of `runs` timed runs each way.
fn compare(op: &str, shape: String, runs: usize, run: &Run) -> serde_json::Value {
    let ((_, fused), (_, plain)) = (run(true), run(false));
    let errors: serde_json::Map<String, serde_json::Value> = fused.iter().zip(&plain).map(|((name, a), (_, b))| (name.to_string(), json!(rel(a, b)))).collect();
    let time = |fused: bool| {
        let mut t: Vec<f64> = (0..runs).map(|_| run(fused).0).collect();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    json!({ "op": op, "shape": shape, "rel_err": errors, "fused_s": time(true), "plain_s": time(false) })
}

/// Times `f` (which ends with the tensors to read back) to a device synchronisation.
fn timed<A: AutodiffBackend>(device: &A::Device, f: impl FnOnce() -> Vec<(&'static str, Vec<f32>)>) -> (f64, Vec<(&'static str, Vec<f32>)>) {
    let t = Instant::now();
    let out = f();
    let _ = A::sync(device);
    (t.elapsed().as_secs_f64(), out)
}

/// `half`: a frozen bf16 head (as bf16 training holds it: bf16 logits and gradients) against the
/// f32 composition over the same rounded weights.
#[allow(clippy::too_many_arguments)]
fn lm_head_case<A: AutodiffBackend + QuantMatmul>(device: &A::Device, n: usize, e: usize, v: usize, spec: HeadLoss, half: bool, runs: usize) -> serde_json::Value {
    let wdims = if spec.layout == HeadLayout::InOut { [e, v] } else { [v, e] };
    let h0 = Tensor::<A, 2>::random([n, e], Distribution::Normal(0.0, 1.0), device);
    let w0 = Tensor::<A, 2>::random(wdims, Distribution::Normal(0.0, 0.05), device);
    let w0 = if half { w0.cast(FloatDType::BF16).cast(FloatDType::F32) } else { w0 };
    let targets = Tensor::<A, 1, Int>::random([n], Distribution::Uniform(0.0, v as f64), device);
    let mask: Vec<f32> = (0..n).map(|i| if i % 7 == 3 { 0.0 } else { 1.0 }).collect();
    let mask = Tensor::<A, 1>::from_data(TensorData::new(mask, [n]), device);
    let run = |fused: bool| {
        let h = h0.clone().detach().require_grad();
        let w = if half { w0.clone().detach() } else { w0.clone().detach().require_grad() };
        let t = Instant::now();
        let loss = match fused {
            true if half => lm_head_loss(h.clone(), w.clone().cast(FloatDType::BF16), targets.clone(), mask.clone(), spec),
            true => lm_head_loss(h.clone(), w.clone(), targets.clone(), mask.clone(), spec),
            false => lm_head_loss_composition(h.clone(), w.clone(), targets.clone(), mask.clone(), spec),
        };
        let grads = loss.clone().backward();
        let (dh, dw) = (h.grad(&grads), w.grad(&grads));
        let _ = A::sync(device);
        let secs = t.elapsed().as_secs_f64();
        (secs, vec![("loss", host(loss)), ("dh", dh.map(host).unwrap_or_default()), ("dw", dw.map(host).unwrap_or_default())])
    };
    let softcap = spec.softcap.map_or("none".to_string(), |c| c.to_string());
    compare("lm_head_loss", format!("n {n} e {e} v {v} chunk {} {:?} softcap {softcap}{}", spec.chunk, spec.layout, if half { " bf16 head" } else { "" }), runs, &run)
}

#[allow(clippy::too_many_arguments)]
/// `biased` adds a random bias in `[-1, 0)` to the visible scores: a mask that is not zero
/// wherever it shows a key (kiln builds none, but the operation takes any additive mask).
fn attention_case<A: AutodiffBackend + QuantMatmul>(device: &A::Device, b: usize, h: usize, kv: usize, s: usize, d: usize, window: Option<usize>, softcap: Option<f64>, biased: bool, (path, bf16_products): (AttentionPath, bool), runs: usize) -> serde_json::Value {
    set_attention_path(path);
    let mask = causal_mask::<A>(s, 0, 0, window, device);
    let mask = match biased {
        true => mask + Tensor::<A, 3>::random([1, s, s], Distribution::Uniform(-1.0, 0.0), device),
        false => mask,
    };
    let spec = AttentionSpec { scale: 1.0 / (d as f64).sqrt(), softcap, causal: true, bf16_products };
    let normal = |heads: usize| Tensor::<A, 4>::random([b, heads, s, d], Distribution::Normal(0.0, 1.0), device);
    let (q0, k0, v0, c) = (normal(h), normal(kv), normal(kv), normal(h));
    let run = |fused: bool| {
        timed::<A>(device, || {
            let (q, k, v) = (q0.clone().detach().require_grad(), k0.clone().detach().require_grad(), v0.clone().detach().require_grad());
            let out = match fused {
                true => flash_attention(q.clone(), k.clone(), v.clone(), mask.clone(), spec),
                false => attention_composition(q.clone(), k.clone(), v.clone(), mask.clone(), spec).0,
            };
            let grads = (out.clone() * c.clone()).sum().backward();
            let grad = |t: &Tensor<A, 4>| t.grad(&grads).map(host).unwrap_or_default();
            vec![("out", host(out)), ("dq", grad(&q)), ("dk", grad(&k)), ("dv", grad(&v))]
        })
    };
    let softcap = softcap.map_or("none".to_string(), |c| c.to_string());
    let window = window.map_or("none".to_string(), |w| w.to_string());
    let before = kiln_kernels::tensor_core_attention_count();
    let mut r = compare("attention", format!("b {b} heads {h}/{kv} s {s} d {d} causal window {window} softcap {softcap}{} {path:?}{}", if biased { " biased" } else { "" }, if bf16_products { " bf16" } else { "" }), runs, &run);
    // Whether the forward ran on tensor cores (the `TensorCores` path falls back where it
    // does not apply): said in the result rather than assumed.
    let tensor_cores = kiln_kernels::tensor_core_attention_count() > before;
    r["tensor_cores"] = serde_json::Value::Bool(tensor_cores);
    if tensor_cores {
        if let Some(shape) = r["shape"].as_str().map(|s| format!("{s} (ran on tensor cores)")) {
            r["shape"] = serde_json::Value::String(shape);
        }
    }
    set_attention_path(AttentionPath::Auto);
    r
}

fn rope_case<A: AutodiffBackend + QuantMatmul>(device: &A::Device, b: usize, h: usize, s: usize, d: usize, runs: usize) -> serde_json::Value {
    let inv_freq: Vec<f32> = (0..d / 2).map(|i| 1.0 / 10_000f32.powf(2.0 * i as f32 / d as f32)).collect();
    let positions: Vec<usize> = (0..s).collect();
    let (cos, sin) = rope_tables::<A>(&inv_freq, &positions, 1, device);
    // The decoder's layout: the projection's `[b, s, h, d]` seen as `[b, h, s, d]`.
    let x0 = Tensor::<A, 4>::random([b, s, h, d], Distribution::Normal(0.0, 1.0), device);
    let c = Tensor::<A, 4>::random([b, h, s, d], Distribution::Normal(0.0, 1.0), device);
    let run = |fused: bool| {
        timed::<A>(device, || {
            let x = x0.clone().detach().require_grad();
            let x_in = x.clone().swap_dims(1, 2);
            let y = match fused {
                true => rope(x_in, cos.clone(), sin.clone()),
                false => rope_composition(x_in, cos.clone(), sin.clone()),
            };
            let grads = (y.clone() * c.clone()).sum().backward();
            vec![("y", host(y)), ("dx", x.grad(&grads).map(host).unwrap_or_default())]
        })
    };
    compare("rope", format!("b {b} heads {h} s {s} d {d}, positions-first input"), runs, &run)
}

/// `half`: the fused operation gets `gate` and `up` in bf16 (as bf16 projections write them)
/// and writes bf16, against the f32 composition.
fn gated_case<A: AutodiffBackend + QuantMatmul>(device: &A::Device, rows: usize, f: usize, act: GateActivation, half: bool, runs: usize) -> serde_json::Value {
    let normal = || Tensor::<A, 2>::random([rows, f], Distribution::Normal(0.0, 2.0), device);
    let (g0, u0, c) = (normal(), normal(), normal());
    let operand = if half { FloatDType::BF16 } else { FloatDType::F32 };
    let run = |fused: bool| {
        timed::<A>(device, || {
            let (g, u) = (g0.clone().detach().require_grad(), u0.clone().detach().require_grad());
            let y = match fused {
                true => gated_act(g.clone().cast(operand), u.clone().cast(operand), act).cast(FloatDType::F32),
                false => activate(g.clone(), act) * u.clone(),
            };
            let grads = (y.clone() * c.clone()).sum().backward();
            let grad = |t: &Tensor<A, 2>| t.grad(&grads).map(host).unwrap_or_default();
            vec![("y", host(y)), ("d_gate", grad(&g)), ("d_up", grad(&u))]
        })
    };
    compare("gated_act", format!("{rows} × {f} {act:?}{}", if half { " bf16" } else { "" }), runs, &run)
}

/// A product with a frozen weight: in bf16 where the device has it (the matmul writing f32)
/// against casting the input to bf16, multiplying, and casting the result back.
fn frozen_case<A: AutodiffBackend + QuantMatmul>(device: &A::Device, n: usize, k: usize, m: usize, runs: usize) -> serde_json::Value {
    let bf16 = A::supports_dtype(device, burn::tensor::DType::BF16);
    let dtype = if bf16 { FloatDType::BF16 } else { FloatDType::F32 };
    let x0 = Tensor::<A, 2>::random([n, k], Distribution::Normal(0.0, 1.0), device);
    let w = Tensor::<A, 2>::random([k, m], Distribution::Normal(0.0, 0.05), device).cast(dtype);
    let c = Tensor::<A, 2>::random([n, m], Distribution::Normal(0.0, 1.0), device);
    let run = |fused: bool| {
        timed::<A>(device, || {
            let x = x0.clone().detach().require_grad();
            let y = match fused {
                true => frozen_matmul(x.clone(), w.clone()),
                false => kiln_kernels::frozen::matmul_as(x.clone(), w.clone(), dtype),
            };
            let grads = (y.clone() * c.clone()).sum().backward();
            vec![("y", host(y)), ("dx", x.grad(&grads).map(host).unwrap_or_default())]
        })
    };
    compare("frozen_matmul", format!("{n} × {k} · {k} × {m} {}", if bf16 { "bf16" } else { "f32" }), runs, &run)
}

/// A frozen product with its rank-`r` LoRA adapter as one operation (on CUDA: cuBLAS, the
/// adapter scaled and added in place) against the plain composition (autodiff's gradients).
/// `out`: the dtype the operation writes `y` in (bf16 as the gated MLP's gate and up, whose
/// gradients then arrive in bf16 too), against the f32 composition.
fn lora_case<A: AutodiffBackend + QuantMatmul>(device: &A::Device, n: usize, k: usize, m: usize, r: usize, out: FloatDType, runs: usize) -> serde_json::Value {
    let bf16 = A::supports_dtype(device, burn::tensor::DType::BF16);
    let dtype = if bf16 { FloatDType::BF16 } else { FloatDType::F32 };
    let x0 = Tensor::<A, 2>::random([n, k], Distribution::Normal(0.0, 1.0), device);
    let w = Tensor::<A, 2>::random([k, m], Distribution::Normal(0.0, 0.05), device).cast(dtype);
    let a0 = Tensor::<A, 2>::random([k, r], Distribution::Normal(0.0, 0.05), device);
    let b0 = Tensor::<A, 2>::random([r, m], Distribution::Normal(0.0, 0.05), device);
    let c = Tensor::<A, 2>::random([n, m], Distribution::Normal(0.0, 1.0), device);
    let run = |fused: bool| {
        timed::<A>(device, || {
            let (x, a, b) = (x0.clone().detach().require_grad(), a0.clone().detach().require_grad(), b0.clone().detach().require_grad());
            let y = match fused {
                // Read back in f32: the cast's backward hands the product its gradient in `out`.
                true => kiln_kernels::frozen::frozen_lora_as(x.clone(), w.clone(), a.clone(), b.clone(), 2.0, out).cast(FloatDType::F32),
                false => kiln_kernels::frozen::matmul_as(x.clone(), w.clone(), dtype) + x.clone().matmul(a.clone()).mul_scalar(2.0).matmul(b.clone()),
            };
            let grads = (y.clone() * c.clone()).sum().backward();
            let grad = |t: &Tensor<A, 2>| t.grad(&grads).map(host).unwrap_or_default();
            vec![("y", host(y.clone())), ("dx", grad(&x)), ("dA", grad(&a)), ("dB", grad(&b))]
        })
    };
    compare("frozen_lora", format!("{n} × {k} · {k} × {m} r {r} {} -> {out:?}", if bf16 { "bf16" } else { "f32" }), runs, &run)
}

/// The gated MLP's down projection with its adapter over `act(gate) · up`, recomputing that
/// product in backward (`gate`, `up` and the weight in bf16 where the device has it, as bf16
/// training runs it), against the f32 composition.
fn gated_down_case<A: AutodiffBackend + QuantMatmul>(device: &A::Device, n: usize, f: usize, m: usize, r: usize, runs: usize) -> serde_json::Value {
    let bf16 = A::supports_dtype(device, burn::tensor::DType::BF16);
    let dtype = if bf16 { FloatDType::BF16 } else { FloatDType::F32 };
    let normal = |shape: [usize; 2], sd: f64| Tensor::<A, 2>::random(shape, Distribution::Normal(0.0, sd), device);
    let (g0, u0) = (normal([n, f], 2.0).cast(dtype).cast(FloatDType::F32), normal([n, f], 1.0).cast(dtype).cast(FloatDType::F32));
    let w = normal([f, m], 0.05).cast(dtype);
    let (a0, b0, c) = (normal([f, r], 0.05), normal([r, m], 0.05), normal([n, m], 1.0));
    let run = |fused: bool| {
        timed::<A>(device, || {
            let (g, u) = (g0.clone().detach().require_grad(), u0.clone().detach().require_grad());
            let (a, b) = (a0.clone().detach().require_grad(), b0.clone().detach().require_grad());
            let y = match fused {
                true => gated_down(g.clone().cast(dtype), u.clone().cast(dtype), GateActivation::Silu, w.clone(), a.clone(), b.clone(), 2.0),
                false => {
                    let x = activate(g.clone(), GateActivation::Silu) * u.clone();
                    kiln_kernels::frozen::matmul_as(x.clone(), w.clone(), dtype) + x.matmul(a.clone()).mul_scalar(2.0).matmul(b.clone())
                }
            };
            let grads = (y.clone() * c.clone()).sum().backward();
            let grad = |t: &Tensor<A, 2>| t.grad(&grads).map(host).unwrap_or_default();
            vec![("y", host(y.clone())), ("d_gate", grad(&g)), ("d_up", grad(&u)), ("dA", grad(&a)), ("dB", grad(&b))]
        })
    };
    compare("gated_down", format!("{n} × {f} · {f} × {m} r {r} {}", if bf16 { "bf16" } else { "f32" }), runs, &run)
}

/// `out`: the dtype the norm writes (bf16 where the projections after it multiply in bf16),
/// read back in f32, against the f32 composition.
fn rms_norm_case<A: AutodiffBackend + QuantMatmul>(device: &A::Device, n: usize, d: usize, offset: f64, out: FloatDType, runs: usize) -> serde_json::Value {
    let x0 = Tensor::<A, 2>::random([n, d], Distribution::Normal(0.0, 2.0), device);
    let w0 = Tensor::<A, 1>::random([d], Distribution::Normal(0.0, 1.0), device);
    let c = Tensor::<A, 2>::random([n, d], Distribution::Normal(0.0, 1.0), device);
    let run = |fused: bool| {
        timed::<A>(device, || {
            let (x, w) = (x0.clone().detach().require_grad(), w0.clone().detach().require_grad());
            let y = match fused {
                true => rms_norm_as(x.clone(), w.clone(), 1e-6, offset, out).cast(FloatDType::F32),
                false => rms_norm_composition(x.clone(), w.clone(), 1e-6, offset),
            };
            let grads = (y.clone() * c.clone()).sum().backward();
            vec![("y", host(y)), ("dx", x.grad(&grads).map(host).unwrap_or_default()), ("dw", w.grad(&grads).map(host).unwrap_or_default())]
        })
    };
    compare("rms_norm", format!("{n} × {d} offset {offset} -> {out:?}"), runs, &run)
}

/// `only`: the one operation to check (its name as the rows print it), or all of them.
pub fn run(device: DeviceSpec, runs: usize, json_out: bool, only: Option<&str>) -> anyhow::Result<()> {
    crate::with_backend!(device, |B, dev| run_on::<Autodiff<B>>(&dev, device, runs.max(1), json_out, only))
}

fn run_on<A: AutodiffBackend + QuantMatmul>(device: &A::Device, spec: DeviceSpec, runs: usize, json_out: bool, only: Option<&str>) -> anyhow::Result<()> {
    const OPS: [&str; 8] = ["attention", "lm_head_loss", "rope", "gated_act", "gated_down", "rms_norm", "frozen_matmul", "frozen_lora"];
    // A comma-separated list: one call on a GPU checks several operations, their kernels
    // compiled once.
    let only: Option<Vec<&str>> = only.map(|o| o.split(',').map(str::trim).collect());
    if let Some(op) = only.iter().flatten().find(|op| !OPS.contains(op)) {
        anyhow::bail!("--only {op}: not one of kiln's fused operations (expected one or more of {}, separated by commas)", OPS.join(", "));
    }
    // Each row prints as soon as it is measured: on a GPU the first run of a shape waits for its
    // kernels to compile, and a cut-short run should still show what it checked.
    let mut rows = Vec::new();
    if !json_out {
        println!("kiln's fused operations vs the plain composition, device {spec} (forward + backward; median of {runs}):");
    }
    let mut push = |r: serde_json::Value| {
        if !json_out {
            let errs: Vec<String> = r["rel_err"].as_object().map(|m| m.iter().map(|(k, v)| format!("{k} {:.1e}", v.as_f64().unwrap_or(f64::NAN))).collect()).unwrap_or_default();
            let (tf, tp) = (r["fused_s"].as_f64().unwrap_or(0.0) * 1e3, r["plain_s"].as_f64().unwrap_or(0.0) * 1e3);
            println!("  {:<13} {:<58} rel err {:<36} {tf:>9.2} ms vs {tp:>9.2} ms", r["op"].as_str().unwrap_or(""), r["shape"].as_str().unwrap_or(""), errs.join(" "));
        }
        rows.push(r);
    };
    let want = |op: &str| only.as_ref().is_none_or(|o| o.contains(&op));
    // Small shapes that do not fill the kernels' tiles, then the sizes of a Qwen2.5-0.5B
    // training step at 4 × 1024 tokens (14 query heads over 2 key/value heads of 64).
    // Attention both ways: the flash kernels and the dense products (cuBLAS on CUDA), these
    // also in bf16 (as bf16 training runs them) where the device has it; the gated MLP and the
    // LoRA product likewise with bf16 operands or output.
    let bf16 = A::supports_dtype(device, burn::tensor::DType::BF16);
    let paths = [(AttentionPath::Kernels, false), (AttentionPath::Products, false), (AttentionPath::Products, true)];
    let paths: Vec<_> = paths.into_iter().filter(|&(_, half)| bf16 || !half).collect();
    let halves: &[bool] = if bf16 { &[false, true] } else { &[false] };
    let outs: &[FloatDType] = if bf16 { &[FloatDType::F32, FloatDType::BF16] } else { &[FloatDType::F32] };
    if want("attention") {
        for &path in &paths {
            push(attention_case::<A>(device, 2, 4, 2, 37, 16, None, None, false, path, runs));
            push(attention_case::<A>(device, 1, 2, 1, 70, 64, Some(9), Some(5.0), false, path, runs));
        }
        // The tensor-core kernels (CUDA, head size 64, bf16): sequences that end mid-tile, a
        // sliding window, a mask with values besides 0 (read, not skipped), and a
        // training-sized square.
        if bf16 {
            let path = (AttentionPath::TensorCores, true);
            push(attention_case::<A>(device, 2, 4, 2, 150, 64, None, None, false, path, runs));
            push(attention_case::<A>(device, 1, 14, 2, 300, 64, Some(40), None, false, path, runs));
            push(attention_case::<A>(device, 2, 4, 2, 150, 64, None, None, true, path, runs));
            push(attention_case::<A>(device, 2, 8, 2, 1024, 64, None, None, false, path, runs));
        }
    }
    if want("lm_head_loss") {
        // Vocabularies the row kernels read one element at a time (53, 1001) and as vectors of
        // two (4098) and of four or eight (5000, as every real vocabulary).
        for &(n, e, v, chunk) in &[(37, 24, 53, 8), (300, 64, 1001, 128), (64, 32, 4098, 16), (300, 64, 5000, 128)] {
            for layout in [HeadLayout::InOut, HeadLayout::OutIn] {
                for softcap in [None, Some(30.0)] {
                    push(lm_head_case::<A>(device, n, e, v, HeadLoss { layout, softcap, chunk }, false, runs));
                }
            }
        }
        if A::supports_dtype(device, burn::tensor::DType::BF16) {
            for v in [1001, 4098, 5000] {
                push(lm_head_case::<A>(device, 300, 64, v, HeadLoss { layout: HeadLayout::OutIn, softcap: None, chunk: 128 }, true, runs));
            }
        }
    }
    if want("rope") {
        push(rope_case::<A>(device, 2, 3, 37, 12, runs));
    }
    if want("gated_act") {
        for act in [GateActivation::Silu, GateActivation::GeluTanh, GateActivation::Gelu] {
            for &half in halves {
                push(gated_case::<A>(device, 37, 101, act, half, runs));
            }
        }
    }
    if want("gated_down") {
        push(gated_down_case::<A>(device, 37, 101, 53, 5, runs));
    }
    if want("rms_norm") {
        for &out in outs {
            push(rms_norm_case::<A>(device, 37, 300, 1.0, out, runs));
        }
    }
    if want("frozen_matmul") {
        push(frozen_case::<A>(device, 37, 24, 53, runs));
    }
    if want("frozen_lora") {
        for &out in outs {
            push(lora_case::<A>(device, 37, 24, 53, 5, out, runs));
        }
    }
    if want("attention") {
        for &path in &paths {
            push(attention_case::<A>(device, 4, 14, 2, 1024, 64, None, None, false, path, runs));
        }
    }
    if want("rope") {
        push(rope_case::<A>(device, 4, 14, 1024, 64, runs));
    }
    if want("gated_act") {
        for &half in halves {
            push(gated_case::<A>(device, 4096, 4864, GateActivation::Silu, half, runs));
        }
    }
    if want("gated_down") {
        push(gated_down_case::<A>(device, 8192, 4864, 896, 16, runs));
    }
    if want("rms_norm") {
        for &out in outs {
            push(rms_norm_case::<A>(device, 8192, 896, 0.0, out, runs));
        }
    }
    if want("frozen_matmul") {
        push(frozen_case::<A>(device, 8192, 896, 4864, runs));
        push(frozen_case::<A>(device, 8192, 4864, 896, runs));
    }
    if want("frozen_lora") {
        for &out in outs {
            push(lora_case::<A>(device, 8192, 896, 4864, 16, out, runs));
        }
        push(lora_case::<A>(device, 8192, 4864, 896, 16, FloatDType::F32, runs));
    }
    if want("lm_head_loss") {
        let v = 151_936;
        push(lm_head_case::<A>(device, 2048, 896, v, HeadLoss { layout: HeadLayout::OutIn, softcap: None, chunk: chunk_rows(v) }, false, runs));
    }

    let worst = rows.iter().flat_map(|r| r["rel_err"].as_object().into_iter().flat_map(|m| m.values().map(|v| v.as_f64().unwrap_or(f64::INFINITY)))).fold(0.0f64, f64::max);
    // f32 throughout, TF32 in CUDA's matmuls: 1e-2 relative is what TF32 rounding gives here.
    let tolerance = if matches!(spec, DeviceSpec::Cuda(_)) { 1e-2 } else { 1e-4 };
    let pass = worst < tolerance;
    let out = json!({ "device": spec.to_string(), "pass": pass, "tolerance": tolerance, "worst_rel_err": worst, "cases": rows });
    if json_out {
        println!("{out}");
    } else {
        println!("{} (worst relative error {worst:.1e}, tolerance {tolerance:.0e})", if pass { "PASS" } else { "FAIL" });
    }
    if !pass {
        anyhow::bail!("a fused operation does not match the plain composition on {spec} (worst relative error {worst:.1e})");
    }
    Ok(())
}
