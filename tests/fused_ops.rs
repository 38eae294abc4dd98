//! kiln's fused operations against the plain composition they replace, forward and gradients,
//! on fresh random inputs: RMSNorm (row widths that are not multiples of the kernel's 128
//! threads, Gemma's weight offset); rope (partial rotary widths, per-row tables); the gated
//! MLP activation (silu, both GELUs); the chunked LM-head cross-entropy (both weight layouts, with
//! and without Gemma's logit softcap, chunk sizes that do not divide the rows, masked rows);
//! attention (GQA groups, causal, packed and sliding-window masks, softcap, a decode-like cache)
//! against repeated keys and a full softmax; the product with a frozen weight against the
//! plain matmul, with its adapter, and under the gated activation (recomputed in backward); and the model's loss through the fused ops against
//! the full-logits loss and plain attention on real fixture models (every parameter's
//! gradient). On the CPU always, and on wgpu when a Vulkan driver is present (lavapipe in CI).

mod common;

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{FloatDType, TensorData};
use kiln::backend::QuantMatmul;
use kiln_kernels::{lm_head_loss, HeadLayout, HeadLoss};

use common::Rng;

fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().into_vec::<f32>().unwrap()
}

/// ‖a − b‖ / ‖b‖.
fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// Shapes (rows, hidden, vocab, chunk rows): chunks that do not divide the rows, one chunk
/// only, a vocabulary larger than the chunk.
const SHAPES: [(usize, usize, usize, usize); 3] = [(37, 24, 53, 8), (16, 40, 300, 16), (5, 8, 7, 64)];

/// `dh_tol`: the relative error allowed in `dh` (1e-4 but where a backend's matmul is known to
/// differ more, see the wgpu call).
fn check_head_loss<A: AutodiffBackend + QuantMatmul>(device: &A::Device, name: &str, shapes: &[(usize, usize, usize, usize)], dh_tol: f64) {
    let mut rng = Rng(0x5EED_C0DE ^ name.len() as u64);
    for &(n, e, v, chunk) in shapes {
        for layout in [HeadLayout::InOut, HeadLayout::OutIn] {
            for softcap in [None, Some(3.0)] {
                let spec = HeadLoss { layout, softcap, chunk };
                let wdims = if layout == HeadLayout::InOut { [e, v] } else { [v, e] };
                let hv: Vec<f32> = (0..n * e).map(|_| rng.normal()).collect();
                let wv: Vec<f32> = (0..e * v).map(|_| 0.5 * rng.normal()).collect();
                let tv: Vec<i64> = (0..n).map(|_| (rng.next() * v as f64) as i64 % v as i64).collect();
                let mv: Vec<f32> = (0..n).map(|i| if i % 5 == 3 { 0.0 } else { 1.0 }).collect();
                let run = |fused: bool| {
                    let h = Tensor::<A, 2>::from_data(TensorData::new(hv.clone(), [n, e]), device).require_grad();
                    let w = Tensor::<A, 2>::from_data(TensorData::new(wv.clone(), wdims), device).require_grad();
                    let t = Tensor::<A, 1, Int>::from_data(TensorData::new(tv.clone(), [n]), device);
                    let m = Tensor::<A, 1>::from_data(TensorData::new(mv.clone(), [n]), device);
                    let loss = if fused { lm_head_loss(h.clone(), w.clone(), t, m, spec) } else { kiln_kernels::loss::lm_head_loss_composition(h.clone(), w.clone(), t, m, spec) };
                    // A non-unit upstream gradient, as the trainer's division by the token count gives.
                    let grads = loss.clone().mul_scalar(0.37).backward();
                    (host(loss), host(h.grad(&grads).unwrap()), host(w.grad(&grads).unwrap()))
                };
                let (lf, dhf, dwf) = run(true);
                let (lr, dhr, dwr) = run(false);
                let what = format!("{name} n={n} e={e} v={v} chunk={chunk} {layout:?} softcap={softcap:?}");
                assert!(rel(&lf, &lr) < 1e-5, "{what}: loss {lf:?} vs {lr:?}");
                assert!(rel(&dhf, &dhr) < dh_tol, "{what}: dh relative error {}", rel(&dhf, &dhr));
                assert!(rel(&dwf, &dwr) < 1e-4, "{what}: dW relative error {}", rel(&dwf, &dwr));
            }
        }
    }
}

/// The model's training loss through the fused head against the full-logits loss, and every
/// parameter's gradient, on a fixture model: tied embedding (qwen3) and a separate head (llama).
fn check_model_loss<A: AutodiffBackend + QuantMatmul>(device: &A::Device, name: &str, fixtures: &[&str]) {
    use kiln::data::Batch;
    use kiln::train::eval::{batch_hidden, loss_sum, loss_sum_unfused};
    for &fixture in fixtures {
        let model = kiln::model::Model::<A>::load(&common::model_dir(fixture), device).unwrap();
        let (b, s) = (2usize, 9usize);
        let vocab = model.config.vocab_size as u32;
        let ids: Vec<u32> = (0..(b * s) as u32).map(|i| (i * 7919 + 3) % vocab).collect();
        let targets: Vec<u32> = (0..(b * s) as u32).map(|i| (i * 104_729 + 11) % vocab).collect();
        let loss_mask: Vec<f32> = (0..b * s).map(|i| if i % 4 == 0 { 0.0 } else { 1.0 }).collect();
        let tokens = loss_mask.iter().filter(|&&m| m > 0.0).count();
        let batch = Batch {
            batch: b,
            seq: s,
            ids,
            targets,
            loss_mask,
            positions: (0..b).flat_map(|_| 0..s as u32).collect(),
            segments: vec![0; b * s],
            tokens,
        };
        let fused = loss_sum(&model, &batch, device);
        let reference = model.clone().use_reference_ops();
        let plain = loss_sum_unfused(&reference, batch_hidden(&reference, &batch, device), &batch, device);
        let (lf, lp) = (host(fused.clone()), host(plain.clone()));
        assert!(rel(&lf, &lp) < 1e-5, "{name} {fixture}: loss {lf:?} vs {lp:?}");
        let (gf, gp) = (grads_of(&model, &fused.backward()), grads_of(&model, &plain.backward()));
        assert_eq!(gf.len(), gp.len());
        assert!(gf.len() > 10, "{name} {fixture}: only {} gradients", gf.len());
        for ((path, a), (_, b)) in gf.iter().zip(&gp) {
            let err = rel(a, b);
            assert!(err < 1e-4, "{name} {fixture}: gradient of {path} differs, relative error {err}");
        }
    }
}

