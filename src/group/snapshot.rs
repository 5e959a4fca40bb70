//! Snapshots, restore, refresh and snapshot sync (R6-R9).
//!
//! Every operation is one record in the group's log, appended under the
//! group lock like a write, so it sits exactly between the writes before
//! and after it, gets the next sequence number, and is shipped to DR sites
//! in that place. Applying it (here, at a DR site, and at replay) is a
//! metadata change only: a snapshot is a copy-on-write clone of a block
//! map (a few pointers per GiB), restore/refresh/sync replace one map by a
//! clone of another. No data block is read, written or sent.
//!
//! DR-side protection (R25): a DR site with `protect_snapshots` refuses a
//! deletion of a snapshot that arrives in the stream. It first appends a
//! local `Protect` record (never replicated) and then the primary's delete
//! record; applying the delete finds the snapshot protected and keeps it,
//! marked `retained`. Replay sees the same two records, so a restart keeps
//! the decision, whatever the setting is then.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::resync::CommitEntry;
use super::{Group, Inner};
use crate::limits::BLOCK_BYTES;
use crate::log::record::{Header, Kind, FLAG_RELOCATED};
use crate::volume::{SnapMeta, Volume};

/// Body of a `SnapCreate` record.
#[derive(Serialize, Deserialize)]
struct CreateBody {
    name: String,
    writable: bool,
}

/// A snapshot as `snapshot list` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotInfo {
    pub name: String,
    pub volume: String,
    pub parent: String,
    pub created_seq: u64,
    pub created_ns: u64,
    pub size: u64,
    pub writable: bool,
    /// Bytes held by this snapshot alone (no other map shares them).
    pub unique_bytes: u64,
    pub retained: bool,
}

