//! Segment files: the log of a consistency group is a series of append-only
//! files `seg-NNNNNNNN.tml`, each starting with a 64-byte header and holding
//! whole records (a record never spans two segments).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use anyhow::{bail, Context, Result};

use super::record::{DecodeError, Header, Kind, HEADER_BYTES};

pub const SEGMENT_MAGIC: [u8; 8] = *b"TMSEG\0\0\x01";
pub const SEGMENT_HEADER_BYTES: u64 = 64;

/// A position in the log: segment id in the high 32 bits, byte offset in the
/// low 32. Positions grow in write order across segments.
pub type LogPos = u64;

pub fn pos(seg: u32, off: u32) -> LogPos {
    ((seg as u64) << 32) | off as u64
}
pub fn pos_seg(p: LogPos) -> u32 {
    (p >> 32) as u32
}
pub fn pos_off(p: LogPos) -> u32 {
    p as u32
}

pub fn segment_file_name(id: u32) -> String {
    format!("seg-{id:08}.tml")
}

/// Parses `seg-NNNNNNNN.tml` back into an id: only the name
/// `segment_file_name` gives, so that another spelling of an id
/// ("seg-1.tml", "seg-+1.tml") is not taken for the same segment, and
/// only ids from 1 to below `u32::MAX` (one must follow the last).
pub fn parse_segment_file_name(name: &str) -> Option<u32> {
    let id: u32 = name.strip_prefix("seg-")?.strip_suffix(".tml")?.parse().ok()?;
    ((1..u32::MAX).contains(&id) && segment_file_name(id) == name).then_some(id)
}

/// One open segment file. Shared by `Arc`: a reader that looked up a block
/// location keeps the file open, so GC may unlink the file under it safely.
#[derive(Debug)]
pub struct Segment {
    pub id: u32,
    pub path: PathBuf,
    pub file: File,
    /// Bytes in the file (header + whole records).
    pub len: AtomicU64,
    /// Set while written since the last group commit.
    pub unsynced: AtomicBool,
    /// Bytes known durable: the length when the last fdatasync started.
    pub synced_len: AtomicU64,
    /// The directory entry is durable (false for a new segment until the
    /// directory fsync that follows its creation).
    pub dir_synced: AtomicBool,
    /// The read-only mapping of the file while a `View` of it lives (the
    /// replication sender's batches in flight); unmapped after the last.
    map: Mutex<Weak<Mapping>>,
    /// The file system refused `RWF_NOWAIT` reads (`read_at_nowait`).
    no_nowait: AtomicBool,
}

/// What a read from the page cache only (`Segment::read_at_nowait`) did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoWait {
    /// Every byte was there: read.
    Read,
    /// Some of it is not in the page cache: reading it would wait for the disk.
    WouldBlock,
    /// The file system cannot tell (no `RWF_NOWAIT` for it): nothing read.
    Unsupported,
}

/// A read-only shared mapping of a segment file, `SEGMENT_BYTES` long (the
/// most a segment holds). Only bytes below the segment's length are ever
/// read through it: they are whole records, never written again (the log
/// is append-only and a segment is only truncated when it is opened, before
/// any mapping), so a slice of them does not change under its reader. GC
/// unlinking the file leaves the mapping valid. It lives only as long as a
/// `View` of it: a primary does not keep its whole log mapped (its resident
/// size would count every page of it still cached, and the count of
/// mappings per process is limited).
struct Mapping {
    ptr: *mut u8,
    len: usize,
    path: PathBuf,
}

// SAFETY: the mapping is read-only and its bytes (below the segment length)
// are immutable; the pointer is only unmapped on drop.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mapping({})", self.path.display())
    }
}

impl Mapping {
    fn new(file: &File, path: &Path) -> std::io::Result<Mapping> {
        use std::os::fd::AsRawFd;
        let len = crate::limits::SEGMENT_BYTES as usize;
        // SAFETY: a fresh shared read-only mapping of our own file; the
        // kernel picks the address.
        let ptr = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping { ptr: ptr.cast(), len, path: path.to_path_buf() })
    }
}

/// Bytes of a segment (`Segment::view`): whole records below its length,
/// read in place through a mapping that lives as long as this does, or,
/// where the file cannot be mapped, copied out.
#[derive(Debug, Clone)]
pub struct View {
    src: Src,
    /// Offset in the segment and length.
    off: usize,
    len: usize,
}

