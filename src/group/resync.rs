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
//! Snapshot operations in dirty mode (R9): the DR will not see the
//! snapshot, restore, refresh or sync records, so the dirty set remembers,
//! the map operations (snapshot, restore, refresh, sync) made meanwhile,
//! with their seqs, and gives each target the dirty blocks of its source.
//! The DR may hold more than the primary assumed when tracking began (acks
//! lag), so which operations it lacks is decided only at the commit, from
//! the seq the DR reported: each map made by an operation after that seq
//! is built by the DR from its own copy of the map it derives from (its
//! `base`), then the staged blocks are applied. Only the regions that
//! differ cross the link.
//!
//! Why this converges to the primary's state at that seq: a block's content
//! is read after its dirty mark is cleared, so any later write marks it again
//! and it is sent again; when the set is empty under the lock, every block's
//! last-sent content is its current content.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

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

    /// Adds every block of `other`.
    pub fn insert_all(&mut self, other: &BlockRanges) {
        for (s, e) in &other.r {
            self.insert(*s, *e);
        }
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

    /// Drops everything at or past block `end`.
    pub fn clip(&mut self, end: u64) {
        let past: Vec<u64> = self.r.range(end..).map(|(s, _)| *s).collect();
        for s in past {
            self.r.remove(&s);
        }
        if let Some((&s, e)) = self.r.iter_mut().next_back() {
            if *e > end {
                *e = end.max(s);
            }
        }
        self.r.retain(|s, e| *e > *s);
    }

    pub fn len(&self) -> u64 {
        self.r.iter().map(|(s, e)| e - s).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.r.is_empty()
    }
}

/// What one DR site lacks while in dirty mode.
#[derive(Clone, Debug, Default)]
pub struct Dirty {
    /// Blocks per map whose current content the DR must get.
    pub blocks: BTreeMap<u32, BlockRanges>,
    /// Blocks sent in this resync attempt but not yet committed at the DR.
    inflight: BTreeMap<u32, BlockRanges>,
    /// Map copies made while in dirty mode: (seq, dst, src), in order.
    copies: Vec<(u64, u32, u32)>,
    /// Map operations seen while this set was pending (see `enter_dirty`).
    ops: Vec<MapOp>,
    /// The resync attempt that may take blocks (see `begin_attempt`).
    attempt: u64,
    pending: bool,
    /// The set holds the blocks of records from this seq on: it serves a DR
    /// that holds every record before it. `None`: every block is marked.
    pub from_seq: Option<u64>,
}

#[derive(Clone, Copy, Debug)]
enum MapOp {
    /// `dst` became a copy of `src` (snapshot create, restore, refresh, sync) at `seq`.
    Copy { dst: u32, src: u32, seq: u64 },
    /// The map is gone, or is new and empty (delete, create).
    Drop(u32),
    /// The map was resized to `blocks`.
    Resize { id: u32, blocks: u64 },
}

impl Dirty {
    fn mark(&mut self, vol: u32, first: u64, end: u64) {
        self.blocks.entry(vol).or_default().insert(first, end);
    }

    fn mark_all(&mut self, vol: u32, r: &BlockRanges) {
        if !r.is_empty() {
            self.blocks.entry(vol).or_default().insert_all(r);
        }
    }

    /// What the current attempt sent but did not commit is dirty again.
    fn return_inflight(&mut self) {
        for (vol, r) in std::mem::take(&mut self.inflight) {
            self.mark_all(vol, &r);
        }
    }

    fn apply_op(&mut self, op: MapOp, sizes: &dyn Fn(u32) -> u64) {
        match op {
            MapOp::Copy { dst, src, seq } => {
                if dst == src {
                    return;
                }
                let mut b = self.blocks.get(&src).cloned().unwrap_or_default();
                if let Some(f) = self.inflight.get(&src) {
                    b.insert_all(f);
                }
                // Blocks of `dst` this attempt already sent sit in the DR's
                // staging with `dst`'s old content, and the commit applies
                // the staging on top of the map the DR builds for `dst`:
                // they must be sent again with the new content.
                if let Some(f) = self.inflight.remove(&dst) {
                    b.insert_all(&f);
                }
                if b.is_empty() {
                    self.blocks.remove(&dst);
                } else {
                    self.blocks.insert(dst, b);
                }
                self.copies.push((seq, dst, src));
            }
            MapOp::Drop(id) => {
                self.blocks.remove(&id);
                self.inflight.remove(&id);
            }
            MapOp::Resize { id, blocks } => {
                // Grown space must read as holes at the DR even where its
                // copy once had data: mark it (clipped to the current size).
                let now = sizes(id);
                if now > blocks {
                    self.mark(id, blocks, now);
                }
            }
        }
        if self.pending {
            self.ops.push(op);
        }
    }

