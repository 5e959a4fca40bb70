//! A consistency group: volumes whose writes share one log and one sequence.
//!
//! All state that changes with a write (the log tail, the block maps, live
//! block counts per segment) sits behind one mutex, `Inner`. A write takes it
//! once: it is assigned the next sequence number, appended at the tail and
//! applied to the map, so the log order, the sequence order and the order in
//! which the map changed are one and the same. Reads take it only to look up
//! locations and then read the segment files outside it.
//!
//! Lock order: `sync_lock` before `inner`. Never hold `inner` across fsync.

pub mod checkpoint;
pub mod gc;
pub mod iowatch;
pub mod open;
pub mod resync;
pub mod snapshot;
pub mod times;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};

type InnerGuard<'a> = parking_lot::MutexGuard<'a, Inner>;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::limits::{BLOCK_BYTES, SEGMENT_BYTES};
use crate::log::record::{self, Header, Kind, FLAG_RELOCATED, FLAG_RESYNC, HEADER_BYTES};
use crate::log::segment::{self, pos, pos_off, pos_seg, LogPos, Segment};
use crate::volume::map::{Entry, SEG_HOLE, SEG_ZERO};
use crate::volume::Volume;

/// How long a data-path call (`read_as`, `write_as`, `zero_as`,
/// `block_status_as`) may wait: for the group lock, and for the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// As long as it takes (the API, replication, maintenance, the
    /// blocking pool).
    Forever,
    /// `NBD_LOCK_WAIT_US` at most, then `IoError::Busy`: a call on a
    /// runtime worker, which must not wait behind an append stuck on a
    /// stalled disk (ARCHITECTURE.md "A stalled disk is reported, not
    /// silent"). `Busy` at once while an append of the group has been in
    /// progress for `STORAGE_SLOW_MS`, or any storage operation of it for
    /// `STORAGE_STALL_MS`.
    Briefly,
}

/// How many runtime workers may be inside an append at once, site-wide.
/// An append is a blocking `pwrite`, and one to a disk that stalls holds
/// its worker until the disk answers; the first append of each stalled
/// group is on a worker before the stall can be seen. Without a bound, as
/// many groups stalling together as the site has workers stopped every
/// export. With it, a worker is always left for the healthy groups: an
/// append that would take the last one goes to the blocking pool instead
/// (`Busy` before its append; a zeroing keeps the steps it had done, and
/// is done again whole), as any call does that would wait. Appends hold
/// their group's lock, so one group never has more than one worker in an
/// append, and a site with one busy group never meets the bound.
pub struct AppendGate {
    max: AtomicUsize,
    inside: AtomicUsize,
}

/// The site's gate; unbounded until the site sets it
/// (`AppendGate::set_max`, from the number of runtime workers).
pub static WORKER_APPENDS: AppendGate = AppendGate::new();

impl AppendGate {
    pub const fn new() -> AppendGate {
        AppendGate { max: AtomicUsize::new(usize::MAX), inside: AtomicUsize::new(0) }
    }

    pub fn set_max(&self, n: usize) {
        self.max.store(n, Ordering::Relaxed);
    }

    /// A place for one append on a worker, or `Busy` if the bound is
    /// reached (the caller does the call again on the blocking pool).
    pub fn enter(&self) -> Result<AppendPlace<'_>, IoError> {
        if self.inside.fetch_add(1, Ordering::AcqRel) >= self.max.load(Ordering::Relaxed) {
            self.inside.fetch_sub(1, Ordering::AcqRel);
            return Err(IoError::Busy);
        }
        Ok(AppendPlace(self))
    }
}

impl Default for AppendGate {
    fn default() -> AppendGate {
        AppendGate::new()
    }
}

/// One worker inside an append; leaves the gate when dropped.
pub struct AppendPlace<'a>(&'a AppendGate);

impl Drop for AppendPlace<'_> {
    fn drop(&mut self) {
        self.0.inside.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Data-path errors, mapped to NBD error codes by the server.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    #[error("range {offset}+{len} is past the end of volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("volume {0} no longer exists")]
    VolumeGone(u32),
    #[error("{0} is a read-only snapshot")]
    ReadOnly(String),
    #[error("{0}")]
    Failed(String),
    /// A `Wait::Briefly` call did not get the group lock within
    /// `NBD_LOCK_WAIT_US`, or would have read from the disk rather than the
    /// page cache (nothing done, or for `zero_as` part of it); the caller
    /// does it again where it may wait.
    #[error("the group lock is busy or a read would wait for the disk")]
    Busy,
    /// The log's file system is full (ENOSPC, EDQUOT): nothing was
    /// appended, the group goes on, and the same write succeeds once there
    /// is space (ARCHITECTURE.md "A full disk is waited out").
    #[error("{0}")]
    NoSpace(String),
}

/// Persistent identity of a group (`group.json` in its directory).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GroupMeta {
    pub name: String,
    pub id: u64,
    pub epoch: u64,
    /// Replication mode: `async`, `sync` or `periodic`.
    #[serde(default = "default_mode")]
    pub mode: String,
}

fn default_mode() -> String {
    "async".into()
}

pub(crate) struct Inner {
    pub epoch: u64,
    pub next_seq: u64,
    /// Identity of the record at seq `next_seq - 1` (its header CRC, which
    /// covers its seq, epoch, time and block CRCs), or for a resync commit
    /// the identity of the primary's record it stands for; `None` if
    /// unknown. A DR site names it in its HELLO reply, so that a primary
    /// can tell whether the DR's history is a prefix of its own.
    pub last_ident: Option<u32>,
    pub next_volume_id: u32,
    pub volumes: BTreeMap<u32, Volume>,
    /// `volumes` as NBD sees them, for readers that must not wait for the
    /// lock (`Catalog`).
    pub catalog: Arc<Catalog>,
    /// Per log segment, the distinct log blocks any map points at: a block
    /// shared by several maps (a volume and its snapshots) counts once.
    /// What GC weighs (`distinct_refs`, `live_bytes`); freeing a segment
    /// still asks every map (`live_refs`). Kept up to date by every change
    /// to the maps (`set_entry`, `relocate_entry`, `forget_map`,
    /// `recount_distinct`).
    pub distinct: HashMap<u32, u64>,
    /// Per log segment, the references of all maps together (a block two
    /// maps share counts twice). Where it equals `distinct`, no block of
    /// the segment is shared, and no other map needs asking.
    pub refs: HashMap<u32, u64>,
    /// Dropped maps whose blocks in segments with shared blocks are still
    /// to be weighed, off the lock (`Group::settle_counts`).
    pub weighing: Weighing,
    pub segments: BTreeMap<u32, Arc<Segment>>,
    pub tail: Arc<Segment>,
    pub tail_off: u64,
    /// Segments written since the last group commit.
    pub unsynced: Vec<Arc<Segment>>,
    /// A segment file was created or removed since the last directory fsync.
    pub dir_dirty: bool,
    pub log_bytes_at_checkpoint: u64,
    pub log_bytes_written: u64,
    /// Replay start of the last durable checkpoint: segments below it may be cleaned.
    pub checkpoint_pos: LogPos,
    pub failed: Option<String>,
    /// Since when (wall ns) and why the last append found the file system
    /// full, and the bytes it needed; cleared by the next append that
    /// succeeds, or once that much is free (`Group::out_of_space`).
    pub out_of_space: Option<(u64, String, u64)>,
    /// (lowest, highest) sequence number of the original (not relocated)
    /// records in each segment: lets replication find a sequence number in
    /// the log, and GC keep what a DR site still needs.
    pub seg_seqs: BTreeMap<u32, (u64, u64)>,
    /// Lowest sequence number some DR site still needs, per peer (pins).
    pub pins: BTreeMap<String, u64>,
    /// Per DR site: a record it holds at or after this seq may be one this
    /// primary shipped and then lost (set when the group opens, to the
    /// first seq its recovered log lacks; cleared once the DR's history is
    /// verified at HELLO). Where the primary cannot check such a record,
    /// the DR gets a full resync.
    pub unverified: BTreeMap<String, u64>,
    /// Primary: blocks changed since a DR site left the log behind (R3),
    /// per peer and volume. Every write marks them while present.
    pub dirty: BTreeMap<String, resync::Dirty>,
    /// Dirty sets being built by `enter_dirty` (marked by writes already,
    /// not yet visible to the sender).
    pub dirty_pending: BTreeMap<String, resync::Dirty>,
    /// DR site: snapshots whose next deletion from the stream is refused
    /// (`Protect` records, see `snapshot.rs`).
    pub protected: std::collections::BTreeSet<u32>,
    /// DR site: the resync in progress, visible only at its commit.
    pub staging: Option<Staging>,
    /// A checkpoint is wanted at the next maintenance round: the records
    /// of an abandoned resync become garbage GC can free only behind one.
    pub checkpoint_asked: bool,
    /// Segments GC found it cannot clean (a live block unreadable or failing
    /// its checksum), with the reason: not chosen again until a restart, and
    /// shown in status. Freed like any other once nothing in them is live.
    pub gc_skipped: BTreeMap<u32, String>,
    /// When recent records were written (sampled): the age of the oldest
    /// write a DR site lacks.
    pub times: times::SeqTimes,
    /// From this log position on, the durability marks in records are
    /// this log's own (a primary's, since it last became one); `None` at
    /// a DR site, whose records carry its primary's. Kept in checkpoints.
    pub marks_from: Option<LogPos>,
}

/// DR site: a resync in progress (from its RESYNC_BEGIN to its commit).
#[derive(Default)]
pub struct Staging {
    /// Its blocks, per (map, block).
    pub blocks: BTreeMap<(u32, u64), Entry>,
    /// The bytes it may need in all, as the primary said in RESYNC_BEGIN
    /// (0 from a primary that does not say).
    pub need: u64,
    /// The bytes of its records appended so far.
    pub bytes: u64,
}

pub struct Group {
    pub name: String,
    pub id: u64,
    pub dir: PathBuf,
    /// A parking_lot mutex: the NBD path waits for it with a bound
    /// (`lock_as(Wait::Briefly)`), which std's mutex cannot do.
    pub(crate) inner: parking_lot::Mutex<Inner>,
    /// The same `Catalog` as the inner state's.
    catalog: Arc<Catalog>,
    /// Appends that find the file system full are said once a minute.
    no_space_log: Mutex<crate::util::LogThrottle>,
    sync_lock: Mutex<()>,
    /// Held while a checkpoint is encoded and written, so that two (the
    /// maintenance thread's and `close`'s) cannot land out of order.
    checkpoint_lock: Mutex<()>,
    sync_req: Mutex<(LogPos, bool)>,
    sync_cv: Condvar,
    /// (durable position, failed)
    durable_tx: watch::Sender<(LogPos, bool)>,
    /// Tail position after the last completed append (for FLUSH).
    tail_pos: AtomicU64,
    stop: AtomicBool,
    pub stats: GroupStats,
    /// Storage operations in progress, readable without the lock.
    pub io: iowatch::IoWatch,
    /// Tests: log syncs hang (as an fdatasync on a stalled disk does) while set.
    #[cfg(test)]
    pub stall_syncs: AtomicBool,
    /// Tests: `settle_counts` leaves the walks queued while set (as if
    /// the thread to run them had not come to it yet).
    #[cfg(test)]
    pub hold_walks: AtomicBool,
    /// Tests: `Wait::Briefly` calls find the lock busy once this many more of
    /// their lock waits have gone through (0: never).
    #[cfg(test)]
    pub busy_after: AtomicU64,
    /// Held while `settle_counts` runs walks.
    settle_lock: Mutex<()>,
    /// NBD calls of this group that may wait on the blocking pool at once
    /// (`NBD_POOL_CALLS_PER_GROUP`; `nbd::server::off_worker`).
    pub pool_calls: tokio::sync::Semaphore,
    /// Woken after every append (replication senders wait on it).
    pub appended: tokio::sync::Notify,
    /// Replication mode and, on the primary, the state of each DR replica.
    pub replication: crate::replicate::GroupReplication,
    /// Log bytes beyond which a lagging DR site's pin gives way to
    /// dirty-region tracking.
    pub log_cap: AtomicU64,
    /// DR site: generation of the newest replication connection. Appends
    /// from an older connection (still draining after a reconnect) are
    /// refused, so a stale resync record can never land after a newer one.
    pub receiver_gen: AtomicU64,
    /// DR site: the newest generation of the replication connections that
    /// ended since the last maintenance round (0: none). If it is still the
    /// newest of all, a resync it left unfinished can never be committed (a
    /// new connection's resync starts with RESYNC_BEGIN): maintenance drops
    /// its staging (`drop_abandoned_resync`). The newest, not the last to
    /// end: an older connection may see its end after a newer one's.
    pub receiver_ended: AtomicU64,
    pins_lock: Mutex<()>,
    /// DR site: refuse the primary's deletion of snapshots (R25).
    pub protect_snapshots: AtomicBool,
    /// DR site: deletions refused since start (snapshot name, seq, time).
    pub refusals: Mutex<Vec<(String, u64, u64)>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

/// The group's volumes and snapshots as NBD sees them (name, id, size,
/// writable), readable without the group lock. The NBD reader checks every
/// request's range against it and the handshake finds and lists exports
/// with it, so neither waits behind a writer that holds the lock (one stuck
/// on a stalled disk holds it for as long as the stall lasts, and a reader
/// waiting there holds a runtime worker with it). `Inner::apply` publishes
/// it after every record that can change a map's name, size or kind (and
/// `from_parts` once at open); the data path checks each range again under
/// the lock, so a request racing a resize gets the lock's answer.
#[derive(Default)]
pub struct Catalog(parking_lot::RwLock<BTreeMap<u32, Listed>>);

/// One map in the `Catalog`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub id: u32,
    pub name: String,
    pub size: u64,
    pub writable: bool,
}

