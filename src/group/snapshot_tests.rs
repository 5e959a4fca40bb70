//! Snapshot engine tests: a seeded mix of writes and snapshot operations
//! against a model (one byte array per map), checked live, after a clean
//! reopen (checkpoint) and after a crash (log replay); operations cost
//! metadata only; GC keeps what snapshots need and frees it after delete.

use std::collections::BTreeMap;
use std::sync::Arc;

use rand::{Rng, SeedableRng};

use super::*;

const SIZE: u64 = 2 << 20;

fn read_all(g: &Group, name: &str) -> Vec<u8> {
    let v = g.volume(name).unwrap_or_else(|| panic!("{name} missing"));
    let mut buf = vec![0u8; v.size as usize];
    g.read(v.id, 0, &mut buf).unwrap();
    buf
}

/// The distinct-block counts GC weighs equal a count made from scratch:
/// every log place some map points at, once.
pub(super) fn check_distinct(g: &Group, when: &str) {
    // Every operation that drops a map weighs its blocks before it returns
    // (a replicated record, or an operation that failed after the drop:
    // the next maintenance round does).
    assert!(g.lock_read().weighing.settled(), "{when}: a dropped map's blocks are still to be weighed");
    check_counts(g, when);
}

/// `check_distinct`, except that a segment a queued walk will weigh may
/// count over (never under) until the walk is done.
fn check_counts(g: &Group, when: &str) {
    let inner = g.lock_read();
    // What NBD reads without the lock is what the maps say.
    assert_eq!(*g.catalog.0.read(), Catalog::of(&inner.volumes), "{when}: the catalog differs from the maps");
    let mut places = std::collections::HashSet::new();
    for v in inner.volumes.values() {
        v.map.for_each_mapped(|_, e| {
            if e.is_data() {
                places.insert((e.seg, e.off));
            }
        });
    }
    let mut want: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
    for (seg, _) in places {
        *want.entry(seg).or_insert(0) += 1;
    }
    let mut have = inner.distinct.clone();
    for (seg, n) in have.iter_mut() {
        let exact = want.get(seg).copied().unwrap_or(0);
        if inner.weighing.segs.contains_key(seg) {
            assert!(*n >= exact, "{when}: segment {seg} counts {n} distinct blocks, under the {exact} there are, while a walk is queued");
            *n = exact;
        }
    }
    have.retain(|_, n| *n > 0);
    assert_eq!(have, want, "{when}: distinct block counts are off");
    let mut refs: std::collections::HashMap<u32, u64> = std::collections::HashMap::new();
    for v in inner.volumes.values() {
        for (seg, n) in v.map.seg_ref_counts() {
            *refs.entry(*seg).or_insert(0) += n;
        }
    }
    assert_eq!(inner.refs, refs, "{when}: reference totals are off");
}

/// The counts GC weighs stay exact through every map operation on maps
/// that span several 128 MiB regions (shared by pointer, copied on write,
/// of different sizes): writes, zeroes and trims anywhere, snapshots,
/// restores, refreshes, syncs, deletes, shrinks and growths, GC rounds,
/// and a reopen. For stretches of steps the walks that weigh dropped maps
/// are held back, so that every kind of change lands between a drop and
/// its walk (and drops pile up before one).
#[test]
fn distinct_counts_stay_exact_across_regions() {
    use crate::volume::map::REGION_BLOCKS;
    crate::util::set_sim_clock(Some(1));
    let region = REGION_BLOCKS * BLOCK_BYTES;
    for seed in 0..4u64 {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(100 + seed);
        let g = Group::open(dir.path(), "cg0").unwrap();
        let vol = g.create_volume("v", 3 * region).unwrap();
        let mut snaps: Vec<String> = Vec::new();
        let mut n = 0;
        for step in 0..400u32 {
            let size = g.volume("v").unwrap().size;
            let at = |rng: &mut rand::rngs::StdRng| rng.random_range(0..size / 4096 - 16) * 4096;
            match rng.random_range(0..24) {
                0..=11 => {
                    // Clustered near region edges half of the time.
                    let off = if rng.random_bool(0.5) { (rng.random_range(1..3u64) * region).min(size - 65536) - 4096 * rng.random_range(0..4u64) } else { at(&mut rng) };
                    let len = 4096 * rng.random_range(1..=16u64);
                    let writable: Vec<String> = g.maps().into_iter().filter(|m| m.writable).map(|m| m.name).collect();
                    let target = g.volume(&writable[rng.random_range(0..writable.len())]).unwrap();
                    if off + len <= target.size {
                        g.write(target.id, off, &vec![step as u8; len as usize]).unwrap();
                    }
                }
                12 | 13 => {
                    let off = at(&mut rng);
                    g.zero(vol, off, 4096 * rng.random_range(1..=16u64), rng.random_bool(0.5)).unwrap();
                }
                14 | 15 => {
                    n += 1;
                    let src = if snaps.is_empty() || rng.random_bool(0.7) { "v".to_string() } else { snaps[rng.random_range(0..snaps.len())].clone() };
                    g.create_snapshot(&src, &format!("s{n}"), rng.random_bool(0.3)).unwrap();
                    snaps.push(format!("v@s{n}"));
                }
                16 if !snaps.is_empty() => {
                    let s = &snaps[rng.random_range(0..snaps.len())];
                    g.restore_snapshot("v", s).unwrap();
                }
                17 if !snaps.is_empty() => {
                    let s = &snaps[rng.random_range(0..snaps.len())];
                    g.refresh_snapshot("v", s).unwrap();
                }
                18 if snaps.len() >= 2 => {
                    let (a, b) = (&snaps[rng.random_range(0..snaps.len())], &snaps[rng.random_range(0..snaps.len())]);
                    if a != b {
                        g.sync_snapshots(a, b).unwrap();
                    }
                }
                19 | 20 if !snaps.is_empty() => {
                    let i = rng.random_range(0..snaps.len());
                    let s = snaps.remove(i);
                    g.delete_snapshot("v", &s).unwrap();
                }
                21 => {
                    let new = rng.random_range(1..=6u64) * region / 2;
                    g.resize_volume("v", new).unwrap();
                }
                22 => {
                    g.checkpoint().unwrap();
                    g.collect_garbage().unwrap();
                }
                _ => {}
            }
            let when = format!("seed {seed} step {step}");
            if g.hold_walks.load(Ordering::Acquire) {
                check_counts(&g, &when);
                if rng.random_bool(0.1) {
                    g.hold_walks.store(false, Ordering::Release);
                    g.settle_counts();
                    check_distinct(&g, &format!("{when}, walks released"));
                }
            } else {
                check_distinct(&g, &when);
                if rng.random_bool(0.1) {
                    g.hold_walks.store(true, Ordering::Release);
                }
            }
        }
        g.hold_walks.store(false, Ordering::Release);
        g.settle_counts();
        check_distinct(&g, &format!("seed {seed} at the end"));
        g.close().unwrap();
        drop(g);
        let g = Group::open(dir.path(), "cg0").unwrap();
        check_distinct(&g, &format!("seed {seed} after reopen"));
    }
}

