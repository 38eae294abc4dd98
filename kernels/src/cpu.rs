//! The CPU kernels (Burn's ndarray backend): rayon over blocks of output features, the weight
//! dequantised a word at a time into registers and used for a block of activation rows while
//! it is in cache; the float weight is never formed.

use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray};
use burn::tensor::ops::{FloatTensor, IntTensor};
use std::borrow::Cow;

use burn::tensor::{TensorData, TensorMetadata};
use rayon::prelude::*;

use crate::{Affine, QuantMatmul};

/// The operands as slices: borrowed from the ndarray storage when it is f32/u32 and
/// contiguous (weights are uploaded once and stay so), copied otherwise.
struct Operands<'a> {
    words: Cow<'a, [u32]>,
    scales: Cow<'a, [f32]>,
    biases: Cow<'a, [f32]>,
}

fn f32s<E: FloatNdArrayElement>(t: &NdArrayTensor) -> Cow<'_, [f32]>
where
    NdArrayTensor: From<SharedArray<E>>,
{
    if let NdArrayTensor::F32(s) = t
        && let Some(slice) = s.view().to_slice()
    {
        let (ptr, len) = (slice.as_ptr(), slice.len());
        // SAFETY: the slice points into `t`'s storage, which is borrowed for the returned
        // lifetime; `view()` only wraps that memory, it does not own it.
        return Cow::Borrowed(unsafe { std::slice::from_raw_parts(ptr, len) });
    }
    Cow::Owned(host_f32(float_data::<NdArray<E>>(t.clone())).1)
}

fn u32s(t: &NdArrayTensor) -> Cow<'_, [u32]> {
    if let NdArrayTensor::U32(s) = t
        && let Some(slice) = s.view().to_slice()
    {
        let (ptr, len) = (slice.as_ptr(), slice.len());
        // SAFETY: as in `f32s`.
        return Cow::Borrowed(unsafe { std::slice::from_raw_parts(ptr, len) });
    }
    Cow::Owned(host_words(data_of(t.clone())))
}

fn host_f32(data: TensorData) -> (Vec<usize>, Vec<f32>) {
    let shape: Vec<usize> = data.shape.iter().copied().collect();
    (shape, data.convert::<f32>().into_vec::<f32>().unwrap_or_default())
}

fn host_words(data: TensorData) -> Vec<u32> {
    match data.dtype {
        burn::tensor::DType::U32 => data.into_vec::<u32>().unwrap_or_default(),
        // Bit patterns that went through a signed type keep their low 32 bits.
        burn::tensor::DType::I32 => data.into_vec::<i32>().unwrap_or_default().into_iter().map(|v| v as u32).collect(),
        _ => data.convert::<i64>().into_vec::<i64>().unwrap_or_default().into_iter().map(|v| v as u32).collect(),
    }
}

fn data_of(t: NdArrayTensor) -> TensorData {
    burn::tensor::Tensor::<NdArray, 2, burn::tensor::Int>::from_primitive(t).into_data()
}

/// Output features per rayon task, and activation rows per pass over them.
const N_BLOCK: usize = 16;
const M_BLOCK: usize = 8;

/// `y[m, n] = Σ_j x[m, j] · (s[o, g] q[o, j] + b[o, g])`, per group as
/// `s · Σ x·q + b · Σ x` so the inner loop is one multiply-add per weight.
fn forward(x: &[f32], m: usize, k: usize, n: usize, op: &Operands, f: Affine) -> Vec<f32> {
    let group = f.group as usize;
    let groups = k / group;
    let per_word = f.per_word();
    let words_per_row = k / per_word;
    // Σ x per group, shared by every output.
    let xsum: Vec<f32> = (0..m * groups).map(|i| x[(i / groups) * k + (i % groups) * group..][..group].iter().sum()).collect();
    let mut out_t = vec![0f32; n * m]; // [n, m], transposed at the end
    out_t.par_chunks_mut(N_BLOCK * m).enumerate().for_each(|(block, out)| {
        let o0 = block * N_BLOCK;
        let mut levels = vec![0f32; k];
        for (oi, out_row) in out.chunks_mut(m).enumerate() {
            let o = o0 + oi;
            let row_words = &op.words[o * words_per_row..(o + 1) * words_per_row];
            for (w, &word) in row_words.iter().enumerate() {
                for v in 0..per_word {
                    levels[w * per_word + v] = ((word >> (v as u32 * f.bits)) & f.mask()) as f32;
                }
            }
            for r0 in (0..m).step_by(M_BLOCK) {
                for r in r0..(r0 + M_BLOCK).min(m) {
                    let xr = &x[r * k..(r + 1) * k];
                    let mut acc = 0f32;
                    for g in 0..groups {
                        let span = g * group..(g + 1) * group;
                        let dot: f32 = xr[span.clone()].iter().zip(&levels[span]).map(|(a, b)| a * b).sum();
                        acc += op.scales[o * groups + g] * dot + op.biases[o * groups + g] * xsum[r * groups + g];
                    }
                    out_row[r] = acc;
                }
            }
        }
    });
    let mut out = vec![0f32; m * n];
    for o in 0..n {
        for r in 0..m {
            out[r * n + o] = out_t[o * m + r];
        }
    }
    out
}