impl Catalog {
    /// What `volumes` now say, keyed by id as they are.
    pub fn of(volumes: &BTreeMap<u32, Volume>) -> BTreeMap<u32, Listed> {
        volumes.iter().map(|(&id, v)| (id, Listed { id, name: v.name.clone(), size: v.size, writable: v.writable() })).collect()
    }

    pub fn publish(&self, volumes: &BTreeMap<u32, Volume>) {
        let now = Self::of(volumes);
        let mut cur = self.0.write();
        if *cur != now {
            *cur = now;
        }
    }

    /// By id, as every NBD request asks (a lookup, not a scan: a group may
    /// hold thousands of snapshots).
    pub fn size(&self, id: u32) -> Option<u64> {
        self.0.read().get(&id).map(|l| l.size)
    }

    /// By name, as the handshake asks.
    pub fn find(&self, name: &str) -> Option<Listed> {
        self.0.read().values().find(|l| l.name == name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        self.0.read().values().map(|l| l.name.clone()).collect()
    }
}

#[derive(Default)]
pub struct GroupStats {
    pub gc_relocated_bytes: AtomicU64,
    pub gc_segments_freed: AtomicU64,
    pub checkpoints: AtomicU64,
    pub syncs: AtomicU64,
    /// Longest time a writer waited for the group lock since start, in microseconds.
    pub write_lock_wait_max_us: AtomicU64,
    /// NBD requests on a runtime worker whose log reads (a read, or an
    /// unaligned write's edge blocks) were not all in the page cache, and
    /// which went to the blocking pool (`Segment::read_at_nowait`).
    pub nbd_reads_off_worker: AtomicU64,
    /// NBD writes, zeroings and trims on a runtime worker that found every worker
    /// but one inside an append (`WORKER_APPENDS`), and which went to the
    /// blocking pool.
    pub nbd_appends_off_worker: AtomicU64,
}

const PINS_FILE: &str = "replicas.json";

/// `replicas.json`: what each DR site still needs from the log, and which
/// DR sites were in dirty-region mode (they get a full resync after a
/// restart, since the dirty sets live in memory).
#[derive(Serialize, Deserialize, Default)]
pub(crate) struct PinsFile {
    pub pins: BTreeMap<String, u64>,
    #[serde(default)]
    pub dirty: Vec<String>,
    /// `Inner::unverified`.
    #[serde(default)]
    pub unverified: BTreeMap<String, u64>,
}

pub(crate) fn load_pins(dir: &Path) -> Result<PinsFile> {
    let path = dir.join(PINS_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b).with_context(|| format!("{} is not valid", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PinsFile::default()),
        Err(e) => Err(e).with_context(|| format!("failed to read {}", path.display())),
    }
}

/// Where a write ended up: the log position after it (durable once the log
/// is durable up to there) and its sequence number (replicated once every
/// DR site acknowledged it).
#[derive(Clone, Copy, Debug)]
pub struct Appended {
    pub end: LogPos,
    pub seq: u64,
}

/// What a caller needs to know about a volume.
#[derive(Clone, Debug, Serialize)]
pub struct VolumeInfo {
    pub id: u32,
    pub name: String,
    pub size: u64,
    pub mapped_bytes: u64,
    pub snapshot: bool,
    /// False for read-only snapshots.
    pub writable: bool,
    /// DR site: a snapshot kept against the primary's delete.
    pub retained: bool,
}

impl Inner {
    pub fn tail_pos(&self) -> LogPos {
        pos(self.tail.id, self.tail_off as u32)
    }

    pub fn volume_id(&self, name: &str) -> Option<u32> {
        self.volumes.values().find(|v| v.name == name).map(|v| v.id)
    }

    fn check_failed(&self) -> Result<(), IoError> {
        match &self.failed {
            Some(e) => Err(IoError::Failed(format!("group is failed after an I/O error: {e}"))),
            None => Ok(()),
        }
    }

    /// Sets block `block` of map `vol` to `e`, which is a hole, zeros, or
    /// a place just appended that no map points at yet; the caller counts
    /// such a place in `refs` and `distinct` (once per record). Returns
    /// whether the block was set to it.
    fn set_entry(&mut self, vol: u32, block: u64, e: Entry) -> bool {
        // One map shares with nobody: nothing to look up.
        let alone = self.volumes.len() == 1;
        let Some(v) = self.volumes.get_mut(&vol).filter(|v| v.covers(block)) else { return false };
        let old = v.map.set(block, e);
        if old == e {
            return false;
        }
        if cfg!(test) {
            assert!(!e.is_data() || !self.held_by_other(vol, block, e), "set_entry given a place another map holds");
        }
        if old.is_data() {
            self.drop_ref(vol, block, old, alone);
        }
        true
    }

    /// Map `vol` no longer points at `old` at block `b` (already changed):
    /// one reference less, and one distinct block less unless another map
    /// holds it there. A segment with no block held twice, or a group with
    /// one map, needs no asking.
    fn drop_ref(&mut self, vol: u32, b: u64, old: Entry, alone: bool) {
        let ask = !alone && self.shared_in(old.seg);
        self.add_refs(old.seg, -1);
        if !ask || !self.held_by_other(vol, b, old) {
            self.uncount(old.seg, 1);
        }
    }

    /// `n` more distinct blocks in segment `seg`.
    fn count(&mut self, seg: u32, n: u64) {
        *self.distinct.entry(seg).or_insert(0) += n;
    }

    /// Does some block of segment `seg` have more than one map pointing at
    /// it? (Or may it: while a dropped map's blocks there are being
    /// weighed, its count is over, and so not to be compared.)
    fn shared_in(&self, seg: u32) -> bool {
        self.weighing.segs.contains_key(&seg) || self.refs.get(&seg).copied().unwrap_or(0) > self.distinct_refs(seg)
    }

    fn add_refs(&mut self, seg: u32, n: i64) {
        let c = self.refs.entry(seg).or_insert(0);
        if cfg!(test) {
            assert!(n >= 0 || *c >= n.unsigned_abs(), "segment {seg}: {} references, dropping {}", *c, -n);
        }
        *c = c.saturating_add_signed(n);
        if *c == 0 {
            self.refs.remove(&seg);
        }
    }

    fn uncount(&mut self, seg: u32, n: u64) {
        let c = self.distinct.entry(seg).or_insert(0);
        // A count that would go below zero is a bug in this accounting
        // (GC's eagerness, never what it frees): loud in tests.
        if cfg!(test) {
            assert!(*c >= n, "segment {seg}: {} distinct blocks counted, dropping {n}", *c);
        }
        *c = c.saturating_sub(n);
        if *c == 0 {
            self.distinct.remove(&seg);
        }
    }

    /// Does a map other than `vol` have `e` at block `b`? (Maps share a
    /// block only at the same place: they are copies of one another.)
    /// Maps that point at nothing in `e`'s segment are passed over.
    fn held_by_other(&self, vol: u32, b: u64, e: Entry) -> bool {
        self.volumes.values().any(|v| v.id != vol && b < v.map.blocks() && v.map.seg_refs(e.seg) > 0 && v.map.get(b) == e)
    }

    /// Map `vol` was just added as, or replaced by, a copy of another map
    /// (still there): its references add to `refs`, and every block of it
    /// is shared, so `distinct` does not change.
    pub(super) fn count_copy(&mut self, vol: u32) {
        let Some(v) = self.volumes.get(&vol) else { return };
        let add: Vec<(u32, u64)> = v.map.seg_ref_counts().iter().map(|(s, n)| (*s, *n)).collect();
        for (seg, n) in add {
            self.add_refs(seg, n as i64);
        }
    }

    /// Before map `vol` is dropped or replaced: its blocks that no other
    /// map holds stop counting. A segment that no other map points at, or
    /// in which no block is held twice, is taken off whole, here. The
    /// map's blocks in segments with shared blocks must be asked about one
    /// by one (a walk of O(volume) at worst: ~4 ms per GiB written in
    /// random places), so that is left to `Group::settle_counts`, off the
    /// lock, on copies of the maps as they are now (copy-on-write clones:
    /// O(regions)). Until then those segments count over by exactly what
    /// the walk will find, because every change meanwhile is counted
    /// exactly against the maps as they are then.
    pub(super) fn forget_map(&mut self, vol: u32) {
        let Some(v) = self.volumes.get(&vol) else { return };
        let map = v.map.clone();
        self.forget(vol, map);
    }

    /// `forget_map` for `map`, which map `vol` held and holds no more (all
    /// of it, or the part a shrink cut off).
    fn forget(&mut self, vol: u32, map: crate::volume::map::BlockMap) {
        let mine: Vec<(u32, u64)> = map.seg_ref_counts().iter().map(|(s, n)| (*s, *n)).collect();
        let mut gone: HashMap<u32, u64> = HashMap::new();
        let mut ask = std::collections::HashSet::new();
        for &(seg, n) in &mine {
            let all = self.refs.get(&seg).copied().unwrap_or(0);
            if all > n && self.shared_in(seg) {
                ask.insert(seg);
            } else {
                gone.insert(seg, n);
            }
        }
        if !ask.is_empty() {
            // Only a map that points into a segment asked about can hold a
            // block there.
            let others: Vec<Volume> = self.volumes.values().filter(|w| w.id != vol && ask.iter().any(|s| w.map.seg_refs(*s) > 0)).cloned().collect();
            let w = Walk { what: Weigh::Dropped { map, others }, ask, gen: self.weighing.gen };
            if self.weighing.inline {
                // Replay at open: nobody waits for the lock, and queued
                // walks would keep a copy of every map per drop.
                let gone_shared = w.weigh();
                for (seg, n) in gone_shared {
                    *gone.entry(seg).or_insert(0) += n;
                }
            } else {
                for &seg in &w.ask {
                    *self.weighing.segs.entry(seg).or_insert(0) += 1;
                }
                self.weighing.walks.push(w);
            }
        }
        for (seg, n) in gone {
            self.uncount(seg, n);
        }
        for (seg, n) in mine {
            self.add_refs(seg, -(n as i64));
        }
    }

