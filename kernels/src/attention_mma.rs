//! Flash attention on tensor cores (CUDA, sm_80 and newer): [`FlashAttention`](crate::FlashAttention)
//! forward and backward for head size 64 with bf16 operands and f32 accumulation, as training
//! in bf16 runs it.
//!
//! The dense-product path (`attention::cube::products`) writes each chunk's scores to memory,
//! reads them back for the softmax, writes the probabilities and reads them again for the
//! product with `V`: at 8 × 1,024 tokens that traffic, not the arithmetic, was most of
//! attention's time (bench/RESULTS.md). Here scores never leave the chip. A cube owns 64 rows
//! (queries, or keys for `dK, dV`), four planes of 16; per tile of 64 columns it stages its
//! operands in shared memory as bf16 pairs and multiplies with `mma.m16n8k16`.
//!
//! The layout of `mma.m16n8k16` makes the rest register work: a lane holds two rows of every
//! 16 × 8 accumulator tile (`g = lane / 4` and `g + 8`, columns `2·(lane % 4)` and the next),
//! so row maxima and sums are the quad's four lanes (two shuffles), and two adjacent score
//! tiles are, element for element, the `A` operand fragment of the next product. The
//! probabilities (forward) and `dS` (backward) go from accumulators to operands without
//! touching shared memory. Tiles are staged as packed (rows of 64 features) and every `B`
//! fragment comes from `ldmatrix` ([`pair_b2`]): plain for `Q·Kᵀ`-like products, transposed
//! (`.trans`) where the tile's rows run along the product's `k` (`P·V`, `dS·K`, `Pᵀ·dO`,
//! `dSᵀ·Q`), so no tile is staged twice; one instruction loads two fragments, where 32-bit
//! shared loads took four.
//!
//! Inputs are first packed ([`pack`]): read through their strides (queries and keys as rope
//! wrote them, values as the projection's transposed view), written as bf16 `[b, h, rows, d]`
//! padded with zero rows to whole tiles, so that staging a tile is one 128-bit load per eight
//! values and no row checks (staging element by element from f32 was most of the first
//! kernels' instructions). `out` and `dQ` are written `[b, s, h, d]` in f32, the layout the
//! output projection and rope's backward read, and returned as `[b, h, s, d]` views.
//! `dK, dV` of a key/value head add up its group's query heads in one cube. Masks are read
//! once per call into per-row key intervals ([`row_keys`]), so a plain causal, packed or
//! windowed row costs no mask loads, and a tile that every row of a plane sees whole
//! ([`whole_tile`]; all but the diagonal ones of a causal mask) costs no mask arithmetic.
//!
//! The three kernels take exponentials as `__expf` (`ex2.approx` of a scaled input, two
//! instructions, where `expf` is ~10): they feed bf16 operands, and every input is finite
//! (a hidden key's score is [`MASKED`], not −∞), which the fast-math flags assume.
//!
//! Each tile's scores are independent `mma` chains over the head's k-steps ([`pair_dots`]), and
//! each kernel is compiled for a number of cubes an SM (`cubes_per_sm`): they are latency-bound.
//!
//! Training runs forward and backward here (bench/RESULTS.md: on an H200, with `ldmatrix` and
//! the heaviest blocks first, the backward kernels beat the products' backward by ~6 ms a
//! Llama-3.2-1B step; `KILN_ATTENTION_TENSOR_CORES=forward` runs the backward on the products
//! again, for comparisons).

use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{CubeRuntime, FloatElement};
use burn::tensor::Shape;
use cubecl::cmma::MmaDefinition;
use cubecl::ir::{ElemType, FastMath, FloatKind, MatrixIdent};
use cubecl::prelude::*;
use cubecl::{cube, CubeCount, CubeDim};

use crate::attention::AttentionSpec;
use crate::cube::{as_float, contiguous_float, flat_count, flat_index, view, FLAT_THREADS};

/// Query rows per cube (four planes of 16) and keys per staged tile.
const BR: usize = 64;
const BC: usize = 64;
/// The head size these kernels are compiled for.
pub(crate) const HEAD: usize = crate::attention::TENSOR_CORE_HEAD;
/// Row stride (in elements) of a staged tile `[64, HEAD]`: 144 bytes, so that the eight 16-byte
/// rows an `ldmatrix` reads at once fall in different shared-memory banks, and every row starts
/// on the 16 bytes `ldmatrix` needs.
const KS: usize = HEAD + 8;
/// As in the other attention kernels: a mask value at or below this hides the key.
const MASKED: f32 = -1.0e30;
const UNSEEN: f32 = 1.0e30;

static LAUNCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Calls (forward or backward) run here so far (the checks and benchmarks report it).
pub(crate) fn launches() -> u64 {
    LAUNCHES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether these kernels can run for these inputs: a CUDA device with bf16 `mma.m16n8k16`,
/// planes of 32 lanes, head size [`HEAD`], no softcap, and bf16 products asked for (training in
/// bf16; the f32 checks keep their f32 products).
pub(crate) fn applies<R: CubeRuntime>(q: &CubeTensor<R>, spec: AttentionSpec) -> bool {
    let d = q.meta.shape()[3];
    if d != HEAD || spec.softcap.is_some() || !spec.bf16_products {
        return false;
    }
    supported(&q.client)
}

/// The device runs bf16 `mma.m16n8k16` with f32 accumulators on planes of 32 lanes.
pub(crate) fn supported<R: CubeRuntime>(client: &ComputeClient<R>) -> bool {
    let props = client.properties();
    let bf16 = ElemType::Float(FloatKind::BF16).into();
    let config = cubecl::ir::features::MmaConfig { a_type: bf16, b_type: bf16, cd_type: ElemType::Float(FloatKind::F32).into(), m: 16, n: 8, k: 16 };
    props.features.matmul.mma.contains(&config) && props.hardware.plane_size_min == 32 && props.hardware.plane_size_max == 32
}

/// How many cubes of the forward, `dQ` and `dK, dV` kernels an SM must hold at once, which caps
/// their registers (CUDA `__launch_bounds__`; 65,536 registers an SM, 128 threads a cube). They
/// are latency-bound: each plane waits on chains of `mma` and shared-memory loads, and a cube
/// more on an SM hides more of it than the registers it costs buy. Measured on an H200
/// (bench/RESULTS.md); `KILN_ATTENTION_CUBES="forward,dq,dkv"` sets them for experiments (0: no
/// bound; the bound is part of a compiled kernel's cache key).
#[cfg(feature = "cuda")]
fn cubes_per_sm() -> [u32; 3] {
    const DEFAULT: [u32; 3] = [4, 4, 3];
    let Ok(text) = std::env::var("KILN_ATTENTION_CUBES") else {
        return DEFAULT;
    };
    let parsed: Vec<u32> = text.split(',').filter_map(|v| v.trim().parse().ok()).collect();
    match parsed[..] {
        [f, q, kv] => [f, q, kv],
        _ => {
            tracing::warn!("KILN_ATTENTION_CUBES={text:?} is not three numbers (forward,dq,dkv); using {DEFAULT:?}");
            DEFAULT
        }
    }
}

/// [`cubes_per_sm`] for a kernel, from its id (which names the kernel's type, in the module
/// CubeCL generates for its function).
#[cfg(feature = "cuda")]
fn min_cubes(kernel_id: &str) -> Option<u32> {
    let kernel = ["mma_forward_kernel", "mma_dq_kernel", "mma_dkv_kernel"].iter().position(|k| kernel_id.contains(k))?;
    Some(cubes_per_sm()[kernel]).filter(|&c| c > 0)
}

/// Registers [`min_cubes`] with the CUDA runtime before the kernels are first compiled.
fn bound_registers() {
    #[cfg(feature = "cuda")]
    let _ = cubecl::cuda::launch_bounds::MIN_CUBES_FN.set(min_cubes);
}

/// `HEAD / 8` zeroed accumulator tiles.
#[cube]
fn zeros<F: Float>() -> Array<Vector<F, Const<2>>> {
    let mut acc = Array::<Vector<F, Const<2>>>::new(comptime!(HEAD / 8 * 2));
    #[unroll]
    for i in 0..comptime!(HEAD / 8 * 2) {
        acc[i] = Vector::<F, Const<2>>::new(F::new(0.0));
    }
    acc
}

/// Which keys a mask row shows: `[lo, hi)`, and whether every value inside is 0 (`plain`: the
/// mask need not be read there). Every mask kiln builds (causal, packed, sliding window) has
/// one interval of zeros per row; another mask is still read wherever the interval allows.
/// A lane's two rows `row0` and `row0 + 8` (of the mask rows from `mfirst`) as `[lo, hi,
/// plain]` arrays of two; a row past `s` shows no key.
#[cube]
fn row_keys(rows: &Tensor<u32>, mfirst: usize, row0: usize, s: usize) -> (Array<u32>, Array<u32>, Array<u32>) {
    let mut lo = Array::<u32>::new(2usize);
    let mut hi = Array::<u32>::new(2usize);
    let mut plain = Array::<u32>::new(2usize);
    #[unroll]
    for x in 0..2usize {
        let i = row0 + x * 8;
        lo[x] = 0u32;
        hi[x] = 0u32;
        plain[x] = 1u32;
        if i < s {
            let at = (mfirst + i) * 4;
            lo[x] = rows[at];
            hi[x] = rows[at + 1];
            plain[x] = rows[at + 2];
        }
    }
    (lo, hi, plain)
}

/// Whether query `i` (its keys `[lo, hi)`, `plain` 1 where the mask is 0 throughout) sees key
/// `j` (the causal part, the additive mask above [`MASKED`]), and the mask's value there (read
/// only for a row that is not plain).
#[cube]
#[allow(clippy::too_many_arguments)]
fn visible<F: Float>(mask: &Tensor<F>, mrow: usize, lo: u32, hi: u32, plain: u32, i: usize, j: usize, s: usize, t: usize, #[comptime] causal: bool) -> (bool, F) {
    let mut seen = j >= lo as usize && j < hi as usize;
    if causal {
        seen = seen && j + s <= i + t;
    }
    let mut mv = F::new(0.0);
    if seen && plain == 0u32 {
        mv = mask[mrow + i * t + j];
        seen = mv > F::new(MASKED);
    }
    (seen, mv)
}

/// Scales `tiles` 16 × 8 score tiles side by side (this lane's rows `row0`, `row0 + 8`; tile
/// `u`'s keys `j + 8u`, `j + 8u + 1`; laid out as [`pair_dots`] returns them) and, with
/// `check`, applies the mask: [`MASKED`] where a key is hidden, the mask's value added where it
/// is not plain. One branch for all the tiles, after all their products: a branch between two
/// tiles' `mma` chains would keep the tensor cores from overlapping them.
#[cube]
#[allow(clippy::too_many_arguments)]
fn scaled_scores<F: Float>(z: &mut Array<Vector<F, Const<2>>>, scale: F, mask: &Tensor<F>, mrow: usize, lo: &Array<u32>, hi: &Array<u32>, plain: &Array<u32>, row0: usize, j: usize, s: usize, t: usize, check: bool, #[comptime] tiles: usize, #[comptime] causal: bool) {
    #[unroll]
    for i in 0..comptime!(tiles * 2) {
        z[i] = z[i] * Vector::<F, Const<2>>::new(scale);
    }
    if check {
        #[unroll]
        for u in 0..tiles {
            #[unroll]
            for x in 0..2usize {
                let mut zz = z[u * 2 + x];
                #[unroll]
                for y in 0..2usize {
                    let (seen, mv) = visible::<F>(mask, mrow, lo[x], hi[x], plain[x], row0 + x * 8, j + u * 8 + y, s, t, causal);
                    let mut value = F::new(MASKED);
                    if seen {
                        value = zz[y] + mv;
                    }
                    zz[y] = value;
                }
                z[u * 2 + x] = zz;
            }
        }
    }
}

/// Whether every query row of this plane sees all of keys `j0..j0 + BC` through a plain mask
/// row, so that a tile's scores need no mask ([`scaled_scores`]): true for all but the
/// diagonal tiles of a causal mask.
#[cube]
fn whole_tile(lo: &Array<u32>, hi: &Array<u32>, plain: &Array<u32>, row0: usize, j0: usize, s: usize, t: usize, #[comptime] causal: bool) -> bool {
    let mut inside = true;
    #[unroll]
    for x in 0..2usize {
        inside = inside && plain[x] == 1u32 && j0 >= lo[x] as usize && j0 + BC <= hi[x] as usize;
        if causal {
            inside = inside && j0 + BC + s <= row0 + x * 8 + t + 1;
        }
    }
    plane_all(inside)
}

/// One plane per mask row `[.., t]` (4 rows a cube): its keys as `[lo, hi, plain, 0]` ([`row_keys`]).
#[cube(launch_unchecked)]
fn mask_rows_kernel<F: Float>(mask: &Tensor<F>, rows: &mut Tensor<u32>) {
    let lane = UNIT_POS_X as usize;
    let row = ((CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) * 4 + UNIT_POS_Y) as usize;
    let t = mask.shape(mask.rank() - 1);
    let n = mask.len() / t;
    if row < n {
        let mut lo = t as u32;
        let mut hi = 0u32;
        let mut nonzero = 0u32;
        let mut j = lane;
        while j < t {
            let v = mask[row * t + j];
            if v > F::new(MASKED) {
                lo = min(lo, j as u32);
                hi = max(hi, j as u32 + 1);
                if v != F::new(0.0) {
                    nonzero = 1u32;
                }
            }
            j += 32;
        }
        lo = plane_min(lo);
        hi = plane_max(hi);
        // A hidden key between `lo` and `hi` also makes the row one to read.
        let mut hole = 0u32;
        let mut j = lane;
        while j < t {
            if j as u32 >= lo && (j as u32) < hi && mask[row * t + j] <= F::new(MASKED) {
                hole = 1u32;
            }
            j += 32;
        }
        let irregular = plane_max(nonzero + hole);
        if lane == 0 {
            rows[row * 4] = lo;
            rows[row * 4 + 1] = hi;
            rows[row * 4 + 2] = 1u32 - min(irregular, 1u32);
            rows[row * 4 + 3] = 0u32;
        }
    }
}

/// The end of the keys query rows `q0..q0 + BR` may see: all `t`, or under a causal mask
/// `(q0 + BR) + t − s`.
#[cube]
fn key_end(q0: usize, s: usize, t: usize, #[comptime] causal: bool) -> usize {
    let mut kend = t;
    if causal {
        let hi = q0 + BR + t;
        kend = 0usize;
        if hi > s {
            kend = hi - s;
        }
        if kend > t {
            kend = t;
        }
    }
    kend
}

/// A pair of adjacent bf16 elements: what a lane's fragment registers hold, and what the
/// staged tiles below are read as (one 32-bit shared-memory load per pair).
type Pair<Op> = Vector<Op, Const<2>>;

/// Eight bf16 values: one 128-bit load from a packed matrix ([`pack`]).
type Oct<Op> = Vector<Op, Const<8>>;

/// Rows `first..first + 64` of the packed `[rows, HEAD]` matrix whose first vector is `base`
/// into `buf` as pairs (row stride `stride` elements), as packed: the products read it either
/// way round ([`pair_b2`]). All 128 threads of the cube, a 128-bit
/// load and four pair stores each step; the matrix is padded to whole tiles, so no row is
/// checked.
#[cube]
fn stage_rows<Op: Float>(x: &Tensor<Oct<Op>>, base: usize, first: usize, buf: &mut SharedMemory<Pair<Op>>, #[comptime] stride: usize) {
    let tid = (UNIT_POS_Y * 32 + UNIT_POS_X) as usize;
    #[unroll]
    for step in 0..comptime!(BC * HEAD / 8 / 128) {
        let idx = step * 128 + tid;
        let row = idx / comptime!(HEAD / 8);
        let c = idx % comptime!(HEAD / 8);
        let v = x[base + (first + row) * comptime!(HEAD / 8) + c];
        #[unroll]
        for i in 0..4usize {
            let mut pair = Pair::<Op>::new(Op::new(0.0));
            pair[0usize] = v[2 * i];
            pair[1usize] = v[2 * i + 1];
            buf[row * comptime!(stride / 2) + c * 4 + i] = pair;
        }
    }
}

/// Where packed vector `i` of `[b, h, sp, HEAD]` comes from: `(b·h + head, row, first
/// feature)`.
#[cube]
fn packed_place(i: usize, sp: usize) -> (usize, usize, usize) {
    let r = i / comptime!(HEAD / 8);
    (r / sp, r % sp, (i % comptime!(HEAD / 8)) * 8)
}

/// Element `(bh, row, c)` of `x` `[b, h, s, HEAD]` (any strides).
#[cube]
fn strided_at<F: Float>(x: &Tensor<F>, bh: usize, row: usize, c: usize) -> usize {
    let h = x.shape(1);
    (bh / h) * x.stride(0) + (bh % h) * x.stride(1) + row * x.stride(2) + c * x.stride(3)
}

/// One thread per eight features of a row: `x` `[b, h, s, HEAD]` (any strides, the backend's
/// float) as bf16 `[b, h, sp, HEAD]`, contiguous, rows `s..sp` zero.
#[cube(launch_unchecked)]
fn pack_kernel<F: Float, Op: Float>(x: &Tensor<F>, y: &mut Tensor<Oct<Op>>) {
    let i = flat_index();
    let sp = y.shape(2);
    if i < y.shape(0) * y.shape(1) * sp * comptime!(HEAD / 8) {
        let (bh, row, c) = packed_place(i, sp);
        let mut v = Oct::<Op>::new(Op::new(0.0));
        if row < x.shape(2) {
            let at = strided_at::<F>(x, bh, row, c);
            #[unroll]
            for e in 0..8usize {
                v[e] = Op::cast_from(x[at + e * x.stride(3)]);
            }
        }
        y[i] = v;
    }
}

/// [`pack_kernel`] for `dO`, which also writes `δ = rowsum(dO ∘ O)` `[b, h, s]` (`o` any
/// strides): the eight threads of a row are adjacent lanes, and sum with three shuffles.
#[cube(launch_unchecked)]
fn pack_delta_kernel<F: Float, Op: Float>(x: &Tensor<F>, o: &Tensor<F>, y: &mut Tensor<Oct<Op>>, delta: &mut Tensor<F>) {
    let i = flat_index();
    let s = x.shape(2);
    let sp = y.shape(2);
    // Every vector count is a multiple of 64 rows · 8, so no plane straddles the end.
    if i < y.shape(0) * y.shape(1) * sp * comptime!(HEAD / 8) {
        let (bh, row, c) = packed_place(i, sp);
        let mut v = Oct::<Op>::new(Op::new(0.0));
        let mut sum = F::new(0.0);
        if row < s {
            let at = strided_at::<F>(x, bh, row, c);
            let ot = strided_at::<F>(o, bh, row, c);
            #[unroll]
            for e in 0..8usize {
                let d = x[at + e * x.stride(3)];
                v[e] = Op::cast_from(d);
                sum += d * o[ot + e * o.stride(3)];
            }
        }
        y[i] = v;
        sum += plane_shuffle_xor(sum, 1);
        sum += plane_shuffle_xor(sum, 2);
        sum += plane_shuffle_xor(sum, 4);
        if c == 0 && row < s {
            delta[bh * s + row] = sum;
        }
    }
}

/// This plane's 16 rows (from `row0`) of a paired tile `[64, HEAD]` as `HEAD / 16` operand
/// fragments `A`, flattened (four pairs each).
#[cube]
fn pair_rows_a<Op: Float, F: Float>(def: &MmaDefinition<Op, Op, F>, buf: &SharedMemory<Pair<Op>>, row0: usize, #[comptime] stride: usize) -> Array<Pair<Op>> {
    let mut frags = Array::<Pair<Op>>::new(comptime!(HEAD / 16 * 4));
    #[unroll]
    for kt in 0..comptime!(HEAD / 16) {
        #[unroll]
        for i in 0..4usize {
            let (r, c) = def.position_of_nth(UNIT_POS_X, (i * 2) as u32, MatrixIdent::A);
            // Split so that the lane's part is one register and the rest constants (row0 is a
            // multiple of 16, stride and c even): see `pair_b2`.
            frags[kt * 4 + i] = buf[row0 * comptime!(stride / 2) + kt * 8 + (r as usize * stride + c as usize) / 2];
        }
    }
    frags
}

/// The `B` operand fragments (16 × 8 each) of two adjacent 8-column tiles, columns `n0..n0 +
/// 16`, k-step `k0..k0 + 16`, in one `ldmatrix.x4`: `[0..2)` the first tile's, `[2..4)` the
/// second's. `transposed`: `B[k][n] = tile[k0 + k][n0 + n]` (the staged tile's rows along the
/// product's `k`, as `V` in `P·V`; `ldmatrix.trans`); otherwise `B[k][n] = tile[n0 + n][k0 +
/// k]` (its rows along `n`, as `K` in `Q·Kᵀ`). Either way the tile is staged as it is packed,
/// rows of [`KS`] elements. Lanes `8m..8m + 8` name the rows of 8 × 8 matrix `m` (k-half `m %
/// 2`, column tile `m / 2`).
#[cube]
fn pair_b2<Op: Float, F: Float>(def: &MmaDefinition<Op, Op, F>, buf: &SharedMemory<Pair<Op>>, k0: usize, n0: usize, #[comptime] transposed: bool) -> Array<Pair<Op>> {
    let lane = UNIT_POS_X as usize;
    let m = lane / 8;
    let r = lane % 8;
    // The constant part (once the loops are unrolled) and the lane's, kept apart so that the
    // first folds into the instruction's offset.
    let mut at = (n0 * KS + k0) / 2 + ((m / 2 * 8 + r) * KS + m % 2 * 8) / 2;
    if transposed {
        at = (k0 * KS + n0) / 2 + ((m % 2 * 8 + r) * KS + m / 2 * 8) / 2;
    }
    def.load_matrix::<Pair<Op>, Const<2>>(&buf.slice(at, at + 4), MatrixIdent::B, 4usize, transposed)
}

/// Two fragments of a [`pair_b2`] load: tile `second`'s.
#[cube]
fn half_of<Op: Float>(b4: &Array<Pair<Op>>, #[comptime] second: usize) -> Array<Pair<Op>> {
    let mut b = Array::<Pair<Op>>::new(2usize);
    b[0usize] = b4[second * 2];
    b[1usize] = b4[second * 2 + 1];
    b
}

/// `acc[2t], acc[2t + 1] += a · b` (one 16 × 8 accumulator tile).
#[cube]
fn mma_into<Op: Float, F: Float>(def: &MmaDefinition<Op, Op, F>, a: &Array<Pair<Op>>, b: &Array<Pair<Op>>, acc: &mut Array<Vector<F, Const<2>>>, #[comptime] tile: usize) {
    let mut part = Array::<Vector<F, Const<2>>>::new(2usize);
    part[0usize] = acc[tile * 2];
    part[1usize] = acc[tile * 2 + 1];
    def.execute_inplace(a, b, &mut part);
    acc[tile * 2] = part[0usize];
    acc[tile * 2 + 1] = part[1usize];
}

/// `tiles` 16 × 8 tiles of `rows · tileᵀ` side by side, in f32: this plane's rows (`a`, from
/// [`pair_rows_a`]) against rows `n0..n0 + 8·tiles` of the paired tile `buf`; tile `u`'s rows
/// `g` and `g + 8` are vectors `2u` and `2u + 1`. The k-steps run outermost, so the tiles'
/// accumulations are independent `mma` chains that the tensor cores overlap (one tile's four
/// k-steps each wait for the previous one).
#[cube]
fn pair_dots<Op: Float, F: Float>(def: &MmaDefinition<Op, Op, F>, a: &Array<Pair<Op>>, buf: &SharedMemory<Pair<Op>>, n0: usize, #[comptime] tiles: usize) -> Array<Vector<F, Const<2>>> {
    let mut acc = Array::<Vector<F, Const<2>>>::new(comptime!(tiles * 2));
    #[unroll]
    for i in 0..comptime!(tiles * 2) {
        acc[i] = Vector::<F, Const<2>>::new(F::new(0.0));
    }
    #[unroll]
    for kt in 0..comptime!(HEAD / 16) {
        let mut frag = Array::<Pair<Op>>::new(4usize);
        #[unroll]
        for x in 0..4usize {
            frag[x] = a[kt * 4 + x];
        }
        #[unroll]
        for u in 0..comptime!(tiles / 2) {
            let b4 = pair_b2::<Op, F>(def, buf, kt * 16, n0 + u * 16, false);
            mma_into::<Op, F>(def, &frag, &half_of::<Op>(&b4, 0usize), &mut acc, u * 2);
            mma_into::<Op, F>(def, &frag, &half_of::<Op>(&b4, 1usize), &mut acc, u * 2 + 1);
        }
    }
    acc
}

/// Where a cube `(query block, b·h)` of the forward or `dQ` works.
#[derive(CubeType)]
struct QueryBlock {
    /// Queries and keys.
    s: usize,
    t: usize,
    /// Batch · query heads + head, its batch row and head.
    bh: usize,
    bi: usize,
    hh: usize,
    /// The block's first query row.
    q0: usize,
    /// Offset of the batch row's `[s, t]` mask, and its first row's index.
    mrow: usize,
    mfirst: usize,
    /// The first vectors of this head's packed queries and of its key/value head's keys.
    qbase: usize,
    kbase: usize,
}

/// `q` and `k` packed ([`pack`]); the mask `[b or 1, s, t]` gives the unpadded lengths.
#[cube]
fn query_block<F: Float, Op: Float>(q: &Tensor<Oct<Op>>, k: &Tensor<Oct<Op>>, mask: &Tensor<F>) -> QueryBlock {
    let h = q.shape(1);
    let kvh = k.shape(1);
    let s = mask.shape(1);
    let t = mask.shape(2);
    let bh = CUBE_POS_X as usize;
    let bi = bh / h;
    let hh = bh % h;
    let kh = hh / (h / kvh);
    let mut mb = bi;
    if mask.shape(0) == 1 {
        mb = 0usize;
    }
    let qbase = bh * q.shape(2) * comptime!(HEAD / 8);
    let kbase = (bi * kvh + kh) * k.shape(2) * comptime!(HEAD / 8);
    // The last query blocks first: under a causal mask they see the most keys (see `grid`).
    // (`q.shape(2) / BR` blocks: the grid's second dimension.)
    let q0 = (q.shape(2) / BR - 1 - CUBE_POS_Y as usize) * BR;
    QueryBlock { s, t, bh, bi, hh, q0, mrow: mb * s * t, mfirst: mb * s, qbase, kbase }
}

/// Two values (one per row a lane holds), both `x`.
#[cube]
fn pair_of<F: Float>(x: F) -> Array<F> {
    let mut a = Array::<F>::new(2usize);
    a[0usize] = x;
    a[1usize] = x;
    a
}

/// Cube `(query block, b·h)`, planes of 32 lanes × 4; a plane owns 16 query rows, and each
/// lane two of them (`g = lane / 4` and `g + 8`, the accumulator layout of `mma.m16n8k16`,
/// shared by the four lanes of a quad). Scores, probabilities and the output stay in
/// registers: a score tile's accumulators are laid out as the probability operand's
/// fragment, so `P` never goes through shared memory. A staged tile of 64 keys is taken in two
/// halves of 32 (fewer live registers). `params` = [scale, softcap (unused)].
#[cube(launch_unchecked, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
#[allow(clippy::too_many_arguments)]
fn mma_forward_kernel<F: Float, Op: Float>(q: &Tensor<Oct<Op>>, k: &Tensor<Oct<Op>>, v: &Tensor<Oct<Op>>, mask: &Tensor<F>, rows: &Tensor<u32>, params: &Tensor<F>, out: &mut Tensor<F>, lse: &mut Tensor<F>, #[comptime] causal: bool) {
    let lane = UNIT_POS_X as usize;
    let warp = UNIT_POS_Y as usize;
    let QueryBlock { s, t, bh, bi, hh, q0, mrow, mfirst, qbase, kbase } = query_block::<F, Op>(q, k, mask);
    let scale = params[0];
    let def = MmaDefinition::<Op, Op, F>::new(16usize, 8usize, 16usize);

    let mut ks = SharedMemory::<Pair<Op>>::new_aligned(BC * KS / 2, 16usize);
    let mut vs = SharedMemory::<Pair<Op>>::new_aligned(BC * KS / 2, 16usize);

    stage_rows::<Op>(q, qbase, q0, &mut ks, KS);
    sync_cube();
    let qa = pair_rows_a::<Op, F>(&def, &ks, warp * 16, KS);
    sync_cube();

    // This lane's rows and the first of its two columns in each 8-key tile.
    let row0 = q0 + warp * 16 + lane / 4;
    let col = 2 * (lane % 4);
    let (lo, hi, plain) = row_keys(rows, mfirst, row0, s);
    let mut m = pair_of::<F>(F::new(MASKED));
    let mut l = pair_of::<F>(F::new(0.0));
    let mut o = zeros::<F>();

    let kend = key_end(q0, s, t, causal);
    let mut j0 = 0usize;
    while j0 < kend {
        stage_rows::<Op>(k, kbase, j0, &mut ks, KS);
        stage_rows::<Op>(v, kbase, j0, &mut vs, KS);
        sync_cube();
        let check = !whole_tile(&lo, &hi, &plain, row0, j0, s, t, causal);
        #[unroll]
        for half in 0..2usize {
            // Scores of 32 keys: tile `u`'s vector 0 is row `row0`, vector 1 row `row0 + 8`.
            let mut z = pair_dots::<Op, F>(&def, &qa, &ks, half * 32, 4usize);
            scaled_scores::<F>(&mut z, scale, mask, mrow, &lo, &hi, &plain, row0, j0 + half * 32 + col, s, t, check, 4usize, causal);
            let mut top = pair_of::<F>(F::new(MASKED));
            #[unroll]
            for u in 0..4usize {
                #[unroll]
                for x in 0..2usize {
                    let zz = z[u * 2 + x];
                    top[x] = max(top[x], max(zz[0usize], zz[1usize]));
                }
            }
            // Row maxima over the quad's four lanes, then the online-softmax update.
            let mut corr = pair_of::<F>(F::new(1.0));
            let mut m_new = pair_of::<F>(F::new(MASKED));
            #[unroll]
            for x in 0..2usize {
                let mut tx = max(top[x], plane_shuffle_xor(top[x], 1));
                tx = max(tx, plane_shuffle_xor(tx, 2));
                m_new[x] = max(m[x], tx);
                corr[x] = F::exp(m[x] - m_new[x]);
            }
            // Probabilities as the `A` operand of P·V: k-step `kk` takes score tiles 2kk, 2kk + 1.
            // A hidden key's score is MASKED, so its exponential is 0 without a branch, unless
            // the row has seen no key yet (its maximum MASKED too): then subtract 0.
            let mut shift = pair_of::<F>(F::new(0.0));
            #[unroll]
            for x in 0..2usize {
                shift[x] = select(m_new[x] > F::new(MASKED), m_new[x], F::new(0.0));
            }
            let mut pa = Array::<Pair<Op>>::new(8usize);
            let mut sum = pair_of::<F>(F::new(0.0));
            #[unroll]
            for u in 0..4usize {
                #[unroll]
                for x in 0..2usize {
                    let zz = z[u * 2 + x];
                    let mut pair = Pair::<Op>::new(Op::new(0.0));
                    #[unroll]
                    for y in 0..2usize {
                        let p = F::exp(zz[y] - shift[x]);
                        sum[x] += p;
                        pair[y] = Op::cast_from(p);
                    }
                    pa[(u / 2) * 4 + (u % 2) * 2 + x] = pair;
                }
            }
            #[unroll]
            for x in 0..2usize {
                let mut sx = sum[x] + plane_shuffle_xor(sum[x], 1);
                sx += plane_shuffle_xor(sx, 2);
                l[x] = l[x] * corr[x] + sx;
                m[x] = m_new[x];
            }
            #[unroll]
            for nt in 0..comptime!(HEAD / 8) {
                #[unroll]
                for x in 0..2usize {
                    o[nt * 2 + x] = o[nt * 2 + x] * Vector::<F, Const<2>>::new(corr[x]);
                }
            }
            add_products::<Op, F>(&def, &mut o, &pa, &vs, half * 2, 2usize);
        }
        sync_cube();
        j0 += BC;
    }

    // A row with every key masked attends to nothing: output 0, and an lse that makes every
    // recomputed probability 0 in backward.
    #[unroll]
    for x in 0..2usize {
        let mut inv = F::new(0.0);
        let mut row_lse = F::new(UNSEEN);
        if l[x] > F::new(0.0) {
            inv = F::new(1.0) / l[x];
            row_lse = m[x] + F::ln(l[x]);
        }
        let i = row0 + x * 8;
        if i < s {
            if lane % 4 == 0 {
                lse[bh * s + i] = row_lse;
            }
            let at = bi * out.stride(0) + hh * out.stride(1) + i * out.stride(2);
            #[unroll]
            for nt in 0..comptime!(HEAD / 8) {
                let pair = o[nt * 2 + x];
                out[at + (nt * 8 + col) * out.stride(3)] = pair[0usize] * inv;
                out[at + (nt * 8 + col + 1) * out.stride(3)] = pair[1usize] * inv;
            }
        }
    }
}

/// `acc += A · B` over k-steps `kt0..kt0 + steps` of a tile's 64 rows: `a` holds the `A`
/// fragments of those steps (this plane's 16 rows, four pairs a step, as probabilities and
/// score gradients are laid out in registers), `B = buf` the staged tile `[64, HEAD]` (rows
/// along `k`, read transposed by [`pair_b2`]).
#[cube]
fn add_products<Op: Float, F: Float>(def: &MmaDefinition<Op, Op, F>, acc: &mut Array<Vector<F, Const<2>>>, a: &Array<Pair<Op>>, buf: &SharedMemory<Pair<Op>>, #[comptime] kt0: usize, #[comptime] steps: usize) {
    #[unroll]
    for kk in 0..steps {
        let mut frag = Array::<Pair<Op>>::new(4usize);
        #[unroll]
        for x in 0..4usize {
            frag[x] = a[kk * 4 + x];
        }
        #[unroll]
        for nt in 0..comptime!(HEAD / 16) {
            let b4 = pair_b2::<Op, F>(def, buf, (kt0 + kk) * 16, nt * 16, true);
            mma_into::<Op, F>(def, &frag, &half_of::<Op>(&b4, 0usize), acc, nt * 2);
            mma_into::<Op, F>(def, &frag, &half_of::<Op>(&b4, 1usize), acc, nt * 2 + 1);
        }
    }
}

/// Writes `scale · acc` (rows `row0` and `row0 + 8` of this lane, columns `col, col + 1` of
/// each 8-wide tile) into rows below `rows` of the `[.., HEAD]` matrix at `base` of `out` (row
/// stride `rs`, column stride `cs`).
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_acc<F: Float>(acc: &Array<Vector<F, Const<2>>>, out: &mut Tensor<F>, base: usize, rs: usize, cs: usize, row0: usize, col: usize, rows: usize, scale: F) {
    #[unroll]
    for x in 0..2usize {
        let row = row0 + x * 8;
        if row < rows {
            #[unroll]
            for nt in 0..comptime!(HEAD / 8) {
                let pair = acc[nt * 2 + x];
                out[base + row * rs + (nt * 8 + col) * cs] = pair[0usize] * scale;
                out[base + row * rs + (nt * 8 + col + 1) * cs] = pair[1usize] * scale;
            }
        }
    }
}

/// `dQ`: cube `(query block, b·h)` as the forward. Per tile of keys it recomputes the scores
/// and `dP = dO·Vᵀ` on tensor cores, forms `dS = P ∘ (dP − δ)` in registers (`P = exp(z −
/// lse)`: no row reductions) laid out as an operand, and adds `dS·K` into `dQ`; 32 keys at a
/// time, as the forward.
#[cube(launch_unchecked, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
#[allow(clippy::too_many_arguments)]
fn mma_dq_kernel<F: Float, Op: Float>(dout: &Tensor<Oct<Op>>, q: &Tensor<Oct<Op>>, k: &Tensor<Oct<Op>>, v: &Tensor<Oct<Op>>, mask: &Tensor<F>, rows: &Tensor<u32>, lse: &Tensor<F>, delta: &Tensor<F>, params: &Tensor<F>, dq: &mut Tensor<F>, #[comptime] causal: bool) {
    let lane = UNIT_POS_X as usize;
    let warp = UNIT_POS_Y as usize;
    let QueryBlock { s, t, bh, bi, hh, q0, mrow, mfirst, qbase, kbase } = query_block::<F, Op>(q, k, mask);
    let scale = params[0];
    let def = MmaDefinition::<Op, Op, F>::new(16usize, 8usize, 16usize);

    let mut ks = SharedMemory::<Pair<Op>>::new_aligned(BC * KS / 2, 16usize);
    let mut vs = SharedMemory::<Pair<Op>>::new_aligned(BC * KS / 2, 16usize);

    stage_rows::<Op>(q, qbase, q0, &mut ks, KS);
    stage_rows::<Op>(dout, qbase, q0, &mut vs, KS);
    sync_cube();
    let qa = pair_rows_a::<Op, F>(&def, &ks, warp * 16, KS);
    let da = pair_rows_a::<Op, F>(&def, &vs, warp * 16, KS);
    sync_cube();

    let row0 = q0 + warp * 16 + lane / 4;
    let col = 2 * (lane % 4);
    let (lo, hi, plain) = row_keys(rows, mfirst, row0, s);
    let mut stat = pair_of::<F>(F::new(UNSEEN));
    let mut dl = pair_of::<F>(F::new(0.0));
    #[unroll]
    for x in 0..2usize {
        if row0 + x * 8 < s {
            stat[x] = lse[bh * s + row0 + x * 8];
            dl[x] = delta[bh * s + row0 + x * 8];
        }
    }

    let mut acc = zeros::<F>();
    let kend = key_end(q0, s, t, causal);
    let mut j0 = 0usize;
    while j0 < kend {
        stage_rows::<Op>(k, kbase, j0, &mut ks, KS);
        stage_rows::<Op>(v, kbase, j0, &mut vs, KS);
        sync_cube();
        let check = !whole_tile(&lo, &hi, &plain, row0, j0, s, t, causal);
        #[unroll]
        for half in 0..2usize {
            let mut ga = Array::<Pair<Op>>::new(8usize);
            let mut z = pair_dots::<Op, F>(&def, &qa, &ks, half * 32, 4usize);
            let dp = pair_dots::<Op, F>(&def, &da, &vs, half * 32, 4usize);
            // A hidden key's score is MASKED: its probability, and so its gradient, is 0.
            scaled_scores::<F>(&mut z, scale, mask, mrow, &lo, &hi, &plain, row0, j0 + half * 32 + col, s, t, check, 4usize, causal);
            #[unroll]
            for u in 0..4usize {
                #[unroll]
                for x in 0..2usize {
                    let zz = z[u * 2 + x];
                    let pp = dp[u * 2 + x];
                    let mut pair = Pair::<Op>::new(Op::new(0.0));
                    #[unroll]
                    for y in 0..2usize {
                        pair[y] = Op::cast_from(F::exp(zz[y] - stat[x]) * (pp[y] - dl[x]));
                    }
                    ga[(u / 2) * 4 + (u % 2) * 2 + x] = pair;
                }
            }
            add_products::<Op, F>(&def, &mut acc, &ga, &ks, half * 2, 2usize);
        }
        sync_cube();
        j0 += BC;
    }
    store_acc::<F>(&acc, dq, bi * dq.stride(0) + hh * dq.stride(1), dq.stride(2), dq.stride(3), row0, col, s, scale);
}

/// `dK, dV`: cube `(key block, b·kv)`; its planes own 16 keys each (keys are the rows here).
/// For each head of the group in turn, per tile of its queries that see the block, it
/// recomputes `Pᵀ` and `dPᵀ = V·dOᵀ`, forms `Pᵀ` and `dSᵀ` as operands in registers, and adds
/// `Pᵀ·dO` into `dV` and `dSᵀ·Q` into `dK`, 32 queries at a time. The heads of a group add into
/// the same registers, so `dK` and `dV` are written once, whole, and the block's keys and
/// values are staged once.
#[cube(launch_unchecked, fast_math = FastMath::ReducedPrecision | FastMath::NotNaN | FastMath::NotInf)]
#[allow(clippy::too_many_arguments)]
fn mma_dkv_kernel<F: Float, Op: Float>(dout: &Tensor<Oct<Op>>, q: &Tensor<Oct<Op>>, k: &Tensor<Oct<Op>>, v: &Tensor<Oct<Op>>, mask: &Tensor<F>, rows: &Tensor<u32>, lse: &Tensor<F>, delta: &Tensor<F>, params: &Tensor<F>, dk: &mut Tensor<F>, dv: &mut Tensor<F>, #[comptime] causal: bool) {
    let lane = UNIT_POS_X as usize;
    let warp = UNIT_POS_Y as usize;
    let tid = warp * 32 + lane;
    let h = q.shape(1);
    let s = mask.shape(1);
    let kvh = k.shape(1);
    let t = mask.shape(2);
    let g = h / kvh;
    let bk = CUBE_POS_X as usize;
    let bi = bk / kvh;
    let kh = bk % kvh;
    // The first key blocks first: under a causal mask the most queries see them (see `grid`).
    let k0 = CUBE_POS_Y as usize * BC;
    let mut mb = bi;
    if mask.shape(0) == 1 {
        mb = 0usize;
    }
    let mrow = mb * s * t;
    let scale = params[0];
    let def = MmaDefinition::<Op, Op, F>::new(16usize, 8usize, 16usize);

    let mut qs = SharedMemory::<Pair<Op>>::new_aligned(BR * KS / 2, 16usize);
    let mut dos = SharedMemory::<Pair<Op>>::new_aligned(BR * KS / 2, 16usize);
    // Per query of the tile: lse and δ (in pairs of adjacent queries, as a lane reads them),
    // key spans `[lo, hi, plain, 0]`, and whether it sees the whole key block through a plain row.
    let mut stats = SharedMemory::<Vector<F, Const<2>>>::new(BR / 2);
    let mut deltas = SharedMemory::<Vector<F, Const<2>>>::new(BR / 2);
    let mut spans = SharedMemory::<u32>::new(BR * 4);
    let mut whole = SharedMemory::<u32>::new(BR);

    let kbase = bk * k.shape(2) * comptime!(HEAD / 8);
    stage_rows::<Op>(k, kbase, k0, &mut qs, KS);
    stage_rows::<Op>(v, kbase, k0, &mut dos, KS);
    sync_cube();
    let ka = pair_rows_a::<Op, F>(&def, &qs, warp * 16, KS);
    let va = pair_rows_a::<Op, F>(&def, &dos, warp * 16, KS);
    sync_cube();

    let key0 = k0 + warp * 16 + lane / 4;
    let col = 2 * (lane % 4);
    let mut dk_acc = zeros::<F>();
    let mut dv_acc = zeros::<F>();
    // Queries before `k0 + s − t` see none of the block's keys.
    let mut first = 0usize;
    if causal && k0 + s > t {
        first = (k0 + s - t) / BR * BR;
    }
    // One loop over (head of the group, query tile).
    let tiles = (s - first).div_ceil(BR);
    let mut n = 0usize;
    while n < g * tiles {
        let member = n / tiles;
        let i0 = first + (n % tiles) * BR;
        let bh = bi * h + kh * g + member;
        let qbase = bh * q.shape(2) * comptime!(HEAD / 8);
        stage_rows::<Op>(q, qbase, i0, &mut qs, KS);
        stage_rows::<Op>(dout, qbase, i0, &mut dos, KS);
        if tid < BR / 2 {
            let mut st = Vector::<F, Const<2>>::new(F::new(UNSEEN));
            let mut dl = Vector::<F, Const<2>>::new(F::new(0.0));
            #[unroll]
            for y in 0..2usize {
                let qi = 2 * tid + y;
                let i = i0 + qi;
                let mut span = Array::<u32>::new(3usize);
                span[0usize] = 0u32;
                span[1usize] = 0u32;
                span[2usize] = 0u32;
                if i < s {
                    st[y] = lse[bh * s + i];
                    dl[y] = delta[bh * s + i];
                    #[unroll]
                    for e in 0..3usize {
                        span[e] = rows[(mb * s + i) * 4 + e];
                    }
                }
                #[unroll]
                for e in 0..3usize {
                    spans[qi * 4 + e] = span[e];
                }
                let mut inside = span[2usize] == 1u32 && k0 >= span[0usize] as usize && k0 + BC <= span[1usize] as usize;
                if causal {
                    inside = inside && k0 + BC + s <= i + t + 1;
                }
                let mut w = 0u32;
                if inside {
                    w = 1u32;
                }
                whole[qi] = w;
            }
            stats[tid] = st;
            deltas[tid] = dl;
        }
        sync_cube();
        // A tile that every query sees whole (all but the diagonal ones of a causal mask)
        // needs no mask.
        let check = !plane_all(whole[lane] + whole[lane + 32] == 2u32);
        #[unroll]
        for half in 0..2usize {
            let mut pa = Array::<Pair<Op>>::new(8usize);
            let mut ga = Array::<Pair<Op>>::new(8usize);
            // Two tiles of 8 queries at a time (four would take more registers than a thread has).
            #[unroll]
            for w in 0..2usize {
                let z2 = pair_dots::<Op, F>(&def, &ka, &qs, (half * 4 + w * 2) * 8, 2usize);
                let dp2 = pair_dots::<Op, F>(&def, &va, &dos, (half * 4 + w * 2) * 8, 2usize);
                #[unroll]
                for v in 0..2usize {
                    let u = w * 2 + v;
                    let nt = half * 4 + u;
                    let st = stats[nt * 4 + lane % 4];
                    let dl = deltas[nt * 4 + lane % 4];
                    #[unroll]
                    for x in 0..2usize {
                        let zz = z2[v * 2 + x];
                        let pp = dp2[v * 2 + x];
                        let mut p_pair = Pair::<Op>::new(Op::new(0.0));
                        let mut g_pair = Pair::<Op>::new(Op::new(0.0));
                        #[unroll]
                        for y in 0..2usize {
                            let qi = nt * 8 + col + y;
                            let mut z = zz[y] * scale;
                            if check {
                                let (seen, mv) = visible::<F>(mask, mrow, spans[qi * 4], spans[qi * 4 + 1], spans[qi * 4 + 2], i0 + qi, key0 + x * 8, s, t, causal);
                                let mut value = F::new(MASKED);
                                if seen {
                                    value = z + mv;
                                }
                                z = value;
                            }
                            // A hidden key's score is MASKED, a query past `s` has lse UNSEEN: p is 0.
                            let p = F::exp(z - st[y]);
                            p_pair[y] = Op::cast_from(p);
                            g_pair[y] = Op::cast_from(p * (pp[y] - dl[y]));
                        }
                        pa[(u / 2) * 4 + (u % 2) * 2 + x] = p_pair;
                        ga[(u / 2) * 4 + (u % 2) * 2 + x] = g_pair;
                    }
                }
            }
            add_products::<Op, F>(&def, &mut dv_acc, &pa, &dos, half * 2, 2usize);
            add_products::<Op, F>(&def, &mut dk_acc, &ga, &qs, half * 2, 2usize);
        }
        sync_cube();
        n += 1;
    }
    let base = bk * t * HEAD;
    store_acc::<F>(&dk_acc, dk, base, HEAD, 1usize, key0, col, t, scale);
    store_acc::<F>(&dv_acc, dv, base, HEAD, 1usize, key0, col, t, F::new(1.0));
}

/// The keys ([`row_keys`]) of every row of the contiguous mask `[b or 1, s, t]`, as `[b·s, 4]` u32.
fn mask_rows<R: CubeRuntime, F: FloatElement>(mask: &CubeTensor<R>) -> CubeTensor<R> {
    let dims = mask.meta.shape().to_vec();
    let t = dims[dims.len() - 1].max(1);
    let n = dims.iter().product::<usize>() / t;
    let rows = empty_device_contiguous_dtype(mask.client.clone(), mask.device.clone(), Shape::new([n.max(1), 4]), burn::tensor::DType::U32);
    if n == 0 {
        return rows;
    }
    let cubes = n.div_ceil(4);
    // SAFETY: one plane per row, rows below `n` only (the grid's spare cubes write nothing);
    // the mask is contiguous with `n` rows of `t`, `rows` contiguous `[n, 4]`.
    unsafe {
        mask_rows_kernel::launch_unchecked::<F, R>(
            &mask.client,
            CubeCount::Static(cubes.min(65_535) as u32, cubes.div_ceil(65_535) as u32, 1),
            CubeDim { x: 32, y: 4, z: 1 },
            mask.clone().into_tensor_arg(),
            rows.clone().into_tensor_arg(),
        );
    }
    rows
}

/// Cubes `(head, block)` for `heads` heads (of every batch row) and `blocks` row blocks each,
/// launched block by block: the kernels take the blocks with the most work first (the last
/// query blocks, the first key blocks), so that under a causal mask the longest cubes do not
/// start last and run alone at the end. Measured on an H200 (bench/RESULTS.md); in a
/// simulation of the launch (a cube to the first free slot), `dK, dV` with the blocks of a head
/// in order took 1.45× the time of its work spread evenly, heaviest first 1.09×.
fn grid(heads: usize, blocks: usize) -> CubeCount {
    CubeCount::Static(heads as u32, blocks as u32, 1)
}

/// `x` `[b, h, s, HEAD]` (any strides) as bf16 `[b, h, sp, HEAD]`, contiguous, `sp` the rows
/// rounded up to whole tiles and those past `s` zero: what the kernels stage, a 128-bit load
/// per eight values and no row checks.
fn pack<R: CubeRuntime, F: FloatElement>(x: CubeTensor<R>) -> CubeTensor<R> {
    pack_into::<R, F>(x, None)
}

/// [`pack`] of `dO`, and `δ = rowsum(dO ∘ O)` `[b, h, s]` (`o` the forward's output, `x`'s shape).
fn pack_delta<R: CubeRuntime, F: FloatElement>(x: CubeTensor<R>, o: CubeTensor<R>) -> (CubeTensor<R>, CubeTensor<R>) {
    let [b, h, s, _] = x.meta.shape().dims::<4>();
    let delta = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), Shape::new([b, h, s]), F::dtype());
    (pack_into::<R, F>(x, Some((o, delta.clone()))), delta)
}