/// A dropped map's blocks weighed after other changes: a segment whose
/// count is over while its walk is queued is always asked about (its count
/// could look unshared: here it is 108 against 16 references), a walk
/// that finishes after the counts were made afresh changes nothing, and
/// replay after a crash weighs the same drops at once.
#[test]
fn a_drop_weighed_later_counts_exactly() {
    crate::util::set_sim_clock(Some(1));
    let dir = tempfile::tempdir().unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    let v = g.create_volume("v", SIZE).unwrap();
    g.write(v, 0, &[1u8; 8 * 4096]).unwrap();
    g.create_snapshot("v", "a", false).unwrap();
    let b = g.create_snapshot("v", "b", true).unwrap();
    g.write(b, 64 * 4096, &[2u8; 100 * 4096]).unwrap();
    check_distinct(&g, "before");
    g.hold_walks.store(true, Ordering::Release);
    g.delete_snapshot("v", "b").unwrap();
    {
        let inner = g.lock_read();
        let seg = inner.tail.id;
        assert_eq!((inner.distinct_refs(seg), inner.refs[&seg]), (108, 16), "b's own blocks count until weighed");
    }
    // Block 0 of v is a's too: it keeps counting.
    g.write(v, 0, &[3u8; 4096]).unwrap();
    check_counts(&g, "an overwrite of a shared block while b is unweighed");
    g.hold_walks.store(false, Ordering::Release);
    g.settle_counts();
    check_distinct(&g, "after the walk");

    // Counted afresh while a walk is under way: the walk's result is void.
    let c = g.create_snapshot("v", "c", true).unwrap();
    g.write(c, 200 * 4096, &[4u8; 10 * 4096]).unwrap();
    g.hold_walks.store(true, Ordering::Release);
    g.delete_snapshot("v", "c").unwrap();
    let walks = std::mem::take(&mut g.lock().weighing.walks);
    assert_eq!(walks.len(), 1);
    g.lock().recount_distinct();
    for w in walks {
        let gone = w.weigh();
        assert_eq!(gone.values().sum::<u64>(), 10);
        g.lock().finish_walk(&w, gone);
    }
    check_distinct(&g, "a walk finished after a recount");
    // A crash: replay applies both deletes again, weighing at once.
    g.abandon();
    drop(g);
    let g = Group::open(dir.path(), "cg0").unwrap();
    check_distinct(&g, "after replay");
    assert_eq!(g.live_bytes(), 9 * 4096, "v's 8 blocks and a's own block 0");
    g.close().unwrap();
}

fn check(g: &Group, model: &BTreeMap<String, Vec<u8>>, when: &str) {
    check_distinct(g, when);
    let names: Vec<String> = g.maps().into_iter().map(|v| v.name).collect();
    assert_eq!(names.len(), model.len(), "{when}: maps {names:?} vs model {:?}", model.keys().collect::<Vec<_>>());
    for (name, want) in model {
        assert!(read_all(g, name) == *want, "{when}: {name} differs from the model");
    }
}

