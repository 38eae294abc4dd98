//! The CubeCL kernels (one source compiled to WGSL/SPIR-V, CUDA and HIP) and their
//! registration for `CubeBackend<R, ..>`.
//!
//! - `matvec`: decode (few activation rows). One cube of `LANES` threads per output feature:
//!   the threads walk the weight row together (adjacent threads read adjacent words, so loads
//!   coalesce), each keeps partial sums for up to `MAX_ROWS` activation rows, and a tree
//!   reduction in shared memory finishes. Each weight word is read once for all rows.
//! - `matmul`: prefill and training (many rows). A 64 × 64 tile of outputs per cube of
//!   16 × 16 threads, 4 × 4 outputs per thread in registers; the tile's activations and
//!   dequantised weights are staged through shared memory a slice of `k` at a time, so each
//!   weight is dequantised once per 64 rows.
//! - `matmul_dx`: the transposed product `dy · W` for backward, tiled the same way.
//!
//! Rows and columns that are not multiples of the tiles are bounds-checked, never padded.

use burn::tensor::ops::{FloatTensor, FloatTensorOps, IntTensor};
use burn::tensor::{DType, Shape};
use burn_cubecl::kernel::matmul::{matmul, MatmulStrategy};
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
/// Tiled kernels: 16 × 16 threads, each `REG × REG` outputs of a `BLOCK × BLOCK` tile;
/// `SLICE` inputs staged per step, `LOADS` shared-memory values per thread per step.
const THREADS: u32 = 16;
const REG: u32 = 4;
const BLOCK: u32 = THREADS * REG;
const SLICE: u32 = 16;
const LOADS: u32 = SLICE * BLOCK / (THREADS * THREADS);

/// Level `v` of a word.
#[cube]
fn level<F: Float>(word: u32, v: u32, #[comptime] bits: u32) -> F {
    F::cast_from((word >> (v * bits)) & comptime!((1u32 << bits) - 1))
}