    /// The result of a walk taken by `Group::settle_counts`: its blocks
    /// that no other map held stop counting (unless the counts were made
    /// afresh since it was queued).
    fn finish_walk(&mut self, w: &Walk, gone: HashMap<u32, u64>) {
        if w.gen != self.weighing.gen {
            return;
        }
        for (seg, n) in gone {
            self.uncount(seg, n);
        }
        for seg in &w.ask {
            if let Some(c) = self.weighing.segs.get_mut(seg) {
                *c -= 1;
                if *c == 0 {
                    self.weighing.segs.remove(seg);
                }
            }
        }
    }

    /// Counts `refs` and `distinct` afresh from the maps (at open).
    pub(super) fn recount_distinct(&mut self) {
        let (refs, d) = count_maps(&self.volumes.values().collect::<Vec<_>>());
        self.distinct = d;
        self.refs = refs;
        // Exact now.
        self.weighing.restart();
    }

    /// After maps were replaced wholesale (a DR resync commit): `refs`
    /// afresh now (O(maps × segments)), and `distinct` at its upper bound,
    /// `refs`, until a walk of every map, off the lock, takes off the
    /// references past the first to each block (`Weigh::All`).
    pub(super) fn recount_later(&mut self) {
        if self.weighing.inline {
            return self.recount_distinct();
        }
        let maps: Vec<Volume> = self.volumes.values().cloned().collect();
        let refs = sum_refs(&maps.iter().collect::<Vec<_>>());
        self.weighing.restart();
        self.weighing.segs = refs.keys().map(|s| (*s, 1)).collect();
        let ask = refs.keys().copied().collect();
        self.distinct = refs.clone();
        self.refs = refs;
        self.weighing.walks.push(Walk { what: Weigh::All(maps), ask, gen: self.weighing.gen });
    }

    /// References to segment `seg` from all maps (volumes and snapshots):
    /// zero means no map needs it (what freeing a segment asks).
    pub fn live_refs(&self, seg: u32) -> u64 {
        self.volumes.values().map(|v| v.map.seg_refs(seg)).sum()
    }

    /// Distinct blocks of segment `seg` that some map needs: what cleaning
    /// it would copy.
    pub fn distinct_refs(&self, seg: u32) -> u64 {
        self.distinct.get(&seg).copied().unwrap_or(0)
    }

    /// The first map (by id) whose block `block` is exactly `e`: a GC
    /// relocation names it, and replay finds the old location through it.
    pub fn holder(&self, block: u64, e: Entry) -> Option<u32> {
        self.volumes.values().find(|v| block < v.map.blocks() && v.map.get(block) == e).map(|v| v.id)
    }

    /// A GC relocation of block `b` of map `vol` to `new`: every map that
    /// shares the old copy (snapshots, restored volumes) moves with it.
    fn relocate_entry(&mut self, vol: u32, b: u64, new: Entry) {
        let Some(old) = self.volumes.get(&vol).filter(|v| b < v.map.blocks()).map(|v| v.map.get(b)) else { return };
        if !old.is_data() {
            return;
        }
        if old == new {
            return;
        }
        let mut moved = 0;
        for v in self.volumes.values_mut() {
            if b < v.map.blocks() && v.map.get(b) == old {
                v.map.set(b, new);
                moved += 1;
            }
        }
        if moved > 0 {
            self.add_refs(old.seg, -moved);
            self.add_refs(new.seg, moved);
            self.uncount(old.seg, 1);
            self.count(new.seg, 1);
        }
    }

    /// Applies a record found at `at` to the in-memory state. Used for live
    /// writes, replay after a crash, and (later) by DR sites.
    pub fn apply(&mut self, h: &Header, at: LogPos, checked: &[u8], body: Option<&[u8]>) {
        self.apply_record(h, at, checked, body);
        if !matches!(h.kind, Kind::Write | Kind::Zero | Kind::Trim) {
            self.catalog.publish(&self.volumes);
        }
    }

    fn apply_record(&mut self, h: &Header, at: LogPos, checked: &[u8], body: Option<&[u8]>) {
        if h.flags & FLAG_RESYNC != 0 || h.kind == Kind::ResyncBegin {
            self.apply_resync(h, at, checked);
            return;
        }
        if h.flags & FLAG_RELOCATED == 0 && !(self.dirty.is_empty() && self.dirty_pending.is_empty()) {
            let vols = &self.volumes;
            let sizes = |id: u32| vols.get(&id).map(|v| v.size / BLOCK_BYTES).unwrap_or(0);
            let old_blocks = sizes(h.volume);
            for d in self.dirty.values_mut().chain(self.dirty_pending.values_mut()) {
                d.note(h, old_blocks, &sizes);
            }
        }
        if h.flags & FLAG_RELOCATED == 0 {
            if h.seq + 1 >= self.next_seq {
                self.last_ident = record::ident(h);
            }
            self.next_seq = self.next_seq.max(h.seq + 1);
            self.times.note(h.seq, h.timestamp_ns, at);
            let r = self.seg_seqs.entry(pos_seg(at)).or_insert((h.seq, h.seq));
            r.0 = r.0.min(h.seq);
            r.1 = r.1.max(h.seq);
        }
        self.epoch = self.epoch.max(h.epoch);
        let first = h.offset / BLOCK_BYTES;
        match h.kind {
            Kind::Write => {
                let relocated = h.flags & FLAG_RELOCATED != 0;
                let mut set = 0;
                for i in 0..h.blocks() {
                    let off = pos_off(at) as u64 + h.block_payload_offset(i);
                    let e = Entry { seg: pos_seg(at), off: off as u32, crc: record::crc_at(checked, i as usize) };
                    if relocated {
                        self.relocate_entry(h.volume, first + i as u64, e);
                    } else if self.set_entry(h.volume, first + i as u64, e) {
                        set += 1;
                    }
                }
                if set > 0 {
                    self.add_refs(pos_seg(at), set as i64);
                    self.count(pos_seg(at), set);
                }
            }
            Kind::Zero | Kind::Trim => {
                let e = if h.kind == Kind::Zero { Entry::ZERO } else { Entry::HOLE };
                for b in first..first + h.length as u64 / BLOCK_BYTES {
                    self.set_entry(h.volume, b, e);
                }
            }
            Kind::VolumeCreate => {
                let name = String::from_utf8_lossy(body.unwrap_or_default()).into_owned();
                self.forget_map(h.volume);
                self.volumes.insert(h.volume, Volume::new(h.volume, name, h.offset));
                self.next_volume_id = self.next_volume_id.max(h.volume + 1);
            }
            Kind::VolumeResize => {
                let new_blocks = h.offset.div_ceil(BLOCK_BYTES);
                // Blocks past a smaller end are dropped: each stops
                // counting unless another map holds it. They go as one
                // cut-off map, weighed as a dropped map is (off the lock
                // where blocks are shared), not block by block here.
                if let Some(v) = self.volumes.get_mut(&h.volume) {
                    let cut = v.map.split_off(new_blocks);
                    v.map.resize(new_blocks);
                    v.size = h.offset;
                    self.forget(h.volume, cut);
                }
            }
            Kind::VolumeDelete => self.apply_delete(h),
            Kind::SnapCreate => self.apply_snap_create(h, body.unwrap_or_default()),
            Kind::MapCopy => self.apply_map_copy(h),
            Kind::Protect => {
                self.protected.insert(h.volume);
            }
            Kind::ResyncCommit => self.commit_resync(h, body.unwrap_or_default()),
            Kind::ResyncBegin => {}
        }
    }

    /// Resync records go to the staging map, never to what the DR shows.
    fn apply_resync(&mut self, h: &Header, at: LogPos, checked: &[u8]) {
        if h.kind == Kind::ResyncBegin {
            self.staging = Some(Staging { blocks: BTreeMap::new(), need: h.offset, bytes: h.total_len() });
            return;
        }
        let Some(staging) = self.staging.as_mut() else { return };
        staging.bytes += h.total_len();
        let st = &mut staging.blocks;
        let first = h.offset / BLOCK_BYTES;
        match h.kind {
            Kind::Write => {
                for i in 0..h.blocks() {
                    let off = pos_off(at) as u64 + h.block_payload_offset(i);
                    st.insert((h.volume, first + i as u64), Entry { seg: pos_seg(at), off: off as u32, crc: record::crc_at(checked, i as usize) });
                }
            }
            Kind::Zero | Kind::Trim => {
                let e = if h.kind == Kind::Zero { Entry::ZERO } else { Entry::HOLE };
                for b in first..first + h.length as u64 / BLOCK_BYTES {
                    st.insert((h.volume, b), e);
                }
            }
            Kind::MapCopy => {
                // Blocks another map of this resync already staged.
                let Ok(c) = serde_json::from_slice::<resync::StagedCopy>(checked) else { return };
                let src = h.offset as u32;
                for b in c.first..c.first.saturating_add(c.count.min(crate::limits::VOLUME_BYTES_MAX / BLOCK_BYTES)) {
                    if let Some(e) = st.get(&(src, b)).copied() {
                        st.insert((h.volume, b), e);
                    }
                }
            }
            _ => {}
        }
    }

    /// Appends one record at the tail (rolling to a new segment if needed).
    /// Returns its position. On an I/O error the group is marked failed: a
    /// log that may have a hole cannot take further writes.
    pub fn append(&mut self, group: &Group, h: &mut Header, checked: &[u8], payload: &[u8]) -> Result<LogPos, IoError> {
        let mut raw = [0u8; HEADER_BYTES];
        // This site's own record: it says how far this log is durable.
        h.durable = group.durable_pos();
        h.encode(checked, &mut raw);
        let r = self.append_bytes(group, h, &[&raw, checked, payload]);
        // A record that was not written gives its sequence number back
        // (`new_header` took it, under this same lock): the next one must
        // follow the last written without a gap, or a DR would wait for
        // the missing number for ever. Whatever the error (a full disk, a
        // record too large to write); after one that fails the group it
        // does not matter. Relocated and local records reuse an existing
        // number and took none.
        if r.is_err() && h.flags & record::FLAG_RELOCATED == 0 && self.next_seq == h.seq.saturating_add(1) {
            self.next_seq = h.seq;
        }
        r
    }

