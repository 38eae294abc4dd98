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

    /// Whether `x` `[b, h, s, d]` is laid out positions before heads: a projection's `[b, s, h,
    /// d]` output seen through a transposed view, as attention's queries and keys are. The
    /// default says no (it has no layouts to tell apart).
    fn positions_first(x: &FloatTensor<Self>) -> bool {
        let _ = x;
        false
    }

    /// The gradient of [`RopeOp::rope`] for `dy` `[b, h, s, d]`: `rope(dy, cos, −sin)`, written
    /// positions before heads when the forward's input was ([`RopeOp::positions_first`]), so
    /// the transpose's gradient and the reshape to the projection's `[b, s, h·d]` that follow
    /// are views rather than a copy. The default ignores the layout.
    fn rope_bwd(dy: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>, positions_first: bool) -> FloatTensor<Self> {
        let _ = positions_first;
        let minus_sin = float::<Self, 3>(sin).neg().into_primitive().tensor();
        Self::rope(dy, cos, minus_sin)
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
    /// The tables, and whether the input was laid out positions first.
    type State = (FloatTensor<B>, FloatTensor<B>, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        if let Some(node) = node {
            let (cos, sin, positions_first) = ops.state;
            grads.register::<B>(node.id, B::rope_bwd(dy, cos, sin, positions_first));
        }
    }
}

impl<B: RopeOp, C: CheckpointStrategy> RopeOp for Autodiff<B, C> {
    fn rope(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        let positions_first = B::positions_first(&x.primitive);
        let y = B::rope(x.primitive.clone(), cos.primitive.clone(), sin.primitive.clone());
        // The tables are positions, not parameters: only `x` is differentiated.
        match RopeBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((cos.primitive, sin.primitive, positions_first), y),
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
    use burn::tensor::ops::{FloatTensor, FloatTensorOps};
    use burn::tensor::Shape;
    use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use cubecl::prelude::*;
    use crate::cube::{as_float, contiguous_float};
    use cubecl::{cube, CubeDim};

    use super::RopeOp;


    /// Units a cube has at least (while heads last): a cube of one head's `d` units was too
    /// small to keep the card busy (100 µs a Llama-shape call, ~4× its bandwidth time).
    const UNITS: usize = 256;

    /// One cube per position and group of heads (`CUBE_DIM_Y` of them) of `y` `[b, h, s, d]` (cube position:
    /// position, head group, batch row), one unit per feature and head, so no thread divides
    /// to find its place. `x` and `y` are indexed through their strides: either may be a
    /// transposed view (the projection's `[b, s, h, d]`).
    #[cube(launch_unchecked)]
    fn rope_kernel<F: Float>(x: &Tensor<F>, cos: &Tensor<F>, sin: &Tensor<F>, y: &mut Tensor<F>) {
        let j = UNIT_POS_X as usize;
        let pos = CUBE_POS_X as usize;
        let head = (CUBE_POS_Y * CUBE_DIM_Y + UNIT_POS_Y) as usize;
        let bi = CUBE_POS_Z as usize;
        if head >= y.shape(1) {
            terminate!();
        }
        let s = y.shape(2);
        let r = cos.shape(2);
        let half = r / 2;
        let xi = bi * x.stride(0) + head * x.stride(1) + pos * x.stride(2) + j * x.stride(3);
        let yi = bi * y.stride(0) + head * y.stride(1) + pos * y.stride(2) + j * y.stride(3);
        let mut tb = bi;
        if cos.shape(0) == 1 {
            tb = 0;
        }
        let mut out = x[xi];
        if j < r {
            let at = (tb * s + pos) * r + j;
            let mut partner = F::new(0.0);
            if j < half {
                partner = -x[xi + half * x.stride(3)];
            } else {
                partner = x[xi - half * x.stride(3)];
            }
            out = x[xi] * cos[at] + partner * sin[at];
        }
        y[yi] = out;
    }

    /// Rope of `x` (any layout) into `y` (same logical shape, any layout).
    fn launch<R: CubeRuntime, F: FloatElement>(x: CubeTensor<R>, cos: CubeTensor<R>, sin: CubeTensor<R>, y: CubeTensor<R>) {
        let (x, cos, sin) = (as_float::<R, F>(x), contiguous_float::<R, F>(cos), contiguous_float::<R, F>(sin));
        let [b, h, s, d] = y.meta.shape().dims::<4>();
        if b * h * s * d == 0 {
            return;
        }
        let client = x.client.clone();
        // SAFETY: the grid covers `[b, h, s]` with `d` units a row, `y`'s shape, which is `x`'s
        // (units of heads past `h` return first); tables `[b or 1, s, r]`, `r ≤ d` even,
        // contiguous (above), so the partner index stays inside the element's row.
        unsafe {
            let heads = (UNITS / d).clamp(1, h);
            rope_kernel::launch_unchecked::<F, R>(&client, CubeCount::Static(s as u32, h.div_ceil(heads) as u32, b as u32), CubeDim { x: d as u32, y: heads as u32, z: 1 }, x.into_tensor_arg(), cos.into_tensor_arg(), sin.into_tensor_arg(), y.into_tensor_arg());
        }
    }

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> RopeOp for CubeBackend<R, F, I, BT> {
        // `x` is read in place, whatever its layout: the queries' and keys' transposed views are
        // not copied first.
        fn rope(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
            let [b, h, s, d] = x.meta.shape().dims::<4>();
            let y = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), Shape::new([b, h, s, d]), F::dtype());
            launch::<R, F>(x, cos, sin, y.clone());
            y
        }

        fn positions_first(x: &FloatTensor<Self>) -> bool {
            let strides = x.meta.strides();
            strides[1] < strides[2]
        }

        fn rope_bwd(dy: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>, positions_first: bool) -> FloatTensor<Self> {
            let minus_sin = Self::float_neg(sin);
            if !positions_first {
                return Self::rope(dy, cos, minus_sin);
            }
            let [b, h, s, d] = dy.meta.shape().dims::<4>();
            let dx = empty_device_contiguous_dtype(dy.client.clone(), dy.device.clone(), Shape::new([b, s, h, d]), F::dtype());
            let dx = Self::float_swap_dims(dx, 1, 2); // [b, s, h, d] seen as [b, h, s, d]
            launch::<R, F>(dy, cos, minus_sin, dx.clone());
            dx
        }
    }
}
