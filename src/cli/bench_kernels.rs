//! `kiln bench kernels`: the quantised-matmul kernels on the chosen device, per format and
//! shape. Decode (one activation row): achieved GB/s of weight traffic as a fraction of the
//! device's copy bandwidth measured in the same run. Prefill (512 rows): TFLOP/s next to
//! Burn's dense matmul of the same shape (f32, and bf16 where the device has it).

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::{Distribution, FloatDType};
use kiln_kernels::frozen::matmul_out;
use kiln_kernels::host::HostQuant;
use kiln_kernels::{quant_matmul, Affine, QuantMatmul};
use serde_json::{json, Value};

use crate::backend::DeviceSpec;

/// (inputs k, outputs n), named as `k×n`: attention (Llama 8B), MLP up, MLP down, Qwen 0.5B MLP.
const SHAPES: [(usize, usize); 4] = [(4096, 4096), (4096, 14336), (14336, 4096), (896, 4864)];

/// The layouts the formats run in: MLX groups as written; GGUF Q8_0 as 8-bit groups of 32,
/// Q4_0 and Q4_K as 4-bit groups of 32 (see `quant::affine`).
const FORMATS: [(&str, u32, u32); 4] = [("q4_g64 (mlx)", 4, 64), ("q8_g64 (mlx)", 8, 64), ("q4 g32 (gguf q4_0, q4_k)", 4, 32), ("q8 g32 (gguf q8_0)", 8, 32)];

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    xs[xs.len() / 2]
}

/// Median seconds per call over `runs` timings after two warm-ups (compilation, autotune).
/// Each timing queues `queued` calls and then waits for the device once, as a model's
/// forward does; `queued = 1` is the latency of one call with its synchronisation.
fn time<B: Backend, T>(device: &B::Device, runs: usize, queued: usize, mut f: impl FnMut() -> T) -> anyhow::Result<f64> {
    for _ in 0..2 {
        let out = f();
        B::sync(device).map_err(|e| anyhow::anyhow!("device error: {e:?}"))?;
        drop(out);
    }
    let mut secs = Vec::with_capacity(runs);
    for _ in 0..runs {
        let start = Instant::now();
        let outs: Vec<T> = (0..queued).map(|_| f()).collect();
        B::sync(device).map_err(|e| anyhow::anyhow!("device error: {e:?}"))?;
        secs.push(start.elapsed().as_secs_f64() / queued as f64);
        drop(outs);
    }
    Ok(median(secs))
}

