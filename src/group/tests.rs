//! Engine tests against a byte-array model: writes (aligned and not), zeroes,
//! trims, volume operations, reopen after close and after a simulated crash,
//! GC under overwrite, and corruption reporting.

use std::sync::Arc;

use rand::{Rng, SeedableRng};

use super::*;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

fn model_check(g: &Group, vol: u32, model: &[u8]) {
    let mut buf = vec![0u8; model.len()];
    g.read(vol, 0, &mut buf).unwrap();
    assert!(buf == model, "volume content differs from model");
}

#[test]
fn random_ops_match_model_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let size = 4 << 20;
    let mut model = vec![0u8; size];
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    {
        let g = Group::open(dir.path(), "cg0").unwrap();
        let vol = g.create_volume("vol0", size as u64).unwrap();
        for step in 0..2000 {
            let off = rng.random_range(0..size - 1);
            let len = rng.random_range(1..(size - off).min(70_000));
            match rng.random_range(0..10) {
                0 => {
                    g.zero(vol, off as u64, len as u64, rng.random()).unwrap();
                    model[off..off + len].fill(0);
                }
                _ => {
                    let b: u8 = rng.random();
                    let data: Vec<u8> = (0..len).map(|i| b.wrapping_add(i as u8).wrapping_add(step as u8)).collect();
                    g.write(vol, off as u64, &data).unwrap();
                    model[off..off + len].copy_from_slice(&data);
                }
            }
            if step % 500 == 0 {
                model_check(&g, vol, &model);
            }
        }
        model_check(&g, vol, &model);
        // Unaligned reads.
        for _ in 0..200 {
            let off = rng.random_range(0..size - 1);
            let len = rng.random_range(1..(size - off).min(20_000));
            let mut buf = vec![0u8; len];
            g.read(vol, off as u64, &mut buf).unwrap();
            assert_eq!(&buf[..], &model[off..off + len]);
        }
        g.close().unwrap();
    }
    let g = Group::open(dir.path(), "cg0").unwrap();
    let vol = g.volume("vol0").unwrap().id;
    model_check(&g, vol, &model);
}

#[test]
fn crash_without_checkpoint_replays_log() {
    let dir = tempfile::tempdir().unwrap();
    let size = 1 << 20;
    let mut model = vec![0u8; size];
    {
        let g = Group::open(dir.path(), "cg0").unwrap();
        let vol = g.create_volume("v", size as u64).unwrap();
        for i in 0..100u64 {
            let data = vec![i as u8 + 1; 8192];
            let off = (i * 4096 * 3) % (size as u64 - 8192);
            g.write(vol, off, &data).unwrap();
            model[off as usize..off as usize + 8192].copy_from_slice(&data);
        }
        g.sync_to(g.flush_target()).unwrap();
        // Dropped without close: no final checkpoint (background threads
        // still hold the group, like a killed process would).
        std::mem::forget(g);
    }
    let g = Group::open(dir.path(), "cg0").unwrap();
    let vol = g.volume("v").unwrap().id;
    model_check(&g, vol, &model);
    assert_eq!(g.last_seq(), 101);
}

/// The identity of the last record (which a DR names in its HELLO reply)
/// is the same after a clean reopen (from the checkpoint), after a crash
/// (from replay), and unknown from a version 2 checkpoint.
#[test]
fn last_record_identity_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (seq, ident) = {
        let g = Group::open(dir.path(), "cg0").unwrap();
        let vol = g.create_volume("v", 1 << 20).unwrap();
        for i in 0..10u64 {
            g.write(vol, i * 4096, &vec![i as u8; 4096]).unwrap();
        }
        let (seq, ident) = g.last_seq_ident();
        assert_eq!(g.record_ident(seq).unwrap(), ident);
        g.close().unwrap();
        (seq, ident.expect("a written record has an identity"))
    };
    let g = Group::open(dir.path(), "cg0").unwrap();
    assert_eq!(g.last_seq_ident(), (seq, Some(ident)), "from the checkpoint");
    let vol = g.volume("v").unwrap().id;
    g.write(vol, 0, &vec![9u8; 4096]).unwrap();
    let after = g.last_seq_ident();
    assert_eq!(after.0, seq + 1);
    assert_ne!(after.1, Some(ident));
    assert_eq!(g.record_ident(seq).unwrap(), Some(ident), "the older record, found in the log");
    g.sync_to(g.flush_target()).unwrap();
    std::mem::forget(g);
    let g = Group::open(dir.path(), "cg0").unwrap();
    assert_eq!(g.last_seq_ident(), after, "from replay after a crash");
    // A version 2 checkpoint (no identity field, no marks start) still
    // loads, identity unknown.
    let (_, mut bytes) = checkpoint::encode(&g.inner.lock(), g.id);
    let body_len = bytes.len() - 24 - 5 - 8;
    bytes.truncate(24 + body_len);
    bytes[8..12].copy_from_slice(&2u32.to_le_bytes());
    bytes[16..24].copy_from_slice(&(body_len as u64).to_le_bytes());
    let crc = crate::crc::crc32c(&bytes[24..]);
    bytes[12..16].copy_from_slice(&crc.to_le_bytes());
    let c = checkpoint::decode(&bytes, g.id).unwrap();
    assert_eq!((c.next_seq, c.last_ident), (after.0 + 1, None));
    // A group opened from it finds the identity in its log.
    g.close().unwrap();
    drop(g);
    crate::crashsafe::write_file(&dir.path().join(checkpoint::FILE_NAME), &bytes).unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    assert_eq!(g.inner.lock().last_ident, None, "a version 2 checkpoint has no identity");
    assert_eq!(g.last_seq_ident(), after, "found in the log");
    assert_eq!(g.record_ident(after.0).unwrap(), after.1);
}

/// A primary that shipped to a DR site suspects it from the first seq its
/// recovered log lacks, at every open, keeping the earliest such point
/// until the DR's history is verified; the suspicion is on disk before
/// anything is shipped.
#[test]
fn each_open_marks_dr_sites_unverified_from_the_end_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let first = {
        let g = Group::open(dir.path(), "cg0").unwrap();
        let vol = g.create_volume("v", 1 << 20).unwrap();
        g.write(vol, 0, &vec![1u8; 4096]).unwrap();
        g.set_pin("b", 1);
        g.save_pins().unwrap();
        assert_eq!(g.unverified_from("b"), None);
        g.close().unwrap();
        g.last_seq() + 1
    };
    {
        let g = Group::open(dir.path(), "cg0").unwrap();
        assert_eq!(g.unverified_from("b"), Some(first));
        assert_eq!(g.unverified_from("c"), None, "a site never shipped to is not suspect");
        let vol = g.volume("v").unwrap().id;
        g.write(vol, 0, &vec![2u8; 4096]).unwrap();
        std::mem::forget(g);
    }
    {
        // Reopened further on: the earlier point stays.
        let g = Group::open(dir.path(), "cg0").unwrap();
        assert!(g.last_seq() + 1 > first);
        assert_eq!(g.unverified_from("b"), Some(first));
        g.mark_verified("b");
        g.save_pins().unwrap();
        std::mem::forget(g);
    }
    let g = Group::open(dir.path(), "cg0").unwrap();
    assert_eq!(g.unverified_from("b"), Some(g.last_seq() + 1), "verified, then suspect from this open only");
}

#[test]
fn torn_tail_is_cut_not_fatal() {
    let dir = tempfile::tempdir().unwrap();
    let seg_path;
    let good_len;
    {
        let g = Group::open(dir.path(), "cg0").unwrap();
        let vol = g.create_volume("v", 1 << 20).unwrap();
        g.write(vol, 0, &vec![1u8; 4096]).unwrap();
        g.sync_to(g.flush_target()).unwrap();
        let inner = g.inner.lock();
        seg_path = inner.tail.path.clone();
        good_len = inner.tail_off;
        drop(inner);
        g.write(vol, 4096, &vec![2u8; 65536]).unwrap();
        g.sync_to(g.flush_target()).unwrap();
        std::mem::forget(g);
    }
    // Tear the last record: keep its header, lose half its payload.
    let f = std::fs::OpenOptions::new().write(true).open(&seg_path).unwrap();
    f.set_len(good_len + 64 + 16 * 4 + 30000).unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    let vol = g.volume("v").unwrap().id;
    let mut buf = vec![0u8; 8192];
    g.read(vol, 0, &mut buf).unwrap();
    assert_eq!(&buf[..4096], &[1u8; 4096][..]);
    assert_eq!(&buf[4096..], &[0u8; 4096][..]);
    assert_eq!(std::fs::metadata(&seg_path).unwrap().len(), good_len);
    // And the log takes writes again after the cut.
    g.write(vol, 8192, &vec![3u8; 4096]).unwrap();
}

