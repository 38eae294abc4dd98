//! Attention as one operation with its own backward, in the flash-attention style.
//!
//! As plain tensor operations, training keeps the `[b, h, s, t]` scores, their softcap, the
//! masked scores and the probabilities for backward: for Qwen2.5-0.5B at 8 × 1024 tokens that
//! is 1.8 GB per layer in f32, more than everything else a layer keeps. Here the tape keeps
//! `q`, `k`, `v`, the output and one log-sum-exp per query row; backward recomputes each
//! probability from its score and that row's log-sum-exp (`p = exp(z − lse)`).
//!
//! Grouped-query attention never repeats keys and values: query head `hh` reads key/value head
//! `hh / (h / kv)`, and the key and value gradients sum over the heads of a group. The mask is
//! additive, `[b or 1, s, t]` (0 where a query may look, −∞ elsewhere), so the causal,
//! packed-sequence (block-diagonal) and sliding-window masks kiln builds all pass through one
//! path; the kernels skip the work of masked pairs (`mask ≤ −1e30`), and with
//! [`AttentionSpec::causal`] whole tiles of keys after a cube's last query row.
//!
//! Scores: `z = cap(scale · q·k) + mask`, `cap(x) = c · tanh(x / c)` with Gemma's attention
//! softcap `c` (identity without one). Backward, with `δ = rowsum(dO ∘ O)`:
//! `dV = Pᵀ dO`, `dP = dO Vᵀ`, `dZ = P ∘ (dP − δ)`, `dX = dZ ∘ (1 − (cap/c)²) · scale`,
//! `dQ = dX K`, `dK = dXᵀ Q`.
//!
//! The default methods are the composition (with the grouped heads folded into query rows, so
//! it does not repeat keys either); the CubeCL backends run three kernels: the forward (one
//! thread per query row, key/value tiles staged through shared memory, online softmax), `dQ`
//! (one thread per query row) and `dK, dV` (one thread per key row and slice of the group's
//! query rows, the slices' partial sums added afterwards), each recomputing scores rather than
//! reading them. At training shapes on CUDA attention runs on tensor cores (`attention_mma.rs`,
//! head size 64, bf16 operands), forward and backward, and as dense products on cuBLAS
//! (`cube::products`) where those kernels do not apply.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{backend::Backend, Tensor};

use crate::float;

/// Score scale and softcap of one attention layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionSpec {
    /// Multiplies `q · k` (usually `1 / sqrt(head_dim)`).
    pub scale: f64,
    /// Gemma 2's attention logit softcap `c` (`c · tanh(x / c)`), if any.
    pub softcap: Option<f64>,
    /// The mask hides every key after the query's own position (key `j > i + t − s`), as each
    /// mask kiln builds does (causal, packed, sliding window). The kernels then skip those key
    /// tiles instead of reading the mask there: half of the work at `t = s`. The composition
    /// reads the mask alone, so a wrong `true` shows up as a mismatch in the checks.
    pub causal: bool,
    /// Where attention runs as dense products (training shapes on CUDA), multiply in bf16 even
    /// when the inputs are f32, as PyTorch's autocast does: the scores and `dP` still come out
    /// in f32 and the softmax runs in f32, the probabilities and `dS` are rounded to bf16 for
    /// the products that take them. kiln sets it when training in bf16; the flash kernels and
    /// the composition ignore it.
    pub bf16_products: bool,
}

/// Which attention the CubeCL backends run. Training leaves it at `Auto`; the checks and
/// benchmarks pick one to compare them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum AttentionPath {
    /// Dense products on cuBLAS at training shapes (CUDA with `libcublas`, unless the
    /// environment sets `KILN_ATTENTION_KERNELS`), with the forward on tensor cores where
    /// they apply, forward and backward (`KILN_ATTENTION_TENSOR_CORES`: `off`, or `forward`
    /// for the forward alone); the flash kernels otherwise.
    Auto,
    /// The flash kernels.
    Kernels,
    /// The dense products (Burn's matmul where cuBLAS does not apply), one batch row per
    /// chunk: how the checks run them on wgpu.
    Products,
    /// The tensor-core flash kernels (`attention_mma.rs`) where the device and the inputs
    /// allow them (CUDA, head size 64, bf16 products, no softcap), else as `Auto`.
    TensorCores,
}

static PATH: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(AttentionPath::Auto as u8);

/// The head size the tensor-core kernels take.
pub const TENSOR_CORE_HEAD: usize = 64;

/// Whether the environment leaves the forward (or the `backward`) to the tensor-core kernels
/// where they apply under [`AttentionPath::Auto`] (`KILN_ATTENTION_TENSOR_CORES`: `off`, or
/// `forward` for the forward alone).
fn tensor_cores_wanted(backward: bool) -> bool {
    match std::env::var("KILN_ATTENTION_TENSOR_CORES").as_deref() {
        Ok("off") => false,
        Ok("forward") => !backward,
        _ => true,
    }
}

/// Whether training on CUDA runs attention on the tensor-core kernels both ways, for heads of
/// `head_dim` with `query_rows` query rows per key/value head (`g·s`), a softcap or not, bf16
/// products or not: then the forward keeps packed bf16 inputs for the backward and neither
/// pass forms scores. What `kiln plan` counts; the device itself is assumed to have bf16
/// `mma` (any CUDA GPU kiln trains on in bf16).
pub fn tensor_cores_planned(head_dim: usize, query_rows: usize, softcap: bool, bf16_products: bool) -> bool {
    let auto = PATH.load(std::sync::atomic::Ordering::Relaxed) == AttentionPath::Auto as u8;
    auto && tensor_cores_wanted(false) && tensor_cores_wanted(true) && std::env::var_os("KILN_ATTENTION_KERNELS").is_none() && head_dim == TENSOR_CORE_HEAD && !softcap && bf16_products && query_rows >= PRODUCT_ROWS
}

/// Query rows per key/value head (`g·s`) from which attention runs as dense products (or on
/// tensor cores) on CUDA: below it (decoding) the one flash kernel beats several launches.
const PRODUCT_ROWS: usize = 128;

/// Sets the [`AttentionPath`] for the whole process.
pub fn set_attention_path(path: AttentionPath) {
    PATH.store(path as u8, std::sync::atomic::Ordering::Relaxed);
}

/// Backend extension: attention of `q` `[b, h, s, d]` over `k`, `v` `[b, kv, t, d]` (`h` a
/// multiple of `kv`) with the additive `mask` `[b or 1, s, t]`.
pub trait FlashAttention: Backend {
    /// `(out [b, h, s, d], lse [b, h, s])`, `lse` the log-sum-exp of each row's masked scores.
    fn flash_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: FloatTensor<Self>, spec: AttentionSpec) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (q, k, v, mask) = (float::<Self, 4>(q), float::<Self, 4>(k), float::<Self, 4>(v), float::<Self, 3>(mask));
        let [b, h, s, d] = q.dims();
        let z = grouped_scores(q, k, spec) + grouped_mask(mask, b, h, v.dims()[1]); // [b, kv, g·s, t]
        // As Burn's softmax rounds (the unfused model was measured against transformers so).
        let max = z.clone().max_dim(3); // [b, kv, g·s, 1]
        let e = (z - max.clone()).exp();
        let sum = e.clone().sum_dim(3);
        let lse = (max + sum.clone().log()).reshape([b, h, s]);
        let out = (e / sum).matmul(v).reshape([b, h, s, d]);
        (out.into_primitive().tensor(), lse.into_primitive().tensor())
    }

    /// [`FlashAttention::flash_attention`] and what its backward reads of the inputs
    /// ([`Saved`]): the inputs themselves unless a backend's kernels read another form of them.
    fn flash_attention_saved(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: FloatTensor<Self>, spec: AttentionSpec) -> (FloatTensor<Self>, FloatTensor<Self>, Saved<Self>) {
        let (out, lse) = Self::flash_attention(q.clone(), k.clone(), v.clone(), mask.clone(), spec);
        (out, lse, Saved { q, k, v, mask, packed: None })
    }

    /// `(dq, dk, dv)` for the upstream gradient `dout` `[b, h, s, d]`, from what
    /// [`FlashAttention::flash_attention_saved`] kept.
    fn flash_attention_bwd(dout: FloatTensor<Self>, saved: Saved<Self>, out: FloatTensor<Self>, lse: FloatTensor<Self>, spec: AttentionSpec) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let Saved { q, k, v, mask, .. } = saved;
        let (q, k, v, mask) = (float::<Self, 4>(q), float::<Self, 4>(k), float::<Self, 4>(v), float::<Self, 3>(mask));
        let [b, h, s, d] = q.dims();
        let kv = k.dims()[1];
        let rows = [b, kv, h / kv * s, d];
        let capped = grouped_scores(q.clone(), k.clone(), spec); // [b, kv, g·s, t]
        let z = capped.clone() + grouped_mask(mask, b, h, kv);
        let p = (z - float::<Self, 3>(lse).reshape([b, kv, h / kv * s, 1])).exp();
        let dout = float::<Self, 4>(dout).reshape(rows);
        let delta = (dout.clone() * float::<Self, 4>(out).reshape(rows)).sum_dim(3); // [b, kv, g·s, 1]
        let dv = p.clone().swap_dims(2, 3).matmul(dout.clone()); // [b, kv, t, d]
        let dz = p * (dout.matmul(v.swap_dims(2, 3)) - delta);
        let dx = match spec.softcap {
            Some(c) => dz * (capped.div_scalar(c).powi_scalar(2).neg().add_scalar(1.0)),
            None => dz,
        }
        .mul_scalar(spec.scale);
        let qg = q.reshape(rows);
        let dq = dx.clone().matmul(k).reshape([b, h, s, d]);
        let dk = dx.swap_dims(2, 3).matmul(qg);
        (dq.into_primitive().tensor(), dk.into_primitive().tensor(), dv.into_primitive().tensor())
    }
}

