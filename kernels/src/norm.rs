//! RMSNorm as one operation with its own backward: `y = x · rstd · (offset + w)`,
//! `rstd = 1 / sqrt(mean(x²) + eps)` over the last dimension (Gemma stores `w` as an offset
//! from one: `offset = 1`; the others `offset = 0`).
//!
//! As plain tensor operations the tape keeps `x`, `x²`'s mean, the normalised `x` and the
//! scaled output for backward; here it keeps `x` and one float per row (`rstd`), and the
//! CubeCL backends run the forward and the input gradient as one kernel each, a cube per row:
//! `dx = rstd · w'·dy − x · rstd³ · mean(w'·dy·x)` with `w' = offset + w`. The weight's
//! gradient (`Σ_rows dy · x · rstd`) is a column sum, left to Burn's reduction. The norm takes
//! its input whole (not a view of its rows), so its backward adds `dx` into the gradient the
//! residual stream's other reader left (the residual addition after the block), in the same
//! kernel, rather than a separate f32 addition over the stream.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{backend::Backend, FloatDType, Tensor};

use crate::{as_rows, float, from_rows, take_grad};

/// Backend extension: RMSNorm over the last dimension of `x` `[.., d]` (its `n` rows) with
/// weight `w` `[d]`. The default methods are the plain tensor composition (the reference).
pub trait RmsNormOp: Backend {
    /// `(y [.., d], rstd [n])`, `y` written in `out` (f32, or a half type where every reader of
    /// `y` multiplies in it).
    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64, offset: f64, out: FloatDType) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (x, dims) = as_rows::<Self>(x);
        let x = float::<Self, 2>(x);
        let [n, _] = x.dims();
        let rms = x.clone().powi_scalar(2).mean_dim(1).add_scalar(eps).sqrt(); // [n, 1]
        // x / rms rather than x · (1 / rms): the rounding the unfused model (and its parity
        // with transformers) was measured with.
        let y = x.div(rms.clone()) * float::<Self, 1>(w).add_scalar(offset).unsqueeze::<2>();
        // 1 / rms as a division: Burn's CPU `recip` is an approximate SIMD reciprocal (off by up
        // to 4e-5 relative, on whichever elements the buffer's alignment puts in SIMD lanes), which
        // made `dx` inexact and training on the CPU differ from run to run.
        let rstd = rms.ones_like() / rms;
        (from_rows::<Self>(y.cast(out).into_primitive().tensor(), dims), rstd.reshape([n]).into_primitive().tensor())
    }

    /// `acc + dx` `[n, d]` for the upstream gradient `dy` `[n, d]` (f32; `acc` the input's
    /// gradient so far, `[n, d]` f32, if any).
    fn rms_norm_dx(dy: FloatTensor<Self>, x: FloatTensor<Self>, w: FloatTensor<Self>, rstd: FloatTensor<Self>, offset: f64, acc: Option<FloatTensor<Self>>) -> FloatTensor<Self> {
        let (dy, x) = (float::<Self, 2>(dy), float::<Self, 2>(x));
        let [n, d] = x.dims();
        let r = float::<Self, 1>(rstd).reshape([n, 1]);
        let g = dy * float::<Self, 1>(w).add_scalar(offset).unsqueeze::<2>(); // w'·dy
        let s = (g.clone() * x.clone()).sum_dim(1).div_scalar(d as f64); // [n, 1]
        let dx = g * r.clone() - x * r.clone().powi_scalar(3) * s;
        match acc {
            Some(acc) => (float::<Self, 2>(acc) + dx).into_primitive().tensor(),
            None => dx.into_primitive().tensor(),
        }
    }
}

/// RMSNorm as plain tensor operations over the last dimension of `x` `[n, d]`: what the op is
/// checked against.
pub fn rms_norm_composition<B: Backend>(x: Tensor<B, 2>, w: Tensor<B, 1>, eps: f64, offset: f64) -> Tensor<B, 2> {
    let rms = x.clone().powi_scalar(2).mean_dim(1).add_scalar(eps).sqrt(); // [n, 1]
    x.div(rms) * w.add_scalar(offset).unsqueeze::<2>()
}

/// RMSNorm of `x` `[.., d]` with weight `w` `[d]`: the typed entry point.
pub fn rms_norm<B: RmsNormOp, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 1>, eps: f64, offset: f64) -> Tensor<B, D> {
    rms_norm_as(x, w, eps, offset, FloatDType::F32)
}

/// [`rms_norm`] written in `out`: bf16 where only bf16 products read the result (the
/// projections after a norm, under bf16 training), which then need no cast of their own, and
/// the tape keeps half the bytes.
pub fn rms_norm_as<B: RmsNormOp, const D: usize>(x: Tensor<B, D>, w: Tensor<B, 1>, eps: f64, offset: f64, out: FloatDType) -> Tensor<B, D> {
    let (y, _) = B::rms_norm(x.into_primitive().tensor(), w.into_primitive().tensor(), eps, offset, out);
    float::<B, D>(y)
}