/// Writes blocks 0..4 of a fresh group in `dir`, each its own record
/// (block i holds byte i + 1), syncing after those in `sync_after`, and
/// leaves the group as a crash would. Returns the segment's path and
/// where record 2 (block 1) starts.
fn four_records(dir: &Path, sync_after: &[usize]) -> (std::path::PathBuf, u64) {
    let g = Group::open(dir, "cg0").unwrap();
    let vol = g.create_volume("v", 1 << 20).unwrap();
    let mut second = 0;
    for i in 0..4usize {
        if i == 1 {
            second = g.inner.lock().tail_off;
        }
        g.write(vol, i as u64 * 4096, &vec![i as u8 + 1; 4096]).unwrap();
        if sync_after.contains(&i) {
            g.sync_to(g.flush_target()).unwrap();
        }
    }
    let path = g.inner.lock().tail.path.clone();
    std::mem::forget(g);
    (path, second)
}

fn flip_byte(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(path).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
}

/// One flipped byte in a record that was durable, with records after it
/// that say so (their durability marks lie past it): the open refuses,
/// naming the file, the offset, what follows and how to go on, and
/// changes nothing (before, it cut the log there as a torn tail: that
/// write and the two after it, all acknowledged, gone, a WARN the only
/// trace). The operator's
/// marker file cuts it, keeping the cut bytes in discarded/.
#[test]
fn damage_to_durable_records_is_refused_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    let (seg, second) = four_records(dir.path(), &[0, 1, 2, 3]);
    let len = std::fs::metadata(&seg).unwrap().len();
    flip_byte(&seg, second + 64 + 4 + 100);
    let e = format!("{:#}", Group::open(dir.path(), "cg0").err().expect("a damaged durable record was cut"));
    assert!(e.contains(&format!("damaged at offset {second}")) && e.contains("2 intact records follow it (seq 4 to 5)") && e.contains("acknowledged writes"), "{e}");
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), len, "the refused open changed the segment");
    let marker = e.split("create the file ").nth(1).and_then(|r| r.split(" and start").next()).expect("no marker file named");
    std::fs::write(marker, b"").unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    let vol = g.volume("v").unwrap().id;
    let mut buf = vec![0u8; 4 * 4096];
    g.read(vol, 0, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 1) && buf[4096..].iter().all(|&b| b == 0), "not cut at record 2");
    assert!(!Path::new(marker).exists(), "the marker outlived its cut");
    let kept = dir.path().join("discarded").join(format!("{}.cut-at-{second}", seg.file_name().unwrap().to_str().unwrap()));
    assert_eq!(std::fs::metadata(&kept).unwrap().len(), len - second, "the cut bytes are not kept whole");
}

/// A log written while the site was a DR (its records carry another
/// log's marks, here this one's from when it was not trusted) is cut at
/// damage at its first open as a primary, not refused; from then on its
/// own marks count. And an open as a DR never trusts them.
#[test]
fn marks_are_trusted_only_where_this_site_wrote_them() {
    use super::open::Create;
    let dir = tempfile::tempdir().unwrap();
    let as_dr = Create { id: Some(9), mode: "async".into(), written_here: false };
    let as_primary = Create { id: Some(9), mode: "async".into(), written_here: true };
    let write_four = |create: &Create, first: u64| -> (std::path::PathBuf, u64) {
        let g = Group::open_or_create(dir.path(), "cg0", create).unwrap();
        let vol = match g.volume("v") {
            Some(v) => v.id,
            None => g.create_volume("v", 1 << 20).unwrap(),
        };
        let mut second = 0;
        for i in 0..4u64 {
            if i == 1 {
                second = g.inner.lock().tail_off;
            }
            g.write(vol, (first + i) * 4096, &vec![(first + i) as u8 + 1; 4096]).unwrap();
            g.sync_to(g.flush_target()).unwrap();
        }
        let path = g.inner.lock().tail.path.clone();
        std::mem::forget(g);
        (path, second)
    };
    // Written as a DR: damage there is cut, as a DR and at the promotion.
    let (seg, second) = write_four(&as_dr, 0);
    flip_byte(&seg, second + 64 + 4 + 100);
    let g = Group::open_or_create(dir.path(), "cg0", &as_primary).expect("records marked before this site was a primary were trusted");
    assert_eq!(g.inner.lock().tail_off, second, "not cut at the damage");
    std::mem::forget(g);
    // Written as a primary since: its own marks count.
    let (seg, second) = write_four(&as_primary, 8);
    flip_byte(&seg, second + 64 + 4 + 100);
    let e = format!("{:#}", Group::open_or_create(dir.path(), "cg0", &as_primary).err().expect("damage this site's own marks prove durable was cut"));
    assert!(e.contains(&format!("damaged at offset {second}")), "{e}");
    // Opened as a DR (demoted), the same log is cut: a DR trusts no mark.
    let g = Group::open_or_create(dir.path(), "cg0", &as_dr).expect("a DR refused its log on marks it does not trust");
    assert_eq!(g.inner.lock().tail_off, second);
    assert_eq!(g.inner.lock().marks_from, None);
}

/// The same damage where no later record says it was durable (the
/// records after the last sync: what a power loss can tear while keeping
/// later writes) is cut as before, and the cut bytes are kept.
#[test]
fn damage_past_the_last_durability_mark_is_cut_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (seg, second) = four_records(dir.path(), &[0]);
    let len = std::fs::metadata(&seg).unwrap().len();
    flip_byte(&seg, second + 64 + 4 + 100);
    let g = Group::open(dir.path(), "cg0").unwrap();
    let vol = g.volume("v").unwrap().id;
    let mut buf = vec![0u8; 4 * 4096];
    g.read(vol, 0, &mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&b| b == 1) && buf[4096..].iter().all(|&b| b == 0), "not cut at record 2");
    let kept = dir.path().join("discarded").join(format!("{}.cut-at-{second}", seg.file_name().unwrap().to_str().unwrap()));
    assert_eq!(std::fs::metadata(&kept).unwrap().len(), len - second);
}

/// A checkpoint whose replay position lies past the end of its segment
/// (the segment truncated, or a checkpoint and a log restored from
/// different backups) does not belong to this log: the open fails naming
/// both, and changes nothing. Before, the scan took the gap for a torn
/// tail: it extended the segment with zeros to the position and moved
/// every later segment to `discarded/`.
#[test]
fn a_checkpoint_past_the_end_of_its_log_is_refused_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    let seg_path;
    {
        let g = Group::open(dir.path(), "cg0").unwrap();
        let vol = g.create_volume("v", 1 << 20).unwrap();
        g.write(vol, 0, &vec![1u8; 65536]).unwrap();
        g.checkpoint().unwrap();
        seg_path = g.inner.lock().tail.path.clone();
        std::mem::forget(g);
    }
    let short = crate::log::segment::SEGMENT_HEADER_BYTES + 64;
    std::fs::OpenOptions::new().write(true).open(&seg_path).unwrap().set_len(short).unwrap();
    let Err(e) = Group::open(dir.path(), "cg0") else { panic!("a checkpoint past the end of its log was accepted") };
    let e = format!("{e:#}");
    assert!(e.contains("checkpoint") && e.contains(&seg_path.display().to_string()), "{e}");
    assert_eq!(std::fs::metadata(&seg_path).unwrap().len(), short, "the segment was changed");
    assert!(!dir.path().join("discarded").exists());
}

#[test]
fn corrupted_byte_is_reported_with_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    let vol = g.create_volume("v", 1 << 20).unwrap();
    g.write(vol, 0, &vec![9u8; 4096]).unwrap();
    g.sync_to(g.flush_target()).unwrap();
    let (path, off) = {
        let inner = g.inner.lock();
        let e = inner.volumes[&vol].map.get(0);
        (inner.segments[&e.seg].path.clone(), e.off as u64)
    };
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0x55], off + 100).unwrap();
    }
    let mut buf = vec![0u8; 4096];
    let err = g.read(vol, 0, &mut buf).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
    assert!(err.contains(&format!("offset {off}")), "{err}");
}

