//! Quantised matrix products for kiln, registered in Burn as a backend extension.
//!
//! One weight layout serves every format kiln runs quantised: **affine groups**. A weight
//! matrix `[n, k]` (HF layout: `n` outputs, `k` inputs) is stored as
//! - `words` `[n, k·bits/32]` u32: element `j` of a row in word `j·bits/32` at bit
//!   `(j·bits) % 32` (MLX's packing, little end first), `bits` 4 or 8;
//! - `scales`, `biases` `[n, k/group]`: `w[o, j] = scales[o, j/g] · q[o, j] + biases[o, j/g]`.
//!
//! MLX's q4/q8 checkpoints are this layout as written; GGUF Q8_0, Q4_0 and Q4_K blocks map onto
//! it without loss of a single quantisation level (kiln converts them at load time).
//!
//! [`QuantMatmul`] has two products: `y = x · Wᵀ` (forward) and `dx = dy · W` (the activation
//! gradient). The default methods dequantise with tensor ops and multiply (the reference);
//! the CPU backend (rayon) and the CubeCL backends (WGSL/SPIR-V, CUDA, HIP) override them with
//! kernels that dequantise in registers and never form the float weight. `Autodiff<B>` gives
//! the gradient for `x` only: the quantised base is frozen.
//!
//! More extensions ride on the same trait, so that one bound (`B: QuantMatmul`) gives a
//! backend everything kiln's model and trainer need: [`LmHeadLoss`] (the LM head and
//! cross-entropy over chunks of rows, with its own backward), [`RmsNormOp`] (RMSNorm as one
//! kernel each way), [`RopeOp`] (rope whose backward keeps only the tables), [`GatedActOp`]
//! (the gated MLP's `act(gate) · up`, keeping only its inputs),
//! [`FlashAttention`] (attention that keeps no score matrix for backward), [`FrozenMatmul`]
//! (a product with a frozen bf16 weight whose result the matmul writes in f32, with a LoRA
//! adapter beside it as the same operation; on CUDA these products run on cuBLAS, launched as
//! host tasks of the vendored `cubecl-cuda`) and [`DeviceMemory`] (the GPU allocator's figures).

pub mod adamw;
pub mod attention;
#[cfg(feature = "cubecl")]
mod attention_mma;
mod autodiff;
mod cpu;
#[cfg(feature = "cubecl")]
mod cube;
#[cfg(feature = "cuda")]
mod cublas;
#[cfg(feature = "cubecl")]
mod fusion;
pub mod frozen;
pub mod gated;
pub mod host;
pub mod loss;
pub mod memory;
pub mod norm;
pub mod rope;

pub use adamw::{adamw, AdamWOp, AdamWStep};
pub use attention::{flash_attention, AttentionSpec, FlashAttention};
pub use frozen::{frozen_lora, frozen_matmul, FrozenMatmul};
pub use gated::{gated_act, gated_down, GateActivation, GatedActOp, GatedDown};
pub use loss::{chunk_rows, lm_head_loss, HeadLayout, HeadLoss, LmHeadLoss};
pub use memory::{DeviceMemory, MemoryStats, Reading};
pub use norm::{rms_norm, rms_norm_as, RmsNormOp};
pub use rope::{rope, RopeOp};

/// wgpu without Burn's fusion stream, so that kiln's own CubeCL kernels (which a fusion stream
/// would run as its default composition) can be checked on Vulkan, lavapipe included.
#[cfg(feature = "wgpu")]
pub type WgpuDirect = burn_cubecl::CubeBackend<cubecl::wgpu::WgpuRuntime, f32, i32, u32>;

/// Products cuBLAS ran and products that fell back to Burn's matmul so far (zeros without the
/// `cuda` feature): see `cublas.rs`.
pub fn cublas_counts() -> (u64, u64) {
    #[cfg(feature = "cuda")]
    return cublas::counts();
    #[cfg(not(feature = "cuda"))]
    (0, 0)
}

/// Attention calls (forwards and backwards) run on tensor cores so far (`attention_mma.rs`;
/// zero where none did).
pub fn tensor_core_attention_count() -> u64 {
    #[cfg(feature = "cubecl")]
    return attention_mma::launches();
    #[cfg(not(feature = "cubecl"))]
    0
}

