//! The LM head and cross-entropy as one operation, computed over chunks of rows so that the
//! `[tokens, vocab]` logits never exist at once, in the forward or in the backward.
//!
//! For a small model with a large vocabulary the logits are the largest activation of a
//! training step: 8 × 1024 tokens × 151,936 entries is 5 GB in f32, and the plain
//! `log_softmax → gather` graph keeps two or three such tensors alive until backward. Here the
//! forward keeps only one float per row (its log-sum-exp); the backward multiplies each chunk
//! again and turns it into `dh` (and `dW` when the head is trained) before the next chunk.
//!
//! Shapes: `h` `[n, e]`, the head weight `[e, v]` ([`HeadLayout::InOut`], a linear layer in
//! matmul order) or `[v, e]` ([`HeadLayout::OutIn`], a tied embedding), `targets` `[n]` int,
//! `mask` `[n]` float. Result: `[1]`, `Σ_i mask_i · (logsumexp(z_i) − z_i[target_i])` with
//! `z = h·W`, or `z = c·tanh(h·W / c)` with a logit softcap `c` (Gemma).

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray};
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{backend::Backend, DType, IndexingUpdateOp, Int, Tensor, TensorMetadata};

use crate::float;
use crate::frozen::FrozenMatmul;

/// Where the vocabulary axis of the head weight is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadLayout {
    /// `[e, v]`: a linear layer stored in matmul order.
    InOut,
    /// `[v, e]`: the token embedding, tied as the head.
    OutIn,
}

/// How the loss is computed: the weight's layout, the optional logit softcap and how many rows
/// each chunk holds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeadLoss {
    pub layout: HeadLayout,
    pub softcap: Option<f64>,
    pub chunk: usize,
}

/// Bytes of f32 logits one chunk may hold. 256 MiB keeps each chunk's products large enough to
/// fill a GPU (about 440 rows of a 152k vocabulary) while staying small next to the weights.
pub const CHUNK_BYTES: usize = 256 << 20;

/// Rows per chunk for a vocabulary of `vocab` entries (at least 16).
pub fn chunk_rows(vocab: usize) -> usize {
    (CHUNK_BYTES / (4 * vocab.max(1))).max(16)
}

/// Backend extension: the fused head + cross-entropy. The default method is the chunked
/// forward in Burn tensor ops, which is all a backend without a tape needs; `Autodiff<B>`
/// adds the chunked backward.
pub trait LmHeadLoss: FrozenMatmul {
    fn lm_head_loss(h: FloatTensor<Self>, w: FloatTensor<Self>, targets: IntTensor<Self>, mask: FloatTensor<Self>, spec: HeadLoss) -> FloatTensor<Self> {
        forward::<Self>(h, w, targets, mask, spec, None)
    }

    /// Per row of one chunk's logits `u` `[c, v]` (f32 or the head's half type, before the
    /// softcap): the log-sum-exp of `z = cap(u)` and `z[target]`, each `[c]` in f32. The
    /// default is tensor operations; the CubeCL backends read each row once in one kernel.
    fn chunk_lse(u: FloatTensor<Self>, targets: IntTensor<Self>, softcap: Option<f64>) -> (FloatTensor<Self>, FloatTensor<Self>) {
        chunk_lse_composition::<Self>(u, targets, softcap)
    }

    /// `dz = (exp(z − lse) − onehot(target)) · coef`, times `1 − (z/c)²` under a softcap `c`,
    /// with `z = cap(u)`, for one chunk: `u` `[c, v]` as [`LmHeadLoss::chunk_lse`] takes it,
    /// `lse`, `coef` `[c]` f32, `targets` `[c]`; written in `out` (the dtype the next product
    /// multiplies in).
    fn chunk_grad(u: FloatTensor<Self>, lse: FloatTensor<Self>, targets: IntTensor<Self>, coef: FloatTensor<Self>, softcap: Option<f64>, out: DType) -> FloatTensor<Self> {
        chunk_grad_composition::<Self>(u, lse, targets, coef, softcap, out)
    }
}

