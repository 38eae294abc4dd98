//! Dense products on cuBLAS, for the CUDA backend, and the other work the CUDA server runs on
//! its device thread as a host task ([`gather`]).
//!
//! Burn 0.21's matmul (CubeCL's) runs at 0.25–0.45× cuBLAS on the products of a training step
//! (bench/RESULTS.md). A product is launched like any CubeCL kernel, as a host task (the
//! vendored `cubecl-cuda`, `vendor/cubecl-cuda/KILN-PATCH.md`): CubeCL's device thread calls
//! cuBLAS, in launch order, on the stream its kernels run on, so the product is ordered with the
//! kernels around it and the caller never waits. (Asking CubeCL for the tensors' pointers from
//! the calling thread instead waits for the device thread to drain its queue, three times a
//! product: the GPU then idled after every product, and the step was no faster.)
//!
//! [`matmul`] answers `None` whenever it does not apply (another runtime, a layout cuBLAS cannot
//! read in place, a dtype it is not set up for, no `libcublas` to load) and the caller falls
//! back to Burn's matmul: cuBLAS is a faster path, never a requirement.

use std::any::Any;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use burn::tensor::ops::FloatTensor;
use burn::tensor::DType;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeRuntime;
use cubecl::cuda::host_task::{HOST_TASK, HOST_TASK_FN};
use cubecl::cuda::{CudaCompiler, CudaRuntime};
use cubecl::prelude::{CompiledKernel, CubeCount, ExecutionMode, KernelId};
use cubecl::server::{KernelArguments, MetadataBindingInfo};
use cudarc::cublas::sys as cublas;

/// One cuBLAS handle for the process, created on first use (which also registers [`run_gemm`] as
/// the CUDA server's host task); `None` where `libcublas` cannot be loaded or initialised (then
/// every product stays on Burn's matmul, said once in the log). The mutex serialises
/// `cublasSetStream` + `cublasGemmEx` pairs between device threads.
fn handle() -> Option<&'static Mutex<Handle>> {
    static HANDLE: OnceLock<Option<Mutex<Handle>>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            if std::env::var_os("KILN_NO_CUBLAS").is_some() {
                tracing::info!("KILN_NO_CUBLAS is set: dense products use Burn's matmul");
                return None;
            }
            // SAFETY: probing for the library has no preconditions.
            if !unsafe { cublas::is_culib_present() } {
                tracing::warn!("libcublas could not be loaded (is it on LD_LIBRARY_PATH?): dense products use Burn's matmul, which is slower");
                return None;
            }
            match cudarc::cublas::result::create_handle() {
                Ok(h) => {
                    let _ = HOST_TASK_FN.set(run_host_task);
                    Some(Mutex::new(Handle(h)))
                }
                Err(err) => {
                    tracing::warn!("cuBLAS did not initialise ({err:?}): dense products use Burn's matmul");
                    None
                }
            }
        })
        .as_ref()
}

struct Handle(cublas::cublasHandle_t);

// SAFETY: a cuBLAS handle may be used from any thread as long as calls on it do not overlap,
// which the mutex around it guarantees.
unsafe impl Send for Handle {}

/// How one operand's matrix sits in memory, seen by column-major cuBLAS.
struct Operand {
    /// Whether cuBLAS must transpose what it reads.
    trans: cublas::cublasOperation_t,
    /// Its leading dimension.
    ld: i64,
    /// Elements between consecutive matrices of a batch; 0 for a matrix shared by the batch.
    batch_stride: i64,
}

/// The layout of a `[.., rows, cols]` operand of a row-major product. cuBLAS reads a row-major
/// `[rows, cols]` matrix as its column-major transpose, with the row stride as leading dimension
/// (CubeCL pads rows: `[8192, 896]` comes with a row stride of 1024); a transposed view (strides
/// `[1, s]`, `s ≥ rows`) is the matrix itself in column-major order. Anything else (a broadcast
/// row, a view with both strides above 1) is `None`.
fn operand(shape: &[usize], strides: &[usize], batch: usize) -> Option<Operand> {
    let rank = shape.len();
    let (rows, cols) = (shape[rank - 2], shape[rank - 1]);
    let (row_stride, col_stride) = (strides[rank - 2], strides[rank - 1]);
    let (trans, ld) = if col_stride == 1 && (row_stride >= cols || rows == 1) {
        (cublas::cublasOperation_t::CUBLAS_OP_N, row_stride.max(cols).max(1))
    } else if row_stride == 1 && (col_stride >= rows || cols == 1) {
        (cublas::cublasOperation_t::CUBLAS_OP_T, col_stride.max(rows).max(1))
    } else {
        return None;
    };
    let batch_stride = match rank {
        2 => 0,
        3 if shape[0] == batch && batch > 1 => strides[0],
        3 if shape[0] == 1 => 0,
        _ => return None,
    };
    Some(Operand { trans, ld: ld as i64, batch_stride: batch_stride as i64 })
}

