//! File writes that a crash cannot leave half done.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to a temporary file beside `path`, syncs it, then renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    // Removed on drop if anything below fails, so no stray temporary files stay behind.
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Builds a directory in a temporary sibling (`fill` writes into it), then renames it to
/// `out`, replacing an existing one only after the new one is complete.
pub fn write_dir_atomic<E: From<std::io::Error>>(out: &Path, fill: impl FnOnce(&Path) -> Result<(), E>) -> Result<(), E> {
    let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)?;
    // Removed on drop if `fill` fails, so no half-written directory stays behind.
    let tmp = tempfile::Builder::new().prefix(".kiln-tmp-").tempdir_in(parent)?;
    fill(tmp.path())?;
    if out.exists() {
        let old = tempfile::Builder::new().prefix(".kiln-old-").tempdir_in(parent)?;
        let old_path = old.path().join("old");
        std::fs::rename(out, &old_path)?;
        std::fs::rename(tmp.keep(), out)?;
        drop(old);
    } else {
        std::fs::rename(tmp.keep(), out)?;
    }
    Ok(())
}