/// [`LmHeadLoss::chunk_lse`] as tensor operations.
fn chunk_lse_composition<B: Backend>(u: FloatTensor<B>, targets: IntTensor<B>, cap: Option<f64>) -> (FloatTensor<B>, FloatTensor<B>) {
    let z = softcap(float::<B, 2>(u).cast(DType::F32), cap); // [c, v]
    let c = z.dims()[0];
    let max = z.clone().max_dim(1).detach(); // [c, 1]
    let lse = (z.clone() - max.clone()).exp().sum_dim(1).log() + max; // [c, 1]
    let picked = z.gather(1, Tensor::<B, 1, Int>::from_primitive(targets).reshape([c, 1])); // [c, 1]
    (lse.reshape([c]).into_primitive().tensor(), picked.reshape([c]).into_primitive().tensor())
}

/// [`LmHeadLoss::chunk_grad`] as tensor operations.
fn chunk_grad_composition<B: Backend>(u: FloatTensor<B>, lse: FloatTensor<B>, targets: IntTensor<B>, coef: FloatTensor<B>, cap: Option<f64>, out: DType) -> FloatTensor<B> {
    let z = softcap(float::<B, 2>(u).cast(DType::F32), cap); // [c, v]
    let c = z.dims()[0];
    let coef = float::<B, 1>(coef).reshape([c, 1]);
    let p = (z.clone() - float::<B, 1>(lse).reshape([c, 1])).exp();
    let t = Tensor::<B, 1, Int>::from_primitive(targets).reshape([c, 1]);
    let mut dz = (p * coef.clone()).scatter(1, t, coef.neg(), IndexingUpdateOp::Add); // [c, v]
    if let Some(cap) = cap {
        let y = z.div_scalar(cap);
        dz = dz * (y.clone() * y).neg().add_scalar(1.0);
    }
    dz.cast(out).into_primitive().tensor()
}

/// `Σ mask · nll` of `h` `[n, e]` through the head `w`: the typed entry point.
pub fn lm_head_loss<B: LmHeadLoss>(h: Tensor<B, 2>, w: Tensor<B, 2>, targets: Tensor<B, 1, Int>, mask: Tensor<B, 1>, spec: HeadLoss) -> Tensor<B, 1> {
    float(B::lm_head_loss(h.into_primitive().tensor(), w.into_primitive().tensor(), targets.into_primitive(), mask.into_primitive().tensor(), spec))
}

/// The plain composition [`lm_head_loss`] is checked against: the full `[n, v]` logits,
/// softcap, log-softmax, gather, mask, summed and negated.
pub fn lm_head_loss_composition<B: Backend>(h: Tensor<B, 2>, w: Tensor<B, 2>, targets: Tensor<B, 1, Int>, mask: Tensor<B, 1>, spec: HeadLoss) -> Tensor<B, 1> {
    let n = h.dims()[0];
    let z = match spec.layout {
        HeadLayout::InOut => h.matmul(w),
        HeadLayout::OutIn => h.matmul(w.transpose()),
    };
    let z = softcap(z, spec.softcap); // [n, v]
    let picked = burn::tensor::activation::log_softmax(z, 1).gather(1, targets.reshape([n, 1])).reshape([n]);
    (picked * mask).sum().neg()
}


/// Logits of one chunk before the softcap, `[c, v]`, in `w`'s dtype. The product runs in that
/// dtype and the matmul writes its result there itself ([`FrozenMatmul::frozen_matmul_as`]): a
/// bf16 head gives bf16 logits, as PyTorch's autocast leaves them before the loss reads them in
/// f32, and the row kernels that read each chunk twice read half the bytes.
fn chunk_logits<B: FrozenMatmul>(h: Tensor<B, 2>, w: &Tensor<B, 2>, layout: HeadLayout) -> Tensor<B, 2> {
    let w = match layout {
        HeadLayout::InOut => w.clone(),
        HeadLayout::OutIn => w.clone().transpose(), // a view: the matmul reads [v, e] in place
    };
    let out = w.dtype().into();
    float(B::frozen_matmul_as(h.into_primitive().tensor(), w.into_primitive().tensor(), out)) // [c, e] x [e, v]
}

