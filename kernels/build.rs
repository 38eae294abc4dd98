//! Exports `KILN_KERNELS_SOURCE_ID`: a hash of this crate's sources, which names the folder the
//! compiled GPU kernels are cached in (`keep_kernel_cache`). CubeCL keys its on-disk cache by
//! each kernel's type and compile-time arguments, not by its code, so a kernel whose code
//! changed but not its signature would be loaded as another build compiled it.

use std::path::Path;

fn main() {
    let src = Path::new("src");
    println!("cargo:rerun-if-changed=src");
    let mut files: Vec<_> = std::fs::read_dir(src).map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect()).unwrap_or_default();
    files.sort();
    // FNV-1a: stable across Rust releases, unlike std's hasher.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for file in files {
        for byte in std::fs::read(&file).unwrap_or_default() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    println!("cargo:rustc-env=KILN_KERNELS_SOURCE_ID={hash:016x}");
}