/// Score elements per chunk where attention runs as dense products (CUDA at training shapes):
/// 512 MiB of f32 scores, and as much again for their gradient in backward. `kiln plan`
/// counts it.
pub const SCORE_BUDGET: usize = 128 << 20;

/// Causal query rows per chunk of the dense-product attention at training shapes: chunk `i`
/// multiplies only the keys its last query sees, so `n` chunks of a causal square compute
/// `(n + 1) / 2n` of it (5/8 at four) where one chunk computes the masked half too, and each
/// chunk costs its own launches (bench/RESULTS.md measured 128, 256 and 1,024 at 1,024 tokens).
/// `KILN_QUERY_CHUNK` overrides it, for such measurements.
pub const QUERY_CHUNK: usize = 256;

/// The chunks of the dense-product attention for `b` rows of `h` heads, `s` queries and `t`
/// keys: `(batch rows, query rows)` per chunk. Query rows: [`QUERY_CHUNK`] with a causal mask,
/// else all `s` (every query sees every key). Batch rows: as many as [`SCORE_BUDGET`] holds
/// for a chunk of those queries over all `t` keys, at least one.
pub fn score_chunks(b: usize, h: usize, s: usize, t: usize, causal: bool) -> (usize, usize) {
    let queries = if causal {
        let rows = std::env::var("KILN_QUERY_CHUNK").ok().and_then(|v| v.parse::<usize>().ok()).unwrap_or(QUERY_CHUNK);
        rows.clamp(1, s.max(1))
    } else {
        s.max(1)
    };
    let rows = (SCORE_BUDGET / h.saturating_mul(queries).saturating_mul(t).max(1)).clamp(1, b.max(1));
    (rows, queries)
}

/// Attention through [`FlashAttention`]: the typed entry point. Shapes as the trait's.
pub fn flash_attention<B: FlashAttention>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, mask: Tensor<B, 3>, spec: AttentionSpec) -> Tensor<B, 4> {
    let (out, _) = B::flash_attention(q.into_primitive().tensor(), k.into_primitive().tensor(), v.into_primitive().tensor(), mask.into_primitive().tensor(), spec);
    float(out)
}

/// Attention as the model computed it before the fused operation: keys and values repeated to
/// every head, the full `[b, h, s, t]` scores, softcap, mask, softmax. Returns the output
/// `[b, h, s, d]` and the probabilities `[b, h, s, t]` (the probes read them). The reference
/// [`FlashAttention`] is checked against.
pub fn attention_composition<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, mask: Tensor<B, 3>, spec: AttentionSpec) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let groups = q.dims()[1] / k.dims()[1];
    let mut z = q.matmul(repeat_kv(k, groups).swap_dims(2, 3)); // [b, h, s, t]
    if spec.scale != 1.0 {
        z = z.mul_scalar(spec.scale);
    }
    if let Some(c) = spec.softcap {
        z = z.div_scalar(c).tanh().mul_scalar(c);
    }
    let probs = burn::tensor::activation::softmax(z + mask.unsqueeze_dim::<4>(1), 3); // mask [b, s, t] -> [b, 1, s, t]
    (probs.clone().matmul(repeat_kv(v, groups)), probs)
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

/// `cap(scale · q·kᵀ)` with each group's query heads as extra rows: `[b, kv, g·s, t]`.
fn grouped_scores<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, spec: AttentionSpec) -> Tensor<B, 4> {
    let [b, h, s, d] = q.dims();
    let kv = k.dims()[1];
    let mut z = q.reshape([b, kv, h / kv * s, d]).matmul(k.swap_dims(2, 3));
    if spec.scale != 1.0 {
        z = z.mul_scalar(spec.scale);
    }
    match spec.softcap {
        Some(c) => z.div_scalar(c).tanh().mul_scalar(c),
        None => z,
    }
}

/// The mask `[b or 1, s, t]` for every grouped row: `[b, kv, g·s, t]`.
fn grouped_mask<B: Backend>(mask: Tensor<B, 3>, b: usize, h: usize, kv: usize) -> Tensor<B, 4> {
    let [mb, s, t] = mask.dims();
    mask.reshape([mb, 1, 1, s, t]).expand([b, kv, h / kv, s, t]).reshape([b, kv, h / kv * s, t])
}


/// What attention's backward reads of its inputs. `q`, `k`, `v` and `mask` as they came in,
/// or, where `packed` is set, the forms the tensor-core kernels read, made once by the forward
/// rather than again by the backward: `q`, `k`, `v` packed in bf16 (`[b, h, sp, d]`, rows
/// rounded up to whole tiles, half the bytes of the f32 inputs) and the mask with its rows'
/// key spans.
#[derive(Debug, Clone)]
pub struct Saved<B: Backend> {
    pub q: FloatTensor<B>,
    pub k: FloatTensor<B>,
    pub v: FloatTensor<B>,
    pub mask: FloatTensor<B>,
    pub packed: Option<Packed<B>>,
}

/// What [`Saved`] holds besides packed inputs: the mask's row spans (a u32 tensor, held in the
/// backend's tensor type) and the inputs' shapes, `q` `[b, h, s, d]` and `k` `[b, kv, t, d]`.
#[derive(Debug, Clone)]
pub struct Packed<B: Backend> {
    pub rows: FloatTensor<B>,
    pub q_dims: [usize; 4],
    pub k_dims: [usize; 4],
}

#[derive(Debug, Clone)]
struct State<B: Backend> {
    saved: Saved<B>,
    out: FloatTensor<B>,
    lse: FloatTensor<B>,
    spec: AttentionSpec,
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: FlashAttention> Backward<B, 3> for AttentionBackward {
    type State = State<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_q, node_k, node_v] = ops.parents;
        let dout = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let (dq, dk, dv) = B::flash_attention_bwd(dout, s.saved, s.out, s.lse, s.spec);
        for (node, grad) in [(node_q, dq), (node_k, dk), (node_v, dv)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: FlashAttention, C: CheckpointStrategy> FlashAttention for Autodiff<B, C> {
    fn flash_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: FloatTensor<Self>, spec: AttentionSpec) -> (FloatTensor<Self>, FloatTensor<Self>) {
        // `lse` leaves as a constant and the mask is not differentiated: only `out` is tracked.
        match AttentionBackward.prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (out, lse, saved) = B::flash_attention_saved(q.primitive, k.primitive, v.primitive, mask.primitive, spec);
                let lse_out = <Self as burn::tensor::backend::AutodiffBackend>::from_inner(lse.clone());
                (prep.finish(State { saved, out: out.clone(), lse, spec }, out), lse_out)
            }
            OpsKind::UnTracked(prep) => {
                let (out, lse) = B::flash_attention(q.primitive, k.primitive, v.primitive, mask.primitive, spec);
                (prep.finish(out), <Self as burn::tensor::backend::AutodiffBackend>::from_inner(lse))
            }
        }
    }
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> FlashAttention for NdArray<E, I, Q> where NdArrayTensor: From<SharedArray<E>> + From<SharedArray<I>> {}

#[cfg(feature = "cubecl")]
impl<B: burn_fusion::FusionBackend> FlashAttention for burn_fusion::Fusion<B> {}

#[cfg(feature = "cubecl")]
pub(crate) mod cube {
    use burn::tensor::ops::FloatTensor;
    use burn::tensor::{Shape, TensorData};
    use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use cubecl::prelude::*;
    use crate::cube::{as_float, contiguous_float};
    use cubecl::{cube, CubeCount, CubeDim};

    use super::{AttentionSpec, FlashAttention, Packed, Saved};

    /// Threads per cube: query rows (forward, `dQ`) or key rows (`dK, dV`) per cube.
    const ROWS: u32 = 32;
    /// Floats per staged tile (of keys or of queries): two tiles make 16 KiB, WebGPU's minimum
    /// workgroup storage.
    const TILE_FLOATS: u32 = 2048;
    /// Below this a mask value (or a score placeholder) counts as −∞. A finite literal:
    /// WGSL has no infinity.
    const MASKED: f32 = -1.0e30;
    /// The log-sum-exp of a row with every key masked.
    const UNSEEN: f32 = 1.0e30;

    /// Keys (or queries) per staged tile for head size `d`.
    fn tile_rows(d: u32) -> u32 {
        (TILE_FLOATS / d).clamp(1, 64)
    }

    // Rows of q, k, v, dO and the outputs are read and kept as vectors of `N` floats (4 when
    // the head size allows): every thread of a cube reads the same staged key (or query) at
    // once, and with one float per shared-memory load the kernels issued a load per
    // multiply-add, a quarter of what the FP32 units can take. Offsets below count vectors;
    // `dv` is the head size in vectors (`dvec` in `dkv_kernel`, where `dv` is dV).