#[derive(Debug, Clone)]
struct State<B: Backend> {
    /// The input's rows `[n, d]`, and its shape.
    x: FloatTensor<B>,
    dims: Vec<usize>,
    w: FloatTensor<B>,
    rstd: FloatTensor<B>,
    offset: f64,
}

#[derive(Debug)]
struct RmsNormBackward;

impl<B: RmsNormOp> Backward<B, 2> for RmsNormBackward {
    type State = State<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x, node_w] = ops.parents;
        // The readers of a bf16 output hand back f32 gradients; f32 in any case.
        let dy = float::<B, 2>(as_rows::<B>(grads.consume::<B>(&ops.node)).0).cast(FloatDType::F32).into_primitive().tensor();
        let s = ops.state;
        if let Some(node) = node_w {
            let [n, d] = float::<B, 2>(s.x.clone()).dims();
            let r = float::<B, 1>(s.rstd.clone()).reshape([n, 1]);
            let dw = (float::<B, 2>(dy.clone()) * float::<B, 2>(s.x.clone()) * r).sum_dim(0).reshape([d]); // [d]
            grads.register::<B>(node.id, dw.into_primitive().tensor());
        }
        if let Some(node) = node_x {
            let acc = take_grad!(B, grads, &node, dy.clone()).map(|g| float::<B, 2>(as_rows::<B>(g).0).cast(FloatDType::F32).into_primitive().tensor());
            let dx = B::rms_norm_dx(dy, s.x, s.w, s.rstd, s.offset, acc);
            grads.register::<B>(node.id, from_rows::<B>(dx, s.dims));
        }
    }
}

