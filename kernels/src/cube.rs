//! The CubeCL kernels (one source compiled to WGSL/SPIR-V, CUDA and HIP) and their
//! registration for `CubeBackend<R, ..>`.
//!
//! - `matvec`: decode (few activation rows). One cube of `LANES` threads per output feature:
//!   the threads walk the weight row together (adjacent threads read adjacent words, so loads
//!   coalesce), each keeps partial sums for up to `MAX_ROWS` activation rows, and a tree
//!   reduction in shared memory finishes. Each weight word is read once for all rows.
//! - `matmul`: prefill and training (many rows). A 16 × 16 tile of outputs per cube; the
//!   tile's activations and dequantised weights are staged through shared memory a slice of
//!   `k` at a time.
//! - `matmul_dx`: the transposed product `dy · W` for backward, tiled the same way.
//!
//! Rows and columns that are not multiples of the tiles are bounds-checked, never padded.

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::{cast, into_contiguous};
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
use cubecl::prelude::*;
use cubecl::{cube, CubeCount, CubeDim};

use crate::{Affine, QuantMatmul};

const LANES: u32 = 64;
const LOG_LANES: u32 = 6;
const MAX_ROWS: u32 = 8;
const TILE: u32 = 16;

/// Level `v` of a word.
#[cube]
fn level<F: Float>(word: u32, v: u32, #[comptime] bits: u32) -> F {
    F::cast_from((word >> (v * bits)) & comptime!((1u32 << bits) - 1))
}

/// `rows` (1 to `MAX_ROWS`) is compile-time, so each weight value costs exactly `rows`
/// multiply-adds and no bounds checks; one variant is compiled per row count used.
#[cube(launch)]
fn matvec_kernel<F: Float>(x: &Tensor<F>, words: &Tensor<u32>, scales: &Tensor<F>, biases: &Tensor<F>, out: &mut Tensor<F>, #[comptime] bits: u32, #[comptime] group: u32, #[comptime] rows: u32) {
    let o = CUBE_POS_X as usize;
    let lane = UNIT_POS_X;
    let k = x.shape(1);
    let n = out.shape(1);
    let per_word = comptime!(32 / bits);
    let words_per_row = k / (per_word as usize);
    let mut partial = SharedMemory::<F>::new(comptime!(LANES * rows) as usize);
    let mut acc = Array::<F>::new(comptime!(rows) as usize);
    #[unroll]
    for r in 0..rows {
        acc[r as usize] = F::new(0.0);
    }
    if o < n {
        let mut w = lane as usize;
        while w < words_per_row {
            let word = words[o * words.stride(0) + w * words.stride(1)];
            let j0 = w * (per_word as usize);
            let g = j0 / (group as usize);
            let scale = scales[o * scales.stride(0) + g * scales.stride(1)];
            let bias = biases[o * biases.stride(0) + g * biases.stride(1)];
            #[unroll]
            for v in 0..per_word {
                let wv = scale * level::<F>(word, v, bits) + bias;
                #[unroll]
                for r in 0..rows {
                    acc[r as usize] += wv * x[(r as usize) * x.stride(0) + (j0 + v as usize) * x.stride(1)];
                }
            }
            w += LANES as usize;
        }
    }
    #[unroll]
    for r in 0..rows {
        partial[(r * LANES + lane) as usize] = acc[r as usize];
    }
    sync_cube();
    #[unroll]
    for step in 0..LOG_LANES {
        let stride = (LANES / 2) >> step;
        if lane < stride {
            #[unroll]
            for r in 0..rows {
                let i = (r * LANES + lane) as usize;
                let other = partial[i + stride as usize];
                partial[i] += other;
            }
        }
        sync_cube();
    }
    if lane == 0 && o < n {
        #[unroll]
        for r in 0..rows {
            out[(r as usize) * n + o] = partial[(r * LANES) as usize];
        }
    }
}

