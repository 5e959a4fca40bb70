//! Garbage collection: free segments nobody needs, rewrite the live blocks
//! of sparse segments at the tail so their space can be freed too.
//!
//! Rules that keep it crash-safe:
//! - Only segments wholly before the last durable checkpoint's replay
//!   position are touched, so replay never needs a segment GC removed.
//! - A relocated block is appended as a `Write` record flagged RELOCATED
//!   (same epoch, seq and timestamp as the original), under the group lock
//!   and only if the map still points at the old copy. The log order is the
//!   order in which the map changed, so replay yields the same map.
//! - A segment is unlinked only after the log is durable up to the tail
//!   (relocations and the overwrites that made its blocks dead are on disk).
//!
//! Snapshots are maps like volumes: a segment is freed only when no map
//! (volume or snapshot) references it and no DR pin covers it, and a block
//! shared by several maps is relocated once, moving all of them.
//! Recovery points (later issue) add their own references.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::Result;

use super::Group;
use crate::limits::{BLOCK_BYTES, GC_BATCH_BYTES, GC_LIVE_RATIO_MAX, GC_SPACE_RATIO, LOG_RESERVE_BYTES, SEGMENT_BYTES};
use crate::log::record::{self, Header, Kind, FLAG_RELOCATED};
use crate::log::segment::{self, pos_seg, Segment};
use crate::volume::map::Entry;

impl Group {
    /// One round of GC: free empty segments, then clean sparse ones while
    /// the log holds more than `GC_SPACE_RATIO` x live + reserve.
    pub(super) fn collect_garbage(&self) -> Result<()> {
        // A segment that cannot be unlinked is reported at the end of the
        // round, not where it happens: cleaning goes on meanwhile.
        // Segments whose unlink failed this round: not chosen again in it
        // (an empty one would otherwise be the best victim, over and over).
        let mut stuck = std::collections::BTreeSet::new();
        let mut unlink_failed = self.free_empty_segments(&mut stuck).err();
        let done = |failed: Option<anyhow::Error>| failed.map_or(Ok(()), Err);
        loop {
            if self.stop.load(Ordering::Acquire) {
                return done(unlink_failed);
            }
            let victim = {
                let inner = self.inner.lock();
                if inner.failed.is_some() {
                    return done(unlink_failed);
                }
                let total = inner.log_bytes();
                let live = inner.live_bytes();
                if (total as f64) <= live as f64 * GC_SPACE_RATIO + LOG_RESERVE_BYTES as f64 {
                    return done(unlink_failed);
                }
                let limit = pos_seg(inner.checkpoint_pos);
                let best = inner
                    .segments
                    .values()
                    .filter(|s| s.id < limit && s.id != inner.tail.id && !inner.pinned(s.id) && !inner.gc_skipped.contains_key(&s.id) && !stuck.contains(&s.id))
                    .map(|s| (inner.distinct_refs(s.id) * BLOCK_BYTES, s.clone()))
                    .min_by_key(|(l, _)| *l);
                match best {
                    Some((l, s)) if (l as f64) <= s.len() as f64 * GC_LIVE_RATIO_MAX => Some(s),
                    _ => None,
                }
            };
            let Some(victim) = victim else {
                // Nothing cleanable before the checkpoint: take one early if
                // the log has moved on by a segment since, so the next round can.
                let moved = {
                    let inner = self.inner.lock();
                    inner.staging.is_none() && inner.log_bytes_written - inner.log_bytes_at_checkpoint >= SEGMENT_BYTES
                };
                if moved {
                    self.checkpoint()?;
                    continue;
                }
                return done(unlink_failed);
            };
            if let Some(why) = self.relocate(&victim)? {
                // Its live blocks stay where they are (reads of the bad one
                // fail, naming it); its space stays in use. The other
                // segments are still cleaned.
                tracing::error!("group {}: {why}; garbage collection sets the segment aside until a restart (its space stays in use)", self.name);
                self.inner.lock().gc_skipped.insert(victim.id, why);
            }
            if let Err(e) = self.free_empty_segments(&mut stuck) {
                unlink_failed.get_or_insert(e);
            }
        }
    }

