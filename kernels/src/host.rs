//! Affine-quantised weights on the host: packing, the exact dequantisation (ground truth for
//! tests), and upload as the three tensors the kernels take.

use burn::prelude::*;
use burn::tensor::{DType, TensorData};

use crate::Affine;

/// One quantised `[n, k]` weight in the affine group layout (see the crate docs).
#[derive(Debug, Clone, PartialEq)]
pub struct HostQuant {
    pub n: usize,
    pub k: usize,
    pub format: Affine,
    pub words: Vec<u32>,
    pub scales: Vec<f32>,
    pub biases: Vec<f32>,
}

impl HostQuant {
    /// Packs levels `q` (`[n, k]`, each below 2^bits) with their group scales and biases.
    pub fn pack(q: &[u8], n: usize, k: usize, format: Affine, scales: Vec<f32>, biases: Vec<f32>) -> Self {
        let per_word = format.per_word();
        let mut words = vec![0u32; n * k / per_word];
        for (i, &v) in q.iter().enumerate() {
            words[i / per_word] |= (v as u32 & format.mask()) << (format.bits as usize * (i % per_word));
        }
        Self { n, k, format, words, scales, biases }
    }

    /// Level `j` of row `o`.
    pub fn level(&self, o: usize, j: usize) -> u32 {
        let per_word = self.format.per_word();
        let word = self.words[(o * self.k + j) / per_word];
        (word >> (self.format.bits as usize * ((o * self.k + j) % per_word))) & self.format.mask()
    }

    /// The float weight `[n, k]`, computed as the kernels do (`scale · q + bias` in f32).
    pub fn dequantize(&self) -> Vec<f32> {
        let groups = self.k / self.format.group as usize;
        let mut out = Vec::with_capacity(self.n * self.k);
        for o in 0..self.n {
            for j in 0..self.k {
                let g = o * groups + j / self.format.group as usize;
                out.push(self.scales[g] * self.level(o, j) as f32 + self.biases[g]);
            }
        }
        out
    }

    /// `(words [n, k·bits/32] as U32, scales, biases)` on `device`. The words get an explicit
    /// U32 dtype: Burn would otherwise convert them to the backend's default int type.
    pub fn to_tensors<B: Backend>(&self, device: &B::Device) -> (Tensor<B, 2, Int>, Tensor<B, 2>, Tensor<B, 2>) {
        let groups = self.k / self.format.group as usize;
        let words = Tensor::<B, 2, Int>::from_data(TensorData::new(self.words.clone(), [self.n, self.format.words(self.k)]), (device, DType::U32));
        let scales = Tensor::from_data(TensorData::new(self.scales.clone(), [self.n, groups]), device);
        let biases = Tensor::from_data(TensorData::new(self.biases.clone(), [self.n, groups]), device);
        (words, scales, biases)
    }
}