/// `dx[m, k] = Σ_o dy[m, o] · w[o, :]`: rayon over blocks of activation rows... and within a
/// task each weight row is dequantised once into registers and scattered into every row's dx.
fn backward(dy: &[f32], m: usize, n: usize, k: usize, op: &Operands, f: Affine) -> Vec<f32> {
    let group = f.group as usize;
    let groups = k / group;
    let per_word = f.per_word();
    let words_per_row = k / per_word;
    let mut dx = vec![0f32; m * k];
    dx.par_chunks_mut(M_BLOCK * k).enumerate().for_each(|(block, dx)| {
        let r0 = block * M_BLOCK;
        let rows = dx.len() / k;
        let mut w = vec![0f32; k];
        for o in 0..n {
            let row_words = &op.words[o * words_per_row..(o + 1) * words_per_row];
            for (wi, &word) in row_words.iter().enumerate() {
                let g = (wi * per_word) / group;
                let (s, b) = (op.scales[o * groups + g], op.biases[o * groups + g]);
                for v in 0..per_word {
                    w[wi * per_word + v] = s * ((word >> (v as u32 * f.bits)) & f.mask()) as f32 + b;
                }
            }
            for r in 0..rows {
                let d = dy[(r0 + r) * n + o];
                if d != 0.0 {
                    for (acc, wv) in dx[r * k..(r + 1) * k].iter_mut().zip(&w) {
                        *acc += d * wv;
                    }
                }
            }
        }
    });
    dx
}

fn float_data<B: burn::tensor::backend::Backend>(t: FloatTensor<B>) -> TensorData {
    burn::tensor::Tensor::<B, 2>::from_primitive(burn::tensor::TensorPrimitive::Float(t)).into_data()
}

fn to_tensor<E: FloatNdArrayElement>(data: Vec<f32>, shape: [usize; 2]) -> NdArrayTensor
where
    NdArrayTensor: From<SharedArray<E>>,
{
    let data = TensorData::new(data, shape).convert::<E>();
    NdArrayTensor::from_data(data)
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> QuantMatmul for NdArray<E, I, Q>
where
    NdArrayTensor: From<SharedArray<E>>,
    NdArrayTensor: From<SharedArray<I>>,
{
    fn quant_matmul(x: FloatTensor<Self>, words: IntTensor<Self>, scales: FloatTensor<Self>, biases: FloatTensor<Self>, format: Affine) -> FloatTensor<Self> {
        let shape = x.shape();
        let (m, k) = (shape[0], shape[1]);
        let x = f32s::<E>(&x);
        let op = Operands { words: u32s(&words), scales: f32s::<E>(&scales), biases: f32s::<E>(&biases) };
        let n = op.words.len() / format.words(k).max(1);
        to_tensor::<E>(forward(&x, m, k, n, &op, format), [m, n])
    }

    fn quant_matmul_dx(dy: FloatTensor<Self>, words: IntTensor<Self>, scales: FloatTensor<Self>, biases: FloatTensor<Self>, format: Affine) -> FloatTensor<Self> {
        let shape = dy.shape();
        let (m, n) = (shape[0], shape[1]);
        let dy = f32s::<E>(&dy);
        let op = Operands { words: u32s(&words), scales: f32s::<E>(&scales), biases: f32s::<E>(&biases) };
        let k = op.words.len() / n.max(1) * format.per_word();
        to_tensor::<E>(backward(&dy, m, n, k, &op, format), [m, k])
    }
}