#[test]
fn seeded_snapshot_ops_match_model_and_survive_reopen_and_crash() {
    for seed in 0..6u64 {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let g = Group::open(dir.path(), "cg0").unwrap();
        g.create_volume("v", SIZE).unwrap();
        model.insert("v".into(), vec![0u8; SIZE as usize]);
        let mut n = 0;
        for step in 0..300u32 {
            let snaps: Vec<String> = model.keys().filter(|k| k.contains('@')).cloned().collect();
            let writable: Vec<String> = g.maps().into_iter().filter(|m| m.writable).map(|m| m.name).collect();
            match rng.random_range(0..20) {
                0..=9 => {
                    let target = &writable[rng.random_range(0..writable.len())];
                    let size = model[target].len() as u64;
                    let off = rng.random_range(0..size - 1);
                    let len = rng.random_range(1..(size - off).min(40_000));
                    let data: Vec<u8> = (0..len).map(|i| (i as u8) ^ (step as u8)).collect();
                    let id = g.volume(target).unwrap().id;
                    g.write(id, off, &data).unwrap();
                    model.get_mut(target).unwrap()[off as usize..(off + len) as usize].copy_from_slice(&data);
                }
                10..=12 => {
                    let src = if snaps.is_empty() || rng.random_bool(0.6) { "v".to_string() } else { snaps[rng.random_range(0..snaps.len())].clone() };
                    n += 1;
                    let name = format!("s{n}");
                    g.create_snapshot(&src, &name, rng.random_bool(0.3)).unwrap();
                    let content = model[&src].clone();
                    model.insert(format!("v@{name}"), content);
                }
                13 if !snaps.is_empty() => {
                    let s = &snaps[rng.random_range(0..snaps.len())];
                    g.restore_snapshot("v", s).unwrap();
                    let c = model[s].clone();
                    model.insert("v".into(), c);
                }
                14 if !snaps.is_empty() => {
                    let s = &snaps[rng.random_range(0..snaps.len())];
                    g.refresh_snapshot("v", s).unwrap();
                    let c = model["v"].clone();
                    model.insert(s.clone(), c);
                }
                15 if snaps.len() >= 2 => {
                    let a = &snaps[rng.random_range(0..snaps.len())];
                    let b = &snaps[rng.random_range(0..snaps.len())];
                    if a != b {
                        g.sync_snapshots(a, b).unwrap();
                        let c = model[a].clone();
                        model.insert(b.clone(), c);
                    }
                }
                16 if !snaps.is_empty() => {
                    let s = &snaps[rng.random_range(0..snaps.len())];
                    g.delete_snapshot("v", s).unwrap();
                    model.remove(s);
                }
                17 => {
                    let size = rng.random_range(1..=4u64) * (SIZE / 2);
                    g.resize_volume("v", size).unwrap();
                    model.get_mut("v").unwrap().resize(size as usize, 0);
                }
                _ => {}
            }
            if step % 50 == 0 {
                check(&g, &model, &format!("seed {seed} step {step}"));
            }
            check_distinct(&g, &format!("seed {seed} step {step}"));
            if step % 60 == 59 {
                // GC relocations move shared blocks of every map at once.
                g.checkpoint().unwrap();
                g.collect_garbage().unwrap();
                check_distinct(&g, &format!("seed {seed} step {step} after GC"));
            }
        }
        check(&g, &model, &format!("seed {seed} end"));
        // A crash: reopen a copy of the files as they are (log replay).
        let copy = dir.path().join("crash");
        g.sync_to(g.flush_target()).unwrap();
        super::tests::power_cut::cut_copy(&g, &copy, &mut rng);
        {
            let c = Group::open(&copy, "cg0").unwrap();
            check(&c, &model, &format!("seed {seed} after crash"));
            c.abandon();
        }
        // Clean close (checkpoint) and reopen.
        g.close().unwrap();
        g.abandon();
        drop(g);
        let g = Group::open(dir.path(), "cg0").unwrap();
        check(&g, &model, &format!("seed {seed} after reopen"));
    }
}

/// Snapshot, restore, refresh, sync and delete of a fully written volume
/// append one small record each: no data is copied, and the maps share
/// regions until written.
#[test]
fn operations_cost_metadata_only() {
    let dir = tempfile::tempdir().unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    let size = 256u64 << 20;
    let vol = g.create_volume("v", size).unwrap();
    let chunk = vec![7u8; 1 << 20];
    for i in 0..size / (1 << 20) {
        g.write(vol, i << 20, &chunk).unwrap();
    }
    // Durable first: each operation syncs the log, and the first would
    // otherwise flush the 256 MiB written above inside the timing.
    g.sync_to(g.flush_target()).unwrap();
    let before = g.log_bytes();
    let t = std::time::Instant::now();
    g.create_snapshot("v", "a", false).unwrap();
    g.create_snapshot("v@a", "b", true).unwrap();
    g.restore_snapshot("v", "a").unwrap();
    g.refresh_snapshot("v", "a").unwrap();
    g.sync_snapshots("v@a", "v@b").unwrap();
    g.delete_snapshot("v", "b").unwrap();
    let took = t.elapsed();
    let grew = g.log_bytes() - before;
    assert!(grew < 6 * 256, "six operations added {grew} log bytes");
    // Metadata only is what the byte count above shows; this bound only
    // catches a copy of the volume per operation, with room for a slow
    // machine (a background checkpoint may hold the sync lock meanwhile).
    assert!(took < std::time::Duration::from_secs(10), "six operations took {took:?}");
    // Unique bytes: the snapshot shares everything with the volume.
    let s = g.snapshots(Some("v"));
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].unique_bytes, 0);
    g.write(vol, 0, &vec![9u8; 1 << 20]).unwrap();
    let s = g.snapshots(Some("v"));
    assert_eq!(s[0].unique_bytes, 1 << 20, "after overwriting 1 MiB of the volume");
    assert_eq!(s[0].parent, "v");
    // Read-only snapshots refuse writes; volumes with snapshots refuse delete.
    let sid = g.volume("v@a").unwrap().id;
    assert!(matches!(g.write(sid, 0, &[1u8; 4096]), Err(IoError::ReadOnly(_))));
    assert!(g.delete_volume("v").unwrap_err().to_string().contains("has snapshots"));
    assert!(g.create_snapshot("v", "a", false).unwrap_err().to_string().contains("already exists"));
    assert!(g.create_snapshot("nope", "x", false).is_err());
    assert!(g.restore_snapshot("v", "nope").is_err());
}