    /// The sum of a vector's lanes.
    #[cube]
    fn lanes_sum<F: Float, N: Size>(v: Vector<F, N>) -> F {
        let mut sum = F::new(0.0);
        #[unroll]
        for l in 0..v.vector_size() {
            sum += v[l];
        }
        sum
    }

    /// `cap(scale · a·b)` for the row `a` (this thread's, in registers) and row `bi` of the
    /// staged tile `b`.
    #[cube]
    fn score<F: Float, N: Size>(a: &Array<Vector<F, N>>, b: &SharedMemory<Vector<F, N>>, bi: usize, scale: F, cap: F, #[comptime] dv: u32, #[comptime] softcap: bool) -> F {
        let mut dot = Vector::<F, N>::new(F::new(0.0));
        for c in 0..comptime!(dv as usize) {
            dot = dot + a[c] * b[bi + c];
        }
        let mut x = lanes_sum::<F, N>(dot) * scale;
        if softcap {
            x = cap * F::tanh(x / cap);
        }
        x
    }

    /// This thread's row `base..base + dv` of `x` in registers (zeros for a spare thread).
    #[cube]
    fn load_row<F: Float, N: Size>(x: &Tensor<Vector<F, N>>, base: usize, valid: bool, #[comptime] dv: u32) -> Array<Vector<F, N>> {
        let mut row = Array::<Vector<F, N>>::new(comptime!(dv as usize));
        for c in 0..comptime!(dv as usize) {
            let mut value = Vector::<F, N>::new(F::new(0.0));
            if valid {
                value = x[base + c];
            }
            row[c] = value;
        }
        row
    }

    /// Stages rows `first..first + tile` of the `[rows, d]` matrix at `base` of `x` in `shared`
    /// (zeros past `rows`).
    #[cube]
    fn stage<F: Float, N: Size>(x: &Tensor<Vector<F, N>>, base: usize, first: usize, rows: usize, shared: &mut SharedMemory<Vector<F, N>>, lane: usize, #[comptime] dv: u32, #[comptime] tile: u32) {
        let dvv = comptime!(dv as usize);
        let mut idx = lane;
        while idx < comptime!((tile * dv) as usize) {
            let row = first + idx / dvv;
            let mut value = Vector::<F, N>::new(F::new(0.0));
            if row < rows {
                value = x[base + row * dvv + idx % dvv];
            }
            shared[idx] = value;
            idx += ROWS as usize;
        }
    }

    /// The end of the keys this cube's query rows may see: all `t`, or under a causal mask
    /// `(last row + 1) + t − s` (query `i` sees keys up to `i + t − s`).
    #[cube]
    fn key_end(s: usize, t: usize, #[comptime] causal: bool) -> usize {
        let mut end = t;
        if causal {
            let hi = (CUBE_POS_X as usize + 1) * ROWS as usize + t;
            end = 0;
            if hi > s {
                end = hi - s;
            }
            if end > t {
                end = t;
            }
        }
        end
    }

    /// Where this thread's query row lives (cube `(query block, b·h)`, one row per thread).
    #[derive(CubeType)]
    struct QueryRow {
        /// Batch · query heads + head.
        bh: usize,
        /// Queries and keys.
        s: usize,
        t: usize,
        /// The row, and whether it exists (the last block's spare threads do not).
        i: usize,
        valid: bool,
        /// Offsets (in vectors) of the query row and of its key/value head's `[t, d]` block;
        /// offset (in floats) of its mask row.
        qrow: usize,
        kbase: usize,
        mrow: usize,
    }

    #[cube]
    fn query_row<F: Float, N: Size>(q: &Tensor<Vector<F, N>>, k: &Tensor<Vector<F, N>>, mask: &Tensor<F>, lane: usize, #[comptime] dv: u32) -> QueryRow {
        let dvv = comptime!(dv as usize);
        let bh = CUBE_POS_Y as usize;
        let h = q.shape(1);
        let s = q.shape(2);
        let kvh = k.shape(1);
        let t = k.shape(2);
        let bi = bh / h;
        let mut mb = bi;
        if mask.shape(0) == 1 {
            mb = 0;
        }
        let i = CUBE_POS_X as usize * ROWS as usize + lane;
        QueryRow { bh, s, t, i, valid: i < s, qrow: (bh * s + i) * dvv, kbase: (bi * kvh + (bh % h) / (h / kvh)) * t * dvv, mrow: mb * s * t + i * t }
    }

    /// One thread per query row; cube `(query block, b·h)`. `params` = [scale, softcap].
    #[cube(launch_unchecked)]
    fn forward_kernel<F: Float, N: Size>(q: &Tensor<Vector<F, N>>, k: &Tensor<Vector<F, N>>, v: &Tensor<Vector<F, N>>, mask: &Tensor<F>, params: &Tensor<F>, out: &mut Tensor<Vector<F, N>>, lse: &mut Tensor<F>, #[comptime] dv: u32, #[comptime] tile: u32, #[comptime] softcap: bool, #[comptime] causal: bool) {
        let lane = UNIT_POS_X as usize;
        let dvv = comptime!(dv as usize);
        let scale = params[0];
        let cap = params[1];
        let QueryRow { bh, s, t, i, valid, qrow, kbase, mrow } = query_row::<F, N>(q, k, mask, lane, dv);
        let qr = load_row::<F, N>(q, qrow, valid, dv);
        let mut ks = SharedMemory::<Vector<F, N>>::new(comptime!((tile * dv) as usize));
        let mut vs = SharedMemory::<Vector<F, N>>::new(comptime!((tile * dv) as usize));
        let mut acc = Array::<Vector<F, N>>::new(dvv);
        let mut z = Array::<F>::new(comptime!(tile as usize));
        for c in 0..dvv {
            acc[c] = Vector::<F, N>::new(F::new(0.0));
        }
        let mut m = F::new(MASKED);
        let mut l = F::new(0.0);
        let kend = key_end(s, t, causal);
        let mut j0 = 0;
        while j0 < kend {
            stage::<F, N>(k, kbase, j0, t, &mut ks, lane, dv, tile);
            stage::<F, N>(v, kbase, j0, t, &mut vs, lane, dv, tile);
            sync_cube();
            if valid {
                let mut top = F::new(MASKED);
                for jj in 0..comptime!(tile as usize) {
                    let j = j0 + jj;
                    let mut zj = F::new(MASKED);
                    if j < t {
                        let mv = mask[mrow + j];
                        if mv > F::new(MASKED) {
                            zj = score::<F, N>(&qr, &ks, jj * dvv, scale, cap, dv, softcap) + mv;
                        }
                    }
                    z[jj] = zj;
                    if zj > top {
                        top = zj;
                    }
                }
                if top > F::new(MASKED) {
                    let mut m_new = m;
                    if top > m {
                        m_new = top;
                    }
                    let corr = F::exp(m - m_new);
                    l *= corr;
                    let corr = Vector::<F, N>::new(corr);
                    for c in 0..dvv {
                        acc[c] = acc[c] * corr;
                    }
                    for jj in 0..comptime!(tile as usize) {
                        if z[jj] > F::new(MASKED) {
                            let p = F::exp(z[jj] - m_new);
                            l += p;
                            let pv = Vector::<F, N>::new(p);
                            for c in 0..dvv {
                                acc[c] = acc[c] + pv * vs[jj * dvv + c];
                            }
                        }
                    }
                    m = m_new;
                }
            }
            sync_cube();
            j0 += comptime!(tile as usize);
        }
        if valid {
            // A row with every key masked attends to nothing: output 0, and an lse that makes
            // every recomputed probability 0 in backward.
            let mut inv = F::new(0.0);
            let mut row_lse = F::new(UNSEEN);
            if l > F::new(0.0) {
                inv = F::new(1.0) / l;
                row_lse = m + F::ln(l);
            }
            let inv = Vector::<F, N>::new(inv);
            for c in 0..dvv {
                out[qrow + c] = acc[c] * inv;
            }
            lse[bh * s + i] = row_lse;
        }
    }