/// `out[m, n] = x[m, k] · dequant(W)ᵀ`, 16 × 16 outputs per cube, `k` in slices of 16.
#[cube(launch)]
fn matmul_kernel<F: Float>(x: &Tensor<F>, words: &Tensor<u32>, scales: &Tensor<F>, biases: &Tensor<F>, out: &mut Tensor<F>, #[comptime] bits: u32, #[comptime] group: u32) {
    let tx = UNIT_POS_X; // output column within the tile
    let ty = UNIT_POS_Y; // output row within the tile
    let col = (CUBE_POS_X * TILE + tx) as usize;
    let row = (CUBE_POS_Y * TILE + ty) as usize;
    let m = x.shape(0);
    let k = x.shape(1);
    let n = out.shape(1);
    let per_word = comptime!(32 / bits);
    let mut xs = SharedMemory::<F>::new(comptime!(TILE * TILE) as usize);
    let mut ws = SharedMemory::<F>::new(comptime!(TILE * TILE) as usize);
    let mut acc = F::new(0.0);
    let mut k0 = 0usize;
    while k0 < k {
        // Stage x[row, k0 + tx] and w[col0 + ty, k0 + tx] (dequantised) for the tile.
        let j = k0 + tx as usize;
        let mut xv = F::new(0.0);
        if row < m && j < k {
            xv = x[row * x.stride(0) + j * x.stride(1)];
        }
        xs[(ty * TILE + tx) as usize] = xv;
        let wrow = (CUBE_POS_X * TILE + ty) as usize;
        let mut wv = F::new(0.0);
        if wrow < n && j < k {
            let word = words[wrow * words.stride(0) + (j / per_word as usize) * words.stride(1)];
            let g = j / (group as usize);
            let v = (j % per_word as usize) as u32;
            wv = scales[wrow * scales.stride(0) + g * scales.stride(1)] * level::<F>(word, v, bits) + biases[wrow * biases.stride(0) + g * biases.stride(1)];
        }
        ws[(ty * TILE + tx) as usize] = wv;
        sync_cube();
        #[unroll]
        for t in 0..TILE {
            acc += xs[(ty * TILE + t) as usize] * ws[(tx * TILE + t) as usize];
        }
        sync_cube();
        k0 += TILE as usize;
    }
    if row < m && col < n {
        out[row * n + col] = acc;
    }
}

/// `dx[m, k] = dy[m, n] · dequant(W)`, 16 × 16 outputs per cube, `n` in slices of 16.
#[cube(launch)]
fn matmul_dx_kernel<F: Float>(dy: &Tensor<F>, words: &Tensor<u32>, scales: &Tensor<F>, biases: &Tensor<F>, dx: &mut Tensor<F>, #[comptime] bits: u32, #[comptime] group: u32) {
    let tx = UNIT_POS_X; // dx column (input feature) within the tile
    let ty = UNIT_POS_Y; // dx row within the tile
    let col = (CUBE_POS_X * TILE + tx) as usize;
    let row = (CUBE_POS_Y * TILE + ty) as usize;
    let m = dy.shape(0);
    let n = dy.shape(1);
    let k = dx.shape(1);
    let per_word = comptime!(32 / bits);
    let mut ds = SharedMemory::<F>::new(comptime!(TILE * TILE) as usize);
    let mut ws = SharedMemory::<F>::new(comptime!(TILE * TILE) as usize);
    let mut acc = F::new(0.0);
    let mut o0 = 0usize;
    while o0 < n {
        // Stage dy[row, o0 + tx] and w[o0 + ty, col] for the tile.
        let o = o0 + tx as usize;
        let mut dv = F::new(0.0);
        if row < m && o < n {
            dv = dy[row * dy.stride(0) + o * dy.stride(1)];
        }
        ds[(ty * TILE + tx) as usize] = dv;
        let wo = o0 + ty as usize;
        let mut wv = F::new(0.0);
        if wo < n && col < k {
            let word = words[wo * words.stride(0) + (col / per_word as usize) * words.stride(1)];
            let g = col / (group as usize);
            let v = (col % per_word as usize) as u32;
            wv = scales[wo * scales.stride(0) + g * scales.stride(1)] * level::<F>(word, v, bits) + biases[wo * biases.stride(0) + g * biases.stride(1)];
        }
        ws[(ty * TILE + tx) as usize] = wv;
        sync_cube();
        #[unroll]
        for t in 0..TILE {
            acc += ds[(ty * TILE + t) as usize] * ws[(t * TILE + tx) as usize];
        }
        sync_cube();
        o0 += TILE as usize;
    }
    if row < m && col < k {
        dx[row * k + col] = acc;
    }
}

