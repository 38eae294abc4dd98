//! The gated MLP's middle, `act(gate) · up`, as one operation with its own backward.
//!
//! As plain tensor operations (SwiGLU: `gate · sigmoid(gate) · up`) the tape keeps `gate`,
//! the sigmoid, the activation and `up`, four `[tokens, intermediate]` tensors per layer, the
//! largest activations of a small model. Here it keeps `gate` and `up` and recomputes the
//! activation and its derivative in backward: `d_gate = dy · up · act'(gate)`,
//! `d_up = dy · act(gate)`.

use burn::backend::autodiff::Autodiff;
use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray};
use burn::tensor::activation;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{backend::Backend, FloatDType, Shape, Tensor, TensorMetadata};

use crate::float;
use crate::frozen::{in_half_of, Adapter, FrozenMatmul};

/// The gate's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateActivation {
    /// `x · sigmoid(x)` (SwiGLU).
    Silu,
    /// GELU, tanh approximation (GeGLU as Gemma runs it).
    GeluTanh,
    /// GELU, exact (erf).
    Gelu,
}

impl GateActivation {
    fn code(self) -> u32 {
        match self {
            Self::Silu => 0,
            Self::GeluTanh => 1,
            Self::Gelu => 2,
        }
    }
}

/// `sqrt(2 / π)` and the cubic coefficient of the tanh approximation.
const GELU_C: f64 = 0.797_884_560_802_865_4;
const GELU_K: f64 = 0.044715;

/// Backend extension: `act(gate) · up` for `gate`, `up` `[n]`. The default methods are the
/// plain composition (the reference).
pub trait GatedActOp: Backend {
    fn gated_act(gate: FloatTensor<Self>, up: FloatTensor<Self>, act: GateActivation) -> FloatTensor<Self> {
        let f32 = |t: FloatTensor<Self>| float::<Self, 1>(t).cast(FloatDType::F32);
        (activate(f32(gate), act) * f32(up)).into_primitive().tensor()
    }

    /// `(d_gate, d_up)` for the upstream gradient `dy`.
    fn gated_act_bwd(dy: FloatTensor<Self>, gate: FloatTensor<Self>, up: FloatTensor<Self>, act: GateActivation) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let f32 = |t: FloatTensor<Self>| float::<Self, 1>(t).cast(FloatDType::F32);
        let (dy, g, up) = (f32(dy), f32(gate), f32(up));
        let a = activate(g.clone(), act);
        let slope = match act {
            GateActivation::Silu => {
                let s = activation::sigmoid(g.clone());
                s.clone() * (g * (s.neg().add_scalar(1.0))).add_scalar(1.0)
            }
            GateActivation::GeluTanh => {
                let t = ((g.clone() + g.clone().powi_scalar(3).mul_scalar(GELU_K)).mul_scalar(GELU_C)).tanh();
                let dt = t.clone().powi_scalar(2).neg().add_scalar(1.0) * g.clone().powi_scalar(2).mul_scalar(3.0 * GELU_K).add_scalar(1.0).mul_scalar(GELU_C);
                t.add_scalar(1.0).mul_scalar(0.5) + g.mul_scalar(0.5) * dt
            }
            GateActivation::Gelu => {
                let cdf = g.clone().div_scalar(std::f64::consts::SQRT_2).erf().add_scalar(1.0).mul_scalar(0.5);
                let pdf = g.clone().powi_scalar(2).mul_scalar(-0.5).exp().mul_scalar(1.0 / (2.0 * std::f64::consts::PI).sqrt());
                cdf + g * pdf
            }
        };
        let dgate = dy.clone() * up * slope;
        (dgate.into_primitive().tensor(), (dy * a).into_primitive().tensor())
    }

    /// [`GatedActOp::gated_act_bwd`] that also returns `act(gate) · up` as
    /// [`GatedActOp::gated_act`] writes it: for a backward that recomputes the value rather than
    /// keeping it, one pass over `gate` and `up` serves both.
    fn gated_act_bwd_value(dy: FloatTensor<Self>, gate: FloatTensor<Self>, up: FloatTensor<Self>, act: GateActivation) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let y = Self::gated_act(gate.clone(), up.clone(), act);
        let (dgate, dup) = Self::gated_act_bwd(dy, gate, up, act);
        (dgate, dup, y)
    }
}