/// Checks the JSON body of a replicated record before it is appended: a
/// body that does not parse is refused with a reason naming the record,
/// never applied as "empty" (an empty map table would delete every map).
pub(crate) fn check_body(h: &Header, body: &[u8]) -> Result<(), String> {
    use crate::limits::{MAPS_PER_GROUP_MAX, RESYNC_BATCH_BLOCKS, VOLUME_BYTES_MAX};
    use crate::log::record::FLAG_RESYNC;
    let bad = |what: &str, e: serde_json::Error| format!("record seq {} ({:?}): body is not a valid {what}: {e}", h.seq, h.kind);
    let out_of_bounds = |what: String| Err(format!("record seq {} ({:?}): {what}", h.seq, h.kind));
    // A size or an id this site would act on: a volume of at most
    // VOLUME_BYTES_MAX, in whole blocks, and an id that leaves a next one.
    let size_ok = |size: u64| size <= VOLUME_BYTES_MAX && size.is_multiple_of(BLOCK_BYTES);
    match h.kind {
        Kind::VolumeCreate | Kind::VolumeResize | Kind::SnapCreate if h.volume == u32::MAX => out_of_bounds(format!("map id {} is out of range", h.volume)),
        Kind::VolumeCreate | Kind::VolumeResize if !size_ok(h.offset) => out_of_bounds(format!("size {} is not whole blocks of at most {VOLUME_BYTES_MAX} bytes", h.offset)),
        // What `create_volume` and `create_snapshot` allow, and no more: a
        // name that is a path (`../../x`), not UTF-8, or empty would be an
        // export and a status entry at every DR site.
        Kind::VolumeCreate if h.offset == 0 => out_of_bounds("a volume of size 0".into()),
        Kind::VolumeCreate => match std::str::from_utf8(body) {
            Ok(name) => crate::util::check_name("volume", name).or_else(&out_of_bounds),
            Err(_) => out_of_bounds(format!("volume name {:?} is not UTF-8", String::from_utf8_lossy(body))),
        },
        Kind::SnapCreate => {
            let b = serde_json::from_slice::<CreateBody>(body).map_err(|e| bad("snapshot description", e))?;
            match b.name.split_once('@') {
                Some((root, snap)) => crate::util::check_name("volume", root).and_then(|_| crate::util::check_name("snapshot", snap)).or_else(&out_of_bounds),
                None => out_of_bounds(format!("snapshot name {:?} is not VOLUME@SNAPSHOT", b.name)),
            }
        }
        // Resync records cover at most a batch each (`take_dirty`); the DR
        // stages them block by block.
        Kind::Write | Kind::Zero | Kind::Trim if h.flags & FLAG_RESYNC != 0 && h.length as u64 > RESYNC_BATCH_BLOCKS * BLOCK_BYTES => {
            out_of_bounds(format!("a resync record of {} bytes, more than a resync batch", h.length))
        }
        Kind::MapCopy if h.flags & FLAG_RESYNC != 0 => {
            let c = serde_json::from_slice::<super::resync::StagedCopy>(body).map_err(|e| bad("staged copy", e))?;
            if c.count > RESYNC_BATCH_BLOCKS || c.first.checked_add(c.count).is_none_or(|e| e > VOLUME_BYTES_MAX / BLOCK_BYTES) {
                return out_of_bounds(format!("a staged copy of {} blocks at block {}, more than a resync batch or past the largest volume", c.count, c.first));
            }
            Ok(())
        }
        Kind::ResyncCommit => {
            let table: Vec<(u32, String, u64)> = match serde_json::from_slice::<Vec<CommitEntry>>(body) {
                Ok(t) => t.into_iter().map(|t| (t.id, t.name, t.size)).collect(),
                Err(_) => serde_json::from_slice::<Vec<(u32, String, u64)>>(body).map_err(|e| bad("map table", e))?,
            };
            if table.len() > MAPS_PER_GROUP_MAX {
                return out_of_bounds(format!("a map table of {} maps, more than {MAPS_PER_GROUP_MAX}", table.len()));
            }
            if let Some((id, size)) = table.iter().map(|(id, _, size)| (id, size)).find(|(id, size)| **id == u32::MAX || !size_ok(**size)) {
                return out_of_bounds(format!("map {id} of size {size} in the table: the id is out of range or the size is not whole blocks of at most {VOLUME_BYTES_MAX} bytes"));
            }
            // A volume `NAME` or a snapshot `VOLUME@SNAPSHOT`, as made here.
            for (id, name, _) in &table {
                let (root, snap) = match name.split_once('@') {
                    Some((r, s)) => (r, Some(s)),
                    None => (name.as_str(), None),
                };
                if let Err(e) = crate::util::check_name("volume", root).and_then(|_| snap.map_or(Ok(()), |s| crate::util::check_name("snapshot", s))) {
                    return out_of_bounds(format!("map {id} in the table: {e}"));
                }
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

impl Inner {
    /// A record of this site only (flagged RELOCATED: never replicated, no
    /// seq of its own: it repeats the last seq, which replay ignores for it).
    fn local_header(&self, kind: Kind, volume: u32) -> Header {
        Header {
            kind,
            flags: FLAG_RELOCATED,
            epoch: self.epoch,
            seq: self.next_seq.saturating_sub(1),
            timestamp_ns: crate::util::now_ns(),
            volume,
            length: 0,
            offset: 0,
            body_len: 0,
            crc: 0,
            durable: 0,
        }
    }

    pub(super) fn apply_snap_create(&mut self, h: &Header, body: &[u8]) {
        let Ok(b) = serde_json::from_slice::<CreateBody>(body) else {
            tracing::error!("snapshot record seq {} has an unreadable body; skipped", h.seq);
            return;
        };
        if h.volume == h.offset as u32 {
            tracing::error!("snapshot record seq {} names map {} as its own source; skipped", h.seq, h.volume);
            return;
        }
        let Some(src) = self.volumes.get(&(h.offset as u32)) else { return };
        let snap = SnapMeta {
            parent: src.id,
            parent_name: src.name.clone(),
            created_seq: h.seq,
            created_ns: h.timestamp_ns,
            writable: b.writable,
            retained: false,
        };
        let v = Volume { id: h.volume, name: b.name.clone(), size: src.size, map: src.map.clone(), snap: Some(snap) };
        // A copy: every block it points at is the source's (nothing new
        // to count), unless it replaces a map of the same id.
        self.forget_map(h.volume);
        // A snapshot this DR site retained against the primary's delete
        // gives its name up to the new one.
        if let Some(old) = self.volumes.values_mut().find(|o| o.name == b.name && o.snap.as_ref().is_some_and(|s| s.retained)) {
            old.name = format!("{}.retained-{}", b.name, old.id);
            tracing::warn!("retained snapshot {} renamed to {} (the primary made a new {})", b.name, old.name, b.name);
        }
        self.volumes.insert(h.volume, v);
        self.count_copy(h.volume);
        self.next_volume_id = self.next_volume_id.max(h.volume + 1);
    }

    pub(super) fn apply_map_copy(&mut self, h: &Header) {
        if h.volume == h.offset as u32 || !self.volumes.contains_key(&h.volume) {
            return;
        }
        let Some(src) = self.volumes.get(&(h.offset as u32)) else { return };
        let (map, size) = (src.map.clone(), src.size);
        self.forget_map(h.volume);
        if let Some(dst) = self.volumes.get_mut(&h.volume) {
            dst.map = map;
            dst.size = size;
        }
        self.count_copy(h.volume);
    }

    pub(super) fn apply_delete(&mut self, h: &Header) {
        let local = h.flags & FLAG_RELOCATED != 0;
        if !local && self.protected.remove(&h.volume) {
            if let Some(s) = self.volumes.get_mut(&h.volume).and_then(|v| v.snap.as_mut()) {
                s.retained = true;
                return;
            }
        }
        self.forget_map(h.volume);
        self.volumes.remove(&h.volume);
    }

    /// Makes a finished resync the DR's state in one step: the primary's
    /// map table (maps made meanwhile are built from this site's own copy
    /// of their base), then every staged block.
    pub(super) fn commit_resync(&mut self, h: &Header, body: &[u8]) {
        let table: Vec<CommitEntry> = match serde_json::from_slice(body) {
            Ok(t) => t,
            Err(_) => {
                // The first format: (id, name, size) tuples.
                let old: Vec<(u32, String, u64)> = serde_json::from_slice(body).unwrap_or_default();
                old.into_iter().map(|(id, name, size)| CommitEntry { id, name, size, snap: None, base: None }).collect()
            }
        };
        // Bases are this site's maps *before* the commit (cheap clones).
        let before = self.volumes.clone();
        let keep: BTreeSet<u32> = table.iter().map(|t| t.id).collect();
        // Snapshots this site retained are its own: the primary's table never lists them.
        let gone: Vec<u32> = self.volumes.values().filter(|v| !keep.contains(&v.id) && !v.snap.as_ref().is_some_and(|s| s.retained)).map(|v| v.id).collect();
        for id in gone {
            if self.protected.remove(&id) {
                if let Some(s) = self.volumes.get_mut(&id).and_then(|v| v.snap.as_mut()) {
                    s.retained = true;
                    continue;
                }
            }
            self.volumes.remove(&id);
        }
        for t in table {
            let old = self.volumes.remove(&t.id);
            let mut v = match (t.base, old) {
                (Some(b), _) => match before.get(&b) {
                    Some(base) => Volume { id: t.id, name: t.name.clone(), size: base.size, map: base.map.clone(), snap: None },
                    // A base this site never had was made after what it
                    // holds, from nothing: its content is all in the staged
                    // blocks, so the map starts empty (not from an old copy
                    // of the same id).
                    None => Volume::new(t.id, t.name.clone(), t.size),
                },
                (None, Some(v)) => v,
                (None, None) => Volume::new(t.id, t.name.clone(), t.size),
            };
            v.map.resize(t.size.div_ceil(BLOCK_BYTES));
            v.size = t.size;
            v.name = t.name;
            v.snap = t.snap;
            self.volumes.insert(t.id, v);
            self.next_volume_id = self.next_volume_id.max(t.id + 1);
        }
        // Only maps the primary's table lists take staged blocks: a snapshot
        // this site retained (protect_snapshots) keeps its own content, even
        // if the attempt staged blocks for it before the primary deleted it.
        for ((vol, block), e) in self.staging.take().unwrap_or_default().blocks {
            // Counted by the recount below, not block by block.
            if let Some(v) = self.volumes.get_mut(&vol).filter(|v| keep.contains(&vol) && v.covers(block)) {
                v.map.set(block, e);
            }
        }
        // Maps were dropped, replaced and rebuilt above: count afresh,
        // the walk of every map off the lock.
        self.recount_later();
        self.next_seq = h.seq + 1;
    }

    /// Resolves a map name: `vol0`, `vol0@snap`, or a bare snapshot name
    /// when `root` is given (`snap` means `root@snap`).
    fn resolve(&self, root: Option<&str>, name: &str) -> Option<&Volume> {
        let full = match (root, name.contains('@')) {
            (Some(r), false) => format!("{}@{name}", r.split('@').next().unwrap_or(r)),
            _ => name.to_string(),
        };
        self.volumes.values().find(|v| v.name == full)
    }
}

impl Group {
    /// Appends and applies one metadata record, then makes it durable and
    /// asks periodic-mode senders to ship up to it now.
    fn metadata_op(&self, f: impl FnOnce(&mut Inner) -> Result<Header>, body: &[u8]) -> Result<u64> {
        let (at, seq) = {
            let mut inner = self.lock();
            let mut h = f(&mut inner)?;
            let at = inner.append(self, &mut h, body, &[])?;
            inner.apply(&h, at, body, Some(body));
            (at, h.seq)
        };
        self.sync_to(at + 1)?;
        self.replication.ship_through(seq);
        self.appended.notify_waiters();
        self.settle_counts();
        Ok(seq)
    }

    pub(super) fn check_map_count(inner: &Inner) -> Result<()> {
        if inner.volumes.len() >= crate::limits::MAPS_PER_GROUP_MAX {
            bail!("group already holds {} volumes and snapshots (the limit)", inner.volumes.len());
        }
        Ok(())
    }

    /// `snapshot create SRC SNAP`: SRC is a volume or a snapshot; the new
    /// snapshot is named `ROOT@SNAP` (ROOT: the volume SRC belongs to).
    pub fn create_snapshot(&self, src: &str, snap: &str, writable: bool) -> Result<u32> {
        crate::util::check_name("snapshot", snap).map_err(|e| anyhow!(e))?;
        let root = src.split('@').next().unwrap_or(src);
        let full = format!("{root}@{snap}");
        let body = serde_json::to_vec(&CreateBody { name: full.clone(), writable })?;
        let mut id = 0;
        self.metadata_op(
            |inner| {
                Self::check_map_count(inner)?;
                let s = inner.resolve(None, src).with_context(|| format!("{src} does not exist"))?;
                if inner.volumes.values().any(|v| v.name == full && !v.snap.as_ref().is_some_and(|s| s.retained)) {
                    bail!("snapshot {full} already exists");
                }
                let sid = s.id;
                id = inner.next_volume_id;
                Ok(inner.new_header(Kind::SnapCreate, id, sid as u64, 0, body.len() as u32))
            },
            &body,
        )?;
        Ok(id)
    }

    fn map_copy(&self, dst: &str, src: &str, op: &str, check: impl FnOnce(&Volume, &Volume) -> Result<()>) -> Result<u64> {
        self.metadata_op(
            |inner| {
                let d = inner.resolve(None, dst).with_context(|| format!("{dst} does not exist"))?;
                let s = inner.resolve(None, src).with_context(|| format!("{src} does not exist"))?;
                if d.id == s.id {
                    bail!("{dst} and {src} are the same");
                }
                check(d, s)?;
                let (did, sid) = (d.id, s.id);
                Ok(inner.new_header(Kind::MapCopy, did, sid as u64, 0, op.len() as u32))
            },
            op.as_bytes(),
        )
    }

    /// Full name of snapshot `snap` of volume `vol` (`snap` may already be full).
    pub fn snapshot_name(vol: &str, snap: &str) -> String {
        if snap.contains('@') {
            snap.to_string()
        } else {
            format!("{}@{snap}", vol.split('@').next().unwrap_or(vol))
        }
    }

    /// `snapshot restore VOL SNAP`: VOL becomes what SNAP holds (data and size).
    pub fn restore_snapshot(&self, vol: &str, snap: &str) -> Result<u64> {
        let sname = Self::snapshot_name(vol, snap);
        self.map_copy(vol, &sname, "restore", |d, s| {
            if d.snap.is_some() {
                bail!("{} is a snapshot; restore a volume", d.name);
            }
            if s.root_name() != d.name {
                bail!("{} is not a snapshot of {}", s.name, d.name);
            }
            Ok(())
        })
    }

    /// `snapshot refresh VOL SNAP`: SNAP becomes what VOL holds now.
    pub fn refresh_snapshot(&self, vol: &str, snap: &str) -> Result<u64> {
        let sname = Self::snapshot_name(vol, snap);
        self.map_copy(&sname, vol, "refresh", |d, s| {
            if d.snap.is_none() {
                bail!("{} is not a snapshot", d.name);
            }
            if d.root_name() != s.root_name() {
                bail!("{} is not a snapshot of {}", d.name, s.name);
            }
            Ok(())
        })
    }

    /// `snapshot sync A B`: snapshot B becomes equal to snapshot A.
    pub fn sync_snapshots(&self, a: &str, b: &str) -> Result<u64> {
        self.map_copy(b, a, "sync", |d, s| {
            if d.snap.is_none() || s.snap.is_none() {
                bail!("snapshot sync needs two snapshots ({} -> {})", s.name, d.name);
            }
            Ok(())
        })
    }

    /// `snapshot delete VOL SNAP`. At a DR site (`local`), only snapshots it
    /// retained against the primary's delete can be deleted.
    pub fn delete_snapshot(&self, vol: &str, snap: &str) -> Result<()> {
        let sname = Self::snapshot_name(vol, snap);
        self.metadata_op(
            |inner| {
                let s = inner.resolve(None, &sname).with_context(|| format!("snapshot {sname} does not exist"))?;
                if s.snap.is_none() {
                    bail!("{sname} is a volume, not a snapshot");
                }
                let id = s.id;
                Ok(inner.new_header(Kind::VolumeDelete, id, 0, 0, 0))
            },
            &[],
        )?;
        Ok(())
    }

    /// DR site: deletes a snapshot this site retained (a local record, not
    /// part of the primary's stream).
    pub fn delete_retained_snapshot(&self, vol: &str, snap: &str) -> Result<()> {
        let sname = Self::snapshot_name(vol, snap);
        let at = {
            let mut inner = self.lock();
            let s = inner.resolve(None, &sname).with_context(|| format!("snapshot {sname} does not exist"))?;
            if !s.snap.as_ref().is_some_and(|m| m.retained) {
                bail!("snapshot {sname} is replicated from the primary; delete it there");
            }
            let mut h = inner.local_header(Kind::VolumeDelete, s.id);
            let at = inner.append(self, &mut h, &[], &[])?;
            inner.apply(&h, at, &[], Some(&[]));
            at
        };
        self.settle_counts();
        self.sync_to(at + 1)
    }

    /// DR site with `protect_snapshots`: before a stream record that would
    /// delete snapshots is appended, a local `Protect` record for each is
    /// appended (so applying the record keeps them). Returns their names.
    pub(super) fn protect_before(&self, inner: &mut Inner, h: &Header, body: &[u8]) -> Result<Vec<String>, String> {
        if !self.protect_snapshots.load(Ordering::Relaxed) {
            return Ok(Vec::new());
        }
        let doomed: Vec<u32> = match h.kind {
            Kind::VolumeDelete => inner.volumes.get(&h.volume).filter(|v| v.snap.is_some()).map(|v| vec![v.id]).unwrap_or_default(),
            Kind::ResyncCommit => {
                let keep: BTreeSet<u32> = serde_json::from_slice::<Vec<CommitEntry>>(body).map(|t| t.iter().map(|e| e.id).collect()).unwrap_or_default();
                inner.volumes.values().filter(|v| v.snap.as_ref().is_some_and(|s| !s.retained) && !keep.contains(&v.id)).map(|v| v.id).collect()
            }
            _ => Vec::new(),
        };
        let mut names = Vec::new();
        for id in doomed {
            // Already protected: by an earlier attempt at this same record
            // that found the disk full after its Protect went in. The
            // refusal is this attempt's to report.
            if !inner.protected.contains(&id) {
                let mut p = inner.local_header(Kind::Protect, id);
                let at = inner.append(self, &mut p, &[], &[]).map_err(|e| e.to_string())?;
                inner.apply(&p, at, &[], Some(&[]));
            }
            names.push(inner.volumes.get(&id).map(|v| v.name.clone()).unwrap_or_default());
        }
        Ok(names)
    }

    /// Snapshots of this group (all, or those of volume `vol`), with the
    /// bytes unique to each (computed outside the group lock on cheap map
    /// clones, by the walk that keeps GC's distinct counts: regions and
    /// chunks another map shares are skipped whole).
    pub fn snapshots(&self, vol: Option<&str>) -> Vec<SnapshotInfo> {
        let maps: Vec<Volume> = self.lock_read().volumes.values().cloned().collect();
        let mut out = Vec::new();
        for v in maps.iter() {
            let Some(s) = &v.snap else { continue };
            if vol.is_some_and(|r| v.root_name() != r) {
                continue;
            }
            let others: Vec<&Volume> = maps.iter().filter(|o| o.id != v.id).collect();
            let mut unique = 0u64;
            super::walk_unshared(&v.map, &others, |_, _, held| {
                if !held {
                    unique += 1;
                }
            });
            out.push(SnapshotInfo {
                name: v.name.clone(),
                volume: v.root_name().to_string(),
                parent: s.parent_name.clone(),
                created_seq: s.created_seq,
                created_ns: s.created_ns,
                size: v.size,
                writable: s.writable,
                unique_bytes: unique * BLOCK_BYTES,
                retained: s.retained,
            });
        }
        out
    }
}