#[test]
fn flush_and_fua_wait_for_group_commit() {
    let dir = tempfile::tempdir().unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    let vol = g.create_volume("v", 1 << 20).unwrap();
    let rt = rt();
    let at = g.write(vol, 0, &vec![1u8; 4096]).unwrap().end;
    assert!(g.durable_pos() < at);
    rt.block_on(g.wait_durable(at)).unwrap();
    assert!(g.durable_pos() >= at);
    // Many concurrent waiters share syncs.
    let before = g.stats.syncs.load(std::sync::atomic::Ordering::Relaxed);
    rt.block_on(async {
        let mut hs = Vec::new();
        for i in 0..50u64 {
            let g = g.clone();
            hs.push(tokio::spawn(async move {
                let at = g.write(vol, i * 4096, &vec![2u8; 4096]).unwrap().end;
                g.wait_durable(at).await.unwrap();
            }));
        }
        for h in hs {
            h.await.unwrap();
        }
    });
    let syncs = g.stats.syncs.load(std::sync::atomic::Ordering::Relaxed) - before;
    assert!(syncs <= 50, "{syncs} syncs for 50 FUA writes");
}

#[test]
fn requested_sync_runs_without_a_waiter() {
    // Sync mode starts the local fdatasync while the DR round trip is under
    // way; nobody waits on it until the FLUSH arrives.
    let dir = tempfile::tempdir().unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    let vol = g.create_volume("v", 1 << 20).unwrap();
    let at = g.write(vol, 0, &vec![3u8; 4096]).unwrap().end;
    assert!(g.durable_pos() < at);
    g.request_durable(at);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while g.durable_pos() < at {
        assert!(std::time::Instant::now() < deadline, "requested sync did not happen");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn volume_ops_replay() {
    let dir = tempfile::tempdir().unwrap();
    {
        let g = Group::open(dir.path(), "cg0").unwrap();
        let a = g.create_volume("a", 1 << 20).unwrap();
        g.create_volume("b", 2 << 20).unwrap();
        g.write(a, (1 << 20) - 4096, &vec![7u8; 4096]).unwrap();
        g.resize_volume("a", 512 << 10).unwrap();
        g.resize_volume("a", 1 << 20).unwrap();
        g.delete_volume("b").unwrap();
        assert!(g.create_volume("a", 4096).is_err());
        assert!(g.create_volume("bad/name", 4096).is_err());
        assert!(g.create_volume("odd", 1000).is_err());
        std::mem::forget(g);
    }
    let g = Group::open(dir.path(), "cg0").unwrap();
    let vols = g.volumes();
    assert_eq!(vols.len(), 1);
    assert_eq!(vols[0].size, 1 << 20);
    let mut buf = vec![1u8; 4096];
    g.read(vols[0].id, (1 << 20) - 4096, &mut buf).unwrap();
    assert_eq!(buf, vec![0u8; 4096], "shrink then grow must not resurrect data");
}

#[test]
fn gc_reclaims_overwritten_space() {
    let dir = tempfile::tempdir().unwrap();
    let g: Arc<Group> = Group::open(dir.path(), "cg0").unwrap();
    let size: u64 = 64 << 20;
    let vol = g.create_volume("v", size).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut model = vec![0u8; size as usize];
    // Write 10x the volume size in 64 KiB random writes.
    for i in 0..(10 * size / 65536) {
        let off = rng.random_range(0..size / 65536) * 65536;
        let b = (i % 251) as u8;
        g.write(vol, off, &vec![b; 65536]).unwrap();
        model[off as usize..off as usize + 65536].fill(b);
    }
    // Let GC catch up.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (total, live) = (g.log_bytes(), g.live_bytes());
        if total as f64 <= live as f64 * crate::limits::GC_SPACE_RATIO + crate::limits::LOG_RESERVE_BYTES as f64 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "GC did not catch up: {total} bytes for {live} live");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(g.stats.gc_segments_freed.load(std::sync::atomic::Ordering::Relaxed) > 0);
    model_check(&g, vol, &model);
    super::snapshot_tests::check_distinct(&g, "after GC caught up");
    g.close().unwrap();
    drop(g);
    let g = Group::open(dir.path(), "cg0").unwrap();
    model_check(&g, vol, &model);
    super::snapshot_tests::check_distinct(&g, "after reopen");
}

mod garbage_on_disk {
    //! Input from disk is untrusted: random bytes in a checkpoint or after a
    //! segment header give an error or a cut, never a panic or a huge allocation.
    use proptest::prelude::*;

    use crate::group::checkpoint;
    use crate::log::segment::{self, Segment};

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn checkpoint_decode_never_panics(body in proptest::collection::vec(any::<u8>(), 0..400), fix_header in any::<bool>(), version in 1u32..5) {
            let mut bytes = body.clone();
            if fix_header && bytes.len() >= 24 {
                bytes[0..8].copy_from_slice(b"TMCKPT01");
                bytes[8..12].copy_from_slice(&version.to_le_bytes());
                let len = (bytes.len() - 24) as u64;
                bytes[16..24].copy_from_slice(&len.to_le_bytes());
                let crc = crate::crc::crc32c(&bytes[24..]);
                bytes[12..16].copy_from_slice(&crc.to_le_bytes());
            }
            let _ = checkpoint::decode(&bytes, 7);
        }

        #[test]
        fn segment_scan_of_garbage_never_panics(garbage in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let dir = tempfile::tempdir().unwrap();
            let s = Segment::create(dir.path(), 1, 9).unwrap();
            use std::os::unix::fs::FileExt;
            s.file.write_all_at(&garbage, segment::SEGMENT_HEADER_BYTES).unwrap();
            let mut n = 0;
            let r = segment::scan(&s, 0, true, |_, _| { n += 1; Ok(()) }).unwrap();
            if !garbage.is_empty() {
                prop_assert!(r.is_some() || n > 0);
            }
        }
    }
}

pub(crate) mod power_cut {
    //! A faulty twin of the disk at power loss: copy the group directory as
    //! a power cut would leave it — each segment only up to the length it had
    //! when its last fdatasync started, segments whose directory entry was
    //! never fsynced gone, and of the unsynced rest an arbitrary subset of
    //! 4 KiB pages (the kernel may have written some back on its own). Then
    //! open the copy: every write acknowledged with FUA, or before an
    //! acknowledged FLUSH, must read back; a block may otherwise only show a
    //! later write to it.