/// `act(gate) · up` through [`GatedActOp`]: the typed entry point (the operation itself sees
/// flat `[n]` tensors).
pub fn gated_act<B: GatedActOp, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>, act: GateActivation) -> Tensor<B, D> {
    let dims = gate.dims();
    let n = dims.iter().product::<usize>();
    let y = B::gated_act(gate.reshape([n]).into_primitive().tensor(), up.reshape([n]).into_primitive().tensor(), act);
    float::<B, 1>(y).reshape(dims)
}

/// The activation as tensor operations (how the unfused model computed it). Exact GELU is
/// spelled out as Burn's `gelu` computes it, because Burn differentiates its `gelu` as the tanh
/// approximation; through `erf` the gradient is exact.
pub fn activate<B: Backend, const D: usize>(x: Tensor<B, D>, act: GateActivation) -> Tensor<B, D> {
    match act {
        GateActivation::Silu => activation::silu(x),
        GateActivation::GeluTanh => activation::gelu_approximate(x),
        GateActivation::Gelu => (x.clone() * x.div_scalar(std::f64::consts::SQRT_2).erf().add_scalar(1.0)).div_scalar(2.0),
    }
}


#[derive(Debug, Clone)]
struct State<B: Backend> {
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    act: GateActivation,
}

#[derive(Debug)]
struct GatedBackward;

impl<B: GatedActOp> Backward<B, 2> for GatedBackward {
    type State = State<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_gate, node_up] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        let s = ops.state;
        let (dgate, dup) = B::gated_act_bwd(dy, s.gate, s.up, s.act);
        if let Some(node) = node_gate {
            grads.register::<B>(node.id, dgate);
        }
        if let Some(node) = node_up {
            grads.register::<B>(node.id, dup);
        }
    }
}

