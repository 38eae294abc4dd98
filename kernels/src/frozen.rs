//! Products with a frozen weight held in a narrower dtype than the activations (bf16 under
//! `run.dtype = "bf16"`), returning f32.
//!
//! As tensor operations the product is `cast(cast(x, bf16) · W, f32)`: four passes of casting
//! per projection, forward and backward (the input, the output, and in backward the output's
//! gradient and the input's). The matmul kernels accumulate in f32 anyway, so this operation
//! asks them for an f32 result directly: forward and backward each cast only what enters the
//! tensor cores. The weight is frozen: the backward gives `dx = dy · Wᵀ` and nothing else, and
//! keeps only the weight (which the model holds anyway).
//!
//! With an adapter beside it ([`FrozenMatmul::frozen_lora`]), the autodiff op casts `x` to a
//! half weight's dtype once for both products and keeps that copy for backward (half the bytes),
//! and casts the upstream gradient once for backward's three products: the adapter multiplies in
//! bf16 with f32 results, as PEFT's does under PyTorch's autocast.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{backend::Backend, DType, FloatDType, Tensor, TensorMetadata};

use crate::{as_rows, float, from_rows, take_grad};

/// Backend extension: `x [m, k] · W [k, n] -> [m, n]` in f32, multiplied in `W`'s dtype.
/// The default methods are the composition, [`matmul_as`] (the reference).
pub trait FrozenMatmul: Backend {
    /// `y = cast(x, W's dtype) · W`, in f32.
    fn frozen_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let w = float::<Self, 2>(w);
        let dtype = FloatDType::from(w.dtype());
        matmul_as(float::<Self, 2>(x), w, dtype).into_primitive().tensor()
    }

    /// [`FrozenMatmul::frozen_matmul`] written in `out` (f32 or `W`'s dtype).
    fn frozen_matmul_as(x: FloatTensor<Self>, w: FloatTensor<Self>, out: FloatDType) -> FloatTensor<Self> {
        float::<Self, 2>(Self::frozen_matmul(x, w)).cast(out).into_primitive().tensor()
    }

    /// `dx = cast(dy, W's dtype) · Wᵀ`, in f32.
    fn frozen_matmul_dx(dy: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let w = float::<Self, 2>(w);
        let dtype = FloatDType::from(w.dtype());
        matmul_as(float::<Self, 2>(dy), w.transpose(), dtype).into_primitive().tensor()
    }

    /// A LoRA adapter beside the frozen product, as one operation: `(y, h)` with `h = x·A`
    /// `[m, r]` in f32 and `y = x·W + scale · h·B` `[.., n]` written in `out` (`x·W` as
    /// [`FrozenMatmul::frozen_matmul`] multiplies it), for `x` `[.., k]` of any rank (its `m`
    /// rows multiplied as one matrix). `A` `[k, r]` and `B` `[r, n]` are the adapter's f32
    /// matrices; `h` is what backward keeps besides the inputs. `x` may be f32 or in `W`'s half
    /// type.
    fn frozen_lora(x: FloatTensor<Self>, w: FloatTensor<Self>, a: FloatTensor<Self>, b: FloatTensor<Self>, scale: f64, out: FloatDType) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (x, dims) = as_rows::<Self>(x);
        let (y, h) = lora_composition::<Self>(x, w, a, b, scale);
        (from_rows::<Self>(float::<Self, 2>(y).cast(out).into_primitive().tensor(), dims), h)
    }

    /// An adapter matrix (`A` or `B`, f32) in the dtype [`FrozenMatmul::frozen_lora`] and its
    /// backward multiply it in, for an input in `x_dtype`: cast once, in the forward, and kept for
    /// backward rather than cast again before each of its products. The composition keeps f32.
    fn lora_operand(t: FloatTensor<Self>, x_dtype: DType) -> FloatTensor<Self> {
        let _ = x_dtype;
        t
    }

    /// The gradients of [`FrozenMatmul::frozen_lora`] for the upstream gradient `dy` `[m, n]`,
    /// all but `dA`: with `g = scale · dy·Bᵀ`, `(dx, g, dB)`, `dx = acc + dy·Wᵀ + g·Aᵀ` (only if
    /// `need_dx`) and `dB = scale · hᵀ·dy` in f32 (`dy` may be in `W`'s half type, as `y` was
    /// written), `dx` written in `dx_dtype` (f32, or `dy`'s half type for a reader that takes it
    /// so), `g` in the dtype [`FrozenMatmul::lora_da`] multiplies it in. `acc` `[m, k]` is the
    /// input's gradient so far (from the other products that read it), added into in place where
    /// the products allow. None of it reads the input: one that is cheaper to recompute than to
    /// keep (the gated MLP's `act(gate) · up`) is formed after `dx`, by the kernel that reads `dx`.
    #[allow(clippy::too_many_arguments)]
    fn frozen_lora_bwd_dx(
        dy: FloatTensor<Self>,
        w: FloatTensor<Self>,
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        h: FloatTensor<Self>,
        scale: f64,
        need_dx: bool,
        dx_dtype: FloatDType,
        acc: Option<FloatTensor<Self>>,
    ) -> (Option<FloatTensor<Self>>, FloatTensor<Self>, FloatTensor<Self>) {
        let (dx, g, db) = lora_bwd_composition::<Self>(dy, w, a, b, h, scale, need_dx);
        let dx = dx.map(|dx| float::<Self, 2>(dx).cast(dx_dtype));
        (dx.map(|dx| with_acc::<Self>(dx, acc).into_primitive().tensor()), g, db)
    }

    /// `dA = xᵀ·g` for the input's rows `x` `[m, k]` and `g` `[m, r]` of
    /// [`FrozenMatmul::frozen_lora_bwd_dx`], in f32.
    fn lora_da(x: FloatTensor<Self>, g: FloatTensor<Self>) -> FloatTensor<Self> {
        t_matmul(float::<Self, 2>(x).cast(FloatDType::F32), float(g)).into_primitive().tensor()
    }
}