fn data_type(dtype: DType) -> Option<cublas::cudaDataType> {
    match dtype {
        DType::F32 => Some(cublas::cudaDataType::CUDA_R_32F),
        DType::BF16 => Some(cublas::cudaDataType::CUDA_R_16BF),
        DType::F16 => Some(cublas::cudaDataType::CUDA_R_16F),
        _ => None,
    }
}

/// [`matmul`] for any backend's float tensors: `Some` only where they are CUDA `CubeTensor`s (the
/// CUDA backend itself, not its autodiff wrapper, so from inside custom ops and their backward).
pub(crate) fn matmul_any<B: burn::tensor::backend::Backend>(lhs: &FloatTensor<B>, rhs: &FloatTensor<B>, out_dtype: DType) -> Option<FloatTensor<B>> {
    let lhs = (lhs as &dyn Any).downcast_ref::<CubeTensor<CudaRuntime>>()?;
    let rhs = (rhs as &dyn Any).downcast_ref::<CubeTensor<CudaRuntime>>()?;
    let out = matmul(lhs, rhs, out_dtype)?;
    (Box::new(out) as Box<dyn Any>).downcast::<FloatTensor<B>>().ok().map(|t| *t)
}

static PRODUCTS: AtomicU64 = AtomicU64::new(0);
static FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// Products of CUDA tensors that cuBLAS ran, and that fell back to Burn's matmul, since the
/// process started: benchmarks print them, so a figure says which matmul it measured.
pub fn counts() -> (u64, u64) {
    (PRODUCTS.load(Ordering::Relaxed), FALLBACKS.load(Ordering::Relaxed))
}

fn counted(result: Result<CubeTensor<CudaRuntime>, String>) -> Option<CubeTensor<CudaRuntime>> {
    match result {
        Ok(out) => {
            PRODUCTS.fetch_add(1, Ordering::Relaxed);
            Some(out)
        }
        Err(why) => {
            if FALLBACKS.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::warn!("a product on CUDA fell back to Burn's matmul (cuBLAS did not apply: {why}); later ones are counted, not logged");
            }
            None
        }
    }
}

/// Whether products on runtime `R` can go to cuBLAS: CUDA, with `libcublas` loaded.
pub(crate) fn ready<R: CubeRuntime>() -> bool {
    std::any::TypeId::of::<R>() == std::any::TypeId::of::<CudaRuntime>() && handle().is_some()
}

/// `lhs [m, k] · rhs [k, n]` (or `[b, m, k] · [b | 1, k, n]`), both in one dtype (f32, bf16 or
/// f16), accumulated in f32 and written as `out_dtype` (f32, or the operands' dtype). f32
/// operands multiply in TF32, as Burn's own matmul does on CUDA. `None` where cuBLAS does not
/// apply; see the module's comment.
pub(crate) fn matmul<R: CubeRuntime>(lhs: &CubeTensor<R>, rhs: &CubeTensor<R>, out_dtype: DType) -> Option<CubeTensor<R>> {
    gemm(lhs, rhs, out_dtype, 1.0, None)
}

/// `acc + alpha · lhs·rhs` as [`matmul`] computes the product, added into `acc` in place (a 2-D
/// `[m, n]` tensor of `out_dtype` with unit column stride that nothing else holds); without
/// `acc`, `alpha · lhs·rhs` in a new tensor.
pub(crate) fn gemm<R: CubeRuntime>(lhs: &CubeTensor<R>, rhs: &CubeTensor<R>, out_dtype: DType, alpha: f32, acc: Option<&CubeTensor<R>>) -> Option<CubeTensor<R>> {
    let (lhs, rhs) = (cuda(lhs)?, cuda(rhs)?);
    let dest = match acc {
        Some(acc) => Dest::Add(cuda(acc)?),
        None => Dest::New(out_dtype),
    };
    let out = counted(matmul_cuda(lhs, rhs, alpha, dest))?;
    (Box::new(out) as Box<dyn Any>).downcast::<CubeTensor<R>>().ok().map(|t| *t)
}