impl<B: GatedActOp, C: CheckpointStrategy> GatedActOp for Autodiff<B, C> {
    fn gated_act(gate: FloatTensor<Self>, up: FloatTensor<Self>, act: GateActivation) -> FloatTensor<Self> {
        let y = B::gated_act(gate.primitive.clone(), up.primitive.clone(), act);
        match GatedBackward.prepare::<C>([gate.node.clone(), up.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(State { gate: gate.primitive, up: up.primitive, act }, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> GatedActOp for NdArray<E, I, Q> where NdArrayTensor: From<SharedArray<E>> + From<SharedArray<I>> {}

#[cfg(feature = "cubecl")]
impl<B: burn_fusion::FusionBackend> GatedActOp for burn_fusion::Fusion<B> {}

/// Backend extension: the gated MLP's down projection with its adapter over `act(gate) · up`,
/// `y = frozen_lora(act(gate) · up, W, A, B)` (see [`FrozenMatmul::frozen_lora`]), as one
/// operation whose backward recomputes `act(gate) · up` from `gate` and `up` (which the tape
/// keeps anyway) instead of keeping it: one `[tokens, intermediate]` tensor less per layer, for
/// one element-wise pass more in backward. `gate`, `up` `[m, f]`; `W` `[f, n]`; `y` `[m, n]` f32.
pub trait GatedDown: GatedActOp + FrozenMatmul {
    /// `(y, h)` as [`FrozenMatmul::frozen_lora`] returns them.
    fn gated_down(gate: FloatTensor<Self>, up: FloatTensor<Self>, act: GateActivation, w: FloatTensor<Self>, a: FloatTensor<Self>, b: FloatTensor<Self>, scale: f64) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let hidden = flat_gated_act::<Self>(gate, up, act);
        Self::frozen_lora(hidden, w, a, b, scale, FloatDType::F32)
    }
}

/// `act(gate) · up` of two `[m, f]` tensors, `[m, f]`.
fn flat_gated_act<B: GatedActOp>(gate: FloatTensor<B>, up: FloatTensor<B>, act: GateActivation) -> FloatTensor<B> {
    let shape = gate.shape();
    let flat = |t: FloatTensor<B>| B::float_reshape(t, Shape::new([shape.num_elements()]));
    B::float_reshape(B::gated_act(flat(gate), flat(up), act), shape)
}

/// `down(act(gate) · up)` through [`GatedDown`], `gate` and `up` `[.., f]`, `W` `[f, n]` frozen,
/// `A` `[f, r]` and `B` `[r, n]` the adapter's.
pub fn gated_down<B: GatedDown, const D: usize>(gate: Tensor<B, D>, up: Tensor<B, D>, act: GateActivation, w: Tensor<B, 2>, a: Tensor<B, 2>, b: Tensor<B, 2>, scale: f64) -> Tensor<B, D> {
    let dims = gate.dims();
    let [f, n] = w.dims();
    let m = dims[..D - 1].iter().product::<usize>();
    let prim = |t: Tensor<B, D>| t.reshape([m, f]).into_primitive().tensor();
    let (y, _) = B::gated_down(prim(gate), prim(up), act, w.into_primitive().tensor(), a.into_primitive().tensor(), b.into_primitive().tensor(), scale);
    let mut out = dims;
    out[D - 1] = n;
    float::<B, 2>(y).reshape(out)
}

#[derive(Debug, Clone)]
struct DownState<B: Backend> {
    gate: FloatTensor<B>,
    up: FloatTensor<B>,
    act: GateActivation,
    adapter: Adapter<B>,
}

#[derive(Debug)]
struct GatedDownBackward;

impl<B: GatedDown> Backward<B, 4> for GatedDownBackward {
    type State = DownState<B>;

    fn backward(self, ops: Ops<Self::State, 4>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_gate, node_up, node_a, node_b] = ops.parents;
        let s = ops.state;
        let need_dx = node_gate.is_some() || node_up.is_some();
        // The gradient of `act(gate) · up` only feeds the gated kernel's backward, which reads
        // it in gate's dtype: written there by the product (as autocast leaves it in PyTorch),
        // half the bytes of the largest gradient of a layer.
        let (dhidden, g, db) = s.adapter.backward_dx(grads.consume::<B>(&ops.node), need_dx, s.gate.dtype().into(), None);
        // `act(gate) · up` again, for `dA`: formed by the pass that reads gate and up for their
        // gradients where there is one.
        let shape = s.gate.shape();
        let flat = |t: FloatTensor<B>| B::float_reshape(t, Shape::new([shape.num_elements()]));
        let hidden = match dhidden {
            Some(dhidden) => {
                let (dgate, dup, hidden) = B::gated_act_bwd_value(flat(dhidden), flat(s.gate), flat(s.up), s.act);
                for (node, grad) in [(node_gate, dgate), (node_up, dup)] {
                    if let Some(node) = node {
                        grads.register::<B>(node.id, B::float_reshape(grad, shape.clone()));
                    }
                }
                B::float_reshape(hidden, shape.clone())
            }
            None => flat_gated_act::<B>(s.gate, s.up, s.act),
        };
        let da = B::lora_da(hidden, g);
        for (node, grad) in [(node_a, da), (node_b, db)] {
            if let Some(node) = node {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: GatedDown, C: CheckpointStrategy> GatedDown for Autodiff<B, C> {
    fn gated_down(gate: FloatTensor<Self>, up: FloatTensor<Self>, act: GateActivation, w: FloatTensor<Self>, a: FloatTensor<Self>, b: FloatTensor<Self>, scale: f64) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let w = w.primitive;
        let hidden = in_half_of::<B>(flat_gated_act::<B>(gate.primitive.clone(), up.primitive.clone(), act), &w);
        let (y, adapter) = Adapter::<B>::forward(hidden, w, a.primitive, b.primitive, scale, FloatDType::F32);
        // `h` leaves as a constant; the weight is frozen, `act(gate) · up` is dropped here.
        let h_out = <Self as burn::tensor::backend::AutodiffBackend>::from_inner(adapter.h.clone());
        let parents = [gate.node.clone(), up.node.clone(), a.node.clone(), b.node.clone()];
        let y = match GatedDownBackward.prepare::<C>(parents).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish(DownState { gate: gate.primitive, up: up.primitive, act, adapter }, y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        };
        (y, h_out)
    }
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> GatedDown for NdArray<E, I, Q> where NdArrayTensor: From<SharedArray<E>> + From<SharedArray<I>> {}

#[cfg(feature = "cubecl")]
impl<B: burn_fusion::FusionBackend> GatedDown for burn_fusion::Fusion<B> {}

#[cfg(feature = "cubecl")]
impl<R: burn_cubecl::CubeRuntime, F: burn_cubecl::FloatElement, I: burn_cubecl::IntElement, BT: burn_cubecl::BoolElement> GatedDown for burn_cubecl::CubeBackend<R, F, I, BT> {}

#[cfg(feature = "cubecl")]
// Kernel code assigns a placeholder before a branch sets the value (CubeCL expands both arms).
#[allow(unused_assignments)]
pub(crate) mod cube {
    use burn::tensor::ops::FloatTensor;
    use burn::tensor::DType;
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};
    use cubecl::prelude::*;
    use crate::cube::{as_dtype, contiguous_float};
    use cubecl::{cube, CubeDim};

    use super::{GateActivation, GatedActOp, GELU_C, GELU_K};
    use crate::cube::{flat_count, flat_index, flat_width, launch_typed, FLAT_THREADS};

    const C: f32 = GELU_C as f32;
    const K: f32 = GELU_K as f32;
    /// `1 / sqrt(2π)`.
    const INV_SQRT_2PI: f32 = 0.398_942_3;

    /// `act(x)`; `act` 0 silu, 1 gelu (tanh), 2 gelu (erf).
    #[cube]
    fn value<F: Float>(x: F, #[comptime] act: u32) -> F {
        let one = F::new(1.0);
        let mut a = F::new(0.0);
        if act == 0 {
            a = x / (one + F::exp(-x));
        } else if act == 1 {
            a = F::new(0.5) * x * (one + F::tanh(F::new(C) * (x + F::new(K) * x * x * x)));
        } else {
            a = F::new(0.5) * x * (one + F::erf(x * F::new(std::f32::consts::FRAC_1_SQRT_2)));
        }
        a
    }

    /// `act'(x)`.
    #[cube]
    fn slope<F: Float>(x: F, #[comptime] act: u32) -> F {
        let one = F::new(1.0);
        let half = F::new(0.5);
        let mut d = F::new(0.0);
        if act == 0 {
            let s = one / (one + F::exp(-x));
            d = s * (one + x * (one - s));
        } else if act == 1 {
            let t = F::tanh(F::new(C) * (x + F::new(K) * x * x * x));
            d = half * (one + t) + half * x * (one - t * t) * F::new(C) * (one + F::new(3.0 * K) * x * x);
        } else {
            let cdf = half * (one + F::erf(x * F::new(std::f32::consts::FRAC_1_SQRT_2)));
            d = cdf + x * F::exp(F::new(-0.5) * x * x) * F::new(INV_SQRT_2PI);
        }
        d
    }

    /// `gate`, `up` and `y` in `G` (f32, or the half type the projections wrote), computed in `F`;
    /// a vector of `N` elements per thread (indices and lengths count vectors).
    #[cube(launch_unchecked)]
    fn forward_kernel<F: Float, G: Float, N: Size>(gate: &Tensor<Vector<G, N>>, up: &Tensor<Vector<G, N>>, y: &mut Tensor<Vector<G, N>>, #[comptime] act: u32) {
        let i = flat_index();
        if i < y.len() {
            let (g, u) = (gate[i], up[i]);
            let mut out = Vector::<G, N>::new(G::new(0.0));
            #[unroll]
            for l in 0..g.vector_size() {
                out[l] = G::cast_from(value::<F>(F::cast_from(g[l]), act) * F::cast_from(u[l]));
            }
            y[i] = out;
        }
    }

    /// `dy`, `gate`, `up` and both gradients in `G`, as in the forward (computed in `F`); with
    /// `with_value` also the forward's `y` (which the caller then does not keep).
    #[cube(launch_unchecked)]
    #[allow(clippy::too_many_arguments)]
    fn backward_kernel<F: Float, G: Float, N: Size>(dy: &Tensor<Vector<G, N>>, gate: &Tensor<Vector<G, N>>, up: &Tensor<Vector<G, N>>, dgate: &mut Tensor<Vector<G, N>>, dup: &mut Tensor<Vector<G, N>>, y: &mut Tensor<Vector<G, N>>, #[comptime] act: u32, #[comptime] with_value: bool) {
        let i = flat_index();
        if i < dy.len() {
            let (d, g, u) = (dy[i], gate[i], up[i]);
            let (mut dg, mut du, mut v) = (Vector::<G, N>::new(G::new(0.0)), Vector::<G, N>::new(G::new(0.0)), Vector::<G, N>::new(G::new(0.0)));
            #[unroll]
            for l in 0..g.vector_size() {
                let x = F::cast_from(g[l]);
                let dl = F::cast_from(d[l]);
                let a = value::<F>(x, act);
                dg[l] = G::cast_from(dl * F::cast_from(u[l]) * slope::<F>(x, act));
                du[l] = G::cast_from(dl * a);
                // As the forward rounds it: `act(gate) · up` in `F`, then `G`.
                v[l] = G::cast_from(a * F::cast_from(u[l]));
            }
            dgate[i] = dg;
            dup[i] = du;
            if with_value {
                y[i] = v;
            }
        }
    }

    fn like<R: CubeRuntime>(t: &CubeTensor<R>) -> CubeTensor<R> {
        empty_device_contiguous_dtype(t.client.clone(), t.device.clone(), t.meta.shape().clone(), t.dtype)
    }

    /// `gate` and `up` contiguous in one dtype: a half type both share (bf16 projections wrote
    /// them, and they stay so), else the backend's float.
    fn operands<R: CubeRuntime, F: FloatElement>(gate: CubeTensor<R>, up: CubeTensor<R>) -> (CubeTensor<R>, CubeTensor<R>) {
        match gate.dtype {
            DType::BF16 | DType::F16 if up.dtype == gate.dtype => (into_contiguous(gate), into_contiguous(up)),
            _ => (contiguous_float::<R, F>(gate), contiguous_float::<R, F>(up)),
        }
    }

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> GatedActOp for CubeBackend<R, F, I, BT> {
        fn gated_act(gate: FloatTensor<Self>, up: FloatTensor<Self>, act: GateActivation) -> FloatTensor<Self> {
            let (gate, up) = operands::<R, F>(gate, up);
            let y = like(&gate);
            let n = gate.meta.shape().num_elements();
            if n == 0 {
                return y;
            }
            let (client, dt) = (gate.client.clone(), gate.dtype);
            let width = flat_width(n, dt.size(), &[&gate, &up, &y]);
            // SAFETY: the tensors are contiguous with one shape, their starts and length
            // multiples of `width`; the kernel checks the flat index against the length.
            launch_typed!(forward_kernel, dt, F, R, &client, flat_count(n / width), CubeDim { x: FLAT_THREADS, y: 1, z: 1 }, width, gate.into_tensor_arg(), up.into_tensor_arg(), y.clone().into_tensor_arg(), act.code());
            y
        }

        fn gated_act_bwd(dy: FloatTensor<Self>, gate: FloatTensor<Self>, up: FloatTensor<Self>, act: GateActivation) -> (FloatTensor<Self>, FloatTensor<Self>) {
            let (dgate, dup, _) = backward::<R, F>(dy, gate, up, act, false);
            (dgate, dup)
        }

        fn gated_act_bwd_value(dy: FloatTensor<Self>, gate: FloatTensor<Self>, up: FloatTensor<Self>, act: GateActivation) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
            backward::<R, F>(dy, gate, up, act, true)
        }
    }

    /// `(d_gate, d_up, y)` through `backward_kernel`; `y` (the forward's value) only written
    /// `with_value` (else `d_gate` stands in for it).
    fn backward<R: CubeRuntime, F: FloatElement>(dy: CubeTensor<R>, gate: CubeTensor<R>, up: CubeTensor<R>, act: GateActivation, with_value: bool) -> (CubeTensor<R>, CubeTensor<R>, CubeTensor<R>) {
        let (gate, up) = operands::<R, F>(gate, up);
        // `dy` in the operands' dtype, as the gated down projection's backward writes it
        // (bf16 under bf16 training; cast here where it came in f32).
        let dy = into_contiguous(as_dtype(dy, gate.dtype));
        let (dgate, dup) = (like(&gate), like(&gate));
        let y = match with_value {
            true => like(&gate),
            false => dgate.clone(),
        };
        let n = gate.meta.shape().num_elements();
        if n == 0 {
            return (dgate, dup, y);
        }
        let (client, dt) = (gate.client.clone(), gate.dtype);
        let width = flat_width(n, dt.size(), &[&dy, &gate, &up, &dgate, &dup, &y]);
        // SAFETY: as in the forward; `dy` and `y` have the shape of `gate`; `y` is written only
        // `with_value`, when it is its own tensor.
        launch_typed!(backward_kernel, dt, F, R, &client, flat_count(n / width), CubeDim { x: FLAT_THREADS, y: 1, z: 1 }, width, dy.into_tensor_arg(), gate.into_tensor_arg(), up.into_tensor_arg(), dgate.clone().into_tensor_arg(), dup.clone().into_tensor_arg(), y.clone().into_tensor_arg(), act.code(), with_value);
        (dgate, dup, y)
    }
}
