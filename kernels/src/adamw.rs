//! One AdamW update, gradient clipping included, as one operation.
//!
//! As plain tensor operations an update is about a dozen elementwise kernels per parameter
//! (moments, bias corrections, square root, decay, step); a LoRA model has hundreds of small
//! parameters, each kernel costing more to launch than to run. The trainer lays all parameters
//! end to end in one buffer (`train::optim`), so here a whole step is one kernel. The clip
//! factor is computed inside it from the device's sum of squared gradients, so nothing waits
//! for the gradient norm to reach the host before the update is queued. The formulas are
//! PyTorch's `clip_grad_norm_` and `torch.optim.AdamW` (decoupled weight decay applied before
//! the step):
//!
//! `s = c / (‖g‖ + 10⁻⁶)` if `c > 0` and `‖g‖ > c`, else 1; `g ← s·g`,
//! `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
//! `p ← p·(1 − lr·wd) − lr · (m / c₁) / (sqrt(v / c₂) + ε)`, `cᵢ = 1 − βᵢᵗ`.

use burn::tensor::ops::FloatTensor;
use burn::tensor::{backend::Backend, Tensor, TensorData};
use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray};

use crate::float;

/// The scalars of one update, shared by every parameter of a step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the gradient to this global L2 norm first; 0 turns clipping off.
    pub max_grad_norm: f64,
    /// Updates so far, this one included (PyTorch's `step`, for the bias corrections).
    pub t: i32,
}

impl AdamWStep {
    /// `[c, β₁, 1−β₁, β₂, 1−β₂, c₁, c₂, ε, lr, 1 − lr·wd]`, what the kernel reads.
    fn scalars(&self) -> [f32; 10] {
        let decay = if self.weight_decay > 0.0 { 1.0 - self.lr * self.weight_decay } else { 1.0 };
        [self.max_grad_norm, self.beta1, 1.0 - self.beta1, self.beta2, 1.0 - self.beta2, 1.0 - self.beta1.powi(self.t), 1.0 - self.beta2.powi(self.t), self.eps, self.lr, decay].map(|x| x as f32)
    }

    /// The scalars as a device tensor, what [`AdamWOp::adamw`] takes.
    pub fn to_device<B: Backend>(&self, device: &B::Device) -> Tensor<B, 1> {
        Tensor::from_data(TensorData::new(self.scalars().to_vec(), [10]), device)
    }
}

/// Backend extension: `(p, m, v)` after one update of the flat parameter `p` `[n]` with gradient
/// `g` and moments `m`, `v`. `scalars` is [`AdamWStep::to_device`] of `step`; `square_sum` `[1]`
/// is the sum of the squares of every gradient the clipping covers (`g`'s own, when it is the
/// only one). The default method is the composition (the reference, and what the CPU runs).
pub trait AdamWOp: Backend {
    /// `parts` (f32, `[lenᵢ]` each) laid out in one `[total]` tensor, part `i` from element
    /// `offsets[i]` on, zeros between them: how the trainer lays a step's gradients end to end
    /// for [`AdamWOp::adamw`]. The default is [`gather_composition`]; on CUDA all the copies are
    /// one launch (a LoRA model has hundreds of parts, each a launch the host pays for).
    fn gather(parts: Vec<FloatTensor<Self>>, offsets: &[usize], total: usize, device: &Self::Device) -> FloatTensor<Self> {
        gather_composition::<Self>(parts, offsets, total, device)
    }

    fn adamw(p: FloatTensor<Self>, g: FloatTensor<Self>, m: FloatTensor<Self>, v: FloatTensor<Self>, step: &AdamWStep, scalars: FloatTensor<Self>, square_sum: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let _ = scalars;
        let (p, g, m, v) = (float::<Self, 1>(p), float::<Self, 1>(g), float::<Self, 1>(m), float::<Self, 1>(v));
        let s = step;
        let g = match s.max_grad_norm > 0.0 {
            true => {
                let norm = float::<Self, 1>(square_sum).sqrt();
                let clipped = Tensor::full([1], s.max_grad_norm, &g.device()).div(norm.clone().add_scalar(1e-6));
                let scale = Tensor::ones([1], &g.device()).mask_where(norm.greater_elem(s.max_grad_norm), clipped);
                g * scale
            }
            false => g,
        };
        let m = m.mul_scalar(s.beta1) + g.clone().mul_scalar(1.0 - s.beta1);
        let v = v.mul_scalar(s.beta2) + g.powi_scalar(2).mul_scalar(1.0 - s.beta2);
        let m_hat = m.clone().div_scalar(1.0 - s.beta1.powi(s.t));
        let v_hat = v.clone().div_scalar(1.0 - s.beta2.powi(s.t));
        let delta = m_hat.div(v_hat.sqrt().add_scalar(s.eps)).mul_scalar(s.lr);
        let p = if s.weight_decay > 0.0 { p.mul_scalar(1.0 - s.lr * s.weight_decay) } else { p };
        ((p - delta).into_primitive().tensor(), m.into_primitive().tensor(), v.into_primitive().tensor())
    }
}

/// `parts` laid out in one `[total]` tensor, part `i` (`[lenᵢ]`) from element `offsets[i]` on,
/// zeros between them, as tensor operations: one `slice_assign` per part.
pub fn gather_composition<B: Backend>(parts: Vec<FloatTensor<B>>, offsets: &[usize], total: usize, device: &B::Device) -> FloatTensor<B> {
    let mut out = Tensor::<B, 1>::zeros([total], device);
    for (part, &at) in parts.into_iter().zip(offsets) {
        let part = float::<B, 1>(part);
        let len = part.dims()[0];
        out = out.slice_assign(at..at + len, part);
    }
    out.into_primitive().tensor()
}