/// GC keeps blocks only a snapshot references, relocates blocks shared by
/// several maps once (moving all of them), and frees them after delete.
#[test]
fn gc_keeps_snapshot_blocks_and_frees_them_after_delete() {
    // No background threads: only this test's own GC rounds run, so what
    // it asserts freed was freed by them.
    crate::util::set_sim_clock(Some(1));
    let dir = tempfile::tempdir().unwrap();
    let g: Arc<Group> = Group::open(dir.path(), "cg0").unwrap();
    let size: u64 = 48 << 20;
    let vol = g.create_volume("v", size).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for i in 0..size / 65536 {
        g.write(vol, i * 65536, &vec![(i % 200) as u8 + 1; 65536]).unwrap();
    }
    g.create_snapshot("v", "keep", false).unwrap();
    let snap_model = read_all(&g, "v@keep");
    let mut model = snap_model.clone();
    // Overwrite half of the volume many times: the other half stays shared.
    for i in 0..(14 * size / 65536) {
        let off = rng.random_range(0..size / 65536 / 2) * 65536;
        let b = (i % 251) as u8;
        g.write(vol, off, &vec![b; 65536]).unwrap();
        model[off as usize..off as usize + 65536].fill(b);
    }
    // Overwritten segments the snapshot does not need are freed (GC run
    // here rather than waited for, so the test does not depend on timing).
    g.checkpoint().unwrap();
    g.collect_garbage().unwrap();
    assert!(g.stats.gc_segments_freed.load(Ordering::Relaxed) > 0, "GC freed nothing: log {} live {}", g.log_bytes(), g.live_bytes());
    // Relocate the first segment (blocks shared by the volume and the
    // snapshot, and blocks only the snapshot holds): it must end with no
    // references, and both maps must read the same.
    g.checkpoint().unwrap();
    let first = g.segment(1).expect("segment 1 still held by the snapshot");
    assert_eq!(g.relocate(&first).unwrap(), None);
    assert_eq!(g.lock_read().live_refs(1), 0, "segment 1 still referenced after relocation");
    check_distinct(&g, "after relocating blocks shared by a volume and its snapshot");
    assert!(g.stats.gc_relocated_bytes.load(Ordering::Relaxed) > 0);
    assert!(read_all(&g, "v@keep") == snap_model, "snapshot changed under GC");
    assert!(read_all(&g, "v") == model, "volume changed under GC");
    // Every segment the snapshot references; after its delete, cleaning
    // them moves only the volume's blocks, and then they are freed.
    let snap_segs: Vec<u32> = {
        let inner = g.lock_read();
        let snap = inner.volumes.values().find(|m| m.name == "v@keep").unwrap();
        snap.map.seg_ref_counts().keys().copied().collect()
    };
    let live_before = g.live_bytes();
    g.delete_snapshot("v", "keep").unwrap();
    assert!(g.live_bytes() + (24 << 20) <= live_before, "delete released {} live bytes", live_before - g.live_bytes());
    // Move the tail past them (a checkpoint before and after), then clean.
    g.checkpoint().unwrap();
    for i in 0..(72 << 20) / 65536u64 {
        let off = (size / 2) + (i % (size / 2 / 65536)) * 65536;
        g.write(vol, off, &vec![0xA5; 65536]).unwrap();
        model[off as usize..off as usize + 65536].fill(0xA5);
    }
    g.checkpoint().unwrap();
    for seg in &snap_segs {
        if let Some(s) = g.segment(*seg) {
            assert_eq!(g.relocate(&s).unwrap(), None);
        }
    }
    g.collect_garbage().unwrap();
    check_distinct(&g, "after the snapshot's delete and cleaning");
    for seg in &snap_segs {
        assert!(g.segment(*seg).is_none(), "segment {seg} (the deleted snapshot's) was not freed after cleaning");
    }
    assert!(read_all(&g, "v") == model);
    g.close().unwrap();
    drop(g);
    let g = Group::open(dir.path(), "cg0").unwrap();
    assert!(read_all(&g, "v") == model);
}

/// GC weighs a block shared by a volume and its snapshots once: with
/// three snapshots of a written volume, the live bytes are the volume's,
/// not four times them, and a segment half of whose blocks are garbage is
/// a candidate for cleaning although every live block in it is shared.
#[test]
fn a_block_shared_by_snapshots_counts_once_for_gc() {
    crate::util::set_sim_clock(Some(1));
    let dir = tempfile::tempdir().unwrap();
    let g: Arc<Group> = Group::open(dir.path(), "cg0").unwrap();
    let size: u64 = 32 << 20;
    let vol = g.create_volume("v", size).unwrap();
    for i in 0..size / 65536 {
        g.write(vol, i * 65536, &vec![1u8; 65536]).unwrap();
    }
    // The first half again: segment 1's first half is garbage now.
    for i in 0..size / 2 / 65536 {
        g.write(vol, i * 65536, &vec![2u8; 65536]).unwrap();
    }
    assert_eq!(g.live_bytes(), size);
    for s in ["a", "b", "c"] {
        g.create_snapshot("v", s, false).unwrap();
    }
    assert_eq!(g.live_bytes(), size, "four maps sharing every block");
    {
        let inner = g.lock_read();
        let seg1 = inner.segments[&1].len();
        let live = inner.distinct_refs(1) * BLOCK_BYTES;
        assert_eq!(inner.live_refs(1) * BLOCK_BYTES, 4 * live, "every map still points at the shared half");
        assert!(live as f64 <= seg1 as f64 * crate::limits::GC_LIVE_RATIO_MAX, "segment 1 ({seg1} bytes, {live} live) is no cleaning candidate");
    }
    // The volume moves on: the snapshots' copy of the second half is
    // theirs alone, counted once for the three.
    for i in size / 2 / 65536..size / 65536 {
        g.write(vol, i * 65536, &vec![3u8; 65536]).unwrap();
    }
    assert_eq!(g.live_bytes(), size + size / 2);
    check_distinct(&g, "after the volume moved on");
    g.delete_snapshot("v", "a").unwrap();
    g.delete_snapshot("v", "b").unwrap();
    assert_eq!(g.live_bytes(), size + size / 2, "c still holds the old half");
    g.delete_snapshot("v", "c").unwrap();
    assert_eq!(g.live_bytes(), size);
    g.resize_volume("v", size / 2).unwrap();
    assert_eq!(g.live_bytes(), size / 2);
    check_distinct(&g, "after the shrink");
    // The same after a reopen (counted from the checkpoint and replay).
    g.close().unwrap();
    drop(g);
    let g = Group::open(dir.path(), "cg0").unwrap();
    assert_eq!(g.live_bytes(), size / 2);
    check_distinct(&g, "after reopen");
}

