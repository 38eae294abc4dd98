//! `QuantMatmul` for `Fusion<B>`: with Burn's default features the GPU backends are
//! `Fusion<CubeBackend<..>>`, which records operations in a stream and runs them later. The
//! product is registered there as a custom operation; when the stream runs, it fetches the
//! real `CubeTensor`s and calls the `CubeBackend` kernels. Burn's fusion does not look inside
//! it: it runs as its own kernel.

use core::marker::PhantomData;

use burn::backend::ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use burn::tensor::{
    Shape,
    ops::{FloatTensor, IntTensor},
};
use burn_fusion::{
    Fusion, FusionBackend, FusionRuntime,
    stream::{Operation, OperationStreams},
};

use crate::{Affine, QuantMatmul};

/// Which of the two trait methods an op runs.
#[derive(Clone, Copy, Debug)]
enum Kind {
    Forward,
    GradX,
}

#[derive(Debug)]
struct QuantOp<B> {
    desc: CustomOpIr,
    kind: Kind,
    format: Affine,
    _b: PhantomData<B>,
}

impl<B: FusionBackend + QuantMatmul> Operation<B::FusionRuntime> for QuantOp<B> {
    fn execute(
        &self,
        handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
    ) {
        let ([a, wq, scales, biases], [out]) = self.desc.as_fixed();
        let a = handles.get_float_tensor::<B>(a);
        let wq = handles.get_int_tensor::<B>(wq);
        let scales = handles.get_float_tensor::<B>(scales);
        let biases = handles.get_float_tensor::<B>(biases);
        let res = match self.kind {
            Kind::Forward => B::quant_matmul(a, wq, scales, biases, self.format),
            Kind::GradX => B::quant_matmul_dx(a, wq, scales, biases, self.format),
        };
        handles.register_float_tensor::<B>(&out.id, res);
    }
}

fn register<B: FusionBackend + QuantMatmul>(
    kind: Kind,
    a: FloatTensor<Fusion<B>>,
    wq: IntTensor<Fusion<B>>,
    scales: FloatTensor<Fusion<B>>,
    biases: FloatTensor<Fusion<B>>,
    format: Affine,
) -> FloatTensor<Fusion<B>> {
    let client = a.client.clone();
    let m = a.shape[0];
    let out_cols = match kind {
        Kind::Forward => wq.shape[0],   // n
        Kind::GradX => wq.shape[1] * format.per_word(), // k
    };
    let dtype = a.dtype;
    // Every input must be declared so the stream orders this op after their producers.
    let streams = OperationStreams::with_inputs([&a, &wq, &scales, &biases]);
    let out = TensorIr::uninit(
        client.create_empty_handle(),
        Shape::new([m, out_cols]),
        dtype,
    );
    // `into_ir()` consumes the handles: a tensor still referenced elsewhere (the frozen weights)
    // is marked read-only, so the stream will not free it after this op.
    let desc = CustomOpIr::new(
        match kind {
            Kind::Forward => "quant_matmul",
            Kind::GradX => "quant_matmul_dx",
        },
        &[
            a.into_ir(),
            wq.into_ir(),
            scales.into_ir(),
            biases.into_ir(),
        ],
        &[out],
    );
    let op = QuantOp::<B> {
        desc: desc.clone(),
        kind,
        format,
        _b: PhantomData,
    };
    client
        .register(streams, OperationIr::Custom(desc), op)
        .output()
}

impl<B: FusionBackend + QuantMatmul> QuantMatmul for Fusion<B> {
    fn quant_matmul(
        x: FloatTensor<Self>,
        wq: IntTensor<Self>,
        scales: FloatTensor<Self>,
        biases: FloatTensor<Self>,
        format: Affine,
    ) -> FloatTensor<Self> {
        register::<B>(Kind::Forward, x, wq, scales, biases, format)
    }

    fn quant_matmul_dx(
        dy: FloatTensor<Self>,
        wq: IntTensor<Self>,
        scales: FloatTensor<Self>,
        biases: FloatTensor<Self>,
        format: Affine,
    ) -> FloatTensor<Self> {
        register::<B>(Kind::GradX, dy, wq, scales, biases, format)
    }
}