fn pack_into<R: CubeRuntime, F: FloatElement>(x: CubeTensor<R>, with_delta: Option<(CubeTensor<R>, CubeTensor<R>)>) -> CubeTensor<R> {
    let x = as_float::<R, F>(x);
    let [b, h, s, d] = x.meta.shape().dims::<4>();
    let sp = s.div_ceil(BR) * BR;
    let y = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), Shape::new([b, h, sp, d]), burn::tensor::DType::BF16);
    let n = b * h * sp * d / 8;
    if n == 0 {
        return y;
    }
    let (count, dim) = (flat_count(n), CubeDim { x: FLAT_THREADS, y: 1, z: 1 });
    // SAFETY: `d` is HEAD (`applies`), so `y` holds exactly `n` vectors of eight; the kernels
    // check the flat index against that count and read `x` (and `o`, of `x`'s shape) only at
    // rows below `s`, where they write `delta` `[b, h, s]`.
    unsafe {
        match with_delta {
            Some((o, delta)) => pack_delta_kernel::launch_unchecked::<F, burn::tensor::bf16, R>(&x.client, count, dim, x.clone().into_tensor_arg(), as_float::<R, F>(o).into_tensor_arg(), y.clone().into_tensor_arg(), delta.into_tensor_arg()),
            None => pack_kernel::launch_unchecked::<F, burn::tensor::bf16, R>(&x.client, count, dim, x.clone().into_tensor_arg(), y.clone().into_tensor_arg()),
        }
    }
    y
}