fn softcap<B: Backend>(u: Tensor<B, 2>, cap: Option<f64>) -> Tensor<B, 2> {
    match cap {
        Some(c) => u.div_scalar(c).tanh().mul_scalar(c),
        None => u,
    }
}

/// The chunks' row ranges.
fn chunks(n: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    let chunk = chunk.max(1);
    (0..n).step_by(chunk).map(move |s| (s, chunk.min(n - s)))
}

/// The loss `[1]`; with `grads`, also its gradients for an upstream gradient of 1, collected
/// there: each chunk's gradient is taken while its logits exist, so the backward does not
/// multiply the head a second time (Liger's fused linear cross-entropy does the same).
fn forward<B: LmHeadLoss>(h: FloatTensor<B>, w: FloatTensor<B>, targets: IntTensor<B>, mask: FloatTensor<B>, spec: HeadLoss, mut grads: Option<&mut ChunkGrads<B>>) -> FloatTensor<B> {
    let h = float::<B, 2>(h);
    let w = float::<B, 2>(w);
    let targets = Tensor::<B, 1, Int>::from_primitive(targets);
    let mask = float::<B, 1>(mask).cast(DType::F32);
    let [n, _] = h.dims();
    let mut loss = Tensor::<B, 1>::zeros([1], (&h.device(), DType::F32));
    let prim = |x: Tensor<B, 1>| x.into_primitive().tensor();
    for (start, len) in chunks(n, spec.chunk) {
        let hc = h.clone().narrow(0, start, len);
        let u = chunk_logits(hc.clone(), &w, spec.layout); // [c, v]
        let t = targets.clone().narrow(0, start, len).into_primitive();
        let m = mask.clone().narrow(0, start, len); // [c]
        let (lse, picked) = B::chunk_lse(u.clone().into_primitive().tensor(), t.clone(), spec.softcap);
        let lse = float::<B, 1>(lse); // [c]
        loss = loss + ((lse.clone() - float::<B, 1>(picked)) * m.clone()).sum();
        let Some(acc) = grads.as_deref_mut() else { continue };
        // dz = (softmax(z) − onehot(target)) · mask, through the softcap's 1 − tanh², in W's
        // dtype: the products below multiply in it.
        let dz = float::<B, 2>(B::chunk_grad(u.into_primitive().tensor(), prim(lse), t, prim(m), spec.softcap, w.dtype())); // [c, v]
        // dh = dz·Wᵀ in the head's layout, multiplied in W's dtype, f32 out.
        let (dz_p, w_p) = (dz.clone().into_primitive().tensor(), w.clone().into_primitive().tensor());
        acc.dh.push(float::<B, 2>(match spec.layout {
            HeadLayout::InOut => B::frozen_matmul_dx(dz_p, w_p), // [c, v] x [e, v]ᵀ
            HeadLayout::OutIn => B::frozen_matmul(dz_p, w_p),    // [c, v] x [v, e]
        }));
        if acc.want_w {
            let hcw = hc.cast(w.dtype());
            let part = match spec.layout {
                HeadLayout::InOut => hcw.transpose().matmul(dz), // [e, c] x [c, v]
                HeadLayout::OutIn => dz.transpose().matmul(hcw), // [v, c] x [c, e]
            };
            acc.dw = Some(match acc.dw.take() {
                Some(sum) => sum + part,
                None => part,
            });
        }
    }
    loss.into_primitive().tensor()
}

/// What [`forward`] collects for the gradients: each chunk's `dh` (f32) and the sum of the
/// chunks' `dW` when the head trains.
struct ChunkGrads<B: Backend> {
    want_w: bool,
    dh: Vec<Tensor<B, 2>>,
    dw: Option<Tensor<B, 2>>,
}

