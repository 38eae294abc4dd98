//! The quantised-matmul kernels (kiln-kernels) against a plain dequantise-then-multiply in f64
//! on the host, on fresh random inputs, at shapes that are not multiples of the tiles; the
//! activation gradient through Autodiff against dy · W. On the CPU always, and on wgpu when a
//! Vulkan driver is present (lavapipe in CI).

mod common;

use burn::backend::Autodiff;
use burn::prelude::*;
use burn::tensor::TensorData;
use kiln_kernels::host::HostQuant;
use kiln_kernels::{quant_matmul, Affine, QuantMatmul};

use common::Rng;

fn random_quant(rng: &mut Rng, n: usize, k: usize, format: Affine) -> HostQuant {
    let levels: Vec<u8> = (0..n * k).map(|_| (rng.next() * (format.mask() + 1) as f64) as u8).collect();
    let groups = n * k / format.group as usize;
    let scales = (0..groups).map(|_| 0.01 + 0.02 * rng.next() as f32).collect();
    let biases = (0..groups).map(|_| -0.1 * rng.next() as f32).collect();
    HostQuant::pack(&levels, n, k, format, scales, biases)
}

/// `a [r, c] · b [c, t]` in f64.
fn matmul64(a: &[f32], b: &[f32], r: usize, c: usize, t: usize) -> Vec<f64> {
    let mut out = vec![0f64; r * t];
    for i in 0..r {
        for j in 0..c {
            let av = a[i * c + j] as f64;
            for l in 0..t {
                out[i * t + l] += av * b[j * t + l] as f64;
            }
        }
    }
    out
}

fn transpose(a: &[f32], r: usize, c: usize) -> Vec<f32> {
    (0..c * r).map(|i| a[(i % r) * c + i / r]).collect()
}

fn rel_err(got: &[f32], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(g, w)| (*g as f64 - w).powi(2)).sum();
    let den: f64 = want.iter().map(|w| w * w).sum();
    (num / den.max(1e-30)).sqrt()
}

const SHAPES: [(usize, usize, usize); 7] = [(1, 64, 128), (3, 97, 256), (8, 33, 384), (17, 50, 128), (40, 129, 256), (5, 7, 64), (70, 65, 128)];

fn check<B: QuantMatmul>(device: &B::Device, name: &str) {
    let mut rng = Rng(0x5EED_1234_ABCD);
    for bits in [4, 8] {
        for group in [32, 64, 128] {
            let format = Affine { bits, group };
            for (m, n, k) in SHAPES {
                if k % group as usize != 0 {
                    continue;
                }
                let q = random_quant(&mut rng, n, k, format);
                let w = q.dequantize(); // [n, k]
                let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
                let (words, scales, biases) = q.to_tensors::<B>(device);
                let xt = Tensor::<B, 2>::from_data(TensorData::new(x.clone(), [m, k]), device);
                let y = quant_matmul(xt, words.clone(), scales.clone(), biases.clone(), format);
                let want = matmul64(&x, &transpose(&w, n, k), m, k, n);
                let err = rel_err(&y.into_data().convert::<f32>().into_vec().unwrap(), &want);
                assert!(err < 1e-3, "{name} forward q{bits} g{group} m{m} n{n} k{k}: relative error {err}");

                let dy: Vec<f32> = (0..m * n).map(|_| rng.normal()).collect();
                let dyt = Tensor::<B, 2>::from_data(TensorData::new(dy.clone(), [m, n]), device);
                let dx = B::quant_matmul_dx(dyt.into_primitive().tensor(), words.into_primitive(), scales.into_primitive().tensor(), biases.into_primitive().tensor(), format);
                let dx = Tensor::<B, 2>::from_primitive(burn::tensor::TensorPrimitive::Float(dx));
                let want = matmul64(&dy, &w, m, n, k);
                let err = rel_err(&dx.into_data().convert::<f32>().into_vec().unwrap(), &want);
                assert!(err < 1e-3, "{name} dx q{bits} g{group} m{m} n{n} k{k}: relative error {err}");
            }
        }
    }
}