/// [`FrozenMatmul::frozen_lora`] as tensor operations (its default, and its reference).
pub(crate) fn lora_composition<B: FrozenMatmul>(x: FloatTensor<B>, w: FloatTensor<B>, a: FloatTensor<B>, b: FloatTensor<B>, scale: f64) -> (FloatTensor<B>, FloatTensor<B>) {
    let x = float::<B, 2>(x).cast(FloatDType::F32).into_primitive().tensor();
    let y = float::<B, 2>(B::frozen_matmul(x.clone(), w));
    let h = float::<B, 2>(x).matmul(float(a));
    let y = y + h.clone().mul_scalar(scale).matmul(float(b));
    (y.into_primitive().tensor(), h.into_primitive().tensor())
}

/// [`FrozenMatmul::frozen_lora_bwd_dx`] as tensor operations: `(dx, g, dB)` in f32.
pub(crate) fn lora_bwd_composition<B: FrozenMatmul>(
    dy: FloatTensor<B>,
    w: FloatTensor<B>,
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    h: FloatTensor<B>,
    scale: f64,
    need_dx: bool,
) -> (Option<FloatTensor<B>>, FloatTensor<B>, FloatTensor<B>) {
    let dy = float::<B, 2>(dy).cast(FloatDType::F32);
    let g = dy.clone().matmul(float::<B, 2>(b).transpose()).mul_scalar(scale); // [m, r]
    let dx = need_dx.then(|| (float::<B, 2>(B::frozen_matmul_dx(dy.clone().into_primitive().tensor(), w)) + g.clone().matmul(float::<B, 2>(a).transpose())).into_primitive().tensor());
    let db = t_matmul(float::<B, 2>(h).mul_scalar(scale), dy);
    (dx, g.into_primitive().tensor(), db.into_primitive().tensor())
}

/// Rows per slice in [`t_matmul`]: enough for each partial product to stay efficient, few
/// enough slices that together they fill the GPU.
const SLICE_ROWS: usize = 256;

/// How many equal slices `n` rows split into: a power of two dividing `n`, each of at least
/// [`SLICE_ROWS`] rows (one slice for a short or odd row count).
pub fn row_slices(n: usize) -> usize {
    let mut slices = 1;
    while n.is_multiple_of(2 * slices) && n / (2 * slices) >= SLICE_ROWS {
        slices *= 2;
    }
    slices
}

/// `pᵀ·q` for `p` `[m, i]` and `q` `[m, j]` (an adapter's gradient): a reduction over all `m`
/// rows into a small `[i, j]` matrix, computed as one partial product per slice of rows
/// ([`row_slices`]) and their sum. As a single product it leaves most of a GPU idle (150–230 µs
/// per product with Burn's matmul on an H100 at 8192 rows; `kiln bench matmul`).
pub fn t_matmul<B: Backend>(p: Tensor<B, 2>, q: Tensor<B, 2>) -> Tensor<B, 2> {
    let ([m, i], j) = (p.dims(), q.dims()[1]);
    let s = row_slices(m);
    let p = p.reshape([s, m / s, i]).swap_dims(1, 2); // [s, i, m/s]
    p.matmul(q.reshape([s, m / s, j])).sum_dim(0).reshape([i, j])
}