/// A checkpoint stores a region shared by several maps once, and loading
/// it shares the region again: snapshots cost neither checkpoint bytes nor
/// memory after a restart.
#[test]
fn checkpoint_keeps_regions_shared() {
    let dir = tempfile::tempdir().unwrap();
    let size = 256u64 << 20;
    {
        let g = Group::open(dir.path(), "cg0").unwrap();
        let vol = g.create_volume("v", size).unwrap();
        let chunk = vec![3u8; 1 << 20];
        for i in 0..size / (1 << 20) {
            g.write(vol, i << 20, &chunk).unwrap();
        }
        g.checkpoint().unwrap();
        let alone = std::fs::metadata(dir.path().join(checkpoint::FILE_NAME)).unwrap().len();
        for i in 0..8 {
            g.create_snapshot("v", &format!("s{i}"), false).unwrap();
        }
        // One region of the volume diverges from the snapshots.
        g.write(vol, 0, &vec![4u8; 4096]).unwrap();
        g.checkpoint().unwrap();
        let with = std::fs::metadata(dir.path().join(checkpoint::FILE_NAME)).unwrap().len();
        // The diverged region is stored twice (old and new); the rest once.
        let region = crate::volume::map::REGION_BLOCKS * 12;
        assert!(with <= alone + region + 4096, "8 snapshots grew the checkpoint from {alone} to {with} bytes");
        g.close().unwrap();
    }
    let g = Group::open(dir.path(), "cg0").unwrap();
    let inner = g.lock_read();
    let v = inner.volumes.values().find(|m| m.name == "v").unwrap();
    for s in inner.volumes.values().filter(|m| m.snap.is_some()) {
        assert!(!s.map.region_shared(&v.map, 0), "region 0 diverged but is shared after reload");
        assert!(s.map.region_shared(&v.map, 1), "{}: region 1 not shared with the volume after reload", s.name);
        let first = inner.volumes.values().find(|m| m.name == "v@s0").unwrap();
        assert!(s.map.region_shared(&first.map, 0), "{}: snapshots no longer share region 0", s.name);
        assert_eq!(s.map.mapped(), v.map.mapped());
    }
    drop(inner);
    let mut buf = vec![0u8; 8192];
    let sid = g.volume("v@s5").unwrap().id;
    g.read(sid, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 3));
}

/// A replicated record whose JSON body does not parse (a buggy or hostile
/// primary; the CRC only proves it arrived as sent) is refused with its seq
/// and kind named, and nothing is applied: an unreadable map table must not
/// read as "no maps" and delete everything.
/// A record as a primary ships it: header (epoch 1, offset 0), the
/// checked body (block CRCs, or an operation's description), then `rest`.
fn raw_record(kind: crate::log::record::Kind, flags: u16, seq: u64, volume: u32, length: u32, checked: &[u8], rest: &[u8]) -> Vec<u8> {
    raw_record_at(kind, flags, seq, volume, 0, length, checked, rest)
}

/// `raw_record` with its offset field.
#[allow(clippy::too_many_arguments)]
fn raw_record_at(kind: crate::log::record::Kind, flags: u16, seq: u64, volume: u32, offset: u64, length: u32, checked: &[u8], rest: &[u8]) -> Vec<u8> {
    use crate::log::record::{Header, HEADER_BYTES};
    let mut h = Header { kind, flags, epoch: 1, seq, timestamp_ns: 1, volume, length, offset, body_len: (checked.len() + rest.len()) as u32, crc: 0, durable: 0 };
    let mut hdr = [0u8; HEADER_BYTES];
    h.encode(checked, &mut hdr);
    let mut out = hdr.to_vec();
    out.extend_from_slice(checked);
    out.extend_from_slice(rest);
    out
}

#[test]
fn replicated_records_with_bad_bodies_are_refused() {
    use crate::log::record::Kind;
    let dir = tempfile::tempdir().unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    g.create_volume("v", 1 << 20).unwrap();
    let next = g.last_seq() + 1;
    let raw = |kind: Kind, seq: u64, body: &[u8]| raw_record(kind, 0, seq, 7, 0, body, &[]);
    let gen = g.receiver_gen.load(Ordering::Acquire);
    let e = g.append_replicated(&raw(Kind::SnapCreate, next, b"{not json"), gen).unwrap_err();
    assert!(e.contains(&format!("record seq {next}")) && e.contains("snapshot description"), "{e}");
    let e = g.append_replicated(&raw(Kind::ResyncCommit, next, b"[1,2"), gen).unwrap_err();
    assert!(e.contains("map table"), "{e}");
    assert_eq!(g.last_seq(), next - 1, "nothing was appended");
    assert!(g.volume("v").is_some(), "the volume is still there");
}