    /// Records what a stream record means for this DR site. `sizes` gives a
    /// map's current size in blocks.
    pub(crate) fn note(&mut self, h: &Header, old_blocks: u64, sizes: &dyn Fn(u32) -> u64) {
        if h.flags & FLAG_RESYNC != 0 {
            return;
        }
        match h.kind {
            Kind::Write | Kind::Zero | Kind::Trim => {
                let first = h.offset / BLOCK_BYTES;
                self.mark(h.volume, first, first + h.length as u64 / BLOCK_BYTES);
            }
            Kind::SnapCreate | Kind::MapCopy => self.apply_op(MapOp::Copy { dst: h.volume, src: h.offset as u32, seq: h.seq }, sizes),
            Kind::VolumeCreate | Kind::VolumeDelete => self.apply_op(MapOp::Drop(h.volume), sizes),
            Kind::VolumeResize => {
                let new = h.offset.div_ceil(BLOCK_BYTES);
                if new > old_blocks {
                    self.mark(h.volume, old_blocks, new);
                }
                if self.pending {
                    self.ops.push(MapOp::Resize { id: h.volume, blocks: old_blocks.min(new) });
                }
            }
            _ => {}
        }
    }

    pub fn dirty_blocks(&self) -> u64 {
        self.blocks.values().map(|s| s.len()).sum()
    }

    /// For a DR that holds everything up to `dr_last`: the maps it must
    /// build from one of its own (the copies it lacks, chained in order).
    pub fn bases(&self, dr_last: u64) -> BTreeMap<u32, u32> {
        let mut base = BTreeMap::new();
        for &(_, dst, src) in self.copies.iter().filter(|c| c.0 > dr_last) {
            let b = base.get(&src).copied().unwrap_or(src);
            base.insert(dst, b);
        }
        base
    }
}

/// One map in a `ResyncCommit` body: what the DR's table must be, and
/// for maps made while the DR was in dirty mode, the DR-side map to build
/// it from before the staged blocks are applied.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommitEntry {
    pub id: u32,
    pub name: String,
    pub size: u64,
    #[serde(default)]
    pub snap: Option<crate::volume::SnapMeta>,
    #[serde(default)]
    pub base: Option<u32>,
}

/// Body of a RESYNC `MapCopy` record: blocks `first..first+count` of the
/// record's map take what the source map (the header's `offset`) staged.
#[derive(Serialize, Deserialize)]
pub struct StagedCopy {
    pub first: u64,
    pub count: u64,
}

/// What one resync attempt has sent: which map's staging holds each block
/// content, so a map sharing it gets a staged copy instead of the data.
#[derive(Default)]
pub struct SentIndex {
    by_entry: std::collections::HashMap<(u32, u32), u32>,
    by_block: std::collections::HashMap<(u32, u64), (u32, u32)>,
}

impl SentIndex {
    /// Bounds the index (about 40 bytes per block): past it, data is sent
    /// again rather than memory grown.
    const MAX_BLOCKS: usize = 4 << 20;

    /// A map whose staging holds content `e` at `block`, if any.
    fn source(&self, block: u64, e: Entry) -> Option<u32> {
        let src = *self.by_entry.get(&(e.seg, e.off))?;
        (self.by_block.get(&(src, block)) == Some(&(e.seg, e.off))).then_some(src)
    }

