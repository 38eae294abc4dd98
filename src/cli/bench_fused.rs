//! `kiln bench fused`: kiln's fused operations against the plain composition on any device,
//! forward and gradients checked on fresh random inputs, then both timed. The same checks as
//! `tests/fused_ops.rs`, for devices CI cannot reach (CUDA).

use std::time::Instant;

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::activation::log_softmax;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, TensorData};
use kiln_kernels::{chunk_rows, lm_head_loss, HeadLayout, HeadLoss};
use serde_json::json;

use crate::backend::{DeviceSpec, QuantMatmul};

/// The plain composition: full logits, softcap, log-softmax, gather, mask.
fn plain<B: Backend>(h: Tensor<B, 2>, w: Tensor<B, 2>, targets: Tensor<B, 1, Int>, mask: Tensor<B, 1>, spec: HeadLoss) -> Tensor<B, 1> {
    let n = h.dims()[0];
    let mut z = match spec.layout {
        HeadLayout::InOut => h.matmul(w),
        HeadLayout::OutIn => h.matmul(w.transpose()),
    };
    if let Some(c) = spec.softcap {
        z = z.div_scalar(c).tanh().mul_scalar(c);
    }
    (log_softmax(z, 1).gather(1, targets.reshape([n, 1])).reshape([n]) * mask).sum().neg()
}

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

/// One case: relative errors of loss, dh, dW and the median seconds of fused and plain
/// forward + backward.
fn case<A: AutodiffBackend + QuantMatmul>(device: &A::Device, n: usize, e: usize, v: usize, spec: HeadLoss, runs: usize) -> serde_json::Value {
    let wdims = if spec.layout == HeadLayout::InOut { [e, v] } else { [v, e] };
    let h0 = Tensor::<A, 2>::random([n, e], Distribution::Normal(0.0, 1.0), device);
    let w0 = Tensor::<A, 2>::random(wdims, Distribution::Normal(0.0, 0.05), device);
    let targets = Tensor::<A, 1, Int>::random([n], Distribution::Uniform(0.0, v as f64), device);
    let mask: Vec<f32> = (0..n).map(|i| if i % 7 == 3 { 0.0 } else { 1.0 }).collect();
    let mask = Tensor::<A, 1>::from_data(TensorData::new(mask, [n]), device);
    let run = |fused: bool| {
        let (h, w) = (h0.clone().detach().require_grad(), w0.clone().detach().require_grad());
        let t = Instant::now();
        let loss = if fused { lm_head_loss(h.clone(), w.clone(), targets.clone(), mask.clone(), spec) } else { plain(h.clone(), w.clone(), targets.clone(), mask.clone(), spec) };
        let grads = loss.clone().backward();
        let (dh, dw) = (h.grad(&grads), w.grad(&grads));
        let _ = A::sync(device);
        let secs = t.elapsed().as_secs_f64();
        (secs, host(loss), dh.map(host).unwrap_or_default(), dw.map(host).unwrap_or_default())
    };
    let (_, lf, dhf, dwf) = run(true);
    let (_, lp, dhp, dwp) = run(false);
    let time = |fused: bool| {
        let mut t: Vec<f64> = (0..runs).map(|_| run(fused).0).collect();
        t.sort_by(f64::total_cmp);
        t[t.len() / 2]
    };
    let (tf, tp) = (time(true), time(false));
    json!({
        "n": n, "e": e, "v": v, "chunk": spec.chunk, "layout": format!("{:?}", spec.layout), "softcap": spec.softcap,
        "loss_rel_err": rel(&lf, &lp), "dh_rel_err": rel(&dhf, &dhp), "dw_rel_err": rel(&dwf, &dwp),
        "fused_s": tf, "plain_s": tp,
    })
}

pub fn run(device: DeviceSpec, runs: usize, json_out: bool) -> anyhow::Result<()> {
    crate::with_backend!(device, |B, dev| run_on::<Autodiff<B>>(&dev, device, runs.max(1), json_out))
}

fn run_on<A: AutodiffBackend + QuantMatmul>(device: &A::Device, spec: DeviceSpec, runs: usize, json_out: bool) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    // Small shapes whose chunks do not divide the rows, then a Qwen2.5-0.5B-sized head.
    for &(n, e, v, chunk) in &[(37, 24, 53, 8), (300, 64, 1001, 128)] {
        for layout in [HeadLayout::InOut, HeadLayout::OutIn] {
            for softcap in [None, Some(30.0)] {
                rows.push(case::<A>(device, n, e, v, HeadLoss { layout, softcap, chunk }, runs));
            }
        }
    }
    let v = 151_936;
    rows.push(case::<A>(device, 2048, 896, v, HeadLoss { layout: HeadLayout::OutIn, softcap: None, chunk: chunk_rows(v) }, runs));
    let worst = |key: &str| rows.iter().map(|r| r[key].as_f64().unwrap_or(f64::INFINITY)).fold(0.0f64, f64::max);
    // f32 throughout, TF32 in CUDA's matmuls: 1e-2 relative is what TF32 rounding gives here.
    let tolerance = if matches!(spec, DeviceSpec::Cuda(_)) { 1e-2 } else { 1e-4 };
    let pass = ["loss_rel_err", "dh_rel_err", "dw_rel_err"].iter().all(|k| worst(k) < tolerance);
    let out = json!({ "device": spec.to_string(), "op": "lm_head_loss", "pass": pass, "tolerance": tolerance, "cases": rows });
    if json_out {
        println!("{out}");
    } else {
        println!("lm_head_loss (chunked) vs log_softmax over full logits, device {spec}:");
        for r in &rows {
            println!(
                "  n {:>5} e {:>4} v {:>6} chunk {:>4} {:<6} softcap {:<5}  rel err loss {:.1e} dh {:.1e} dW {:.1e}  fwd+bwd {:>8.2} ms vs {:>8.2} ms",
                r["n"], r["e"], r["v"], r["chunk"], r["layout"].as_str().unwrap_or(""), r["softcap"].as_f64().map_or("none".into(), |c| c.to_string()),
                r["loss_rel_err"].as_f64().unwrap_or(f64::NAN), r["dh_rel_err"].as_f64().unwrap_or(f64::NAN), r["dw_rel_err"].as_f64().unwrap_or(f64::NAN),
                r["fused_s"].as_f64().unwrap_or(0.0) * 1e3, r["plain_s"].as_f64().unwrap_or(0.0) * 1e3
            );
        }
        println!("{} (worst relative error {:.1e}, tolerance {tolerance:.0e})", if pass { "PASS" } else { "FAIL" }, worst("dh_rel_err").max(worst("dw_rel_err")).max(worst("loss_rel_err")));
    }
    if !pass {
        anyhow::bail!("the fused LM-head loss does not match the plain composition on {spec}");
    }
    Ok(())
}