/// Found in review: a DR site with `protect_snapshots` retains a snapshot
/// the primary deleted while the DR was being resynced. Blocks the attempt
/// had staged for that snapshot before the deletion must not be applied to
/// the retained copy at the commit (it would mix two points in time).
#[test]
fn a_retained_snapshot_takes_no_staged_blocks_at_the_commit() {
    use crate::log::record::{self, Kind, FLAG_RESYNC};
    let dir = tempfile::tempdir().unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    g.protect_snapshots.store(true, Ordering::Relaxed);
    let v = g.create_volume("v", 1 << 20).unwrap();
    g.write(v, 0, &vec![7u8; 4096]).unwrap();
    let s = g.create_snapshot("v", "s", true).unwrap();
    let gen = g.receiver_gen.load(Ordering::Acquire);
    let last = g.last_seq();
    g.append_replicated(&raw_record(Kind::ResyncBegin, 0, 0, 0, 0, &[], &[]), gen).unwrap();
    // The attempt stages the primary's newer content of the snapshot ...
    let data = vec![9u8; 4096];
    g.append_replicated(&raw_record(Kind::Write, FLAG_RESYNC, 0, s, 4096, &record::block_crcs(&data), &data), gen).unwrap();
    // ... then the primary deletes it: its table lists only the volume.
    let table = vec![resync::CommitEntry { id: v, name: "v".into(), size: 1 << 20, snap: None, base: None }];
    let body = serde_json::to_vec(&table).unwrap();
    g.append_replicated(&raw_record(Kind::ResyncCommit, 0, last + 5, 0, 0, &body, &[]), gen).unwrap();
    let mut buf = vec![0u8; 4096];
    g.read(s, 0, &mut buf).expect("the snapshot is retained");
    assert!(buf.iter().all(|b| *b == 7), "the retained snapshot kept its own content");
    g.read(v, 0, &mut buf).unwrap();
    assert!(buf.iter().all(|b| *b == 7));
    // What a maintenance round does after a replicated record.
    g.settle_counts();
    check_distinct(&g, "after a resync commit");
}

/// A resync commit replaces maps wholesale: `distinct` is set to its upper
/// bound (`refs`) at once and brought down by a walk of every map off the
/// lock. Changes before that walk (an overwrite of a shared block, a
/// snapshot delete with its own queued walk) still end exact.
#[test]
fn a_resync_commit_counts_afresh_off_the_lock() {
    use crate::log::record::{self, Kind, FLAG_RESYNC};
    crate::util::set_sim_clock(Some(1));
    let dir = tempfile::tempdir().unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    let v = g.create_volume("v", 1 << 20).unwrap();
    g.write(v, 0, &[1u8; 8 * 4096]).unwrap();
    let s = g.create_snapshot("v", "s", false).unwrap();
    g.write(v, 32 * 4096, &[2u8; 4 * 4096]).unwrap();
    let gen = g.receiver_gen.load(Ordering::Acquire);
    g.append_replicated(&raw_record(Kind::ResyncBegin, 0, 0, 0, 0, &[], &[]), gen).unwrap();
    let data = vec![9u8; 4096];
    g.append_replicated(&raw_record(Kind::Write, FLAG_RESYNC, 0, v, 4096, &record::block_crcs(&data), &data), gen).unwrap();
    let meta = g.lock_read().volumes[&s].snap.clone();
    let table = vec![
        resync::CommitEntry { id: v, name: "v".into(), size: 1 << 20, snap: None, base: None },
        resync::CommitEntry { id: s, name: "v@s".into(), size: 1 << 20, snap: meta, base: None },
    ];
    let body = serde_json::to_vec(&table).unwrap();
    g.hold_walks.store(true, Ordering::Release);
    g.append_replicated(&raw_record(Kind::ResyncCommit, 0, g.last_seq() + 5, 0, 0, &body, &[]), gen).unwrap();
    {
        let inner = g.lock_read();
        assert_eq!(inner.distinct, inner.refs, "the upper bound until the walk");
        assert_eq!(inner.weighing.walks.len(), 1);
    }
    check_counts(&g, "after the commit");
    // Block 1 is s's too: it keeps counting. Then s goes, with a walk of its own.
    g.write(v, 4096, &[3u8; 4096]).unwrap();
    check_counts(&g, "an overwrite before the walk");
    g.delete_snapshot("v", "s").unwrap();
    check_counts(&g, "a delete before the walk");
    g.hold_walks.store(false, Ordering::Release);
    g.settle_counts();
    check_distinct(&g, "after the walks");
    assert_eq!(g.live_bytes(), (8 + 4) * 4096, "v's blocks 0-7 and 32-35");
    g.close().unwrap();
}

/// A DR site with `protect_snapshots` whose disk fills between the local
/// `Protect` record and the primary's record that deletes the snapshot:
/// the record fails with no space, the primary sends it again, and the
/// refusal is reported then (it was lost: the snapshot was already marked
/// protected, so the second attempt named nothing).
#[test]
fn a_refusal_is_reported_when_the_deleting_record_is_sent_again() {
    use crate::log::record::Kind;
    let m = super::tests::Tmpfs::mount("12m");
    let g = Group::open(&m.path, "cg0").unwrap();
    g.protect_snapshots.store(true, Ordering::Relaxed);
    let v = g.create_volume("v", 64 << 20).unwrap();
    g.write(v, 0, &vec![7u8; 4096]).unwrap();
    g.create_snapshot("v", "s", false).unwrap();
    let gen = g.receiver_gen.load(Ordering::Acquire);
    g.append_replicated(&raw_record(Kind::ResyncBegin, 0, 0, 0, 0, &[], &[]), gen).unwrap();
    // Full: no block-sized record fits, then no header-sized one.
    let mut b = 1;
    while g.write(v, b * 4096, &[1u8; 4096]).is_ok() {
        b += 1;
    }
    while g.zero(v, 0, 4096, false).is_ok() {}
    // Room for a few headers (the Protect record), not for a 12 KiB table:
    // the primary's commit lists only the volume (and new maps), so s goes.
    m.resize("12292k");
    let mut table = vec![resync::CommitEntry { id: v, name: "v".into(), size: 64 << 20, snap: None, base: None }];
    table.extend((0..200).map(|i| resync::CommitEntry { id: 100 + i, name: format!("new-volume-{i:04}"), size: 4096, snap: None, base: None }));
    let body = serde_json::to_vec(&table).unwrap();
    assert!(body.len() > 8192, "{}", body.len());
    let commit = raw_record(Kind::ResyncCommit, 0, g.last_seq() + 5, 0, 0, &body, &[]);
    let e = g.append_replicated(&commit, gen).unwrap_err();
    assert!(e.contains("No space left"), "{e}");
    assert!(g.lock_read().protected.contains(&(v + 1)), "the Protect record went in");
    assert!(g.refusals.lock().unwrap().is_empty(), "nothing refused yet: the commit did not go in");
    m.resize("64m");
    g.append_replicated(&commit, gen).unwrap();
    let refused: Vec<String> = g.refusals.lock().unwrap().iter().map(|r| r.0.clone()).collect();
    assert_eq!(refused, vec!["v@s".to_string()], "the refusal is reported with the record that made it");
    assert!(g.volume("v@s").is_some_and(|s| s.retained), "s is retained");
    g.close().unwrap();
}