#[derive(Clone)]
enum Src {
    Map(Arc<Mapping>),
    /// Bytes read with `pread`; `base` is the segment offset of `buf[0]`.
    Copy { buf: Arc<Vec<u8>>, base: usize },
}

impl std::fmt::Debug for Src {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Src::Map(m) => m.fmt(f),
            Src::Copy { buf, base } => write!(f, "Copy({} bytes at {base})", buf.len()),
        }
    }
}

impl View {
    pub fn bytes(&self) -> &[u8] {
        match &self.src {
            // SAFETY: `Segment::view` checked that the range is within the
            // mapping and below the segment length; the mapping lives as
            // long as `m`.
            Src::Map(m) => unsafe { std::slice::from_raw_parts(m.ptr.add(self.off), self.len) },
            Src::Copy { buf, base } => &buf[self.off - base..self.off - base + self.len],
        }
    }

    /// `bytes()[at..at + n]`, faulted in first (see `Segment::view`): for a
    /// view kept a while, whose pages may have left the page cache since.
    pub fn populated_range(&self, at: usize, n: usize) -> Result<&[u8]> {
        if at.checked_add(n).is_none_or(|e| e > self.len) {
            bail!("{n} bytes at {at} of a {} byte view of a log segment", self.len);
        }
        if let Src::Map(m) = &self.src {
            // A mapped view exists only where populating works.
            populate(m, self.off + at, n)?;
        }
        Ok(&self.bytes()[at..at + n])
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `bytes()[at..at + n]` as a view of its own (same source).
    pub fn sub(&self, at: usize, n: usize) -> Option<View> {
        (at.checked_add(n)? <= self.len).then(|| View { src: self.src.clone(), off: self.off + at, len: n })
    }

    /// Extends this view by `next`, if `next` starts where it ends in the
    /// same source.
    pub fn join(&mut self, next: &View) -> bool {
        let same = match (&self.src, &next.src) {
            (Src::Map(a), Src::Map(b)) => Arc::ptr_eq(a, b),
            (Src::Copy { buf: a, .. }, Src::Copy { buf: b, .. }) => Arc::ptr_eq(a, b),
            _ => false,
        };
        let ok = same && self.off + self.len == next.off;
        if ok {
            self.len += next.len;
        }
        ok
    }
}

/// Set once `MADV_POPULATE_READ` turned out to be missing (Linux before
/// 5.14): views are then copies (`Segment::view_copied`), since without it
/// a page that cannot be read would raise SIGBUS on access instead of an
/// error.
static NO_POPULATE: AtomicBool = AtomicBool::new(false);

#[cfg(test)]
thread_local! {
    /// Tests: views made on this thread are copies, as with `NO_POPULATE`
    /// (per thread, so that tests running beside it still get mappings).
    static FORCE_COPIES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Are views copies (`Segment::view_copied`) rather than mappings?
fn views_are_copies() -> bool {
    #[cfg(test)]
    if FORCE_COPIES.with(|c| c.get()) {
        return true;
    }
    NO_POPULATE.load(Ordering::Relaxed)
}

/// Why views are copies in this process, said once.
fn note_copies(why: &str) {
    static NOTED: AtomicBool = AtomicBool::new(false);
    if !NOTED.swap(true, Ordering::Relaxed) {
        tracing::warn!("{why}: replication reads the log with copies instead of in place");
    }
}

/// Faults in the pages of `len` bytes at `off` of a mapping with
/// `MADV_POPULATE_READ`: a page that cannot be read comes back as an error
/// (a plain access would raise SIGBUS), and a range takes one call instead
/// of a fault per page. `Ok(false)` if the kernel lacks it (EINVAL).
fn populate(m: &Mapping, off: usize, len: usize) -> Result<bool> {
    let page = page_bytes();
    let start = off & !(page - 1);
    let end = off + len;
    if end > start {
        // SAFETY: the range lies within the mapping (checked by the caller).
        let r = unsafe { libc::madvise(m.ptr.add(start).cast(), end - start, libc::MADV_POPULATE_READ) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINVAL) {
                return Ok(false);
            }
            return Err(e).with_context(|| format!("failed to read {len} bytes at offset {off} of log segment {}", m.path.display()));
        }
    }
    Ok(true)
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped; every slice of it
        // borrows a `View`, which holds this mapping's Arc.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

fn page_bytes() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    // SAFETY: sysconf has no preconditions.
    *PAGE.get_or_init(|| match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        n if n > 0 && (n as usize).is_power_of_two() => n as usize,
        _ => 4096,
    })
}