    /// `dQ`: one thread per query row, as the forward. `delta` `[b, h, s]` = rowsum(dO ∘ O).
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    fn dq_kernel<F: Float, N: Size>(dout: &Tensor<Vector<F, N>>, q: &Tensor<Vector<F, N>>, k: &Tensor<Vector<F, N>>, v: &Tensor<Vector<F, N>>, mask: &Tensor<F>, lse: &Tensor<F>, delta: &Tensor<F>, params: &Tensor<F>, dq: &mut Tensor<Vector<F, N>>, #[comptime] dv: u32, #[comptime] tile: u32, #[comptime] softcap: bool, #[comptime] causal: bool) {
        let lane = UNIT_POS_X as usize;
        let dvv = comptime!(dv as usize);
        let scale = params[0];
        let cap = params[1];
        let QueryRow { bh, s, t, i, valid, qrow, kbase, mrow } = query_row::<F, N>(q, k, mask, lane, dv);
        let mut row_lse = F::new(0.0);
        let mut row_delta = F::new(0.0);
        if valid {
            row_lse = lse[bh * s + i];
            row_delta = delta[bh * s + i];
        }
        let qr = load_row::<F, N>(q, qrow, valid, dv);
        let dor = load_row::<F, N>(dout, qrow, valid, dv);
        let mut ks = SharedMemory::<Vector<F, N>>::new(comptime!((tile * dv) as usize));
        let mut vs = SharedMemory::<Vector<F, N>>::new(comptime!((tile * dv) as usize));
        let mut acc = Array::<Vector<F, N>>::new(dvv);
        for c in 0..dvv {
            acc[c] = Vector::<F, N>::new(F::new(0.0));
        }
        let kend = key_end(s, t, causal);
        let mut j0 = 0;
        while j0 < kend {
            stage::<F, N>(k, kbase, j0, t, &mut ks, lane, dv, tile);
            stage::<F, N>(v, kbase, j0, t, &mut vs, lane, dv, tile);
            sync_cube();
            if valid {
                for jj in 0..comptime!(tile as usize) {
                    let j = j0 + jj;
                    if j < t {
                        let mv = mask[mrow + j];
                        if mv > F::new(MASKED) {
                            let capped = score::<F, N>(&qr, &ks, jj * dvv, scale, cap, dv, softcap);
                            let p = F::exp(capped + mv - row_lse);
                            let mut dpv = Vector::<F, N>::new(F::new(0.0));
                            for c in 0..dvv {
                                dpv = dpv + dor[c] * vs[jj * dvv + c];
                            }
                            let mut dx = p * (lanes_sum::<F, N>(dpv) - row_delta) * scale;
                            if softcap {
                                let r = capped / cap;
                                dx *= F::new(1.0) - r * r;
                            }
                            let dxv = Vector::<F, N>::new(dx);
                            for c in 0..dvv {
                                acc[c] = acc[c] + dxv * ks[jj * dvv + c];
                            }
                        }
                    }
                }
            }
            sync_cube();
            j0 += comptime!(tile as usize);
        }
        if valid {
            for c in 0..dvv {
                dq[qrow + c] = acc[c];
            }
        }
    }

    /// `dK, dV`: one thread per key row; cube `(key block, b·kv, split)`. Split `z` covers one
    /// query head of the group (`z % g`) and one slice of its query rows (`z / g`), staging
    /// query and upstream-gradient tiles, and writes its partial sums to `dk[z]`, `dv[z]`
    /// (`[splits, b, kv, t, d]`; the caller sums over splits). Without the split, a key row's
    /// thread would walk every query row of every head in its group, and `b·kv·t` threads
    /// leave most of a large GPU idle.
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    fn dkv_kernel<F: Float, N: Size>(dout: &Tensor<Vector<F, N>>, q: &Tensor<Vector<F, N>>, k: &Tensor<Vector<F, N>>, v: &Tensor<Vector<F, N>>, mask: &Tensor<F>, lse: &Tensor<F>, delta: &Tensor<F>, params: &Tensor<F>, dk: &mut Tensor<Vector<F, N>>, dv: &mut Tensor<Vector<F, N>>, #[comptime] dvec: u32, #[comptime] tile: u32, #[comptime] softcap: bool, #[comptime] causal: bool) {
        let lane = UNIT_POS_X as usize;
        let bkv = CUBE_POS_Y as usize;
        let h = q.shape(1);
        let s = q.shape(2);
        let kvh = k.shape(1);
        let t = k.shape(2);
        let dvv = comptime!(dvec as usize);
        let scale = params[0];
        let cap = params[1];
        let g = h / kvh;
        let bi = bkv / kvh;
        let mut mb = bi;
        if mask.shape(0) == 1 {
            mb = 0;
        }
        let j = CUBE_POS_X as usize * ROWS as usize + lane;
        let valid = j < t;
        let krow = (bkv * t + j) * dvv;
        let mbase = mb * s * t;
        let kr = load_row::<F, N>(k, krow, valid, dvec);
        let mut qs = SharedMemory::<Vector<F, N>>::new(comptime!((tile * dvec) as usize));
        let mut os = SharedMemory::<Vector<F, N>>::new(comptime!((tile * dvec) as usize));
        let mut ak = Array::<Vector<F, N>>::new(dvv);
        let mut av = Array::<Vector<F, N>>::new(dvv);
        for c in 0..dvv {
            ak[c] = Vector::<F, N>::new(F::new(0.0));
            av[c] = Vector::<F, N>::new(F::new(0.0));
        }
        let z = CUBE_POS_Z as usize;
        let splits = dk.shape(0);
        let head = z % g;
        let per = (s + splits / g - 1) / (splits / g); // query rows per slice
        let first = (z / g) * per;
        let mut end = first + per;
        if end > s {
            end = s;
        }
        {
            let bh = bkv * g + head; // == bi·h + (kv head)·g + head
            let qbase = bh * s * dvv;
            // Under a causal mask no query before `j + s − t` sees key `j`: start at the block's.
            let mut i0 = first;
            let lo = CUBE_POS_X as usize * ROWS as usize + s;
            if causal {
                if lo > t + first {
                    i0 = lo - t;
                }
            }
            while i0 < end {
                stage::<F, N>(q, qbase, i0, s, &mut qs, lane, dvec, tile);
                stage::<F, N>(dout, qbase, i0, s, &mut os, lane, dvec, tile);
                sync_cube();
                if valid {
                    for ii in 0..comptime!(tile as usize) {
                        let i = i0 + ii;
                        if i < end {
                            let mv = mask[mbase + i * t + j];
                            if mv > F::new(MASKED) {
                                let capped = score::<F, N>(&kr, &qs, ii * dvv, scale, cap, dvec, softcap);
                                let p = F::exp(capped + mv - lse[bh * s + i]);
                                let mut dpv = Vector::<F, N>::new(F::new(0.0));
                                for c in 0..dvv {
                                    dpv = dpv + os[ii * dvv + c] * v[krow + c];
                                }
                                let mut dx = p * (lanes_sum::<F, N>(dpv) - delta[bh * s + i]) * scale;
                                if softcap {
                                    let r = capped / cap;
                                    dx *= F::new(1.0) - r * r;
                                }
                                let (pv, dxv) = (Vector::<F, N>::new(p), Vector::<F, N>::new(dx));
                                for c in 0..dvv {
                                    av[c] = av[c] + pv * os[ii * dvv + c];
                                    ak[c] = ak[c] + dxv * qs[ii * dvv + c];
                                }
                            }
                        }
                    }
                }
                sync_cube();
                i0 += comptime!(tile as usize);
            }
        }
        if valid {
            let out = z * (dk.len() / splits) + krow;
            for c in 0..dvv {
                dk[out + c] = ak[c];
                dv[out + c] = av[c];
            }
        }
    }

    /// How many slices `dkv_kernel` splits each key row's work into: a multiple of the group
    /// size `g`, enough for about `TARGET_CUBES` cubes, at most one slice per staged tile of
    /// queries, and partial sums of at most `MAX_PARTIAL` bytes.
    fn dkv_splits(b: usize, kvh: usize, g: usize, s: usize, t: usize, d: usize, tile: usize) -> usize {
        const TARGET_CUBES: usize = 4096;
        const MAX_PARTIAL: usize = 512 << 20;
        let cubes = blocks(t) as usize * b * kvh * g;
        let mut slices = TARGET_CUBES.div_ceil(cubes.max(1)).clamp(1, s.div_ceil(tile).max(1));
        while slices > 1 && 2 * g * slices * b * kvh * t * d * 4 > MAX_PARTIAL {
            slices -= 1;
        }
        g * slices
    }


    /// Whether attention's forward (or with `backward`, its backward) runs on tensor cores
    /// ([`crate::attention_mma`]): where it applies, on the `TensorCores` path (the checks),
    /// and at the training shapes the products would take, forward and backward; for
    /// comparisons the environment may set `KILN_ATTENTION_TENSOR_CORES=forward` (the backward
    /// on the products, which read the same `lse`) or `=off` (bench/RESULTS.md has how each
    /// compares).
    fn tensor_cores_chosen<R: CubeRuntime>(q: &CubeTensor<R>, k: &CubeTensor<R>, spec: AttentionSpec, backward: bool) -> bool {
        use super::{AttentionPath, PATH};
        match PATH.load(std::sync::atomic::Ordering::Relaxed) {
            p if p == AttentionPath::TensorCores as u8 => crate::attention_mma::applies(q, spec),
            p if p == AttentionPath::Auto as u8 => super::tensor_cores_wanted(backward) && products::chosen::<R>(q, k).is_some() && crate::attention_mma::applies(q, spec),
            _ => false,
        }
    }

    fn params<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(like: &CubeTensor<R>, spec: AttentionSpec) -> CubeTensor<R> {
        let data = TensorData::new(vec![spec.scale as f32, spec.softcap.unwrap_or(1.0) as f32], [2]).convert::<F>();
        contiguous_float::<R, F>(<CubeBackend<R, F, I, BT> as burn::tensor::ops::FloatTensorOps<CubeBackend<R, F, I, BT>>>::float_from_data(data, &like.device))
    }