/// A DR whose disk fills during a resync (a real tmpfs of 200 MiB):
/// - a staging no connection can commit is dropped: at a new connection
///   (an older one's), and when the newest connection ends, even if an
///   older one's end is seen after it; a newer connection's own staging is
///   never dropped for an older one's end;
/// - the append that fails asks for room for the whole resync (the
///   primary's estimate in RESYNC_BEGIN), not for that one record, so the
///   site takes the stream again only once the resync can fit;
/// - when its connection ends the attempt's staging is dropped, and GC
///   gives back its records behind a checkpoint, while the site still shows
///   its last consistent state (before, they stayed until the next
///   attempt's commit, which then needed room for both);
/// - a staging replayed at a restart is dropped too, and an attempt after
///   all this commits as usual.
#[test]
fn a_resync_that_fills_the_disk_asks_for_all_it_needs_and_gives_back_what_it_staged() {
    use crate::log::record::{self, Kind, FLAG_RESYNC};
    let m = super::tests::Tmpfs::mount("200m");
    let free = || crate::util::free_bytes(&m.path).unwrap();
    let g = Group::open(&m.path, "cg0").unwrap();
    let v = g.create_volume("v", 1 << 30).unwrap();
    g.write(v, 0, &[7u8; 1 << 20]).unwrap();
    let shows_old = |g: &Group| {
        let mut buf = vec![0u8; 1 << 20];
        g.read(v, 0, &mut buf).unwrap();
        buf.iter().all(|b| *b == 7)
    };
    // What a HELLO does (`Receiver::on_frame`), and a connection's end.
    let connect = |g: &Group| {
        let gen = g.receiver_gen.fetch_add(1, Ordering::AcqRel) + 1;
        g.drop_dead_resync(gen, "was left by an earlier connection");
        gen
    };
    let end = |g: &Group, gen: u64| g.receiver_ended.fetch_max(gen, Ordering::AcqRel);
    let staging = |g: &Group| g.lock_read().staging.is_some();
    let until = |what: &str, f: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "{what}: not within 10 s");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let begin = |need: u64| raw_record_at(Kind::ResyncBegin, 0, 0, 0, need, 0, &[], &[]);
    let data = vec![9u8; 64 * 4096];
    let crcs = record::block_crcs(&data);
    let staged = |off: u64| raw_record_at(Kind::Write, FLAG_RESYNC, 0, v, off, data.len() as u32, &crcs, &data);

    // Which connection's staging goes when.
    let gen1 = connect(&g);
    g.append_replicated(&begin(1 << 20), gen1).unwrap();
    g.append_replicated(&staged(0), gen1).unwrap();
    let gen2 = connect(&g);
    assert!(!staging(&g), "a new connection kept an older one's staging");
    g.append_replicated(&begin(1 << 20), gen2).unwrap();
    g.append_replicated(&staged(0), gen2).unwrap();
    end(&g, gen1);
    g.maintain().unwrap();
    assert!(staging(&g), "an older connection's end dropped a newer one's staging");
    end(&g, gen2);
    end(&g, gen1); // seen after the newer one's
    until("the staging of the newest connection, ended, dropped", &|| !staging(&g));
    assert!(shows_old(&g));

    // A resync that fills the disk.
    let need: u64 = 300 << 20;
    let gen = connect(&g);
    g.append_replicated(&begin(need), gen).unwrap();
    let mut off = 0;
    let e = loop {
        match g.append_replicated(&staged(off), gen) {
            Ok(_) => off += data.len() as u64,
            Err(e) => break e,
        }
    };
    assert!(e.to_lowercase().contains("no space left") && e.contains("the resync in progress may need up to 30"), "{e}");
    assert!(off > 150 << 20, "staged only {off} bytes");
    let (_, why, needed) = g.out_of_space().expect("out of space");
    assert!(needed > need && needed < need + (2 << 20), "needed {needed}: {why}");
    assert!(shows_old(&g));
    let full = free();
    end(&g, gen);
    until("the failed attempt's space given back", &|| !staging(&g) && free() >= full + (100 << 20));
    assert!(shows_old(&g));
    // Not yet room for the whole resync: still refused (`has_room`) ...
    assert!(g.out_of_space().is_some(), "out of space cleared with {} MiB free", free() >> 20);
    // ... until there is.
    m.resize("600m");
    assert!(g.out_of_space().is_none(), "out of space with {} MiB free", free() >> 20);

    // An attempt the site stops in is dropped when it opens again.
    let gen = connect(&g);
    g.append_replicated(&begin(1 << 20), gen).unwrap();
    g.append_replicated(&staged(0), gen).unwrap();
    g.close().unwrap();
    drop(g);
    let g = Group::open(&m.path, "cg0").unwrap();
    assert!(!staging(&g), "a replayed staging was kept");
    assert!(shows_old(&g));
    let gen = g.receiver_gen.fetch_add(1, Ordering::AcqRel) + 1;
    let table = vec![resync::CommitEntry { id: v, name: "v".into(), size: 1 << 30, snap: None, base: None }];
    let commit = |g: &Group| raw_record_at(Kind::ResyncCommit, 0, g.last_seq() + 5, 0, 0, 0, &serde_json::to_vec(&table).unwrap(), &[]);
    let e = g.append_replicated(&commit(&g), gen).unwrap_err();
    assert!(e.contains("without a resync in progress"), "{e}");
    // The next attempt commits as usual.
    g.append_replicated(&begin(1 << 20), gen).unwrap();
    g.append_replicated(&staged(0), gen).unwrap();
    g.append_replicated(&commit(&g), gen).unwrap();
    let mut buf = vec![0u8; data.len()];
    g.read(v, 0, &mut buf).unwrap();
    assert!(buf == data, "the committed resync is not shown");
    g.close().unwrap();
}

