//! Which Burn backend runs a command, chosen at run time by `--device`.
//!
//! Parsing never depends on cargo features, so a build without `cuda` can say "this binary was
//! built without the `cuda` feature" instead of "unknown device". Generic code is instantiated
//! once per compiled-in backend by [`with_backend!`]; keep the list short, since each entry
//! monomorphises the whole model again.

use std::fmt;
use std::str::FromStr;

pub use kiln_kernels::QuantMatmul;

/// What training needs of a backend: autodiff, with the quantised kernels on both the autodiff
/// backend (QLoRA's forward) and the inner one (evaluation and sampling without a tape).
pub trait TrainBackend: burn::tensor::backend::AutodiffBackend<InnerBackend: QuantMatmul> + QuantMatmul {}

impl<B> TrainBackend for B where B: burn::tensor::backend::AutodiffBackend<InnerBackend: QuantMatmul> + QuantMatmul {}

/// CPU backend: ndarray, f32 floats.
pub type Cpu = burn::backend::NdArray<f32>;
#[cfg(feature = "wgpu")]
pub type Wgpu = burn::backend::Wgpu;
/// CUDA: Burn's `CubeBackend` over CubeCL's CUDA runtime, without Burn's fusion stream. In
/// Burn 0.21 that stream panics ("Ordering is bigger than operations", burn-fusion's
/// `OrderedExecution`) on its worker thread during a LoRA training step, and the step never
/// finishes; without it every op runs as its own kernel, and kiln's fused operations
/// (the chunked LM-head loss, the quantised products) do the fusing that matters.
#[cfg(feature = "cuda")]
pub type Cuda = kiln_kernels::CudaDirect;
#[cfg(feature = "rocm")]
pub type Rocm = burn::backend::Rocm;

/// A parsed `--device` value: `cpu`, `wgpu`, `wgpu:cpu`, `wgpu:N`, `cuda[:N]`, `rocm[:N]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    #[default]
    Cpu,
    Wgpu(WgpuPick),
    Cuda(usize),
    Rocm(usize),
}

/// Which wgpu adapter to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WgpuPick {
    /// wgpu's default adapter (a discrete GPU if there is one, else lavapipe).
    Default,
    /// A software (CPU) adapter such as Mesa's lavapipe.
    Cpu,
    /// The N-th discrete GPU.
    Discrete(usize),
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("unknown device `{0}`: expected cpu, wgpu[:cpu|:N], cuda[:N] or rocm[:N]")]
    Unknown(String),
    #[error("bad device index in `{0}`: expected a number such as `cuda:0`")]
    BadIndex(String),
    #[error("this kiln was built without the `{feature}` feature, so `--device {device}` is not available; rebuild with `cargo build --release --features {feature}`")]
    NotCompiled { device: String, feature: &'static str },
    #[error("`--device cuda` needs the NVIDIA driver (libcuda.so.1), which was not found on this machine")]
    NoCudaDriver,
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(s: &str) -> Result<Self, DeviceError> {
        let (name, idx) = match s.split_once(':') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let index = |idx: Option<&str>| -> Result<usize, DeviceError> {
            idx.map_or(Ok(0), |i| i.parse().map_err(|_| DeviceError::BadIndex(s.to_string())))
        };
        match name {
            "cpu" | "ndarray" if idx.is_none() => Ok(Self::Cpu),
            "wgpu" | "vulkan" | "metal" => match idx {
                None => Ok(Self::Wgpu(WgpuPick::Default)),
                Some("cpu") => Ok(Self::Wgpu(WgpuPick::Cpu)),
                Some(_) => Ok(Self::Wgpu(WgpuPick::Discrete(index(idx)?))),
            },
            "cuda" => Ok(Self::Cuda(index(idx)?)),
            "rocm" | "hip" => Ok(Self::Rocm(index(idx)?)),
            _ => Err(DeviceError::Unknown(s.to_string())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => write!(f, "cpu"),
            Self::Wgpu(WgpuPick::Default) => write!(f, "wgpu"),
            Self::Wgpu(WgpuPick::Cpu) => write!(f, "wgpu:cpu"),
            Self::Wgpu(WgpuPick::Discrete(i)) => write!(f, "wgpu:{i}"),
            Self::Cuda(i) => write!(f, "cuda:{i}"),
            Self::Rocm(i) => write!(f, "rocm:{i}"),
        }
    }
}

impl DeviceSpec {
    /// Checks that the backend was compiled in and, where that can be known cheaply, that it can
    /// start: Burn's CUDA runtime panics on a worker thread when libcuda is missing. A GPU
    /// backend that passes keeps its compiled kernels on disk from here on.
    pub fn check(&self) -> Result<(), DeviceError> {
        let missing = |feature| {
            Err(DeviceError::NotCompiled { device: self.to_string(), feature })
        };
        match self {
            Self::Cpu => Ok(()),
            Self::Wgpu(_) if !cfg!(feature = "wgpu") => missing("wgpu"),
            Self::Cuda(_) if !cfg!(feature = "cuda") => missing("cuda"),
            Self::Cuda(_) if !cuda_driver_present() => Err(DeviceError::NoCudaDriver),
            Self::Rocm(_) if !cfg!(feature = "rocm") => missing("rocm"),
            _ => {
                keep_kernel_cache();
                Ok(())
            }
        }
    }
}

/// GPU backends compile kernels at run time: keep them (and autotune results) in
/// `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln/cubecl`, else `~/.cache/kiln/cubecl`, so a
/// second run starts warm.
fn keep_kernel_cache() {
    #[cfg(any(feature = "wgpu", feature = "cuda", feature = "rocm"))]
    {
        let env = |name| std::env::var_os(name).filter(|v| !v.is_empty()).map(std::path::PathBuf::from);
        let dir = env("KILN_CACHE_DIR")
            .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("kiln")))
            .or_else(|| env("HOME").map(|d| d.join(".cache/kiln")))
            .map(|d| d.join("cubecl"));
        if let Some(dir) = dir {
            kiln_kernels::keep_kernel_cache(&dir);
        }
    }
}

