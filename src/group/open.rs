//! Opening a group: load the last checkpoint, replay the log after it,
//! cut off a torn tail.
//!
//! The log is valid up to the first record that fails its checks. Records
//! are made durable strictly in log order (one fdatasync covers every segment
//! written since the last), so everything acknowledged as durable lies before
//! that point; what follows was never promised to anyone and is cut off (the
//! rest of the segment truncated, later segments moved to `discarded/` so an
//! operator can still inspect them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use super::{checkpoint, Group, GroupMeta, Inner};
use crate::log::segment::{self, pos, pos_off, pos_seg, LogPos, Segment, SEGMENT_HEADER_BYTES};

pub(crate) const META_FILE: &str = "group.json";

/// Identity of a group being created: a DR site creates its copy of a group
/// with the primary's id, so that both logs carry the same group id.
#[derive(Clone, Debug)]
pub struct Create {
    pub id: Option<u64>,
    pub mode: String,
    /// This site appends its own records to this log (a primary): the
    /// durability marks in them (`Header::durable`) are this log's, and
    /// damage they prove was durable stops the open. At a DR site the
    /// records carry their primary's marks, which say nothing of this log.
    pub written_here: bool,
}

fn load_or_create_meta(dir: &Path, name: &str, create: &Create) -> Result<GroupMeta> {
    let path = dir.join(META_FILE);
    match std::fs::read(&path) {
        Ok(b) => {
            let m: GroupMeta = serde_json::from_slice(&b).with_context(|| format!("{} is not valid group metadata", path.display()))?;
            if m.name != name {
                bail!("{} belongs to group {:?}, not {name:?}", path.display(), m.name);
            }
            crate::replicate::Mode::parse(&m.mode).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            Ok(m)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            crate::replicate::Mode::parse(&create.mode).map_err(|e| anyhow::anyhow!("group {name} is not created: {e}"))?;
            std::fs::create_dir_all(dir).with_context(|| format!("failed to create {}", dir.display()))?;
            let id = create.id.unwrap_or_else(|| crate::util::now_ns() ^ ((std::process::id() as u64) << 40) | 1);
            let m = GroupMeta { name: name.to_string(), id, epoch: 1, mode: create.mode.clone() };
            crate::crashsafe::write_file(&path, &serde_json::to_vec_pretty(&m)?)?;
            Ok(m)
        }
        Err(e) => Err(e).with_context(|| format!("failed to read {}", path.display())),
    }
}