/// What the kernels read of attention's inputs: `q`, `k`, `v` packed ([`pack`]), the mask
/// contiguous and its rows' key spans ([`mask_rows`]), with the inputs' shapes `q_dims`
/// `[b, h, s, HEAD]` and `k_dims` `[b, kv, t, HEAD]`. The forward makes them; the backward takes
/// them from it or makes them again.
pub(crate) struct Inputs<R: CubeRuntime> {
    pub(crate) q: CubeTensor<R>,
    pub(crate) k: CubeTensor<R>,
    pub(crate) v: CubeTensor<R>,
    pub(crate) mask: CubeTensor<R>,
    pub(crate) rows: CubeTensor<R>,
    pub(crate) q_dims: [usize; 4],
    pub(crate) k_dims: [usize; 4],
}

impl<R: CubeRuntime> Inputs<R> {
    fn new<F: FloatElement>(q: CubeTensor<R>, k: CubeTensor<R>, v: CubeTensor<R>, mask: CubeTensor<R>) -> Self {
        let mask = contiguous_float::<R, F>(mask);
        let rows = mask_rows::<R, F>(&mask);
        let (q_dims, k_dims) = (q.meta.shape().dims::<4>(), k.meta.shape().dims::<4>());
        Self { q: pack::<R, F>(q), k: pack::<R, F>(k), v: pack::<R, F>(v), mask, rows, q_dims, k_dims }
    }
}