/// CUDA without Burn's fusion stream: `CubeBackend` over CubeCL's CUDA runtime. (Burn 0.21's
/// fusion stream panics with "Ordering is bigger than operations" on kiln's training step.)
#[cfg(feature = "cuda")]
pub type CudaDirect = burn_cubecl::CubeBackend<cubecl::cuda::CudaRuntime, f32, i32, u8>;

/// Total memory of CUDA device `index`, from the driver (CubeCL sizes its largest allocation
/// page as a quarter of it).
#[cfg(feature = "cuda")]
pub fn cuda_total_memory(index: usize) -> Option<u64> {
    use cubecl::Runtime;
    let client = cubecl::cuda::CudaRuntime::client(&cubecl::cuda::CudaDevice::new(index));
    Some(client.properties().memory.max_page_size * 4)
}

/// Keeps CubeCL's compiled kernels (CUDA's PTX; NVRTC takes about half a second per kernel,
/// and a training step needs hundreds) in a folder of `dir` named for this build's kernel
/// sources, and its autotune results in `dir`, between runs, unless a
/// `cubecl.toml` or `CUBECL_*` variables say otherwise. Must run before the first GPU client
/// starts; returns false (changing nothing) once CubeCL's configuration has been read.
#[cfg(feature = "cubecl")]
pub fn keep_kernel_cache(dir: &std::path::Path) -> bool {
    use cubecl::config::cache::CacheConfig;
    use cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    let mut state = CubeClRuntimeConfig::storage().lock();
    if state.is_some() {
        return false;
    }
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    if config.compilation.cache.is_none() {
        // One folder per build of these kernels' sources (kernels/build.rs): CubeCL keys cached
        // kernels by type and compile-time arguments, not code, and on 2026-11-29 an H200 ran
        // an older `dK, dV` kernel out of the cache after its code had changed.
        config.compilation.cache = Some(CacheConfig::File(dir.join(concat!("kernels-", env!("KILN_KERNELS_SOURCE_ID")))));
    }
    // The default keeps autotune results under the nearest Cargo project's `target`.
    if matches!(config.autotune.cache, CacheConfig::Target) {
        config.autotune.cache = CacheConfig::File(dir.to_path_buf());
    }
    *state = Some(std::sync::Arc::new(config));
    true
}

use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{backend::Backend, Int, Tensor, TensorMetadata, TensorPrimitive};

/// Bits per weight and weights per (scale, bias) group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Affine {
    pub bits: u32,
    pub group: u32,
}

impl Affine {
    pub fn per_word(self) -> usize {
        (32 / self.bits) as usize
    }

    pub fn mask(self) -> u32 {
        (1u32 << self.bits) - 1
    }

    /// Words per row of `k` weights.
    pub fn words(self, k: usize) -> usize {
        k / self.per_word()
    }
}

/// Backend extension for products with an affine-quantised weight. Shapes: `x` `[m, k]`,
/// `words` `[n, k·bits/32]`, `scales`/`biases` `[n, k/group]`, `dy` `[m, n]`.
pub trait QuantMatmul: Backend + FrozenMatmul + LmHeadLoss + RmsNormOp + RopeOp + GatedActOp + GatedDown + FlashAttention + AdamWOp + DeviceMemory {
    /// `y[m, n] = x[m, k] · dequant(W)ᵀ`.
    fn quant_matmul(x: FloatTensor<Self>, words: IntTensor<Self>, scales: FloatTensor<Self>, biases: FloatTensor<Self>, format: Affine) -> FloatTensor<Self> {
        let w = dequantize::<Self>(Tensor::from_primitive(words), float(scales), float(biases), format);
        float::<Self, 2>(x).matmul(w.transpose()).into_primitive().tensor()
    }

    /// `dx[m, k] = dy[m, n] · dequant(W)`.
    fn quant_matmul_dx(dy: FloatTensor<Self>, words: IntTensor<Self>, scales: FloatTensor<Self>, biases: FloatTensor<Self>, format: Affine) -> FloatTensor<Self> {
        let w = dequantize::<Self>(Tensor::from_primitive(words), float(scales), float(biases), format);
        float::<Self, 2>(dy).matmul(w).into_primitive().tensor()
    }
}

