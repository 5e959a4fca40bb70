//! Dirty-region tracking and resync, primary side (R3).
//!
//! When a DR site falls so far behind that keeping its records would exceed
//! the log cap (or it needs records the log no longer has), the primary
//! stops keeping the log for it: it records which blocks changed since what
//! the DR holds (a dirty set per peer, kept up to date by every write under
//! the group lock), drops the DR's pin so GC frees the log, and on reconnect
//! sends only the dirty blocks' *current* content, as RESYNC records. The DR
//! stages them and keeps showing its last consistent state until the
//! `ResyncCommit` record, which makes the staged blocks and the volume table
//! its state at once, as of the primary's sequence number at the moment the
//! dirty set was found empty.
//!
//! Why this converges to the primary's state at that seq: a block's content
//! is read after its dirty mark is cleared, so any later write marks it again
//! and it is sent again; when the set is empty under the lock, every block's
//! last-sent content is its current content.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Result};

use super::Group;
use crate::limits::BLOCK_BYTES;
use crate::log::record::{self, Header, Kind, FLAG_RESYNC, HEADER_BYTES};
use crate::log::segment::{self, pos_seg};
use crate::volume::map::Entry;

/// A set of block numbers kept as disjoint, non-adjacent ranges
/// (start -> end, exclusive): a whole dirty volume costs one entry.
#[derive(Clone, Debug, Default)]
pub struct BlockRanges {
    r: BTreeMap<u64, u64>,
}

impl BlockRanges {
    pub fn insert(&mut self, mut start: u64, mut end: u64) {
        if start >= end {
            return;
        }
        // Merge with a range that starts before and reaches `start`.
        if let Some((&s, &e)) = self.r.range(..=start).next_back() {
            if e >= start {
                start = s;
                end = end.max(e);
                self.r.remove(&s);
            }
        }
        // Swallow ranges starting inside [start, end].
        let inside: Vec<(u64, u64)> = self.r.range(start..=end).map(|(a, b)| (*a, *b)).collect();
        for (s, e) in inside {
            end = end.max(e);
            self.r.remove(&s);
        }
        self.r.insert(start, end);
    }

    /// Removes and returns up to `max` blocks from the front.
    pub fn pop_front(&mut self, max: u64) -> Option<(u64, u64)> {
        let (&s, &e) = self.r.iter().next()?;
        self.r.remove(&s);
        let take = (e - s).min(max);
        if s + take < e {
            self.r.insert(s + take, e);
        }
        Some((s, take))
    }

    pub fn len(&self) -> u64 {
        self.r.iter().map(|(s, e)| e - s).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.r.is_empty()
    }
}

/// A run of dirty blocks of one volume.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub volume: u32,
    pub first: u64,
    pub count: u64,
}

impl Group {
    pub fn in_dirty_mode(&self, peer: &str) -> bool {
        self.lock_read().dirty.contains_key(peer)
    }

    /// Blocks still to resync for `peer`.
    pub fn dirty_blocks(&self, peer: &str) -> u64 {
        self.lock_read().dirty.get(peer).map(|d| d.values().map(|s| s.len()).sum()).unwrap_or(0)
    }

    /// Switches `peer` to dirty tracking: every block written by records
    /// from `from_seq` on is dirty, and so is every later write; the peer's
    /// pin is dropped. With `from_seq = None` every mapped block is dirty (a
    /// full resync, when the log no longer holds what the peer needs).
    pub fn enter_dirty(&self, peer: &str, from_seq: Option<u64>) -> Result<()> {
        // 1. Start marking live writes in a pending set, note the tail.
        let tail = {
            let mut inner = self.lock_read();
            if inner.dirty.contains_key(peer) || inner.dirty_pending.contains_key(peer) {
                return Ok(());
            }
            let set = if from_seq.is_none() { inner.whole_volumes_dirty() } else { BTreeMap::new() };
            inner.dirty_pending.insert(peer.to_string(), set);
            inner.tail_pos()
        };
        // 2. Records the peer may lack, up to where live marking took over
        //    (outside the lock: this reads log files).
        let mut runs: Vec<Run> = Vec::new();
        if let Some(from) = from_seq {
            if let Some(at) = self.locate_seq(from) {
                let mut seg_id = pos_seg(at);
                while seg_id <= pos_seg(tail) {
                    let Some(seg) = self.segment(seg_id) else {
                        match self.next_segment(seg_id) {
                            Some(s) => {
                                seg_id = s.id;
                                continue;
                            }
                            None => break,
                        }
                    };
                    segment::scan(&seg, 0, false, |r, _| {
                        let h = &r.header;
                        if h.flags & record::FLAG_RELOCATED == 0 && h.seq >= from && matches!(h.kind, Kind::Write | Kind::Zero | Kind::Trim) {
                            runs.push(Run { volume: h.volume, first: h.offset / BLOCK_BYTES, count: h.length as u64 / BLOCK_BYTES });
                        }
                        Ok(())
                    })?;
                    seg_id += 1;
                }
            }
        }
        // 3. Atomically: the complete set becomes visible and the pin goes.
        let blocks = {
            let mut inner = self.lock_read();
            let mut set = inner.dirty_pending.remove(peer).unwrap_or_default();
            for r in runs {
                set.entry(r.volume).or_default().insert(r.first, r.first + r.count);
            }
            let n: u64 = set.values().map(|s| s.len()).sum();
            inner.dirty.insert(peer.to_string(), set);
            inner.pins.remove(peer);
            n
        };
        self.save_pins()?;
        tracing::warn!(event = "dr-resync-needed", "group {}: DR site {peer} switched to dirty-region tracking ({blocks} blocks dirty)", self.name);
        Ok(())
    }

