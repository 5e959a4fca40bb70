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

pub struct Region {
    file: File,
    latest: Heartbeat,
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
        for i in 0..2 {
            let mut b = [0u8; SLOT as usize];
            if file.read_exact_at(&mut b, i * SLOT).is_ok() {
                if let Some(h) = decode(&b) {
                    if h.gen >= latest.gen {
                        latest = h;
                    }
                }
            }
        }
        Ok(Region { file, latest })
    }

    pub fn latest(&self) -> Heartbeat {
        self.latest
    }

    /// Stores a heartbeat durably in the older slot.
    pub fn store(&mut self, seq: u64, sent_ns: u64, epoch: u64) -> Result<Heartbeat> {
        let h = Heartbeat { gen: self.latest.gen + 1, seq, sent_ns, received_ns: crate::util::now_ns(), epoch };
        self.file.write_all_at(&encode(&h), (h.gen % 2) * SLOT).context("failed to write heartbeat region")?;
        self.file.sync_data().context("failed to sync heartbeat region")?;
        self.latest = h;
        Ok(h)
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
        r.store(20, 2, 1).unwrap();
        let r2 = Region::open(d.path()).unwrap();
        assert_eq!(r2.latest().seq, 20);
        // Tear the newest slot: the previous one is used.
        let f = OpenOptions::new().write(true).open(d.path().join(FILE_NAME)).unwrap();
        f.write_all_at(&[0xff; 10], (r2.latest().gen % 2) * SLOT + 20).unwrap();
        let r3 = Region::open(d.path()).unwrap();
        assert_eq!(r3.latest().seq, 10);
    }
}