/// `dst[:, rows, :] = alpha · lhs·rhs`, or `+=` it with `accumulate`, in place: `dst` a
/// contiguous `[n, R, d]` tensor that nothing else holds, `lhs·rhs` `[n, rows.len(), d]`, in
/// `dst`'s dtype (f32, or the operands'). Where products write parts of one tensor (attention's
/// query chunks) and no copy joins them. `false` where cuBLAS does not apply.
pub(crate) fn gemm_rows<R: CubeRuntime>(lhs: &CubeTensor<R>, rhs: &CubeTensor<R>, alpha: f32, dst: &CubeTensor<R>, rows: std::ops::Range<usize>, accumulate: bool) -> bool {
    let (Some(lhs), Some(rhs), Some(dst)) = (cuda(lhs), cuda(rhs), cuda(dst)) else { return false };
    let shape = dst.meta.shape().to_vec();
    if shape.len() != 3 || !dst.is_contiguous() || !dst.can_mut() || rows.is_empty() || rows.end > shape[1] {
        return counted(Err(format!("row destination {shape:?} rows {rows:?}"))).is_some();
    }
    // The rows' view: same strides, starting `rows.start` rows in. Writing through it is sound
    // because `dst` has no other holder (checked above) and cuBLAS runs in stream order.
    let (per_matrix, d) = (shape[1] * shape[2], shape[2]);
    let view = CubeTensor::new(
        dst.client.clone(),
        dst.handle.clone().offset_start((rows.start * d * dst.dtype.size()) as u64),
        cubecl::zspace::metadata::Metadata::new(vec![shape[0], rows.len(), d], vec![per_matrix, d, 1]),
        dst.device.clone(),
        dst.dtype,
    );
    counted(matmul_cuda(lhs, rhs, alpha, Dest::Into { view: &view, beta: if accumulate { 1.0 } else { 0.0 } })).is_some()
}

/// `alpha · lhs·rhs` `[n, m, e]` (f32) written over the start of `buffer`, a contiguous f32
/// tensor of at least `n·m·e` elements that the caller keeps for such products, and returned
/// as a view of it. Products of many sizes in a loop then reuse one allocation where new
/// outputs of each size would each keep a block of the memory pool (attention's query chunks
/// raised the peak by 1 GB that way). `None` where cuBLAS does not apply.
pub(crate) fn gemm_over<R: CubeRuntime>(lhs: &CubeTensor<R>, rhs: &CubeTensor<R>, alpha: f32, buffer: &CubeTensor<R>, shape: [usize; 3]) -> Option<CubeTensor<R>> {
    let (lhs, rhs, buffer) = (cuda(lhs)?, cuda(rhs)?, cuda(buffer)?);
    let [n, m, e] = shape;
    if buffer.dtype != DType::F32 || !buffer.is_contiguous() || buffer.meta.shape().num_elements() < n * m * e {
        return None;
    }
    let view = CubeTensor::new(buffer.client.clone(), buffer.handle.clone(), cubecl::zspace::metadata::Metadata::new(vec![n, m, e], vec![m * e, e, 1]), buffer.device.clone(), DType::F32);
    counted(matmul_cuda(lhs, rhs, alpha, Dest::Into { view: &view, beta: 0.0 }))?;
    (Box::new(view) as Box<dyn Any>).downcast::<CubeTensor<R>>().ok().map(|t| *t)
}

fn cuda<R: CubeRuntime>(t: &CubeTensor<R>) -> Option<&CubeTensor<CudaRuntime>> {
    (t as &dyn Any).downcast_ref()
}