/// `kiln bench matmul`: Burn's dense matmul where a LoRA step spends most of its time, the
/// frozen projections over 8192 tokens, forward `x·W` and backward `dy·Wᵀ` (a transposed view,
/// as autodiff passes it), in f32 (TF32 on NVIDIA tensor cores) and bf16 where the device has
/// it (the `run.dtype = "bf16"` path: casts excluded). (inputs, outputs) of Qwen2.5-0.5B's
/// q/o, k/v, gate/up and down, then Llama-3.2-1B's q/o, gate/up and down.
pub fn run_matmul(device: DeviceSpec, json_out: bool) -> anyhow::Result<()> {
    const ROWS: usize = 8192;
    const LORA_RANK: usize = 16;
    const SHAPES: [(usize, usize); 7] = [(896, 896), (896, 128), (896, 4864), (4864, 896), (2048, 2048), (2048, 8192), (8192, 2048)];
    device.check()?;
    let rows = crate::with_backend!(device, |B, dev| {
        let bf16 = B::supports_dtype(&dev, burn::tensor::DType::BF16);
        let mut rows = Vec::new();
        for (k, n) in SHAPES {
            let x = Tensor::<B, 2>::random([ROWS, k], Distribution::Default, &dev);
            let w = Tensor::<B, 2>::random([k, n], Distribution::Default, &dev);
            let dy = Tensor::<B, 2>::random([ROWS, n], Distribution::Default, &dev);
            let flops = 2.0 * (ROWS * k * n) as f64;
            let tflops = |secs: f64| flops / secs / 1e12;
            let mut row = json!({"rows": ROWS, "k": k, "n": n});
            row["f32_fwd"] = json!(tflops(time::<B, _>(&dev, 10, 4, || x.clone().matmul(w.clone()))?));
            row["f32_bwd"] = json!(tflops(time::<B, _>(&dev, 10, 4, || dy.clone().matmul(w.clone().transpose()))?));
            // The adapter's rank-16 products beside it (f32, as kiln keeps adapters): forward
            // `x·A`, `h·B`; the gradients `dA = xᵀ·g` and `dB = hᵀ·dy` reduce over all rows
            // into a small matrix. Microseconds, since their FLOPs are few.
            let a = Tensor::<B, 2>::random([k, LORA_RANK], Distribution::Default, &dev);
            let b = Tensor::<B, 2>::random([LORA_RANK, n], Distribution::Default, &dev);
            let h = Tensor::<B, 2>::random([ROWS, LORA_RANK], Distribution::Default, &dev);
            let us = |secs: f64| secs * 1e6;
            row["lora_xa_us"] = json!(us(time::<B, _>(&dev, 10, 4, || x.clone().matmul(a.clone()))?));
            row["lora_hb_us"] = json!(us(time::<B, _>(&dev, 10, 4, || h.clone().matmul(b.clone()))?));
            row["lora_da_us"] = json!(us(time::<B, _>(&dev, 10, 4, || x.clone().transpose().matmul(h.clone()))?));
            row["lora_db_us"] = json!(us(time::<B, _>(&dev, 10, 4, || h.clone().transpose().matmul(dy.clone()))?));
            // The same two gradients as LoRA's forward makes autodiff form them: per slice of
            // rows, then summed over the slices.
            let slices = kiln_kernels::frozen::row_slices(ROWS);
            let sliced = |t: &Tensor<B, 2>| t.clone().reshape([slices, ROWS / slices, t.dims()[1]]);
            let (xs, hs, dys) = (sliced(&x), sliced(&h), sliced(&dy));
            row["lora_da_sliced_us"] = json!(us(time::<B, _>(&dev, 10, 4, || xs.clone().swap_dims(1, 2).matmul(hs.clone()).sum_dim(0))?));
            row["lora_db_sliced_us"] = json!(us(time::<B, _>(&dev, 10, 4, || hs.clone().swap_dims(1, 2).matmul(dys.clone()).sum_dim(0))?));
            if bf16 {
                let bf = |t: &Tensor<B, 2>| t.clone().cast(FloatDType::BF16);
                let (x, w, dy) = (bf(&x), bf(&w), bf(&dy));
                row["bf16_fwd"] = json!(tflops(time::<B, _>(&dev, 10, 4, || x.clone().matmul(w.clone()))?));
                row["bf16_bwd"] = json!(tflops(time::<B, _>(&dev, 10, 4, || dy.clone().matmul(w.clone().transpose()))?));
                // What kiln's frozen products and custom ops call: cuBLAS on CUDA (an f32 result).
                row["kiln_fwd"] = json!(tflops(time::<B, _>(&dev, 10, 4, || matmul_out(x.clone(), w.clone(), FloatDType::F32))?));
                row["kiln_bwd"] = json!(tflops(time::<B, _>(&dev, 10, 4, || matmul_out(dy.clone(), w.clone().transpose(), FloatDType::F32))?));
                // The adapter products again with bf16 operands (as PyTorch's autocast runs them).
                let (a, b, h) = (bf(&a), bf(&b), bf(&h));
                let (xs, hs, dys) = (sliced(&x), sliced(&h), sliced(&dy));
                row["lora_bf16_xa_us"] = json!(us(time::<B, _>(&dev, 10, 4, || x.clone().matmul(a.clone()))?));
                row["lora_bf16_hb_us"] = json!(us(time::<B, _>(&dev, 10, 4, || h.clone().matmul(b.clone()))?));
                row["lora_bf16_da_sliced_us"] = json!(us(time::<B, _>(&dev, 10, 4, || xs.clone().swap_dims(1, 2).matmul(hs.clone()).sum_dim(0))?));
                row["lora_bf16_db_sliced_us"] = json!(us(time::<B, _>(&dev, 10, 4, || hs.clone().swap_dims(1, 2).matmul(dys.clone()).sum_dim(0))?));
            }
            rows.push(row);
        }
        anyhow::Ok(rows)
    })?;
    if json_out {
        println!("{}", json!({"device": device.to_string(), "matmul": rows}));
        return Ok(());
    }
    println!("dense matmul on {device}, {ROWS} rows: TFLOP/s (forward x·W, backward dy·Wᵀ)");
    for r in &rows {
        let cell = |key: &str| r[key].as_f64().map_or("      -".to_string(), |t| format!("{t:7.1}"));
        println!("  {:>5} -> {:<5}  f32 {} {}   bf16 {} {}   kiln bf16 -> f32 {} {}", r["k"], r["n"], cell("f32_fwd"), cell("f32_bwd"), cell("bf16_fwd"), cell("bf16_bwd"), cell("kiln_fwd"), cell("kiln_bwd"));
    }
    let (on, off) = kiln_kernels::cublas_counts();
    println!("(\"kiln\" columns: kiln_kernels::frozen::matmul_out; {on} products ran on cuBLAS, {off} fell back to Burn's matmul)");
    println!("rank-{LORA_RANK} adapter products (f32), microseconds each: x·A, h·B, dA = xᵀ·g, dB = hᵀ·dy, and dA, dB summed over {} slices of rows", kiln_kernels::frozen::row_slices(ROWS));
    let us = |r: &Value, key: &str| r[key].as_f64().map_or("      -".to_string(), |t| format!("{t:8.1}"));
    for r in &rows {
        let (xa, hb, da, db) = (us(r, "lora_xa_us"), us(r, "lora_hb_us"), us(r, "lora_da_us"), us(r, "lora_db_us"));
        println!("  {:>5} -> {:<5}  {xa} {hb} {da} {db}   sliced {} {}", r["k"], r["n"], us(r, "lora_da_sliced_us"), us(r, "lora_db_sliced_us"));
    }
    if rows.iter().any(|r| r.get("lora_bf16_xa_us").is_some()) {
        println!("the same with bf16 operands: x·A, h·B, and dA, dB summed over the slices");
        for r in &rows {
            println!("  {:>5} -> {:<5}  {} {}   sliced {} {}", r["k"], r["n"], us(r, "lora_bf16_xa_us"), us(r, "lora_bf16_hb_us"), us(r, "lora_bf16_da_sliced_us"), us(r, "lora_bf16_db_sliced_us"));
        }
    }
    Ok(())
}