/// `parts` end to end in one buffer through [`AdamWOp::gather`]: the typed entry point.
pub fn gather<B: AdamWOp>(parts: Vec<Tensor<B, 1>>, offsets: &[usize], total: usize, device: &B::Device) -> Tensor<B, 1> {
    float(B::gather(parts.into_iter().map(|t| t.into_primitive().tensor()).collect(), offsets, total, device))
}

/// One update through [`AdamWOp`]: the typed entry point.
pub fn adamw<B: AdamWOp>(p: Tensor<B, 1>, g: Tensor<B, 1>, m: Tensor<B, 1>, v: Tensor<B, 1>, step: &AdamWStep, scalars: Tensor<B, 1>, square_sum: Tensor<B, 1>) -> (Tensor<B, 1>, Tensor<B, 1>, Tensor<B, 1>) {
    let (p, m, v) = B::adamw(p.into_primitive().tensor(), g.into_primitive().tensor(), m.into_primitive().tensor(), v.into_primitive().tensor(), step, scalars.into_primitive().tensor(), square_sum.into_primitive().tensor());
    (float(p), float(m), float(v))
}

impl<B: AdamWOp, C: CheckpointStrategy> AdamWOp for Autodiff<B, C> {}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> AdamWOp for NdArray<E, I, Q> where NdArrayTensor: From<SharedArray<E>> + From<SharedArray<I>> {}

#[cfg(feature = "cubecl")]
impl<B: burn_fusion::FusionBackend> AdamWOp for burn_fusion::Fusion<B> {}

#[cfg(feature = "cubecl")]
pub(crate) mod cube {
    use burn::tensor::ops::FloatTensor;
    use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use cubecl::prelude::*;
    use cubecl::{cube, CubeDim};

    use super::{AdamWOp, AdamWStep};
    use crate::cube::{contiguous_float, flat_count, flat_index, FLAT_THREADS};

    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    fn adamw_kernel<F: Float>(p: &Tensor<F>, g: &Tensor<F>, m: &Tensor<F>, v: &Tensor<F>, s: &Tensor<F>, square_sum: &Tensor<F>, p_out: &mut Tensor<F>, m_out: &mut Tensor<F>, v_out: &mut Tensor<F>) {
        let i = flat_index();
        if i < p.len() {
            // Every thread derives the clip factor itself: one read of a cached scalar is
            // cheaper than a separate launch.
            let norm = F::sqrt(square_sum[0]);
            let mut scale = F::new(1.0);
            if s[0] > F::new(0.0) {
                if norm > s[0] {
                    scale = s[0] / (norm + F::new(1e-6));
                }
            }
            let gi = g[i] * scale;
            let mi = m[i] * s[1] + gi * s[2];
            let vi = v[i] * s[3] + gi * gi * s[4];
            let delta = (mi / s[5]) / (F::sqrt(vi / s[6]) + s[7]) * s[8];
            p_out[i] = p[i] * s[9] - delta;
            m_out[i] = mi;
            v_out[i] = vi;
        }
    }

    fn like<R: CubeRuntime, F: FloatElement>(t: &CubeTensor<R>) -> CubeTensor<R> {
        empty_device_contiguous_dtype(t.client.clone(), t.device.clone(), t.meta.shape().clone(), F::dtype())
    }

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> AdamWOp for CubeBackend<R, F, I, BT> {
        fn gather(parts: Vec<FloatTensor<Self>>, offsets: &[usize], total: usize, device: &Self::Device) -> FloatTensor<Self> {
            #[cfg(feature = "cuda")]
            if let Some(out) = crate::cublas::gather::<R>(&parts, offsets, total) {
                return out;
            }
            super::gather_composition::<Self>(parts, offsets, total, device)
        }

        fn adamw(p: FloatTensor<Self>, g: FloatTensor<Self>, m: FloatTensor<Self>, v: FloatTensor<Self>, _step: &AdamWStep, scalars: FloatTensor<Self>, square_sum: FloatTensor<Self>) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            let (p, g, m, v, s) = (contiguous_float::<R, F>(p), contiguous_float::<R, F>(g), contiguous_float::<R, F>(m), contiguous_float::<R, F>(v), contiguous_float::<R, F>(scalars));
            let square_sum = contiguous_float::<R, F>(square_sum);
            let (p_out, m_out, v_out) = (like::<R, F>(&p), like::<R, F>(&p), like::<R, F>(&p));
            let n = p.meta.shape().num_elements();
            if n == 0 {
                return (p_out, m_out, v_out);
            }
            let client = p.client.clone();
            // SAFETY: `p`, `g`, `m`, `v` and the outputs are contiguous `[n]`, `s` holds the ten
            // scalars and `square_sum` one; the kernel checks the flat index against the length.
            unsafe {
                adamw_kernel::launch_unchecked::<F, R>(
                    &client,
                    flat_count(n),
                    CubeDim { x: FLAT_THREADS, y: 1, z: 1 },
                    p.into_tensor_arg(),
                    g.into_tensor_arg(),
                    m.into_tensor_arg(),
                    v.into_tensor_arg(),
                    s.into_tensor_arg(),
                    square_sum.into_tensor_arg(),
                    p_out.clone().into_tensor_arg(),
                    m_out.clone().into_tensor_arg(),
                    v_out.clone().into_tensor_arg(),
                );
            }
            (p_out, m_out, v_out)
        }
    }
}