pub(super) fn open(dir: &Path, name: &str, create: &Create) -> Result<Arc<Group>> {
    let meta = load_or_create_meta(dir, name, create)?;
    let started = std::time::Instant::now();
    let ckpt = checkpoint::load(dir, meta.id)?;

    let mut ids: Vec<u32> = Vec::new();
    for ent in std::fs::read_dir(dir).with_context(|| format!("failed to list {}", dir.display()))? {
        let ent = ent?;
        if let Some(id) = ent.file_name().to_str().and_then(segment::parse_segment_file_name) {
            ids.push(id);
        }
    }
    ids.sort_unstable();

    let mut segments: BTreeMap<u32, Arc<Segment>> = BTreeMap::new();
    for (i, &id) in ids.iter().enumerate() {
        match Segment::open(dir, id, meta.id) {
            Ok(s) => {
                segments.insert(id, Arc::new(s));
            }
            Err(e) if i + 1 == ids.len() && std::fs::metadata(dir.join(segment::segment_file_name(id)))?.len() < SEGMENT_HEADER_BYTES => {
                // Crash while creating the newest segment: its header never
                // became durable, so nothing in it was either.
                tracing::warn!("removing incomplete newest log segment: {e:#}");
                std::fs::remove_file(dir.join(segment::segment_file_name(id)))?;
            }
            Err(e) if i + 1 == ids.len() && header_never_written(&dir.join(segment::segment_file_name(id)))? => {
                // The same where the file's size became durable and its
                // header did not (zeros): the first commit in a segment
                // syncs its header, so nothing in it was acknowledged.
                let dd = dir.join("discarded");
                std::fs::create_dir_all(&dd)?;
                tracing::warn!("moving newest log segment, whose header was never written, to {}: {e:#}", dd.display());
                std::fs::rename(dir.join(segment::segment_file_name(id)), dd.join(segment::segment_file_name(id)))?;
                crate::crashsafe::fsync_dir(&dd)?;
                crate::crashsafe::fsync_dir(dir)?;
            }
            Err(e) => return Err(e),
        }
    }

    // Whose durability marks the records carry (see `Create::written_here`).
    let ckpt_version = ckpt.as_ref().map(|c| c.version);
    let loaded_marks = ckpt.as_ref().and_then(|c| c.marks_from);
    let trust_marks = if create.written_here { loaded_marks } else { None };
    let (replay_from, mut inner_volumes, next_seq, last_ident, epoch, next_volume_id, seg_seqs) = match ckpt {
        Some(c) => (c.replay_pos, c.volumes, c.next_seq, c.last_ident, c.epoch, c.next_volume_id, c.seg_seqs),
        None => (0, Vec::new(), 1, None, meta.epoch, 1, BTreeMap::new()),
    };

    // A placeholder tail; replaced below once segments are known.
    let first_tail = match segments.values().next_back() {
        Some(s) => s.clone(),
        None => {
            let s = Arc::new(Segment::create(dir, 1, meta.id)?);
            crate::crashsafe::fsync_dir(dir)?;
            s.file.sync_all()?;
            s.synced_len.store(SEGMENT_HEADER_BYTES, std::sync::atomic::Ordering::Release);
            s.dir_synced.store(true, std::sync::atomic::Ordering::Release);
            s.unsynced.store(false, std::sync::atomic::Ordering::Release);
            segments.insert(1, s.clone());
            s
        }
    };
    let mut inner = Inner {
        epoch: epoch.max(meta.epoch),
        next_seq,
        last_ident,
        next_volume_id,
        volumes: inner_volumes.drain(..).map(|v| (v.id, v)).collect(),
        catalog: Default::default(),
        distinct: std::collections::HashMap::new(),
        refs: std::collections::HashMap::new(),
        weighing: Default::default(),
        segments: BTreeMap::new(),
        tail: first_tail.clone(),
        tail_off: first_tail.len(),
        protected: Default::default(),
        unsynced: Vec::new(),
        dir_dirty: false,
        log_bytes_at_checkpoint: 0,
        log_bytes_written: 0,
        checkpoint_pos: replay_from,
        failed: None,
        out_of_space: None,
        seg_seqs,
        pins: BTreeMap::new(),
        unverified: BTreeMap::new(),
        dirty: BTreeMap::new(),
        dirty_pending: BTreeMap::new(),
        staging: None,
        checkpoint_asked: false,
        gc_skipped: BTreeMap::new(),
        times: Default::default(),
        marks_from: None,
    };
    inner.recount_distinct();

    // From the replay start on, no segment is missing: GC frees only
    // segments before the checkpoint, and a cut moves all the later ones.
    // A gap is a segment lost or removed by hand; replaying past it would
    // skip its records.
    let from_seg = segments.keys().copied().find(|&id| id >= pos_seg(replay_from));
    if replay_from != 0 && from_seg.is_none() {
        // The checkpoint's segment was durable before the checkpoint was
        // written, and GC frees only segments before it: without it the
        // new tail would be an older segment, below where the next open
        // replays from, and writes made now would be skipped then.
        bail!(
            "group {name} in {}: its checkpoint replays from log segment {}, which is missing, and no later segment exists",
            dir.display(),
            segment::segment_file_name(pos_seg(replay_from))
        );
    }
    if let Some(first) = from_seg {
        if replay_from != 0 && first != pos_seg(replay_from) {
            bail!("group {name} in {}: its checkpoint replays from log segment {}, which is missing (the next present is {})", dir.display(), segment::segment_file_name(pos_seg(replay_from)), segment::segment_file_name(first));
        }
        let mut expect = first;
        for &id in segments.range(first..).map(|(id, _)| id) {
            if id != expect {
                bail!("group {name} in {}: log segment {} is missing between {} and {}; replay would skip its records", dir.display(), segment::segment_file_name(expect), segment::segment_file_name(expect - 1), segment::segment_file_name(id));
            }
            expect = id + 1;
        }
    }

    // The checkpoint speaks of this log only if its replay position lies
    // within it: the log was durable up to there before the checkpoint
    // was written. Past the end, the two do not belong together (a
    // segment truncated, or restored from another backup), and replaying
    // would read the gap as a torn tail and cut everything after it.
    if let Some(seg) = segments.get(&pos_seg(replay_from)) {
        if pos_off(replay_from) as u64 > seg.len() {
            bail!(
                "group {name} in {}: its checkpoint replays from offset {} of log segment {}, which holds only {} bytes; the checkpoint and the log do not belong together (restored from different copies?)",
                dir.display(),
                pos_off(replay_from),
                seg.path.display(),
                seg.len()
            );
        }
    }

    // Replay.
    let mut replayed = 0u64;
    let mut cut: Option<(u32, u64, String)> = None;
    // The segment before, replayed to its clean end: a segment is left for
    // the next only when the next record does not fit in it, so if this
    // one's first record would have fit there, that one lost its tail (a
    // power loss that kept later writes, or a crash inside a cut) and what
    // follows is not a prefix of the log.
    let mut prev: Option<(u32, u64)> = None;
    inner.weighing.inline = true;
    for (&id, seg) in &segments {
        if id < pos_seg(replay_from) {
            continue;
        }
        if let (Some((pid, plen)), Some(first)) = (prev, first_record_bytes(seg)?) {
            if plen + first <= crate::limits::SEGMENT_BYTES {
                cut = Some((pid, plen, format!("it ends at {plen} bytes, yet the first record of {} ({first} bytes) would have fit in it: its tail was lost", seg.path.display())));
                break;
            }
        }
        let start = if id == pos_seg(replay_from) { pos_off(replay_from) as u64 } else { SEGMENT_HEADER_BYTES };
        let stop = segment::scan(seg, start, true, |r, body| {
            let at = pos(id, r.off);
            // What a replicated record must satisfy before it is appended
            // (sizes and ids this site can act on) holds for every record
            // in the log; one that does not, yet has a valid checksum, was
            // not written by this code: an error naming it, not a volume
            // of 2^64 bytes. (Not a torn tail: acknowledged records follow.)
            super::snapshot::check_body(&r.header, body.unwrap_or(&r.checked))
                .map_err(|why| anyhow::anyhow!("record at offset {} of log segment {}: {why}", r.off, seg.path.display()))?;
            inner.apply(&r.header, at, &r.checked, body);
            replayed += 1;
            Ok(())
        })
        .with_context(|| format!("failed to replay log segment {}", seg.path.display()))?;
        if let Some(s) = stop {
            cut = Some((id, s.off, s.reason));
            break;
        }
        prev = Some((id, seg.len()));
    }
    inner.weighing.inline = false;
    if let Some((id, off, reason)) = cut {
        let path = segments[&id].path.clone();
        // What lies past the damage: nothing, or the rest of a write torn
        // by a crash, or intact records. Intact records whose durability
        // marks lie past the damage prove it had been made durable (and
        // so acknowledged writes may be in and after it): not a torn
        // write, and not cut without the operator's word.
        let after = intact_records_after(&segments, id, off, trust_marks)?;
        let damage = pos(id, off as u32);
        let marker = dir.join(format!("accept-cut-{}-{off}", segment::segment_file_name(id)));
        if after.durable_max > damage {
            if !marker.exists() {
                bail!(
                    "group {name}: log segment {} is damaged at offset {off} ({reason}), and {} intact records follow it (seq {} to {}), appended after this site had made the damaged bytes durable: this is damage, not a write torn by a crash, and cutting the log there would lose acknowledged writes. The group is not opened (and the site does not start). Restore the segment from a copy, or fail over to a DR site; to cut the log at the damage anyway (what follows it is kept in {}), create the file {} and start the site again",
                    path.display(),
                    after.count,
                    after.first_seq,
                    after.last_seq,
                    dir.join("discarded").display(),
                    marker.display()
                );
            }
            tracing::error!("log of group {name}: cutting {} at offset {off}, damaged ({reason}), as {} asks: {} intact records after it (seq {} to {}) are dropped", path.display(), marker.display(), after.count, after.first_seq, after.last_seq);
        } else if after.count > 0 {
            tracing::error!(
                "log of group {name}: cutting {} at offset {off} ({reason}); {} intact records follow it (seq {} to {}), none saying the damaged bytes were durable (a power loss that kept later writes of a torn one?); they are dropped and kept in {}",
                path.display(),
                after.count,
                after.first_seq,
                after.last_seq,
                dir.join("discarded").display()
            );
        } else {
            tracing::warn!("log of group {name}: cutting torn tail of {} at offset {off}: {reason}", path.display());
        }
        keep_cut_bytes(dir, &segments[&id], off);
        // The later segments go first: a crash between the two steps then
        // leaves a torn tail to cut again, never a short segment followed
        // by later ones.
        let later: Vec<u32> = segments.range(id + 1..).map(|(k, _)| *k).collect();
        if !later.is_empty() {
            let dd = dir.join("discarded");
            std::fs::create_dir_all(&dd)?;
            for k in later {
                let s = segments.remove(&k).unwrap();
                tracing::warn!("log of group {name}: moving {} (after the torn tail) to {}", s.path.display(), dd.display());
                std::fs::rename(&s.path, dd.join(segment::segment_file_name(k)))?;
            }
            crate::crashsafe::fsync_dir(&dd)?;
            crate::crashsafe::fsync_dir(dir)?;
        }
        let seg = &segments[&id];
        seg.file.set_len(off).with_context(|| format!("failed to truncate {}", seg.path.display()))?;
        seg.file.sync_all()?;
        seg.len.store(off, std::sync::atomic::Ordering::Release);
        // Said once: the cut is made, the next open finds no damage.
        if marker.exists() {
            std::fs::remove_file(&marker).with_context(|| format!("failed to remove {}", marker.display()))?;
        }
    }

    // A resync the site stopped in can never be committed: the primary
    // begins afresh at the next connection. Its records become garbage.
    inner.abandon_staging(name, "was in progress when the site stopped");

    // A consistency check: every block must point into a segment that
    // exists and inside its length.
    for v in inner.volumes.values() {
        let mut bad: Option<String> = None;
        v.map.for_each_mapped(|b, e| {
            if !e.is_data() {
                return;
            }
            match segments.get(&e.seg) {
                Some(s) if (e.off as u64) + crate::limits::BLOCK_BYTES <= s.len() => {}
                _ => {
                    if bad.is_none() {
                        bad = Some(format!("volume {} block {b} points to segment {} offset {}, which does not exist", v.name, e.seg, e.off));
                    }
                }
            }
        });
        if let Some(b) = bad {
            bail!("group {name} in {} is inconsistent: {b}", dir.display());
        }
    }
    inner.seg_seqs.retain(|id, _| segments.contains_key(id));
    // What DR sites still need, as last persisted (never more than they
    // acknowledged, so never too little kept).
    let pf = super::load_pins(dir)?;
    inner.pins = pf.pins;
    // Anything after the recovered log may have been shipped and lost (a
    // power loss takes the page cache, not what the sender already sent):
    // each DR site this primary shipped to is suspect from here on until
    // its history is checked (`Inner::unverified`).
    inner.unverified = pf.unverified;
    let mut suspects_changed = false;
    for peer in inner.pins.keys().cloned().collect::<Vec<_>>() {
        let from = inner.next_seq;
        let e = inner.unverified.entry(peer).or_insert(u64::MAX);
        if from < *e {
            *e = from;
            suspects_changed = true;
        }
    }
    for peer in pf.dirty {
        // Was in dirty-region mode when we stopped: the set is gone, so
        // every mapped block is dirty (a full, still consistent, resync).
        let set = inner.whole_volumes_dirty();
        inner.dirty.insert(peer, set);
    }
    // What the process before wrote after the checkpoint may be in the page
    // cache only: the process died (killed, crashed), the machine did not.
    // It replays as if durable, and what is acknowledged from now on lies
    // after it in the log, where a power loss that tore it would cut the
    // new writes too. So these segments (and the directory, which may lack
    // their entries) are synced before the group is handed out (below).
    // Before, they counted as synced: a commit after the restart synced only
    // the segments it wrote, and a checkpoint or a DR's HELLO none.
    for seg in segments.range(pos_seg(replay_from)..).map(|(_, s)| s) {
        seg.unsynced.store(true, std::sync::atomic::Ordering::Release);
        inner.unsynced.push(seg.clone());
    }
    inner.dir_dirty = true;
    let tail = segments.values().next_back().cloned().unwrap_or(first_tail);
    inner.tail_off = tail.len();
    inner.tail = tail;
    inner.segments = segments;
    tracing::info!(
        "group {name}: opened in {:?} ({replayed} records replayed, {} segments, last seq {})",
        started.elapsed(),
        inner.segments.len(),
        inner.next_seq - 1
    );
    let lacking: std::collections::BTreeSet<u64> = inner.pins.values().map(|p| p.saturating_add(1)).collect();
    // A pin is the DR's last durable record as last saved (1 for a DR that
    // holds nothing, or only seq 1: taken as nothing, so its lag is never
    // under-counted), never past this log's end, nor past where its history
    // is suspect (`unverified`: after a crash, what it holds beyond that
    // may be records this log lost and then wrote anew). Not for a DR that
    // was in dirty-region mode: its pin may be a resync commit it never took.
    let held: Vec<(String, u64)> = inner
        .pins
        .iter()
        .filter(|(peer, _)| !inner.dirty.contains_key(*peer))
        .map(|(peer, &pin)| {
            let cap = inner.unverified.get(peer).map_or(u64::MAX, |from| from.saturating_sub(1)).min(inner.next_seq.saturating_sub(1));
            (peer.clone(), if pin > 1 { pin.min(cap) } else { 0 })
        })
        .collect();
    let g = Group::from_parts(&meta, dir.to_path_buf(), inner, replay_from)?;
    g.sync_to(g.flush_target()).with_context(|| format!("group {name}: failed to make the replayed log durable"))?;
    // The marks are trusted from where this site began to write the log
    // itself: kept while it stays a primary; from here on at the first
    // open as one (the records before are a DR's, marked by its primary);
    // never at a DR. A change, and a checkpoint from before marks, is
    // written out now (version 4, which earlier builds refuse to open).
    let marks = if create.written_here { loaded_marks.or(Some(g.flush_target())) } else { None };
    g.lock().marks_from = marks;
    if ckpt_version.is_none_or(|v| v < 4) || marks != loaded_marks {
        // Not fatal (a full disk is waited out, not a reason to stay
        // down): until a checkpoint is written, the next open trusts the
        // marks from where the last one says, or none.
        if let Err(e) = g.checkpoint() {
            tracing::warn!("group {name}: the checkpoint that records where durability marks start was not written (the next one will): {e:#}");
        }
    }
    // A marker the cut above did not use (the damage gone: the segment
    // restored) must not authorise a cut at that place later.
    for e in std::fs::read_dir(dir)?.flatten() {
        if e.file_name().to_str().is_some_and(|n| n.starts_with("accept-cut-")) {
            tracing::warn!("group {name}: removing {}: the log has no damage there now", e.path().display());
            let _ = std::fs::remove_file(e.path());
        }
    }
    for (peer, seq) in held {
        g.replication.seed_acked(&peer, seq);
    }
    // The write times of what DR sites lack from before the replay start
    // (replay sampled the rest): their lag in seconds counts from there.
    for seq in lacking.into_iter().rev() {
        g.sample_from_log(seq);
    }
    if suspects_changed {
        // Durable before anything is shipped: a second crash must not
        // forget where the first one may have cut the history.
        g.save_pins()?;
    }
    Ok(g)
}