/// Where a product goes: a new tensor of the dtype, added into a 2-D accumulator nothing else
/// holds, or written (`beta` 0) or added (`beta` 1) into a strided view that [`gemm_rows`]
/// made and checked.
enum Dest<'a> {
    New(DType),
    Add(&'a CubeTensor<CudaRuntime>),
    Into { view: &'a CubeTensor<CudaRuntime>, beta: f32 },
}

fn matmul_cuda(lhs: &CubeTensor<CudaRuntime>, rhs: &CubeTensor<CudaRuntime>, alpha: f32, dest: Dest) -> Result<CubeTensor<CudaRuntime>, String> {
    let out_dtype = match &dest {
        Dest::New(dtype) => *dtype,
        Dest::Add(t) | Dest::Into { view: t, .. } => t.dtype,
    };
    let (ls, rs) = (lhs.meta.shape().to_vec(), rhs.meta.shape().to_vec());
    let rank = ls.len();
    if rank != rs.len() || !(2..=3).contains(&rank) || lhs.dtype != rhs.dtype || !(out_dtype == DType::F32 || out_dtype == lhs.dtype) {
        return Err(format!("ranks or dtypes: {ls:?} {:?} · {rs:?} {:?} -> {out_dtype:?}", lhs.dtype, rhs.dtype));
    }
    // The handle belongs to the context it was created in: device 0's.
    if lhs.device.index != 0 {
        return Err(format!("device cuda:{}", lhs.device.index));
    }
    data_type(lhs.dtype).zip(data_type(out_dtype)).ok_or("dtype")?;
    let (m, k, n) = (ls[rank - 2], ls[rank - 1], rs[rank - 1]);
    let batch = if rank == 3 { ls[0].max(rs[0]) } else { 1 };
    if rs[rank - 2] != k || (rank == 3 && ls[0] != batch) || m == 0 || n == 0 || k == 0 || [m, n, k, batch].iter().any(|&d| d > i32::MAX as usize) {
        return Err(format!("shapes {ls:?} · {rs:?}"));
    }
    let a = operand(&ls, lhs.meta.strides(), batch).ok_or_else(|| format!("layout of lhs {ls:?} strides {:?}", lhs.meta.strides()))?;
    let b = operand(&rs, rhs.meta.strides(), batch).ok_or_else(|| format!("layout of rhs {rs:?} strides {:?}", rhs.meta.strides()))?;
    handle().ok_or("no cuBLAS")?;

    let mut out_shape = ls.clone();
    out_shape[rank - 1] = n;
    let (out, ldc, stride_c, beta) = match dest {
        Dest::Add(acc) => {
            let strides = acc.meta.strides();
            if rank != 2 || acc.meta.shape().to_vec() != out_shape || strides[1] != 1 || strides[0] < n || !acc.can_mut() {
                return Err(format!("accumulator {:?} strides {strides:?} {:?} for {out_shape:?}", acc.meta.shape(), acc.dtype));
            }
            (acc.clone(), strides[0], m * n, 1.0)
        }
        Dest::Into { view, beta } => {
            let strides = view.meta.strides();
            if rank != 3 || view.meta.shape().to_vec() != out_shape || strides[2] != 1 || strides[1] < n {
                return Err(format!("destination {:?} strides {strides:?} for {out_shape:?}", view.meta.shape()));
            }
            (view.clone(), strides[1], strides[0], beta)
        }
        Dest::New(_) => (empty_device_contiguous_dtype(lhs.client.clone(), lhs.device.clone(), out_shape.into(), out_dtype), n, m * n, 0.0),
    };
    // Row-major `out = lhs · rhs` is column-major `outᵀ = rhsᵀ · lhsᵀ`: cuBLAS's A is `rhs`,
    // its B is `lhs`, and the output `[m, n]` row-major is `[n, m]` column-major with ld `n`.
    let gemm = Gemm {
        trans_a: b.trans,
        trans_b: a.trans,
        m: n as u64,
        n: m as u64,
        k: k as u64,
        lda: b.ld as u64,
        ldb: a.ld as u64,
        ldc: ldc as u64,
        stride_a: b.batch_stride as u64,
        stride_b: a.batch_stride as u64,
        stride_c: stride_c as u64,
        batch: batch as u64,
        in_type: lhs.dtype,
        out_type: out_dtype,
        alpha,
        beta,
    };
    let args = KernelArguments::new()
        .with_buffer(rhs.handle.clone().binding())
        .with_buffer(lhs.handle.clone().binding());
    let info = [vec![TASK_GEMM], gemm.encode()].concat();
    let args = KernelArguments { info: MetadataBindingInfo::custom(info), ..args.with_buffer(out.handle.clone().binding()) };
    lhs.client.launch(Box::new(HostTask), CubeCount::Static(1, 1, 1), args);
    Ok(out)
}

/// `parts` (contiguous f32 `[lenᵢ]`) copied into a new `[total]` f32 tensor, part `i` from element
/// `offsets[i]` on, zeros elsewhere: one host task ([`run_gather`]) where a `slice_assign` per
/// part costs the calling thread a launch each. `None` off CUDA, without cuBLAS (whose loading
/// registers the host task), or for a part in another dtype or layout.
pub(crate) fn gather<R: CubeRuntime>(parts: &[CubeTensor<R>], offsets: &[usize], total: usize) -> Option<CubeTensor<R>> {
    const F32_BYTES: u64 = 4;
    if !ready::<R>() || parts.len() != offsets.len() {
        return None;
    }
    let parts: Vec<&CubeTensor<CudaRuntime>> = parts.iter().map(|t| (t as &dyn Any).downcast_ref()).collect::<Option<_>>()?;
    let first = *parts.first()?;
    let mut info = vec![TASK_GATHER, total as u64 * F32_BYTES];
    for (part, &at) in parts.iter().zip(offsets) {
        let &[len] = &part.meta.shape().to_vec()[..] else { return None };
        if part.dtype != DType::F32 || part.meta.strides()[..] != [1] || part.device.index != 0 || at + len > total {
            return None;
        }
        info.extend([at as u64 * F32_BYTES, len as u64 * F32_BYTES]);
    }
    let out = empty_device_contiguous_dtype(first.client.clone(), first.device.clone(), vec![total].into(), DType::F32);
    let args = parts.iter().fold(KernelArguments::new().with_buffer(out.handle.clone().binding()), |args, part| args.with_buffer(part.handle.clone().binding()));
    let args = KernelArguments { info: MetadataBindingInfo::custom(info), ..args };
    first.client.launch(Box::new(HostTask), CubeCount::Static(1, 1, 1), args);
    (Box::new(out) as Box<dyn Any>).downcast::<CubeTensor<R>>().ok().map(|t| *t)
}

/// The launch that the CUDA server runs as [`run_gemm`] instead of compiling it.
struct HostTask;

impl cubecl::prelude::KernelMetadata for HostTask {
    fn name(&self) -> &'static str {
        HOST_TASK
    }

    fn id(&self) -> KernelId {
        KernelId::new::<Self>()
    }

    fn address_type(&self) -> cubecl::ir::StorageType {
        cubecl::ir::StorageType::Scalar(cubecl::ir::ElemType::UInt(cubecl::ir::UIntKind::U64))
    }
}