    fn empty<R: CubeRuntime, F: FloatElement>(like: &CubeTensor<R>, shape: Vec<usize>) -> CubeTensor<R> {
        empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), Shape::from(shape), F::dtype())
    }

    /// Floats per vector for rows of `d` floats: 4 (or 2) when `d` divides evenly and every
    /// tensor starts on a boundary of that many floats, else 1.
    fn vector_width<R: CubeRuntime>(d: usize, tensors: &[&CubeTensor<R>]) -> usize {
        let aligned = |w: usize| tensors.iter().all(|t| t.handle.offset_start.unwrap_or(0) % (w * t.dtype.size()) as u64 == 0);
        [4, 2].into_iter().find(|&w| d % w == 0 && aligned(w)).unwrap_or(1)
    }

    fn blocks(rows: usize) -> u32 {
        rows.div_ceil(ROWS as usize) as u32
    }

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FlashAttention for CubeBackend<R, F, I, BT> {
        fn flash_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: FloatTensor<Self>, spec: AttentionSpec) -> (FloatTensor<Self>, FloatTensor<Self>) {
            if tensor_cores_chosen::<R>(&q, &k, spec, false) {
                let p = params::<R, F, I, BT>(&q, spec);
                return crate::attention_mma::forward::<R, F>(q, k, v, mask, p, spec);
            }
            if let Some(limit) = products::chosen::<R>(&q, &k) {
                return products::forward::<R, F, I, BT>(q, k, v, mask, spec, limit);
            }
            let (q, k, v, mask) = (contiguous_float::<R, F>(q), contiguous_float::<R, F>(k), contiguous_float::<R, F>(v), contiguous_float::<R, F>(mask));
            let [b, h, s, d] = q.meta.shape().dims::<4>();
            let out = empty::<R, F>(&q, vec![b, h, s, d]);
            let lse = empty::<R, F>(&q, vec![b, h, s]);
            if b * h * s == 0 || d == 0 {
                return (out, lse);
            }
            let p = params::<R, F, I, BT>(&q, spec);
            let client = q.client.clone();
            let tile = tile_rows(d as u32);
            let width = vector_width(d, &[&q, &k, &v, &out]);
            // SAFETY: every tensor is contiguous with the shapes above (k, v `[b, kv, t, d]`,
            // mask `[b or 1, s, t]`, checked by the typed entry point's callers) and the
            // vectorised ones start on a vector boundary; rows at or past `s` (the last cube's
            // spare threads) read and write nothing.
            unsafe {
                forward_kernel::launch_unchecked::<F, R>(
                    &client,
                    CubeCount::Static(blocks(s), (b * h) as u32, 1),
                    CubeDim { x: ROWS, y: 1, z: 1 },
                    width,
                    q.into_tensor_arg(),
                    k.into_tensor_arg(),
                    v.into_tensor_arg(),
                    mask.into_tensor_arg(),
                    p.into_tensor_arg(),
                    out.clone().into_tensor_arg(),
                    lse.clone().into_tensor_arg(),
                    (d / width) as u32,
                    tile,
                    spec.softcap.is_some(),
                    spec.causal,
                );
            }
            (out, lse)
        }

        fn flash_attention_saved(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, mask: FloatTensor<Self>, spec: AttentionSpec) -> (FloatTensor<Self>, FloatTensor<Self>, Saved<Self>) {
            // Where both passes run on tensor cores, the backward reads the forward's packed
            // inputs and mask spans (and the f32 inputs are not kept).
            if tensor_cores_chosen::<R>(&q, &k, spec, false) && tensor_cores_chosen::<R>(&q, &k, spec, true) {
                let p = params::<R, F, I, BT>(&q, spec);
                let (out, lse, i) = crate::attention_mma::forward_inputs::<R, F>(q, k, v, mask, p, spec);
                let packed = Packed { rows: i.rows, q_dims: i.q_dims, k_dims: i.k_dims };
                return (out, lse, Saved { q: i.q, k: i.k, v: i.v, mask: i.mask, packed: Some(packed) });
            }
            let (out, lse) = Self::flash_attention(q.clone(), k.clone(), v.clone(), mask.clone(), spec);
            (out, lse, Saved { q, k, v, mask, packed: None })
        }

        fn flash_attention_bwd(dout: FloatTensor<Self>, saved: Saved<Self>, out: FloatTensor<Self>, lse: FloatTensor<Self>, spec: AttentionSpec) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            use burn::tensor::ops::FloatTensorOps;
            let Saved { q, k, v, mask, packed } = saved;
            if let Some(Packed { rows, q_dims, k_dims }) = packed {
                let p = params::<R, F, I, BT>(&q, spec);
                let inputs = crate::attention_mma::Inputs { q, k, v, mask, rows, q_dims, k_dims };
                return crate::attention_mma::backward_inputs::<R, F>(dout, inputs, out, lse, p, spec);
            }
            let [b, h, s, d] = q.meta.shape().dims::<4>();
            if tensor_cores_chosen::<R>(&q, &k, spec, true) {
                let p = params::<R, F, I, BT>(&q, spec);
                return crate::attention_mma::backward::<R, F>(dout, q, k, v, mask, out, lse, p, spec);
            }
            // δ = rowsum(dO ∘ O) `[b, h, s]`: one elementwise product and a row sum.
            let prod = Self::float_mul(as_float::<R, F>(dout.clone()), as_float::<R, F>(out));
            let delta = contiguous_float::<R, F>(Self::float_reshape(Self::float_sum_dim(prod, 3), Shape::new([b, h, s])));
            if let Some(limit) = products::chosen::<R>(&q, &k) {
                return products::backward::<R, F, I, BT>(dout, q, k, v, mask, lse, delta, spec, limit);
            }
            let (dout, q, k, v, mask, lse) = (contiguous_float::<R, F>(dout), contiguous_float::<R, F>(q), contiguous_float::<R, F>(k), contiguous_float::<R, F>(v), contiguous_float::<R, F>(mask), contiguous_float::<R, F>(lse));
            let [_, kvh, t, _] = k.meta.shape().dims::<4>();
            let dq = empty::<R, F>(&q, vec![b, h, s, d]);
            if b * h * s * t == 0 || d == 0 {
                return (dq, empty::<R, F>(&q, vec![b, kvh, t, d]), empty::<R, F>(&q, vec![b, kvh, t, d]));
            }
            let splits = dkv_splits(b, kvh, h / kvh, s, t, d, tile_rows(d as u32) as usize);
            let dk = empty::<R, F>(&q, vec![splits, b, kvh, t, d]);
            let dv = empty::<R, F>(&q, vec![splits, b, kvh, t, d]);
            let p = params::<R, F, I, BT>(&q, spec);
            let client = q.client.clone();
            let tile = tile_rows(d as u32);
            let softcap = spec.softcap.is_some();
            let width = vector_width(d, &[&dout, &q, &k, &v, &dq, &dk, &dv]);
            let dvec = (d / width) as u32;
            // SAFETY: as in the forward; `lse`, `delta` `[b, h, s]`; key rows at or past `t`
            // (the last cube's spare threads) read and write nothing.
            unsafe {
                dq_kernel::launch_unchecked::<F, R>(
                    &client,
                    CubeCount::Static(blocks(s), (b * h) as u32, 1),
                    CubeDim { x: ROWS, y: 1, z: 1 },
                    width,
                    dout.clone().into_tensor_arg(),
                    q.clone().into_tensor_arg(),
                    k.clone().into_tensor_arg(),
                    v.clone().into_tensor_arg(),
                    mask.clone().into_tensor_arg(),
                    lse.clone().into_tensor_arg(),
                    delta.clone().into_tensor_arg(),
                    p.clone().into_tensor_arg(),
                    dq.clone().into_tensor_arg(),
                    dvec,
                    tile,
                    softcap,
                    spec.causal,
                );
                dkv_kernel::launch_unchecked::<F, R>(
                    &client,
                    CubeCount::Static(blocks(t), (b * kvh) as u32, splits as u32),
                    CubeDim { x: ROWS, y: 1, z: 1 },
                    width,
                    dout.into_tensor_arg(),
                    q.into_tensor_arg(),
                    k.into_tensor_arg(),
                    v.into_tensor_arg(),
                    mask.into_tensor_arg(),
                    lse.into_tensor_arg(),
                    delta.into_tensor_arg(),
                    p.into_tensor_arg(),
                    dk.clone().into_tensor_arg(),
                    dv.clone().into_tensor_arg(),
                    dvec,
                    tile,
                    softcap,
                    spec.causal,
                );
            }
            let total = |x: CubeTensor<R>| match splits {
                1 => Self::float_reshape(x, Shape::new([b, kvh, t, d])),
                _ => Self::float_reshape(Self::float_sum_dim(x, 0), Shape::new([b, kvh, t, d])),
            };
            (dq, total(dk), total(dv))
        }
    }

    /// Attention as dense products (cuBLAS's tensor cores on CUDA) with the softmax and its
    /// gradient as row kernels between them. The kernels above do each score's arithmetic on
    /// f32 FMA units; at training shapes (a thousand keys, head size 64) products on tensor cores
    /// are several times faster. A causal square goes in chunks of queries, each multiplied
    /// with only the keys it sees ([`score_chunks`](super::score_chunks)), so the products skip
    /// most of its masked half. The price is the scores of one chunk in memory at once
    /// ([`SCORE_BUDGET`](super::SCORE_BUDGET)), recomputed in backward as the kernels recompute theirs.
    ///
    /// Grouped heads fold into rows: `q` `[b, h, s, d]` is `[b·kv, s·g, d]`, query-major, so
    /// `dK` and `dV` come out summed over each group by the products.
    pub(crate) mod products {
        use burn::tensor::ops::FloatTensorOps;
        use burn::tensor::{DType, Shape};
        use burn_cubecl::kernel::into_contiguous;
        use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
        use burn_cubecl::tensor::CubeTensor;
        use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
        use cubecl::prelude::*;
        use cubecl::{cube, CubeDim};

        use super::{empty, params, AttentionSpec, MASKED, UNSEEN};
        // `flat_count` of `n · FLAT_THREADS` threads is `n` cubes.
        use crate::cube::{capped, contiguous_float, cublas_ready, flat_count, gemm, gemm_rows, launch_typed, view, FLAT_THREADS};

        /// Threads per score row (one plane on CUDA) and score rows per cube. A row is short
        /// work (its keys once or twice over), so rows are kept many and narrow: with one row
        /// of 128 threads per cube, time went with the number of rows, not their length
        /// (bench/RESULTS.md).
        const LANES: u32 = 32;
        const LOG_LANES: u32 = 5;
        const ROWS: u32 = 8;

        /// Where one score row lives. The scores of a chunk of queries `r0..` are `z`
        /// `[c·kv, rows, e]`, a row per (query, group head) pair, query-major (see [`forward`]),
        /// over the first `e` keys; the mask is `[c or 1, s, t]`, the rows' statistics `[c, h, s]`.
        /// Keys from `end` on are masked without reading the mask: the causal part (`e` when
        /// the spec is not causal). A row past the last (the last cube's spare threads) has
        /// no keys and is not `valid`.
        #[derive(CubeType)]
        struct ScoreRow {
            base: usize,
            mbase: usize,
            stat: usize,
            e: usize,
            end: usize,
            valid: bool,
        }

        /// This thread's row, on [`flat_count`]'s grid of cubes of `ROWS` rows.
        #[cube]
        fn score_row<F: Float>(z: &Tensor<F>, mask: &Tensor<F>, stats: &Tensor<F>, r0: usize, #[comptime] causal: bool) -> ScoreRow {
            let row = (CUBE_POS_Y as usize * CUBE_COUNT_X as usize + CUBE_POS_X as usize) * ROWS as usize + UNIT_POS_Y as usize;
            let (rows, e) = (z.shape(1), z.shape(2));
            let (h, s, t) = (stats.shape(1), mask.shape(1), mask.shape(2));
            let kv = z.shape(0) / stats.shape(0);
            let g = h / kv;
            let valid = row < z.shape(0) * rows;
            let (matrix, local) = (row / rows, row % rows);
            let query = r0 + local / g;
            let mut mb = matrix / kv;
            if mask.shape(0) == 1 {
                mb = 0;
            }
            let mut end = e;
            if causal {
                // Query `i` of the last `s` positions sees keys up to `i + t − s`.
                let last = query + (t - s) + 1;
                if last < end {
                    end = last;
                }
            }
            let mut width = e;
            if !valid {
                end = 0;
                width = 0;
            }
            ScoreRow { base: row * e, mbase: mb * s * t + query * t, stat: (matrix * g + local % g) * s + query, e: width, end, valid }
        }

        /// The max (or sum) of `x` over the `LANES` threads of this thread's row, for each of
        /// them: one plane operation where a plane is exactly a row (`plane`), else a tree in
        /// `partial` (`LANES · ROWS`), with every thread of the cube at each step.
        #[cube]
        fn row_reduce<F: Float>(x: F, partial: &mut SharedMemory<F>, #[comptime] max: bool, #[comptime] plane: bool) -> F {
            if plane {
                if max { plane_max(x) } else { plane_sum(x) }
            } else {
                let lane = UNIT_POS_X as usize;
                let slot = UNIT_POS_Y as usize * LANES as usize;
                partial[slot + lane] = x;
                sync_cube();
                #[unroll]
                for step in 0..LOG_LANES {
                    let stride = ((LANES / 2) >> step) as usize;
                    if lane < stride {
                        let other = partial[slot + lane + stride];
                        if max {
                            if other > partial[slot + lane] {
                                partial[slot + lane] = other;
                            }
                        } else {
                            partial[slot + lane] += other;
                        }
                    }
                    sync_cube();
                }
                let out = partial[slot];
                sync_cube();
                out
            }
        }

        /// `LANES` threads per row of scores `z = scale·q·k` (see [`ScoreRow`]): the row's log-sum-exp
        /// of `cap(z) + mask` and `p = exp(cap(z) + mask − lse)` (0 where masked; a row with
        /// every key masked gets [`UNSEEN`], as the flash kernels give it). `params` = [scale, softcap].
        #[cube(launch_unchecked)]
        #[allow(clippy::too_many_arguments)]
        fn softmax_kernel<F: Float, G: Float>(z: &Tensor<F>, mask: &Tensor<F>, params: &Tensor<F>, p: &mut Tensor<G>, lse: &mut Tensor<F>, r0: usize, #[comptime] softcap: bool, #[comptime] causal: bool, #[comptime] plane: bool) {
            let lane = UNIT_POS_X as usize;
            let ScoreRow { base, mbase, stat, e, end, valid } = score_row::<F>(z, mask, lse, r0, causal);
            if plane && !valid {
                // A whole plane is one row: no other row waits on these threads.
                terminate!();
            }
            let cap = params[1];
            let mut partial = SharedMemory::<F>::new((LANES * ROWS) as usize);
            let mut top = F::new(MASKED);
            let mut j = lane;
            while j < end {
                let mv = mask[mbase + j];
                if mv > F::new(MASKED) {
                    let x = capped::<F>(z[base + j], cap, softcap) + mv;
                    if x > top {
                        top = x;
                    }
                }
                j += LANES as usize;
            }
            let row_max = row_reduce::<F>(top, &mut partial, true, plane);
            let mut sum = F::new(0.0);
            j = lane;
            while j < end {
                let mv = mask[mbase + j];
                if mv > F::new(MASKED) {
                    sum += F::exp(capped::<F>(z[base + j], cap, softcap) + mv - row_max);
                }
                j += LANES as usize;
            }
            let total = row_reduce::<F>(sum, &mut partial, false, plane);
            let mut row_lse = F::new(UNSEEN);
            if total > F::new(0.0) {
                row_lse = row_max + F::ln(total);
            }
            j = lane;
            while j < end {
                let mv = mask[mbase + j];
                let mut pv = F::new(0.0);
                if mv > F::new(MASKED) {
                    pv = F::exp(capped::<F>(z[base + j], cap, softcap) + mv - row_lse);
                }
                p[base + j] = G::cast_from(pv);
                j += LANES as usize;
            }
            while j < e {
                p[base + j] = G::new(0.0);
                j += LANES as usize;
            }
            if lane == 0 && valid {
                lse[stat] = row_lse;
            }
        }

        /// `LANES` threads per row: `p = exp(cap(z) + mask − lse)` again and
        /// `dX = p·(dP − δ)·(1 − (cap(z)/c)²)·scale` (without the softcap factor when there is
        /// none), both 0 where masked. `lse`, `delta` `[c, h, s]`; `params` = [scale, softcap].
        #[cube(launch_unchecked)]
        #[allow(clippy::too_many_arguments)]
        fn grad_kernel<F: Float, G: Float>(z: &Tensor<F>, dp: &Tensor<F>, mask: &Tensor<F>, lse: &Tensor<F>, delta: &Tensor<F>, params: &Tensor<F>, p: &mut Tensor<G>, dx: &mut Tensor<G>, r0: usize, #[comptime] softcap: bool, #[comptime] causal: bool) {
            let lane = UNIT_POS_X as usize;
            let ScoreRow { base, mbase, stat, e, end, valid } = score_row::<F>(z, mask, lse, r0, causal);
            if !valid {
                terminate!();
            }
            let scale = params[0];
            let cap = params[1];
            let row_lse = lse[stat];
            let row_delta = delta[stat];
            let mut j = lane;
            while j < end {
                let mv = mask[mbase + j];
                let mut pv = F::new(0.0);
                let mut dxv = F::new(0.0);
                if mv > F::new(MASKED) {
                    let x = capped::<F>(z[base + j], cap, softcap);
                    pv = F::exp(x + mv - row_lse);
                    dxv = pv * (dp[base + j] - row_delta) * scale;
                    if softcap {
                        let r = x / cap;
                        dxv *= F::new(1.0) - r * r;
                    }
                }
                p[base + j] = G::cast_from(pv);
                dx[base + j] = G::cast_from(dxv);
                j += LANES as usize;
            }
            while j < e {
                p[base + j] = G::new(0.0);
                dx[base + j] = G::new(0.0);
                j += LANES as usize;
            }
        }

        /// Whether a plane of `R`'s device is exactly one score row's `LANES` threads and
        /// plane operations run there (CUDA; not lavapipe, whose wgpu reports none).
        fn rows_are_planes<R: CubeRuntime>(client: &cubecl::prelude::ComputeClient<R>) -> bool {
            let props = client.properties();
            client.features().plane.contains(cubecl::features::Plane::Ops) && props.hardware.plane_size_min == LANES && props.hardware.plane_size_max == LANES
        }

        /// The launch grid for `rows` score rows.
        fn row_cubes(rows: usize) -> CubeCount {
            flat_count(rows.div_ceil(ROWS as usize) * FLAT_THREADS as usize)
        }

        /// Whether to run the products, and then at most how many batch rows per chunk (see
        /// [`AttentionPath`](super::super::AttentionPath)).
        pub(crate) fn chosen<R: CubeRuntime>(q: &CubeTensor<R>, k: &CubeTensor<R>) -> Option<usize> {
            use super::super::{AttentionPath, PATH};
            if q.meta.shape().num_elements() == 0 || k.meta.shape().num_elements() == 0 {
                return None;
            }
            let [_, h, s, _] = q.meta.shape().dims::<4>();
            let g = h / k.meta.shape()[1].max(1);
            match PATH.load(std::sync::atomic::Ordering::Relaxed) {
                p if p == AttentionPath::Kernels as u8 => None,
                p if p == AttentionPath::Products as u8 => Some(1),
                _ => (cublas_ready::<R>() && g * s >= super::super::PRODUCT_ROWS && std::env::var_os("KILN_ATTENTION_KERNELS").is_none()).then_some(usize::MAX),
            }
        }

        /// `(batch rows, query rows)` per chunk: [`score_chunks`](super::super::score_chunks),
        /// at most `limit` batch rows. The checks ([`AttentionPath::Products`](super::super::AttentionPath))
        /// take 16 causal query rows, so their small cases run several chunks, the last one short.
        fn chunks(b: usize, h: usize, s: usize, t: usize, causal: bool, limit: usize) -> (usize, usize) {
            use super::super::{AttentionPath, PATH};
            let (rows, queries) = super::super::score_chunks(b, h, s, t, causal);
            let forced = PATH.load(std::sync::atomic::Ordering::Relaxed) == AttentionPath::Products as u8;
            (rows.min(limit), if forced && causal { queries.min(16) } else { queries })
        }

        /// `alpha · lhs·rhs` in f32 (cuBLAS where it applies).
        fn product<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(lhs: &CubeTensor<R>, rhs: &CubeTensor<R>, alpha: f32) -> CubeTensor<R> {
            gemm::<R, F, I, BT>(lhs.clone(), rhs.clone(), alpha as f64, None)
        }

        /// [`product`] written over the start of `buffer` where cuBLAS can (see
        /// [`gemm_over`](crate::cublas::gemm_over)), else in a new tensor.
        fn product_over<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(lhs: &CubeTensor<R>, rhs: &CubeTensor<R>, alpha: f32, buffer: &Option<CubeTensor<R>>, shape: [usize; 3]) -> CubeTensor<R> {
            #[cfg(feature = "cuda")]
            if let Some(y) = buffer.as_ref().and_then(|buf| crate::cublas::gemm_over(lhs, rhs, alpha, buf, shape)) {
                return y;
            }
            let _ = (buffer, shape);
            product::<R, F, I, BT>(lhs, rhs, alpha)
        }

        /// Per-chunk score tensors as views of one allocation each, sized for the largest
        /// chunk: chunks of many sizes would each keep their own block of the memory pool.
        struct ChunkBuffers<R: CubeRuntime> {
            /// f32, for the score products (cuBLAS only).
            f32s: Vec<Option<CubeTensor<R>>>,
            /// In the operand dtype, for the row kernels' outputs.
            halves: Vec<CubeTensor<R>>,
        }

        impl<R: CubeRuntime> ChunkBuffers<R> {
            fn new<F: FloatElement>(like: &CubeTensor<R>, elements: usize, dt: DType, f32s: usize, halves: usize) -> Self {
                let alloc = |dtype| empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), Shape::new([elements]), dtype);
                let cublas = cublas_ready::<R>();
                ChunkBuffers { f32s: (0..f32s).map(|_| cublas.then(|| alloc(F::dtype()))).collect(), halves: (0..halves).map(|_| alloc(dt)).collect() }
            }

            /// The `i`th half buffer seen as a contiguous `shape`.
            fn half(&self, i: usize, shape: [usize; 3]) -> CubeTensor<R> {
                view(&self.halves[i], shape.to_vec(), vec![shape[1] * shape[2], shape[2], 1])
            }
        }

        /// The most score elements of one query chunk, over the chunks of `s` queries.
        fn largest_chunk(ckv: usize, g: usize, s: usize, t: usize, qchunk: usize, causal: bool) -> usize {
            (0..s).step_by(qchunk).map(|r0| {
                let r1 = (r0 + qchunk).min(s);
                ckv * (r1 - r0) * g * key_end(r1, s, t, causal)
            }).max().unwrap_or(0)
        }

        fn slice<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(x: &CubeTensor<R>, dim: usize, range: std::ops::Range<usize>) -> CubeTensor<R> {
            let ranges: Vec<burn::tensor::Slice> = x.meta.shape().iter().enumerate().map(|(i, &n)| burn::tensor::Slice::from(if i == dim { range.clone() } else { 0..n })).collect();
            CubeBackend::<R, F, I, BT>::float_slice(x.clone(), &ranges)
        }

        fn transposed<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(x: CubeTensor<R>) -> CubeTensor<R> {
            CubeBackend::<R, F, I, BT>::float_swap_dims(x, 1, 2)
        }

        fn cat<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(mut parts: Vec<CubeTensor<R>>) -> CubeTensor<R> {
            match parts.len() {
                1 => parts.remove(0),
                _ => CubeBackend::<R, F, I, BT>::float_cat(parts, 0),
            }
        }

        /// The products' operand dtype: bf16 when the spec asks for it, else the queries' half
        /// type, else the backend's float.
        fn operand_dtype<F: FloatElement>(q: &CubeTensor<impl CubeRuntime>, spec: AttentionSpec) -> DType {
            match q.dtype {
                _ if spec.bf16_products => DType::BF16,
                DType::BF16 | DType::F16 => q.dtype,
                _ => F::dtype(),
            }
        }

        fn as_dtype<R: CubeRuntime>(x: CubeTensor<R>, dtype: DType) -> CubeTensor<R> {
            into_contiguous(crate::cube::as_dtype(x, dtype))
        }

        /// Batch rows `b0..b0 + c` of queries (or their gradient) `[b, h, s, d]`, in any layout,
        /// as `[c·kv, s·g, d]` in `dt`, query-major: row `i·g + j` is query `i` of the group's
        /// head `j`. Then a chunk of queries is a block of rows that the products read in
        /// place. One pass: the cast (or copy) reads `x` through its strides.
        fn query_major<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(x: &CubeTensor<R>, b0: usize, c: usize, kvh: usize, dt: DType) -> CubeTensor<R> {
            let [b, h, s, d] = x.meta.shape().dims::<4>();
            let st = x.meta.strides().to_vec();
            let g = h / kvh;
            let x = view(x, vec![b, kvh, s, g, d], vec![st[0], g * st[1], st[2], st[1], st[3]]);
            CubeBackend::<R, F, I, BT>::float_reshape(as_dtype(slice::<R, F, I, BT>(&x, 0, b0..b0 + c), dt), Shape::new([c * kvh, s * g, d]))
        }

        /// [`query_major`]'s inverse: `[c·kv, s·g, d]` back to `[c, h, s, d]`, laid out as `[c,
        /// s, h, d]` in memory: the decoder's next step (`[b, s, h·d]` for the output
        /// projection) and rope's backward (dQ) read that order without another copy.
        fn head_major<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(x: CubeTensor<R>, c: usize, h: usize) -> CubeTensor<R> {
            type B<R, F, I, BT> = CubeBackend<R, F, I, BT>;
            let [ckv, sg, d] = x.meta.shape().dims::<3>();
            let (kvh, g) = (ckv / c, h / (ckv / c));
            let s = sg / g;
            let x = B::<R, F, I, BT>::float_swap_dims(B::<R, F, I, BT>::float_reshape(x, Shape::new([c, kvh, s, g, d])), 1, 2); // [c, s, kv, g, d]
            view(&into_contiguous(x), vec![c, h, s, d], vec![s * h * d, d, h * d, 1])
        }

        /// Batch rows `b0..b0 + c` of a `[b, ..]` tensor, contiguous, reshaped to `shape`.
        fn rows<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(x: &CubeTensor<R>, b0: usize, c: usize, shape: Vec<usize>) -> CubeTensor<R> {
            CubeBackend::<R, F, I, BT>::float_reshape(into_contiguous(slice::<R, F, I, BT>(x, 0, b0..b0 + c)), Shape::from(shape))
        }

        /// The keys a chunk of queries `r0..r1` may see: all `t`, or with a causal spec those
        /// up to the last query's own position.
        fn key_end(r1: usize, s: usize, t: usize, causal: bool) -> usize {
            if causal { (r1 + t).saturating_sub(s).clamp(1, t) } else { t }
        }

        /// `(out, lse)` as [`FlashAttention::flash_attention`](super::super::FlashAttention)
        /// defines them, in chunks of at most `limit` batch rows and of [`query_chunk`] queries.
        pub(crate) fn forward<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(q: CubeTensor<R>, k: CubeTensor<R>, v: CubeTensor<R>, mask: CubeTensor<R>, spec: AttentionSpec, limit: usize) -> (CubeTensor<R>, CubeTensor<R>) {
            let [b, h, s, d] = q.meta.shape().dims::<4>();
            let [_, kvh, t, _] = k.meta.shape().dims::<4>();
            let g = h / kvh;
            let dt = operand_dtype::<F>(&q, spec);
            let (k, v) = (as_dtype(k, dt), as_dtype(v, dt));
            let mask = contiguous_float::<R, F>(mask);
            let p = params::<R, F, I, BT>(&q, spec);
            let (chunk, qchunk) = chunks(b, h, s, t, spec.causal, limit);
            let (mut outs, mut lses) = (Vec::new(), Vec::new());
            for b0 in (0..b).step_by(chunk) {
                let c = chunk.min(b - b0);
                let qc = query_major::<R, F, I, BT>(&q, b0, c, kvh, dt); // [c·kv, s·g, d]
                let kc = rows::<R, F, I, BT>(&k, b0, c, vec![c * kvh, t, d]);
                let vc = rows::<R, F, I, BT>(&v, b0, c, vec![c * kvh, t, d]);
                let mc = if mask.meta.shape()[0] == 1 { mask.clone() } else { rows::<R, F, I, BT>(&mask, b0, c, vec![c, s, t]) };
                let lse = empty::<R, F>(&q, vec![c, h, s]);
                let mut out = empty::<R, F>(&q, vec![c * kvh, s * g, d]);
                let buffers = ChunkBuffers::new::<F>(&q, largest_chunk(c * kvh, g, s, t, qchunk, spec.causal), dt, 1, 1);
                // The last chunk first: it sees every key, so its product writes all of `out`'s
                // rows it owns and the earlier chunks never read past theirs.
                for r0 in (0..s).step_by(qchunk).rev() {
                    let r1 = (r0 + qchunk).min(s);
                    let e = key_end(r1, s, t, spec.causal);
                    let qr = slice::<R, F, I, BT>(&qc, 1, r0 * g..r1 * g);
                    let shape = [c * kvh, (r1 - r0) * g, e];
                    let z = product_over::<R, F, I, BT>(&qr, &transposed::<R, F, I, BT>(slice::<R, F, I, BT>(&kc, 1, 0..e)), spec.scale as f32, &buffers.f32s[0], shape);
                    let probs = buffers.half(0, shape);
                    let client = q.client.clone();
                    // SAFETY: `z` and `probs` are contiguous `[c·kv, (r1 − r0)·g, e]`, the mask
                    // `[c or 1, s, t]` and `lse` `[c, h, s]` contiguous, `e ≤ t`, `r1 ≤ s`; `ROWS`
                    // rows of `LANES` threads per cube, spare rows touch nothing.
                    launch_typed!(softmax_kernel, dt, F, R, &client, row_cubes(c * h * (r1 - r0)), CubeDim { x: LANES, y: ROWS, z: 1 }, z.into_tensor_arg(), mc.clone().into_tensor_arg(), p.clone().into_tensor_arg(), probs.clone().into_tensor_arg(), lse.clone().into_tensor_arg(), r0, spec.softcap.is_some(), spec.causal, rows_are_planes(&client));
                    out = gemm_rows::<R, F, I, BT>(probs, slice::<R, F, I, BT>(&vc, 1, 0..e), 1.0, out, r0 * g..r1 * g, false);
                }
                outs.push(head_major::<R, F, I, BT>(out, c, h));
                lses.push(lse);
            }
            (cat::<R, F, I, BT>(outs), cat::<R, F, I, BT>(lses))
        }

        /// `(dq, dk, dv)` as [`FlashAttention::flash_attention_bwd`](super::super::FlashAttention)
        /// defines them; `delta` `[b, h, s]` = rowsum(dO ∘ O). Chunked as the forward: chunk
        /// `r0..r1` adds its share into the first `e` rows of `dK` and `dV`, the last chunk
        /// (every key) first, so it writes them whole.
        #[allow(clippy::too_many_arguments)]
        pub(crate) fn backward<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(dout: CubeTensor<R>, q: CubeTensor<R>, k: CubeTensor<R>, v: CubeTensor<R>, mask: CubeTensor<R>, lse: CubeTensor<R>, delta: CubeTensor<R>, spec: AttentionSpec, limit: usize) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
            let [b, h, s, d] = q.meta.shape().dims::<4>();
            let [_, kvh, t, _] = k.meta.shape().dims::<4>();
            let g = h / kvh;
            let dt = operand_dtype::<F>(&q, spec);
            let (k, v) = (as_dtype(k, dt), as_dtype(v, dt));
            let (mask, lse, delta) = (contiguous_float::<R, F>(mask), contiguous_float::<R, F>(lse), contiguous_float::<R, F>(delta));
            let p = params::<R, F, I, BT>(&q, spec);
            let (chunk, qchunk) = chunks(b, h, s, t, spec.causal, limit);
            let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
            for b0 in (0..b).step_by(chunk) {
                let c = chunk.min(b - b0);
                let qc = query_major::<R, F, I, BT>(&q, b0, c, kvh, dt);
                let doc = query_major::<R, F, I, BT>(&dout, b0, c, kvh, dt);
                let kc = rows::<R, F, I, BT>(&k, b0, c, vec![c * kvh, t, d]);
                let vc = rows::<R, F, I, BT>(&v, b0, c, vec![c * kvh, t, d]);
                let mc = if mask.meta.shape()[0] == 1 { mask.clone() } else { rows::<R, F, I, BT>(&mask, b0, c, vec![c, s, t]) };
                let lc = rows::<R, F, I, BT>(&lse, b0, c, vec![c, h, s]);
                let dc = rows::<R, F, I, BT>(&delta, b0, c, vec![c, h, s]);
                let (mut dq, mut dk, mut dv) = (empty::<R, F>(&q, vec![c * kvh, s * g, d]), empty::<R, F>(&q, vec![c * kvh, t, d]), empty::<R, F>(&q, vec![c * kvh, t, d]));
                let buffers = ChunkBuffers::new::<F>(&q, largest_chunk(c * kvh, g, s, t, qchunk, spec.causal), dt, 2, 2);
                let mut first = true;
                for r0 in (0..s).step_by(qchunk).rev() {
                    let r1 = (r0 + qchunk).min(s);
                    let e = key_end(r1, s, t, spec.causal);
                    // Without a causal spec every chunk sees all `t` keys; with one, the last
                    // chunk does (`e = t`), and it runs first.
                    let accumulate = !first;
                    first = false;
                    let (qr, dor) = (slice::<R, F, I, BT>(&qc, 1, r0 * g..r1 * g), slice::<R, F, I, BT>(&doc, 1, r0 * g..r1 * g));
                    let (ke, ve) = (slice::<R, F, I, BT>(&kc, 1, 0..e), slice::<R, F, I, BT>(&vc, 1, 0..e));
                    let shape = [c * kvh, (r1 - r0) * g, e];
                    let z = product_over::<R, F, I, BT>(&qr, &transposed::<R, F, I, BT>(ke.clone()), spec.scale as f32, &buffers.f32s[0], shape);
                    let dp = product_over::<R, F, I, BT>(&dor, &transposed::<R, F, I, BT>(ve), 1.0, &buffers.f32s[1], shape);
                    let (probs, dx) = (buffers.half(0, shape), buffers.half(1, shape));
                    let client = q.client.clone();
                    // SAFETY: as in the forward; `dp` has the scores' shape, `lse` and `delta`
                    // are `[c, h, s]`.
                    launch_typed!(grad_kernel, dt, F, R, &client, row_cubes(c * h * (r1 - r0)), CubeDim { x: LANES, y: ROWS, z: 1 }, z.into_tensor_arg(), dp.into_tensor_arg(), mc.clone().into_tensor_arg(), lc.clone().into_tensor_arg(), dc.clone().into_tensor_arg(), p.clone().into_tensor_arg(), probs.clone().into_tensor_arg(), dx.clone().into_tensor_arg(), r0, spec.softcap.is_some(), spec.causal);
                    dv = gemm_rows::<R, F, I, BT>(transposed::<R, F, I, BT>(probs), dor.clone(), 1.0, dv, 0..e, accumulate);
                    dk = gemm_rows::<R, F, I, BT>(transposed::<R, F, I, BT>(dx.clone()), qr, 1.0, dk, 0..e, accumulate);
                    dq = gemm_rows::<R, F, I, BT>(dx, ke, 1.0, dq, r0 * g..r1 * g, false);
                }
                dqs.push(head_major::<R, F, I, BT>(dq, c, h));
                dks.push(CubeBackend::<R, F, I, BT>::float_reshape(dk, Shape::new([c, kvh, t, d])));
                dvs.push(CubeBackend::<R, F, I, BT>::float_reshape(dv, Shape::new([c, kvh, t, d])));
            }
            (cat::<R, F, I, BT>(dqs), cat::<R, F, I, BT>(dks), cat::<R, F, I, BT>(dvs))
        }
    }
}