/// Intact records found past a damaged place in the log.
#[derive(Debug, Default)]
struct After {
    count: u64,
    first_seq: u64,
    last_seq: u64,
    /// The furthest durability mark among them (`Header::durable`).
    durable_max: LogPos,
}

/// The intact records (header and checked body verify) in segment `id`
/// past offset `off`, and in every later segment: searched for at every
/// byte, since the damaged record's length cannot be trusted (unless its
/// header and block checksums verify and only its data is damaged: then
/// the search starts after it, and guest data in it is never read as
/// records). A mark counts (`durable_max`) only from a record at or past
/// `trust` whose mark lies between `trust` and the record itself: a mark
/// is where the log was durable when the record was appended, never past
/// it, so one that is not is not this log's (a forged record in guest
/// data, a DR's primary's). Bounded: at most `SEGMENT_BYTES` read per
/// segment and `2 * SEGMENT_BYTES` checksummed in all; past that the
/// search stops, and what it found so far decides.
fn intact_records_after(segments: &BTreeMap<u32, Arc<Segment>>, id: u32, off: u64, trust: Option<LogPos>) -> Result<After> {
    use crate::log::record::{Header, HEADER_BYTES, RECORD_MAGIC};
    let mut a = After::default();
    let mut budget = 2 * crate::limits::SEGMENT_BYTES;
    for (&sid, seg) in segments.range(id..) {
        let start = if sid == id { off } else { SEGMENT_HEADER_BYTES };
        let len = seg.file.metadata()?.len().min(start + crate::limits::SEGMENT_BYTES);
        if start >= len {
            continue;
        }
        let mut bytes = vec![0u8; (len - start) as usize];
        seg.read_at(&mut bytes, start)?;
        let magic = RECORD_MAGIC.to_le_bytes();
        // The damaged record itself: skipped whole if its header stands.
        let mut p = 0usize;
        if sid == id {
            p = 1;
            if let Some(raw) = bytes.get(..HEADER_BYTES).map(|b| <&[u8; HEADER_BYTES]>::try_from(b).expect("header length")) {
                if let Ok(h) = Header::decode(raw) {
                    let checked_end = HEADER_BYTES + h.checked_body_len();
                    if (h.total_len() as usize) <= bytes.len() && h.verify(raw, &bytes[HEADER_BYTES..checked_end]).is_ok() {
                        p = h.total_len() as usize;
                    }
                }
            }
        }
        while p + HEADER_BYTES <= bytes.len() {
            if bytes[p..p + 4] != magic {
                p += 1;
                continue;
            }
            let raw: &[u8; HEADER_BYTES] = bytes[p..p + HEADER_BYTES].try_into().expect("header length");
            let Ok(h) = Header::decode(raw) else {
                p += 1;
                continue;
            };
            let at = pos(sid, (start + p as u64) as u32);
            let end = p as u64 + h.total_len();
            if end > bytes.len() as u64 {
                p += 1;
                continue;
            }
            if budget < h.checked_body_len() as u64 {
                break;
            }
            budget -= h.checked_body_len() as u64;
            if h.verify(raw, &bytes[p + HEADER_BYTES..p + HEADER_BYTES + h.checked_body_len()]).is_err() {
                p += 1;
                continue;
            }
            if a.count == 0 {
                a.first_seq = h.seq;
            }
            a.count += 1;
            a.last_seq = h.seq;
            if trust.is_some_and(|t| at >= t && h.durable >= t && h.durable <= at) {
                a.durable_max = a.durable_max.max(h.durable);
            }
            p = end as usize;
        }
    }
    Ok(a)
}