/// Every parameter's gradient by module path.
fn grads_of<A: AutodiffBackend, M: burn::module::Module<A>>(model: &M, grads: &A::Gradients) -> Vec<(String, Vec<f32>)> {
    use burn::module::{ModuleVisitor, Param};
    struct Collect<'a, A: AutodiffBackend> {
        grads: &'a A::Gradients,
        path: Vec<String>,
        out: Vec<(String, Vec<f32>)>,
    }
    impl<A: AutodiffBackend> ModuleVisitor<A> for Collect<'_, A> {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<A, D>>) {
            if let Some(g) = param.val().grad(self.grads) {
                self.out.push((self.path.join("."), host(g)));
            }
        }
    }
    let mut c = Collect { grads, path: Vec::new(), out: Vec::new() };
    model.visit(&mut c);
    c.out
}

/// RMSNorm through the op against `x / sqrt(mean(x²) + eps) · (offset + w)` in tensor ops:
/// output, `dx` and `dw` for a random upstream gradient.
fn check_rms_norm<A: AutodiffBackend + kiln_kernels::RmsNormOp>(device: &A::Device, name: &str) {
    let mut rng = Rng(0x0A11_CE55 ^ name.len() as u64);
    // 70 rows: enough that a backend vectorises the per-row factors.
    for (n, d) in [(7, 33), (5, 896), (3, 2), (2, 300), (70, 24)] {
        for offset in [0.0, 1.0] {
            let xv: Vec<f32> = (0..n * d).map(|_| 2.0 * rng.normal()).collect();
            let wv: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
            let cv: Vec<f32> = (0..n * d).map(|_| rng.normal()).collect();
            let run = |fused: bool| {
                let x = Tensor::<A, 2>::from_data(TensorData::new(xv.clone(), [n, d]), device).require_grad();
                let w = Tensor::<A, 1>::from_data(TensorData::new(wv.clone(), [d]), device).require_grad();
                let c = Tensor::<A, 2>::from_data(TensorData::new(cv.clone(), [n, d]), device);
                let y = if fused { kiln_kernels::rms_norm(x.clone(), w.clone(), 1e-6, offset) } else { kiln_kernels::norm::rms_norm_composition(x.clone(), w.clone(), 1e-6, offset) };
                let grads = (y.clone() * c).sum().backward();
                (host(y), host(x.grad(&grads).unwrap()), host(w.grad(&grads).unwrap()))
            };
            let (yf, dxf, dwf) = run(true);
            let (yp, dxp, dwp) = run(false);
            let what = format!("{name} rms_norm n={n} d={d} offset={offset}");
            assert!(rel(&yf, &yp) < 1e-5, "{what}: y relative error {}", rel(&yf, &yp));
            assert!(rel(&dxf, &dxp) < 1e-4, "{what}: dx relative error {}", rel(&dxf, &dxp));
            assert!(rel(&dwf, &dwp) < 1e-4, "{what}: dw relative error {}", rel(&dwf, &dwp));
            // The op against the formulas in f64, tighter: the composition's own gradient goes
            // through Burn's CPU `recip` (an approximate reciprocal, 4e-5 off on SIMD lanes),
            // which the op once used for `1/rms` too (1.8e-5 off here at 70 rows).
            // `(y, dx, dw)` for the upstream gradient `cv`.
            let formulas = |cv: &[f32]| {
                let (mut y64, mut dx64, mut dw64) = (vec![0f32; n * d], vec![0f32; n * d], vec![0f64; d]);
                for r in 0..n {
                    let (x, c) = (&xv[r * d..][..d], &cv[r * d..][..d]);
                    let rms = (x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / d as f64 + 1e-6).sqrt();
                    let wp: Vec<f64> = wv.iter().map(|&w| w as f64 + offset).collect();
                    let gx: f64 = (0..d).map(|j| c[j] as f64 * wp[j] * x[j] as f64).sum();
                    for j in 0..d {
                        y64[r * d + j] = (x[j] as f64 / rms * wp[j]) as f32;
                        dx64[r * d + j] = (c[j] as f64 * wp[j] / rms - x[j] as f64 * gx / (d as f64 * rms.powi(3))) as f32;
                        dw64[j] += c[j] as f64 * x[j] as f64 / rms;
                    }
                }
                (y64, dx64, dw64.iter().map(|&v| v as f32).collect::<Vec<f32>>())
            };
            let (y64, dx64, dw64) = formulas(&cv);
            for (out, got, want) in [("y", &yf, &y64), ("dx", &dxf, &dx64), ("dw", &dwf, &dw64)] {
                let err = rel(got, want);
                assert!(err < 1e-6, "{what}: {out} relative error {err} against the f64 formulas");
            }
            // Written in a half type where the device has one (the norms before bf16 products):
            // the f32 result rounded once, and the f32 op's gradients for the upstream gradient
            // as it arrives through the half output (the cast's backward rounds it to the half
            // type).
            for dtype in [FloatDType::BF16, FloatDType::F16] {
                if !A::supports_dtype(device, dtype.into()) || (n, d) != (5, 896) {
                    continue;
                }
                let x = Tensor::<A, 2>::from_data(TensorData::new(xv.clone(), [n, d]), device).require_grad();
                let w = Tensor::<A, 1>::from_data(TensorData::new(wv.clone(), [d]), device).require_grad();
                let c = Tensor::<A, 2>::from_data(TensorData::new(cv.clone(), [n, d]), device);
                let y = kiln_kernels::rms_norm_as(x.clone(), w.clone(), 1e-6, offset, dtype);
                assert_eq!(y.dtype(), dtype.into(), "{what}: the output's dtype");
                let grads = (y.clone().cast(FloatDType::F32) * c).sum().backward();
                let round = |v: f32| match dtype {
                    FloatDType::BF16 => burn::tensor::bf16::from_f32(v).to_f32(),
                    _ => burn::tensor::f16::from_f32(v).to_f32(),
                };
                let want: Vec<f32> = y64.iter().map(|&v| round(v)).collect();
                let got = host(y.cast(FloatDType::F32));
                let err = rel(&got, &want);
                assert!(err < 1e-3, "{what}: {dtype:?} y relative error {err} against the f64 formula rounded once");
                let rounded: Vec<f32> = cv.iter().map(|&v| round(v)).collect();
                let (_, dx64, dw64) = formulas(&rounded);
                for (out, got, want) in [("dx", host(x.grad(&grads).unwrap()), &dx64), ("dw", host(w.grad(&grads).unwrap()), &dw64)] {
                    let err = rel(&got, want);
                    assert!(err < 1e-5, "{what}: {dtype:?} output, {out} relative error {err}");
                }
            }
        }
    }
    // A residual stream: the norm's input is also added to its output, as a decoder layer
    // reads it twice. The norm's backward then adds its `dx` into the addition's gradient.
    let (n, d) = (6, 40);
    let xv: Vec<f32> = (0..2 * n * d).map(|_| rng.normal()).collect();
    let wv: Vec<f32> = (0..d).map(|_| rng.normal()).collect();
    let cv: Vec<f32> = (0..2 * n * d).map(|_| rng.normal()).collect();
    let run = |fused: bool| {
        let x = Tensor::<A, 3>::from_data(TensorData::new(xv.clone(), [2, n, d]), device).require_grad();
        let w = Tensor::<A, 1>::from_data(TensorData::new(wv.clone(), [d]), device);
        let c = Tensor::<A, 3>::from_data(TensorData::new(cv.clone(), [2, n, d]), device);
        let y = match fused {
            true => kiln_kernels::rms_norm(x.clone(), w, 1e-6, 0.0),
            false => kiln_kernels::norm::rms_norm_composition(x.clone().reshape([2 * n, d]), w, 1e-6, 0.0).reshape([2, n, d]),
        };
        let grads = ((x.clone() + y) * c).sum().backward();
        host(x.grad(&grads).unwrap())
    };
    let err = rel(&run(true), &run(false));
    assert!(err < 1e-4, "{name} rms_norm on a residual stream: dx relative error {err}");
}