impl cubecl::CubeTask<CudaCompiler> for HostTask {
    fn compile(
        &self,
        _: &mut CudaCompiler,
        _: &<CudaCompiler as cubecl::Compiler>::CompilationOptions,
        _: ExecutionMode,
        _: cubecl::ir::StorageType,
    ) -> Result<CompiledKernel<CudaCompiler>, cubecl::CompilationError> {
        unreachable!("the CUDA server runs a host task without compiling it (vendor/cubecl-cuda)")
    }
}

/// One `cublasGemmStridedBatchedEx` call, column-major, `C = α·A·B + β·C`, as it travels
/// through the launch's scalar data.
struct Gemm {
    trans_a: cublas::cublasOperation_t,
    trans_b: cublas::cublasOperation_t,
    m: u64,
    n: u64,
    k: u64,
    lda: u64,
    ldb: u64,
    ldc: u64,
    stride_a: u64,
    stride_b: u64,
    stride_c: u64,
    batch: u64,
    in_type: DType,
    out_type: DType,
    alpha: f32,
    beta: f32,
}

const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

impl Gemm {
    fn encode(&self) -> Vec<u64> {
        let trans = |t| (t == cublas::cublasOperation_t::CUBLAS_OP_T) as u64;
        let code = |d| DTYPES.iter().position(|&x| x == d).unwrap_or(0) as u64;
        vec![
            trans(self.trans_a), trans(self.trans_b), self.m, self.n, self.k, self.lda, self.ldb, self.ldc,
            self.stride_a, self.stride_b, self.stride_c, self.batch, code(self.in_type), code(self.out_type),
            self.alpha.to_bits() as u64, self.beta.to_bits() as u64,
        ]
    }

    fn decode(p: &[u64]) -> Option<Self> {
        let trans = |v| if v == 1 { cublas::cublasOperation_t::CUBLAS_OP_T } else { cublas::cublasOperation_t::CUBLAS_OP_N };
        let dtype = |v: u64| DTYPES.get(v as usize).copied();
        let &[ta, tb, m, n, k, lda, ldb, ldc, sa, sb, sc, batch, i, o, alpha, beta] = p else { return None };
        let float = |bits: u64| f32::from_bits(bits as u32);
        Some(Self {
            trans_a: trans(ta),
            trans_b: trans(tb),
            m,
            n,
            k,
            lda,
            ldb,
            ldc,
            stride_a: sa,
            stride_b: sb,
            stride_c: sc,
            batch,
            in_type: dtype(i)?,
            out_type: dtype(o)?,
            alpha: float(alpha),
            beta: float(beta),
        })
    }
}