    /// Appends the bytes of an already encoded record (`parts` concatenated
    /// are exactly the record, as shipped by replication).
    pub fn append_bytes(&mut self, group: &Group, h: &Header, parts: &[&[u8]]) -> Result<LogPos, IoError> {
        self.check_failed()?;
        let _io = group.io.start(iowatch::IoOp::Append);
        let total: u64 = parts.iter().map(|p| p.len() as u64).sum();
        debug_assert_eq!(h.total_len(), total);
        // A record no reader would take is never written (and so never
        // acknowledged): replay would cut the log at it as a torn tail.
        if h.body_len > record::BODY_BYTES_MAX {
            return Err(IoError::Failed(format!("a {:?} record of {} body bytes exceeds the {} a record may hold; not written", h.kind, h.body_len, record::BODY_BYTES_MAX)));
        }
        if h.seq == u64::MAX {
            return Err(IoError::Failed(format!("group {}: sequence numbers are exhausted; a {:?} record is not written", group.name, h.kind)));
        }
        if self.tail_off + total > SEGMENT_BYTES {
            let id = self.tail.id + 1;
            let seg = match Segment::create(&group.dir, id, group.id) {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    let msg = format!("{e:#}");
                    // A full file system leaves no new segment behind
                    // (`Segment::create` removes it), so a later append
                    // simply tries again.
                    if e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(crate::util::is_no_space)) {
                        return Err(self.no_space(group, msg, total + segment::SEGMENT_HEADER_BYTES));
                    }
                    return Err(self.fail(msg));
                }
            };
            self.segments.insert(id, seg.clone());
            self.unsynced.push(seg.clone());
            self.dir_dirty = true;
            self.tail = seg;
            self.tail_off = segment::SEGMENT_HEADER_BYTES;
        }
        let at = pos(self.tail.id, self.tail_off as u32);
        if let Err(e) = crate::log::pwritev_all(&self.tail.file, parts, self.tail_off) {
            let mut msg = format!("failed to append {total} bytes at offset {} of log segment {}: {e}", self.tail_off, self.tail.path.display());
            // A full file system wrote nothing usable: the tail stays where
            // it was, and whatever part of this record reached the file is
            // cut off: a later, shorter record would leave the rest of this
            // one's payload after it, which replay after a crash could
            // otherwise read on into (guest data shaped like a record).
            // Shrinking takes no space. Any other error may have left a
            // hole: the group fails.
            if crate::util::is_no_space(&e) {
                match self.tail.file.set_len(self.tail_off) {
                    Ok(()) => return Err(self.no_space(group, msg, total)),
                    Err(e2) => msg = format!("{msg}; and cutting the partial record off failed: {e2}"),
                }
            }
            tracing::error!("{msg}");
            return Err(self.fail(msg));
        }
        // The append that failed, or another like it, went in. Not a GC
        // relocation or a DR's local Protect record (flagged RELOCATED):
        // one of those fitting says nothing of a write, or of a resync.
        if h.flags & FLAG_RELOCATED == 0 {
            if let Some((since, _, _)) = self.out_of_space.take() {
                space_recovered(&group.name, since);
            }
        }
        self.tail_off += total;
        self.log_bytes_written += total;
        self.tail.len.store(self.tail_off, Ordering::Release);
        if !self.tail.unsynced.swap(true, Ordering::AcqRel) {
            self.unsynced.push(self.tail.clone());
        }
        group.tail_pos.store(self.tail_pos(), Ordering::Release);
        group.appended.notify_waiters();
        Ok(at)
    }

    /// Fails the group for good (an append error that may have left a
    /// hole) and returns the error for the caller.
    fn fail(&mut self, msg: String) -> IoError {
        self.failed = Some(msg.clone());
        IoError::Failed(msg)
    }

    /// Drops the staging of a resync that can never be committed (its
    /// connection ended, or the site restarted during it) and asks for a
    /// checkpoint, behind which GC frees its records. Before, they stayed
    /// until the next attempt's commit: a DR that filled up during a resync
    /// kept the failed attempt's records while the next one staged anew.
    fn abandon_staging(&mut self, group: &str, why: &str) {
        let Some(staging) = self.staging.take() else { return };
        tracing::info!(
            event = "resync-abandoned",
            "group {group}: a resync attempt {why} before its commit; its {} MiB of staged records are garbage now (the primary's next attempt starts afresh, and this site goes on showing its last consistent state)",
            staging.bytes.div_ceil(1 << 20)
        );
        self.checkpoint_asked = true;
    }

    /// After a replicated record found the file system full: if it is part
    /// of a resync, the site needs room for the whole of it, as the primary
    /// estimated at RESYNC_BEGIN, not just for this record. Until that much
    /// is free the site refuses its primary (`receive::has_room`), and the
    /// reason says how much: taking the stream again as soon as one record
    /// fits would have the primary begin the resync again and fill the disk
    /// again, over and over, each time sending what was staged for nothing.
    /// (The records already staged are given back when the attempt is
    /// dropped: `abandon_staging`.)
    /// Returns the reason to give, if it says more than the error.
    fn resync_needs_room(&mut self, h: &Header, reserve: u64) -> Option<String> {
        let (need, staged) = match (h.kind, &self.staging) {
            (Kind::ResyncBegin, _) => (h.offset, 0),
            (_, Some(s)) => (s.need, s.bytes),
            _ => (0, 0),
        };
        if need == 0 {
            return None;
        }
        // With the room resync data leaves for a checkpoint.
        let need = need.saturating_add(reserve);
        let o = self.out_of_space.as_mut().filter(|o| need > o.2)?;
        o.2 = need;
        o.1 = format!(
            "{}; the resync in progress may need up to {} MiB in all ({} MiB of it were staged: GC gives back what it can of that once the attempt is dropped)",
            o.1,
            need.div_ceil(1 << 20),
            staged.div_ceil(1 << 20)
        );
        Some(o.1.clone())
    }

    /// Records that an append found the file system full, says so (once
    /// a minute while it lasts), and returns the error for the caller.
    /// Within one spell the larger need stands, with its reason: a DR that
    /// needs room for a whole resync still does after a GC relocation of a
    /// few blocks fails too.
    fn no_space(&mut self, group: &Group, msg: String, needed: u64) -> IoError {
        match &mut self.out_of_space {
            Some(o) if o.2 > needed => {}
            Some(o) => (o.1, o.2) = (msg.clone(), needed),
            None => self.out_of_space = Some((crate::util::now_ns(), msg.clone(), needed)),
        }
        if let Some(n) = group.no_space_log.lock().unwrap_or_else(|p| p.into_inner()).admit() {
            tracing::warn!(event = "out-of-space", "group {}: {msg}; nothing was appended, writes fail with ENOSPC until there is space{}", group.name, crate::util::unlogged_note(n));
        }
        IoError::NoSpace(msg)
    }

    fn new_header(&mut self, kind: Kind, volume: u32, offset: u64, length: u32, body_len: u32) -> Header {
        let h = Header {
            kind,
            flags: 0,
            epoch: self.epoch,
            seq: self.next_seq,
            timestamp_ns: crate::util::now_ns(),
            volume,
            length,
            offset,
            body_len,
            crc: 0,
            durable: 0,
        };
        // Saturating: at u64::MAX the record is refused by `append_bytes`.
        self.next_seq = self.next_seq.saturating_add(1);
        h
    }

    pub fn log_bytes(&self) -> u64 {
        self.segments.values().map(|s| s.len()).sum()
    }

    /// Does some DR site still need a record in segment `seg`?
    pub fn pinned(&self, seg: u32) -> bool {
        let Some(min_pin) = self.pins.values().min() else { return false };
        self.seg_seqs.get(&seg).is_some_and(|(_, hi)| hi >= min_pin)
    }

    /// Bytes of log the maps need, each block once however many maps
    /// share it (before, a block shared by a volume and its snapshot
    /// counted once per map, and with a few snapshots GC waited for a log
    /// several times the data it held before cleaning).
    pub fn live_bytes(&self) -> u64 {
        self.distinct.values().sum::<u64>() * BLOCK_BYTES
    }
}

/// Maps dropped (deleted, restored over, refreshed, shrunk away) whose
/// blocks in segments with shared blocks are still to be weighed.
#[derive(Default)]
pub struct Weighing {
    walks: Vec<Walk>,
    /// Segments some queued or running walk will weigh (how many walks):
    /// their `distinct` count is over until it finishes.
    segs: HashMap<u32, u32>,
    /// Bumped when the counts are made afresh: walks of before are void.
    gen: u64,
    /// Walk at once, under the lock (replay at open).
    pub inline: bool,
}

impl Weighing {
    /// Nothing queued or under way.
    pub fn settled(&self) -> bool {
        self.walks.is_empty() && self.segs.is_empty()
    }

    /// The counts were made afresh: walks queued or under way are void.
    fn restart(&mut self) {
        self.walks.clear();
        self.segs.clear();
        self.gen += 1;
    }
}

/// A count to take off segments `ask`, to be found by a walk of copies of
/// maps as they were when it was queued.
struct Walk {
    what: Weigh,
    ask: std::collections::HashSet<u32>,
    gen: u64,
}

enum Weigh {
    /// A dropped map, with the maps that point into `ask` besides it.
    Dropped { map: crate::volume::map::BlockMap, others: Vec<Volume> },
    /// Every map, just after `distinct` was set to `refs` (its upper bound).
    All(Vec<Volume>),
}

impl Walk {
    /// Per segment: what its count is over by. For a dropped map, its
    /// blocks no other map held; after a recount, the references past
    /// the first to each block.
    fn weigh(&self) -> HashMap<u32, u64> {
        let mut over: HashMap<u32, u64> = HashMap::new();
        match &self.what {
            Weigh::Dropped { map, others } => {
                let others: Vec<&Volume> = others.iter().collect();
                walk_unshared(map, &others, |_, e, held| {
                    if !held && self.ask.contains(&e.seg) {
                        *over.entry(e.seg).or_insert(0) += 1;
                    }
                });
            }
            Weigh::All(maps) => {
                let (refs, distinct) = count_maps(&maps.iter().collect::<Vec<_>>());
                for (seg, n) in refs {
                    let extra = n.saturating_sub(distinct.get(&seg).copied().unwrap_or(0));
                    if extra > 0 {
                        over.insert(seg, extra);
                    }
                }
            }
        }
        over
    }
}

/// (references, distinct blocks) per segment of `maps`: each map's blocks
/// that no map before it holds at the same place count as distinct.
fn count_maps(maps: &[&Volume]) -> (HashMap<u32, u64>, HashMap<u32, u64>) {
    let mut d: HashMap<u32, u64> = HashMap::new();
    for (i, v) in maps.iter().enumerate() {
        walk_unshared(&v.map, &maps[..i], |_, e, held| {
            if !held {
                *d.entry(e.seg).or_insert(0) += 1;
            }
        });
    }
    (sum_refs(maps), d)
}

/// References per segment of all of `maps` together.
fn sum_refs(maps: &[&Volume]) -> HashMap<u32, u64> {
    let mut refs: HashMap<u32, u64> = HashMap::new();
    for v in maps {
        for (seg, n) in v.map.seg_ref_counts() {
            *refs.entry(*seg).or_insert(0) += n;
        }
    }
    refs
}

/// Calls `f(block, entry, held)` for each data block of `map`, `held`
/// telling whether one of `others` has the same entry at the same place.
/// A region `map` shares by pointer with one of them, or a chunk one of
/// them holds identically, is skipped whole (every block there is held).
/// The others' chunks are compared as arrays, not looked up block by block.
fn walk_unshared(map: &crate::volume::map::BlockMap, others: &[&Volume], mut f: impl FnMut(u64, Entry, bool)) {
    use crate::volume::map::{CHUNK_BLOCKS, GROUP_CHUNKS};
    for r in 0..map.regions() {
        if !map.region_present(r) || others.iter().any(|w| w.map.region_present(r) && map.region_shared(&w.map, r)) {
            continue;
        }
        // Only maps that have this region at all can hold a block of it.
        let near: Vec<&&Volume> = others.iter().filter(|w| w.map.region_present(r)).collect();
        for c in r * GROUP_CHUNKS..(r + 1) * GROUP_CHUNKS {
            let from = (c * CHUNK_BLOCKS) as u64;
            if from >= map.blocks() {
                break;
            }
            if map.chunk_is_empty(from) || near.iter().any(|w| map.chunk_same(&w.map, c)) {
                continue;
            }
            let mine = map.chunk_entries(c);
            let theirs: Vec<[Entry; CHUNK_BLOCKS]> = near.iter().map(|w| w.map.chunk_entries(c)).collect();
            for (i, e) in mine.iter().enumerate() {
                if e.is_data() {
                    f(from + i as u64, *e, theirs.iter().any(|t| t[i] == *e));
                }
            }
        }
    }
}

fn space_recovered(group: &str, since: u64) {
    let secs = crate::util::now_ns().saturating_sub(since) as f64 / 1e9;
    tracing::info!(event = "space-recovered", "group {group}: the log's file system has space again ({secs:.1} s after an append found it full)");
}