/// One attention case: batch, query heads, key/value heads, queries, head size, mask, softcap.
struct AttentionCase {
    b: usize,
    h: usize,
    kv: usize,
    s: usize,
    d: usize,
    mask: MaskKind,
    softcap: Option<f64>,
}

enum MaskKind {
    /// Causal over `past` cached keys and the `s` new ones, with an optional sliding window.
    Causal { past: usize, window: Option<usize> },
    /// Packed rows: segments of these lengths (repeating), an optional window.
    Packed { lengths: &'static [usize], window: Option<usize> },
}

/// Head sizes on both sides of the kernels' tile widths, and ones the kernels read as vectors of
/// 4, 2 and 1 floats (16, 6, 5); query and key counts that are not
/// multiples of the 32 rows a cube handles; GQA groups of 1, 2 and 3; decode-like rows over a
/// cache; packed (block-diagonal) masks; sliding windows; Gemma's attention softcap.
const ATTENTION: [AttentionCase; 5] = [
    AttentionCase { b: 2, h: 4, kv: 2, s: 37, d: 16, mask: MaskKind::Causal { past: 0, window: None }, softcap: None },
    AttentionCase { b: 2, h: 3, kv: 1, s: 33, d: 24, mask: MaskKind::Packed { lengths: &[5, 11, 3, 20], window: Some(4) }, softcap: Some(2.0) },
    AttentionCase { b: 1, h: 2, kv: 2, s: 3, d: 6, mask: MaskKind::Causal { past: 17, window: None }, softcap: None },
    AttentionCase { b: 1, h: 2, kv: 1, s: 70, d: 64, mask: MaskKind::Causal { past: 0, window: Some(9) }, softcap: Some(5.0) },
    AttentionCase { b: 2, h: 2, kv: 1, s: 40, d: 5, mask: MaskKind::Packed { lengths: &[1, 39, 2], window: None }, softcap: None },
];

/// The fused attention against the composition (keys repeated, full softmax): output, and the gradients of `q`, `k` and
/// `v` for a random upstream gradient.
fn check_attention<A: AutodiffBackend + kiln_kernels::FlashAttention>(device: &A::Device, name: &str, cases: &[AttentionCase]) {
    use kiln::model::layers::{causal_mask, packed_mask};
    let mut rng = Rng(0xA77E_4710 ^ name.len() as u64);
    for (n, case) in cases.iter().enumerate() {
        let AttentionCase { b, h, kv, s, d, .. } = *case;
        let (mask, t) = match case.mask {
            MaskKind::Causal { past, window } => (causal_mask::<A>(s, past, past, window, device), past + s),
            MaskKind::Packed { lengths, window } => {
                let (mut segments, mut positions) = (Vec::new(), Vec::new());
                for _ in 0..b {
                    let (mut seg, mut pos) = (0u32, 0u32);
                    for _ in 0..s {
                        segments.push(seg);
                        positions.push(pos);
                        pos += 1;
                        if pos as usize == lengths[seg as usize % lengths.len()] {
                            (seg, pos) = (seg + 1, 0);
                        }
                    }
                }
                (packed_mask::<A>(&segments, &positions, b, window, device), s)
            }
        };
        let mut random = |shape: [usize; 4], sd: f32| -> Vec<f32> { (0..shape.iter().product::<usize>()).map(|_| sd * rng.normal()).collect() };
        let (qv, kv_, vv, cv) = (random([b, h, s, d], 1.5), random([b, kv, t, d], 1.5), random([b, kv, t, d], 1.0), random([b, h, s, d], 1.0));
        // Every case's mask hides the future, so the kernels run both ways: skipping the key
        // tiles past each query block (`causal`), and reading the mask everywhere.
        let spec = |causal| kiln_kernels::AttentionSpec { scale: 1.0 / (d as f64).sqrt(), softcap: case.softcap, causal, bf16_products: false };
        let run = |fused: bool, causal: bool| {
            let spec = spec(causal);
            let make = |data: &Vec<f32>, heads: usize, rows: usize| Tensor::<A, 4>::from_data(TensorData::new(data.clone(), [b, heads, rows, d]), device).require_grad();
            let (q, k, v) = (make(&qv, h, s), make(&kv_, kv, t), make(&vv, kv, t));
            let c = Tensor::<A, 4>::from_data(TensorData::new(cv.clone(), [b, h, s, d]), device);
            let out = match fused {
                true => kiln_kernels::flash_attention(q.clone(), k.clone(), v.clone(), mask.clone(), spec),
                false => kiln_kernels::attention::attention_composition(q.clone(), k.clone(), v.clone(), mask.clone(), spec).0,
            };
            let grads = (out.clone() * c).sum().backward();
            [host(out), host(q.grad(&grads).unwrap()), host(k.grad(&grads).unwrap()), host(v.grad(&grads).unwrap())]
        };
        let plain = run(false, false);
        for causal in [true, false] {
            let fused = run(true, causal);
            for (what, (x, y)) in ["out", "dq", "dk", "dv"].iter().zip(fused.iter().zip(&plain)) {
                // The gradients subtract two nearly equal terms (dP − rowsum(dO∘O)), which the
                // two sides round differently.
                let err = rel(x, y);
                assert!(err < if *what == "out" { 2e-5 } else { 1e-4 }, "{name} attention case {n} ({b}×{h}/{kv} heads, s={s} t={t} d={d}, causal {causal}): {what} relative error {err}");
            }
        }
    }
}

#[test]
fn cpu_attention_matches_the_plain_composition() {
    check_attention::<Autodiff<kiln::backend::Cpu>>(&Default::default(), "cpu", &ATTENTION);
}

/// On wgpu the CubeCL kernels themselves (forward, dQ, dK·dV), then the dense-product path.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_attention_kernels_match_the_plain_composition() {
    if !common::wgpu_available() {
        eprintln!("no Vulkan driver: skipping the wgpu attention kernel checks");
        return;
    }
    check_attention::<Autodiff<kiln_kernels::WgpuDirect>>(&Default::default(), "wgpu", &ATTENTION);
    // The dense products with the softmax kernels between them (what CUDA runs at training
    // shapes), one batch row per chunk; only this test runs attention on wgpu in this binary.
    kiln_kernels::attention::set_attention_path(kiln_kernels::attention::AttentionPath::Products);
    check_attention::<Autodiff<kiln_kernels::WgpuDirect>>(&Default::default(), "wgpu products", &ATTENTION);
    kiln_kernels::attention::set_attention_path(kiln_kernels::attention::AttentionPath::Auto);
}