/// `lhs · rhs` computed in `dtype`, returned in f32 (kiln's activations are f32 throughout) as
/// plain tensor operations: cast both, multiply, cast back. What [`FrozenMatmul`] replaces, and
/// the tied LM head's product with a bf16 copy of the embedding. Casts to a tensor's own dtype
/// are free.
pub fn matmul_as<B: Backend, const D: usize>(lhs: Tensor<B, D>, rhs: Tensor<B, D>, dtype: FloatDType) -> Tensor<B, D> {
    lhs.cast(dtype).matmul(rhs.cast(dtype)).cast(FloatDType::F32)
}

/// `lhs · rhs` (one dtype) with the result written as `out`: on the CUDA backend (inside custom
/// ops, where tensors are the backend's own) cuBLAS multiplies and writes `out` directly;
/// elsewhere Burn's matmul, then a cast. The dense products of custom ops' forward and backward
/// go through here.
pub fn matmul_out<B: Backend, const D: usize>(lhs: Tensor<B, D>, rhs: Tensor<B, D>, out: FloatDType) -> Tensor<B, D> {
    #[cfg(feature = "cuda")]
    {
        let (l, r) = (lhs.clone().into_primitive().tensor(), rhs.clone().into_primitive().tensor());
        if let Some(y) = crate::cublas::matmul_any::<B>(&l, &r, out.into()) {
            return float::<B, D>(y);
        }
    }
    lhs.matmul(rhs).cast(out)
}

/// `x [.., k] · W [k, n] -> [.., n]` in f32 through [`FrozenMatmul`]; `W` must not require a
/// gradient (none is produced for it).
pub fn frozen_matmul<B: FrozenMatmul, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 2>) -> Tensor<B, D> {
    let dims = x.dims();
    let [k, n] = w.dims();
    let m = dims[..D - 1].iter().product::<usize>();
    let y = B::frozen_matmul(x.reshape([m, k]).into_primitive().tensor(), w.into_primitive().tensor());
    let mut out = dims;
    out[D - 1] = n;
    float::<B, 2>(y).reshape(out)
}

/// `x [.., k] · W + scale · (x·A)·B -> [.., n]` in f32 through [`FrozenMatmul::frozen_lora`]:
/// `W` `[k, n]` frozen, `A` `[k, r]` and `B` `[r, n]` the adapter's.
pub fn frozen_lora<B: FrozenMatmul, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 2>, a: Tensor<B, 2>, b: Tensor<B, 2>, scale: f64) -> Tensor<B, D> {
    frozen_lora_as(x, w, a, b, scale, FloatDType::F32)
}

/// [`frozen_lora`] with the result written in `out` (W's half type or f32): the projections
/// whose outputs only feed an element-wise operation that reads them in bf16 (the gated MLP's
/// gate and up) skip the f32 round trip, forward and backward.
pub fn frozen_lora_as<B: FrozenMatmul, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 2>, a: Tensor<B, 2>, b: Tensor<B, 2>, scale: f64, out: FloatDType) -> Tensor<B, D> {
    let prim = |t: Tensor<B, 2>| t.into_primitive().tensor();
    let (y, _) = B::frozen_lora(x.into_primitive().tensor(), prim(w), prim(a), prim(b), scale, out);
    float::<B, D>(y)
}

#[derive(Debug)]
struct FrozenMatmulBackward;

impl<B: FrozenMatmul> Backward<B, 1> for FrozenMatmulBackward {
    /// The weight.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        if let Some(node) = node {
            grads.register::<B>(node.id, B::frozen_matmul_dx(dy, ops.state));
        }
    }
}