    /// Takes up to `max` dirty blocks of `peer` as runs (they are no longer
    /// dirty; `return_dirty` puts them back if sending fails).
    pub fn take_dirty(&self, peer: &str, max: u64) -> Vec<Run> {
        let mut inner = self.lock_read();
        let Some(d) = inner.dirty.get_mut(peer) else { return Vec::new() };
        let mut runs: Vec<Run> = Vec::new();
        let mut n = 0;
        for (vol, set) in d.iter_mut() {
            while n < max {
                let Some((first, count)) = set.pop_front(max - n) else { break };
                n += count;
                runs.push(Run { volume: *vol, first, count });
            }
        }
        d.retain(|_, s| !s.is_empty());
        runs
    }

    pub fn return_dirty(&self, peer: &str, runs: &[Run]) {
        let mut inner = self.lock_read();
        if let Some(d) = inner.dirty.get_mut(peer) {
            for r in runs {
                d.entry(r.volume).or_default().insert(r.first, r.first + r.count);
            }
        }
    }

    /// If nothing is dirty for `peer`, returns the seq the DR will be at
    /// after the commit and the volume table as of that seq, and pins the
    /// log from the next seq on (normal streaming resumes there).
    pub fn resync_point(&self, peer: &str) -> Option<(u64, Vec<(u32, String, u64)>)> {
        let mut inner = self.lock_read();
        if inner.dirty.get(peer).is_some_and(|d| d.values().any(|s| !s.is_empty())) {
            return None;
        }
        let seq = inner.next_seq - 1;
        let table = inner.volumes.values().map(|v| (v.id, v.name.clone(), v.size)).collect();
        inner.pins.insert(peer.to_string(), seq + 1);
        Some((seq, table))
    }

    /// The DR acknowledged the commit: back to streaming from the log.
    pub fn leave_dirty(&self, peer: &str) -> Result<()> {
        self.lock_read().dirty.remove(peer);
        self.save_pins()
    }

    /// Builds RESYNC records carrying the current content of `runs`.
    pub fn resync_records(&self, runs: &[Run], out: &mut Vec<u8>) -> Result<u64> {
        let mut data_bytes = 0;
        for run in runs {
            // Look up under the lock, read outside it (segments are immutable
            // and kept open by the Arc even if GC unlinks them).
            let (entries, segs) = {
                let inner = self.lock_read();
                let Some(v) = inner.volumes.get(&run.volume) else { continue };
                let end = (run.first + run.count).min(v.map.blocks()).min(v.size / BLOCK_BYTES);
                if run.first >= end {
                    continue;
                }
                let mut entries = Vec::new();
                let mut segs = std::collections::HashMap::new();
                for b in run.first..end {
                    let e = v.map.get(b);
                    if e.is_data() {
                        if let Some(s) = inner.segments.get(&e.seg) {
                            segs.insert(e.seg, s.clone());
                        }
                    }
                    entries.push(e);
                }
                (entries, segs)
            };
            let mut i = 0usize;
            while i < entries.len() {
                let kind_of = |e: &Entry| if e.is_data() { 0 } else if e.is_hole() { 1 } else { 2 };
                let k = kind_of(&entries[i]);
                let mut j = i + 1;
                while j < entries.len() && kind_of(&entries[j]) == k && (k != 0 || j - i < 256) {
                    j += 1;
                }
                let offset = (run.first + i as u64) * BLOCK_BYTES;
                let len = ((j - i) as u64 * BLOCK_BYTES) as u32;
                let mut payload = Vec::new();
                let kind = match k {
                    0 => {
                        payload.reserve(len as usize);
                        for e in &entries[i..j] {
                            let seg = segs.get(&e.seg).ok_or_else(|| anyhow::anyhow!("segment {} missing while resyncing", e.seg))?;
                            let mut blk = vec![0u8; BLOCK_BYTES as usize];
                            seg.read_at(&mut blk, e.off as u64)?;
                            if crc32c::crc32c(&blk) != e.crc {
                                bail!("checksum mismatch in log segment {} at offset {}; not sending it", seg.path.display(), e.off);
                            }
                            payload.extend_from_slice(&blk);
                        }
                        data_bytes += len as u64;
                        Kind::Write
                    }
                    1 => Kind::Trim,
                    _ => Kind::Zero,
                };
                let crcs = if kind == Kind::Write { record::block_crcs(&payload) } else { Vec::new() };
                let mut h = Header {
                    kind,
                    flags: FLAG_RESYNC,
                    epoch: self.epoch(),
                    seq: 0,
                    timestamp_ns: crate::util::now_ns(),
                    volume: run.volume,
                    length: len,
                    offset,
                    body_len: (crcs.len() + payload.len()) as u32,
                    crc: 0,
                };
                let mut raw = [0u8; HEADER_BYTES];
                h.encode(&crcs, &mut raw);
                out.extend_from_slice(&raw);
                out.extend_from_slice(&crcs);
                out.extend_from_slice(&payload);
                i = j;
            }
        }
        Ok(data_bytes)
    }

