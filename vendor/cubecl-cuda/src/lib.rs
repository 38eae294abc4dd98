#[macro_use]
extern crate derive_new;
extern crate alloc;

mod compute;
mod device;
mod runtime;

pub use device::*;
pub use runtime::*;

/// kiln patch: work that runs on the host, in the device thread, in launch order.
///
/// A "kernel" whose [`name`](cubecl_runtime::kernel::KernelMetadata::name) is [`HOST_TASK`] is
/// not compiled: the server calls the function registered in [`HOST_TASK_FN`] with the CUDA
/// stream the kernel would have run on, the device pointers of its buffer bindings (in order)
/// and its scalar data (`KernelArguments::info.data`). kiln runs cuBLAS this way: the call is
/// queued like any launch, ordered with CubeCL's kernels on the same stream, and the caller
/// never waits for the device thread.
pub mod host_task {
    use std::sync::OnceLock;

    /// The name that marks a launch as a host task.
    pub const HOST_TASK: &str = "kiln::host_task";

    /// `(stream, buffer pointers, scalar data)`; an `Err` is recorded as a launch error.
    pub type HostTaskFn = fn(cudarc::driver::sys::CUstream, &[u64], &[u64]) -> Result<(), String>;

    /// Set once by the program that launches host tasks.
    pub static HOST_TASK_FN: OnceLock<HostTaskFn> = OnceLock::new();
}

/// kiln patch: how many cubes of a kernel an SM must be able to hold at once.
///
/// CubeCL declares every kernel `__launch_bounds__(threads)`, which lets the compiler take as many
/// registers as it likes; a kernel whose speed depends on more cubes sharing an SM (to hide the
/// latency of its tensor-core and shared-memory work) can ask for `__launch_bounds__(threads,
/// cubes)`, which caps its registers at what that many cubes leave. The bound is part of the
/// compiled kernel's cache key.
pub mod launch_bounds {
    use std::sync::OnceLock;

    /// A kernel's id (`KernelId::stable_format`, which names the kernel's type and so its
    /// function) -> cubes per SM to leave room for (`None`: no bound).
    pub type MinCubesFn = fn(&str) -> Option<u32>;

    /// Set once by the program that wants the bounds.
    pub static MIN_CUBES_FN: OnceLock<MinCubesFn> = OnceLock::new();

    pub(crate) fn min_cubes(kernel_id: &cubecl_runtime::id::KernelId) -> Option<u32> {
        MIN_CUBES_FN.get().and_then(|f| f(&kernel_id.stable_format()))
    }

    /// `source` with the kernel's launch bounds given `min_cubes`.
    pub(crate) fn bounded(source: String, threads: u32, min_cubes: u32) -> String {
        source.replacen(&format!("__launch_bounds__({threads})"), &format!("__launch_bounds__({threads}, {min_cubes})"), 1)
    }
}

#[cfg(feature = "ptx-wmma")]
pub(crate) type WmmaCompiler = cubecl_cpp::cuda::mma::PtxWmmaCompiler;

#[cfg(not(feature = "ptx-wmma"))]
pub(crate) type WmmaCompiler = cubecl_cpp::cuda::mma::CudaWmmaCompiler;

pub mod install {
    use std::path::PathBuf;

    pub fn include_path() -> PathBuf {
        let mut path = cuda_path().expect("
        CUDA installation not found.
        Please ensure that CUDA is installed and the CUDA_PATH environment variable is set correctly.
        Note: Default paths are used for Linux (/usr/local/cuda) and Windows (C:/Program Files/NVIDIA GPU Computing Toolkit/CUDA/), which may not be correct.
    ");
        path.push("include");
        path
    }

    pub fn cccl_include_path() -> PathBuf {
        let mut path = include_path();
        path.push("cccl");
        path
    }

    pub fn cuda_path() -> Option<PathBuf> {
        if let Ok(path) = std::env::var("CUDA_PATH") {
            return Some(PathBuf::from(path));
        }

        #[cfg(target_os = "linux")]
        {
            // If it is installed as part of the distribution
            return if std::fs::exists("/usr/local/cuda").is_ok_and(|exists| exists) {
                Some(PathBuf::from("/usr/local/cuda"))
            } else if std::fs::exists("/opt/cuda").is_ok_and(|exists| exists) {
                Some(PathBuf::from("/opt/cuda"))
            } else if std::fs::exists("/usr/bin/nvcc").is_ok_and(|exists| exists) {
                // Maybe the compiler was installed within the user path.
                Some(PathBuf::from("/usr"))
            } else {
                None
            };
        }

        #[cfg(target_os = "windows")]
        {
            return Some(PathBuf::from(
                "C:/Program Files/NVIDIA GPU Computing Toolkit/CUDA/",
            ));
        }

        #[allow(unreachable_code)]
        None
    }
}

#[cfg(test)]
#[allow(unexpected_cfgs)]
mod tests {
    pub type TestRuntime = crate::CudaRuntime;

    pub use half::{bf16, f16};

    cubecl_core::testgen_all!(f32: [f16, bf16, f32, f64], i32: [i8, i16, i32, i64], u32: [u8, u16, u32, u64]);
    cubecl_std::testgen!();
    cubecl_std::testgen_tensor_identity!([f16, bf16, f32, u32]);
    cubecl_std::testgen_quantized_view!(f16);
}
