//! Device memory as the backend's allocator sees it, so that training can report the peak
//! GPU memory it took (Burn 0.21's `Backend` trait has no such query; CubeCL's client has).

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::Autodiff;
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray};
use burn::tensor::backend::Backend;

/// One reading of the allocator on a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MemoryStats {
    /// Bytes of live tensors (allocations currently handed out).
    pub in_use: u64,
    /// Bytes the allocator holds from the device (pages, kept for reuse until cleanup): what
    /// the process takes from the card, and what `nvidia-smi` would show beside the context.
    pub reserved: u64,
}

/// Backend extension: the allocator's current figures, `None` where the backend has no device
/// allocator of its own (the CPU backend uses the process heap; read its resident size instead).
/// The figure counts every operation queued so far, without waiting for the device: CubeCL
/// allocates when work is queued (in queue order), and the fusion backend, which holds
/// operations back, flushes them first.
pub trait DeviceMemory: Backend {
    fn memory_stats(_device: &Self::Device) -> Option<MemoryStats> {
        None
    }
}

impl<B: DeviceMemory, C: CheckpointStrategy> DeviceMemory for Autodiff<B, C> {
    fn memory_stats(device: &Self::Device) -> Option<MemoryStats> {
        B::memory_stats(device)
    }
}

impl<E: FloatNdArrayElement, I: IntNdArrayElement, Q: QuantElement> DeviceMemory for NdArray<E, I, Q> where NdArrayTensor: From<SharedArray<E>> + From<SharedArray<I>> {}

#[cfg(feature = "cubecl")]
impl<R: burn_cubecl::CubeRuntime, F: burn_cubecl::FloatElement, I: burn_cubecl::IntElement, BT: burn_cubecl::BoolElement> DeviceMemory
    for burn_cubecl::CubeBackend<R, F, I, BT>
{
    fn memory_stats(device: &Self::Device) -> Option<MemoryStats> {
        // CubeCL keeps one allocator per stream and reports the calling thread's; kiln runs a
        // training step's work from one thread, so that is the step's memory.
        let usage = <R as cubecl::Runtime>::client(device).memory_usage().ok()?;
        Some(MemoryStats { in_use: usage.bytes_in_use, reserved: usage.bytes_reserved })
    }
}

#[cfg(feature = "cubecl")]
impl<B: burn_fusion::FusionBackend + DeviceMemory> DeviceMemory for burn_fusion::Fusion<B> {
    fn memory_stats(device: &Self::Device) -> Option<MemoryStats> {
        // Operations waiting to be fused have not allocated yet: run them.
        let _ = <Self as Backend>::sync(device);
        B::memory_stats(device)
    }
}
