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

/// `y = x·W + b`, with `W` stored `[in, out]`.
#[derive(Module, Debug)]
pub struct Linear<B: Backend> {
    /// [in, out]
    pub weight: Param<Tensor<B, 2>>,
    /// [out]
    pub bias: Option<Param<Tensor<B, 1>>>,
}

impl<B: Backend> Linear<B> {
    /// Loads `{prefix}.weight` (HF `[out, in]`) and, if `bias`, `{prefix}.bias`.
    pub fn load(files: &WeightFiles, prefix: &str, d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> Result<Self, ModelError> {
        let weight = load_tensor::<B, 2>(files, &format!("{prefix}.weight"), [d_out, d_in], device)?;
        let bias = if bias {
            Some(Param::from_tensor(load_tensor::<B, 1>(files, &format!("{prefix}.bias"), [d_out], device)?))
        } else {
            None
        };
        Ok(Self { weight: Param::from_tensor(weight.transpose()), bias })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let w = self.weight.val().unsqueeze::<D>(); // [in, out] -> [1.., in, out]
        let y = x.matmul(w);
        match &self.bias {
            Some(b) => y + b.val().unsqueeze::<D>(),
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

/// cos and sin tables for positions `start..start + len`, each `[len, rotary_dim]` laid out as
/// transformers' `cat(freqs, freqs)` (rotate-half convention).
pub fn rope_tables<B: Backend>(inv_freq: &[f32], start: usize, len: usize, device: &B::Device) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(len * half * 2);
    let mut sin = Vec::with_capacity(len * half * 2);
    for p in start..start + len {
        for _ in 0..2 {
            for &f in inv_freq {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    let shape = [len, half * 2];
    (
        Tensor::from_data(TensorData::new(cos, shape), device),
        Tensor::from_data(TensorData::new(sin, shape), device),
    )
}

/// Applies rotate-half rope to `x` `[b, h, s, d]` with tables `[s, r]` (r ≤ d rotate, the rest
/// pass through unchanged).
pub fn apply_rope<B: Backend>(x: Tensor<B, 4>, cos: &Tensor<B, 2>, sin: &Tensor<B, 2>) -> Tensor<B, 4> {
    let [b, h, s, d] = x.dims();
    let r = cos.dims()[1];
    let (rot, pass) = if r < d {
        (x.clone().narrow(3, 0, r), Some(x.narrow(3, r, d - r)))
    } else {
        (x, None)
    };
    let x1 = rot.clone().narrow(3, 0, r / 2);
    let x2 = rot.clone().narrow(3, r / 2, r / 2);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3); // [b, h, s, r]
    let cos = cos.clone().unsqueeze::<4>(); // [s, r] -> [1, 1, s, r]
    let sin = sin.clone().unsqueeze::<4>();
    let out = rot * cos + rotated * sin;
    let out = match pass {
        Some(p) => Tensor::cat(vec![out, p], 3), // [b, h, s, d]
        None => out,
    };
    debug_assert_eq!(out.dims(), [b, h, s, d]);
    out
}

/// Additive attention mask `[s, t]` for `s` queries at positions `past..past + s` over `t = past
/// + s` keys: 0 where a query may look, -inf elsewhere (the future, and keys `window` or more
/// positions back).
pub fn causal_mask<B: Backend>(s: usize, past: usize, window: Option<usize>, device: &B::Device) -> Tensor<B, 2> {
    let t = past + s;
    let mut data = vec![0f32; s * t];
    for i in 0..s {
        let q = past + i;
        for k in 0..t {
            let future = k > q;
            let too_far = window.is_some_and(|w| q >= k + w);
            if future || too_far {
                data[i * t + k] = f32::NEG_INFINITY;
            }
        }
    }
    Tensor::from_data(TensorData::new(data, [s, t]), device)
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