fn header_bytes(id: u32, group_id: u64) -> [u8; SEGMENT_HEADER_BYTES as usize] {
    let mut h = [0u8; SEGMENT_HEADER_BYTES as usize];
    h[0..8].copy_from_slice(&SEGMENT_MAGIC);
    h[8..12].copy_from_slice(&id.to_le_bytes());
    h[16..24].copy_from_slice(&group_id.to_le_bytes());
    let crc = crate::crc::crc32c(&h[0..60]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

impl Segment {
    /// Creates a new, empty segment. The caller must fsync the directory
    /// before relying on the file existing after a crash (group commit does).
    pub fn create(dir: &Path, id: u32, group_id: u64) -> Result<Segment> {
        let path = dir.join(segment_file_name(id));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("failed to create log segment {}", path.display()))?;
        if let Err(e) = file.write_all_at(&header_bytes(id, group_id), 0) {
            // Not left behind half made (a full file system): the next
            // attempt creates it afresh.
            let _ = std::fs::remove_file(&path);
            return Err(anyhow::Error::new(e).context(format!("failed to write header of log segment {}", path.display())));
        }
        Ok(Segment {
            id,
            path,
            file,
            len: AtomicU64::new(SEGMENT_HEADER_BYTES),
            unsynced: AtomicBool::new(true),
            synced_len: AtomicU64::new(0),
            dir_synced: AtomicBool::new(false),
            map: Mutex::new(Weak::new()),
            no_nowait: AtomicBool::new(false),
        })
    }

    /// Opens an existing segment and checks its header.
    pub fn open(dir: &Path, id: u32, group_id: u64) -> Result<Segment> {
        let path = dir.join(segment_file_name(id));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .with_context(|| format!("failed to open log segment {}", path.display()))?;
        let len = file.metadata()?.len();
        let mut h = [0u8; SEGMENT_HEADER_BYTES as usize];
        if len < SEGMENT_HEADER_BYTES {
            bail!("log segment {} is shorter than its header ({len} bytes)", path.display());
        }
        file.read_exact_at(&mut h, 0)
            .with_context(|| format!("failed to read header of log segment {}", path.display()))?;
        if h[0..8] != SEGMENT_MAGIC {
            bail!("log segment {}: bad magic at offset 0", path.display());
        }
        let crc = u32::from_le_bytes(h[60..64].try_into().unwrap());
        if crc != crate::crc::crc32c(&h[0..60]) {
            bail!("log segment {}: header checksum mismatch at offset 0", path.display());
        }
        let sid = u32::from_le_bytes(h[8..12].try_into().unwrap());
        let gid = u64::from_le_bytes(h[16..24].try_into().unwrap());
        if sid != id {
            bail!("log segment {}: header names segment {sid}, expected {id}", path.display());
        }
        if gid != group_id {
            bail!("log segment {}: belongs to group {gid:#x}, not {group_id:#x}", path.display());
        }
        Ok(Segment {
            id,
            path,
            file,
            len: AtomicU64::new(len),
            unsynced: AtomicBool::new(false),
            synced_len: AtomicU64::new(len),
            dir_synced: AtomicBool::new(true),
            map: Mutex::new(Weak::new()),
            no_nowait: AtomicBool::new(false),
        })
    }

    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// Holds no record yet (only its header).
    pub fn is_empty(&self) -> bool {
        self.len() <= SEGMENT_HEADER_BYTES
    }

    /// Reads exactly `buf.len()` bytes at `off`, naming the file on error.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, off)
            .with_context(|| format!("failed to read {} bytes at offset {off} of log segment {}", buf.len(), self.path.display()))
    }

    /// Reads exactly `buf.len()` bytes at `off` if they are all in the page
    /// cache (`preadv2` with `RWF_NOWAIT`), never waiting for the disk: an
    /// NBD read on a runtime worker reads this way, and one that would wait
    /// is done on the blocking pool instead, so a disk that stalls reads
    /// holds up no worker (ARCHITECTURE.md "One group's stall holds up no
    /// other group's NBD"). A file system without `RWF_NOWAIT` (tmpfs and
    /// FUSE on this kernel) says so once per segment, and its reads are
    /// plain ones from then on.
    pub fn read_at_nowait(&self, buf: &mut [u8], off: u64) -> Result<NoWait> {
        use std::os::fd::AsRawFd;
        if self.no_nowait.load(Ordering::Relaxed) {
            return Ok(NoWait::Unsupported);
        }
        if buf.is_empty() {
            return Ok(NoWait::Read);
        }
        loop {
            let iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
            // SAFETY: one iovec over `buf`, which outlives the call.
            let n = unsafe { libc::preadv2(self.file.as_raw_fd(), &iov, 1, off as libc::off_t, libc::RWF_NOWAIT) };
            if n >= 0 {
                // Short: the rest is not cached (or not there; the plain
                // read that follows names that).
                return Ok(if n as usize == buf.len() { NoWait::Read } else { NoWait::WouldBlock });
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(NoWait::WouldBlock),
                Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
                    self.no_nowait.store(true, Ordering::Relaxed);
                    return Ok(NoWait::Unsupported);
                }
                _ => return Err(anyhow::Error::new(e).context(format!("failed to read {} bytes at offset {off} of log segment {}", buf.len(), self.path.display()))),
            }
        }
    }

    /// `n` bytes at `off`, read in place through a mapping of the file
    /// instead of copied out: the replication sender hands these bytes to
    /// the TLS layer, which copies them once, into its records (a `pread`
    /// first was a second full copy of everything shipped). Only below the
    /// segment's length. The pages are faulted in here (`populate`), so
    /// that a read error is an error, not SIGBUS.
    pub fn view(&self, off: u64, n: usize) -> Result<View> {
        self.check_range(off, n)?;
        if views_are_copies() {
            return self.view_copied(off, n);
        }
        let map = {
            let mut cur = self.map.lock().unwrap_or_else(|p| p.into_inner());
            match cur.upgrade() {
                Some(m) => m,
                None => match Mapping::new(&self.file, &self.path) {
                    Ok(m) => {
                        let m = Arc::new(m);
                        *cur = Arc::downgrade(&m);
                        m
                    }
                    Err(e) => {
                        // A file system without mmap (some FUSE ones).
                        drop(cur);
                        note_copies(&format!("cannot map log segment {} ({e})", self.path.display()));
                        return self.view_copied(off, n);
                    }
                },
            }
        };
        if !populate(&map, off as usize, n)? {
            NO_POPULATE.store(true, Ordering::Relaxed);
            note_copies("this kernel lacks MADV_POPULATE_READ (Linux 5.14)");
            return self.view_copied(off, n);
        }
        Ok(View { src: Src::Map(map), off: off as usize, len: n })
    }

    /// `n` bytes at `off` lie below the segment's length (which is never
    /// past `SEGMENT_BYTES`, the length of a mapping).
    fn check_range(&self, off: u64, n: usize) -> Result<()> {
        if off.checked_add(n as u64).is_none_or(|e| e > self.len() || e > crate::limits::SEGMENT_BYTES) {
            bail!("log segment {}: {n} bytes at offset {off} are past its end ({} bytes)", self.path.display(), self.len());
        }
        Ok(())
    }

    /// `view` by `pread` into a buffer of its own: where the file cannot be
    /// mapped.
    pub fn view_copied(&self, off: u64, n: usize) -> Result<View> {
        self.check_range(off, n)?;
        let mut buf = vec![0u8; n];
        self.read_at(&mut buf, off)?;
        Ok(View { src: Src::Copy { buf: Arc::new(buf), base: off as usize }, off: off as usize, len: n })
    }
}

