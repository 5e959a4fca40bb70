//! The DR site's private heartbeat region (R15): a small file apart from
//! volume data holding the latest heartbeat received from the primary,
//! overwritten each time. Two 64-byte slots written alternately, each with a
//! generation and a CRC, so a torn write leaves the other slot intact.
//!
//! slot: magic u32 | gen u64 | seq u64 | sent_ns u64 | received_ns u64 | epoch u64 | pad | crc32c u32 (at 60)

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result};
use serde::Serialize;

const MAGIC: u32 = u32::from_le_bytes(*b"TMHB");
const SLOT: u64 = 64;
pub const FILE_NAME: &str = "heartbeat";

#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct Heartbeat {
    pub gen: u64,
    /// Last sequence number the primary had when it sent the heartbeat.
    pub seq: u64,
    /// Primary's clock when sent.
    pub sent_ns: u64,
    /// This site's clock when stored.
    pub received_ns: u64,
    pub epoch: u64,
}

/// The region of one group. A heartbeat is written to the slot not holding
/// the newest durable one, then made durable by the region's own thread:
/// the connection's thread, which also sends the DR's acknowledgements and
/// their repeats, never waits on an fdatasync (on a busy disk one can take
/// longer than a primary's link timeout). A heartbeat that arrives while
/// the one before is still being synced waits in memory and is written
/// next (only the newest: the region holds the latest), so a slot is never
/// overwritten while the other one is not yet durable.
pub struct Region {
    shared: std::sync::Arc<Shared>,
    syncer: Option<std::thread::JoinHandle<()>>,
}

