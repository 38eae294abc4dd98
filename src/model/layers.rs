//! The pieces every decoder shares: linear layers with HF weight names, RMSNorm, rotary
//! embeddings and attention masks.
//!
//! Weights load straight from HF names (`q_proj.weight` is `[out, in]`); [`Linear`] keeps the
//! transpose `[in, out]` so that a forward is one matmul, as Burn's own `Linear` does.

use burn::module::{Module, Param};
use burn::prelude::*;
use burn::tensor::TensorData;

use super::config::{RopeConfig, RopeScaling};
use super::weights::WeightFiles;
use super::ModelError;

/// Loads `name` from `files` as a tensor of `shape` on `device`.
pub fn load_tensor<B: Backend, const D: usize>(
    files: &WeightFiles,
    name: &str,
    shape: [usize; D],
    device: &B::Device,
) -> Result<Tensor<B, D>, ModelError> {
    let data = files.f32(name, &shape)?;
    Ok(Tensor::from_data(TensorData::new(data, shape), device))
}

/// Row-major `[rows, cols]` -> row-major `[cols, rows]`.
pub fn transpose_host(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0f32; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

/// `y = x·W + b`, with `W` stored `[in, out]`.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// [in, out]
    pub weight: Param<Tensor<B, 2>>,
    /// [out]
    pub bias: Option<Param<Tensor<B, 1>>>,
    /// A low-rank update added to the output when this layer is adapted.
    pub lora: Option<crate::lora::Lora<B>>,
}