impl Group {
    fn lock(&self) -> InnerGuard<'_> {
        let t = std::time::Instant::now();
        let g = self.inner.lock();
        let us = t.elapsed().as_micros() as u64;
        self.stats.write_lock_wait_max_us.fetch_max(us, Ordering::Relaxed);
        g
    }

    /// Opens (or creates, with a new id and async mode) the group stored in `dir`.
    pub fn open(dir: &Path, name: &str) -> Result<Arc<Group>> {
        open::open(dir, name, &open::Create { id: None, mode: "async".into(), written_here: true })
    }

    /// Opens the group in `dir`, creating it as described if it does not exist.
    pub fn open_or_create(dir: &Path, name: &str, create: &open::Create) -> Result<Arc<Group>> {
        open::open(dir, name, create)
    }

    /// The group over an opened log, with its sync and maintenance threads
    /// started (an error if the system has no thread left to give).
    /// `durable`: how far the log is known durable (the open's replay
    /// start: what the process before left may be in the page cache only),
    /// set before any thread can append with it as its mark.
    pub(crate) fn from_parts(meta: &GroupMeta, dir: PathBuf, inner: Inner, durable: LogPos) -> Result<Arc<Group>> {
        let tail = inner.tail_pos();
        let (durable_tx, _) = watch::channel((durable.min(tail), false));
        inner.catalog.publish(&inner.volumes);
        let catalog = inner.catalog.clone();
        let g = Arc::new(Group {
            catalog,
            name: meta.name.clone(),
            id: meta.id,
            dir,
            inner: parking_lot::Mutex::new(inner),
            no_space_log: Mutex::new(crate::util::LogThrottle::new(std::time::Duration::from_secs(60))),
            sync_lock: Mutex::new(()),
            checkpoint_lock: Mutex::new(()),
            sync_req: Mutex::new((0, false)),
            sync_cv: Condvar::new(),
            pool_calls: tokio::sync::Semaphore::new(crate::limits::NBD_POOL_CALLS_PER_GROUP),
            durable_tx,
            tail_pos: AtomicU64::new(tail),
            stop: AtomicBool::new(false),
            stats: GroupStats::default(),
            io: iowatch::IoWatch::default(),
            #[cfg(test)]
            stall_syncs: AtomicBool::new(false),
            #[cfg(test)]
            hold_walks: AtomicBool::new(false),
            #[cfg(test)]
            busy_after: AtomicU64::new(0),
            settle_lock: Mutex::new(()),
            appended: tokio::sync::Notify::new(),
            replication: crate::replicate::GroupReplication::new(&meta.mode),
            log_cap: AtomicU64::new(crate::limits::REPL_LOG_CAP_BYTES_DEFAULT),
            receiver_gen: AtomicU64::new(0),
            receiver_ended: AtomicU64::new(0),
            pins_lock: Mutex::new(()),
            protect_snapshots: AtomicBool::new(false),
            refusals: Mutex::new(Vec::new()),
            threads: Mutex::new(Vec::new()),
        });
        #[cfg(test)]
        if crate::util::sim_active() {
            return Ok(g);
        }
        let g2 = g.clone();
        let t1 = std::thread::Builder::new()
            .name(format!("sync-{}", meta.name))
            .spawn(move || g2.sync_thread())
            .with_context(|| format!("group {}: failed to start its log sync thread", meta.name))?;
        g.threads.lock().unwrap().push(t1);
        let g3 = g.clone();
        match std::thread::Builder::new().name(format!("maint-{}", meta.name)).spawn(move || g3.maintenance_thread()) {
            Ok(t2) => g.threads.lock().unwrap().push(t2),
            Err(e) => {
                // The sync thread holds the group: stop it, or it never drops.
                g.abandon();
                return Err(e).with_context(|| format!("group {}: failed to start its maintenance thread", meta.name));
            }
        }
        Ok(g)
    }

    // ---- volumes -------------------------------------------------------

    /// Volumes (not snapshots).
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        self.maps().into_iter().filter(|v| !v.snapshot).collect()
    }

    /// Volumes and snapshots: everything that can be exported.
    pub fn maps(&self) -> Vec<VolumeInfo> {
        let inner = self.lock();
        inner
            .volumes
            .values()
            .map(|v| VolumeInfo {
                id: v.id,
                name: v.name.clone(),
                size: v.size,
                mapped_bytes: v.map.mapped() * BLOCK_BYTES,
                snapshot: v.snap.is_some(),
                writable: v.writable(),
                retained: v.snap.as_ref().is_some_and(|s| s.retained),
            })
            .collect()
    }

    /// A volume or snapshot by name.
    pub fn volume(&self, name: &str) -> Option<VolumeInfo> {
        self.maps().into_iter().find(|v| v.name == name)
    }

    /// A volume's size, without waiting for the group lock (`Catalog`).
    pub fn volume_size(&self, id: u32) -> Option<u64> {
        self.catalog.size(id)
    }

    /// A volume or snapshot by name, without waiting for the group lock
    /// (`Catalog`): what the NBD handshake needs.
    pub fn listed(&self, name: &str) -> Option<Listed> {
        self.catalog.find(name)
    }

    /// Every volume and snapshot name, without waiting for the group lock.
    pub fn listed_names(&self) -> Vec<String> {
        self.catalog.names()
    }

    fn check_size(size: u64) -> Result<()> {
        crate::util::check_volume_size(size).map_err(anyhow::Error::msg)
    }

    /// Creates a volume; the operation is a record in the group's log and is
    /// durable when this returns.
    pub fn create_volume(&self, name: &str, size: u64) -> Result<u32> {
        crate::util::check_name("volume", name).map_err(|e| anyhow!(e))?;
        Self::check_size(size)?;
        let at = {
            let mut inner = self.lock();
            if inner.volume_id(name).is_some() {
                bail!("volume {name} already exists");
            }
            Self::check_map_count(&inner)?;
            let id = inner.next_volume_id;
            let mut h = inner.new_header(Kind::VolumeCreate, id, size, 0, name.len() as u32);
            let at = inner.append(self, &mut h, name.as_bytes(), &[])?;
            inner.apply(&h, at, name.as_bytes(), Some(name.as_bytes()));
            at
        };
        self.settle_counts();
        self.sync_to(at + 1)?;
        Ok(self.lock().volume_id(name).unwrap_or(0))
    }

    pub fn resize_volume(&self, name: &str, size: u64) -> Result<()> {
        Self::check_size(size)?;
        let at = {
            let mut inner = self.lock();
            let id = inner.volume_id(name).with_context(|| format!("volume {name} does not exist"))?;
            if !inner.volumes[&id].writable() {
                bail!("{name} is a read-only snapshot; it cannot be resized");
            }
            let mut h = inner.new_header(Kind::VolumeResize, id, size, 0, 0);
            let at = inner.append(self, &mut h, &[], &[])?;
            inner.apply(&h, at, &[], Some(&[]));
            at
        };
        // A shrink's cut-off blocks in shared segments, off the lock.
        self.settle_counts();
        self.sync_to(at + 1)
    }

    pub fn delete_volume(&self, name: &str) -> Result<()> {
        let at = {
            let mut inner = self.lock();
            let id = inner.volume_id(name).with_context(|| format!("volume {name} does not exist"))?;
            if inner.volumes[&id].snap.is_some() {
                bail!("{name} is a snapshot; use snapshot delete");
            }
            let snaps: Vec<&str> = inner.volumes.values().filter(|v| v.snap.is_some() && v.root_name() == name).map(|v| v.name.as_str()).collect();
            if !snaps.is_empty() {
                bail!("volume {name} has snapshots ({}); delete them first", snaps.join(", "));
            }
            let mut h = inner.new_header(Kind::VolumeDelete, id, 0, 0, 0);
            let at = inner.append(self, &mut h, &[], &[])?;
            inner.apply(&h, at, &[], Some(&[]));
            at
        };
        self.settle_counts();
        self.sync_to(at + 1)
    }

    // ---- replication support -------------------------------------------

    /// Keeps records with seq >= `seq` in the log for `peer` (a DR site).
    pub fn set_pin(&self, peer: &str, seq: u64) {
        self.lock_read().pins.insert(peer.to_string(), seq);
    }

    /// Persists the pins and the peers in dirty-region mode (`replicas.json`)
    /// so that after a restart GC keeps what each DR site needs before its
    /// sender reconnects, and a peer that was in dirty mode gets a full resync.
    pub fn save_pins(&self) -> Result<()> {
        // Serialized, with the snapshot taken inside: the file never goes
        // back to an older state.
        let _g = self.pins_lock.lock().unwrap_or_else(|p| p.into_inner());
        let state = {
            let inner = self.lock_read();
            PinsFile { pins: inner.pins.clone(), dirty: inner.dirty.keys().cloned().collect(), unverified: inner.unverified.clone() }
        };
        let _io = self.io.start(iowatch::IoOp::Pins);
        crate::crashsafe::write_file(&self.dir.join(PINS_FILE), &serde_json::to_vec_pretty(&state)?)
    }

    /// `save_pins` off the async reactor, on a blocking-pool thread brought
    /// to nice `nice` (the calling replication thread's: the pool thread
    /// may have inherited another); failures are logged (the previous
    /// file stays, which only keeps more log than needed).
    pub async fn save_pins_async(self: &Arc<Self>, nice: i32) {
        let g = self.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || {
            crate::replicate::priority::match_this_thread(nice);
            g.save_pins()
        })
        .await
        {
            tracing::warn!("group {}: failed to save replication pins: {e:#}", self.name);
        }
    }

    /// `Inner::unverified` for `peer`.
    pub fn unverified_from(&self, peer: &str) -> Option<u64> {
        self.lock_read().unverified.get(peer).copied()
    }

    /// `peer`'s history was checked against this primary's (or replaced by
    /// a full resync): nothing it holds is suspect any more.
    pub fn mark_verified(&self, peer: &str) {
        self.lock_read().unverified.remove(peer);
    }

    pub fn remove_pin(&self, peer: &str) {
        self.lock_read().pins.remove(peer);
    }

    pub fn segment(&self, id: u32) -> Option<Arc<Segment>> {
        self.lock_read().segments.get(&id).cloned()
    }

    /// The tail and the last seq, read together: waiting for the tail to
    /// be durable covers the seq (read apart, another appender could slip
    /// a record in between).
    pub fn tail_and_last_seq(&self) -> (LogPos, u64) {
        let inner = self.lock_read();
        (inner.tail_pos(), inner.next_seq.saturating_sub(1))
    }

    /// The last seq and the identity of its record (`Inner::last_ident`),
    /// read together; found in the log if a version 2 checkpoint left it
    /// unknown.
    pub fn last_seq_ident(&self) -> (u64, Option<u32>) {
        let (last, ident) = {
            let inner = self.lock_read();
            (inner.next_seq.saturating_sub(1), inner.last_ident)
        };
        match ident {
            Some(c) => (last, Some(c)),
            None => match self.record_ident(last) {
                Ok(i) => (last, i),
                Err(e) => {
                    tracing::warn!("group {}: cannot read the record at seq {last} to name it: {e:#}", self.name);
                    (last, None)
                }
            },
        }
    }

    /// The identity of this site's record at `seq` (as `Inner::last_ident`
    /// defines it), if the log still holds that record. The newest is
    /// known without I/O; an older one costs a scan of its segment.
    pub fn record_ident(&self, seq: u64) -> Result<Option<u32>> {
        {
            let inner = self.lock_read();
            if seq == 0 || seq >= inner.next_seq {
                return Ok(None);
            }
            if seq + 1 == inner.next_seq && inner.last_ident.is_some() {
                return Ok(inner.last_ident);
            }
        }
        Ok(self.record_header(seq)?.and_then(|(h, _)| record::ident(&h)))
    }

    /// The header and position of original record `seq` (not a relocated
    /// copy, not part of a resync), read from the log; `None` if the log no
    /// longer holds it.
    pub fn record_header(&self, seq: u64) -> Result<Option<(Header, LogPos)>> {
        // The segment holding `seq` (or a later one, where it is not found).
        let Some(seg) = self.locate_seq(seq).and_then(|at| self.segment(pos_seg(at))) else { return Ok(None) };
        let mut found = None;
        segment::scan(&seg, 0, false, |r, _| {
            let h = &r.header;
            if h.seq == seq && h.flags & (FLAG_RELOCATED | FLAG_RESYNC) == 0 && h.kind != Kind::ResyncBegin {
                found = Some((*h, pos(seg.id, r.off)));
            }
            Ok(())
        })?;
        Ok(found)
    }

    /// When and where write `seq` was made: a sample at or before it, to
    /// within `times::MIN_GAP_NS` for recent ones (never later: see
    /// `times`); `None` if unknown.
    pub fn written_at(&self, seq: u64) -> Option<times::Sample> {
        self.lock_read().times.sample_for(seq)
    }

    /// Makes sure `written_at(seq)` answers for `seq` itself, not for a later
    /// record: if `seq` is older than every sample (from before the replay
    /// start of the last open), its header is read from the log, where it
    /// still is. For a DR site whose lag counts from `seq`: at open (its pin)
    /// and when it names its last record at HELLO. A segment scan, once.
    pub fn sample_from_log(&self, seq: u64) {
        if seq == 0 || seq > self.last_seq() || self.written_at(seq).is_some_and(|s| s.seq <= seq) {
            return;
        }
        match self.record_header(seq) {
            Ok(Some((h, at))) => self.lock_read().times.note_older(seq, h.timestamp_ns, at),
            Ok(None) => {}
            Err(e) => tracing::warn!("group {}: reading record {seq} for its write time: {e:#}", self.name),
        }
    }

    /// Every DR site holds everything up to `seq`: the write times before it
    /// are no longer needed.
    pub fn trim_written_at(&self, seq: u64) {
        self.lock_read().times.trim_below(seq);
    }

    /// The first segment with an id above `id`.
    pub fn next_segment(&self, id: u32) -> Option<Arc<Segment>> {
        self.lock_read().segments.range(id + 1..).next().map(|(_, s)| s.clone())
    }

    /// Where to start reading to find record `seq`: the start of the segment
    /// holding it, the tail if it is not written yet, or `None` if the log no
    /// longer holds it (a DR site that far behind needs a resync).
    pub fn locate_seq(&self, seq: u64) -> Option<LogPos> {
        let inner = self.lock_read();
        if seq >= inner.next_seq {
            return Some(inner.tail_pos());
        }
        let first = inner.seg_seqs.values().map(|r| r.0).min()?;
        if seq < first {
            return None;
        }
        inner
            .seg_seqs
            .iter()
            .find(|(_, (lo, hi))| *lo <= seq && seq <= *hi)
            .or_else(|| inner.seg_seqs.iter().find(|(_, (lo, _))| *lo > seq))
            .map(|(id, _)| pos(*id, segment::SEGMENT_HEADER_BYTES as u32))
    }

    /// Log bytes from `at` to the tail (what a sender still has to read).
    pub fn bytes_after(&self, at: LogPos) -> u64 {
        let inner = self.lock_read();
        let mut n = 0;
        for (id, s) in inner.segments.range(pos_seg(at)..) {
            let len = if *id == inner.tail.id { inner.tail_off } else { s.len() };
            n += if *id == pos_seg(at) { len.saturating_sub(pos_off(at) as u64) } else { len };
        }
        n
    }

    /// Persists a new replication mode in `group.json` and applies it.
    pub fn set_mode(&self, mode: crate::replicate::Mode) -> Result<()> {
        let path = self.dir.join("group.json");
        let mut meta: GroupMeta = serde_json::from_slice(&std::fs::read(&path)?).with_context(|| format!("{} is not valid group metadata", path.display()))?;
        meta.mode = mode.as_str().to_string();
        crate::crashsafe::write_file(&path, &serde_json::to_vec_pretty(&meta)?)?;
        self.replication.set_mode(mode);
        Ok(())
    }

    /// Lowest sequence number the log still holds.
    pub fn oldest_seq(&self) -> Option<u64> {
        self.lock_read().seg_seqs.values().map(|r| r.0).min()
    }

    /// Appends a record received from the primary, byte for byte, after
    /// checking every checksum and that it is the next in sequence.
    pub fn append_replicated(&self, raw: &[u8], gen: u64) -> Result<Option<(LogPos, Header)>, String> {
        let hdr: [u8; HEADER_BYTES] = raw.get(..HEADER_BYTES).and_then(|b| b.try_into().ok()).ok_or("record shorter than a header")?;
        let h = Header::decode(&hdr).map_err(|e| format!("bad record: {e}"))?;
        if h.total_len() != raw.len() as u64 {
            return Err(format!("record seq {} length {} does not match its header ({})", h.seq, raw.len(), h.total_len()));
        }
        let checked = &raw[HEADER_BYTES..HEADER_BYTES + h.checked_body_len()];
        h.verify(&hdr, checked).map_err(|e| format!("record seq {}: {e}", h.seq))?;
        let body = &raw[HEADER_BYTES..];
        snapshot::check_body(&h, body)?;
        if h.kind == Kind::ResyncBegin && h.offset > 0 {
            self.warn_if_resync_may_not_fit(h.offset);
        }
        // Resync data leaves room for the checkpoint that gives it back
        // should the attempt fail (statvfs off the lock; this connection is
        // the only one appending).
        let resync = h.flags & FLAG_RESYNC != 0 || matches!(h.kind, Kind::ResyncBegin | Kind::ResyncCommit);
        let reserve = if resync { self.resync_reserve() } else { 0 };
        let room = if h.flags & FLAG_RESYNC != 0 { crate::util::free_bytes(&self.dir).ok() } else { None };
        if h.kind == Kind::Write {
            let payload = &raw[HEADER_BYTES + checked.len()..];
            for (i, b) in payload.chunks(BLOCK_BYTES as usize).enumerate() {
                if crate::crc::crc32c(b) != record::crc_at(checked, i) {
                    return Err(format!("record seq {}: block {i} checksum mismatch", h.seq));
                }
            }
        }
        let mut inner = self.lock();
        let view = crate::replicate::decide::ReceiverView {
            next_seq: inner.next_seq,
            epoch: inner.epoch,
            staging: inner.staging.is_some(),
            current_gen: self.receiver_gen.load(Ordering::Acquire),
            conn_gen: gen,
        };
        match crate::replicate::decide::receive_verdict(&view, &h) {
            crate::replicate::decide::Verdict::Append => {}
            crate::replicate::decide::Verdict::Duplicate => return Ok(None),
            crate::replicate::decide::Verdict::Reject(reason) => return Err(reason),
        }
        let refused = match h.kind {
            Kind::VolumeDelete | Kind::ResyncCommit => self.protect_before(&mut inner, &h, body)?,
            _ => Vec::new(),
        };
        if let Some(free) = room.filter(|&free| inner.staging.is_some() && free < raw.len() as u64 + reserve) {
            let msg = format!(
                "no space left for resync data: {} KiB free, and {} KiB are kept for the checkpoint that gives back a failed resync's space",
                free >> 10,
                reserve >> 10
            );
            let _ = inner.no_space(self, msg.clone(), raw.len() as u64 + reserve);
            return Err(inner.resync_needs_room(&h, reserve).unwrap_or(msg));
        }
        let at = match inner.append_bytes(self, &h, &[raw]) {
            Ok(at) => at,
            Err(e) => {
                let said = match e {
                    IoError::NoSpace(_) => inner.resync_needs_room(&h, reserve),
                    _ => None,
                };
                return Err(said.unwrap_or_else(|| e.to_string()));
            }
        };
        inner.apply(&h, at, checked, Some(body));
        let end = inner.tail_pos();
        drop(inner);
        // A walk queued by this record (a snapshot deleted, a resync
        // commit) is left to the maintenance thread (next round, within
        // `MAINTENANCE_INTERVAL_MS`): on this thread it would hold up the
        // records behind it, and with them a sync primary's writes.
        for name in refused {
            tracing::warn!(event = "snapshot-delete-refused", "group {}: the primary deleted snapshot {name} (seq {}); protect_snapshots keeps this site's copy", self.name, h.seq);
            self.refusals.lock().unwrap_or_else(|p| p.into_inner()).push((name, h.seq, h.timestamp_ns));
        }
        Ok(Some((end, h)))
    }

    // ---- data path -----------------------------------------------------

    fn check_range(inner: &Inner, vol: u32, offset: u64, len: u64) -> Result<u64, IoError> {
        let v = inner.volumes.get(&vol).ok_or(IoError::VolumeGone(vol))?;
        match offset.checked_add(len) {
            Some(end) if end <= v.size => Ok(v.size),
            _ => Err(IoError::OutOfRange { offset, len, size: v.size }),
        }
    }

    /// `check_range`, and the map must take writes (not a read-only snapshot).
    fn check_write(inner: &Inner, vol: u32, offset: u64, len: u64) -> Result<u64, IoError> {
        let size = Self::check_range(inner, vol, offset, len)?;
        match inner.volumes.get(&vol) {
            Some(v) if !v.writable() => Err(IoError::ReadOnly(v.name.clone())),
            _ => Ok(size),
        }
    }

    /// Writes `data` at `offset`. Returns the log position after the record:
    /// once that position is durable, the write is.
    pub fn write(&self, vol: u32, offset: u64, data: &[u8]) -> Result<Appended, IoError> {
        self.write_as(Wait::Forever, vol, offset, data)
    }

    /// `write`, waiting as `wait` says. With `Wait::Briefly`: unless the
    /// group lock is had within `NBD_LOCK_WAIT_US`, an unaligned write's
    /// edge blocks are in the page cache, and a worker may append
    /// (`WORKER_APPENDS`), `IoError::Busy` and nothing is written.
    pub fn write_as(&self, wait: Wait, vol: u32, offset: u64, data: &[u8]) -> Result<Appended, IoError> {
        if data.is_empty() {
            let inner = self.lock_as(wait)?;
            Self::check_write(&inner, vol, offset, 0)?;
            return Ok(Appended { end: inner.tail_pos(), seq: inner.next_seq - 1 });
        }
        let len = data.len() as u64;
        let aligned = offset.is_multiple_of(BLOCK_BYTES) && len.is_multiple_of(BLOCK_BYTES);
        if aligned {
            // Checksums outside the lock: the common case holds the lock only
            // for the append itself.
            let crcs = record::block_crcs(data);
            let mut inner = self.lock_as(wait)?;
            Self::check_write(&inner, vol, offset, len)?;
            let _place = self.worker_append(wait)?;
            let mut h = inner.new_header(Kind::Write, vol, offset, len as u32, (crcs.len() + data.len()) as u32);
            let at = inner.append(self, &mut h, &crcs, data)?;
            inner.apply(&h, at, &crcs, None);
            return Ok(Appended { end: inner.tail_pos(), seq: h.seq });
        }
        // Unaligned: widen to whole blocks by reading the edge blocks, under
        // the lock so that a concurrent write to the same block cannot interleave.
        let start = offset / BLOCK_BYTES * BLOCK_BYTES;
        let end = (offset + len).div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        let mut buf = vec![0u8; (end - start) as usize];
        let mut inner = self.lock_as(wait)?;
        let size = Self::check_write(&inner, vol, offset, len)?;
        if end > size {
            // A volume size is always block aligned, so this cannot happen.
            return Err(IoError::OutOfRange { offset, len, size });
        }
        if offset != start {
            self.read_locked(wait, &inner, vol, start, &mut buf[..BLOCK_BYTES as usize])?;
        }
        if offset + len != end && (end - BLOCK_BYTES > start || offset == start) {
            let n = buf.len();
            self.read_locked(wait, &inner, vol, end - BLOCK_BYTES, &mut buf[n - BLOCK_BYTES as usize..])?;
        }
        buf[(offset - start) as usize..(offset - start + len) as usize].copy_from_slice(data);
        let crcs = record::block_crcs(&buf);
        let _place = self.worker_append(wait)?;
        let mut h = inner.new_header(Kind::Write, vol, start, buf.len() as u32, (crcs.len() + buf.len()) as u32);
        let at = inner.append(self, &mut h, &crcs, &buf)?;
        inner.apply(&h, at, &crcs, None);
        Ok(Appended { end: inner.tail_pos(), seq: h.seq })
    }

    /// Zeroes a range. With `keep_allocated` (NBD NO_HOLE) the blocks read as
    /// zeros and stay allocated; otherwise they become holes. Partial blocks
    /// at the edges are written as zeros.
    pub fn zero(&self, vol: u32, offset: u64, len: u64, keep_allocated: bool) -> Result<Appended, IoError> {
        self.zero_as(Wait::Forever, vol, offset, len, keep_allocated)
    }

    /// `zero`, waiting as `wait` says. With `Wait::Briefly`: unless the
    /// group lock is had within `NBD_LOCK_WAIT_US` at each of its steps (and
    /// an unaligned edge's read finds the page cache, and a worker may
    /// append: `WORKER_APPENDS`), `IoError::Busy`, with the steps before it
    /// done. Zeroing is idempotent, so the caller does it all again.
    pub fn zero_as(&self, wait: Wait, vol: u32, offset: u64, len: u64, keep_allocated: bool) -> Result<Appended, IoError> {
        {
            let inner = self.lock_as(wait)?;
            Self::check_write(&inner, vol, offset, len)?;
        }
        let end = offset + len;
        let first_full = offset.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
        let last_full = end / BLOCK_BYTES * BLOCK_BYTES;
        let mut at = Appended { end: self.tail_pos.load(Ordering::Acquire), seq: 0 };
        if first_full >= last_full {
            // No whole block inside: write zeros.
            return self.write_as(wait, vol, offset, &vec![0u8; len as usize]);
        }
        if offset < first_full {
            at = self.write_as(wait, vol, offset, &vec![0u8; (first_full - offset) as usize])?;
        }
        // Whole blocks: one record per 2 GiB (the length field is 32 bits).
        let mut o = first_full;
        while o < last_full {
            let n = (last_full - o).min(1 << 31);
            let mut inner = self.lock_as(wait)?;
            Self::check_write(&inner, vol, o, n)?;
            let kind = if keep_allocated { Kind::Zero } else { Kind::Trim };
            let _place = self.worker_append(wait)?;
            let mut h = inner.new_header(kind, vol, o, n as u32, 0);
            let p = inner.append(self, &mut h, &[], &[])?;
            inner.apply(&h, p, &[], Some(&[]));
            at = Appended { end: inner.tail_pos(), seq: h.seq };
            o += n;
        }
        if end > last_full {
            at = self.write_as(wait, vol, last_full, &vec![0u8; (end - last_full) as usize])?;
        }
        Ok(at)
    }

    /// Reads `buf.len()` bytes at `offset`. Every block read is checked
    /// against the CRC in the map; a mismatch names the file and offset.
    pub fn read(&self, vol: u32, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        self.read_as(Wait::Forever, vol, offset, buf)
    }

    /// `read`, waiting as `wait` says. With `Wait::Briefly`: unless the
    /// group lock is had within `NBD_LOCK_WAIT_US` and all of the data is in
    /// the page cache (`read_entries`), `IoError::Busy`.
    pub fn read_as(&self, wait: Wait, vol: u32, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let (entries, segs) = {
            let inner = self.lock_as(wait)?;
            Self::check_range(&inner, vol, offset, buf.len() as u64)?;
            Self::lookup(&inner, vol, offset, buf.len() as u64)
        };
        self.read_entries(wait, vol, offset, buf, &entries, &segs)
    }

    /// Could the group's lock be had within `limit`? Polled, and let go at
    /// once. Status and metrics ask before they read a group: a writer
    /// holds the lock through its append, so a disk that stalls an append
    /// holds every reader of the lock with it (ARCHITECTURE.md "A stalled
    /// disk is reported, not silent").
    pub fn answers_within(&self, limit: std::time::Duration) -> bool {
        // An append stuck for the whole limit holds the lock: no use waiting.
        if self.io.pending(iowatch::IoOp::Append).is_some_and(|p| p.seconds >= limit.as_secs_f64()) {
            return self.inner.try_lock().is_some();
        }
        let deadline = std::time::Instant::now() + limit;
        loop {
            if self.inner.try_lock().is_some() {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    /// For an append with `Wait::Briefly` (on a runtime worker): a place
    /// in `WORKER_APPENDS`, or `Busy` when every worker but one is already
    /// inside an append. Counted in `nbd_appends_off_worker`.
    fn worker_append(&self, wait: Wait) -> Result<Option<AppendPlace<'static>>, IoError> {
        match wait {
            Wait::Forever => Ok(None),
            Wait::Briefly => match WORKER_APPENDS.enter() {
                Ok(p) => Ok(Some(p)),
                Err(e) => {
                    self.stats.nbd_appends_off_worker.fetch_add(1, Ordering::Relaxed);
                    Err(e)
                }
            },
        }
    }

    /// The group lock, waited for as `wait` says.
    fn lock_as(&self, wait: Wait) -> Result<InnerGuard<'_>, IoError> {
        match wait {
            Wait::Forever => Ok(self.lock()),
            Wait::Briefly => {
                // Slow storage: a call goes where it may wait, without
                // taking a worker's time first.
                if self.io.holds_up_calls() {
                    return Err(IoError::Busy);
                }
                #[cfg(test)]
                if self.busy_after.load(Ordering::Relaxed) > 0 && self.busy_after.fetch_sub(1, Ordering::Relaxed) == 1 {
                    return Err(IoError::Busy);
                }
                let t = std::time::Instant::now();
                let g = self.inner.try_lock_for(std::time::Duration::from_micros(crate::limits::NBD_LOCK_WAIT_US)).ok_or(IoError::Busy)?;
                self.stats.write_lock_wait_max_us.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                Ok(g)
            }
        }
    }

    fn lock_read(&self) -> InnerGuard<'_> {
        self.inner.lock()
    }

    /// A read under the lock: an unaligned write's edge blocks. With
    /// `Wait::Briefly`, from the page cache only (`Busy` before anything
    /// is written, as `read_entries` says).
    fn read_locked(&self, wait: Wait, inner: &Inner, vol: u32, offset: u64, buf: &mut [u8]) -> Result<(), IoError> {
        let (entries, segs) = Self::lookup(inner, vol, offset, buf.len() as u64);
        self.read_entries(wait, vol, offset, buf, &entries, &segs)
    }

    fn lookup(inner: &Inner, vol: u32, offset: u64, len: u64) -> (Vec<Entry>, HashMap<u32, Arc<Segment>>) {
        let v = &inner.volumes[&vol];
        let first = offset / BLOCK_BYTES;
        let last = (offset + len).div_ceil(BLOCK_BYTES);
        let mut entries = Vec::with_capacity((last - first) as usize);
        let mut segs = HashMap::new();
        for b in first..last {
            let e = v.map.get(b);
            if e.is_data() && !segs.contains_key(&e.seg) {
                if let Some(s) = inner.segments.get(&e.seg) {
                    segs.insert(e.seg, s.clone());
                }
            }
            entries.push(e);
        }
        (entries, segs)
    }

    /// With `Wait::Briefly` (a runtime worker) only from the page cache:
    /// `Busy` if any of it would wait for the disk, and the caller reads
    /// again on the blocking pool. Reads that may wait are watched
    /// (`IoOp::Read`), so a disk that stalls them shows in status.
    fn read_entries(&self, wait: Wait, vol: u32, offset: u64, buf: &mut [u8], entries: &[Entry], segs: &HashMap<u32, Arc<Segment>>) -> Result<(), IoError> {
        let first = offset / BLOCK_BYTES;
        let bb = BLOCK_BYTES as usize;
        let mut block = vec![0u8; 0];
        let mut i = 0;
        while i < entries.len() {
            let e = entries[i];
            // Byte range of this block that the caller wants.
            let bstart = (first + i as u64) * BLOCK_BYTES;
            if !e.is_data() {
                let (lo, hi) = clip(bstart, offset, buf.len());
                buf[lo..hi].fill(0);
                i += 1;
                continue;
            }
            // Extend a run of blocks stored contiguously in one segment.
            let mut n = 1;
            while i + n < entries.len() {
                let f = entries[i + n];
                if f.seg == e.seg && f.off as u64 == e.off as u64 + n as u64 * BLOCK_BYTES {
                    n += 1;
                } else {
                    break;
                }
            }
            let seg = segs.get(&e.seg).ok_or_else(|| {
                let msg = format!("volume {vol} block {} points to missing log segment {}", first + i as u64, e.seg);
                tracing::error!("{msg}");
                IoError::Failed(msg)
            })?;
            block.resize(n * bb, 0);
            let cached = match wait {
                Wait::Briefly => match seg.read_at_nowait(&mut block, e.off as u64).map_err(|err| IoError::Failed(format!("{err:#}")))? {
                    segment::NoWait::Read => true,
                    segment::NoWait::WouldBlock => {
                        self.stats.nbd_reads_off_worker.fetch_add(1, Ordering::Relaxed);
                        return Err(IoError::Busy);
                    }
                    segment::NoWait::Unsupported => false,
                },
                Wait::Forever => false,
            };
            if !cached {
                let _io = self.io.start(iowatch::IoOp::Read);
                seg.read_at(&mut block, e.off as u64).map_err(|err| IoError::Failed(format!("{err:#}")))?;
            }
            for j in 0..n {
                let data = &block[j * bb..(j + 1) * bb];
                let want = entries[i + j].crc;
                let got = crate::crc::crc32c(data);
                if got != want {
                    let msg = format!(
                        "checksum mismatch in log segment {} at offset {} (volume {vol}, block {}): stored {want:#010x}, computed {got:#010x}",
                        seg.path.display(),
                        e.off as u64 + (j * bb) as u64,
                        first + (i + j) as u64
                    );
                    tracing::error!("{msg}");
                    return Err(IoError::Failed(msg));
                }
                let bs = (first + (i + j) as u64) * BLOCK_BYTES;
                let (lo, hi) = clip(bs, offset, buf.len());
                let src = (offset + lo as u64 - bs) as usize;
                buf[lo..hi].copy_from_slice(&data[src..src + (hi - lo)]);
            }
            i += n;
        }
        Ok(())
    }

    /// Allocation status of `[offset, offset+len)` as runs of (length, hole, zero).
    pub fn block_status(&self, vol: u32, offset: u64, len: u64, max_extents: usize) -> Result<Vec<(u64, bool, bool)>, IoError> {
        self.block_status_as(Wait::Forever, vol, offset, len, max_extents)
    }

    /// `block_status`, waiting as `wait` says. With `Wait::Briefly`: unless
    /// the group lock is had within `NBD_LOCK_WAIT_US`, `IoError::Busy`.
    pub fn block_status_as(&self, wait: Wait, vol: u32, offset: u64, len: u64, max_extents: usize) -> Result<Vec<(u64, bool, bool)>, IoError> {
        let inner = self.lock_as(wait)?;
        let size = Self::check_range(&inner, vol, offset, len)?;
        let v = &inner.volumes[&vol];
        let mut out: Vec<(u64, bool, bool)> = Vec::new();
        let mut b = offset / BLOCK_BYTES;
        let end = offset + len;
        let mut cur = offset;
        while cur < end && out.len() <= max_extents {
            let state = if v.map.chunk_is_empty(b) {
                (true, true)
            } else {
                let e = v.map.get(b);
                (e.is_hole(), e.seg == SEG_HOLE || e.seg == SEG_ZERO)
            };
            let step = if v.map.chunk_is_empty(b) {
                let chunk_end = (b / crate::volume::map::CHUNK_BLOCKS as u64 + 1) * crate::volume::map::CHUNK_BLOCKS as u64;
                (chunk_end * BLOCK_BYTES).min(size) - cur
            } else {
                ((b + 1) * BLOCK_BYTES).min(size) - cur
            };
            let step = step.min(end - cur);
            match out.last_mut() {
                Some(last) if (last.1, last.2) == state => last.0 += step,
                _ => {
                    if out.len() == max_extents {
                        break;
                    }
                    out.push((step, state.0, state.1))
                }
            }
            cur += step;
            b = cur / BLOCK_BYTES;
        }
        Ok(out)
    }

    /// Position up to which a FLUSH must make the log durable.
    pub fn flush_target(&self) -> LogPos {
        self.tail_pos.load(Ordering::Acquire)
    }

    // ---- group commit --------------------------------------------------

    /// Waits until everything before `target` is on stable storage. Many
    /// waiters share one fdatasync (group commit).
    pub async fn wait_durable(&self, target: LogPos) -> Result<(), IoError> {
        let mut rx = self.durable_tx.subscribe();
        {
            let (d, failed) = *rx.borrow();
            if failed {
                return Err(IoError::Failed("log sync failed earlier; group is failed".into()));
            }
            if d >= target {
                return Ok(());
            }
        }
        self.request_durable(target);
        let r = rx.wait_for(|(d, failed)| *failed || *d >= target).await;
        match r {
            Ok(v) if !v.1 => Ok(()),
            _ => Err(IoError::Failed("log sync failed; group is failed".into())),
        }
    }

    /// Asks the sync thread to make everything before `target` durable,
    /// without waiting for it.
    pub fn request_durable(&self, target: LogPos) {
        let mut req = self.sync_req.lock().unwrap_or_else(|p| p.into_inner());
        if req.0 < target {
            req.0 = target;
            self.sync_cv.notify_one();
        }
    }

    /// The position the sync thread was last asked to make durable.
    #[cfg(test)]
    pub(crate) fn requested_durable(&self) -> LogPos {
        self.sync_req.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    pub fn durable_pos(&self) -> LogPos {
        self.durable_tx.borrow().0
    }

    /// Makes everything before `target` durable, from a blocking thread.
    pub fn sync_to(&self, target: LogPos) -> Result<()> {
        let _g = self.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (d, failed) = *self.durable_tx.borrow();
        if failed {
            bail!("log sync failed earlier; group {} is failed", self.name);
        }
        if d >= target {
            return Ok(());
        }
        let (pos_now, files, dir) = {
            let mut inner = self.lock_read();
            let files = std::mem::take(&mut inner.unsynced);
            for f in &files {
                f.unsynced.store(false, Ordering::Release);
            }
            let dir = std::mem::replace(&mut inner.dir_dirty, false);
            (inner.tail_pos(), files, dir)
        };
        let res = (|| -> Result<()> {
            let _io = self.io.start(iowatch::IoOp::Sync);
            #[cfg(test)]
            while self.stall_syncs.load(Ordering::Acquire) {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            for f in &files {
                let len = f.len();
                f.file.sync_data().with_context(|| format!("failed to fdatasync log segment {}", f.path.display()))?;
                f.synced_len.fetch_max(len, Ordering::AcqRel);
            }
            if dir {
                crate::crashsafe::fsync_dir(&self.dir)?;
                for f in &files {
                    f.dir_synced.store(true, Ordering::Release);
                }
            }
            Ok(())
        })();
        self.stats.syncs.fetch_add(1, Ordering::Relaxed);
        match res {
            Ok(()) => {
                self.durable_tx.send_modify(|v| v.0 = v.0.max(pos_now));
                Ok(())
            }
            Err(e) => {
                // After a failed fsync the page cache may have dropped the
                // data: never retry and pretend. Fail the group loudly.
                tracing::error!("group {}: {e:#}; refusing further writes", self.name);
                self.lock_read().failed = Some(format!("{e:#}"));
                self.durable_tx.send_modify(|v| v.1 = true);
                Err(e)
            }
        }
    }

    fn sync_thread(self: Arc<Self>) {
        loop {
            let target = {
                let mut req = self.sync_req.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if req.1 {
                        return;
                    }
                    if req.0 > self.durable_pos() {
                        break req.0;
                    }
                    req = self.sync_cv.wait(req).unwrap_or_else(|p| p.into_inner());
                }
            };
            let _ = self.sync_to(target);
            if self.durable_tx.borrow().1 {
                return;
            }
        }
    }

    /// Stops background threads at once, without a final sync or checkpoint
    /// (what a crash leaves; used by simulations before reopening the files).
    pub fn abandon(&self) {
        self.stop.store(true, Ordering::Release);
        {
            let mut req = self.sync_req.lock().unwrap_or_else(|p| p.into_inner());
            req.1 = true;
            self.sync_cv.notify_all();
        }
        // Wait for them, so that nothing writes to the files any more.
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            t.thread().unpark();
            let _ = t.join();
        }
    }

    /// Stops background threads after a final sync and checkpoint.
    pub fn close(&self) -> Result<()> {
        self.stop.store(true, Ordering::Release);
        {
            let mut req = self.sync_req.lock().unwrap_or_else(|p| p.into_inner());
            req.1 = true;
            self.sync_cv.notify_all();
        }
        self.sync_to(self.flush_target())?;
        // The latest acknowledgements: after a restart, less log is kept and
        // each DR's lag counts from where it really is. A failure keeps the
        // older file (more log kept, a larger lag shown), not the checkpoint
        // from being written.
        if !self.lock_read().pins.is_empty() {
            if let Err(e) = self.save_pins() {
                tracing::warn!("group {}: failed to save replication pins at close: {e:#}", self.name);
            }
        }
        self.checkpoint()
    }

    pub fn log_bytes(&self) -> u64 {
        self.lock_read().log_bytes()
    }

    pub fn live_bytes(&self) -> u64 {
        self.lock_read().live_bytes()
    }

    pub fn last_seq(&self) -> u64 {
        self.lock_read().next_seq.saturating_sub(1)
    }

    pub fn epoch(&self) -> u64 {
        self.lock_read().epoch
    }

    pub fn segment_count(&self) -> usize {
        self.lock_read().segments.len()
    }

    /// Segments GC set aside (`Inner::gc_skipped`): id and reason.
    pub fn gc_skipped(&self) -> Vec<(u32, String)> {
        self.lock_read().gc_skipped.iter().map(|(id, why)| (*id, why.clone())).collect()
    }

    pub fn failed(&self) -> Option<String> {
        self.lock_read().failed.clone()
    }

    /// `(seconds, error, bytes needed)` while the last append found the
    /// log's file system full and that much is still not free. Checked
    /// here too, not only at the next append: a group nobody writes to
    /// (an idle primary, a DR refusing its primary for this very reason)
    /// would otherwise say it is full for ever.
    pub fn out_of_space(&self) -> Option<(f64, String, u64)> {
        let (since, e, needed) = self.lock_read().out_of_space.clone()?;
        // Not under the lock: statvfs on a sick file system may take long.
        if crate::util::free_bytes(&self.dir).is_ok_and(|free| free >= needed) {
            let mut inner = self.lock();
            if inner.out_of_space.as_ref().is_some_and(|o| o.0 == since) {
                inner.out_of_space = None;
                space_recovered(&self.name, since);
            }
            return None;
        }
        Some((crate::util::now_ns().saturating_sub(since) as f64 / 1e9, e, needed))
    }

    fn maintenance_thread(self: Arc<Self>) {
        let interval = std::time::Duration::from_millis(crate::limits::MAINTENANCE_INTERVAL_MS);
        // A failure that repeats (a full disk) is logged once a minute.
        let mut trouble = crate::util::LogThrottle::new(std::time::Duration::from_secs(60));
        while !self.stop.load(Ordering::Acquire) {
            // Parked rather than slept, so that stopping does not wait.
            std::thread::park_timeout(interval);
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            if let Err(e) = self.maintain() {
                if let Some(n) = trouble.admit() {
                    tracing::error!("group {}: maintenance failed: {e:#}{}", self.name, crate::util::unlogged_note(n));
                }
                std::thread::park_timeout(std::time::Duration::from_secs(1));
            }
        }
    }

    /// DR site: the room a resync's data leaves free, so that when the
    /// attempt fills the disk, the checkpoint behind which GC gives back its
    /// records can still be written: the size of the last checkpoint (the
    /// maps it holds do not change while a resync stages) and a MiB.
    fn resync_reserve(&self) -> u64 {
        std::fs::metadata(self.dir.join(checkpoint::FILE_NAME)).map_or(0, |m| m.len()) + (1 << 20)
    }

    /// DR site: says up front that a resync the primary begins may need
    /// more than the log's file system has free (`need`: the primary's
    /// estimate, an upper bound). It is not refused for that: trimmed or
    /// zeroed blocks in the dirty set carry no data, so it may fit. If it
    /// does not, the append that fails says how much to free
    /// (`resync_needs_room`).
    fn warn_if_resync_may_not_fit(&self, need: u64) {
        if let Ok(free) = crate::util::free_bytes(&self.dir) {
            if free < need {
                tracing::warn!(
                    event = "resync-may-not-fit",
                    "group {}: the primary begins a resync that may need up to {} MiB here, and {} MiB are free; if the disk fills, the resync stops and the primary is refused until {} MiB are free (this site goes on showing its last consistent state)",
                    self.name,
                    need.div_ceil(1 << 20),
                    free >> 20,
                    need.div_ceil(1 << 20)
                );
            }
        }
    }

    /// DR site: a resync left unfinished by the newest replication
    /// connection, which has ended, is dropped (`receiver_ended`).
    fn drop_abandoned_resync(&self) {
        let ended = self.receiver_ended.swap(0, Ordering::AcqRel);
        if ended != 0 {
            self.drop_dead_resync(ended, "ended with its connection");
        }
    }

    /// DR site: drops the staging if connection `gen` is still the newest.
    /// Called when that connection has ended, or has just begun (before
    /// its first record): either way no connection can commit the staging,
    /// since an older connection's records are refused and a new one's
    /// resync begins afresh with RESYNC_BEGIN. (The generation is bumped
    /// before a connection's first append, which takes this lock, so a
    /// staging a newer connection began is never dropped here.) Dropping at
    /// a new connection too covers a staging whose own connection's end
    /// came after a newer one's, and a new connection that streams
    /// instead of resyncing, which would otherwise keep a dead staging,
    /// and with it every checkpoint away, for as long as it lasts.
    pub fn drop_dead_resync(&self, gen: u64, why: &str) {
        let mut inner = self.lock();
        if self.receiver_gen.load(Ordering::Acquire) == gen {
            inner.abandon_staging(&self.name, why);
        }
    }

    /// Weighs the blocks of dropped maps that `forget_map` left for later
    /// (on the caller's thread, without the lock), so that GC's counts are
    /// exact again. Called by every operation that drops a map, after it
    /// let go of the lock, and by each maintenance round.
    pub(crate) fn settle_counts(&self) {
        #[cfg(test)]
        if self.hold_walks.load(Ordering::Acquire) {
            return;
        }
        // One at a time, so that a walk another thread took (the
        // maintenance thread) is done too when this returns.
        let _one = self.settle_lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let walks = std::mem::take(&mut self.lock().weighing.walks);
            if walks.is_empty() {
                return;
            }
            for w in walks {
                let gone = w.weigh();
                self.lock().finish_walk(&w, gone);
            }
        }
    }

    /// One round: the log cap, a checkpoint if due, GC. Each runs whatever
    /// the others did: a checkpoint that cannot be written (a full disk)
    /// must not stop GC from freeing the segments that are already free.
    pub(crate) fn maintain(self: &Arc<Self>) -> Result<()> {
        self.settle_counts();
        self.drop_abandoned_resync();
        let mut failed: Vec<String> = Vec::new();
        if let Err(e) = self.enforce_log_cap() {
            failed.push(format!("log cap: {e:#}"));
        }
        let due = {
            let inner = self.lock_read();
            inner.failed.is_none() && (inner.checkpoint_asked || inner.log_bytes_written - inner.log_bytes_at_checkpoint >= crate::limits::CHECKPOINT_INTERVAL_BYTES)
        };
        if due {
            if let Err(e) = self.checkpoint() {
                failed.push(format!("checkpoint: {e:#}"));
            }
        }
        if let Err(e) = self.collect_garbage() {
            failed.push(format!("garbage collection: {e:#}"));
        }
        if failed.is_empty() {
            Ok(())
        } else {
            bail!("{}", failed.join("; "))
        }
    }
}

/// Part of the block starting at volume byte `bstart` that falls in the
/// caller's buffer `[offset, offset+len)`, as buffer indices.
fn clip(bstart: u64, offset: u64, len: usize) -> (usize, usize) {
    let lo = bstart.max(offset);
    let hi = (bstart + BLOCK_BYTES).min(offset + len as u64);
    ((lo - offset) as usize, (hi - offset) as usize)
}

#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod snapshot_tests;