impl<B: Backend> ChunkGrads<B> {
    fn new(want_w: bool) -> Self {
        Self { want_w, dh: Vec::new(), dw: None }
    }

    fn finish(self, h_dtype: DType) -> Grads<B> {
        Grads { dh: Tensor::cat(self.dh, 0).into_primitive().tensor(), dw: self.dw.map(|t| t.into_primitive().tensor()), h_dtype }
    }
}

/// The loss's gradients for an upstream gradient of 1, kept from the forward: `dh` `[n, e]` in
/// f32 and `dW` (in `w`'s layout and dtype) when the head trains.
#[derive(Debug, Clone)]
struct Grads<B: Backend> {
    dh: FloatTensor<B>,
    dw: Option<FloatTensor<B>>,
    h_dtype: DType,
}

impl<B: Backend> Grads<B> {
    /// Scaled by the upstream gradient `g` `[1]`; `dh` in `h`'s dtype.
    fn times(self, g: FloatTensor<B>) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
        let g = float::<B, 1>(g).cast(DType::F32);
        let dh = (float::<B, 2>(self.dh) * g.clone().reshape([1, 1])).cast(self.h_dtype);
        let dw = self.dw.map(|dw| {
            let dw = float::<B, 2>(dw);
            let dtype = dw.dtype();
            (dw * g.cast(dtype).reshape([1, 1])).into_primitive().tensor()
        });
        (dh.into_primitive().tensor(), dw)
    }
}

#[derive(Debug)]
struct LmHeadLossBackward;

impl<B: LmHeadLoss> Backward<B, 2> for LmHeadLossBackward {
    type State = Grads<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_h, node_w] = ops.parents;
        let (dh, dw) = ops.state.times(grads.consume::<B>(&ops.node));
        if let Some(node) = node_h {
            grads.register::<B>(node.id, dh);
        }
        if let (Some(node), Some(dw)) = (node_w, dw) {
            grads.register::<B>(node.id, dw);
        }
    }
}

impl<B: LmHeadLoss, C: CheckpointStrategy> LmHeadLoss for Autodiff<B, C> {
    fn lm_head_loss(h: FloatTensor<Self>, w: FloatTensor<Self>, targets: IntTensor<Self>, mask: FloatTensor<Self>, spec: HeadLoss) -> FloatTensor<Self> {
        let mask = mask.primitive;
        let want_w = !w.node.requirement.is_none();
        match LmHeadLossBackward.prepare::<C>([h.node.clone(), w.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let h_dtype = h.primitive.dtype();
                let mut grads = ChunkGrads::new(want_w);
                let loss = forward::<B>(h.primitive, w.primitive, targets, mask, spec, Some(&mut grads));
                prep.finish(grads.finish(h_dtype), loss)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward::<B>(h.primitive, w.primitive, targets, mask, spec, None)),
        }
    }
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> LmHeadLoss for NdArray<E, I, Q> where NdArrayTensor: From<SharedArray<E>> + From<SharedArray<I>> {}

#[cfg(feature = "cubecl")]
mod cube {
    use burn::tensor::ops::{FloatTensor, IntTensor};
    use burn::tensor::{DType, Shape, TensorData};
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use cubecl::prelude::*;
    use cubecl::{cube, CubeCount, CubeDim};

    use super::LmHeadLoss;
    use crate::cube::{as_dtype, capped, contiguous_float, flat_width};

    /// Threads per row. A chunk holds a few hundred rows of the whole vocabulary (see
    /// [`super::chunk_rows`]): 512 threads each keep an H100 full in one wave.
    const LANES: u32 = 512;
    const LOG_LANES: u32 = 9;
    /// Below any logit: the running maximum starts here, so that a lane with no element adds 0.
    const FLOOR: f32 = -1.0e30;

