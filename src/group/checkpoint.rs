//! Metadata checkpoints: the block maps and counters of a group as of a log
//! position, so that opening the group replays only the log after it.
//!
//! File `checkpoint` (written crash-safely: temp, fsync, rename, fsync dir):
//!
//! ```text
//! magic "TMCKPT01" | u32 version | u32 crc32c(body) | u64 body_len | body
//! body: u64 replay_pos | u64 next_seq | u64 epoch | u32 next_volume_id | u64 group_id | u32 volumes
//!   per map: u32 id | u64 size | u16 name_len | name | u32 meta_len | meta (JSON
//!            snapshot metadata, empty for a volume) | u32 regions
//!     per 128 MiB region: u8 tag
//!       0: never written | 1: u32 id of an earlier map sharing it (stored once) |
//!       2: u64 runs, per run: u64 first_block | u32 count | count x (u32 seg | u32 off | u32 crc)
//!   u32 segments | per segment: u32 id | u64 first seq | u64 last seq
//!   (version 3) u8 1 | u32 identity of the last record (`Inner::last_ident`), or u8 0
//! ```
//!
//! Version 2 files (no identity) still load, with the identity unknown.

use std::path::Path;

use anyhow::{bail, Context, Result};

use super::{Group, Inner};
use crate::log::segment::LogPos;
use crate::volume::map::{Entry, REGION_BLOCKS};
use crate::volume::Volume;

const MAGIC: &[u8; 8] = b"TMCKPT01";
/// 2: snapshot metadata and shared regions. 3: the last record's identity.
/// 4: where this log's durability marks are trusted from (`marks_from`);
/// also what keeps an earlier build, which reads the marks in records as
/// damage and would cut the log at the first, from opening the group at
/// all ("unsupported version 4").
const VERSION: u32 = 4;
pub const FILE_NAME: &str = "checkpoint";

pub struct Checkpoint {
    pub replay_pos: LogPos,
    pub next_seq: u64,
    pub last_ident: Option<u32>,
    pub epoch: u64,
    pub next_volume_id: u32,
    pub volumes: Vec<Volume>,
    pub seg_seqs: std::collections::BTreeMap<u32, (u64, u64)>,
    pub version: u32,
    /// The log position from which records carry this log's own
    /// durability marks (`Inner::marks_from`); `None` before version 4,
    /// and at a DR site.
    pub marks_from: Option<LogPos>,
}

/// Serialises the state of `inner` (called with the group lock held; cost is
/// a memory copy of the maps, a few ms per GiB of mapped volume).
pub(crate) fn encode(inner: &Inner, group_id: u64) -> (LogPos, Vec<u8>) {
    let at = inner.tail_pos();
    let mut body = Vec::with_capacity(64 + inner.volumes.values().map(|v| v.map.mapped() as usize * 12 + 64).sum::<usize>());
    body.extend_from_slice(&at.to_le_bytes());
    body.extend_from_slice(&inner.next_seq.to_le_bytes());
    body.extend_from_slice(&inner.epoch.to_le_bytes());
    body.extend_from_slice(&inner.next_volume_id.to_le_bytes());
    body.extend_from_slice(&group_id.to_le_bytes());
    body.extend_from_slice(&(inner.volumes.len() as u32).to_le_bytes());
    let mut done: Vec<&Volume> = Vec::new();
    for v in inner.volumes.values() {
        body.extend_from_slice(&v.id.to_le_bytes());
        body.extend_from_slice(&v.size.to_le_bytes());
        body.extend_from_slice(&(v.name.len() as u16).to_le_bytes());
        body.extend_from_slice(v.name.as_bytes());
        let meta = v.snap.as_ref().map(|m| serde_json::to_vec(m).unwrap_or_default()).unwrap_or_default();
        body.extend_from_slice(&(meta.len() as u32).to_le_bytes());
        body.extend_from_slice(&meta);
        body.extend_from_slice(&(v.map.regions() as u32).to_le_bytes());
        for r in 0..v.map.regions() {
            if !v.map.region_present(r) {
                body.push(0);
                continue;
            }
            if let Some(w) = done.iter().find(|w| w.map.region_present(r) && w.map.region_shared(&v.map, r)) {
                body.push(1);
                body.extend_from_slice(&w.id.to_le_bytes());
                continue;
            }
            body.push(2);
            encode_runs(&v.map, r, &mut body);
        }
        done.push(v);
    }
    body.extend_from_slice(&(inner.seg_seqs.len() as u32).to_le_bytes());
    for (seg, (lo, hi)) in &inner.seg_seqs {
        body.extend_from_slice(&seg.to_le_bytes());
        body.extend_from_slice(&lo.to_le_bytes());
        body.extend_from_slice(&hi.to_le_bytes());
    }
    match inner.last_ident {
        Some(c) => {
            body.push(1);
            body.extend_from_slice(&c.to_le_bytes());
        }
        None => body.push(0),
    }
    body.extend_from_slice(&inner.marks_from.unwrap_or(u64::MAX).to_le_bytes());
    let mut out = Vec::with_capacity(body.len() + 24);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&crate::crc::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    (at, out)
}