/// Rope through the op against the composition: output and `dx`, full and partial rotary
/// widths, one table for every row and one per row (packed positions), on `[b, h, s, d]` input
/// and on a `[b, s, h, d]` tensor seen through a transposed view (the decoder's queries and keys,
/// whose gradient the op writes back in that order).
fn check_rope<A: AutodiffBackend + kiln_kernels::RopeOp>(device: &A::Device, name: &str) {
    use kiln::model::layers::rope_tables;
    let mut rng = Rng(0x0509_E000 ^ name.len() as u64);
    for (b, h, s, d, r, per_row) in [(2, 3, 5, 8, 8, false), (1, 2, 7, 12, 8, false), (2, 2, 9, 16, 16, true), (3, 1, 130, 6, 4, true)] {
        let inv_freq: Vec<f32> = (0..r / 2).map(|i| 1.0 / 10_000f32.powf(2.0 * i as f32 / r as f32)).collect();
        let rows = if per_row { b } else { 1 };
        let positions: Vec<usize> = (0..rows * s).map(|i| (i * 7) % (s + 3)).collect();
        let (cos, sin) = rope_tables::<A>(&inv_freq, &positions, rows, device);
        let xv: Vec<f32> = (0..b * h * s * d).map(|_| rng.normal()).collect();
        let cv: Vec<f32> = (0..b * h * s * d).map(|_| rng.normal()).collect();
        for positions_first in [false, true] {
            let run = |fused: bool| {
                let shape = if positions_first { [b, s, h, d] } else { [b, h, s, d] };
                let x = Tensor::<A, 4>::from_data(TensorData::new(xv.clone(), shape), device).require_grad();
                let x_in = if positions_first { x.clone().swap_dims(1, 2) } else { x.clone() };
                let c = Tensor::<A, 4>::from_data(TensorData::new(cv.clone(), [b, h, s, d]), device);
                let y = match fused {
                    true => kiln_kernels::rope(x_in, cos.clone(), sin.clone()),
                    false => kiln_kernels::rope::rope_composition(x_in, cos.clone(), sin.clone()),
                };
                let grads = (y.clone() * c).sum().backward();
                // The gradient as the projection's output would take it: `[b, s, h·d]` rows.
                (host(y), host(x.grad(&grads).unwrap().reshape([b * shape[1], shape[2] * d])))
            };
            let ((yf, dxf), (yp, dxp)) = (run(true), run(false));
            let what = format!("{name} rope b={b} h={h} s={s} d={d} r={r} per_row={per_row} positions_first={positions_first}");
            assert!(rel(&yf, &yp) < 1e-6, "{what}: y relative error {}", rel(&yf, &yp));
            assert!(rel(&dxf, &dxp) < 1e-6, "{what}: dx relative error {}", rel(&dxf, &dxp));
        }
    }
}