/// Random levels, scales and biases: the speed does not depend on the values.
fn random_weight(n: usize, k: usize, format: Affine) -> HostQuant {
    let mut state = 0x2545F4914F6CDD1Du64 ^ (n * 31 + k) as u64;
    let words = (0..n * format.words(k))
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u32
        })
        .collect();
    let groups = n * k / format.group as usize;
    HostQuant { n, k, format, words, scales: vec![0.01; groups], biases: vec![-0.05; groups] }
}

pub fn run(device: DeviceSpec, json_out: bool) -> anyhow::Result<()> {
    device.check()?;
    let report = crate::with_backend!(device, |B, dev| bench::<B>(&dev, device))?;
    if json_out {
        println!("{report}");
        return Ok(());
    }
    println!("device {}: copy bandwidth {:.1} GB/s", report["device"].as_str().unwrap_or("?"), report["copy_gb_s"].as_f64().unwrap_or(0.0));
    println!(
        "checked {} products (forward and dx) against dequantise-then-multiply in f64: max relative error {:.2e}",
        report["check"]["cases"], report["check"]["max_rel_err"].as_f64().unwrap_or(f64::NAN)
    );
    println!("decode (1 row): weight GB/s and fraction of copy bandwidth, calls queued as in a forward pass (one call alone, with its sync, in brackets)");
    for r in report["decode"].as_array().into_iter().flatten() {
        println!(
            "  {:<26} {:>12}  {:>8.3} ms  {:>7.1} GB/s  {:>5.1} %  ({:.3} ms alone)",
            r["format"].as_str().unwrap_or(""),
            r["shape"].as_str().unwrap_or(""),
            r["ms"].as_f64().unwrap_or(0.0),
            r["gb_s"].as_f64().unwrap_or(0.0),
            100.0 * r["fraction_of_copy"].as_f64().unwrap_or(0.0),
            r["latency_ms"].as_f64().unwrap_or(0.0)
        );
    }
    println!("prefill (512 rows): TFLOP/s, quantised kernel vs dense matmul");
    for r in report["prefill"].as_array().into_iter().flatten() {
        let bf16 = r["dense_bf16_tflops"].as_f64().map(|t| format!("  dense bf16 {t:.2}")).unwrap_or_default();
        println!("  {:<26} {:>12}  quantised {:>7.2}  dense f32 {:>7.2}{bf16}", r["format"].as_str().unwrap_or(""), r["shape"].as_str().unwrap_or(""), r["tflops"].as_f64().unwrap_or(0.0), r["dense_f32_tflops"].as_f64().unwrap_or(0.0));
    }
    Ok(())
}