impl<B: Backend> Linear<B> {
    /// Loads `{prefix}.weight` (HF `[out, in]`) and, if `bias`, `{prefix}.bias`.
    pub fn load(files: &WeightFiles, prefix: &str, d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Result<Self, ModelError> {
        let weight = files.f32(&format!("{prefix}.weight"), &[d_out, d_in])?;
        let bias = if bias {
            Some(load_tensor::<B, 1>(files, &format!("{prefix}.bias"), [d_out], device)?)
        } else {
            None
        };
        Ok(Self::from_hf(&weight, d_out, d_in, bias, device))
    }

    /// A layer from an HF-layout weight (`[out, in]`, row-major host data) and optional bias.
    /// The transpose happens on the host: a transposed *view* on the device would make the
    /// backend copy the whole weight into matmul order on every call.
    pub fn from_hf(weight_out_in: &[f32], d_out: usize, d_in: usize, bias: Option<Tensor<B, 1>>, device: &B::Device) -> Self {
        let w = transpose_host(weight_out_in, d_out, d_in); // [out, in] -> [in, out]
        let weight = Tensor::from_data(TensorData::new(w, [d_in, d_out]), device);
        Self { weight: Param::from_tensor(weight), bias: bias.map(Param::from_tensor), lora: None }
    }

    pub fn d_in(&self) -> usize {
        self.weight.dims()[0]
    }

    pub fn d_out(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let w = self.weight.val().unsqueeze::<D>(); // [in, out] -> [1.., in, out]
        let y = x.clone().matmul(w);
        let y = match &self.bias {
            Some(b) => y + b.val().unsqueeze::<D>(),
            None => y,
        };
        match &self.lora {
            Some(lora) => y + lora.forward(x),
            None => y,
        }
    }
}

/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) · (offset + w)`.
/// Gemma stores `w` as an offset from one (`offset = 1`), the others use `offset = 0`.
#[derive(Module, Debug)]
pub struct RmsNorm<B: Backend> {
    /// [d]
    pub weight: Param<Tensor<B, 1>>,
    pub eps: f64,
    pub offset: f64,
}

impl<B: Backend> RmsNorm<B> {
    pub fn load(files: &WeightFiles, name: &str, dim: usize, eps: f64, offset: f64, device: &B::Device) -> Result<Self, ModelError> {
        let weight = load_tensor::<B, 1>(files, &format!("{name}.weight"), [dim], device)?;
        Ok(Self { weight: Param::from_tensor(weight), eps, offset })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let last = D - 1;
        let rms = x.clone().powi_scalar(2).mean_dim(last).add_scalar(self.eps).sqrt(); // [.., 1]
        let w = self.weight.val().add_scalar(self.offset).unsqueeze::<D>(); // [d] -> [1.., d]
        x.div(rms).mul(w)
    }
}

/// Inverse frequencies of one rope, computed in f32 as transformers does (its tables are f32,
/// and matching their rounding keeps logits within 1e-6 of the reference).
pub fn inv_freq(rope: &RopeConfig) -> Vec<f32> {
    let dim = rope.rotary_dim;
    let base: Vec<f32> = (0..dim / 2)
        .map(|i| 1.0 / (rope.theta as f32).powf((2 * i) as f32 / dim as f32))
        .collect();
    match rope.scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position } => {
            let low_wavelen = original_max_position / low_freq_factor;
            let high_wavelen = original_max_position / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let f = f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    let out = if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (original_max_position / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    };
                    out as f32
                })
                .collect()
        }
    }
}

/// cos and sin tables `[rows, len, rotary_dim]` for the given positions (`rows · len` of them,
/// row-major), laid out as transformers' `cat(freqs, freqs)` (rotate-half convention).
pub fn rope_tables<B: Backend>(inv_freq: &[f32], positions: &[usize], rows: usize, device: &B::Device) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(positions.len() * half * 2);
    let mut sin = Vec::with_capacity(positions.len() * half * 2);
    for &p in positions {
        for _ in 0..2 {
            for &f in inv_freq {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    let shape = [rows, positions.len() / rows.max(1), half * 2];
    (
        Tensor::from_data(TensorData::new(cos, shape), device),
        Tensor::from_data(TensorData::new(sin, shape), device),
    )
}

/// Applies rotate-half rope to `x` `[b, h, s, d]` with tables `[b or 1, s, r]` (r ≤ d rotate,
/// the rest pass through unchanged).
pub fn apply_rope<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 3>, sin: &Tensor<B, 3>) -> Tensor<B, 4> {
    let [b, h, s, d] = x.dims();
    let r = cos.dims()[2];
    let (rot, pass) = if r < d {
        (x.clone().narrow(3, 0, r), Some(x.narrow(3, r, d - r)))
    } else {
        (x, None)
    };
    let x1 = rot.clone().narrow(3, 0, r / 2);
    let x2 = rot.clone().narrow(3, r / 2, r / 2);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3); // [b, h, s, r]
    let cos = cos.clone().unsqueeze_dim::<4>(1); // [b, s, r] -> [b, 1, s, r]
    let sin = sin.clone().unsqueeze_dim::<4>(1);
    let out = rot * cos + rotated * sin;
    let out = match pass {
        Some(p) => Tensor::cat(vec![out, p], 3), // [b, h, s, d]
        None => out,
    };
    debug_assert_eq!(out.dims(), [b, h, s, d]);
    out
}

/// Additive attention mask `[1, s, t]` for `s` queries at positions `past..past + s` over `t =
/// past + s` keys: 0 where a query may look, -inf elsewhere (the future, and keys `window` or
/// more positions back).
pub fn causal_mask<B: Backend>(s: usize, past: usize, window: Option<usize>, device: &B::Device) -> Tensor<B, 3> {
    let t = past + s;
    let mut data = vec![0f32; s * t];
    for i in 0..s {
        let q = past + i;
        for k in 0..t {
            if !may_attend(q, k, window) {
                data[i * t + k] = f32::NEG_INFINITY;
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [1, s, t]), device)
}

/// Block-diagonal causal mask `[b, s, s]` for packed rows: a query sees earlier keys of its own
/// segment only, so examples packed into one row never attend to each other.
pub fn packed_mask<B: Backend>(segments: &[u32], positions: &[u32], rows: usize, window: Option<usize>, device: &B::Device) -> Tensor<B, 3> {
    let s = segments.len() / rows.max(1);
    let mut data = vec![f32::NEG_INFINITY; rows * s * s];
    for r in 0..rows {
        let seg = &segments[r * s..(r + 1) * s];
        let pos = &positions[r * s..(r + 1) * s];
        for q in 0..s {
            for k in 0..=q {
                if seg[k] == seg[q] && may_attend(pos[q] as usize, pos[k] as usize, window) {
                    data[(r * s + q) * s + k] = 0.0;
                }
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [rows, s, s]), device)
}

fn may_attend(q: usize, k: usize, window: Option<usize>) -> bool {
    k <= q && window.is_none_or(|w| q < k + w)
}

/// Repeats each of `kv` key/value heads `n_rep` times: `[b, kv, t, d] -> [b, kv·n_rep, t, d]`.
pub fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n_rep: usize) -> Tensor<B, 4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kv, t, d] = x.dims();
    x.unsqueeze_dim::<5>(2) // [b, kv, 1, t, d]
        .expand([b, kv, n_rep, t, d])
        .reshape([b, kv * n_rep, t, d])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Cpu;

    #[test]
    fn sliding_mask_keeps_window_including_self() {
        let m = causal_mask::<Cpu>(4, 0, Some(2), &Default::default());
        assert_eq!(m.dims(), [1, 4, 4]);
        let v = m.into_data().to_vec::<f32>().unwrap();
        let allowed: Vec<bool> = v.iter().map(|x| x.is_finite()).collect();
        #[rustfmt::skip]
        let expected = [
            true, false, false, false,
            true, true, false, false,
            false, true, true, false,
            false, false, true, true,
        ];
        assert_eq!(allowed, expected);
    }

    #[test]
    fn llama3_scaling_keeps_high_frequencies() {
        let rope = RopeConfig {
            theta: 500000.0,
            rotary_dim: 128,
            scaling: RopeScaling::Llama3 { factor: 8.0, low_freq_factor: 1.0, high_freq_factor: 4.0, original_max_position: 8192.0 },
        };
        let plain = inv_freq(&RopeConfig { scaling: RopeScaling::None, ..rope.clone() });
        let scaled = inv_freq(&rope);
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-12);
    }
}