/// `rows` (1 to `MAX_ROWS`) is compile-time, so each weight value costs exactly `rows`
/// multiply-adds and no bounds checks; one variant is compiled per row count used.
#[cube(launch_unchecked)]
fn matvec_kernel<F: Float>(x: &Tensor<F>, words: &Tensor<u32>, scales: &Tensor<F>, biases: &Tensor<F>, out: &mut Tensor<F>, #[comptime] bits: u32, #[comptime] group: u32, #[comptime] rows: u32) {
    let o = CUBE_POS_X as usize;
    let lane = UNIT_POS_X;
    let k = x.shape(1);
    let n = out.shape(1);
    let per_word = comptime!(32 / bits);
    let words_per_row = k / (per_word as usize);
    let groups = scales.shape(1);
    let mut partial = SharedMemory::<F>::new(comptime!(LANES * rows) as usize);
    let mut acc = Array::<F>::new(comptime!(rows) as usize);
    #[unroll]
    for r in 0..rows {
        acc[r as usize] = F::new(0.0);
    }
    if o < n {
        let mut w = lane as usize;
        while w < words_per_row {
            let word = words[o * words_per_row + w];
            let j0 = w * (per_word as usize);
            let g = o * groups + j0 / (group as usize);
            let scale = scales[g];
            let bias = biases[g];
            #[unroll]
            for v in 0..per_word {
                let wv = scale * level::<F>(word, v, bits) + bias;
                #[unroll]
                for r in 0..rows {
                    acc[r as usize] += wv * x[(r as usize) * k + j0 + v as usize];
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

/// `w[o, j]`, dequantised. Every tensor is contiguous: `words` `[n, wpr]`, `scales` and
/// `biases` `[n, groups]`.
#[cube]
fn weight<F: Float>(words: &Tensor<u32>, scales: &Tensor<F>, biases: &Tensor<F>, o: usize, j: usize, wpr: usize, groups: usize, #[comptime] bits: u32, #[comptime] group: u32) -> F {
    let per_word = comptime!(32 / bits) as usize;
    let word = words[o * wpr + j / per_word];
    let g = o * groups + j / (group as usize);
    scales[g] * level::<F>(word, (j % per_word) as u32, bits) + biases[g]
}

/// One shared-memory slice of a tile product: `acc[i][j] += Σ_t a[t][ty + 16·i] · b[t][tx + 16·j]`
/// with both slices stored `[SLICE][BLOCK]`.
#[cube]
fn multiply_slice<F: Float>(a_s: &SharedMemory<F>, b_s: &SharedMemory<F>, acc: &mut Array<F>, tx: usize, ty: usize) {
    #[unroll]
    for t in 0..SLICE {
        let base = (t * BLOCK) as usize;
        let mut a = Array::<F>::new(REG as usize);
        let mut b = Array::<F>::new(REG as usize);
        #[unroll]
        for i in 0..REG {
            a[i as usize] = a_s[base + ty + (i * THREADS) as usize];
            b[i as usize] = b_s[base + tx + (i * THREADS) as usize];
        }
        #[unroll]
        for i in 0..REG {
            #[unroll]
            for j in 0..REG {
                acc[(i * REG + j) as usize] += a[i as usize] * b[j as usize];
            }
        }
    }
}

/// Writes a thread's `REG × REG` outputs of the tile at (`row0`, `col0`) into `out`
/// `[rows, cols]`, skipping those past the edges.
#[cube]
fn store_tile<F: Float>(out: &mut Tensor<F>, acc: &Array<F>, row0: usize, col0: usize, rows: usize, cols: usize, tx: usize, ty: usize) {
    #[unroll]
    for i in 0..REG {
        let row = row0 + ty + (i * THREADS) as usize;
        #[unroll]
        for j in 0..REG {
            let col = col0 + tx + (j * THREADS) as usize;
            if row < rows && col < cols {
                out[row * cols + col] = acc[(i * REG + j) as usize];
            }
        }
    }
}

/// `out[m, n] = x[m, k] · dequant(W)ᵀ`. Each cube computes a `BLOCK × BLOCK` tile of outputs
/// with 16 × 16 threads, each thread `REG × REG` of them (rows `ty + 16·i`, columns
/// `tx + 16·j`, so neighbouring threads read neighbouring shared-memory words). A slice of
/// `SLICE` inputs of the tile's activations and dequantised weights is staged in shared memory
/// (stored `[SLICE][BLOCK]`), so each weight value is dequantised once per tile, not per row.
#[cube(launch_unchecked)]
fn matmul_kernel<F: Float>(x: &Tensor<F>, words: &Tensor<u32>, scales: &Tensor<F>, biases: &Tensor<F>, out: &mut Tensor<F>, #[comptime] bits: u32, #[comptime] group: u32) {
    let (tx, ty) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let tid = ty * (THREADS as usize) + tx;
    let row0 = (CUBE_POS_Y * BLOCK) as usize;
    let col0 = (CUBE_POS_X * BLOCK) as usize;
    let m = x.shape(0);
    let k = x.shape(1);
    let n = out.shape(1);
    let wpr = words.shape(1);
    let groups = scales.shape(1);
    let mut xs = SharedMemory::<F>::new(comptime!(SLICE * BLOCK) as usize);
    let mut ws = SharedMemory::<F>::new(comptime!(SLICE * BLOCK) as usize);
    let mut acc = Array::<F>::new(comptime!(REG * REG) as usize);
    #[unroll]
    for i in 0..REG * REG {
        acc[i as usize] = F::new(0.0);
    }
    let mut k0 = 0usize;
    while k0 < k {
        #[unroll]
        for l in 0..LOADS {
            let e = tid + (l * THREADS * THREADS) as usize;
            let r = e / (SLICE as usize); // row (of x) or output (of W) within the tile
            let c = e % (SLICE as usize); // input within the slice
            let j = k0 + c;
            let mut xv = F::new(0.0);
            if row0 + r < m && j < k {
                xv = x[(row0 + r) * k + j];
            }
            xs[c * (BLOCK as usize) + r] = xv;
            let mut wv = F::new(0.0);
            if col0 + r < n && j < k {
                wv = weight::<F>(words, scales, biases, col0 + r, j, wpr, groups, bits, group);
            }
            ws[c * (BLOCK as usize) + r] = wv;
        }
        sync_cube();
        multiply_slice::<F>(&xs, &ws, &mut acc, tx, ty);
        sync_cube();
        k0 += SLICE as usize;
    }
    store_tile::<F>(out, &acc, row0, col0, m, n, tx, ty);
}

/// `dx[m, k] = dy[m, n] · dequant(W)`: the same tiling as [`matmul_kernel`] with the
/// reduction over outputs `n`; the weight slice is `SLICE` outputs × `BLOCK` inputs.
#[cube(launch_unchecked)]
fn matmul_dx_kernel<F: Float>(dy: &Tensor<F>, words: &Tensor<u32>, scales: &Tensor<F>, biases: &Tensor<F>, dx: &mut Tensor<F>, #[comptime] bits: u32, #[comptime] group: u32) {
    let (tx, ty) = (UNIT_POS_X as usize, UNIT_POS_Y as usize);
    let tid = ty * (THREADS as usize) + tx;
    let row0 = (CUBE_POS_Y * BLOCK) as usize;
    let col0 = (CUBE_POS_X * BLOCK) as usize;
    let m = dy.shape(0);
    let n = dy.shape(1);
    let k = dx.shape(1);
    let wpr = words.shape(1);
    let groups = scales.shape(1);
    let mut ds = SharedMemory::<F>::new(comptime!(SLICE * BLOCK) as usize);
    let mut ws = SharedMemory::<F>::new(comptime!(SLICE * BLOCK) as usize);
    let mut acc = Array::<F>::new(comptime!(REG * REG) as usize);
    #[unroll]
    for i in 0..REG * REG {
        acc[i as usize] = F::new(0.0);
    }
    let mut o0 = 0usize;
    while o0 < n {
        #[unroll]
        for l in 0..LOADS {
            let e = tid + (l * THREADS * THREADS) as usize;
            // dy[row0 + r, o0 + c], read along the outputs.
            let r = e / (SLICE as usize);
            let c = e % (SLICE as usize);
            let mut dv = F::new(0.0);
            if row0 + r < m && o0 + c < n {
                dv = dy[(row0 + r) * n + o0 + c];
            }
            ds[c * (BLOCK as usize) + r] = dv;
            // w[o0 + t, col0 + q], read along the inputs (neighbours share words).
            let t = e / (BLOCK as usize);
            let q = e % (BLOCK as usize);
            let mut wv = F::new(0.0);
            if o0 + t < n && col0 + q < k {
                wv = weight::<F>(words, scales, biases, o0 + t, col0 + q, wpr, groups, bits, group);
            }
            ws[t * (BLOCK as usize) + q] = wv;
        }
        sync_cube();
        multiply_slice::<F>(&ds, &ws, &mut acc, tx, ty);
        sync_cube();
        o0 += SLICE as usize;
    }
    store_tile::<F>(dx, &acc, row0, col0, m, k, tx, ty);
}

/// The kernels are generic over the backend's float type; other float inputs are cast.
pub(crate) fn as_float<R: CubeRuntime, F: FloatElement>(t: CubeTensor<R>) -> CubeTensor<R> {
    if t.dtype == F::dtype() { t } else { cast(t, F::dtype()) }
}

/// Threads per cube of the elementwise kernels ([`flat_count`], [`flat_index`]).
pub(crate) const FLAT_THREADS: u32 = 256;

/// Cubes for `n` elements, one thread each, on a two-dimensional grid (a dimension holds at
/// most 65 535 cubes).
pub(crate) fn flat_count(n: usize) -> CubeCount {
    let cubes = n.div_ceil(FLAT_THREADS as usize);
    CubeCount::Static(cubes.min(65_535) as u32, cubes.div_ceil(65_535) as u32, 1)
}

/// Elements per vector for an element-wise kernel over `n` elements of `tensors` (contiguous,
/// one length), whose widest values take `size` bytes: the widest load the device does at once
/// that divides `n` and every tensor's start, else 1. One vector load per thread moves 8 bf16
/// values where a scalar load moves one.
pub(crate) fn flat_width<R: CubeRuntime>(n: usize, size: usize, tensors: &[&CubeTensor<R>]) -> usize {
    let Some(first) = tensors.first() else { return 1 };
    let aligned = |w: usize| tensors.iter().all(|t| t.handle.offset_start.unwrap_or(0) % (w * t.dtype.size()) as u64 == 0);
    first.client.io_optimized_vector_sizes(size).find(|&w| n.is_multiple_of(w) && aligned(w)).unwrap_or(1)
}

/// This thread's element under [`flat_count`] (check it against the length: the last cubes
/// run past it).
#[cube]
pub(crate) fn flat_index() -> usize {
    (CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize) * FLAT_THREADS as usize + UNIT_POS_X as usize
}

/// `c · tanh(x / c)` where `softcap` (Gemma's logit softcap `c`), `x` otherwise.
#[cube]
pub(crate) fn capped<F: Float>(x: F, cap: F, #[comptime] softcap: bool) -> F {
    let mut y = x;
    if softcap {
        y = cap * F::tanh(x / cap);
    }
    y
}

/// Launches the kernel `$kernel` with its type parameters `<$F, G, $R>`, `G` the dtype `$dt`:
/// bf16, f16, else the backend's float `$F`. The caller states, above the call, why the launch
/// is sound.
macro_rules! launch_typed {
    ($kernel:ident, $dt:expr, $F:ty, $R:ty, $($arg:expr),* $(,)?) => {
        unsafe {
            match $dt {
                burn::tensor::DType::BF16 => $kernel::launch_unchecked::<$F, burn::tensor::bf16, $R>($($arg),*),
                burn::tensor::DType::F16 => $kernel::launch_unchecked::<$F, burn::tensor::f16, $R>($($arg),*),
                _ => $kernel::launch_unchecked::<$F, $F, $R>($($arg),*),
            }
        }
    };
}
pub(crate) use launch_typed;

/// Whether [`gemm`] reaches cuBLAS: a CUDA runtime and a loaded `libcublas`.
pub(crate) fn cublas_ready<R: CubeRuntime>() -> bool {
    #[cfg(feature = "cuda")]
    return crate::cublas::ready::<R>();
    #[cfg(not(feature = "cuda"))]
    false
}

/// `acc + alpha · lhs·rhs` in f32 (`acc` absent: zero), `lhs` and `rhs` of one float dtype: cuBLAS where
/// it applies (adding into `acc` in place), else Burn's matmul and element-wise ops.
pub(crate) fn gemm<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(lhs: CubeTensor<R>, rhs: CubeTensor<R>, alpha: f64, acc: Option<CubeTensor<R>>) -> CubeTensor<R> {
    gemm_as::<R, F, I, BT>(lhs, rhs, alpha, acc, DType::F32)
}

/// [`gemm`] written in `out`: f32, or the operands' own dtype (then `acc` is in it too).
pub(crate) fn gemm_as<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(lhs: CubeTensor<R>, rhs: CubeTensor<R>, alpha: f64, acc: Option<CubeTensor<R>>, out: DType) -> CubeTensor<R> {
    #[cfg(feature = "cuda")]
    if let Some(y) = crate::cublas::gemm(&lhs, &rhs, out, alpha as f32, acc.as_ref()) {
        return y;
    }
    let y = matmul(lhs, rhs, None, MatmulStrategy::default(), out).expect("a matmul kernel for a dense product");
    let y = if alpha == 1.0 { y } else { CubeBackend::<R, F, I, BT>::float_mul_scalar(y, alpha.into()) };
    match acc {
        Some(acc) => CubeBackend::<R, F, I, BT>::float_add(acc, y),
        None => y,
    }
}

/// `dst[:, rows, :] = alpha · lhs·rhs` (`+=` with `accumulate`) for a contiguous f32 `dst`
/// `[n, R, d]` and `lhs·rhs` `[n, rows.len(), d]`: written in place by cuBLAS where it applies
/// (`dst` must have no other holder there), else a product and a `slice_assign`.
pub(crate) fn gemm_rows<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(lhs: CubeTensor<R>, rhs: CubeTensor<R>, alpha: f64, dst: CubeTensor<R>, rows: std::ops::Range<usize>, accumulate: bool) -> CubeTensor<R> {
    #[cfg(feature = "cuda")]
    if crate::cublas::gemm_rows(&lhs, &rhs, alpha as f32, &dst, rows.clone(), accumulate) {
        return dst;
    }
    type B<R, F, I, BT> = CubeBackend<R, F, I, BT>;
    let ranges: Vec<burn::tensor::Slice> = dst.meta.shape().iter().enumerate().map(|(i, &n)| burn::tensor::Slice::from(if i == 1 { rows.clone() } else { 0..n })).collect();
    let acc = accumulate.then(|| into_contiguous(B::<R, F, I, BT>::float_slice(dst.clone(), &ranges)));
    let y = gemm_as::<R, F, I, BT>(lhs, rhs, alpha, None, DType::F32);
    let y = match acc {
        Some(acc) => B::<R, F, I, BT>::float_add(acc, y),
        None => y,
    };
    B::<R, F, I, BT>::float_slice_assign(dst, &ranges, y)
}

/// `t` in `dtype` (itself when it already is).
pub(crate) fn as_dtype<R: CubeRuntime>(t: CubeTensor<R>, dtype: DType) -> CubeTensor<R> {
    if t.dtype == dtype { t } else { cast(t, dtype) }
}

/// `x`'s memory seen with another shape and strides (no copy).
pub(crate) fn view<R: CubeRuntime>(x: &CubeTensor<R>, shape: Vec<usize>, strides: Vec<usize>) -> CubeTensor<R> {
    CubeTensor::new(x.client.clone(), x.handle.clone(), cubecl::zspace::metadata::Metadata::new(shape, strides), x.device.clone(), x.dtype)
}

/// [`as_float`], laid out contiguously: what the row-wise kernels index directly.
pub(crate) fn contiguous_float<R: CubeRuntime, F: FloatElement>(t: CubeTensor<R>) -> CubeTensor<R> {
    into_contiguous(as_float::<R, F>(t))
}

/// Words are read as u32; an I32 tensor holds the same bits.
fn as_words<R: CubeRuntime>(t: CubeTensor<R>) -> CubeTensor<R> {
    match t.dtype {
        DType::U32 | DType::I32 => t,
        _ => cast(t, DType::U32),
    }
}

fn tiles(cols: usize, rows: usize) -> (CubeCount, CubeDim) {
    (CubeCount::Static((cols as u32).div_ceil(BLOCK), (rows as u32).div_ceil(BLOCK), 1), CubeDim { x: THREADS, y: THREADS, z: 1 })
}

impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> QuantMatmul for CubeBackend<R, F, I, BT> {
    fn quant_matmul(x: FloatTensor<Self>, words: IntTensor<Self>, scales: FloatTensor<Self>, biases: FloatTensor<Self>, format: Affine) -> FloatTensor<Self> {
        let x = into_contiguous(as_float::<R, F>(x));
        let words = as_words(into_contiguous(words));
        let (scales, biases) = (into_contiguous(as_float::<R, F>(scales)), into_contiguous(as_float::<R, F>(biases)));
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
            // SAFETY: every index the kernel forms is inside its tensor: rows below `m`, outputs
            // below `n` (checked), words below `k·bits/32` and groups below `k/group` (shapes
            // checked by the caller, contiguous above).
            unsafe {
                matvec_kernel::launch_unchecked::<F, R>(&client, count, dim, x.into_tensor_arg(), words.into_tensor_arg(), scales.into_tensor_arg(), biases.into_tensor_arg(), out.clone().into_tensor_arg(), format.bits, format.group, m as u32);
            }
        } else {
            let (count, dim) = tiles(n, m);
            // SAFETY: as above; tile rows and columns past `m`, `n` and `k` are checked.
            unsafe {
                matmul_kernel::launch_unchecked::<F, R>(&client, count, dim, x.into_tensor_arg(), words.into_tensor_arg(), scales.into_tensor_arg(), biases.into_tensor_arg(), out.clone().into_tensor_arg(), format.bits, format.group);
            }
        }
        out
    }

    fn quant_matmul_dx(dy: FloatTensor<Self>, words: IntTensor<Self>, scales: FloatTensor<Self>, biases: FloatTensor<Self>, format: Affine) -> FloatTensor<Self> {
        let dy = into_contiguous(as_float::<R, F>(dy));
        let words = as_words(into_contiguous(words));
        let (scales, biases) = (into_contiguous(as_float::<R, F>(scales)), into_contiguous(as_float::<R, F>(biases)));
        let [m, _n] = dy.meta.shape().dims::<2>();
        let [_, w] = words.meta.shape().dims::<2>();
        let k = w * format.per_word();
        let dx = empty_device_contiguous_dtype(dy.client.clone(), dy.device.clone(), Shape::new([m, k]), F::dtype());
        let client = dy.client.clone();
        if m == 0 || k == 0 {
            return dx;
        }
        let (count, dim) = tiles(k, m);
        // SAFETY: tile rows and columns past `m`, `n` and `k` are checked in the kernel.
        unsafe {
            matmul_dx_kernel::launch_unchecked::<F, R>(&client, count, dim, dy.into_tensor_arg(), words.into_tensor_arg(), scales.into_tensor_arg(), biases.into_tensor_arg(), dx.clone().into_tensor_arg(), format.bits, format.group);
        }
        dx
    }
}
