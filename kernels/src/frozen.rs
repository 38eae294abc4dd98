//! Products with a frozen weight held in a narrower dtype than the activations (bf16 under
//! `run.dtype = "bf16"`), returning f32.
//!
//! As tensor operations the product is `cast(cast(x, bf16) · W, f32)`: four passes of casting
//! per projection, forward and backward (the input, the output, and in backward the output's
//! gradient and the input's). The matmul kernels accumulate in f32 anyway, so this operation
//! asks them for an f32 result directly: forward and backward each cast only what enters the
//! tensor cores. The weight is frozen: the backward gives `dx = dy · Wᵀ` and nothing else, and
//! keeps only the weight (which the model holds anyway).

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{backend::Backend, FloatDType, Tensor};

use crate::float;

/// Backend extension: `x [m, k] · W [k, n] -> [m, n]` in f32, multiplied in `W`'s dtype.
/// The default methods are the composition, [`matmul_as`] (the reference).
pub trait FrozenMatmul: Backend {
    /// `y = cast(x, W's dtype) · W`, in f32.
    fn frozen_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let w = float::<Self, 2>(w);
        let dtype = FloatDType::from(w.dtype());
        matmul_as(float::<Self, 2>(x), w, dtype).into_primitive().tensor()
    }

    /// `dx = cast(dy, W's dtype) · Wᵀ`, in f32.
    fn frozen_matmul_dx(dy: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let w = float::<Self, 2>(w);
        let dtype = FloatDType::from(w.dtype());
        matmul_as(float::<Self, 2>(dy), w.transpose(), dtype).into_primitive().tensor()
    }
}

/// `lhs · rhs` computed in `dtype`, returned in f32 (kiln's activations are f32 throughout) as
/// plain tensor operations: cast both, multiply, cast back. What [`FrozenMatmul`] replaces, and
/// the tied LM head's product with a bf16 copy of the embedding. Casts to a tensor's own dtype
/// are free.
pub fn matmul_as<B: Backend, const D: usize>(lhs: Tensor<B, D>, rhs: Tensor<B, D>, dtype: FloatDType) -> Tensor<B, D> {
    lhs.cast(dtype).matmul(rhs.cast(dtype)).cast(FloatDType::F32)
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
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> FrozenMatmul for NdArray<E, I, Q> where NdArrayTensor: From<SharedArray<E>> + From<SharedArray<I>> {}

#[cfg(feature = "cubecl")]
impl<B: burn_fusion::FusionBackend> FrozenMatmul for burn_fusion::Fusion<B> {}

#[cfg(feature = "cubecl")]
pub(crate) mod cube {
    use burn::tensor::ops::{FloatTensor, FloatTensorOps};
    use burn::tensor::DType;
    use burn_cubecl::kernel::cast;
    use burn_cubecl::kernel::matmul::{matmul, MatmulStrategy};
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

    use super::FrozenMatmul;

    /// `lhs · rhs` with `lhs` cast to `rhs`'s dtype, written in f32 by the matmul kernel itself
    /// (it accumulates in f32 for bf16 inputs: the f32 result is that accumulator, unrounded).
    fn product_f32<R: CubeRuntime>(lhs: CubeTensor<R>, rhs: CubeTensor<R>) -> CubeTensor<R> {
        let lhs = cast(lhs, rhs.dtype);
        // Burn's own float matmul unwraps the same call: with autotune it always finds a kernel.
        matmul(lhs, rhs, None, MatmulStrategy::default(), DType::F32).expect("a matmul kernel for a dense 2-D product")
    }

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> FrozenMatmul for CubeBackend<R, F, I, BT> {
        fn frozen_matmul(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
            product_f32(x, w)
        }

        fn frozen_matmul_dx(dy: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
            // A transposed view: the matmul reads it in place, as Burn's own backward does.
            product_f32(dy, Self::float_transpose(w))
        }
    }
}
