//! Rotary position embedding (rotate-half convention) as one operation with its own backward.
//!
//! `y = x · cos + rotate_half(x) · sin` over the first `r` features of each head (the rest pass
//! through), `rotate_half([x1, x2]) = [−x2, x1]`. As plain tensor operations the tape keeps `x`
//! and its rotated copy for backward, for queries and keys in every layer. The rotation is
//! orthogonal, so its gradient is the inverse rotation, `dx = rope(dy, cos, −sin)` (the tables
//! hold `cat(freqs, freqs)`, so both halves of `sin` are equal): the operation keeps nothing but
//! the tables, which every layer shares.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{backend::Backend, Tensor};

use crate::float;

/// Backend extension: rope of `x` `[b, h, s, d]` with tables `cos`, `sin` `[b or 1, s, r]`,
/// `r ≤ d` even. The default method is the plain composition (the reference).
pub trait RopeOp: Backend {
    fn rope(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        rope_composition::<Self>(float(x), float(cos), float(sin)).into_primitive().tensor()
    }
}

/// Rope through [`RopeOp`]: the typed entry point.
pub fn rope<B: RopeOp>(x: Tensor<B, 4>, cos: Tensor<B, 3>, sin: Tensor<B, 3>) -> Tensor<B, 4> {
    float(B::rope(x.into_primitive().tensor(), cos.into_primitive().tensor(), sin.into_primitive().tensor()))
}

/// Rope as plain tensor operations: what the op computes, and what it is checked against.
pub fn rope_composition<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 3>, sin: Tensor<B, 3>) -> Tensor<B, 4> {
    let d = x.dims()[3];
    let r = cos.dims()[2];
    let (rot, pass) = if r < d { (x.clone().narrow(3, 0, r), Some(x.narrow(3, r, d - r))) } else { (x, None) };
    let x1 = rot.clone().narrow(3, 0, r / 2);
    let x2 = rot.clone().narrow(3, r / 2, r / 2);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3); // [b, h, s, r]
    let out = rot * cos.unsqueeze_dim::<4>(1) + rotated * sin.unsqueeze_dim::<4>(1); // tables [b, s, r] -> [b, 1, s, r]
    match pass {
        Some(p) => Tensor::cat(vec![out, p], 3), // [b, h, s, d]
        None => out,
    }
}


#[derive(Debug)]
struct RopeBackward;

impl<B: RopeOp> Backward<B, 1> for RopeBackward {
    /// The tables.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        if let Some(node) = node {
            let (cos, sin) = ops.state;
            let minus_sin = float::<B, 3>(sin).neg().into_primitive().tensor();
            grads.register::<B>(node.id, B::rope(dy, cos, minus_sin));
        }
    }
}

impl<B: RopeOp, C: CheckpointStrategy> RopeOp for Autodiff<B, C> {
    fn rope(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        let y = B::rope(x.primitive.clone(), cos.primitive.clone(), sin.primitive.clone());
        // The tables are positions, not parameters: only `x` is differentiated.
        match RopeBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((cos.primitive, sin.primitive), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> RopeOp for NdArray<E, I, Q> where NdArrayTensor: From<SharedArray<E>> + From<SharedArray<I>> {}

#[cfg(feature = "cubecl")]
impl<B: burn_fusion::FusionBackend> RopeOp for burn_fusion::Fusion<B> {}

#[cfg(feature = "cubecl")]
// Kernel code assigns a placeholder before a branch sets the value (CubeCL expands both arms).
#[allow(unused_assignments)]
pub(crate) mod cube {
    use burn::tensor::ops::FloatTensor;
    use burn::tensor::Shape;
    use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use cubecl::prelude::*;
    use crate::cube::contiguous_float;
    use cubecl::{cube, CubeDim};

    use super::RopeOp;

    use crate::cube::{flat_count, flat_index, FLAT_THREADS};

    /// One thread per element of `x` `[b, h, s, d]`.
    #[cube(launch_unchecked)]
    fn rope_kernel<F: Float>(x: &Tensor<F>, cos: &Tensor<F>, sin: &Tensor<F>, y: &mut Tensor<F>) {
        let index = flat_index();
        if index < y.len() {
            let h = x.shape(1);
            let s = x.shape(2);
            let d = x.shape(3);
            let r = cos.shape(2);
            let half = r / 2;
            let j = index % d;
            let row = index / d; // (bi·h + head)·s + pos
            let pos = row % s;
            let mut tb = row / (h * s);
            if cos.shape(0) == 1 {
                tb = 0;
            }
            let mut out = x[index];
            if j < r {
                let at = (tb * s + pos) * r + j;
                let mut partner = F::new(0.0);
                if j < half {
                    partner = -x[index + half];
                } else {
                    partner = x[index - half];
                }
                out = x[index] * cos[at] + partner * sin[at];
            }
            y[index] = out;
        }
    }


    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> RopeOp for CubeBackend<R, F, I, BT> {
        fn rope(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
            let (x, cos, sin) = (contiguous_float::<R, F>(x), contiguous_float::<R, F>(cos), contiguous_float::<R, F>(sin));
            let [b, h, s, d] = x.meta.shape().dims::<4>();
            let y = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), Shape::new([b, h, s, d]), F::dtype());
            let n = b * h * s * d;
            if n == 0 {
                return y;
            }
            let client = x.client.clone();
            // SAFETY: the kernel bounds-checks the flat index; tables `[b or 1, s, r]`, `r ≤ d`
            // even, contiguous (above), so the partner index stays inside the element's row.
            unsafe {
                rope_kernel::launch_unchecked::<F, R>(&client, flat_count(n), CubeDim { x: FLAT_THREADS, y: 1, z: 1 }, x.into_tensor_arg(), cos.into_tensor_arg(), sin.into_tensor_arg(), y.clone().into_tensor_arg());
            }
            y
        }
    }
}
