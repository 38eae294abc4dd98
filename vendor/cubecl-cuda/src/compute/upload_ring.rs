//! kiln patch (KILN-PATCH.md): small host-to-device uploads staged in one ring of pinned memory
//! per stream.
//!
//! Every kernel launch uploads its shapes and strides (a few hundred bytes). Staged through
//! the pinned-memory pool, each upload reserves a slice that stays live until the stream's drop
//! queue flushes, and the pool finds free space by scanning every slice of its pages: with a
//! few thousand uploads in flight per training step, that scan made each launch cost tens of
//! microseconds of the device thread. Here an upload takes the next bytes of a ring, and the
//! ring only waits when it comes back to a segment whose copies the GPU has not yet run (a
//! fence recorded when the ring left it, several segments ago).

use super::ring_cursor::RingCursor;
use super::sync::Fence;
use cubecl_core::server::IoError;
use cubecl_common::backtrace::BackTrace;
use cudarc::driver::sys::CUstream_st;

/// Uploads up to this size go through the ring; larger ones keep the pooled staging.
pub const MAX_UPLOAD: usize = 16 * 1024;
const SEGMENT: usize = 1 << 20;
const SEGMENTS: usize = 8;
/// Each upload starts on this boundary (CUDA copies are fastest from aligned host memory).
const ALIGN: usize = 64;

#[derive(Debug)]
pub struct UploadRing {
    /// `SEGMENT · SEGMENTS` bytes from `cuMemAllocHost`, allocated on first use.
    base: *mut u8,
    /// The stream every copy out of the ring runs on (the ring belongs to it).
    stream: *mut CUstream_st,
    /// Where the next upload goes.
    cursor: RingCursor,
    /// Per segment: recorded after the last copy out of it was queued, while the ring moves on.
    fences: [Option<Fence>; SEGMENTS],
}

// SAFETY: the ring is owned by its stream's state, which only the device thread touches.
unsafe impl Send for UploadRing {}

impl UploadRing {
    pub fn new(stream: *mut CUstream_st) -> Self {
        Self { base: core::ptr::null_mut(), stream, cursor: RingCursor::new(SEGMENT, SEGMENTS), fences: Default::default() }
    }

    /// Copies `data` (at most [`MAX_UPLOAD`] bytes) into the ring and queues its copy to the
    /// device address `dst` on the ring's stream.
    pub fn upload(&mut self, data: &[u8], dst: u64) -> Result<(), IoError> {
        let error = |description: String| IoError::Unknown { description, backtrace: BackTrace::capture() };
        debug_assert!(data.len() <= MAX_UPLOAD);
        if self.base.is_null() {
            let mut ptr = core::ptr::null_mut();
            // SAFETY: a plain allocation of pinned host memory for this ring alone.
            let result = unsafe { cudarc::driver::sys::cuMemAllocHost_v2(&mut ptr, SEGMENT * SEGMENTS) };
            if result != cudarc::driver::sys::CUresult::CUDA_SUCCESS {
                return Err(error(format!("cuMemAllocHost_v2 for the upload ring failed: {result:?}")));
            }
            self.base = ptr as *mut u8;
        }
        let len = data.len().next_multiple_of(ALIGN).max(ALIGN);
        let place = self.cursor.place(len);
        if let Some((left, entered)) = place.moved {
            self.fences[left] = Some(Fence::new(self.stream));
            if let Some(fence) = self.fences[entered].take() {
                fence.wait_sync().map_err(|err| error(format!("{err:?}")))?;
            }
        }
        // SAFETY: the upload lies inside one segment of the allocation (`RingCursor::place`;
        // segments are larger than any upload), and no queued copy still reads those bytes: the
        // fence of this segment's previous round has been waited for.
        let staged = unsafe {
            let dst_host = self.base.add(place.at);
            core::ptr::copy_nonoverlapping(data.as_ptr(), dst_host, data.len());
            core::slice::from_raw_parts(dst_host as *const u8, data.len())
        };
        // SAFETY: `dst` is a device allocation of at least `data.len()` bytes (the caller's),
        // `staged` is pinned host memory that stays untouched until the copy has run.
        unsafe { cudarc::driver::result::memcpy_htod_async(dst, staged, self.stream) }.map_err(|e| error(format!("CUDA memcpy_htod failed: {e}")))
    }
}

impl Drop for UploadRing {
    fn drop(&mut self) {
        if self.base.is_null() {
            return;
        }
        // SAFETY: the copies out of the ring have run once the stream is synchronised; the
        // memory came from `cuMemAllocHost`. Errors (a context already gone) leave nothing to do.
        unsafe {
            let _ = cudarc::driver::sys::cuStreamSynchronize(self.stream);
            let _ = cudarc::driver::sys::cuMemFreeHost(self.base as *mut core::ffi::c_void);
        }
    }
}