/// `(out [b, h, s, d] (a view of `[b, s, h, d]` memory), lse [b, h, s])`; see the module's
/// comment. [`applies`] must hold.
pub(crate) fn forward<R: CubeRuntime, F: FloatElement>(q: CubeTensor<R>, k: CubeTensor<R>, v: CubeTensor<R>, mask: CubeTensor<R>, params: CubeTensor<R>, spec: AttentionSpec) -> (CubeTensor<R>, CubeTensor<R>) {
    let (out, lse, _) = forward_inputs::<R, F>(q, k, v, mask, params, spec);
    (out, lse)
}

/// [`forward`] and the [`Inputs`] it made, for [`backward_inputs`].
pub(crate) fn forward_inputs<R: CubeRuntime, F: FloatElement>(q: CubeTensor<R>, k: CubeTensor<R>, v: CubeTensor<R>, mask: CubeTensor<R>, params: CubeTensor<R>, spec: AttentionSpec) -> (CubeTensor<R>, CubeTensor<R>, Inputs<R>) {
    let [b, h, s, d] = q.meta.shape().dims::<4>();
    let client = q.client.clone();
    let memory = empty_device_contiguous_dtype(client.clone(), q.device.clone(), Shape::new([b, s, h, d]), F::dtype());
    let out = view(&memory, vec![b, h, s, d], vec![s * h * d, d, h * d, 1]);
    let lse = empty_device_contiguous_dtype(client.clone(), q.device.clone(), Shape::new([b, h, s]), F::dtype());
    let inputs = Inputs::new::<F>(q, k, v, mask);
    if b * h * s == 0 {
        return (out, lse, inputs);
    }
    LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    bound_registers();
    // SAFETY: `applies` held (head size HEAD, planes of 32, bf16 mma); q `[b, h, sp, HEAD]`, k
    // and v `[b, kv, tp, HEAD]` packed, whole tiles, read at tiles that start below `s` or `t`;
    // the mask is contiguous `[b or 1, s, t]` and `rows` its `[b or 1 · s, 4]` spans, `lse`
    // `[b, h, s]`; `out` is written at rows below `s` only.
    unsafe {
        mma_forward_kernel::launch_unchecked::<F, burn::tensor::bf16, R>(
            &client,
            grid(b * h, s.div_ceil(BR)),
            CubeDim { x: 32, y: 4, z: 1 },
            inputs.q.clone().into_tensor_arg(),
            inputs.k.clone().into_tensor_arg(),
            inputs.v.clone().into_tensor_arg(),
            inputs.mask.clone().into_tensor_arg(),
            inputs.rows.clone().into_tensor_arg(),
            params.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            lse.clone().into_tensor_arg(),
            spec.causal,
        );
    }
    (out, lse, inputs)
}

