//! kiln: the memory pools (see KILN-PATCH.md). Device memory in upstream's `ExclusivePages`
//! unless `KILN_CUDA_POOL=sliced` asks for upstream's default, `SubSlices`; pinned host memory
//! always in `SubSlices`.
//!
//! `SubSlices` cuts pages of 20 MB to a quarter of the card into slices: a training step's
//! 30–300 MB tensors share 1.25 GB pages, and a page is added whenever no gap in the others fits.
//! `ExclusivePages` gives every allocation a page of its own, reused for later allocations of up
//! to its size within one of 24 size buckets (each 1.79× the last), and frees pages left unused
//! for a while.

use cubecl_core::MemoryConfiguration;

/// The pools for the CUDA server's device memory.
pub fn memory_configuration() -> MemoryConfiguration {
    match std::env::var("KILN_CUDA_POOL").as_deref() {
        Ok("sliced") => MemoryConfiguration::SubSlices,
        _ => MemoryConfiguration::ExclusivePages,
    }
}

/// The pools for pinned host memory (the staging of copies): upstream's default. Exclusive pages
/// free a page left unused for a while with `cuMemFreeHost` at once, not in stream order, and
/// with them `kiln bench sample` and `kiln bench fused` died of a segmentation fault on the H100.
pub fn pinned_configuration() -> MemoryConfiguration {
    MemoryConfiguration::SubSlices
}