    use std::collections::HashMap;
    use std::os::unix::fs::FileExt;
    use std::path::Path;
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};

    use rand::{Rng, SeedableRng};

    use crate::group::Group;

    const BLOCKS: u64 = 2048; // 8 MiB volume
    const WRITERS: u64 = 4;

    #[derive(Default, Clone)]
    struct BlockModel {
        durable: Option<u64>,
        later: Vec<u64>,
    }

    fn stamp(v: u64, block: u64) -> Vec<u8> {
        let mut b = Vec::with_capacity(4096);
        while b.len() < 4096 {
            b.extend_from_slice(&v.to_le_bytes());
            b.extend_from_slice(&block.to_le_bytes());
        }
        b
    }

    pub(crate) fn cut_copy(g: &Group, to: &Path, rng: &mut rand::rngs::StdRng) {
        std::fs::create_dir_all(to).unwrap();
        // No checkpoint while copying: the group's maintenance thread could
        // otherwise write one after the copy of the old and free segments
        // the old one replays from (GC frees only below the newest).
        let _no_checkpoint = g.checkpoint_lock.lock().unwrap_or_else(|p| p.into_inner());
        // Written crash-safely (fsynced before rename), so a power cut keeps
        // their last version.
        for f in ["group.json", "checkpoint", "replicas.json"] {
            if g.dir.join(f).exists() {
                std::fs::copy(g.dir.join(f), to.join(f)).unwrap();
            }
        }
        let segs: Vec<_> = g.inner.lock().segments.values().cloned().collect();
        for s in segs {
            if !s.dir_synced.load(Ordering::Acquire) && rng.random_bool(0.7) {
                continue;
            }
            let synced = s.synced_len.load(Ordering::Acquire);
            let len = s.len();
            let mut data = vec![0u8; len as usize];
            s.file.read_exact_at(&mut data, 0).unwrap();
            // Unsynced pages: each survives or not (holes read as zeros),
            // and the file may end anywhere after the synced length.
            let mut page = synced / 4096 * 4096;
            while page < len {
                if page >= synced && rng.random_bool(0.5) {
                    let end = (page + 4096).min(len) as usize;
                    data[page as usize..end].fill(0);
                }
                page += 4096;
            }
            let keep = if len > synced { rng.random_range(synced..=len) } else { len };
            data.truncate(keep as usize);
            std::fs::write(to.join(s.path.file_name().unwrap()), &data).unwrap();
        }
    }

    #[test]
    fn acknowledged_writes_survive_simulated_power_cuts() {
        let seed: u64 = std::env::var("POWER_CUT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
        eprintln!("power cut test seed {seed} (replay with POWER_CUT_SEED={seed})");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let g = Group::open(&dir.path().join("live"), "cg0").unwrap();
        let vol = g.create_volume("v", BLOCKS * 4096).unwrap();
        let model: Arc<Mutex<HashMap<u64, BlockModel>>> = Arc::default();
        let pause = Arc::new(tokio::sync::RwLock::new(()));
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let (g, model, pause) = (g.clone(), model.clone(), pause.clone());
            let wseed = rng.random::<u64>();
            tasks.push(rt.spawn(async move {
                let mut rng = rand::rngs::StdRng::seed_from_u64(wseed);
                let mut since_flush: Vec<(u64, u64)> = Vec::new();
                for n in 0u64.. {
                    let _p = pause.read().await;
                    let b = rng.random_range(0..BLOCKS / WRITERS) * WRITERS + w;
                    let v = (w << 48) | n;
                    let fua = rng.random_bool(0.3);
                    model.lock().unwrap().entry(b).or_default().later.push(v);
                    let at = match g.write(vol, b * 4096, &stamp(v, b)) {
                        Ok(a) => a.end,
                        Err(_) => return,
                    };
                    if fua {
                        if g.wait_durable(at).await.is_err() {
                            return;
                        }
                        let mut m = model.lock().unwrap();
                        let e = m.entry(b).or_default();
                        e.durable = Some(v);
                        e.later.retain(|x| *x > v);
                    } else {
                        since_flush.push((b, v));
                    }
                    if rng.random_bool(0.1) {
                        if g.wait_durable(g.flush_target()).await.is_err() {
                            return;
                        }
                        let mut m = model.lock().unwrap();
                        for (b, v) in since_flush.drain(..) {
                            let e = m.entry(b).or_default();
                            if e.durable.is_none_or(|d| d < v) {
                                e.durable = Some(v);
                                e.later.retain(|x| *x > v);
                            }
                        }
                    }
                    if n % 16 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            }));
        }
        for cut in 0..25 {
            std::thread::sleep(std::time::Duration::from_millis(rng.random_range(5..60)));
            let copy = dir.path().join(format!("cut{cut}"));
            let snapshot = {
                let _w = rt.block_on(pause.write());
                let m = model.lock().unwrap().clone();
                cut_copy(&g, &copy, &mut rng);
                m
            };
            let c = Group::open(&copy, "cg0").unwrap_or_else(|e| panic!("seed {seed} cut {cut}: log does not open: {e:#}"));
            let cv = c.volume("v").expect("volume survives").id;
            crate::group::snapshot_tests::check_distinct(&c, &format!("seed {seed} cut {cut}"));
            let mut all = vec![0u8; (BLOCKS * 4096) as usize];
            c.read(cv, 0, &mut all).unwrap();
            for b in 0..BLOCKS {
                let got = &all[(b * 4096) as usize..((b + 1) * 4096) as usize];
                let m = snapshot.get(&b).cloned().unwrap_or_default();
                let ok = match m.durable {
                    Some(d) => got == &stamp(d, b)[..],
                    None => got.iter().all(|x| *x == 0),
                } || m.later.iter().any(|v| got == &stamp(*v, b)[..]);
                assert!(ok, "seed {seed} cut {cut}: block {b} lost a durable write (durable {:?}, later {:?})", m.durable, m.later);
            }
            c.close().unwrap();
            drop(c);
            std::fs::remove_dir_all(&copy).unwrap();
        }
        for t in tasks {
            t.abort();
        }
    }
}

/// A new group in `dir` with a volume and ten 4 KiB writes 2 ms apart (so
/// each has a write time of its own).
fn ten_writes_2ms_apart(dir: &std::path::Path) -> Arc<Group> {
    let g = Group::open(dir, "cg0").unwrap();
    let vol = g.create_volume("v", 1 << 20).unwrap();
    for i in 0..10u64 {
        g.write(vol, i * 4096, &vec![i as u8; 4096]).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    g
}

/// The write time in the header of record `seq`, read from the log.
fn record_time(g: &Group, seq: u64) -> u64 {
    g.record_header(seq).unwrap().expect("in the log").0.timestamp_ns
}

#[test]
fn write_times_of_what_a_dr_site_lacks_survive_a_clean_reopen() {
    // A clean close leaves nothing to replay, so the samples come from the
    // log: the record after each pin at open, another one when asked.
    let dir = tempfile::tempdir().unwrap();
    let last = {
        let g = ten_writes_2ms_apart(dir.path());
        g.set_pin("b", 4);
        g.save_pins().unwrap();
        let last = g.last_seq();
        g.close().unwrap();
        last
    };
    let g = Group::open(dir.path(), "cg0").unwrap();
    let s = g.written_at(5).expect("sampled at open");
    assert_eq!((s.seq, s.time_ns), (5, record_time(&g, 5)), "the record after the pin, from the log");
    let s = g.written_at(last).unwrap();
    assert_eq!(s.seq, 5, "a later record: the sample before it (never later than it)");
    assert!(s.time_ns <= record_time(&g, last));
    g.sample_from_log(3);
    let s = g.written_at(3).unwrap();
    assert_eq!((s.seq, s.time_ns), (3, record_time(&g, 3)), "older than every sample: read from the log");
    g.sample_from_log(7);
    assert_eq!(g.written_at(7).unwrap().seq, 5, "not older than the samples: nothing to read");
}

/// After a restart a DR site's replica starts from the pin saved for it
/// (its last durable record; `close` saves the latest), so its lag counts
/// from the first write it lacks, not from seq 1; a pin of 1 (an empty DR)
/// and a DR in dirty-region mode start from nothing, and a DR whose history
/// is suspect from some seq on starts below it (never over-stated).
#[test]
fn a_dr_sites_lag_after_a_restart_counts_from_its_saved_pin() {
    let dir = tempfile::tempdir().unwrap();
    let last = {
        let g = ten_writes_2ms_apart(dir.path());
        g.set_pin("b", 4);
        g.set_pin("c", 1);
        g.set_pin("d", 3);
        g.save_pins().unwrap();
        g.enter_dirty("d", None).unwrap();
        // As a resync commit point pins it, before the DR takes it.
        g.set_pin("d", 8);
        // Holds seq 8, but what it holds from seq 5 on may be records a
        // crash took from this log (`unverified`).
        g.set_pin("e", 8);
        g.lock_read().unverified.insert("e".into(), 5);
        // Acknowledged after the last save: `close` saves it.
        g.set_pin("b", 6);
        let last = g.last_seq();
        g.close().unwrap();
        last
    };
    let g = Group::open(dir.path(), "cg0").unwrap();
    for peer in ["b", "c", "d", "e"] {
        g.replication.add_replica(peer);
    }
    let rs = g.replication.replicas();
    let acked: Vec<u64> = rs.iter().map(|r| r.acked_seq).collect();
    assert_eq!(acked, [6, 0, 0, 4], "b from its pin as close saved it; c holds nothing; d was resyncing; e is suspect from seq 5");
    let now = crate::util::now_ns();
    let (secs, bytes) = crate::replicate::lag(&g, &rs[0], last, now);
    let want = (now - record_time(&g, 7)) as f64 / 1e9;
    assert!((secs - want).abs() < 0.001, "lag {secs} s, the record after the pin was written {want} s ago");
    assert!((4 * 4096..4 * 8192).contains(&bytes), "lag_bytes {bytes} for 4 writes of 4 KiB");
    assert!(crate::replicate::lag(&g, &rs[1], last, now).0 > secs, "an empty DR lacks older writes");
}

/// A checkpoint is checksummed, but what it says must still make sense
/// before the open acts on it: a next sequence of 0 (the last seq would
/// underflow) or a map id listed twice (the second silently replaced the
/// first) is refused with the reason.
#[test]
fn a_checkpoint_that_makes_no_sense_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    g.create_volume("v", 1 << 20).unwrap();
    let (_, bytes) = super::checkpoint::encode(&g.inner.lock(), g.id);
    let refused = |mut b: Vec<u8>| {
        let len = (b.len() - 24) as u64;
        b[16..24].copy_from_slice(&len.to_le_bytes());
        let crc = crate::crc::crc32c(&b[24..]);
        b[12..16].copy_from_slice(&crc.to_le_bytes());
        match super::checkpoint::decode(&b, g.id) {
            Ok(_) => panic!("accepted"),
            Err(e) => format!("{e:#}"),
        }
    };
    assert!(super::checkpoint::decode(&bytes, g.id).is_ok());
    // body: u64 replay_pos | u64 next_seq | u64 epoch | u32 next_volume_id | u64 group_id | u32 maps | maps
    let mut zero = bytes.clone();
    zero[24 + 8..24 + 16].fill(0);
    let e = refused(zero);
    assert!(e.contains("next sequence is 0"), "{e}");
    // The one map twice. Its bytes: u32 id | u64 size | u16 name_len | "v"
    // | u32 meta_len (0) | u32 regions (1) | u8 tag (0, never written).
    let maps_at = 24 + 8 + 8 + 8 + 4 + 8;
    let map_len = 4 + 8 + 2 + 1 + 4 + 4 + 1;
    assert_eq!(bytes[maps_at..maps_at + 4], 1u32.to_le_bytes());
    let mut twice = bytes[..maps_at].to_vec();
    twice.extend_from_slice(&2u32.to_le_bytes());
    twice.extend_from_slice(&bytes[maps_at + 4..maps_at + 4 + map_len]);
    twice.extend_from_slice(&bytes[maps_at + 4..]);
    let e = refused(twice);
    assert!(e.contains("listed twice"), "{e}");
    // The id counter at the map's own id: the next create would take that
    // id and replace the map (its data gone).
    let id = u32::from_le_bytes(bytes[maps_at + 4..maps_at + 8].try_into().unwrap());
    let mut behind = bytes.clone();
    behind[24 + 24..24 + 28].copy_from_slice(&id.to_le_bytes());
    let e = refused(behind);
    assert!(e.contains(&format!("next volume id {id} is not past map id {id} (v)")), "{e}");
}