    fn sent(&mut self, vol: u32, block: u64, e: Entry) {
        if !e.is_data() {
            self.by_block.remove(&(vol, block));
            return;
        }
        if self.by_block.len() >= Self::MAX_BLOCKS && !self.by_block.contains_key(&(vol, block)) {
            return;
        }
        // Always updated when present: a stale entry would let a later map
        // copy content this map's staging no longer holds.
        self.by_block.insert((vol, block), (e.seg, e.off));
        self.by_entry.entry((e.seg, e.off)).or_insert(vol);
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

    /// `peer`'s dirty set, if in dirty mode: the seq it starts at
    /// (`Dirty::from_seq`; `None` if every block is marked).
    pub fn dirty_from(&self, peer: &str) -> Option<Option<u64>> {
        self.lock_read().dirty.get(peer).map(|d| d.from_seq)
    }

    /// Blocks still to resync for `peer`.
    pub fn dirty_blocks(&self, peer: &str) -> u64 {
        self.lock_read().dirty.get(peer).map(|d| d.dirty_blocks()).unwrap_or(0)
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
            let mut set = if from_seq.is_none() { inner.whole_volumes_dirty() } else { Dirty::default() };
            set.pending = true;
            inner.dirty_pending.insert(peer.to_string(), set);
            inner.tail_pos()
        };
        // 2. Records the peer may lack, up to where live marking took over
        //    (outside the lock: this reads log files).
        let mut scanned: Vec<Header> = Vec::new();
        // A record that cannot be read before the tail hides which blocks
        // the records after it wrote: everything is dirty then.
        let mut unreadable: Option<String> = None;
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
                    let stop = segment::scan(&seg, 0, false, |r, _| {
                        let h = &r.header;
                        let before_tail = segment::pos(seg_id, r.off) < tail;
                        if before_tail && h.flags & record::FLAG_RELOCATED == 0 && h.seq >= from {
                            scanned.push(*h);
                        }
                        Ok(())
                    })?;
                    // A stop at or past the tail is an append in progress.
                    if let Some(st) = stop.filter(|st| segment::pos(seg_id, st.off as u32) < tail) {
                        unreadable = Some(format!("log segment {} at offset {}: {}", seg.path.display(), st.off, st.reason));
                        break;
                    }
                    seg_id += 1;
                }
            }
        }
        // 3. Atomically: the scanned records in order, then the map
        //    operations seen live, then the live marks; the set becomes
        //    visible and the pin goes.
        let blocks = {
            let mut inner = self.lock_read();
            let pending = inner.dirty_pending.remove(peer).unwrap_or_default();
            let sizes = |id: u32| inner.volumes.get(&id).map(|v| v.size / BLOCK_BYTES).unwrap_or(0);
            let mut set = Dirty::default();
            for h in &scanned {
                if h.kind == Kind::VolumeResize {
                    // The old size is unknown here: everything from the new
                    // end to today's end is marked.
                    set.apply_op(MapOp::Resize { id: h.volume, blocks: h.offset.div_ceil(BLOCK_BYTES) }, &sizes);
                } else {
                    set.note(h, u64::MAX, &sizes);
                }
            }
            if from_seq.is_none() {
                set = pending.clone();
            } else {
                for op in &pending.ops {
                    set.apply_op(*op, &sizes);
                }
                for (vol, r) in &pending.blocks {
                    set.mark_all(*vol, r);
                }
            }
            set.pending = false;
            set.ops.clear();
            set.from_seq = from_seq;
            if let Some(why) = &unreadable {
                tracing::warn!("group {}: cannot list the records DR site {peer} lacks ({why}); it resyncs every block", self.name);
                let all = inner.whole_volumes_dirty();
                for (vol, r) in &all.blocks {
                    set.mark_all(*vol, r);
                }
                set.from_seq = None;
            }
            let n = set.dirty_blocks();
            inner.dirty.insert(peer.to_string(), set);
            inner.pins.remove(peer);
            n
        };
        self.save_pins()?;
        tracing::warn!(event = "dr-resync-needed", "group {}: DR site {peer} switched to dirty-region tracking ({blocks} blocks dirty)", self.name);
        Ok(())
    }

    /// A full resync for `peer`, whatever it was doing: every block of every
    /// map becomes dirty (also in a dirty set that only held some).
    pub fn resync_everything(&self, peer: &str) -> Result<()> {
        self.enter_dirty(peer, None)?;
        let mut inner = self.lock_read();
        let all = inner.whole_volumes_dirty();
        let inner = &mut *inner;
        for d in [inner.dirty.get_mut(peer), inner.dirty_pending.get_mut(peer)].into_iter().flatten() {
            for (vol, r) in &all.blocks {
                d.mark_all(*vol, r);
            }
            d.from_seq = None;
        }
        Ok(())
    }

    /// Starts a resync attempt for `peer` (after its RESYNC_BEGIN, which
    /// empties the DR's staging): whatever earlier attempts sent is dirty
    /// again, and only this attempt may take blocks or commit from now on.
    /// An older session still draining (its connection is dead, its task
    /// not yet dropped) can then neither take blocks this attempt would
    /// never send nor hide them in flight while this one commits.
    pub fn begin_attempt(&self, peer: &str) -> u64 {
        let mut inner = self.lock_read();
        let Some(d) = inner.dirty.get_mut(peer) else { return 0 };
        d.attempt += 1;
        d.return_inflight();
        d.attempt
    }

    /// The current resync attempt for `peer` (None when not in dirty mode).
    pub fn resync_attempt(&self, peer: &str) -> Option<u64> {
        self.lock_read().dirty.get(peer).map(|d| d.attempt)
    }

    /// Takes up to `max` dirty blocks of `peer` as runs for resync attempt
    /// `attempt` (they are in flight until the commit; `return_dirty` puts
    /// them back if sending fails). A superseded attempt gets nothing.
    pub fn take_dirty(&self, peer: &str, attempt: u64, max: u64) -> Vec<Run> {
        let mut inner = self.lock_read();
        let sizes: BTreeMap<u32, u64> = inner.volumes.values().map(|v| (v.id, v.size / BLOCK_BYTES)).collect();
        let Some(d) = inner.dirty.get_mut(peer) else { return Vec::new() };
        if d.attempt != attempt {
            return Vec::new();
        }
        let mut runs: Vec<Run> = Vec::new();
        let mut n = 0;
        for (vol, set) in d.blocks.iter_mut() {
            // Past the end of the map there is nothing to send (the DR
            // takes the size from the commit).
            set.clip(sizes.get(vol).copied().unwrap_or(0));
            while n < max {
                let Some((first, count)) = set.pop_front(max - n) else { break };
                n += count;
                runs.push(Run { volume: *vol, first, count });
            }
        }
        d.blocks.retain(|_, s| !s.is_empty());
        for r in &runs {
            d.inflight.entry(r.volume).or_default().insert(r.first, r.first + r.count);
        }
        runs
    }

    /// Resync attempt `attempt` failed: what it sent but did not commit is
    /// dirty again (a superseded attempt's blocks were returned when the
    /// newer one began).
    pub fn return_dirty(&self, peer: &str, attempt: u64) {
        let mut inner = self.lock_read();
        if let Some(d) = inner.dirty.get_mut(peer).filter(|d| d.attempt == attempt) {
            d.return_inflight();
        }
    }

    /// If nothing is dirty for `peer`, returns the seq the DR will be at
    /// after the commit and the map table as of that seq, and pins the
    /// log from the next seq on (normal streaming resumes there). `dr_last`
    /// is the last seq the DR holds (from its HELLO reply).
    pub fn resync_point(&self, peer: &str, attempt: u64, dr_last: u64) -> Option<(u64, Option<u32>, Vec<CommitEntry>)> {
        let mut inner = self.lock_read();
        let d = inner.dirty.get(peer)?;
        if d.attempt != attempt || d.blocks.values().any(|s| !s.is_empty()) {
            return None;
        }
        let bases = d.bases(dr_last);
        let seq = inner.next_seq - 1;
        let table = inner
            .volumes
            .values()
            .map(|v| CommitEntry { id: v.id, name: v.name.clone(), size: v.size, snap: v.snap.clone(), base: bases.get(&v.id).copied() })
            .collect();
        // The pin keeps the record at `seq`: the next HELLO checks the DR's
        // history against it.
        inner.pins.insert(peer.to_string(), seq.max(1));
        Some((seq, inner.last_ident, table))
    }

    /// The DR acknowledged the commit of resync attempt `attempt`: back to
    /// streaming from the log. Returns false (and changes nothing) if a
    /// newer attempt has begun meanwhile (or already finished): the dirty set and the pin are
    /// that attempt's now (its commit set the pin past what the DR holds),
    /// and it resyncs everything this one sent again, so the DR's state
    /// after this commit is a base it may build on, never an end point.
    pub fn leave_dirty(&self, peer: &str, attempt: u64) -> Result<bool> {
        {
            let mut inner = self.lock_read();
            if inner.dirty.get(peer).is_none_or(|d| d.attempt != attempt) {
                return Ok(false);
            }
            inner.dirty.remove(peer);
            // The commit made the DR's copy this primary's.
            inner.unverified.remove(peer);
        }
        self.save_pins()?;
        Ok(true)
    }

    /// Builds RESYNC records carrying the current content of `runs`. A
    /// block whose content was already sent in this resync (for another
    /// map sharing it: a snapshot and its volume) goes as a staged-copy
    /// record instead, so no data crosses the link twice (`sent` lives for
    /// one resync attempt, like the DR's staging map).
    pub fn resync_records(&self, runs: &[Run], sent: &mut SentIndex, out: &mut Vec<u8>) -> Result<u64> {
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
            // 0 data, 1 hole, 2 zero, 3 + src: copy of what map src staged.
            let kinds: Vec<u64> = entries
                .iter()
                .enumerate()
                .map(|(i, e)| {
                    if !e.is_data() {
                        return if e.is_hole() { 1 } else { 2 };
                    }
                    match sent.source(run.first + i as u64, *e) {
                        Some(src) if src != run.volume => 3 + src as u64,
                        _ => 0,
                    }
                })
                .collect();
            let mut i = 0usize;
            while i < entries.len() {
                let k = kinds[i];
                let mut j = i + 1;
                while j < entries.len() && kinds[j] == k && (k != 0 || j - i < 256) {
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
                            if crate::crc::crc32c(&blk) != e.crc {
                                bail!("checksum mismatch in log segment {} at offset {}; not sending it", seg.path.display(), e.off);
                            }
                            payload.extend_from_slice(&blk);
                        }
                        data_bytes += len as u64;
                        Kind::Write
                    }
                    1 => Kind::Trim,
                    2 => Kind::Zero,
                    _ => Kind::MapCopy,
                };
                for (n, e) in entries[i..j].iter().enumerate() {
                    sent.sent(run.volume, run.first + (i + n) as u64, *e);
                }
                let (crcs, body) = match kind {
                    Kind::Write => (record::block_crcs(&payload), Vec::new()),
                    Kind::MapCopy => (Vec::new(), serde_json::to_vec(&StagedCopy { first: run.first + i as u64, count: (j - i) as u64 })?),
                    _ => (Vec::new(), Vec::new()),
                };
                let mut h = Header {
                    kind,
                    flags: FLAG_RESYNC,
                    epoch: self.epoch(),
                    seq: 0,
                    timestamp_ns: crate::util::now_ns(),
                    volume: run.volume,
                    length: if kind == Kind::MapCopy { 0 } else { len },
                    offset: if kind == Kind::MapCopy { k - 3 } else { offset },
                    body_len: (crcs.len() + payload.len() + body.len()) as u32,
                    crc: 0,
                    durable: 0,
                };
                let mut raw = [0u8; HEADER_BYTES];
                let checked = if kind == Kind::MapCopy { &body } else { &crcs };
                h.encode(checked, &mut raw);
                out.extend_from_slice(&raw);
                out.extend_from_slice(checked);
                out.extend_from_slice(&payload);
                i = j;
            }
        }
        Ok(data_bytes)
    }

    /// The log bytes a resync of `peer` may take at the DR, at most: every
    /// dirty block as data (a header and a checksum each, as if none ran
    /// on into the next), and never more blocks than the group holds data
    /// in (a block several maps share goes once, and trimmed or zeroed
    /// blocks carry no data, so a full resync of a sparse volume is bounded
    /// by what it holds). Writes during the resync may add to it. Sent in
    /// RESYNC_BEGIN, so that a DR whose disk fills knows how much to ask
    /// for (`Inner::resync_needs_room`).
    pub fn resync_need(&self, peer: &str) -> u64 {
        let inner = self.lock_read();
        let dirty = inner.dirty.get(peer).map(|d| d.dirty_blocks()).unwrap_or(0);
        let blocks = dirty.min(inner.live_bytes() / BLOCK_BYTES);
        blocks.saturating_mul(BLOCK_BYTES + 4 + HEADER_BYTES as u64)
    }

    /// RESYNC_BEGIN, saying in its offset field the bytes the resync may
    /// need at the DR (`resync_need`; a DR before session 22 ignores it).
    pub fn resync_begin(&self, need: u64) -> Vec<u8> {
        self.resync_control(Kind::ResyncBegin, 0, need, &[])
    }

    /// RESYNC_COMMIT at `seq` with the volume table, naming the identity
    /// of this primary's record at `seq`.
    pub fn resync_commit(&self, seq: u64, ident: Option<u32>, table: &[CommitEntry]) -> Vec<u8> {
        let body = serde_json::to_vec(table).unwrap_or_default();
        self.resync_control(Kind::ResyncCommit, seq, record::commit_offset(ident), &body)
    }

    fn resync_control(&self, kind: Kind, seq: u64, offset: u64, body: &[u8]) -> Vec<u8> {
        let mut h = Header {
            kind,
            flags: 0,
            epoch: self.epoch(),
            seq,
            timestamp_ns: crate::util::now_ns(),
            volume: 0,
            length: 0,
            offset,
            body_len: body.len() as u32,
            crc: 0,
            durable: 0,
        };
        let mut raw = [0u8; HEADER_BYTES];
        h.encode(body, &mut raw);
        let mut out = raw.to_vec();
        out.extend_from_slice(body);
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
    pub fn whole_volumes_dirty(&self) -> Dirty {
        let mut set = Dirty::default();
        for v in self.volumes.values() {
            set.mark(v.id, 0, v.size / BLOCK_BYTES);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::{BlockRanges, Dirty, MapOp};
    use rand::{Rng, SeedableRng};

    /// Found by the deterministic simulation (seed 15275524333980183884):
    /// a snapshot's blocks were sent in a resync attempt, then the snapshot
    /// was overwritten by `snapshot sync` from an empty map before the
    /// commit. The DR built the snapshot from its base and applied the
    /// staged (old) blocks on top: the old content survived at the DR.
    #[test]
    fn blocks_sent_for_an_overwritten_map_are_sent_again() {
        let sizes = |_: u32| 100u64;
        let mut d = Dirty::default();
        d.mark(7, 0, 10);
        // Taken by the attempt: in flight, staged at the DR.
        let taken = d.blocks.remove(&7).unwrap();
        d.inflight.insert(7, taken);
        // Map 7 becomes a copy of map 9, which has nothing dirty.
        d.apply_op(MapOp::Copy { dst: 7, src: 9, seq: 50 }, &sizes);
        assert_eq!(d.blocks.get(&7).map(|b| b.len()), Some(10), "the staged blocks of the overwritten map are dirty again");
        assert!(!d.inflight.contains_key(&7));
        // A copy onto itself changes nothing.
        d.apply_op(MapOp::Copy { dst: 7, src: 7, seq: 51 }, &sizes);
        assert_eq!(d.blocks.get(&7).map(|b| b.len()), Some(10));
    }

    /// Switching a DR site to dirty tracking lists the blocks written by
    /// the records it lacks. A record there that cannot be read hides what
    /// the ones after it wrote: every block becomes dirty (a full resync),
    /// where before the scan's stop was dropped and the blocks after it
    /// were never resent.
    #[test]
    fn an_unreadable_record_in_what_a_dr_lacks_makes_everything_dirty() {
        use crate::group::{open::Create, Group};
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let g = Group::open_or_create(&dir.path().join("p"), "cg0", &Create { id: Some(7), mode: "async".into(), written_here: true }).unwrap();
        let v = g.create_volume("v", 1 << 20).unwrap();
        g.replication.add_replica("b");
        for b in 0..3u64 {
            g.write(v, b * 4096, &[b as u8 + 1; 4096]).unwrap();
        }
        g.sync_to(g.flush_target()).unwrap();
        let last = g.last_seq();
        // The DR lacks the last two writes; the first of them is torn.
        let (_, at) = g.record_header(last - 1).unwrap().unwrap();
        let seg = g.segment(crate::log::segment::pos_seg(at)).unwrap();
        seg.file.write_all_at(b"XXXX", crate::log::segment::pos_off(at) as u64).unwrap();
        g.enter_dirty("b", Some(last - 1)).unwrap();
        assert_eq!(g.dirty_blocks("b"), 256, "every block of the 1 MiB volume is dirty");
        assert_eq!(g.dirty_from("b"), Some(None), "the set covers everything");
    }

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