fn cuda_driver_present() -> bool {
    let mut dirs: Vec<String> = std::env::var("LD_LIBRARY_PATH")
        .unwrap_or_default()
        .split(':')
        .filter(|d| !d.is_empty())
        .map(String::from)
        .collect();
    dirs.extend(
        ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/cuda/lib64", "/usr/lib/wsl/lib"]
            .map(String::from),
    );
    dirs.iter().any(|d| std::path::Path::new(d).join("libcuda.so.1").exists())
}

#[cfg(feature = "wgpu")]
pub fn wgpu_device(pick: WgpuPick) -> burn::backend::wgpu::WgpuDevice {
    use burn::backend::wgpu::WgpuDevice;
    match pick {
        WgpuPick::Default => WgpuDevice::DefaultDevice,
        WgpuPick::Cpu => WgpuDevice::Cpu,
        WgpuPick::Discrete(i) => WgpuDevice::DiscreteGpu(i),
    }
}

/// Runs `$body` with `$B` bound to the backend type and `$device` to its device, for the backend
/// that `$spec` names. Call [`DeviceSpec::check`] first: a backend that was not compiled in is
/// unreachable here.
#[macro_export]
macro_rules! with_backend {
    ($spec:expr, |$B:ident, $device:ident| $body:expr) => {{
        #[allow(unreachable_patterns)]
        match $spec {
            #[cfg(feature = "wgpu")]
            $crate::backend::DeviceSpec::Wgpu(pick) => {
                type $B = $crate::backend::Wgpu;
                let $device = $crate::backend::wgpu_device(pick);
                $body
            }
            #[cfg(feature = "cuda")]
            $crate::backend::DeviceSpec::Cuda(i) => {
                type $B = $crate::backend::Cuda;
                let $device = burn::backend::cuda::CudaDevice::new(i);
                $body
            }
            #[cfg(feature = "rocm")]
            $crate::backend::DeviceSpec::Rocm(i) => {
                type $B = $crate::backend::Rocm;
                let $device = burn::backend::rocm::RocmDevice::new(i);
                $body
            }
            _ => {
                type $B = $crate::backend::Cpu;
                let $device = burn::backend::ndarray::NdArrayDevice::Cpu;
                $body
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("wgpu:cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Wgpu(WgpuPick::Cpu));
        assert_eq!("cuda:1".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(1));
        assert!(matches!("tpu".parse::<DeviceSpec>(), Err(DeviceError::Unknown(_))));
        assert!(matches!("cuda:x".parse::<DeviceSpec>(), Err(DeviceError::BadIndex(_))));
    }

    #[test]
    fn missing_backend_names_the_feature() {
        #[cfg(not(feature = "rocm"))]
        {
            let err = DeviceSpec::Rocm(0).check().unwrap_err().to_string();
            assert!(err.contains("`rocm` feature"), "{err}");
        }
    }
}
