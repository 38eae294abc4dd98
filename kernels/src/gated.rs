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
use burn::tensor::{backend::Backend, FloatDType, Tensor};

use crate::float;

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
    use crate::cube::contiguous_float;
    use cubecl::{cube, CubeDim};

    use super::{GateActivation, GatedActOp, GELU_C, GELU_K};
    use crate::cube::{flat_count, flat_index, launch_typed, FLAT_THREADS};

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

    /// `gate`, `up` and `y` in `G` (f32, or the half type the projections wrote), computed in `F`.
    #[cube(launch_unchecked)]
    fn forward_kernel<F: Float, G: Float>(gate: &Tensor<G>, up: &Tensor<G>, y: &mut Tensor<G>, #[comptime] act: u32) {
        let i = flat_index();
        if i < y.len() {
            y[i] = G::cast_from(value::<F>(F::cast_from(gate[i]), act) * F::cast_from(up[i]));
        }
    }

    /// `dy` in `F`; `gate`, `up` and both gradients in `G`, as in the forward.
    #[cube(launch_unchecked)]
    fn backward_kernel<F: Float, G: Float>(dy: &Tensor<F>, gate: &Tensor<G>, up: &Tensor<G>, dgate: &mut Tensor<G>, dup: &mut Tensor<G>, #[comptime] act: u32) {
        let i = flat_index();
        if i < dy.len() {
            let g = F::cast_from(gate[i]);
            dgate[i] = G::cast_from(dy[i] * F::cast_from(up[i]) * slope::<F>(g, act));
            dup[i] = G::cast_from(dy[i] * value::<F>(g, act));
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
            // SAFETY: the tensors are contiguous with one shape; the kernel checks the flat
            // index against the length.
            launch_typed!(forward_kernel, dt, F, R, &client, flat_count(n), CubeDim { x: FLAT_THREADS, y: 1, z: 1 }, gate.into_tensor_arg(), up.into_tensor_arg(), y.clone().into_tensor_arg(), act.code());
            y
        }

        fn gated_act_bwd(dy: FloatTensor<Self>, gate: FloatTensor<Self>, up: FloatTensor<Self>, act: GateActivation) -> (FloatTensor<Self>, FloatTensor<Self>) {
            let dy = contiguous_float::<R, F>(dy);
            let (gate, up) = operands::<R, F>(gate, up);
            let (dgate, dup) = (like(&gate), like(&gate));
            let n = gate.meta.shape().num_elements();
            if n == 0 {
                return (dgate, dup);
            }
            let (client, dt) = (gate.client.clone(), gate.dtype);
            // SAFETY: as in the forward; `dy` has the shape of `gate`.
            launch_typed!(backward_kernel, dt, F, R, &client, flat_count(n), CubeDim { x: FLAT_THREADS, y: 1, z: 1 }, dy.into_tensor_arg(), gate.into_tensor_arg(), up.into_tensor_arg(), dgate.clone().into_tensor_arg(), dup.clone().into_tensor_arg(), act.code());
            (dgate, dup)
        }
    }
}
