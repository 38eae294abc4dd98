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
use burn::tensor::{backend::Backend, DType, IndexingUpdateOp, Int, Tensor};

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
        forward::<Self>(h, w, targets, mask, spec).0
    }
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


/// Logits of one chunk before the softcap, `[c, v]`, in f32. The product runs in `w`'s dtype
/// (bf16 for a bf16 head) and the matmul writes its f32 accumulator itself
/// ([`FrozenMatmul`]): casting a `[c, v]` product afterwards took longer than the product.
fn chunk_logits<B: FrozenMatmul>(h: Tensor<B, 2>, w: &Tensor<B, 2>, layout: HeadLayout) -> Tensor<B, 2> {
    let w = match layout {
        HeadLayout::InOut => w.clone(),
        HeadLayout::OutIn => w.clone().transpose(), // a view: the matmul reads [v, e] in place
    };
    float(B::frozen_matmul(h.into_primitive().tensor(), w.into_primitive().tensor())) // [c, e] x [e, v]
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

/// The loss `[1]` and each row's log-sum-exp `[n]` (f32), which is all the backward keeps.
fn forward<B: FrozenMatmul>(h: FloatTensor<B>, w: FloatTensor<B>, targets: IntTensor<B>, mask: FloatTensor<B>, spec: HeadLoss) -> (FloatTensor<B>, FloatTensor<B>) {
    let h = float::<B, 2>(h);
    let w = float::<B, 2>(w);
    let targets = Tensor::<B, 1, Int>::from_primitive(targets);
    let mask = float::<B, 1>(mask).cast(DType::F32);
    let [n, _] = h.dims();
    let mut loss = Tensor::<B, 1>::zeros([1], (&h.device(), DType::F32));
    let mut lses = Vec::new();
    for (start, len) in chunks(n, spec.chunk) {
        let z = softcap(chunk_logits(h.clone().narrow(0, start, len), &w, spec.layout), spec.softcap); // [c, v]
        let max = z.clone().max_dim(1).detach(); // [c, 1]
        let lse = (z.clone() - max.clone()).exp().sum_dim(1).log() + max; // [c, 1]
        let picked = z.gather(1, targets.clone().narrow(0, start, len).reshape([len, 1])); // [c, 1]
        let nll = (lse.clone() - picked).reshape([len]) * mask.clone().narrow(0, start, len);
        loss = loss + nll.sum();
        lses.push(lse.reshape([len]));
    }
    let lse = Tensor::cat(lses, 0);
    (loss.into_primitive().tensor(), lse.into_primitive().tensor())
}

/// `dh` `[n, e]` (in `h`'s dtype) and, when asked, `dW` (in `w`'s layout and dtype) for an
/// upstream gradient `g` `[1]`: per chunk, `dz = (softmax(z) − onehot(target)) · mask · g`,
/// through the softcap's `1 − tanh²`, then `dh = dz·Wᵀ`, `dW += hᵀ·dz`.
fn backward<B: FrozenMatmul>(g: FloatTensor<B>, s: &State<B>, want_w: bool) -> (FloatTensor<B>, Option<FloatTensor<B>>) {
    let h = float::<B, 2>(s.h.clone());
    let w = float::<B, 2>(s.w.clone());
    let targets = Tensor::<B, 1, Int>::from_primitive(s.targets.clone());
    let mask = float::<B, 1>(s.mask.clone()).cast(DType::F32);
    let lse = float::<B, 1>(s.lse.clone());
    let g = float::<B, 1>(g).cast(DType::F32);
    let (h_dtype, w_dtype) = (h.dtype(), w.dtype());
    let [n, _] = h.dims();
    let mut dhs = Vec::new();
    let mut dw: Option<Tensor<B, 2>> = None;
    for (start, len) in chunks(n, s.spec.chunk) {
        let hc = h.clone().narrow(0, start, len);
        let u = chunk_logits(hc.clone(), &w, s.spec.layout); // [c, v]
        let z = softcap(u, s.spec.softcap);
        let coef = (mask.clone().narrow(0, start, len) * g.clone()).reshape([len, 1]); // [c, 1]
        let p = (z.clone() - lse.clone().narrow(0, start, len).reshape([len, 1])).exp();
        let t = targets.clone().narrow(0, start, len).reshape([len, 1]);
        let mut dz = (p * coef.clone()).scatter(1, t, coef.neg(), IndexingUpdateOp::Add); // [c, v]
        if let Some(c) = s.spec.softcap {
            let y = z.div_scalar(c);
            dz = dz * (y.clone() * y).neg().add_scalar(1.0);
        }
        // dh = dz·Wᵀ in the head's layout, multiplied in W's dtype, f32 out.
        let (dz_p, w_p) = (dz.clone().into_primitive().tensor(), w.clone().into_primitive().tensor());
        let dh = match s.spec.layout {
            HeadLayout::InOut => B::frozen_matmul_dx(dz_p, w_p), // [c, v] x [e, v]ᵀ
            HeadLayout::OutIn => B::frozen_matmul(dz_p, w_p),    // [c, v] x [v, e]
        };
        dhs.push(float::<B, 2>(dh).cast(h_dtype));
        if want_w {
            let dzw = dz.cast(w_dtype);
            let hcw = hc.cast(w_dtype);
            let part = match s.spec.layout {
                HeadLayout::InOut => hcw.transpose().matmul(dzw), // [e, c] x [c, v]
                HeadLayout::OutIn => dzw.transpose().matmul(hcw), // [v, c] x [c, e]
            };
            dw = Some(match dw {
                Some(acc) => acc + part,
                None => part,
            });
        }
    }
    let dh = Tensor::cat(dhs, 0).into_primitive().tensor();
    (dh, dw.map(|t| t.into_primitive().tensor()))
}

#[derive(Debug, Clone)]
struct State<B: Backend> {
    h: FloatTensor<B>,
    w: FloatTensor<B>,
    targets: IntTensor<B>,
    mask: FloatTensor<B>,
    lse: FloatTensor<B>,
    spec: HeadLoss,
}

#[derive(Debug)]
struct LmHeadLossBackward;

impl<B: FrozenMatmul> Backward<B, 2> for LmHeadLossBackward {
    type State = State<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_h, node_w] = ops.parents;
        let g = grads.consume::<B>(&ops.node);
        let (dh, dw) = backward::<B>(g, &ops.state, node_w.is_some());
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
        match LmHeadLossBackward.prepare::<C>([h.node.clone(), w.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (loss, lse) = forward::<B>(h.primitive.clone(), w.primitive.clone(), targets.clone(), mask.clone(), spec);
                prep.finish(State { h: h.primitive, w: w.primitive, targets, mask, lse, spec }, loss)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward::<B>(h.primitive, w.primitive, targets, mask, spec).0),
        }
    }
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> LmHeadLoss for NdArray<E, I, Q> where NdArrayTensor: From<SharedArray<E>> + From<SharedArray<I>> {}

#[cfg(feature = "cubecl")]
impl<R: burn_cubecl::CubeRuntime, F: burn_cubecl::FloatElement, I: burn_cubecl::IntElement, BT: burn_cubecl::BoolElement> LmHeadLoss for burn_cubecl::CubeBackend<R, F, I, BT> {}

#[cfg(feature = "cubecl")]
impl<B: burn_fusion::FusionBackend> LmHeadLoss for burn_fusion::Fusion<B> {}