struct Shared {
    file: File,
    path: std::path::PathBuf,
    state: std::sync::Mutex<State>,
    cv: std::sync::Condvar,
    /// Tests: syncs hang (as an fdatasync on a stalled disk does) while set.
    #[cfg(test)]
    stall: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct State {
    /// The newest heartbeat received (what status shows).
    latest: Heartbeat,
    /// Generation of the newest slot written, and of the newest durable.
    written: u64,
    durable: u64,
    /// Received while a sync was running: written once it ends.
    pending: Option<Heartbeat>,
    /// A write or sync failed: every later store says so.
    failed: Option<String>,
    stop: bool,
}

fn decode(b: &[u8; SLOT as usize]) -> Option<Heartbeat> {
    let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
    if u32::from_le_bytes(b[0..4].try_into().unwrap()) != MAGIC {
        return None;
    }
    if u32::from_le_bytes(b[60..64].try_into().unwrap()) != crate::crc::crc32c(&b[0..60]) {
        return None;
    }
    // A slot at the last generation leaves none for the next heartbeat
    // (it would wrap to 0 and lose to this one on every open): not one
    // this code writes, so not taken.
    let gen = u64_at(4);
    (gen != u64::MAX).then(|| Heartbeat { gen, seq: u64_at(12), sent_ns: u64_at(20), received_ns: u64_at(28), epoch: u64_at(36) })
}

fn encode(h: &Heartbeat) -> [u8; SLOT as usize] {
    let mut b = [0u8; SLOT as usize];
    b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    b[4..12].copy_from_slice(&h.gen.to_le_bytes());
    b[12..20].copy_from_slice(&h.seq.to_le_bytes());
    b[20..28].copy_from_slice(&h.sent_ns.to_le_bytes());
    b[28..36].copy_from_slice(&h.received_ns.to_le_bytes());
    b[36..44].copy_from_slice(&h.epoch.to_le_bytes());
    let crc = crate::crc::crc32c(&b[0..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

impl Region {
    pub fn open(dir: &Path) -> Result<Region> {
        let path = dir.join(FILE_NAME);
        let existed = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("failed to open heartbeat region {}", path.display()))?;
        if !existed {
            // Its directory entry, durable before any heartbeat stored in
            // it is (a power loss would otherwise take the whole region).
            crate::crashsafe::fsync_dir(dir)?;
        }
        let mut latest = Heartbeat::default();
        let mut valid = 0;
        for i in 0..2 {
            let mut b = [0u8; SLOT as usize];
            if file.read_exact_at(&mut b, i * SLOT).is_ok() {
                if let Some(h) = decode(&b) {
                    valid += 1;
                    if h.gen >= latest.gen {
                        latest = h;
                    }
                }
            }
        }
        // One torn slot is what a crash leaves (the other holds the last
        // heartbeat); none valid in a file with bytes is damage: said,
        // not passed over as a region that never had a heartbeat.
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if existed && len > 0 && valid == 0 {
            tracing::warn!("heartbeat region {}: neither slot is valid ({len} bytes): the last heartbeat from the primary is unknown until the next arrives", path.display());
        }
        let state = State { latest, written: latest.gen, durable: latest.gen, ..State::default() };
        let shared = std::sync::Arc::new(Shared {
            file,
            path,
            state: std::sync::Mutex::new(state),
            cv: std::sync::Condvar::new(),
            #[cfg(test)]
            stall: Default::default(),
        });
        let s2 = shared.clone();
        let syncer = std::thread::Builder::new()
            .name("heartbeat-sync".into())
            .spawn(move || s2.sync_loop())
            .with_context(|| format!("failed to start the sync thread of heartbeat region {}", shared.path.display()))?;
        Ok(Region { shared, syncer: Some(syncer) })
    }

    pub fn latest(&self) -> Heartbeat {
        self.shared.lock().latest
    }

    /// Stores a heartbeat: written to the older slot now if no sync is
    /// running, else when it ends; made durable by the region's thread.
    pub fn store(&mut self, seq: u64, sent_ns: u64, epoch: u64) -> Result<Heartbeat> {
        let mut st = self.shared.lock();
        if let Some(e) = &st.failed {
            anyhow::bail!("{e}");
        }
        // Generations count slots written, so they alternate slots.
        let h = Heartbeat { gen: st.written + 1, seq, sent_ns, received_ns: crate::util::now_ns(), epoch };
        st.latest = h;
        if st.written == st.durable {
            self.shared.write_slot(&mut st, h);
            self.shared.cv.notify_all();
        } else {
            st.pending = Some(h);
        }
        Ok(h)
    }

    /// Tests: this region's syncs hang (as on a stalled disk) while set.
    #[cfg(test)]
    pub(crate) fn stall_syncs(&self, on: bool) {
        self.shared.stall.store(on, std::sync::atomic::Ordering::Release);
    }

    /// Waits until the newest heartbeat stored is durable (tests, and a
    /// clean stop).
    pub fn wait_durable(&self) -> Result<()> {
        let mut st = self.shared.lock();
        while st.failed.is_none() && (st.written != st.durable || st.pending.is_some()) {
            st = self.shared.cv.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        match &st.failed {
            Some(e) => anyhow::bail!("{e}"),
            None => Ok(()),
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes `h` to its slot (the one not holding the durable newest).
    fn write_slot(&self, st: &mut State, h: Heartbeat) {
        match self.file.write_all_at(&encode(&h), (h.gen % 2) * SLOT) {
            Ok(()) => st.written = h.gen,
            Err(e) => st.failed = Some(format!("failed to write heartbeat region {}: {e}", self.path.display())),
        }
    }

    fn sync_loop(&self) {
        let mut st = self.lock();
        loop {
            while !st.stop && st.failed.is_none() && st.written == st.durable {
                st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.failed.is_some() || (st.stop && st.written == st.durable) {
                self.cv.notify_all();
                return;
            }
            let target = st.written;
            drop(st);
            #[cfg(test)]
            while self.stall.load(std::sync::atomic::Ordering::Acquire) {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            let r = self.file.sync_data();
            st = self.lock();
            match r {
                Ok(()) => {
                    st.durable = target;
                    // (Its generation, and `latest`, were set by `store`:
                    // nothing was written since.)
                    if let Some(h) = st.pending.take() {
                        debug_assert_eq!(h.gen, st.written + 1);
                        self.write_slot(&mut st, h);
                    }
                }
                Err(e) => st.failed = Some(format!("failed to sync heartbeat region {}: {e}", self.path.display())),
            }
            self.cv.notify_all();
        }
    }
}

impl Drop for Region {
    /// Stops the thread once what was written is durable (a pending
    /// heartbeat is written first).
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.cv.notify_all();
        if let Some(t) = self.syncer.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_a_torn_slot() {
        let d = tempfile::tempdir().unwrap();
        let mut r = Region::open(d.path()).unwrap();
        assert_eq!(r.latest().gen, 0);
        r.store(10, 1, 1).unwrap();
        r.wait_durable().unwrap();
        r.store(20, 2, 1).unwrap();
        r.wait_durable().unwrap();
        let r2 = Region::open(d.path()).unwrap();
        assert_eq!(r2.latest().seq, 20);
        // Tear the newest slot: the previous one is used.
        let f = OpenOptions::new().write(true).open(d.path().join(FILE_NAME)).unwrap();
        f.write_all_at(&[0xff; 10], (r2.latest().gen % 2) * SLOT + 20).unwrap();
        let r3 = Region::open(d.path()).unwrap();
        assert_eq!(r3.latest().seq, 10);
    }

    /// A heartbeat is stored without waiting for a sync: while one hangs
    /// (a busy or stalled disk), later heartbeats are taken at once (the
    /// newest waits in memory), the durable slot is not overwritten, and
    /// once the sync returns the newest is written and made durable.
    /// Before, `store` ran the fdatasync on the connection's thread, which
    /// also sends the DR's acknowledgements: a sync longer than the
    /// primary's link timeout made the link look silent.
    #[test]
    fn a_hung_sync_holds_no_store_and_never_the_durable_slot() {
        let d = tempfile::tempdir().unwrap();
        let mut r = Region::open(d.path()).unwrap();
        r.store(1, 1, 1).unwrap();
        r.wait_durable().unwrap();
        r.shared.stall.store(true, std::sync::atomic::Ordering::Release);
        r.store(2, 2, 1).unwrap(); // written, its sync hangs
        let t = std::time::Instant::now();
        for seq in 3..=20 {
            r.store(seq, seq, 1).unwrap();
        }
        assert!(t.elapsed() < std::time::Duration::from_secs(1), "stores waited {:?} for the hung sync", t.elapsed());
        assert_eq!(r.latest().seq, 20);
        // On disk meanwhile: seq 1 (durable) and seq 2 (written); a power
        // cut now leaves at least seq 1.
        let on_disk = Region::open(d.path()).unwrap().latest();
        assert_eq!(on_disk.seq, 2);
        let mut slot = [0u8; SLOT as usize];
        r.shared.file.read_exact_at(&mut slot, (on_disk.gen + 1) % 2 * SLOT).unwrap();
        assert_eq!(decode(&slot).map(|h| h.seq), Some(1), "the durable slot was overwritten");
        r.shared.stall.store(false, std::sync::atomic::Ordering::Release);
        r.wait_durable().unwrap();
        let after = Region::open(d.path()).unwrap().latest();
        assert_eq!((after.seq, after.gen), (20, on_disk.gen + 1));
    }
}