fn bench<B: Backend + QuantMatmul>(device: &B::Device, spec: DeviceSpec) -> anyhow::Result<Value> {
    let cpu = matches!(spec, DeviceSpec::Cpu);
    // Copy bandwidth: read and write a large buffer once (a scale by one).
    // wgpu caps one buffer at 128 MiB (often less on software adapters).
    let elems = if matches!(spec, DeviceSpec::Cuda(_) | DeviceSpec::Rocm(_)) { 1 << 26 } else { 1 << 24 };
    let big = Tensor::<B, 1>::random([elems], Distribution::Default, device);
    let secs = time::<B, _>(device, 10, 1, || big.clone().mul_scalar(1.0))?;
    let copy_gb_s = 2.0 * (elems * 4) as f64 / secs / 1e9;
    drop(big);
    let shapes: Vec<(usize, usize)> = if cpu { vec![(896, 4864), (4096, 4096)] } else { SHAPES.to_vec() };
    let prefill_rows = if cpu { 64 } else { 512 };
    let (mut decode, mut prefill) = (Vec::new(), Vec::new());
    let bf16 = B::supports_dtype(device, burn::tensor::DType::BF16);
    let mut dense_bf16 = std::collections::HashMap::new();
    let check = verify::<B>(device)?;
    for (name, bits, group) in FORMATS {
        let format = Affine { bits, group };
        for &(k, n) in &shapes {
            let q = random_weight(n, k, format);
            let weight_bytes = (q.words.len() * 4 + (q.scales.len() + q.biases.len()) * 4) as f64;
            // Several copies of the weight, used in turn, so that decode reads device memory
            // and not the last-level cache (50 MB on an H100).
            let copies = if cpu { 1 } else { (256e6 / weight_bytes).ceil().clamp(1.0, 16.0) as usize };
            let sets: Vec<_> = (0..copies).map(|_| q.to_tensors::<B>(device)).collect();
            let (words, scales, biases) = sets[0].clone();
            let x1 = Tensor::<B, 2>::random([1, k], Distribution::Default, device);
            let mut turn = 0;
            let mut call = || {
                turn += 1;
                let (w, s, b) = &sets[turn % copies];
                quant_matmul(x1.clone(), w.clone(), s.clone(), b.clone(), format)
            };
            let secs = time::<B, _>(device, if cpu { 5 } else { 16 }, if cpu { 1 } else { 32 }, &mut call)?;
            let latency = time::<B, _>(device, if cpu { 3 } else { 32 }, 1, &mut call)?;
            let gb_s = weight_bytes / secs / 1e9;
            decode.push(json!({"format": name, "shape": format!("{k}x{n}"), "ms": secs * 1e3, "latency_ms": latency * 1e3, "gb_s": gb_s, "fraction_of_copy": gb_s / copy_gb_s}));

            let m = prefill_rows;
            let xm = Tensor::<B, 2>::random([m, k], Distribution::Default, device);
            let flops = 2.0 * (m * n * k) as f64;
            let secs = time::<B, _>(device, if cpu { 2 } else { 10 }, if cpu { 1 } else { 4 }, || quant_matmul(xm.clone(), words.clone(), scales.clone(), biases.clone(), format))?;
            let dense = Tensor::<B, 2>::random([k, n], Distribution::Default, device);
            let dense_secs = time::<B, _>(device, if cpu { 2 } else { 10 }, if cpu { 1 } else { 4 }, || xm.clone().matmul(dense.clone()))?;
            let mut row = json!({"format": name, "shape": format!("{k}x{n}"), "rows": m, "tflops": flops / secs / 1e12, "dense_f32_tflops": flops / dense_secs / 1e12});
            if bf16 {
                // The same product in bf16 (as `run.dtype = "bf16"` runs it), once per shape.
                let tflops = match dense_bf16.get(&(k, n)) {
                    Some(t) => *t,
                    None => {
                        let (x, w) = (xm.clone().cast(FloatDType::BF16), dense.clone().cast(FloatDType::BF16));
                        let t = flops / time::<B, _>(device, 10, 4, || x.clone().matmul(w.clone()))? / 1e12;
                        *dense_bf16.entry((k, n)).or_insert(t)
                    }
                };
                row["dense_bf16_tflops"] = json!(tflops);
            }
            prefill.push(row);
        }
    }
    Ok(json!({"device": format!("{spec:?}"), "copy_gb_s": copy_gb_s, "check": check, "decode": decode, "prefill": prefill}))
}