/// Records from a primary that this site would act on are bounded before
/// they are appended (`check_body`): a size past the largest volume (its
/// map would be grown to it, on every replay too), an id with no next, a
/// resync record or staged copy larger than a resync batch (staged block
/// by block), a commit table naming such maps or too many. Each is refused
/// with the record and the reason; what the primary really sends passes.
#[test]
fn records_a_site_would_act_on_are_bounded() {
    use crate::limits::{RESYNC_BATCH_BLOCKS, VOLUME_BYTES_MAX};
    use crate::log::record::FLAG_RESYNC;
    let h = |kind: Kind, flags: u16, volume: u32, length: u32, offset: u64| Header { kind, flags, epoch: 1, seq: 9, timestamp_ns: 0, volume, length, offset, body_len: 0, crc: 0, durable: 0 };
    let refused = |h: Header, body: &[u8], why: &str| {
        let e = snapshot::check_body(&h, body).expect_err(why);
        assert!(e.contains("record seq 9"), "{why}: {e}");
    };
    let ok = |h: Header, body: &[u8]| snapshot::check_body(&h, body).unwrap();

    ok(h(Kind::VolumeCreate, 0, 3, 0, 1 << 30), b"vol1");
    ok(h(Kind::VolumeResize, 0, 3, 0, VOLUME_BYTES_MAX), b"");
    refused(h(Kind::VolumeCreate, 0, 3, 0, 0xFFFF_FFFF_FFFF_F000), b"vol1", "a create past the largest volume");
    refused(h(Kind::VolumeResize, 0, 3, 0, VOLUME_BYTES_MAX + 4096), b"", "a resize past the largest volume");
    refused(h(Kind::VolumeResize, 0, 3, 0, 4097), b"", "a size not in whole blocks");
    refused(h(Kind::VolumeCreate, 0, u32::MAX, 0, 4096), b"vol1", "an id with no next");
    refused(h(Kind::SnapCreate, 0, u32::MAX, 0, 1), br#"{"name":"v@s","writable":false}"#, "a snapshot id with no next");
    // Names and sizes `create_volume` and `create_snapshot` would refuse.
    refused(h(Kind::VolumeCreate, 0, 3, 0, 0), b"vol1", "a volume of size 0");
    refused(h(Kind::VolumeCreate, 0, 3, 0, 4096), b"../../x", "a volume named like a path");
    refused(h(Kind::VolumeCreate, 0, 3, 0, 4096), b"", "a volume with no name");
    refused(h(Kind::VolumeCreate, 0, 3, 0, 4096), b"v\xff", "a volume name that is not UTF-8");
    refused(h(Kind::SnapCreate, 0, 4, 0, 3), br#"{"name":"../../evil","writable":false}"#, "a snapshot name without @");
    refused(h(Kind::SnapCreate, 0, 4, 0, 3), br#"{"name":"v@a/b","writable":false}"#, "a snapshot name with a slash");
    ok(h(Kind::SnapCreate, 0, 4, 0, 3), br#"{"name":"vol1@s-1.x","writable":true}"#);
    refused(h(Kind::ResyncCommit, 0, 0, 0, 0), br#"[{"id":1,"name":"../x","size":4096}]"#, "a table naming a map like a path");
    ok(h(Kind::ResyncCommit, 0, 0, 0, 0), br#"[{"id":1,"name":"vol0","size":4096},{"id":2,"name":"vol0@s1","size":4096}]"#);

    let batch = (RESYNC_BATCH_BLOCKS * BLOCK_BYTES) as u32;
    ok(h(Kind::Trim, FLAG_RESYNC, 3, batch, 0), b"");
    refused(h(Kind::Trim, FLAG_RESYNC, 3, 0xFFFF_F000, 0), b"", "a resync trim of 4 GiB");
    ok(h(Kind::Trim, 0, 3, 0xFFFF_F000, 0), b""); // an ordinary trim may be large
    ok(h(Kind::MapCopy, FLAG_RESYNC, 3, 0, 2), br#"{"first":0,"count":1024}"#);
    refused(h(Kind::MapCopy, FLAG_RESYNC, 3, 0, 2), br#"{"first":0,"count":1000000000000000000}"#, "a staged copy of 10^18 blocks");
    refused(h(Kind::MapCopy, FLAG_RESYNC, 3, 0, 2), br#"{"first":18446744073709551615,"count":1}"#, "a staged copy past the largest volume");

    ok(h(Kind::ResyncCommit, 0, 0, 0, 0), br#"[{"id":1,"name":"vol0","size":1048576}]"#);
    ok(h(Kind::ResyncCommit, 0, 0, 0, 0), br#"[[1,"vol0",1048576]]"#);
    refused(h(Kind::ResyncCommit, 0, 0, 0, 0), br#"[{"id":1,"name":"vol0","size":9223372036854775808}]"#, "a table with a 2^63-byte map");
    refused(h(Kind::ResyncCommit, 0, 0, 0, 0), br#"[[4294967295,"vol0",4096]]"#, "a table with an id with no next");
    let many = format!("[{}]", (1..=4097).map(|i| format!(r#"[{i},"m{i}",4096]"#)).collect::<Vec<_>>().join(","));
    refused(h(Kind::ResyncCommit, 0, 0, 0, 0), many.as_bytes(), "a table of 4097 maps");
}