/// A record as found when scanning a segment.
pub struct Scanned {
    pub off: u32,
    pub header: Header,
    /// The checked body (block CRCs of a write, the whole body otherwise).
    pub checked: Vec<u8>,
}

/// Why a scan stopped before the end of the file.
#[derive(Debug)]
pub struct ScanStop {
    pub off: u64,
    pub reason: String,
}

/// Scans records of a segment from `start`, calling `f` for each valid one.
/// With `verify_payload` the block CRCs of writes are checked against their
/// data as well (replay does this so that a torn payload is found). Returns
/// `Ok(None)` at a clean end of file, `Ok(Some(stop))` at the first invalid
/// record (a torn tail or corruption), `Err` on an I/O error.
pub fn scan<F>(seg: &Segment, start: u64, verify_payload: bool, mut f: F) -> Result<Option<ScanStop>>
where
    F: FnMut(&Scanned, Option<&[u8]>) -> Result<()>,
{
    let file_len = seg.file.metadata()?.len();
    let mut off = start.max(SEGMENT_HEADER_BYTES);
    // Read in large chunks; records are parsed out of the buffer.
    const CHUNK: usize = 8 * 1024 * 1024;
    let mut buf: Vec<u8> = Vec::new();
    let mut buf_off = off; // file offset of buf[0]
    loop {
        if off == file_len {
            return Ok(None);
        }
        if off > file_len {
            return Ok(Some(ScanStop { off, reason: format!("the scan starts past the end of the file ({file_len} bytes)") }));
        }
        if off + HEADER_BYTES as u64 > file_len {
            return Ok(Some(ScanStop { off, reason: format!("{} trailing bytes are shorter than a record header", file_len - off) }));
        }
        // Make sure the header is in the buffer.
        let ensure = |buf: &mut Vec<u8>, buf_off: &mut u64, off: u64, need: u64| -> Result<()> {
            let have_end = *buf_off + buf.len() as u64;
            if off >= *buf_off && off + need <= have_end {
                return Ok(());
            }
            let want = (need as usize).max(CHUNK).min((file_len - off) as usize);
            buf.resize(want, 0);
            seg.read_at(buf, off)?;
            *buf_off = off;
            Ok(())
        };
        ensure(&mut buf, &mut buf_off, off, HEADER_BYTES as u64)?;
        let rel = (off - buf_off) as usize;
        let raw: [u8; HEADER_BYTES] = buf[rel..rel + HEADER_BYTES].try_into().unwrap();
        let header = match Header::decode(&raw) {
            Ok(h) => h,
            Err(e) => return Ok(Some(ScanStop { off, reason: e.to_string() })),
        };
        let total = header.total_len();
        if off + total > file_len {
            return Ok(Some(ScanStop { off, reason: format!("record of {total} bytes runs past the end of the file") }));
        }
        let checked_len = header.checked_body_len();
        let need = if verify_payload || header.kind != Kind::Write { total } else { HEADER_BYTES as u64 + checked_len as u64 };
        ensure(&mut buf, &mut buf_off, off, need)?;
        let rel = (off - buf_off) as usize;
        let checked = buf[rel + HEADER_BYTES..rel + HEADER_BYTES + checked_len].to_vec();
        if let Err(e) = header.verify(&raw, &checked) {
            return Ok(Some(ScanStop { off, reason: e.to_string() }));
        }
        let mut data: Option<&[u8]> = None;
        if header.kind == Kind::Write && verify_payload {
            let p = &buf[rel + HEADER_BYTES + checked_len..rel + total as usize];
            for (i, block) in p.chunks(crate::limits::BLOCK_BYTES as usize).enumerate() {
                if crate::crc::crc32c(block) != super::record::crc_at(&checked, i) {
                    let e = DecodeError::BlockChecksum { index: i as u32 };
                    return Ok(Some(ScanStop { off, reason: e.to_string() }));
                }
            }
            data = Some(p);
        } else if header.kind != Kind::Write {
            data = Some(&buf[rel + HEADER_BYTES..rel + total as usize]);
        }
        let s = Scanned { off: off as u32, header, checked };
        f(&s, data)?;
        off += total;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A segment holding `n` bytes of a pattern after its header, with its
    /// length at `len` of them.
    #[test]
    fn only_the_canonical_name_of_a_segment_is_one() {
        assert_eq!(parse_segment_file_name("seg-00000001.tml"), Some(1));
        assert_eq!(parse_segment_file_name(&segment_file_name(123_456_789)), Some(123_456_789));
        for other in ["seg-1.tml", "seg-+0000001.tml", "seg-00000000.tml", "seg-4294967295.tml", "seg-00000001.tmlx", "seg-0000000a.tml", "xseg-00000001.tml"] {
            assert_eq!(parse_segment_file_name(other), None, "{other}");
        }
    }

    fn segment_holding(dir: &Path, n: u32, len: u64) -> (Segment, Vec<u8>) {
        let seg = Segment::create(dir, 3, 7).unwrap();
        let data: Vec<u8> = (0..n).map(|i| (i * 7) as u8).collect();
        seg.file.write_all_at(&data, SEGMENT_HEADER_BYTES).unwrap();
        seg.len.store(SEGMENT_HEADER_BYTES + len, Ordering::Release);
        (seg, data)
    }

    /// The sender's in-place view: the bytes written, below the segment's
    /// length only, still readable after the file is unlinked (GC), and
    /// unmapped once no view of it is left.
    #[test]
    fn a_view_reads_written_bytes_and_nothing_past_the_length() {
        let dir = tempfile::tempdir().unwrap();
        let (seg, data) = segment_holding(dir.path(), 300_000, 0);
        let e = format!("{:#}", seg.view(SEGMENT_HEADER_BYTES, 10).unwrap_err());
        assert!(e.contains("past its end"), "{e}");
        seg.len.store(SEGMENT_HEADER_BYTES + 250_000, Ordering::Release);
        let v = seg.view(SEGMENT_HEADER_BYTES + 1, 249_999).unwrap();
        assert_eq!(v.bytes(), &data[1..250_000]);
        assert_eq!(v.populated_range(0, v.len()).unwrap(), &data[1..250_000]);
        assert!(seg.view(SEGMENT_HEADER_BYTES + 249_999, 2).is_err());
        assert!(seg.view(u64::MAX - 1, 4).is_err());
        let mut a = v.sub(6, 3).unwrap();
        assert_eq!(a.bytes(), &data[7..10]);
        assert_eq!(a.off as u64, SEGMENT_HEADER_BYTES + 7);
        assert!(v.sub(249_998, 2).is_none());
        assert!(a.join(&v.sub(9, 5).unwrap()));
        assert_eq!(a.bytes(), &data[7..15]);
        assert!(!a.join(&v.sub(20, 5).unwrap()), "joined a range that does not follow");
        // One mapping for all views of the segment while any lives.
        let w = seg.view(SEGMENT_HEADER_BYTES, 10).unwrap();
        let (Src::Map(wm), Src::Map(vm)) = (&w.src, &v.src) else { panic!("not mapped") };
        assert!(Arc::ptr_eq(wm, vm));
        std::fs::remove_file(&seg.path).unwrap();
        assert_eq!(seg.view(SEGMENT_HEADER_BYTES + 4096, 5000).unwrap().bytes(), &data[4096..9096]);
        let weak = Arc::downgrade(vm);
        drop((v, w, a));
        assert!(weak.upgrade().is_none(), "the mapping outlived its views");
    }

    /// Where a file cannot be mapped, a view is a copy, and behaves the same.
    #[test]
    fn a_copied_view_behaves_as_a_mapped_one() {
        let dir = tempfile::tempdir().unwrap();
        let (seg, data) = segment_holding(dir.path(), 100_000, 90_000);
        assert!(seg.view_copied(SEGMENT_HEADER_BYTES + 89_999, 2).is_err());
        let v = seg.view_copied(SEGMENT_HEADER_BYTES + 100, 80_000).unwrap();
        let m = seg.view(SEGMENT_HEADER_BYTES + 100, 80_000).unwrap();
        assert_eq!(v.bytes(), m.bytes());
        assert_eq!(v.populated_range(0, v.len()).unwrap(), &data[100..80_100]);
        let mut a = v.sub(10, 5).unwrap();
        assert_eq!((a.off as u64, a.bytes()), (SEGMENT_HEADER_BYTES + 110, &data[110..115]));
        assert!(a.join(&v.sub(15, 5).unwrap()));
        assert_eq!(a.bytes(), &data[110..120]);
        assert!(!a.join(&m.sub(20, 5).unwrap()), "joined a mapped view to a copied one");
        assert_eq!(v.populated_range(79_990, 10).unwrap(), &data[80_090..80_100]);
        assert!(v.populated_range(79_990, 11).is_err());
        // A kernel without MADV_POPULATE_READ gets copies (here forced on
        // this thread only: tests beside it expect mappings).
        FORCE_COPIES.with(|c| c.set(true));
        let c = seg.view(SEGMENT_HEADER_BYTES + 100, 10);
        FORCE_COPIES.with(|c| c.set(false));
        let c = c.unwrap();
        assert!(matches!(c.src, Src::Copy { .. }), "{c:?}");
        assert_eq!(c.bytes(), &data[100..110]);
    }
}
