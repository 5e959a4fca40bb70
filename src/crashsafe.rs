//! Crash-safe file writes: write a temp file, fsync it, rename it over the
//! target, fsync the directory. A reader sees the old file or the new one,
//! never a mix.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};

/// Atomically replaces `path` with `data` (mode 0644).
pub fn write_file(path: &Path, data: &[u8]) -> Result<()> {
    write_file_mode(path, data, 0o644)
}

/// Atomically replaces `path` with `data`; the temp file is created with
/// `mode`, so a secret (a TLS key) is never readable by others, not even
/// briefly.
pub fn write_file_mode(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().context("path has no parent directory")?;
    // A unique temp name: concurrent writers of one file never share it.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp.{}.{n}", std::process::id()));
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("failed to create {}", tmp.display()))?;
        f.write_all(data).with_context(|| format!("failed to write {}", tmp.display()))?;
        f.sync_all().with_context(|| format!("failed to fsync {}", tmp.display()))?;
    }
    fs::rename(&tmp, path).with_context(|| format!("failed to rename {} to {}", tmp.display(), path.display()))?;
    fsync_dir(dir)
}

/// Fsyncs a directory so that entries created, renamed or removed in it are durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    // `Path::new("site.toml").parent()` is "", which means the current directory.
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("failed to fsync directory {}", dir.display()))
}