/// `act(gate) · up` through the op against Burn's activation times `up`: output and both
/// gradients, for each activation, at lengths that do not fill the kernels' last cube.
fn check_gated<A: AutodiffBackend + kiln_kernels::GatedActOp>(device: &A::Device, name: &str) {
    use kiln_kernels::gated::activate;
    use kiln_kernels::GateActivation;
    let mut rng = Rng(0x6A7E_D000 ^ name.len() as u64);
    for act in [GateActivation::Silu, GateActivation::GeluTanh, GateActivation::Gelu] {
        for shape in [[1, 1, 7], [2, 5, 300], [3, 1, 1031]] {
            let n: usize = shape.iter().product();
            let (gv, uv, cv): (Vec<f32>, Vec<f32>, Vec<f32>) = ((0..n).map(|_| 3.0 * rng.normal()).collect(), (0..n).map(|_| rng.normal()).collect(), (0..n).map(|_| rng.normal()).collect());
            let run = |fused: bool| {
                let make = |v: &[f32]| Tensor::<A, 3>::from_data(TensorData::new(v.to_vec(), shape), device);
                let (g, u, c) = (make(&gv).require_grad(), make(&uv).require_grad(), make(&cv));
                let y = match fused {
                    true => kiln_kernels::gated_act(g.clone(), u.clone(), act),
                    false => activate(g.clone(), act) * u.clone(),
                };
                let grads = (y.clone() * c).sum().backward();
                [host(y), host(g.grad(&grads).unwrap()), host(u.grad(&grads).unwrap())]
            };
            let (fused, plain) = (run(true), run(false));
            for (what, (a, b)) in ["y", "d_gate", "d_up"].iter().zip(fused.iter().zip(&plain)) {
                let err = rel(a, b);
                assert!(err < 1e-5, "{name} gated {act:?} {shape:?}: {what} relative error {err}");
            }
        }
    }
}

/// A product with a frozen weight through the op against the plain matmul: output and `dx`,
/// at sizes that fill no matmul tile. (CPU and wgpu have no bf16: the weight is f32 here, which
/// still runs the CubeCL path that asks the matmul for an f32 result; `kiln bench fused
/// --device cuda` checks bf16.) Then a narrow weight, where the device has one.
fn check_frozen<A: AutodiffBackend + kiln_kernels::FrozenMatmul>(device: &A::Device, name: &str) {
    let mut rng = Rng(0xF20_2E00 ^ name.len() as u64);
    for (case, (n, k, m)) in [(37, 24, 53), (5, 130, 7), (64, 64, 64), (1, 9, 1)].into_iter().enumerate() {
        let (xv, wv, cv): (Vec<f32>, Vec<f32>, Vec<f32>) = ((0..n * k).map(|_| rng.normal()).collect(), (0..k * m).map(|_| rng.normal()).collect(), (0..n * m).map(|_| rng.normal()).collect());
        let run = |fused: bool| {
            let x = Tensor::<A, 2>::from_data(TensorData::new(xv.clone(), [n, k]), device).require_grad();
            let w = Tensor::<A, 2>::from_data(TensorData::new(wv.clone(), [k, m]), device);
            let c = Tensor::<A, 2>::from_data(TensorData::new(cv.clone(), [n, m]), device);
            let y = match fused {
                true => kiln_kernels::frozen_matmul(x.clone(), w.clone()),
                false => x.clone().matmul(w.clone()),
            };
            let grads = (y.clone() * c).sum().backward();
            [host(y), host(x.grad(&grads).unwrap())]
        };
        let (fused, plain) = (run(true), run(false));
        for (what, (a, b)) in ["y", "dx"].iter().zip(fused.iter().zip(&plain)) {
            let err = rel(a, b);
            assert!(err < 1e-6, "{name} frozen matmul {n}×{k}·{k}×{m}: {what} relative error {err}");
        }
        // A narrow weight where the device has one (f16 on lavapipe's Vulkan): the matmul
        // multiplies narrow operands and writes f32, against casting its result back from the
        // narrow type (which rounds it: a few parts in 1e4).
        for dtype in [FloatDType::BF16, FloatDType::F16] {
            // Two shapes are enough: every new shape and dtype costs lavapipe an autotune.
            if case >= 2 || !A::supports_dtype(device, dtype.into()) {
                continue;
            }
            eprintln!("{name}: frozen matmul {n}×{k}·{k}×{m} with a {dtype:?} weight");
            let x = Tensor::<A, 2>::from_data(TensorData::new(xv.clone(), [n, k]), device);
            let w = Tensor::<A, 2>::from_data(TensorData::new(wv.clone(), [k, m]), device).cast(dtype);
            let (xp, xf) = (x.clone().require_grad(), x.require_grad());
            let c = Tensor::<A, 2>::from_data(TensorData::new(cv.clone(), [n, m]), device);
            let (yf, yp) = (kiln_kernels::frozen_matmul(xf.clone(), w.clone()), kiln_kernels::frozen::matmul_as(xp.clone(), w, dtype));
            let (gf, gp) = ((yf.clone() * c.clone()).sum().backward(), (yp.clone() * c).sum().backward());
            for (what, a, b) in [("y", host(yf), host(yp)), ("dx", host(xf.grad(&gf).unwrap()), host(xp.grad(&gp).unwrap()))] {
                let err = rel(&a, &b);
                assert!(err < 5e-3, "{name} frozen matmul {dtype:?} {n}×{k}·{k}×{m}: {what} relative error {err}");
            }
        }
    }
}