    /// Unlinks segments before the checkpoint that hold no live block,
    /// except those in `stuck`; adds those whose unlink fails to it.
    fn free_empty_segments(&self, stuck: &mut std::collections::BTreeSet<u32>) -> Result<()> {
        let empty: Vec<u32> = {
            let inner = self.inner.lock();
            let limit = pos_seg(inner.checkpoint_pos);
            inner
                .segments
                .values()
                .filter(|s| s.id < limit && s.id != inner.tail.id && !inner.pinned(s.id) && inner.live_refs(s.id) == 0 && !stuck.contains(&s.id))
                .map(|s| s.id)
                .collect()
        };
        if empty.is_empty() {
            return Ok(());
        }
        // The records that made these blocks dead must be durable first.
        self.sync_to(self.flush_target())?;
        // Each with what goes back into the list if its unlink fails.
        type Removed = (Arc<Segment>, Option<(u64, u64)>, Option<String>);
        let removed: Vec<Removed> = {
            let mut inner = self.inner.lock();
            let mut v = Vec::new();
            for id in empty {
                if inner.live_refs(id) == 0 && !inner.pinned(id) {
                    if let Some(s) = inner.segments.remove(&id) {
                        let seqs = inner.seg_seqs.remove(&id);
                        let skipped = inner.gc_skipped.remove(&id);
                        v.push((s, seqs, skipped));
                    }
                }
            }
            v
        };
        let mut freed = 0;
        let mut failed = None;
        for (s, seqs, skipped) in removed {
            // Already gone (removed by hand, or a retry after an unlink that
            // did happen): freed.
            if let Err(e) = std::fs::remove_file(&s.path).or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) }) {
                // Back in the log's list, so that the next round tries
                // again (before, the file stayed until a restart).
                failed = Some(anyhow::anyhow!("failed to remove log segment {}: {e}", s.path.display()));
                stuck.insert(s.id);
                let mut inner = self.inner.lock();
                if let Some(q) = seqs {
                    inner.seg_seqs.insert(s.id, q);
                }
                if let Some(why) = skipped {
                    inner.gc_skipped.insert(s.id, why);
                }
                inner.segments.insert(s.id, s);
                continue;
            }
            tracing::debug!("group {}: freed log segment {}", self.name, s.path.display());
            freed += 1;
        }
        if freed > 0 {
            crate::crashsafe::fsync_dir(&self.dir)?;
            self.stats.gc_segments_freed.fetch_add(freed, Ordering::Relaxed);
        }
        failed.map_or(Ok(()), Err)
    }

    /// Rewrites the live blocks of `seg` at the tail. `Ok(Some(why))`: the
    /// segment cannot be cleaned (unreadable, or a live block fails its
    /// checksum); what was relocated before that stays relocated.
    pub(super) fn relocate(&self, seg: &Arc<Segment>) -> Result<Option<String>> {
        // First pass (no lock): list the write records of the segment.
        let mut records: Vec<(u32, Header, Vec<u8>)> = Vec::new();
        let scanned = segment::scan(seg, 0, false, |r, _| {
            if r.header.kind == Kind::Write {
                records.push((r.off, r.header, r.checked.clone()));
            }
            Ok(())
        });
        match scanned {
            Err(e) => return Ok(Some(format!("log segment {} cannot be read: {e:#}", seg.path.display()))),
            // A sealed segment before the checkpoint must scan cleanly.
            Ok(Some(s)) => return Ok(Some(format!("log segment {} is corrupt at offset {}: {}", seg.path.display(), s.off, s.reason))),
            Ok(None) => {}
        }
        let batch_blocks = (GC_BATCH_BYTES / BLOCK_BYTES) as u32;
        for (off, h, crcs) in records {
            let first_block = h.offset / BLOCK_BYTES;
            let mut i = 0u32;
            while i < h.blocks() {
                if self.stop.load(Ordering::Acquire) {
                    return Ok(None);
                }
                let n = (h.blocks() - i).min(batch_blocks);
                let expect = |j: u32| Entry {
                    seg: seg.id,
                    off: (off as u64 + h.block_payload_offset(j)) as u32,
                    crc: record::crc_at(&crcs, j as usize),
                };
                // Which of these blocks are still live? (cheap check first)
                let any_live = {
                    let inner = self.inner.lock();
                    (i..i + n).any(|j| inner.holder(first_block + j as u64, expect(j)).is_some())
                };
                if !any_live {
                    i += n;
                    continue;
                }
                let mut data = vec![0u8; (n as u64 * BLOCK_BYTES) as usize];
                if let Err(e) = seg.read_at(&mut data, off as u64 + h.block_payload_offset(i)) {
                    return Ok(Some(format!("log segment {} cannot be read: {e:#}", seg.path.display())));
                }
                for j in 0..n {
                    let blk = &data[(j as u64 * BLOCK_BYTES) as usize..((j + 1) as u64 * BLOCK_BYTES) as usize];
                    // Only a live block's checksum matters: a dead one is never read again.
                    if crate::crc::crc32c(blk) != record::crc_at(&crcs, (i + j) as usize) && self.inner.lock().holder(first_block + (i + j) as u64, expect(i + j)).is_some() {
                        return Ok(Some(format!(
                            "checksum mismatch in log segment {} at offset {} (a live block)",
                            seg.path.display(),
                            off as u64 + h.block_payload_offset(i + j)
                        )));
                    }
                }
                // Under the lock: re-check and append runs still live.
                let mut inner = self.inner.lock();
                let mut j = 0u32;
                while j < n {
                    // Which map holds the old copy (snapshots share it with
                    // volumes): the relocation record names it, and every
                    // map sharing the copy moves with it (see `relocate_entry`).
                    let holder_at = |inner: &super::Inner, j: u32| inner.holder(first_block + (i + j) as u64, expect(i + j));
                    let Some(holder) = holder_at(&inner, j) else {
                        j += 1;
                        continue;
                    };
                    let mut k = j + 1;
                    while k < n && holder_at(&inner, k) == Some(holder) {
                        k += 1;
                    }
                    let payload = &data[(j as u64 * BLOCK_BYTES) as usize..(k as u64 * BLOCK_BYTES) as usize];
                    let run_crcs = &crcs[((i + j) * 4) as usize..((i + k) * 4) as usize];
                    let mut rh = Header {
                        kind: Kind::Write,
                        flags: FLAG_RELOCATED,
                        epoch: h.epoch,
                        seq: h.seq,
                        timestamp_ns: h.timestamp_ns,
                        volume: holder,
                        length: payload.len() as u32,
                        offset: (first_block + (i + j) as u64) * BLOCK_BYTES,
                        body_len: (run_crcs.len() + payload.len()) as u32,
                        crc: 0,
                        durable: 0,
                    };
                    let at = inner.append(self, &mut rh, run_crcs, payload).map_err(|e| anyhow::anyhow!("{e}"))?;
                    inner.apply(&rh, at, run_crcs, None);
                    self.stats.gc_relocated_bytes.fetch_add(payload.len() as u64, Ordering::Relaxed);
                    j = k;
                }
                drop(inner);
                i += n;
            }
        }
        Ok(None)
    }
}