/// A record whose checksum holds but whose sizes or ids this site could
/// not act on (no code here writes one: a log damaged and re-summed, or
/// written by something else) stops the open with an error naming the
/// segment and offset. Before, replay applied it: a volume of 2^64 bytes
/// took the process down allocating its map.
#[test]
fn a_record_no_code_writes_is_an_error_naming_it_at_replay() {
    let dir = tempfile::tempdir().unwrap();
    let at = {
        let g = Group::open(dir.path(), "cg0").unwrap();
        g.create_volume("v", 1 << 20).unwrap();
        let at = {
            let mut inner = g.inner.lock();
            let id = inner.next_volume_id;
            let mut h = inner.new_header(Kind::VolumeCreate, id, u64::MAX / 4096 * 4096, 0, 1);
            inner.append(&g, &mut h, b"w", &[]).unwrap()
        };
        g.sync_to(g.flush_target()).unwrap();
        g.abandon();
        at
    };
    let e = format!("{:#}", Group::open(dir.path(), "cg0").err().expect("opened"));
    let seg = crate::log::segment::segment_file_name(crate::log::segment::pos_seg(at));
    assert!(e.contains(&format!("record at offset {} of log segment", crate::log::segment::pos_off(at))) && e.contains(&seg) && e.contains("is not whole blocks of at most"), "{e}");
}

/// The checkpoint's own segment gone with none after it (removed by hand):
/// the open is refused. Before, it went on with an older segment as the
/// tail, below the checkpoint's replay position, so the writes it took
/// then were skipped by the next open.
#[test]
fn a_checkpoint_whose_segment_is_gone_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let last = {
        let g = Group::open(dir.path(), "cg0").unwrap();
        let vol = g.create_volume("v", 128 << 20).unwrap();
        for i in 0..9u64 {
            g.write(vol, i * (8 << 20), &vec![1u8; 8 << 20]).unwrap();
        }
        let last = crate::log::segment::pos_seg(g.flush_target());
        assert!(last >= 2);
        g.close().unwrap();
        last
    };
    std::fs::remove_file(dir.path().join(crate::log::segment::segment_file_name(last))).unwrap();
    let e = format!("{:#}", Group::open(dir.path(), "cg0").err().expect("opened"));
    assert!(e.contains(&format!("replays from log segment {}, which is missing, and no later segment exists", crate::log::segment::segment_file_name(last))), "{e}");
}

/// group.json naming a mode this code does not know is an error naming
/// the file, not a group silently replicating asynchronously.
#[test]
fn a_group_file_with_an_unknown_mode_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    Group::open(dir.path(), "cg0").unwrap().close().unwrap();
    let meta = dir.path().join(super::open::META_FILE);
    let text = std::fs::read_to_string(&meta).unwrap().replace("\"async\"", "\"sometimes\"");
    std::fs::write(&meta, text).unwrap();
    let e = format!("{:#}", Group::open(dir.path(), "cg0").err().expect("opened"));
    assert!(e.contains("group.json") && e.contains("mode \"sometimes\" is not one of async, sync, periodic"), "{e}");
}

/// A process that dies (killed, crashed) leaves what it wrote after its
/// last group commit in the page cache only. Reopened, that replays as if
/// durable, and the writes acknowledged next follow it in the log: it must
/// be durable first, or a power loss that tore it would cut them too. The
/// open syncs it. Before, reopened segments counted as synced and nothing
/// synced them: the first commit synced only the segment it wrote (and a
/// checkpoint or a DR's HELLO nothing).
#[test]
fn what_a_dead_process_left_unsynced_is_synced_when_the_log_is_opened() {
    let dir = tempfile::tempdir().unwrap();
    let tail = {
        let g = Group::open(dir.path(), "cg0").unwrap();
        let vol = g.create_volume("v", 1 << 20).unwrap();
        g.write(vol, 0, &vec![1u8; 65536]).unwrap();
        g.checkpoint().unwrap();
        g.write(vol, 65536, &vec![2u8; 65536]).unwrap(); // never synced
        let tail = g.flush_target();
        assert!(g.durable_pos() < tail);
        g.abandon();
        std::mem::forget(g);
        tail
    };
    let g = Group::open(dir.path(), "cg0").unwrap();
    assert_eq!(g.flush_target(), tail, "the unsynced write replays");
    assert_eq!(g.stats.syncs.load(Ordering::Relaxed), 1, "the open synced the log");
    assert!(g.durable_pos() >= tail);
    let inner = g.inner.lock();
    assert!(inner.unsynced.is_empty() && !inner.dir_dirty);
    for s in inner.segments.values() {
        assert_eq!(s.synced_len.load(Ordering::Acquire), s.len(), "segment {} synced whole", s.id);
        assert!(s.dir_synced.load(Ordering::Acquire));
    }
}

/// From the checkpoint's replay start on, every log segment must be
/// there: a missing one (lost, removed by hand) is named and the open
/// refused. Before, replay went on past the gap and skipped its records.
#[test]
fn a_segment_missing_from_the_log_replay_needs_is_named() {
    let dir = tempfile::tempdir().unwrap();
    {
        let g = Group::open(dir.path(), "cg0").unwrap();
        let vol = g.create_volume("v", 256 << 20).unwrap();
        for i in 0..6u64 {
            g.write(vol, i * (24 << 20), &vec![i as u8 + 1; 24 << 20]).unwrap();
        }
        g.sync_to(g.flush_target()).unwrap();
        assert!(g.inner.lock().segments.len() >= 3);
        g.abandon();
        std::mem::forget(g);
    }
    // Replay from the start of the log, which lacks its second segment.
    let _ = std::fs::remove_file(dir.path().join(super::checkpoint::FILE_NAME));
    std::fs::remove_file(dir.path().join(crate::log::segment::segment_file_name(2))).unwrap();
    let Err(e) = Group::open(dir.path(), "cg0") else { panic!("a log with a gap was opened") };
    let e = format!("{e:#}");
    assert!(e.contains("seg-00000002.tml is missing"), "{e}");
}

/// Checkpoints written at once (the maintenance thread's, `close`'s) land
/// in order: the file on disk always replays from where the group thinks
/// its last checkpoint is, which GC frees segments up to. 200 rounds of 4
/// threads writing and checkpointing at once, checked after each.
#[test]
fn concurrent_checkpoints_never_leave_an_older_one_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    let vol = g.create_volume("v", 1 << 20).unwrap();
    for round in 0..200u64 {
        let start = std::sync::Barrier::new(4);
        std::thread::scope(|sc| {
            for t in 0..4u64 {
                let (g, start) = (&g, &start);
                sc.spawn(move || {
                    start.wait();
                    for k in 0..3 {
                        g.write(vol, ((round * 12 + t * 3 + k) % 256) * 4096, &[t as u8; 4096]).unwrap();
                        g.checkpoint().unwrap();
                    }
                });
            }
        });
        let bytes = std::fs::read(dir.path().join(super::checkpoint::FILE_NAME)).unwrap();
        let on_disk = super::checkpoint::decode(&bytes, g.id).unwrap().replay_pos;
        assert_eq!(on_disk, g.inner.lock().checkpoint_pos, "round {round}: an older checkpoint is on disk");
    }
}

