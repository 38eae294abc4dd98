//! Device memory as the backend's allocator sees it, so that training can report the peak
//! GPU memory it took (Burn 0.21's `Backend` trait has no such query; CubeCL's client has),
//! and reads from it queued ahead of later work.

use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::Autodiff;
use burn::backend::ndarray::{FloatNdArrayElement, IntNdArrayElement, NdArray, NdArrayTensor, QuantElement, SharedArray};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::TensorData;

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

    /// Queues the copy of `tensor` to the host now, behind the work queued so far, and returns
    /// what waits for it. Work queued after this call does not delay the copy: a training step
    /// can queue the next step's forward and backward before it waits for this one's loss
    /// (Burn's `into_data` queues the copy only when waited for, behind everything queued by
    /// then). The default reads when waited for: right for backends that compute as they queue.
    fn read_later(tensor: FloatTensor<Self>) -> Reading {
        Reading(Box::new(move || burn::tensor::read_sync(Self::float_into_data(tensor)).map_err(|e| format!("{e:?}"))))
    }
}

/// Values on their way to the host ([`DeviceMemory::read_later`]).
pub struct Reading(Box<dyn FnOnce() -> Result<TensorData, String> + Send>);

impl Reading {
    /// Waits for the copy; the values as f32.
    pub fn wait(self) -> Result<Vec<f32>, String> {
        (self.0)()?.convert::<f32>().into_vec::<f32>().map_err(|e| format!("{e:?}"))
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

    fn read_later(tensor: FloatTensor<Self>) -> Reading {
        // What Burn's `into_data` does, with the copy queued here rather than when waited for:
        // CubeCL's `read_one_tensor_async` queues the copy and a fence before it returns.
        let tensor = burn_cubecl::kernel::into_contiguous_aligned(tensor);
        let (shape, dtype) = (tensor.meta.shape().clone(), tensor.dtype);
        let copy = cubecl::server::CopyDescriptor::new(tensor.handle.clone().binding(), shape.clone(), tensor.meta.strides().clone(), tensor.elem_size());
        type Copy<'a> = core::pin::Pin<Box<dyn Future<Output = Result<burn::tensor::Bytes, cubecl::server::ServerError>> + Send + 'a>>;
        let bytes: Copy<'_> = Box::pin(tensor.client.read_one_tensor_async(copy));
        // SAFETY: only the type borrows the client. In cubecl-runtime 0.10.0 (pinned),
        // `read_one_tensor_async` hands the device thread the copy and awaits the `'static` boxed
        // future it gets back; the `impl Future` it is returned as names the client's lifetime
        // because of the 2024 capture rules alone.
        let bytes: Copy<'static> = unsafe { core::mem::transmute::<Copy<'_>, Copy<'static>>(bytes) };
        Reading(Box::new(move || burn::tensor::read_sync(bytes).map(|b| TensorData::from_bytes(b, shape, dtype)).map_err(|e| format!("{e}"))))
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