/// The first scalar of a host task's data: which task it is.
const TASK_GEMM: u64 = 0;
const TASK_GATHER: u64 = 1;

/// The host task, run on CubeCL's device thread with the stream, the pointers of the launch's
/// bindings and its scalar data: a product ([`run_gemm`]) or a gather ([`run_gather`]).
fn run_host_task(stream: cudarc::driver::sys::CUstream, pointers: &[u64], data: &[u64]) -> Result<(), String> {
    match data.split_first() {
        Some((&TASK_GEMM, params)) => run_gemm(stream, pointers, params),
        Some((&TASK_GATHER, params)) => run_gather(stream, pointers, params),
        _ => Err(format!("a host task of unknown kind ({:?})", data.first())),
    }
}

/// [`gather`] on the device thread: bindings `[out, parts..]`, data `[total bytes, (offset
/// bytes, length bytes) per part]`.
fn run_gather(stream: cudarc::driver::sys::CUstream, pointers: &[u64], params: &[u64]) -> Result<(), String> {
    let (Some((&out, parts)), Some((&total, spans))) = (pointers.split_first(), params.split_first()) else {
        return Err("a gather without an output".into());
    };
    if spans.len() != 2 * parts.len() {
        return Err(format!("a gather of {} parts with {} offsets and lengths", parts.len(), spans.len()));
    }
    let failed = |err| format!("a gather's copy failed ({err:?})");
    // SAFETY: `out` is live device memory of `total` bytes and each part of its length, held by
    // the launch's bindings (stream order keeps them valid after it, as in `run_gemm`); each
    // span lies inside `out` (`gather` checked the offsets against the total).
    unsafe {
        cudarc::driver::result::memset_d8_async(out, 0, total as usize, stream).map_err(failed)?;
        for (&src, span) in parts.iter().zip(spans.chunks_exact(2)) {
            if span[1] > 0 {
                cudarc::driver::result::memcpy_dtod_async(out + span[0], src, span[1] as usize, stream).map_err(failed)?;
            }
        }
    }
    Ok(())
}

/// A product on the device thread: bindings `[A, B, C]`, data a [`Gemm`].
fn run_gemm(stream: cudarc::driver::sys::CUstream, pointers: &[u64], params: &[u64]) -> Result<(), String> {
    let (&[a, b, c], Some(g)) = (pointers, Gemm::decode(params)) else {
        return Err(format!("a cuBLAS launch with {} buffers and {} parameters", pointers.len(), params.len()));
    };
    let (in_type, out_type) = data_type(g.in_type).zip(data_type(g.out_type)).ok_or("dtype")?;
    let compute = match g.in_type {
        // f32 operands multiply in TF32, as Burn's own matmul does on CUDA.
        DType::F32 => cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        _ => cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
    };
    let handle = handle().ok_or("no cuBLAS")?.lock().map_err(|_| "cuBLAS handle poisoned")?;
    let (alpha, beta) = (g.alpha, g.beta);
    // SAFETY: the pointers are live device memory of the sizes the shapes say: CubeCL holds the
    // bindings through the launch, and stream order keeps them valid after it (memory freed
    // later is reused only by work queued later on this stream). The handle is used by one
    // thread at a time.
    let status = unsafe {
        cudarc::cublas::result::set_stream(handle.0, stream as cublas::cudaStream_t).and_then(|()| {
            cudarc::cublas::result::gemm_strided_batched_ex(
                handle.0,
                g.trans_a,
                g.trans_b,
                g.m as i32,
                g.n as i32,
                g.k as i32,
                (&alpha as *const f32).cast::<c_void>(),
                a as *const c_void,
                in_type,
                g.lda as i32,
                g.stride_a as i64,
                b as *const c_void,
                in_type,
                g.ldb as i32,
                g.stride_b as i64,
                (&beta as *const f32).cast::<c_void>(),
                c as *mut c_void,
                out_type,
                g.ldc as i32,
                g.stride_c as i64,
                g.batch as i32,
                compute,
                cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        })
    };
    status.map_err(|err| format!("cublasGemmEx failed ({err:?}) for m {} n {} k {} × {}", g.m, g.n, g.k, g.batch))
}