    /// Folds the vector `x` (`cap` applied to each element) into a running
    /// `(max, Σ exp(· − max))`: one rescale per vector whose maximum is new, not one per element.
    #[cube]
    fn fold<F: Float, U: Float, N: Size>(m: &mut F, sum: &mut F, x: Vector<U, N>, cap: F, #[comptime] softcap: bool) {
        let mut z = Array::<F>::new(N::value());
        let mut top = *m;
        #[unroll]
        for l in 0..x.vector_size() {
            z[l] = capped::<F>(F::cast_from(x[l]), cap, softcap);
            top = F::max(top, z[l]);
        }
        let mut add = *sum * F::exp(*m - top);
        #[unroll]
        for l in 0..x.vector_size() {
            add += F::exp(z[l] - top);
        }
        *sum = add;
        *m = top;
    }

    /// One cube per row of `u` `[c, v]`, read as vectors of `N` (`N` divides `v`):
    /// `lse[row]` = logsumexp(cap(u)) in one pass over the row (a running maximum, the sum
    /// rescaled when it grows) and `picked[row]` = cap(u)[target], read through `scalar`, the same
    /// memory as `u` one element at a time. `params` = [softcap].
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    fn lse_kernel<F: Float, U: Float, I: Int, N: Size>(u: &Tensor<Vector<U, N>>, scalar: &Tensor<U>, targets: &Tensor<I>, params: &Tensor<F>, lse: &mut Tensor<F>, picked: &mut Tensor<F>, #[comptime] softcap: bool) {
        let row = CUBE_POS_X as usize;
        let lane = UNIT_POS_X as usize;
        let v = scalar.shape(1);
        let vectors = v / N::value();
        let base = row * vectors;
        let cap = params[0];
        let stride = LANES as usize;
        let mut m = F::new(FLOOR);
        let mut sum = F::new(0.0);
        let mut j = lane;
        // Two independent loads in flight per pass, `LANES` vectors apart (still coalesced).
        while j + stride < vectors {
            let (x0, x1) = (u[base + j], u[base + j + stride]);
            fold::<F, U, N>(&mut m, &mut sum, x0, cap, softcap);
            fold::<F, U, N>(&mut m, &mut sum, x1, cap, softcap);
            j += 2 * stride;
        }
        if j < vectors {
            fold::<F, U, N>(&mut m, &mut sum, u[base + j], cap, softcap);
        }
        let mut maxes = SharedMemory::<F>::new(LANES as usize);
        let mut sums = SharedMemory::<F>::new(LANES as usize);
        maxes[lane] = m;
        sums[lane] = sum;
        sync_cube();
        #[unroll]
        for step in 0..LOG_LANES {
            let half = ((LANES / 2) >> step) as usize;
            if lane < half {
                let (m1, m2) = (maxes[lane], maxes[lane + half]);
                let top = F::max(m1, m2);
                sums[lane] = sums[lane] * F::exp(m1 - top) + sums[lane + half] * F::exp(m2 - top);
                maxes[lane] = top;
            }
            sync_cube();
        }
        if lane == 0 {
            lse[row] = maxes[0] + F::ln(sums[0]);
            let t = usize::cast_from(targets[row]);
            let mut p = F::new(0.0);
            if t < v {
                p = capped::<F>(F::cast_from(scalar[row * v + t]), cap, softcap);
            }
            picked[row] = p;
        }
    }