/// The kernels are generic over the backend's float type; other float inputs are cast.
fn as_float<R: CubeRuntime, F: FloatElement>(t: CubeTensor<R>) -> CubeTensor<R> {
    if t.dtype == F::dtype() { t } else { cast(t, F::dtype()) }
}

/// Words are read as u32; an I32 tensor holds the same bits.
fn as_words<R: CubeRuntime>(t: CubeTensor<R>) -> CubeTensor<R> {
    match t.dtype {
        DType::U32 | DType::I32 => t,
        _ => cast(t, DType::U32),
    }
}

fn tiles(cols: usize, rows: usize) -> (CubeCount, CubeDim) {
    (CubeCount::Static((cols as u32).div_ceil(TILE), (rows as u32).div_ceil(TILE), 1), CubeDim { x: TILE, y: TILE, z: 1 })
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> QuantMatmul for CubeBackend<R, F, I, BT> {
    fn quant_matmul(x: FloatTensor<Self>, words: IntTensor<Self>, scales: FloatTensor<Self>, biases: FloatTensor<Self>, format: Affine) -> FloatTensor<Self> {
        let x = as_float::<R, F>(x);
        let words = as_words(into_contiguous(words));
        let (scales, biases) = (as_float::<R, F>(scales), as_float::<R, F>(biases));
        let [m, _k] = x.meta.shape().dims::<2>();
        let [n, _] = words.meta.shape().dims::<2>();
        let out = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), Shape::new([m, n]), F::dtype());
        let client = x.client.clone();
        if m == 0 || n == 0 {
            return out;
        }
        if m as u32 <= MAX_ROWS {
            let count = CubeCount::Static(n as u32, 1, 1);
            let dim = CubeDim { x: LANES, y: 1, z: 1 };
            matvec_kernel::launch::<F, R>(&client, count, dim, x.into_tensor_arg(), words.into_tensor_arg(), scales.into_tensor_arg(), biases.into_tensor_arg(), out.clone().into_tensor_arg(), format.bits, format.group, m as u32);
        } else {
            let (count, dim) = tiles(n, m);
            matmul_kernel::launch::<F, R>(&client, count, dim, x.into_tensor_arg(), words.into_tensor_arg(), scales.into_tensor_arg(), biases.into_tensor_arg(), out.clone().into_tensor_arg(), format.bits, format.group);
        }
        out
    }

    fn quant_matmul_dx(dy: FloatTensor<Self>, words: IntTensor<Self>, scales: FloatTensor<Self>, biases: FloatTensor<Self>, format: Affine) -> FloatTensor<Self> {
        let dy = as_float::<R, F>(dy);
        let words = as_words(into_contiguous(words));
        let (scales, biases) = (as_float::<R, F>(scales), as_float::<R, F>(biases));
        let [m, _n] = dy.meta.shape().dims::<2>();
        let [_, w] = words.meta.shape().dims::<2>();
        let k = w * format.per_word();
        let dx = empty_device_contiguous_dtype(dy.client.clone(), dy.device.clone(), Shape::new([m, k]), F::dtype());
        let client = dy.client.clone();
        if m == 0 || k == 0 {
            return dx;
        }
        let (count, dim) = tiles(k, m);
        matmul_dx_kernel::launch::<F, R>(&client, count, dim, dy.into_tensor_arg(), words.into_tensor_arg(), scales.into_tensor_arg(), biases.into_tensor_arg(), dx.clone().into_tensor_arg(), format.bits, format.group);
        dx
    }
}