impl<B: FrozenMatmul, C: CheckpointStrategy> FrozenMatmul for Autodiff<B, C> {
    fn frozen_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let w = w.primitive;
        // Only `x` is a parent: the weight is frozen. A matmul is never recomputed.
        match FrozenMatmulBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = B::frozen_matmul(x.primitive, w.clone());
                prep.finish(w, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::frozen_matmul(x.primitive, w)),
        }
    }

    fn frozen_lora(x: FloatTensor<Self>, w: FloatTensor<Self>, a: FloatTensor<Self>, b: FloatTensor<Self>, scale: f64, out: FloatDType) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let w = w.primitive;
        // The rows, so that the parent is `x` itself: projections of one input then add their
        // `dx` into one gradient (see the backward).
        let (x_rows, dims) = as_rows::<B>(x.primitive);
        // Cast once for the frozen product and the adapter's (and kept in the half type).
        let x_in = in_half_of::<B>(x_rows, &w);
        let (y, adapter) = Adapter::<B>::forward(x_in.clone(), w, a.primitive, b.primitive, scale, out);
        let y = from_rows::<B>(y, dims.clone());
        // `h` leaves as a constant; `x`, `A` and `B` are the parents (the weight is frozen).
        let h_out = <Self as burn::tensor::backend::AutodiffBackend>::from_inner(adapter.h.clone());
        let y = match FrozenLoraBackward.prepare::<C>([x.node.clone(), a.node.clone(), b.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(LoraState { x: x_in, dims, adapter }, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (y, h_out)
    }
}

/// `t` in `w`'s dtype where that is a half type (what the products read `t` in, done once for
/// all of them, as PyTorch's autocast does), else `t` as it is.
pub(crate) fn in_half_of<B: Backend>(t: FloatTensor<B>, w: &FloatTensor<B>) -> FloatTensor<B> {
    match w.dtype() {
        DType::BF16 | DType::F16 if t.dtype() != w.dtype() => B::float_cast(t, w.dtype().into()),
        _ => t,
    }
}

/// `dx + acc` (where there is an `acc`), in `dx`'s dtype.
fn with_acc<B: Backend>(dx: Tensor<B, 2>, acc: Option<FloatTensor<B>>) -> Tensor<B, 2> {
    match acc {
        Some(acc) => {
            let dtype = dx.dtype();
            dx + float::<B, 2>(acc).cast(FloatDType::from(dtype))
        }
        None => dx,
    }
}

/// What backward needs of a frozen product with its adapter besides the input: the frozen
/// weight, the adapter's matrices as the products read them ([`FrozenMatmul::lora_operand`])
/// and its scale, and `h = x·A` from the forward.
#[derive(Debug, Clone)]
pub(crate) struct Adapter<B: Backend> {
    pub(crate) w: FloatTensor<B>,
    pub(crate) a: FloatTensor<B>,
    pub(crate) b: FloatTensor<B>,
    pub(crate) h: FloatTensor<B>,
    pub(crate) scale: f64,
}

impl<B: FrozenMatmul> Adapter<B> {
    /// `y` of [`FrozenMatmul::frozen_lora`] (`x` already in the dtype the products read it in)
    /// and what its backward keeps.
    pub(crate) fn forward(x: FloatTensor<B>, w: FloatTensor<B>, a: FloatTensor<B>, b: FloatTensor<B>, scale: f64, out: FloatDType) -> (FloatTensor<B>, Self) {
        let (a, b) = (B::lora_operand(a, x.dtype()), B::lora_operand(b, x.dtype()));
        let (y, h) = B::frozen_lora(x, w.clone(), a.clone(), b.clone(), scale, out);
        (y, Self { w, a, b, h, scale })
    }

    /// `(dx, dA, dB)` for the upstream gradient `dy` and the input's rows `x` (`dx` if
    /// `need_dx`, in `dx_dtype`, with `acc` added): [`Adapter::backward_dx`], then `dA`.
    pub(crate) fn backward(self, dy: FloatTensor<B>, x: FloatTensor<B>, need_dx: bool, dx_dtype: FloatDType, acc: Option<FloatTensor<B>>) -> (Option<FloatTensor<B>>, FloatTensor<B>, FloatTensor<B>) {
        let (dx, g, db) = self.backward_dx(dy, need_dx, dx_dtype, acc);
        (dx, B::lora_da(x, g), db)
    }

    /// `(dx, g, dB)` through [`FrozenMatmul::frozen_lora_bwd_dx`], `dy` first cast to a half
    /// weight's dtype; `dA` is then [`FrozenMatmul::lora_da`] of the input and `g`.
    pub(crate) fn backward_dx(self, dy: FloatTensor<B>, need_dx: bool, dx_dtype: FloatDType, acc: Option<FloatTensor<B>>) -> (Option<FloatTensor<B>>, FloatTensor<B>, FloatTensor<B>) {
        let dy = in_half_of::<B>(dy, &self.w);
        B::frozen_lora_bwd_dx(dy, self.w, self.a, self.b, self.h, self.scale, need_dx, dx_dtype, acc)
    }
}

#[derive(Debug, Clone)]
struct LoraState<B: Backend> {
    /// The input's rows `[m, k]` (as the products read them) and its shape.
    x: FloatTensor<B>,
    dims: Vec<usize>,
    adapter: Adapter<B>,
}

#[derive(Debug)]
struct FrozenLoraBackward;

impl<B: FrozenMatmul> Backward<B, 3> for FrozenLoraBackward {
    type State = LoraState<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_a, node_b] = ops.parents;
        let s = ops.state;
        let dy = as_rows::<B>(grads.consume::<B>(&ops.node)).0;
        // The input's gradient so far (projections that share an input: queries, keys and
        // values; gate and up), taken out so that `dx` is added into it by the product rather
        // than by the addition `register` makes (a pass over `[m, k]` in f32 each).
        let acc = node_x.as_ref().and_then(|node| take_grad!(B, grads, node, dy.clone())).map(|g| as_rows::<B>(g).0);
        let (dx, da, db) = s.adapter.backward(dy, s.x, node_x.is_some(), FloatDType::F32, acc);
        let dx = dx.map(|dx| from_rows::<B>(dx, s.dims));
        for (node, grad) in [(node_x, dx), (node_a, Some(da)), (node_b, Some(db))] {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> FrozenMatmul for NdArray<E, I, Q> where NdArrayTensor: From<SharedArray<E>> + From<SharedArray<I>> {}

#[cfg(feature = "cubecl")]
impl<B: burn_fusion::FusionBackend> FrozenMatmul for burn_fusion::Fusion<B> {}

#[cfg(feature = "cubecl")]
pub(crate) mod cube {
    use burn::tensor::ops::{FloatTensor, FloatTensorOps};
    use burn::tensor::{DType, FloatDType};
    use burn_cubecl::kernel::matmul::{matmul, MatmulStrategy};
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

    use super::{lora_bwd_composition, lora_composition, t_matmul, with_acc, FrozenMatmul};
    use crate::{as_rows, float, from_rows};
    use crate::cube::{as_dtype, cublas_ready, gemm, gemm_as};

    /// `lhs · rhs` with `lhs` cast to `rhs`'s dtype, written in `out` (f32 or `rhs`'s dtype) by
    /// the matmul kernel itself (it accumulates in f32 for bf16 inputs: an f32 result is that
    /// accumulator, unrounded).
    fn product_as<R: CubeRuntime>(lhs: CubeTensor<R>, rhs: CubeTensor<R>, out: DType) -> CubeTensor<R> {
        let lhs = as_dtype(lhs, rhs.dtype);
        #[cfg(feature = "cuda")]
        if let Some(y) = crate::cublas::matmul(&lhs, &rhs, out) {
            return y;
        }
        // Burn's own float matmul unwraps the same call: with autotune it always finds a kernel.
        matmul(lhs, rhs, None, MatmulStrategy::default(), out).expect("a matmul kernel for a dense 2-D product")
    }

    fn product_f32<R: CubeRuntime>(lhs: CubeTensor<R>, rhs: CubeTensor<R>) -> CubeTensor<R> {
        product_as(lhs, rhs, DType::F32)
    }

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FrozenMatmul for CubeBackend<R, F, I, BT> {
        fn frozen_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
            product_f32(x, w)
        }

        fn frozen_matmul_as(x: FloatTensor<Self>, w: FloatTensor<Self>, out: FloatDType) -> FloatTensor<Self> {
            let out = DType::from(out);
            match out == DType::F32 || out == w.dtype {
                true => product_as(x, w, out),
                false => as_dtype(product_f32(x, w), out),
            }
        }

        fn frozen_matmul_dx(dy: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
            // A transposed view: the matmul reads it in place, as Burn's own backward does.
            product_f32(dy, Self::float_transpose(w))
        }

        // On CUDA the adapter's products go to cuBLAS, which scales and adds into the frozen
        // product's output in place: no separate scale, add or reduction passes. A half `x` or
        // output takes the adapter's small matrices (and `h`) into that half type, since both
        // operands of a product share one dtype. Elsewhere the composition (its reductions over
        // rows sliced for Burn's matmul).
        fn frozen_lora(x: FloatTensor<Self>, w: FloatTensor<Self>, a: FloatTensor<Self>, b: FloatTensor<Self>, scale: f64, out: FloatDType) -> (FloatTensor<Self>, FloatTensor<Self>) {
            let out = DType::from(out);
            let (x, dims) = as_rows::<Self>(x);
            if !cublas_ready::<R>() || !(out == DType::F32 || out == w.dtype) {
                let (y, h) = lora_composition::<Self>(x, w, a, b, scale);
                return (from_rows::<Self>(as_dtype(y, out), dims), h);
            }
            let (a, b) = (as_dtype(a, x.dtype), as_dtype(b, x.dtype));
            // `h` in `x`'s dtype, as PEFT's `lora_A` leaves it under autocast: the next product
            // and backward's `dB` read it there without a cast.
            let h = gemm_as::<R, F, I, BT>(x.clone(), a, 1.0, None, x.dtype); // [m, r]
            // The adapter's term first, then the frozen product added into it: the large
            // product's epilogue reads the output nearly for free, where adding the small one
            // afterwards reads and writes all of `[m, n]` again.
            let y = gemm_as::<R, F, I, BT>(h.clone(), b, scale, None, out);
            let y = gemm_as::<R, F, I, BT>(as_dtype(x, w.dtype), w, 1.0, Some(y), out);
            (from_rows::<Self>(y, dims), h)
        }

        // On cuBLAS the adapter multiplies in the input's dtype: its matrices are cast there once
        // in the forward (not in each of the five products that read them).
        fn lora_operand(t: FloatTensor<Self>, x_dtype: DType) -> FloatTensor<Self> {
            match cublas_ready::<R>() {
                true => as_dtype(t, x_dtype),
                false => t,
            }
        }

        fn frozen_lora_bwd_dx(
            dy: FloatTensor<Self>,
            w: FloatTensor<Self>,
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            h: FloatTensor<Self>,
            scale: f64,
            need_dx: bool,
            dx_dtype: FloatDType,
            acc: Option<FloatTensor<Self>>,
        ) -> (Option<FloatTensor<Self>>, FloatTensor<Self>, FloatTensor<Self>) {
            let dx_out = DType::from(dx_dtype);
            if !cublas_ready::<R>() || !(dx_out == DType::F32 || dx_out == dy.dtype) {
                let (dx, g, db) = lora_bwd_composition::<Self>(dy, w, a, b, h, scale, need_dx);
                let dx = dx.map(|dx| with_acc::<Self>(float(as_dtype(dx, dx_out)), acc).into_primitive().tensor());
                return (dx, g, db);
            }
            let t = Self::float_transpose;
            let dt = dy.dtype;
            // `g` in `dy`'s dtype (bf16 under a bf16 weight, as autocast's backward leaves it), so
            // every product below multiplies in one dtype with no cast between them.
            let (a, b) = (as_dtype(a, dt), as_dtype(b, dt));
            let g = gemm_as::<R, F, I, BT>(dy.clone(), t(b), scale, None, dt); // [m, r]
            // `dx`'s adapter term first, for the reason the forward gives, added into the
            // gradient so far where cuBLAS can add into it in place (its dtype, contiguous,
            // held by nothing else).
            let (acc, rest) = match acc {
                Some(acc) if acc.dtype == dx_out && acc.is_contiguous() && acc.can_mut() => (Some(acc), None),
                other => (None, other),
            };
            let dx = need_dx.then(|| gemm_as::<R, F, I, BT>(as_dtype(dy.clone(), w.dtype), t(w), 1.0, Some(gemm_as::<R, F, I, BT>(g.clone(), t(a), 1.0, acc, dx_out)), dx_out));
            let dx = dx.map(|dx| with_acc::<Self>(float(dx), rest).into_primitive().tensor());
            let db = gemm::<R, F, I, BT>(t(as_dtype(h, dt)), dy, scale, None); // [r, n]
            (dx, g, db)
        }

        fn lora_da(x: FloatTensor<Self>, g: FloatTensor<Self>) -> FloatTensor<Self> {
            match cublas_ready::<R>() {
                // One product over all rows, multiplied in `g`'s dtype, f32 out.
                true => gemm::<R, F, I, BT>(Self::float_transpose(as_dtype(x, g.dtype)), g, 1.0, None), // [k, r]
                false => t_matmul(float::<Self, 2>(as_dtype(x, DType::F32)), float(g)).into_primitive().tensor(),
            }
        }
    }
}