/// A segment is left for the next only when the next record does not fit
/// in it. A segment that ends cleanly but short of that, followed by
/// another, lost its tail (a power loss kept later writes but not it, or a
/// crash came inside a cut): what follows is not a prefix of the log and
/// is cut, as a torn tail is. Before, replay went on into the next
/// segment, applying write 3 without write 2.
#[test]
fn a_segment_that_lost_its_tail_cuts_the_log_there() {
    let dir = tempfile::tempdir().unwrap();
    let mb24 = 24u64 << 20;
    let end_of_first;
    {
        let g = Group::open(dir.path(), "cg0").unwrap();
        let vol = g.create_volume("v", 128 << 20).unwrap();
        g.write(vol, 0, &vec![1u8; mb24 as usize]).unwrap();
        end_of_first = g.flush_target();
        g.write(vol, mb24, &vec![2u8; mb24 as usize]).unwrap(); // fills segment 1
        g.write(vol, 2 * mb24, &vec![3u8; mb24 as usize]).unwrap(); // in segment 2
        g.sync_to(g.flush_target()).unwrap();
        assert_eq!(crate::log::segment::pos_seg(g.flush_target()), 2);
        g.abandon();
        std::mem::forget(g);
    }
    let _ = std::fs::remove_file(dir.path().join(super::checkpoint::FILE_NAME));
    // Segment 1 loses write 2, a whole record: it ends cleanly, short.
    let seg1 = dir.path().join(crate::log::segment::segment_file_name(1));
    std::fs::OpenOptions::new().write(true).open(&seg1).unwrap().set_len(crate::log::segment::pos_off(end_of_first) as u64).unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    let vol = g.volume("v").unwrap().id;
    let mut b = vec![0u8; 4096];
    for (at, want) in [(0, 1u8), (mb24, 0), (2 * mb24, 0)] {
        g.read(vol, at, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == want), "at {at}: {} instead of {want}", b[0]);
    }
    assert!(dir.path().join("discarded").join(crate::log::segment::segment_file_name(2)).exists());
}

/// The newest segment's header all zeros (its size became durable, its
/// header did not: no commit ever covered it) holds nothing acknowledged:
/// it is moved to `discarded/` and the group opens. Before, the open
/// failed on its "bad magic".
#[test]
fn a_newest_segment_whose_header_was_never_written_is_set_aside() {
    let dir = tempfile::tempdir().unwrap();
    {
        let g = Group::open(dir.path(), "cg0").unwrap();
        let vol = g.create_volume("v", 1 << 20).unwrap();
        g.write(vol, 0, &vec![4u8; 4096]).unwrap();
        g.close().unwrap();
    }
    let zeros = dir.path().join(crate::log::segment::segment_file_name(2));
    std::fs::write(&zeros, vec![0u8; 4096]).unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    let mut b = vec![0u8; 4096];
    g.read(g.volume("v").unwrap().id, 0, &mut b).unwrap();
    assert_eq!(b, vec![4u8; 4096]);
    assert!(!zeros.exists() && dir.path().join("discarded").join(crate::log::segment::segment_file_name(2)).exists());
}

/// GC runs whatever the checkpoint does: with checkpoints failing (here
/// the file's place taken by a directory; in life a full disk), a segment
/// already free is still freed. Before, a failed checkpoint ended the
/// round before GC, so a full disk never got back the space it could.
#[test]
fn gc_frees_what_it_can_while_checkpoints_fail() {
    // No background threads: a maintenance round of the group's own,
    // freeing segment 1 at the same moment, would leave this round
    // nothing to free (seen in CI: "GC freed nothing").
    crate::util::set_sim_clock(Some(1));
    let dir = tempfile::tempdir().unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    let vol = g.create_volume("v", 160 << 20).unwrap();
    let mb = 1u64 << 20;
    for i in 0..17u64 {
        g.write(vol, i * 8 * mb, &vec![1u8; 8 << 20]).unwrap();
    }
    g.checkpoint().unwrap();
    let ck = dir.path().join(super::checkpoint::FILE_NAME);
    std::fs::remove_file(&ck).unwrap();
    std::fs::create_dir(&ck).unwrap();
    std::fs::write(ck.join("in-the-way"), b"x").unwrap();
    // Overwritten: the first segment holds nothing live, and a checkpoint
    // is due (and fails).
    for i in 0..17u64 {
        g.write(vol, i * 8 * mb, &vec![2u8; 8 << 20]).unwrap();
    }
    let e = format!("{:#}", g.maintain().unwrap_err());
    assert!(e.contains("checkpoint"), "{e}");
    assert!(g.stats.gc_segments_freed.load(Ordering::Relaxed) >= 1, "GC freed nothing while checkpoints failed");
    assert!(!dir.path().join(crate::log::segment::segment_file_name(1)).exists());
}

/// A segment GC cannot clean (a live block fails its checksum) is set
/// aside with the reason, and GC goes on to the others; before, it chose
/// the same segment every round and cleaned nothing else.
#[test]
fn gc_sets_aside_a_segment_it_cannot_clean_and_cleans_the_rest() {
    // No background threads: only this test's own maintenance rounds run.
    crate::util::set_sim_clock(Some(1));
    let dir = tempfile::tempdir().unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    let mb = 1u64 << 20;
    let vol = g.create_volume("v", 384 * mb).unwrap();
    for i in 0..48u64 {
        g.write(vol, i * 8 * mb, &vec![0xa1; 8 << 20]).unwrap();
    }
    // Seven records of 8 MiB fill a segment: keep the first block of every
    // seventh record, one in each segment.
    let kept: Vec<u64> = (0..7u64).map(|k| k * 56 * mb / 4096).collect();
    let seg_of = |g: &Group, block: u64| {
        let inner = g.inner.lock();
        let e = inner.volumes[&vol].map.get(block);
        (inner.segments[&e.seg].path.clone(), e.off as u64, e.seg)
    };
    let (path1, off0, _) = seg_of(&g, 0);
    assert_eq!(kept.iter().map(|&b| seg_of(&g, b).2).collect::<Vec<_>>(), (1..=7).collect::<Vec<u32>>());
    // Block 0 goes bad on disk (before GC has any reason to move it).
    g.sync_to(g.flush_target()).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path1).unwrap();
        f.write_all_at(&[0x55], off0 + 100).unwrap();
    }
    // Everything else is trimmed: seven sparse segments, far more log than live.
    for w in kept.windows(2).map(|w| (w[0], w[1])).chain([(kept[6], 384 * mb / 4096)]) {
        g.zero(vol, (w.0 + 1) * 4096, (w.1 - w.0 - 1) * 4096, false).unwrap();
    }
    g.checkpoint().unwrap();
    g.maintain().unwrap();
    let skipped = g.gc_skipped();
    assert_eq!(skipped.len(), 1, "{skipped:?}");
    assert_eq!(skipped[0].0, 1);
    assert!(skipped[0].1.contains("checksum mismatch") && skipped[0].1.contains(&path1.display().to_string()), "{skipped:?}");
    assert!(path1.exists());
    assert!(g.stats.gc_segments_freed.load(Ordering::Relaxed) >= 2, "GC cleaned nothing past the bad segment");
    let (total, live) = (g.log_bytes(), g.live_bytes());
    assert!(total as f64 <= live as f64 * crate::limits::GC_SPACE_RATIO + crate::limits::LOG_RESERVE_BYTES as f64, "{total} bytes of log for {live} live");
    let mut buf = vec![0u8; 4096];
    for &b in &kept[1..] {
        g.read(vol, b * 4096, &mut buf).unwrap();
        assert!(buf.iter().all(|&x| x == 0xa1), "block {b}");
    }
    assert!(g.read(vol, 0, &mut buf).is_err(), "the bad block still reads as an error");
    // Once nothing in it is live, the set-aside segment is freed like any other.
    g.zero(vol, 0, 4096, false).unwrap();
    g.checkpoint().unwrap();
    g.maintain().unwrap();
    assert!(!path1.exists(), "segment 1 was not freed once nothing in it was live");
    assert!(g.gc_skipped().is_empty());
}

/// Makes the unlink of `path` fail: the file moves to `aside` and a
/// directory that is not empty takes its name (the group keeps its open
/// descriptor of the file itself).
fn block_unlink(path: &std::path::Path, aside: &std::path::Path) {
    std::fs::rename(path, aside).unwrap();
    std::fs::create_dir(path).unwrap();
    std::fs::write(path.join("in-the-way"), b"x").unwrap();
}

