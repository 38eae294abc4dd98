//! File writes that a crash cannot leave half done.

use std::io::Write;
use std::path::Path;

/// A temporary file in `path`'s directory (created if missing), to be persisted over `path`
/// once complete. Removed on drop if never persisted, so a failure leaves nothing behind. It is
/// created with the permissions of an ordinary new file (0666 less the umask), not tempfile's
/// private 0600, so the result is readable by others as any file written directly would be.
/// It keeps `path`'s extension.
pub fn temp_beside(path: &Path) -> std::io::Result<tempfile::NamedTempFile> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    // The same extension, for writers that pick a format by the name (image encoders).
    let suffix = path.extension().map(|e| format!(".{}", e.to_string_lossy())).unwrap_or_default();
    let mut builder = tempfile::Builder::new();
    builder.suffix(&suffix);
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    builder.tempfile_in(dir)
}

/// Writes `bytes` to a temporary file beside `path`, syncs it, then renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut tmp = temp_beside(path)?;
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