/// Every format, forward and transposed, on fresh random inputs at shapes that are not
/// multiples of the tiles, against the host's f64 product of the dequantised weight. Fails
/// above 1e-3 relative error: a wrong kernel is never timed.
fn verify<B: Backend + QuantMatmul>(device: &B::Device) -> anyhow::Result<Value> {
    let mut state = 0x9E37_79B9u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let (mut cases, mut worst) = (0, 0f64);
    for (name, bits, group) in FORMATS {
        let format = Affine { bits, group };
        for (m, n, k) in [(1, 97, 256), (3, 896, 896), (8, 33, 512), (37, 130, 384)] {
            if k % group as usize != 0 {
                continue;
            }
            let levels: Vec<u8> = (0..n * k).map(|_| ((next() + 0.5) * (format.mask() + 1) as f32) as u8).collect();
            let groups = n * k / group as usize;
            let q = HostQuant::pack(&levels, n, k, format, (0..groups).map(|_| 0.02 + 0.01 * next()).collect(), (0..groups).map(|_| 0.05 * next()).collect());
            let w = q.dequantize();
            let x: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let dy: Vec<f32> = (0..m * n).map(|_| next()).collect();
            let (words, scales, biases) = q.to_tensors::<B>(device);
            let xt = Tensor::<B, 2>::from_data(burn::tensor::TensorData::new(x.clone(), [m, k]), device);
            let y: Vec<f32> = quant_matmul(xt, words.clone(), scales.clone(), biases.clone(), format).into_data().convert::<f32>().into_vec().unwrap_or_default();
            let dyt = Tensor::<B, 2>::from_data(burn::tensor::TensorData::new(dy.clone(), [m, n]), device);
            let dx = B::quant_matmul_dx(dyt.into_primitive().tensor(), words.into_primitive(), scales.into_primitive().tensor(), biases.into_primitive().tensor(), format);
            let dx: Vec<f32> = Tensor::<B, 2>::from_primitive(burn::tensor::TensorPrimitive::Float(dx)).into_data().convert::<f32>().into_vec().unwrap_or_default();
            let mut want_y = vec![0f64; m * n];
            let mut want_dx = vec![0f64; m * k];
            for r in 0..m {
                for o in 0..n {
                    for j in 0..k {
                        want_y[r * n + o] += x[r * k + j] as f64 * w[o * k + j] as f64;
                        want_dx[r * k + j] += dy[r * n + o] as f64 * w[o * k + j] as f64;
                    }
                }
            }
            for (got, want, what) in [(&y, &want_y, "forward"), (&dx, &want_dx, "dx")] {
                let num: f64 = got.iter().zip(want.iter()).map(|(g, w)| (*g as f64 - w).powi(2)).sum();
                let den: f64 = want.iter().map(|w| w * w).sum();
                let err = if got.len() == want.len() { (num / den).sqrt() } else { f64::INFINITY };
                if !(err < 1e-3) {
                    anyhow::bail!("{name} {what} m{m} n{n} k{k}: relative error {err} against the reference; not timing a wrong kernel");
                }
                worst = worst.max(err);
                cases += 1;
            }
        }
    }
    Ok(json!({"cases": cases, "max_rel_err": worst}))
}