/// Through Autodiff: the gradient of sum(c ⊙ y) w.r.t. x is c · W.
fn check_grad<A: burn::tensor::backend::AutodiffBackend + QuantMatmul>(device: &A::Device, name: &str) {
    let mut rng = Rng(0xA17D_1FF);
    let format = Affine { bits: 4, group: 64 };
    let (m, n, k) = (6, 45, 192);
    let q = random_quant(&mut rng, n, k, format);
    let (words, scales, biases) = q.to_tensors::<A>(device);
    let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
    let c: Vec<f32> = (0..m * n).map(|_| rng.normal()).collect();
    let xt = Tensor::<A, 2>::from_data(TensorData::new(x, [m, k]), device).require_grad();
    let ct = Tensor::<A, 2>::from_data(TensorData::new(c.clone(), [m, n]), device);
    let loss = (quant_matmul(xt.clone(), words, scales, biases, format) * ct).sum();
    let grads = loss.backward();
    let gx = xt.grad(&grads).unwrap().into_data().convert::<f32>().into_vec::<f32>().unwrap();
    let want = matmul64(&c, &q.dequantize(), m, n, k);
    let err = rel_err(&gx, &want);
    assert!(err < 1e-3, "{name} autodiff dx: relative error {err}");
}

#[test]
fn cpu_kernels_match_dequantise_then_matmul() {
    check::<kiln::backend::Cpu>(&Default::default(), "cpu");
    check_grad::<Autodiff<kiln::backend::Cpu>>(&Default::default(), "cpu");
}

#[test]
fn wgpu_kernels_match_dequantise_then_matmul() {
    if !common::wgpu_available() {
        eprintln!("no Vulkan driver: skipping the wgpu kernel checks");
        return;
    }
    check::<kiln::backend::Wgpu>(&Default::default(), "wgpu");
    check_grad::<Autodiff<kiln::backend::Wgpu>>(&Default::default(), "wgpu");
}

/// GGUF Q8_0 / Q4_0 / Q4_K and MLX weights run through the same kernels: converted to the
/// affine layout they keep every level (Q4_K dequantises bit-identically to ggml), and the
/// kernel's product matches dequantise-then-multiply.
#[test]
fn gguf_and_mlx_formats_run_through_the_kernels() {
    use kiln::quant::affine::QuantSpec;
    use kiln::quant::{self, GgmlType};
    let device = Default::default();
    let mut rng = Rng(0x6611F);
    let (m, n, k) = (5, 37, 512);
    let w: Vec<f32> = (0..n * k).map(|_| 0.05 * rng.normal()).collect();
    let x: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
    for name in ["gguf:q8_0", "gguf:q4_0", "gguf:q4_k", "q4_g32", "q4_g64", "q4_g128", "q8_g64"] {
        let spec = QuantSpec::parse(name).unwrap();
        let q = spec.quantize(&w, n, k).unwrap();
        let ours = q.dequantize();
        if let QuantSpec::Gguf(ty) = spec {
            let ggml = quant::dequantize(ty, &quant::quantize(ty, &w, k).unwrap(), n * k).unwrap();
            for (a, b) in ours.iter().zip(&ggml) {
                if ty == GgmlType::Q4_K {
                    assert_eq!(a.to_bits(), b.to_bits(), "{name}: Q4_K levels must dequantise exactly as ggml");
                } else {
                    assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{name}: {a} vs ggml {b}");
                }
            }
        }
        let (words, scales, biases) = q.to_tensors::<kiln::backend::Cpu>(&device);
        let y = quant_matmul(Tensor::<kiln::backend::Cpu, 2>::from_data(TensorData::new(x.clone(), [m, k]), &device), words, scales, biases, q.format);
        let want = matmul64(&x, &transpose(&ours, n, k), m, k, n);
        let err = rel_err(&y.into_data().convert::<f32>().into_vec().unwrap(), &want);
        assert!(err < 1e-3, "{name}: relative error {err}");
    }
    assert_eq!(QuantSpec::parse("q4_g48"), None);
    assert_eq!(QuantSpec::parse("gguf:q6_k"), None, "no kernel for Q6_K");
}