    /// One cube per row, vectors of `N` as [`lse_kernel`] reads them:
    /// `dz = (exp(z − lse) − [j = target]) · coef · (1 − (z/c)²)` with `z = cap(u)` (no last
    /// factor without a softcap), written as `G`. `params` = [softcap].
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    fn grad_kernel<F: Float, U: Float, I: Int, G: Float, N: Size>(u: &Tensor<Vector<U, N>>, lse: &Tensor<F>, targets: &Tensor<I>, coef: &Tensor<F>, params: &Tensor<F>, dz: &mut Tensor<Vector<G, N>>, #[comptime] softcap: bool) {
        let row = CUBE_POS_X as usize;
        let lane = UNIT_POS_X as usize;
        let width = N::value();
        let vectors = u.shape(1) / width;
        let base = row * vectors;
        let cap = params[0];
        let l = lse[row];
        let c = coef[row];
        let t = usize::cast_from(targets[row]);
        let mut j = lane;
        while j < vectors {
            let x = u[base + j];
            let mut out = Vector::<G, N>::new(G::new(0.0));
            #[unroll]
            for e in 0..x.vector_size() {
                let z = capped::<F>(F::cast_from(x[e]), cap, softcap);
                let mut g = F::exp(z - l) * c;
                if j * width + e == t {
                    g -= c;
                }
                if softcap {
                    let y = z / cap;
                    g *= F::new(1.0) - y * y;
                }
                out[e] = G::cast_from(g);
            }
            dz[base + j] = out;
            j += LANES as usize;
        }
    }

    fn params<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(like: &CubeTensor<R>, softcap: Option<f64>) -> CubeTensor<R> {
        let data = TensorData::new(vec![softcap.unwrap_or(1.0) as f32], [1]).convert::<F>();
        contiguous_float::<R, F>(<CubeBackend<R, F, I, BT> as burn::tensor::ops::FloatTensorOps<CubeBackend<R, F, I, BT>>>::float_from_data(data, &like.device))
    }

    /// Logits as the row kernels read them: contiguous, in the head's half type or `F`.
    fn logits<R: CubeRuntime, F: FloatElement>(u: CubeTensor<R>) -> CubeTensor<R> {
        match u.dtype {
            DType::BF16 | DType::F16 => into_contiguous(u),
            _ => contiguous_float::<R, F>(u),
        }
    }

    fn ints<R: CubeRuntime, I: IntElement>(t: CubeTensor<R>) -> CubeTensor<R> {
        into_contiguous(as_dtype(t, I::dtype()))
    }