/// The mapped entries of region `r` as runs of consecutive blocks.
fn encode_runs(map: &crate::volume::map::BlockMap, r: usize, body: &mut Vec<u8>) {
    let from = r as u64 * REGION_BLOCKS;
    let runs_at = body.len();
    body.extend_from_slice(&0u64.to_le_bytes());
    let mut runs = 0u64;
    let mut count_at = 0usize;
    let mut next_block = u64::MAX;
    let mut count = 0u32;
    map.for_each_mapped_in(from, from + REGION_BLOCKS, |b, e| {
        if b != next_block {
            if runs > 0 {
                body[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
            }
            runs += 1;
            body.extend_from_slice(&b.to_le_bytes());
            count_at = body.len();
            body.extend_from_slice(&0u32.to_le_bytes());
            count = 0;
        }
        body.extend_from_slice(&e.seg.to_le_bytes());
        body.extend_from_slice(&e.off.to_le_bytes());
        body.extend_from_slice(&e.crc.to_le_bytes());
        count += 1;
        next_block = b + 1;
    });
    if runs > 0 {
        body[count_at..count_at + 4].copy_from_slice(&count.to_le_bytes());
    }
    body[runs_at..runs_at + 8].copy_from_slice(&runs.to_le_bytes());
}

/// A cursor that refuses to read past the end (names the field it wanted).
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if self.b.len() - self.at < n {
            bail!("checkpoint truncated reading {what} at byte {}", self.at);
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u16(&mut self, what: &str) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2, what)?.try_into().unwrap()))
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }
}

pub fn decode(bytes: &[u8], group_id: u64) -> Result<Checkpoint> {
    if bytes.len() < 24 || &bytes[0..8] != MAGIC {
        bail!("bad magic");
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().unwrap());
    if !(2..=VERSION).contains(&version) {
        bail!("unsupported version {version}");
    }
    let crc = u32::from_le_bytes(bytes[12..16].try_into().unwrap());
    let len = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    if len != (bytes.len() - 24) as u64 {
        bail!("body length {len} does not match file size {}", bytes.len());
    }
    let body = &bytes[24..];
    if crate::crc::crc32c(body) != crc {
        bail!("checksum mismatch");
    }
    let mut c = Cursor { b: body, at: 0 };
    let replay_pos = c.u64("replay position")?;
    let next_seq = c.u64("next sequence")?;
    if next_seq == 0 {
        bail!("next sequence is 0 (sequences start at 1)");
    }
    let epoch = c.u64("epoch")?;
    let next_volume_id = c.u32("next volume id")?;
    let gid = c.u64("group id")?;
    if gid != group_id {
        bail!("belongs to group {gid:#x}, not {group_id:#x}");
    }
    let nvol = c.u32("volume count")?;
    let mut volumes = Vec::new();
    for _ in 0..nvol {
        let id = c.u32("volume id")?;
        if id == u32::MAX || volumes.iter().any(|w: &Volume| w.id == id) {
            bail!("map id {id} is out of range or listed twice");
        }
        let size = c.u64("volume size")?;
        if size > crate::limits::VOLUME_BYTES_MAX {
            bail!("volume {id} size {size} exceeds the limit");
        }
        let nlen = c.u16("name length")? as usize;
        let name = String::from_utf8(c.take(nlen, "volume name")?.to_vec()).context("volume name is not UTF-8")?;
        let mut v = Volume::new(id, name, size);
        let meta_len = c.u32("snapshot metadata length")? as usize;
        if meta_len > 0 {
            let m = c.take(meta_len, "snapshot metadata")?;
            v.snap = Some(serde_json::from_slice(m).with_context(|| format!("snapshot metadata of map {id} is not valid"))?);
        }
        let regions = c.u32("region count")? as usize;
        if regions != v.map.regions() {
            bail!("map {id} has {regions} regions, its size needs {}", v.map.regions());
        }
        for r in 0..regions {
            match c.take(1, "region tag")?[0] {
                0 => {}
                1 => {
                    let other = c.u32("shared region owner")?;
                    let Some(w) = volumes.iter().find(|w: &&Volume| w.id == other) else {
                        bail!("map {id} region {r} refers to map {other}, which is not before it");
                    };
                    if r >= w.map.regions() {
                        bail!("map {id} region {r} refers to map {other}, which has no such region");
                    }
                    v.map.adopt_region(&w.map, r);
                }
                2 => {
                    let runs = c.u64("run count")?;
                    for _ in 0..runs {
                        let first = c.u64("run start")?;
                        let count = c.u32("run length")? as u64;
                        let (lo, hi) = (r as u64 * REGION_BLOCKS, (r as u64 + 1) * REGION_BLOCKS);
                        if first < lo || first.checked_add(count).is_none_or(|end| end > v.map.blocks() || end > hi) {
                            bail!("run {first}+{count} outside region {r} of map {id}");
                        }
                        for b in first..first + count {
                            let seg = c.u32("entry")?;
                            let off = c.u32("entry")?;
                            let crc = c.u32("entry")?;
                            v.map.set(b, Entry { seg, off, crc });
                        }
                    }
                }
                t => bail!("map {id} region {r} has unknown tag {t}"),
            }
        }
        volumes.push(v);
    }
    // Every map id was taken from the counter, which then moved past it:
    // a counter at or below one would hand that id out again, and the new
    // map would replace the old one.
    if let Some(v) = volumes.iter().find(|v| v.id >= next_volume_id) {
        bail!("next volume id {next_volume_id} is not past map id {} ({})", v.id, v.name);
    }
    let nseg = c.u32("segment count")?;
    let mut seg_seqs = std::collections::BTreeMap::new();
    for _ in 0..nseg {
        let seg = c.u32("segment id")?;
        let lo = c.u64("segment first seq")?;
        let hi = c.u64("segment last seq")?;
        seg_seqs.insert(seg, (lo, hi));
    }
    let last_ident = if version >= 3 {
        match c.take(1, "last record identity tag")?[0] {
            0 => None,
            1 => Some(c.u32("last record identity")?),
            t => bail!("unknown last record identity tag {t}"),
        }
    } else {
        None
    };
    let marks_from = if version >= 4 { Some(c.u64("durability marks start")?).filter(|m| *m != u64::MAX) } else { None };
    if c.at != body.len() {
        bail!("{} trailing bytes", body.len() - c.at);
    }
    Ok(Checkpoint { replay_pos, next_seq, last_ident, epoch, next_volume_id, volumes, seg_seqs, version, marks_from })
}

