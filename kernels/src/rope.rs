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


    /// Units a cube has at least (while heads last): a cube of one head's units was too small
    /// to keep the card busy.
    const UNITS: usize = 256;

    /// Positions a unit takes. Its loads for all of them are issued before its first store, so
    /// that enough bytes are in flight to keep memory busy: with one element a unit, a
    /// Llama-3.2-1B step's 64 calls took 3.4 ms on an H200, ~3× their bandwidth time
    /// (bench/RESULTS.md).
    const POSITIONS: usize = 4;

    /// One cube per [`POSITIONS`] positions and group of heads (`CUBE_DIM_Y` of them) of `y`
    /// `[b, h, s, d]` (cube position: position block, head group, batch row). Unit `j < r/2`
    /// rotates the pair of features `j`, `j + r/2`; the units past it copy two of the features
    /// past `r` each. `x` and `y` are indexed through their strides: either may be a transposed
    /// view (the projection's `[b, s, h, d]`). `inverse` rotates by `−sin` (the backward).
    #[cube(launch_unchecked)]
    fn rope_kernel<F: Float>(x: &Tensor<F>, cos: &Tensor<F>, sin: &Tensor<F>, y: &mut Tensor<F>, #[comptime] inverse: bool) {
        let j = UNIT_POS_X as usize;
        let head = (CUBE_POS_Y * CUBE_DIM_Y + UNIT_POS_Y) as usize;
        let bi = CUBE_POS_Z as usize;
        if head >= y.shape(1) {
            terminate!();
        }
        let s = y.shape(2);
        let d = y.shape(3);
        let r = cos.shape(2);
        let half = r / 2;
        let mut tb = bi;
        if cos.shape(0) == 1 {
            tb = 0;
        }
        // The unit's two features: a rotated pair, or two passed through.
        let mut e0 = j;
        let mut e1 = j + half;
        if j >= half {
            e0 = r + 2 * (j - half);
            e1 = e0 + 1;
        }
        let (xs, ys) = (x.stride(3), y.stride(3));
        let xrow = bi * x.stride(0) + head * x.stride(1);
        let yrow = bi * y.stride(0) + head * y.stride(1);
        let first = CUBE_POS_X as usize * POSITIONS;
        let mut a = Array::<F>::new(POSITIONS);
        let mut b = Array::<F>::new(POSITIONS);
        let mut c0 = Array::<F>::new(POSITIONS);
        let mut c1 = Array::<F>::new(POSITIONS);
        let mut s0 = Array::<F>::new(POSITIONS);
        let mut s1 = Array::<F>::new(POSITIONS);
        #[unroll]
        for p in 0..POSITIONS {
            let pos = first + p;
            a[p] = F::new(0.0);
            b[p] = F::new(0.0);
            c0[p] = F::new(1.0);
            c1[p] = F::new(1.0);
            s0[p] = F::new(0.0);
            s1[p] = F::new(0.0);
            if pos < s && e0 < d {
                let xi = xrow + pos * x.stride(2);
                a[p] = x[xi + e0 * xs];
                if e1 < d {
                    b[p] = x[xi + e1 * xs];
                }
                if j < half {
                    let at = (tb * s + pos) * r + j;
                    c0[p] = cos[at];
                    c1[p] = cos[at + half];
                    s0[p] = sin[at];
                    s1[p] = sin[at + half];
                }
            }
        }
        #[unroll]
        for p in 0..POSITIONS {
            let pos = first + p;
            if pos < s && e0 < d {
                let (mut sa, mut sb) = (s0[p], s1[p]);
                if inverse {
                    sa = -sa;
                    sb = -sb;
                }
                // y[j] = x[j]·cos − x[j + r/2]·sin, y[j + r/2] = x[j + r/2]·cos + x[j]·sin;
                // outside the rotation cos = 1 and sin = 0.
                let yi = yrow + pos * y.stride(2);
                y[yi + e0 * ys] = a[p] * c0[p] - b[p] * sa;
                if e1 < d {
                    y[yi + e1 * ys] = b[p] * c1[p] + a[p] * sb;
                }
            }
        }
    }

    /// Rope of `x` (any layout) into `y` (same logical shape, any layout); `inverse` by `−sin`.
    fn launch<R: CubeRuntime, F: FloatElement>(x: CubeTensor<R>, cos: CubeTensor<R>, sin: CubeTensor<R>, y: CubeTensor<R>, inverse: bool) {
        let (x, cos, sin) = (as_float::<R, F>(x), contiguous_float::<R, F>(cos), contiguous_float::<R, F>(sin));
        let [b, h, s, d] = y.meta.shape().dims::<4>();
        if b * h * s * d == 0 {
            return;
        }
        let client = x.client.clone();
        // Units a row: r/2 pairs and (d − r)/2 pairs of passed features, d/2 rounded up.
        let units = d.div_ceil(2);
        // SAFETY: the grid covers `[b, h, s]` (positions past `s` and heads past `h` touch
        // nothing), `units` a row, each unit two features below `d`; `y` has `x`'s shape; the
        // tables `[b or 1, s, r]`, `r ≤ d` even, contiguous (above), read at `j, j + r/2 < r`.
        unsafe {
            let heads = (UNITS / units).clamp(1, h);
            let count = CubeCount::Static(s.div_ceil(POSITIONS) as u32, h.div_ceil(heads) as u32, b as u32);
            rope_kernel::launch_unchecked::<F, R>(&client, count, CubeDim { x: units as u32, y: heads as u32, z: 1 }, x.into_tensor_arg(), cos.into_tensor_arg(), sin.into_tensor_arg(), y.into_tensor_arg(), inverse);
        }
    }

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> RopeOp for CubeBackend<R, F, I, BT> {
        // `x` is read in place, whatever its layout: the queries' and keys' transposed views are
        // not copied first.
        fn rope(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
            let [b, h, s, d] = x.meta.shape().dims::<4>();
            let y = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), Shape::new([b, h, s, d]), F::dtype());
            launch::<R, F>(x, cos, sin, y.clone(), false);
            y
        }

        fn positions_first(x: &FloatTensor<Self>) -> bool {
            let strides = x.meta.strides();
            strides[1] < strides[2]
        }

        // The inverse rotation in the kernel: no `−sin` table is made each call.
        fn rope_bwd(dy: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>, positions_first: bool) -> FloatTensor<Self> {
            let [b, h, s, d] = dy.meta.shape().dims::<4>();
            let dx = match positions_first {
                // [b, s, h, d] seen as [b, h, s, d]
                true => Self::float_swap_dims(empty_device_contiguous_dtype(dy.client.clone(), dy.device.clone(), Shape::new([b, s, h, d]), F::dtype()), 1, 2),
                false => empty_device_contiguous_dtype(dy.client.clone(), dy.device.clone(), Shape::new([b, h, s, d]), F::dtype()),
            };
            launch::<R, F>(dy, cos, sin, dx.clone(), true);
            dx
        }
    }
}