/// A segment GC could not unlink stays in the log's list and is tried again
/// (before, it was dropped from the list and its file stayed until a restart).
#[test]
fn a_segment_gc_could_not_unlink_is_tried_again() {
    // No background threads: only this test's own maintenance rounds run.
    crate::util::set_sim_clock(Some(1));
    let dir = tempfile::tempdir().unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    let mb = 1u64 << 20;
    let vol = g.create_volume("v", 160 * mb).unwrap();
    for i in 0..17u64 {
        g.write(vol, i * 8 * mb, &vec![1u8; 8 << 20]).unwrap();
    }
    let path = dir.path().join(crate::log::segment::segment_file_name(1));
    let aside = dir.path().join("aside");
    block_unlink(&path, &aside);
    for i in 0..17u64 {
        g.write(vol, i * 8 * mb, &vec![2u8; 8 << 20]).unwrap();
    }
    g.checkpoint().unwrap();
    let e = format!("{:#}", g.maintain().unwrap_err());
    assert!(e.contains("failed to remove log segment") && e.contains(&path.display().to_string()), "{e}");
    assert!(g.inner.lock().segments.contains_key(&1), "dropped from the list while its file stays");
    // The other empty segment (the first pass filled 1 and 2; 3 holds the
    // second pass's start) was freed all the same.
    assert!(!dir.path().join(crate::log::segment::segment_file_name(2)).exists(), "segment 2 left behind");
    // A round that fails again still ends (an empty segment is not the next victim forever).
    assert!(g.maintain().is_err());
    std::fs::remove_dir_all(&path).unwrap();
    std::fs::rename(&aside, &path).unwrap();
    g.maintain().unwrap();
    assert!(!path.exists(), "not tried again");
    assert!(!g.inner.lock().segments.contains_key(&1));
}