impl<B: RmsNormOp, C: CheckpointStrategy> RmsNormOp for Autodiff<B, C> {
    fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64, offset: f64, out: FloatDType) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (rows, dims) = as_rows::<B>(x.primitive);
        let (y, rstd) = B::rms_norm(rows.clone(), w.primitive.clone(), eps, offset, out);
        let y = from_rows::<B>(y, dims.clone());
        // `rstd` leaves as a constant: only `y` is differentiable.
        let rstd_out = <Self as burn::tensor::backend::AutodiffBackend>::from_inner(rstd.clone());
        let y = match RmsNormBackward.prepare::<C>([x.node.clone(), w.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(State { x: rows, dims, w: w.primitive, rstd, offset }, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (y, rstd_out)
    }
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> RmsNormOp for NdArray<E, I, Q> where NdArrayTensor: From<SharedArray<E>> + From<SharedArray<I>> {}

#[cfg(feature = "cubecl")]
impl<B: burn_fusion::FusionBackend> RmsNormOp for burn_fusion::Fusion<B> {}

#[cfg(feature = "cubecl")]
pub(crate) mod cube {
    use burn::tensor::ops::FloatTensor;
    use burn::tensor::{DType, FloatDType, Shape, TensorData};
    use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use cubecl::prelude::*;
    use crate::cube::{contiguous_float, launch_typed};
    use crate::{as_rows, from_rows};
    use cubecl::{cube, CubeCount, CubeDim};

    use super::RmsNormOp;

    /// Threads per row.
    const LANES: u32 = 128;
    const LOG_LANES: u32 = 7;

    /// `Σ partial[0..LANES]` into `partial[0]`, for every thread of the cube.
    #[cube]
    fn reduce<F: Float>(partial: &mut SharedMemory<F>, lane: usize) {
        #[unroll]
        for step in 0..LOG_LANES {
            let stride = ((LANES / 2) >> step) as usize;
            if lane < stride {
                let other = partial[lane + stride];
                partial[lane] += other;
            }
            sync_cube();
        }
    }

    /// One cube per row. `params` = [eps, offset].
    #[cube(launch_unchecked)]
    fn rms_norm_kernel<F: Float, G: Float>(x: &Tensor<F>, w: &Tensor<F>, params: &Tensor<F>, y: &mut Tensor<G>, rstd: &mut Tensor<F>) {
        let row = CUBE_POS_X as usize;
        let lane = UNIT_POS_X as usize;
        let d = x.shape(1);
        let base = row * d;
        let mut partial = SharedMemory::<F>::new(LANES as usize);
        let mut acc = F::new(0.0);
        let mut j = lane;
        while j < d {
            let v = x[base + j];
            acc += v * v;
            j += LANES as usize;
        }
        partial[lane] = acc;
        sync_cube();
        reduce::<F>(&mut partial, lane);
        let rms = F::sqrt(partial[0] / F::cast_from(d) + params[0]);
        let offset = params[1];
        j = lane;
        while j < d {
            // Divided, not multiplied by 1 / rms: the composition's rounding.
            y[base + j] = G::cast_from(x[base + j] / rms * (w[j] + offset));
            j += LANES as usize;
        }
        if lane == 0 {
            rstd[row] = F::new(1.0) / rms;
        }
    }

    /// `dx = r·w'·dy − x·r³·mean(w'·dy·x)` (`+ plus` with `with_plus`), one cube per row.
    /// `params` = [eps, offset].
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_dx_kernel<F: Float>(dy: &Tensor<F>, x: &Tensor<F>, w: &Tensor<F>, rstd: &Tensor<F>, params: &Tensor<F>, plus: &Tensor<F>, dx: &mut Tensor<F>, #[comptime] with_plus: bool) {
        let row = CUBE_POS_X as usize;
        let lane = UNIT_POS_X as usize;
        let d = x.shape(1);
        let base = row * d;
        let offset = params[1];
        let mut partial = SharedMemory::<F>::new(LANES as usize);
        let mut acc = F::new(0.0);
        let mut j = lane;
        while j < d {
            acc += dy[base + j] * (w[j] + offset) * x[base + j];
            j += LANES as usize;
        }
        partial[lane] = acc;
        sync_cube();
        reduce::<F>(&mut partial, lane);
        let r = rstd[row];
        let c = r * r * r * partial[0] / F::cast_from(d);
        j = lane;
        while j < d {
            let mut g = r * (w[j] + offset) * dy[base + j] - x[base + j] * c;
            if with_plus {
                g += plus[base + j];
            }
            dx[base + j] = g;
            j += LANES as usize;
        }
    }


    fn params<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement>(like: &CubeTensor<R>, eps: f64, offset: f64) -> CubeTensor<R> {
        let data = TensorData::new(vec![eps as f32, offset as f32], [2]).convert::<F>();
        contiguous_float::<R, F>(<CubeBackend<R, F, I, BT> as burn::tensor::ops::FloatTensorOps<CubeBackend<R, F, I, BT>>>::float_from_data(data, &like.device))
    }

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> RmsNormOp for CubeBackend<R, F, I, BT> {
        fn rms_norm(x: FloatTensor<Self>, w: FloatTensor<Self>, eps: f64, offset: f64, out: FloatDType) -> (FloatTensor<Self>, FloatTensor<Self>) {
            let (x, dims) = as_rows::<Self>(x);
            let (x, w) = (contiguous_float::<R, F>(x), contiguous_float::<R, F>(w));
            let p = params::<R, F, I, BT>(&x, eps, offset);
            let [n, d] = x.meta.shape().dims::<2>();
            let out = match DType::from(out) {
                dt @ (DType::BF16 | DType::F16) => dt,
                _ => F::dtype(),
            };
            let y = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), Shape::new([n, d]), out);
            let rstd = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), Shape::new([n]), F::dtype());
            if n == 0 || d == 0 {
                return (from_rows::<Self>(y, dims), rstd);
            }
            let client = x.client.clone();
            // SAFETY: row `CUBE_POS_X` < n by the launch count; columns below `d`; `w` has `d`
            // values and `params` two (all contiguous above); `y` is written in `out`.
            launch_typed!(rms_norm_kernel, out, F, R, &client, CubeCount::Static(n as u32, 1, 1), CubeDim { x: LANES, y: 1, z: 1 }, x.into_tensor_arg(), w.into_tensor_arg(), p.into_tensor_arg(), y.clone().into_tensor_arg(), rstd.clone().into_tensor_arg());
            (from_rows::<Self>(y, dims), rstd)
        }

        fn rms_norm_dx(dy: FloatTensor<Self>, x: FloatTensor<Self>, w: FloatTensor<Self>, rstd: FloatTensor<Self>, offset: f64, acc: Option<FloatTensor<Self>>) -> FloatTensor<Self> {
            let (dy, x, w, rstd) = (contiguous_float::<R, F>(dy), contiguous_float::<R, F>(x), contiguous_float::<R, F>(w), contiguous_float::<R, F>(rstd));
            let p = params::<R, F, I, BT>(&x, 0.0, offset);
            let [n, d] = x.meta.shape().dims::<2>();
            let dx = empty_device_contiguous_dtype(x.client.clone(), x.device.clone(), Shape::new([n, d]), F::dtype());
            if n == 0 || d == 0 {
                return dx;
            }
            let client = x.client.clone();
            // Without `acc` the kernel reads none: `dy` stands in for the argument.
            let (acc, with_acc) = match acc {
                Some(acc) => (contiguous_float::<R, F>(acc), true),
                None => (dy.clone(), false),
            };
            // SAFETY: as in the forward; `dy` and `acc` have the shape of `x` (contiguous
            // above), `rstd` one value per row.
            unsafe {
                rms_norm_dx_kernel::launch_unchecked::<F, R>(&client, CubeCount::Static(n as u32, 1, 1), CubeDim { x: LANES, y: 1, z: 1 }, dy.into_tensor_arg(), x.into_tensor_arg(), w.into_tensor_arg(), rstd.into_tensor_arg(), p.into_tensor_arg(), acc.into_tensor_arg(), dx.clone().into_tensor_arg(), with_acc);
            }
            dx
        }
    }
}
