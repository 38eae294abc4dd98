//! `Autodiff<B>`: the forward runs the inner backend's product; the backward registers the
//! gradient of `x` only (`dx = dy · W`, the inner backend's transposed kernel). The quantised
//! weight is frozen: no gradient is ever produced for it.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::tensor::ops::{FloatTensor, IntTensor};

use crate::{Affine, QuantMatmul};

/// What backward needs: the frozen weight. `x` itself is not needed for `dx`.
#[derive(Debug, Clone)]
struct State<B: burn::tensor::backend::Backend> {
    words: IntTensor<B>,
    scales: FloatTensor<B>,
    biases: FloatTensor<B>,
    format: Affine,
}

#[derive(Debug)]
struct QuantMatmulBackward;

impl<B: QuantMatmul> Backward<B, 1> for QuantMatmulBackward {
    type State = State<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let [node_x] = ops.parents;
        let dy = grads.consume::<B>(&ops.node);
        if let Some(node) = node_x {
            let s = ops.state;
            grads.register::<B>(node.id, B::quant_matmul_dx(dy, s.words, s.scales, s.biases, s.format));
        }
    }
}

impl<B: QuantMatmul, C: CheckpointStrategy> QuantMatmul for Autodiff<B, C> {
    fn quant_matmul(x: FloatTensor<Self>, words: IntTensor<Self>, scales: FloatTensor<Self>, biases: FloatTensor<Self>, format: Affine) -> FloatTensor<Self> {
        let (scales, biases) = (scales.primitive, biases.primitive);
        // Only `x` is a parent; a matmul is never recomputed under checkpointing.
        match QuantMatmulBackward.prepare::<C>([x.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let out = B::quant_matmul(x.primitive, words.clone(), scales.clone(), biases.clone(), format);
                prep.finish(State { words, scales, biases, format }, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::quant_matmul(x.primitive, words, scales, biases, format)),
        }
    }
}