/// A float primitive as a typed tensor (the extensions' default methods work on these).
pub(crate) fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// `x` `[.., k]` as its rows `[m, k]` (a view), and its shape to put back ([`from_rows`]). An
/// operation that takes its input whole rather than a view of its rows is that input's own
/// child in the autodiff graph, which lets its backward add into the input's gradient
/// ([`take_grad`]).
pub(crate) fn as_rows<B: Backend>(x: FloatTensor<B>) -> (FloatTensor<B>, Vec<usize>) {
    let dims = x.shape().to_vec();
    let k = dims.last().copied().unwrap_or(1);
    let m = dims.iter().product::<usize>() / k.max(1);
    (B::float_reshape(x, burn::tensor::Shape::new([m, k])), dims)
}

/// Rows `[m, n]` back in the leading shape of `dims` (`[.., n]`).
pub(crate) fn from_rows<B: Backend>(y: FloatTensor<B>, mut dims: Vec<usize>) -> FloatTensor<B> {
    if let (Some(last), Some(&n)) = (dims.last_mut(), y.shape().last()) {
        *last = n;
    }
    B::float_reshape(y, burn::tensor::Shape::from(dims))
}

/// In a backward: the gradient registered so far for the parent `node` (an `Option`'s content
/// from `Ops::parents`), taken out of `grads` (`Option<FloatTensor<B>>`). An operation whose
/// input has other readers (a residual stream, one input to several projections) then adds its
/// own gradient into it as it writes it, where `register` would add the two in a separate pass
/// over the tensor. `like` is any tensor of the inner backend: Burn finds gradients by node,
/// through a tensor of the autodiff backend, whose type it does not export by name.
macro_rules! take_grad {
    ($B:ty, $grads:expr, $node:expr, $like:expr) => {{
        let node = $node;
        let probe = burn::tensor::ops::FloatTensor::<burn::backend::autodiff::Autodiff<$B>> { primitive: $like, node: node.clone(), rc: std::sync::Arc::new(node.id) };
        $grads.remove::<$B>(&probe)
    }};
}
pub(crate) use take_grad;

/// The float weight `[n, k]`, with plain tensor ops: the reference the kernels are checked
/// against, and what fusing an adapter into a quantised base uses.
pub fn dequantize<B: Backend>(words: Tensor<B, 2, Int>, scales: Tensor<B, 2>, biases: Tensor<B, 2>, format: Affine) -> Tensor<B, 2> {
    use burn::tensor::ElementConversion;
    let [n, w] = words.dims();
    let per_word = format.per_word();
    let k = w * per_word;
    let (groups, group) = (k / format.group as usize, format.group as usize);
    // Value j of every word, then [n, w, per_word] -> [n, k]. The mask also clears what an
    // arithmetic shift drags in when the words sit in a signed int tensor.
    let values: Vec<Tensor<B, 2, Int>> = (0..per_word)
        .map(|j| words.clone().bitwise_right_shift_scalar(((j as u32 * format.bits) as i64).elem()).bitwise_and_scalar((format.mask() as i64).elem()))
        .collect();
    let q = Tensor::stack::<3>(values, 2).reshape([n, k]).float();
    let expand = |t: Tensor<B, 2>| t.reshape([n, groups, 1]).expand([n, groups, group]).reshape([n, k]);
    q * expand(scales) + expand(biases)
}

/// `x [.., k] · dequant(W)ᵀ -> [.., n]` for any leading shape.
pub fn quant_matmul<B: QuantMatmul, const D: usize>(x: Tensor<B, D>, words: Tensor<B, 2, Int>, scales: Tensor<B, 2>, biases: Tensor<B, 2>, format: Affine) -> Tensor<B, D> {
    let dims = x.dims();
    let k = dims[D - 1];
    let n = words.dims()[0];
    let m = dims[..D - 1].iter().product::<usize>();
    let y = B::quant_matmul(x.reshape([m, k]).into_primitive().tensor(), words.into_primitive(), scales.into_primitive().tensor(), biases.into_primitive().tensor(), format);
    let mut out = dims;
    out[D - 1] = n;
    float::<B, 2>(y).reshape(out)
}
