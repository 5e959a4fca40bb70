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
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("failed to create {}", tmp.display()))?;
    let written = f
        .write_all(data)
        .with_context(|| format!("failed to write {}", tmp.display()))
        .and_then(|()| f.sync_all().with_context(|| format!("failed to fsync {}", tmp.display())))
        .and_then(|()| fs::rename(&tmp, path).with_context(|| format!("failed to rename {} to {}", tmp.display(), path.display())));
    if written.is_err() {
        // Not left behind: on a full disk a retried checkpoint would
        // otherwise leave one more partial file at every try, eating the
        // space an operator frees.
        let _ = fs::remove_file(&tmp);
    }
    written?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A write that fails (here: its rename, over a non-empty directory)
    /// leaves no temp file behind, and the old contents stand.
    #[test]
    fn a_failed_write_leaves_no_temp_file() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("x");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("inside"), "old").unwrap();
        assert!(write_file(&target, b"new").is_err());
        let names: Vec<String> = std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(names, vec!["x".to_string()], "left behind: {names:?}");
        assert_eq!(std::fs::read_to_string(target.join("inside")).unwrap(), "old");
        // And a write that works still does.
        let f = d.path().join("f");
        write_file(&f, b"one").unwrap();
        write_file(&f, b"two").unwrap();
        assert_eq!(std::fs::read(&f).unwrap(), b"two");
    }
}