pub fn load(dir: &Path, group_id: u64) -> Result<Option<Checkpoint>> {
    let path = dir.join(FILE_NAME);
    let len = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("failed to stat {}", path.display())),
    };
    if len > crate::limits::CHECKPOINT_BYTES_MAX {
        bail!("checkpoint {} is {len} bytes, above the limit", path.display());
    }
    let bytes = std::fs::read(&path).with_context(|| format!("failed to read {}", path.display()))?;
    decode(&bytes, group_id).map(Some).with_context(|| format!("checkpoint {} is invalid", path.display()))
}

impl Group {
    /// Writes a checkpoint of the current state. Blocks for one fsync of the
    /// log and one of the checkpoint file; holds the group lock only while
    /// the maps are copied into the buffer.
    pub fn checkpoint(&self) -> Result<()> {
        // One at a time, encoded under the lock: an older checkpoint renamed
        // over a newer one would leave the file replaying from before
        // segments GC freed on the strength of the newer one. (The log
        // only grows, so each one encoded here is at least the last.)
        let _one = self.checkpoint_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (at, bytes, written, asked) = {
            let mut inner = self.inner.lock();
            if let Some(e) = &inner.failed {
                bail!("group {} is failed ({e}); not writing a checkpoint", self.name);
            }
            if inner.staging.is_some() {
                // A resync in progress lives only in the log after the last
                // checkpoint; replay must see all of it, so no checkpoint now.
                return Ok(());
            }
            let (at, bytes) = encode(&inner, self.id);
            // Answered by this one (asked again below if it fails).
            let asked = std::mem::take(&mut inner.checkpoint_asked);
            (at, bytes, inner.log_bytes_written, asked)
        };
        // The checkpoint may only describe durable records: synced first.
        let written_ok = self.sync_to(at).and_then(|()| {
            let _io = self.io.start(super::iowatch::IoOp::Checkpoint);
            crate::crashsafe::write_file(&self.dir.join(FILE_NAME), &bytes)
        });
        if let Err(e) = written_ok {
            if asked {
                self.inner.lock().checkpoint_asked = true;
            }
            return Err(e);
        }
        let mut inner = self.inner.lock();
        inner.checkpoint_pos = inner.checkpoint_pos.max(at);
        inner.log_bytes_at_checkpoint = written;
        self.stats.checkpoints.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
}