/// Empty segments whose unlink fails are not chosen as GC victims again in
/// the same round: an empty segment is the best victim there is, and with
/// the log over GC's threshold the round would otherwise pick it, clean
/// nothing, fail to unlink it, and pick it again, forever.
#[test]
fn a_round_with_segments_it_cannot_unlink_ends() {
    crate::util::set_sim_clock(Some(1));
    let dir = tempfile::tempdir().unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    let mb = 1u64 << 20;
    let vol = g.create_volume("v", 448 * mb).unwrap();
    for i in 0..56u64 {
        g.write(vol, i * 8 * mb, &vec![3u8; 8 << 20]).unwrap();
    }
    // Six full segments, each behind a directory that makes its unlink
    // fail: 384 MiB of log that no round can free, over the 256 MiB reserve.
    let trapped: Vec<_> = (1..=6u32).map(|id| dir.path().join(crate::log::segment::segment_file_name(id))).collect();
    for (i, p) in trapped.iter().enumerate() {
        block_unlink(p, &dir.path().join(format!("aside-{i}")));
    }
    g.zero(vol, 0, 448 * mb, false).unwrap();
    g.checkpoint().unwrap();
    let g2 = g.clone();
    let round = std::thread::spawn(move || g2.maintain());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !round.is_finished() {
        assert!(std::time::Instant::now() < deadline, "the GC round did not end");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let e = format!("{:#}", round.join().unwrap().unwrap_err());
    assert!(e.contains("failed to remove log segment"), "{e}");
    for p in &trapped {
        assert!(g.inner.lock().segments.contains_key(&crate::log::segment::parse_segment_file_name(p.file_name().unwrap().to_str().unwrap()).unwrap()));
    }
}

/// A real tmpfs of a given size (the tests run as root), unmounted on drop.
pub(super) struct Tmpfs {
    pub path: std::path::PathBuf,
    _base: tempfile::TempDir,
}

impl Tmpfs {
    pub fn mount(size: &str) -> Tmpfs {
        let base = tempfile::tempdir().unwrap();
        let path = base.path().join("mnt");
        std::fs::create_dir(&path).unwrap();
        let ok = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(&path).status().unwrap();
        assert!(ok.success(), "cannot mount a tmpfs (the tests run as root)");
        Tmpfs { path, _base: base }
    }

    /// Grows or shrinks it (`size` as for `mount`).
    pub fn resize(&self, size: &str) {
        let ok = std::process::Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.path).status().unwrap();
        assert!(ok.success(), "remount to {size} failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// A full file system under the log (a real tmpfs of 12 MiB): a write that
/// finds no space fails with `NoSpace` (ENOSPC to an NBD client), uses no
/// sequence number and leaves the group working: reads go on, the same
/// write succeeds once the file system is grown, with the next number, and
/// everything acknowledged is there after a reopen. Before, the first full
/// append failed the group until the site restarted.
#[test]
fn a_full_file_system_fails_appends_with_no_space_and_they_resume_after() {
    let m = Tmpfs::mount("12m");
    let mnt = m.path.clone();
    let stamp = |i: u64| -> Vec<u8> { (0..4096u64).map(|j| (i.wrapping_mul(31) ^ j) as u8).collect() };
    let (vol, last);
    {
        let g = Group::open(&mnt, "cg0").unwrap();
        vol = g.create_volume("vol0", 64 << 20).unwrap();
        let (mut acked, mut last_seq) = (0u64, 0u64);
        let err = loop {
            match g.write(vol, acked * 4096, &stamp(acked)) {
                Ok(a) => {
                    acked += 1;
                    last_seq = a.seq;
                }
                Err(e) => break e,
            }
            assert!(acked < 16_000, "12 MiB never filled");
        };
        assert!(matches!(err, IoError::NoSpace(_)), "{err:?}");
        assert!(err.to_string().contains("No space left on device"), "{err}");
        assert!(acked > 1000, "only {acked} writes fitted");
        assert!(g.failed().is_none(), "the group failed: {:?}", g.failed());
        assert!(g.out_of_space().is_some());
        // Nothing of the failed record stays in the file.
        {
            let inner = g.lock_read();
            assert_eq!(inner.tail.file.metadata().unwrap().len(), inner.tail_off, "part of the failed record is left after the tail");
        }
        let seq_before = g.lock_read().next_seq;
        assert_eq!(seq_before, last_seq + 1, "the failed write used up a sequence number");
        // Again: the same error, no sequence number used, reads unaffected.
        assert!(matches!(g.write(vol, acked * 4096, &stamp(acked)), Err(IoError::NoSpace(_))));
        assert_eq!(g.lock_read().next_seq, seq_before, "a failed write used up a sequence number");
        let mut buf = vec![0u8; 4096];
        g.read(vol, 0, &mut buf).unwrap();
        assert_eq!(buf, stamp(0));
        // Space comes back: status says so before any write (a group nobody
        // writes to must not say it is full for ever), and the write goes
        // through with the next number.
        m.resize("256m");
        assert!(g.out_of_space().is_none(), "still out of space with room again");
        let a = g.write(vol, acked * 4096, &stamp(acked)).unwrap();
        assert_eq!(a.seq, seq_before, "not the next sequence number after the last written");
        assert!(g.out_of_space().is_none());
        acked += 1;
        last = acked;
        g.close().unwrap();
    }
    let g = Group::open(&mnt, "cg0").unwrap();
    let mut buf = vec![0u8; 4096];
    for i in 0..last {
        g.read(vol, i * 4096, &mut buf).unwrap();
        assert!(buf == stamp(i), "block {i} of {last} differs after the reopen");
    }
    g.close().unwrap();
}

/// The NBD path's calls (`*_as(Wait::Briefly, …)`) give up on a lock held past
/// `NBD_LOCK_WAIT_US` with `Busy` and nothing written, so that the server
/// can do them again where waiting holds up no runtime worker.
#[test]
fn nbd_calls_give_up_on_a_lock_held_too_long_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    let vol = g.create_volume("v", 1 << 20).unwrap();
    g.write(vol, 0, &[0x11u8; 8192]).unwrap();
    let seq = g.last_seq();
    let held = g.inner.lock();
    let t = std::time::Instant::now();
    assert!(matches!(g.write_as(Wait::Briefly, vol, 0, &[0x22u8; 4096]), Err(IoError::Busy)));
    assert!(t.elapsed() >= std::time::Duration::from_micros(crate::limits::NBD_LOCK_WAIT_US), "it waited for the lock first");
    assert!(matches!(g.write_as(Wait::Briefly, vol, 100, &[0x22u8; 10]), Err(IoError::Busy)), "unaligned");
    assert!(matches!(g.zero_as(Wait::Briefly, vol, 0, 4096, false), Err(IoError::Busy)));
    let mut buf = vec![0u8; 4096];
    assert!(matches!(g.read_as(Wait::Briefly, vol, 0, &mut buf), Err(IoError::Busy)));
    assert!(matches!(g.block_status_as(Wait::Briefly, vol, 0, 4096, 8), Err(IoError::Busy)));
    drop(held);
    assert_eq!(g.last_seq(), seq, "nothing was appended");
    g.read(vol, 0, &mut buf).unwrap();
    assert_eq!(buf, vec![0x11u8; 4096]);

    // Free: the same calls go through.
    g.write_as(Wait::Briefly, vol, 4096, &[0x33u8; 4096]).unwrap();
    g.read_as(Wait::Briefly, vol, 4096, &mut buf).unwrap();
    assert_eq!(buf, vec![0x33u8; 4096]);
    // A zeroing with unaligned edges (three steps, each taking the lock).
    let at = g.zero_as(Wait::Briefly, vol, 100, 3 * 4096, true).unwrap();
    assert!(at.seq > seq);
    let mut all = vec![0u8; 4 * 4096];
    g.read(vol, 0, &mut all).unwrap();
    let mut want = vec![0x11u8; 4096];
    want.extend_from_slice(&[0x33u8; 4096]);
    want.extend_from_slice(&[0u8; 8192]);
    want[100..100 + 3 * 4096].fill(0);
    assert_eq!(all, want);
}

/// A zeroing that finds the lock busy part way (after its range check and
/// its first edge write) and is then done again whole, as the NBD server
/// does on the blocking pool, ends as one done whole, with every earlier
/// step's records covered by the last position it returns.
#[test]
fn a_zeroing_given_up_part_way_and_done_again_ends_whole() {
    for busy_at in 2..=4u64 {
        let dir = tempfile::tempdir().unwrap();
        let g = Group::open(dir.path(), "cg0").unwrap();
        let vol = g.create_volume("v", 1 << 20).unwrap();
        g.write(vol, 0, &[0x11u8; 5 * 4096]).unwrap();
        let before = g.last_seq();
        // Steps: range check, head edge write, whole blocks, tail edge write.
        g.busy_after.store(busy_at, std::sync::atomic::Ordering::Relaxed);
        assert!(matches!(g.zero_as(Wait::Briefly, vol, 100, 3 * 4096, true), Err(IoError::Busy)), "busy at step {busy_at}");
        assert_eq!(g.last_seq(), before + busy_at - 2, "steps before {busy_at} were done");
        let at = g.zero(vol, 100, 3 * 4096, true).unwrap();
        assert_eq!(at.seq, g.last_seq());
        assert!(at.end >= g.flush_target(), "the last position covers every step");
        let mut all = vec![0u8; 5 * 4096];
        g.read(vol, 0, &mut all).unwrap();
        let mut want = vec![0x11u8; 5 * 4096];
        want[100..100 + 3 * 4096].fill(0);
        assert_eq!(all, want, "busy at step {busy_at}");
    }
}

/// An NBD read on a runtime worker (`read_as(Wait::Briefly, …)`) takes only what is in the
/// page cache: data the disk must be read for gives `Busy`, and the read
/// done again as on the blocking pool (`read`) reads it. So a disk that
/// stalls reads holds up no worker. In the crate's directory, not /tmp:
/// it needs a file system that answers `RWF_NOWAIT` (ext4 here; tmpfs on
/// this kernel does not, and its reads never wait for a disk anyway).
#[test]
fn a_read_on_a_worker_never_waits_for_the_disk() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    let vol = g.create_volume("v", 1 << 20).unwrap();
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
    g.write(vol, 4096, &data).unwrap();
    g.sync_to(g.flush_target()).unwrap();
    // Synced, so clean: the kernel drops them from the page cache. (A
    // miss with RWF_NOWAIT starts no readahead; the plain calls after each
    // miss read what they need and are done before the next drop.)
    let uncache = || {
        for s in g.inner.lock().segments.values() {
            // SAFETY: a valid fd; advice only.
            assert_eq!(unsafe { libc::posix_fadvise(s.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
        }
    };
    let seq = g.last_seq();
    let off_worker = || g.stats.nbd_reads_off_worker.load(Ordering::Relaxed);
    uncache();
    let mut buf = vec![0u8; 65536];
    assert!(matches!(g.read_as(Wait::Briefly, vol, 4096, &mut buf), Err(IoError::Busy)), "read from a disk on a worker (file system of {}: RWF_NOWAIT unsupported?)", dir.path().display());
    assert_eq!(off_worker(), 1);
    // A hole needs no disk.
    let mut hole = vec![1u8; 4096];
    g.read_as(Wait::Briefly, vol, 0, &mut hole).unwrap();
    assert_eq!(hole, vec![0u8; 4096]);
    g.read(vol, 4096, &mut buf).unwrap();
    assert_eq!(buf, data);
    // Now in the page cache: on the worker.
    let mut again = vec![0u8; 65536];
    g.read_as(Wait::Briefly, vol, 4096, &mut again).unwrap();
    assert_eq!(again, data);
    assert_eq!(off_worker(), 1);
    // An unaligned write reads its edge block: not from the disk either,
    // and it gives up before it appends anything.
    uncache();
    assert!(matches!(g.write_as(Wait::Briefly, vol, 4096 + 100, &[0x77u8; 10]), Err(IoError::Busy)));
    assert_eq!(g.last_seq(), seq, "nothing appended");
    assert_eq!(off_worker(), 2);
    g.write(vol, 4096 + 100, &[0x77u8; 10]).unwrap();
    assert_eq!(g.last_seq(), seq + 1);
    let mut want = data.clone();
    want[100..110].fill(0x77);
    g.read(vol, 4096, &mut again).unwrap();
    assert_eq!(again, want);
    assert!(g.io.oldest().is_none(), "no read left marked");
}

/// NBD calls of a group whose append or log read has been in progress for
/// `STORAGE_SLOW_MS` give up even though the lock is free, and change
/// nothing; a slow log sync alone does not
/// send them away. Once nothing is pending they go through again.
#[test]
fn nbd_calls_give_up_at_once_while_an_append_or_a_read_is_slow() {
    let dir = tempfile::tempdir().unwrap();
    let g = Group::open(dir.path(), "cg0").unwrap();
    let vol = g.create_volume("v", 1 << 20).unwrap();
    g.write(vol, 0, &[0x11u8; 4096]).unwrap();
    let seq = g.last_seq();
    let slow = std::time::Duration::from_millis(crate::limits::STORAGE_SLOW_MS + 50);
    let mut buf = vec![0u8; 4096];
    for op in [iowatch::IoOp::Append, iowatch::IoOp::Read] {
        let pending = g.io.start(op);
        std::thread::sleep(slow);
        // The lock is free: Busy can only be the slow storage's.
        assert!(matches!(g.write_as(Wait::Briefly, vol, 0, &[0x22u8; 4096]), Err(IoError::Busy)), "{op:?}");
        assert!(matches!(g.read_as(Wait::Briefly, vol, 0, &mut buf), Err(IoError::Busy)), "{op:?}");
        assert!(matches!(g.zero_as(Wait::Briefly, vol, 0, 4096, false), Err(IoError::Busy)), "{op:?}");
        assert!(matches!(g.block_status_as(Wait::Briefly, vol, 0, 4096, 8), Err(IoError::Busy)), "{op:?}");
        drop(pending);
    }
    assert_eq!(g.last_seq(), seq, "nothing was appended");
    // A log sync this slow holds no lock a call needs: not sent away
    // until it counts as stalled.
    let sync = g.io.start(iowatch::IoOp::Sync);
    std::thread::sleep(slow);
    g.read_as(Wait::Briefly, vol, 0, &mut buf).unwrap();
    assert_eq!(buf, vec![0x11u8; 4096]);
    drop(sync);
    g.write_as(Wait::Briefly, vol, 0, &[0x33u8; 4096]).unwrap();
    g.read_as(Wait::Briefly, vol, 0, &mut buf).unwrap();
    assert_eq!(buf, vec![0x33u8; 4096]);
}

/// The worker append gate lets `max` appends in at once and sends the next
/// away (`Busy`) until one leaves. (The site's gate, `WORKER_APPENDS`, is
/// left alone here: other tests of this process append through it.)
#[test]
fn the_worker_append_gate_keeps_a_worker_out_of_appends() {
    let gate = AppendGate::new();
    let unbounded: Vec<_> = (0..100).map(|_| gate.enter().unwrap()).collect();
    drop(unbounded);
    gate.set_max(1);
    let first = gate.enter().unwrap();
    assert!(matches!(gate.enter(), Err(IoError::Busy)), "a second worker into an append");
    assert!(matches!(gate.enter(), Err(IoError::Busy)), "a refusal leaves no place taken");
    drop(first);
    let again = gate.enter().unwrap();
    drop(again);
    gate.set_max(2);
    let (_a, _b) = (gate.enter().unwrap(), gate.enter().unwrap());
    assert!(matches!(gate.enter(), Err(IoError::Busy)));
}