/// A frozen product with its LoRA adapter as one operation against the same sum as plain tensor
/// operations (autodiff's gradients): output, `dx`, `dA`, `dB`; once with an input that needs no
/// gradient (backward then skips `dx`). 1024 rows split the adapter's gradients into row slices.
/// The input is 3-D and read by two such products (as queries, keys and values share theirs):
/// the second adds its `dx` into the first's.
fn check_frozen_lora<A: AutodiffBackend + kiln_kernels::FrozenMatmul>(device: &A::Device, name: &str) {
    let mut rng = Rng(0x10_4A ^ name.len() as u64);
    for (n, k, m, r, x_grad) in [(37, 24, 53, 5, true), (5, 130, 7, 3, true), (1024, 40, 24, 4, true), (9, 16, 12, 2, false)] {
        let mut values = |len: usize| (0..len).map(|_| rng.normal()).collect::<Vec<f32>>();
        let (xv, wv, av, bv, cv) = (values(n * k), values(k * m), values(k * r), values(r * m), values(n * m));
        let scale = 0.7;
        let run = |fused: bool| {
            let t = |v: &Vec<f32>, shape: [usize; 2]| Tensor::<A, 2>::from_data(TensorData::new(v.clone(), shape), device);
            let x = Tensor::<A, 3>::from_data(TensorData::new(xv.clone(), [1, n, k]), device);
            let x = if x_grad { x.require_grad() } else { x };
            let (w, a, b, c) = (t(&wv, [k, m]), t(&av, [k, r]).require_grad(), t(&bv, [r, m]).require_grad(), t(&cv, [n, m]));
            let y = match fused {
                true => (kiln_kernels::frozen_lora(x.clone(), w.clone(), a.clone(), b.clone(), scale) + kiln_kernels::frozen_lora(x.clone(), w.mul_scalar(0.5), a.clone(), b.clone(), 2.0 * scale)).reshape([n, m]),
                false => {
                    let rows = x.clone().reshape([n, k]);
                    let one = |w: Tensor<A, 2>, scale: f64| rows.clone().matmul(w) + rows.clone().matmul(a.clone()).mul_scalar(scale).matmul(b.clone());
                    one(w.clone(), scale) + one(w.mul_scalar(0.5), 2.0 * scale)
                }
            };
            let grads = (y.clone() * c).sum().backward();
            let dx = if x_grad { host(x.grad(&grads).unwrap()) } else { Vec::new() };
            [host(y), dx, host(a.grad(&grads).unwrap()), host(b.grad(&grads).unwrap())]
        };
        let (fused, plain) = (run(true), run(false));
        for (what, (a, b)) in ["y", "dx", "dA", "dB"].iter().zip(fused.iter().zip(&plain)) {
            assert_eq!(a.len(), b.len(), "{name} frozen lora {n}×{k}·{k}×{m} r {r}: {what} has {} values, not {}", a.len(), b.len());
            let err = if a.is_empty() { 0.0 } else { rel(a, b) };
            assert!(err < 1e-5, "{name} frozen lora {n}×{k}·{k}×{m} r {r}: {what} relative error {err}");
        }
    }
}

/// The gated MLP's down projection over `act(gate) · up` as one operation that recomputes its
/// input in backward, against the gated activation and the adapter's sum as plain tensor
/// operations: output, `d_gate`, `d_up`, `dA`, `dB`.
fn check_gated_down<A: AutodiffBackend + kiln_kernels::GatedDown>(device: &A::Device, name: &str) {
    use kiln_kernels::gated::activate;
    use kiln_kernels::GateActivation;
    let mut rng = Rng(0xD0_3E ^ name.len() as u64);
    for (n, f, m, r, act) in [(37, 24, 53, 5, GateActivation::Silu), (5, 130, 7, 3, GateActivation::GeluTanh), (1024, 40, 24, 4, GateActivation::Silu)] {
        let mut values = |len: usize| (0..len).map(|_| rng.normal()).collect::<Vec<f32>>();
        let (gv, uv, wv, av, bv, cv) = (values(n * f), values(n * f), values(f * m), values(f * r), values(r * m), values(n * m));
        let scale = 0.7;
        let run = |fused: bool| {
            let t = |v: &Vec<f32>, shape: [usize; 2]| Tensor::<A, 2>::from_data(TensorData::new(v.clone(), shape), device);
            let (g, u) = (t(&gv, [n, f]).require_grad(), t(&uv, [n, f]).require_grad());
            let (w, a, b, c) = (t(&wv, [f, m]), t(&av, [f, r]).require_grad(), t(&bv, [r, m]).require_grad(), t(&cv, [n, m]));
            let y = match fused {
                true => kiln_kernels::gated_down(g.clone(), u.clone(), act, w, a.clone(), b.clone(), scale),
                false => {
                    let x = activate(g.clone(), act) * u.clone();
                    x.clone().matmul(w) + x.matmul(a.clone()).mul_scalar(scale).matmul(b.clone())
                }
            };
            let grads = (y.clone() * c).sum().backward();
            let gs = [g.grad(&grads).unwrap(), u.grad(&grads).unwrap(), a.grad(&grads).unwrap(), b.grad(&grads).unwrap()].map(host);
            [vec![host(y)], gs.to_vec()].concat()
        };
        let (fused, plain) = (run(true), run(false));
        for (what, (a, b)) in ["y", "d_gate", "d_up", "dA", "dB"].iter().zip(fused.iter().zip(&plain)) {
            let err = rel(a, b);
            assert!(err < 1e-5, "{name} gated down {act:?} {n}×{f}·{f}×{m} r {r}: {what} relative error {err}");
        }
    }
}