    fn empty<R: CubeRuntime>(like: &CubeTensor<R>, shape: Vec<usize>, dtype: DType) -> CubeTensor<R> {
        empty_device_contiguous_dtype(like.client.clone(), like.device.clone(), Shape::from(shape), dtype)
    }

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> LmHeadLoss for CubeBackend<R, F, I, BT> {
        fn chunk_lse(u: FloatTensor<Self>, targets: IntTensor<Self>, softcap: Option<f64>) -> (FloatTensor<Self>, FloatTensor<Self>) {
            let (u, targets) = (logits::<R, F>(u), ints::<R, I>(targets));
            let [c, v] = u.meta.shape().dims::<2>();
            let (lse, picked) = (empty(&u, vec![c], F::dtype()), empty(&u, vec![c], F::dtype()));
            if c == 0 || v == 0 {
                return (lse, picked);
            }
            let p = params::<R, F, I, BT>(&u, softcap);
            let client = u.client.clone();
            let width = flat_width(v, u.dtype.size(), &[&u]);
            // SAFETY: row `CUBE_POS_X` < c by the launch count, columns below `v`, read as
            // vectors of `width` (which divides `v` and the start); one target, lse and picked
            // per row (contiguous above); a target outside the row reads nothing.
            let (count, dim) = (CubeCount::Static(c as u32, 1, 1), CubeDim { x: LANES, y: 1, z: 1 });
            let scalar = u.clone();
            unsafe {
                match u.dtype {
                    DType::BF16 => lse_kernel::launch_unchecked::<F, burn::tensor::bf16, I, R>(&client, count, dim, width, u.into_tensor_arg(), scalar.into_tensor_arg(), targets.into_tensor_arg(), p.into_tensor_arg(), lse.clone().into_tensor_arg(), picked.clone().into_tensor_arg(), softcap.is_some()),
                    DType::F16 => lse_kernel::launch_unchecked::<F, burn::tensor::f16, I, R>(&client, count, dim, width, u.into_tensor_arg(), scalar.into_tensor_arg(), targets.into_tensor_arg(), p.into_tensor_arg(), lse.clone().into_tensor_arg(), picked.clone().into_tensor_arg(), softcap.is_some()),
                    _ => lse_kernel::launch_unchecked::<F, F, I, R>(&client, count, dim, width, u.into_tensor_arg(), scalar.into_tensor_arg(), targets.into_tensor_arg(), p.into_tensor_arg(), lse.clone().into_tensor_arg(), picked.clone().into_tensor_arg(), softcap.is_some()),
                }
            }
            (lse, picked)
        }

        fn chunk_grad(u: FloatTensor<Self>, lse: FloatTensor<Self>, targets: IntTensor<Self>, coef: FloatTensor<Self>, softcap: Option<f64>, out: DType) -> FloatTensor<Self> {
            let (u, lse, coef, targets) = (logits::<R, F>(u), contiguous_float::<R, F>(lse), contiguous_float::<R, F>(coef), ints::<R, I>(targets));
            let [c, v] = u.meta.shape().dims::<2>();
            let dz = empty(&u, vec![c, v], out);
            if c == 0 || v == 0 {
                return dz;
            }
            let p = params::<R, F, I, BT>(&u, softcap);
            let client = u.client.clone();
            let (count, dim) = (CubeCount::Static(c as u32, 1, 1), CubeDim { x: LANES, y: 1, z: 1 });
            let width = flat_width(v, u.dtype.size().max(out.size()), &[&u, &dz]);
            // SAFETY: as in `chunk_lse`; `dz` has the shape of `u` and is read as vectors of the
            // same `width`.
            // Logits and their gradient share the head's dtype, or the logits are f32.
            unsafe {
                match (u.dtype, out) {
                    (DType::BF16, DType::BF16) => grad_kernel::launch_unchecked::<F, burn::tensor::bf16, I, burn::tensor::bf16, R>(&client, count, dim, width, u.into_tensor_arg(), lse.into_tensor_arg(), targets.into_tensor_arg(), coef.into_tensor_arg(), p.into_tensor_arg(), dz.clone().into_tensor_arg(), softcap.is_some()),
                    (DType::F16, DType::F16) => grad_kernel::launch_unchecked::<F, burn::tensor::f16, I, burn::tensor::f16, R>(&client, count, dim, width, u.into_tensor_arg(), lse.into_tensor_arg(), targets.into_tensor_arg(), coef.into_tensor_arg(), p.into_tensor_arg(), dz.clone().into_tensor_arg(), softcap.is_some()),
                    (ud, DType::BF16) if ud == F::dtype() => grad_kernel::launch_unchecked::<F, F, I, burn::tensor::bf16, R>(&client, count, dim, width, u.into_tensor_arg(), lse.into_tensor_arg(), targets.into_tensor_arg(), coef.into_tensor_arg(), p.into_tensor_arg(), dz.clone().into_tensor_arg(), softcap.is_some()),
                    (ud, DType::F16) if ud == F::dtype() => grad_kernel::launch_unchecked::<F, F, I, burn::tensor::f16, R>(&client, count, dim, width, u.into_tensor_arg(), lse.into_tensor_arg(), targets.into_tensor_arg(), coef.into_tensor_arg(), p.into_tensor_arg(), dz.clone().into_tensor_arg(), softcap.is_some()),
                    (ud, o) if ud == F::dtype() && o == F::dtype() => grad_kernel::launch_unchecked::<F, F, I, F, R>(&client, count, dim, width, u.into_tensor_arg(), lse.into_tensor_arg(), targets.into_tensor_arg(), coef.into_tensor_arg(), p.into_tensor_arg(), dz.clone().into_tensor_arg(), softcap.is_some()),
                    _ => return super::chunk_grad_composition::<Self>(u, lse, targets, coef, softcap, out),
                }
            }
            dz
        }
    }
}

#[cfg(feature = "cubecl")]
impl<B: burn_fusion::FusionBackend> LmHeadLoss for burn_fusion::Fusion<B> {}