/// `(dq, dk, dv)` of [`forward`] (`out` its output). [`applies`] must hold.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<R: CubeRuntime, F: FloatElement>(dout: CubeTensor<R>, q: CubeTensor<R>, k: CubeTensor<R>, v: CubeTensor<R>, mask: CubeTensor<R>, out: CubeTensor<R>, lse: CubeTensor<R>, params: CubeTensor<R>, spec: AttentionSpec) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
    backward_inputs::<R, F>(dout, Inputs::new::<F>(q, k, v, mask), out, lse, params, spec)
}

/// [`backward`] from the forward's [`Inputs`].
pub(crate) fn backward_inputs<R: CubeRuntime, F: FloatElement>(dout: CubeTensor<R>, inputs: Inputs<R>, out: CubeTensor<R>, lse: CubeTensor<R>, params: CubeTensor<R>, spec: AttentionSpec) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
    let lse = contiguous_float::<R, F>(lse);
    let Inputs { q, k, v, mask, rows, q_dims: [b, h, s, d], k_dims: [_, kvh, t, _] } = inputs;
    let client = q.client.clone();
    let empty = |shape: Vec<usize>| empty_device_contiguous_dtype(client.clone(), q.device.clone(), Shape::from(shape), F::dtype());
    // dQ laid out `[b, s, h, d]`, as rope's backward and the query projection read it.
    let dq = view(&empty(vec![b, s, h, d]), vec![b, h, s, d], vec![s * h * d, d, h * d, 1]);
    let (dk, dv) = (empty(vec![b, kvh, t, d]), empty(vec![b, kvh, t, d]));
    if b * h * s * t > 0 {
        LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        bound_registers();
        let (dout, delta) = pack_delta::<R, F>(dout, out);
        // SAFETY: as in the forward (`dout` packed as `q`); `lse` and `delta` contiguous `[b, h,
        // s]`, `dk` and `dv` contiguous `[b, kv, t, HEAD]` written at key rows below `t` only,
        // `dq` at query rows below `s` only.
        unsafe {
            mma_dq_kernel::launch_unchecked::<F, burn::tensor::bf16, R>(
                &client,
                grid(b * h, s.div_ceil(BR)),
                CubeDim { x: 32, y: 4, z: 1 },
                dout.clone().into_tensor_arg(),
                q.clone().into_tensor_arg(),
                k.clone().into_tensor_arg(),
                v.clone().into_tensor_arg(),
                mask.clone().into_tensor_arg(),
                rows.clone().into_tensor_arg(),
                lse.clone().into_tensor_arg(),
                delta.clone().into_tensor_arg(),
                params.clone().into_tensor_arg(),
                dq.clone().into_tensor_arg(),
                spec.causal,
            );
            mma_dkv_kernel::launch_unchecked::<F, burn::tensor::bf16, R>(
                &client,
                grid(b * kvh, t.div_ceil(BC)),
                CubeDim { x: 32, y: 4, z: 1 },
                dout.into_tensor_arg(),
                q.into_tensor_arg(),
                k.into_tensor_arg(),
                v.into_tensor_arg(),
                mask.into_tensor_arg(),
                rows.into_tensor_arg(),
                lse.into_tensor_arg(),
                delta.into_tensor_arg(),
                params.into_tensor_arg(),
                dk.clone().into_tensor_arg(),
                dv.clone().into_tensor_arg(),
                spec.causal,
            );
        }
    }
    (dq, dk, dv)
}