    /// A RESYNC control record (begin, or commit at `seq` with the volume table).
    pub fn resync_control(&self, kind: Kind, seq: u64, table: &[(u32, String, u64)]) -> Vec<u8> {
        let body = if kind == Kind::ResyncCommit { serde_json::to_vec(table).unwrap_or_default() } else { Vec::new() };
        let mut h = Header {
            kind,
            flags: 0,
            epoch: self.epoch(),
            seq,
            timestamp_ns: crate::util::now_ns(),
            volume: 0,
            length: 0,
            offset: 0,
            body_len: body.len() as u32,
            crc: 0,
        };
        let mut raw = [0u8; HEADER_BYTES];
        h.encode(&body, &mut raw);
        let mut out = raw.to_vec();
        out.extend_from_slice(&body);
        out
    }

    /// Maintenance: a DR site whose pin keeps more log than `cap` bytes is
    /// switched to dirty tracking, so the log can be freed.
    pub(super) fn enforce_log_cap(self: &Arc<Self>) -> Result<()> {
        let cap = self.log_cap.load(std::sync::atomic::Ordering::Relaxed);
        let victim = {
            let inner = self.lock_read();
            if inner.log_bytes() <= cap {
                return Ok(());
            }
            // The log bytes a pin holds: segments with records at or after it.
            let held = |pin: u64| -> u64 {
                inner.segments.values().filter(|s| inner.seg_seqs.get(&s.id).is_some_and(|(_, hi)| *hi >= pin)).map(|s| s.len()).sum()
            };
            inner
                .pins
                .iter()
                .filter(|(p, _)| !inner.dirty.contains_key(*p))
                .min_by_key(|(_, s)| **s)
                .filter(|(_, s)| held(**s) > cap)
                .map(|(p, s)| (p.clone(), *s))
        };
        if let Some((peer, seq)) = victim {
            tracing::warn!("group {}: log above its cap of {cap} bytes; DR site {peer} (needs seq {seq}) falls back to dirty-region resync", self.name);
            self.enter_dirty(&peer, Some(seq))?;
        }
        Ok(())
    }
}

impl super::Inner {
    /// Every block of every volume: what a full resync must cover (the DR
    /// may hold data where the primary now has holes).
    pub fn whole_volumes_dirty(&self) -> BTreeMap<u32, BlockRanges> {
        let mut set = BTreeMap::new();
        for v in self.volumes.values() {
            let mut r = BlockRanges::default();
            r.insert(0, v.size / BLOCK_BYTES);
            set.insert(v.id, r);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::BlockRanges;
    use rand::{Rng, SeedableRng};

    #[test]
    fn ranges_match_a_set() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut r = BlockRanges::default();
        let mut model = std::collections::BTreeSet::new();
        for _ in 0..5000 {
            let a = rng.random_range(0..2000u64);
            let n = rng.random_range(0..20u64);
            r.insert(a, a + n);
            model.extend(a..a + n);
            if rng.random_bool(0.2) {
                if let Some((s, c)) = r.pop_front(rng.random_range(1..50)) {
                    for b in s..s + c {
                        assert!(model.remove(&b));
                    }
                    assert!(model.iter().next().is_none_or(|m| *m >= s + c || *m > s));
                }
            }
            assert_eq!(r.len(), model.len() as u64);
        }
    }
}