/// Copies what a cut drops of segment `seg` (from `off` to its end) to
/// `discarded/<segment>.cut-at-<off>`, so that the bytes are there to
/// look at or recover from. A copy that fails (a full disk) is said and
/// does not stop the open.
fn keep_cut_bytes(dir: &Path, seg: &Segment, off: u64) {
    let keep = || -> Result<Option<PathBuf>> {
        let len = seg.file.metadata()?.len();
        if off >= len {
            return Ok(None);
        }
        // A segment is never longer than SEGMENT_BYTES; a file that is
        // (not ours) is kept up to that.
        let mut bytes = vec![0u8; (len - off).min(crate::limits::SEGMENT_BYTES) as usize];
        seg.read_at(&mut bytes, off)?;
        let dd = dir.join("discarded");
        std::fs::create_dir_all(&dd)?;
        // A cut at the same place before (positions are reused after a
        // cut) keeps its copy.
        let mut to = dd.join(format!("{}.cut-at-{off}", segment::segment_file_name(seg.id)));
        if to.exists() {
            to = dd.join(format!("{}.cut-at-{off}.{}", segment::segment_file_name(seg.id), crate::util::now_ns()));
        }
        crate::crashsafe::write_file(&to, &bytes)?;
        crate::crashsafe::fsync_dir(dir)?;
        Ok(Some(to))
    };
    match keep() {
        Ok(Some(to)) => tracing::warn!("the {} bytes cut from {} at offset {off} are kept in {}", seg.file.metadata().map(|m| m.len().saturating_sub(off)).unwrap_or(0), seg.path.display(), to.display()),
        Ok(None) => {}
        Err(e) => tracing::error!("the bytes cut from {} at offset {off} could not be kept: {e:#}", seg.path.display()),
    }
}

/// The length of the first record of `seg`, if its header is there and
/// reads (a segment whose first record is torn is cut at it by the scan).
fn first_record_bytes(seg: &Segment) -> Result<Option<u64>> {
    let mut h = [0u8; crate::log::record::HEADER_BYTES];
    if seg.len() < SEGMENT_HEADER_BYTES + h.len() as u64 {
        return Ok(None);
    }
    seg.read_at(&mut h, SEGMENT_HEADER_BYTES)?;
    Ok(crate::log::record::Header::decode(&h).ok().map(|h| h.total_len()))
}

/// The segment file's header is all zeros: created, never written.
fn header_never_written(path: &Path) -> Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut h = [0u8; SEGMENT_HEADER_BYTES as usize];
    let f = std::fs::File::open(path).with_context(|| format!("failed to open {}", path.display()))?;
    Ok(f.read_exact_at(&mut h, 0).is_ok() && h.iter().all(|&b| b == 0))
}