#[test]
fn cpu_gated_down_matches_the_plain_composition() {
    check_gated_down::<Autodiff<kiln::backend::Cpu>>(&Default::default(), "cpu");
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_gated_down_matches_the_plain_composition() {
    if !common::wgpu_available() {
        eprintln!("no Vulkan driver: skipping the wgpu gated-down checks");
        return;
    }
    check_gated_down::<Autodiff<kiln_kernels::WgpuDirect>>(&Default::default(), "wgpu");
}

#[test]
fn cpu_frozen_lora_matches_the_plain_composition() {
    check_frozen_lora::<Autodiff<kiln::backend::Cpu>>(&Default::default(), "cpu");
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_frozen_lora_matches_the_plain_composition() {
    if !common::wgpu_available() {
        eprintln!("no Vulkan driver: skipping the wgpu frozen-lora checks");
        return;
    }
    check_frozen_lora::<Autodiff<kiln_kernels::WgpuDirect>>(&Default::default(), "wgpu");
}

#[test]
fn cpu_frozen_matmul_matches_the_plain_product() {
    check_frozen::<Autodiff<kiln::backend::Cpu>>(&Default::default(), "cpu");
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_frozen_matmul_matches_the_plain_product() {
    if !common::wgpu_available() {
        eprintln!("no Vulkan driver: skipping the wgpu frozen-matmul checks");
        return;
    }
    check_frozen::<Autodiff<kiln_kernels::WgpuDirect>>(&Default::default(), "wgpu");
}

#[test]
fn cpu_gated_activation_matches_the_plain_composition() {
    check_gated::<Autodiff<kiln::backend::Cpu>>(&Default::default(), "cpu");
}

/// On wgpu the CubeCL kernels themselves.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_gated_activation_kernels_match_the_plain_composition() {
    if !common::wgpu_available() {
        eprintln!("no Vulkan driver: skipping the wgpu gated-activation kernel checks");
        return;
    }
    check_gated::<Autodiff<kiln_kernels::WgpuDirect>>(&Default::default(), "wgpu");
}

#[test]
fn cpu_rope_matches_the_plain_composition() {
    check_rope::<Autodiff<kiln::backend::Cpu>>(&Default::default(), "cpu");
}

/// On wgpu the CubeCL kernel itself (forward, and backward as the inverse rotation).
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_rope_kernel_matches_the_plain_composition() {
    if !common::wgpu_available() {
        eprintln!("no Vulkan driver: skipping the wgpu rope kernel checks");
        return;
    }
    check_rope::<Autodiff<kiln_kernels::WgpuDirect>>(&Default::default(), "wgpu");
}

#[test]
fn cpu_rms_norm_matches_the_plain_composition() {
    check_rms_norm::<Autodiff<kiln::backend::Cpu>>(&Default::default(), "cpu");
}

/// On wgpu the CubeCL kernels themselves (no fusion stream, which would run the composition).
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_rms_norm_kernels_match_the_plain_composition() {
    if !common::wgpu_available() {
        eprintln!("no Vulkan driver: skipping the wgpu RMSNorm kernel checks");
        return;
    }
    check_rms_norm::<Autodiff<kiln_kernels::WgpuDirect>>(&Default::default(), "wgpu");
}

#[test]
fn cpu_chunked_head_loss_matches_the_plain_composition() {
    check_head_loss::<Autodiff<kiln::backend::Cpu>>(&Default::default(), "cpu", &SHAPES, 1e-4);
    check_model_loss::<Autodiff<kiln::backend::Cpu>>(&Default::default(), "cpu", &["llama", "qwen3", "gemma3"]);
}

#[cfg(feature = "wgpu")]
#[test]
fn wgpu_chunked_head_loss_matches_the_plain_composition() {
    if !common::wgpu_available() {
        eprintln!("no Vulkan driver: skipping the wgpu fused-op checks");
        return;
    }
    // Fewer cases than on the CPU: lavapipe compiles every new shape's kernels on 2 cores.
    check_head_loss::<Autodiff<kiln::backend::Wgpu>>(&Default::default(), "wgpu", &SHAPES[..1], 1e-4);
    check_model_loss::<Autodiff<kiln::backend::Wgpu>>(&Default::default(), "wgpu", &["qwen3"]);
    // Without Burn's fusion stream the chunks' row kernels run (as on CUDA), reading a row one
    // element at a time (53), as vectors of two (4098) and as the widest vectors (5000); the last
    // two past one pass of the loads (two vectors × 512 threads) and not a multiple of it.
    check_head_loss::<Autodiff<kiln_kernels::WgpuDirect>>(&Default::default(), "wgpu direct", &SHAPES[..1], 1e-4);
    // At a vocabulary of 5000, `dh` of the `[e, v]` head layout differs by up to 3e-4 between
    // the two sides on lavapipe while `dW`, from the same `dz`, agrees to 1e-7 and so does `dh`
    // of the `[v, e]` layout: the difference is Burn's wgpu matmul of a transposed
    // `[5000, e]` view (per chunk here, over all rows there), not the row kernels.
    check_head_loss::<Autodiff<kiln_kernels::WgpuDirect>>(&Default::default(), "wgpu direct", &[(6, 8, 4098, 4), (6, 8, 5000, 4)], 1e-3);
}

/// The quickstart recipe (full fine-tuning of a Llama-style model from scratch) for 40 steps,
/// once through the chunked LM-head loss and once through the full-logits loss: the same loss
/// curve, step for step.
#[test]
fn quickstart_loss_curve_is_the_same_fused_and_unfused() {
    use kiln::run::{Event, Recorder};
    use kiln::train::{train, TrainOptions};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let tmp = tempfile::tempdir().unwrap();
    let curve = |reference_ops: bool| {
        let mut recipe = kiln::recipe::Recipe::load(&root.join("recipes/quickstart.toml")).unwrap();
        recipe.run.output_dir = tmp.path().to_path_buf();
        recipe.run.name = format!("reference-{reference_ops}");
        recipe.train.log_every = 1;
        recipe.eval.every = 0;
        recipe.eval.exact_match = false;
        recipe.data.test = None;
        recipe.export.gguf = None;
        let options = TrainOptions { max_steps: Some(40), reference_ops, ..Default::default() };
        let mut rec = Recorder::default();
        let stop = std::sync::atomic::AtomicBool::new(false);
        train::<Autodiff<kiln::backend::Cpu>>(&recipe, &options, &Default::default(), &mut rec, &stop).unwrap();
        rec.events.iter().filter_map(|e| match e { Event::Train { loss, .. } => Some(*loss), _ => None }).collect::<Vec<f64>>()
    };
    let (fused, plain) = (curve(false), curve(true));
    assert_eq!(fused.len(), 40);
    assert_eq!(fused.len(), plain.len());
    // Step for step the same while the runs are close. The fused ops round differently from the
    // composition (other orders of the same sums and divisions): measured, the curves agree to
    // within 1.5e-6 relative for 21 steps, then the difference grows at this learning rate
    // (3e-3), to 4e-5 at step 22 and up to 1 % by step 40. A wrong gradient shows from the first
    // steps; the curve's tail is compared as a mean.
    for (i, (a, b)) in fused.iter().zip(&plain).enumerate().take(20) {
        assert!((a - b).abs() <= 2e-5 * b.abs(), "step {}: fused loss {a} vs unfused {b}\nfused {fused:?}\nunfused {plain:?}", i + 1);
    }
    let tail = |c: &[f64]| c[30..].iter().sum::<f64>() / 10.0;
    assert!((tail(&fused) - tail(&plain)).abs() <= 0.02 * tail(&plain), "mean loss of steps 31-40: fused {} vs unfused {}", tail(&fused), tail(&plain));
    assert!(fused[39] < fused[0] * 0.8, "the quickstart did not learn: {fused:?}");
}

/// `DeviceMemory::read_later` gives the tensor's values as they were when the read was queued,
/// with work queued after it that takes over the tensor (and could write into its buffer in
/// place): on the CPU, and on wgpu without Burn's fusion stream (the CubeCL path CUDA takes).
#[test]
fn reads_queued_early_return_the_tensor_as_it_was() {
    use kiln_kernels::DeviceMemory;
    fn run<B: DeviceMemory>(device: &B::Device, values: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let t = Tensor::<B, 1>::from_data(TensorData::new(values.to_vec(), [values.len()]), device);
        let reading = B::read_later(t.clone().into_primitive().tensor());
        let later = host(t.mul_scalar(0.5).add_scalar(1.0));
        (reading.wait().expect("the queued read"), later)
    }
    let values: Vec<f32> = (0..70_001).map(|i| (i % 977) as f32 * 0.25 - 100.0).collect();
    let expected: Vec<f32> = values.iter().map(|v| v * 0.5 + 1.0).collect();
    assert_eq!(run::<kiln::backend::Cpu>(&Default::default(), &values), (values.clone(), expected.clone()));
    #[cfg(feature = "wgpu")]
    if common::wgpu_available() {
        assert_eq!(run::<kiln_kernels::WgpuDirect>(&Default::default(), &values), (values, expected));
    }
}

/// The AdamW kernel on wgpu against the composition on the CPU: two updates in a row (the
/// moments carry over), weight decay on and off, clipping active, inactive and off, lengths
/// that are not multiples of the kernel's 256 threads.
#[cfg(feature = "wgpu")]
#[test]
fn wgpu_adamw_kernel_matches_the_composition() {
    use kiln_kernels::{adamw, AdamWStep};
    if !common::wgpu_available() {
        eprintln!("no Vulkan driver: skipping the wgpu AdamW kernel check");
        return;
    }
    fn run<B: kiln_kernels::AdamWOp>(device: &B::Device, p: &[f32], grads: &[Vec<f32>], weight_decay: f64, max_grad_norm: f64) -> [Vec<f32>; 3] {
        let n = p.len();
        let make = |v: &[f32]| Tensor::<B, 1>::from_data(TensorData::new(v.to_vec(), [n]), device);
        let (mut p, mut m, mut v) = (make(p), Tensor::zeros([n], device), Tensor::zeros([n], device));
        for (t, g) in grads.iter().enumerate() {
            let step = AdamWStep { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay, max_grad_norm, t: t as i32 + 1 };
            let square_sum = make(g).powi_scalar(2).sum();
            (p, m, v) = adamw(p, make(g), m, v, &step, step.to_device::<B>(device), square_sum);
        }
        [host(p), host(m), host(v)]
    }
    let mut rng = Rng(0xADA3);
    // Gradients are standard normal, so their norm is about sqrt(n): 0.5·sqrt(n) clips, 10·sqrt(n) does not.
    for (n, weight_decay, clip) in [(1, 0.0, 0.0), (1000, 0.01, 0.5), (70_001, 0.1, 10.0), (70_001, 0.0, 0.5)] {
        let max_grad_norm = clip * (n as f64).sqrt();
        let p: Vec<f32> = (0..n).map(|_| rng.normal()).collect();
        let grads: Vec<Vec<f32>> = (0..2).map(|_| (0..n).map(|_| rng.normal()).collect()).collect();
        let kernel = run::<kiln_kernels::WgpuDirect>(&Default::default(), &p, &grads, weight_decay, max_grad_norm);
        let reference = run::<kiln::backend::Cpu>(&Default::default(), &p, &grads, weight_decay, max_grad_norm);
        for (what, (a, b)) in ["p", "m", "v"].iter().zip(kernel.iter().zip(&reference)) {
            let err = rel(a, b);
            assert!(err < 1e-6, "adamw n {n} wd {weight_decay}: {what} relative error {err}");
        }
    }
}
