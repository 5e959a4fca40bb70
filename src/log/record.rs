//! The log record: the unit of storage *and* of replication.
//!
//! Layout (little-endian), a fixed 64-byte header, then a kind-specific body:
//!
//! ```text
//!  0 magic u32 "TMRC"   4 version u8   5 kind u8   6 flags u16
//!  8 epoch u64         16 seq u64     24 timestamp_ns u64
//! 32 volume u32        36 length u32  40 offset u64
//! 48 body_len u32      52 crc32c u32  56 durable u64
//! ```
//!
//! `durable` (0 in records from before it existed) is where the writing
//! site's log was durable when the record was appended: see
//! `Header::durable` and ARCHITECTURE.md "Torn tails".
//!
//! For `Write` the body is one CRC32C per 4 KiB block followed by the payload
//! (`length` bytes, block aligned): a reader can check any single block without
//! reading the whole record. The header CRC covers the header (CRC field
//! zeroed) and, for `Write`, the block-CRC array; for every other kind it
//! covers the whole body. So every byte of a record is under a checksum, and a
//! torn record is recognised when the log is opened.

use crate::limits::BLOCK_BYTES;

pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"TMRC");
pub const RECORD_VERSION: u8 = 1;
pub const HEADER_BYTES: usize = 64;
/// Flag: this record was written by garbage collection to move live blocks;
/// it repeats the original's epoch, seq and timestamp and is never replicated.
pub const FLAG_RELOCATED: u16 = 1;
/// Flag: part of a dirty-region resync (R3): built by the primary from its
/// current data, applied by the DR site to a staging map that becomes
/// visible only at the `ResyncCommit` record. Carries no sequence number.
pub const FLAG_RESYNC: u16 = 2;
/// Largest body of a `ResyncCommit` (the volume table as JSON).
pub const RESYNC_COMMIT_BODY_MAX: u32 = 1024 * 1024;
/// A `ResyncCommit` at seq S names the primary's record at S in its header's
/// `offset`: this bit set, and in the low 32 bits that record's identity
/// (its header CRC). 0 (commits written before this) means unknown.
pub const COMMIT_IDENT_PRESENT: u64 = 1 << 32;

/// The `offset` of a resync commit that names `ident`.
pub fn commit_offset(ident: Option<u32>) -> u64 {
    ident.map(|c| COMMIT_IDENT_PRESENT | c as u64).unwrap_or(0)
}

/// The identity of the primary record a resync commit stands for.
pub fn commit_ident(h: &Header) -> Option<u32> {
    (h.offset & COMMIT_IDENT_PRESENT != 0).then_some(h.offset as u32)
}

/// The identity of an ordered record, as a DR names its last one at HELLO:
/// its header CRC, or for a resync commit the record it stands for.
pub fn ident(h: &Header) -> Option<u32> {
    if h.kind == Kind::ResyncCommit {
        commit_ident(h)
    } else {
        Some(h.crc)
    }
}

/// Largest body a record may declare (a maximal write, widened to whole
/// blocks, plus its CRC array).
pub const BODY_BYTES_MAX: u32 = (crate::limits::WRITE_RECORD_BYTES_MAX + crate::limits::WRITE_RECORD_BYTES_MAX / 1024) as u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Block-aligned data for `volume` at `offset`, `length` bytes.
    Write = 1,
    /// `length` bytes at `offset` read as zeros and stay allocated (WRITE_ZEROES with NO_HOLE).
    Zero = 2,
    /// `length` bytes at `offset` are unmapped and read as zeros (TRIM, WRITE_ZEROES).
    Trim = 3,
    /// Create volume `volume` with size `offset`; the body is its name.
    VolumeCreate = 10,
    /// Resize volume `volume` to `offset` bytes.
    VolumeResize = 11,
    /// Delete volume (or snapshot) `volume`.
    VolumeDelete = 12,
    /// Create snapshot `volume` of map `offset` (a volume or snapshot); the
    /// body is JSON `{"name": "vol0@s1", "writable": false}`.
    SnapCreate = 13,
    /// Make map `volume` equal to map `offset` (map and size): restore a
    /// volume from a snapshot, refresh a snapshot from its volume, or sync
    /// one snapshot to another. The body names the operation.
    MapCopy = 14,
    /// Local to a DR site (always flagged RELOCATED, never replicated): its
    /// `protect_snapshots` refused the primary's deletion of snapshot
    /// `volume`; the next delete of it from the stream keeps it.
    Protect = 15,
    /// Start of a dirty-region resync: the DR site starts a fresh staging
    /// map. `offset`: the log bytes the resync may need at most (the
    /// primary's estimate; 0 from a primary before session 22).
    ResyncBegin = 20,
    /// End of a resync: the staged blocks and the volume table (body, JSON)
    /// become the DR's state at once, as of sequence number `seq`.
    ResyncCommit = 21,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Write,
            2 => Kind::Zero,
            3 => Kind::Trim,
            10 => Kind::VolumeCreate,
            11 => Kind::VolumeResize,
            12 => Kind::VolumeDelete,
            13 => Kind::SnapCreate,
            14 => Kind::MapCopy,
            15 => Kind::Protect,
            20 => Kind::ResyncBegin,
            21 => Kind::ResyncCommit,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub flags: u16,
    pub epoch: u64,
    pub seq: u64,
    pub timestamp_ns: u64,
    pub volume: u32,
    pub length: u32,
    pub offset: u64,
    pub body_len: u32,
    pub crc: u32,
    /// Where the writing site's log was durable when this record was
    /// appended there (a log position of that site; 0: not known, as in
    /// records written before this field existed). Bytes 56..64, covered
    /// by the CRC; replicated records keep their primary's. At open, an
    /// intact record after a damaged one whose mark lies past the damage
    /// proves the damaged bytes had been made durable: damage, not a
    /// write torn by a crash (`group::open`).
    pub durable: u64,
}

/// Why bytes at some place in the log are not a valid record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("bad record magic {0:#010x}")]
    Magic(u32),
    #[error("unsupported record version {0}")]
    Version(u8),
    #[error("unknown record kind {0}")]
    Kind(u8),
    #[error("record body length {0} exceeds the limit")]
    BodyTooLong(u32),
    #[error("record fields inconsistent: {0}")]
    Inconsistent(&'static str),
    #[error("record checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum { stored: u32, computed: u32 },
    #[error("block {index} checksum mismatch")]
    BlockChecksum { index: u32 },
}

impl Header {
    /// Number of 4 KiB blocks a `Write` carries.
    pub fn blocks(&self) -> u32 {
        if self.kind == Kind::Write {
            (self.length as u64 / BLOCK_BYTES) as u32
        } else {
            0
        }
    }

    /// Bytes of the body covered by the header CRC.
    pub fn checked_body_len(&self) -> usize {
        if self.kind == Kind::Write {
            self.blocks() as usize * 4
        } else {
            self.body_len as usize
        }
    }

    /// Total bytes of the record on disk.
    pub fn total_len(&self) -> u64 {
        HEADER_BYTES as u64 + self.body_len as u64
    }

    /// Byte offset, from the start of the record, of the payload of block `i` of a `Write`.
    pub fn block_payload_offset(&self, i: u32) -> u64 {
        HEADER_BYTES as u64 + self.blocks() as u64 * 4 + i as u64 * BLOCK_BYTES
    }

    fn encode_raw(&self, out: &mut [u8; HEADER_BYTES], crc: u32) {
        out.fill(0);
        out[0..4].copy_from_slice(&RECORD_MAGIC.to_le_bytes());
        out[4] = RECORD_VERSION;
        out[5] = self.kind as u8;
        out[6..8].copy_from_slice(&self.flags.to_le_bytes());
        out[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        out[16..24].copy_from_slice(&self.seq.to_le_bytes());
        out[24..32].copy_from_slice(&self.timestamp_ns.to_le_bytes());
        out[32..36].copy_from_slice(&self.volume.to_le_bytes());
        out[36..40].copy_from_slice(&self.length.to_le_bytes());
        out[40..48].copy_from_slice(&self.offset.to_le_bytes());
        out[48..52].copy_from_slice(&self.body_len.to_le_bytes());
        out[52..56].copy_from_slice(&crc.to_le_bytes());
        out[56..64].copy_from_slice(&self.durable.to_le_bytes());
    }

    /// Encodes the header, computing its CRC over the header and `checked_body`
    /// (the block-CRC array of a write, or the whole body of other kinds).
    pub fn encode(&mut self, checked_body: &[u8], out: &mut [u8; HEADER_BYTES]) {
        debug_assert_eq!(checked_body.len(), self.checked_body_len());
        self.encode_raw(out, 0);
        let crc = crate::crc::crc32c_append(crate::crc::crc32c(&out[..]), checked_body);
        self.crc = crc;
        out[52..56].copy_from_slice(&crc.to_le_bytes());
    }

    /// Parses and validates the fixed fields of a header (not yet its CRC,
    /// which needs the body: see [`Header::verify`]). Never trusts a length
    /// before checking it against the limits.
    pub fn decode(b: &[u8; HEADER_BYTES]) -> Result<Header, DecodeError> {
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let magic = u32_at(0);
        if magic != RECORD_MAGIC {
            return Err(DecodeError::Magic(magic));
        }
        if b[4] != RECORD_VERSION {
            return Err(DecodeError::Version(b[4]));
        }
        let kind = Kind::from_u8(b[5]).ok_or(DecodeError::Kind(b[5]))?;
        let h = Header {
            kind,
            flags: u16::from_le_bytes([b[6], b[7]]),
            epoch: u64_at(8),
            seq: u64_at(16),
            timestamp_ns: u64_at(24),
            volume: u32_at(32),
            length: u32_at(36),
            offset: u64_at(40),
            body_len: u32_at(48),
            crc: u32_at(52),
            durable: u64_at(56),
        };
        if h.body_len > BODY_BYTES_MAX {
            return Err(DecodeError::BodyTooLong(h.body_len));
        }
        // One must follow the last: a record at u64::MAX would leave the
        // next sequence number nowhere to go.
        if h.seq == u64::MAX {
            return Err(DecodeError::Inconsistent("sequence number out of range"));
        }
        if h.flags & !(FLAG_RELOCATED | FLAG_RESYNC) != 0 {
            return Err(DecodeError::Inconsistent("unknown record flags"));
        }
        match kind {
            Kind::Write => {
                if !(h.length as u64).is_multiple_of(BLOCK_BYTES) || !h.offset.is_multiple_of(BLOCK_BYTES) || h.length == 0 {
                    return Err(DecodeError::Inconsistent("write not block aligned"));
                }
                if h.body_len as u64 != h.blocks() as u64 * 4 + h.length as u64 {
                    return Err(DecodeError::Inconsistent("write body length does not match its length"));
                }
            }
            Kind::Zero | Kind::Trim => {
                if h.body_len != 0 || !h.offset.is_multiple_of(BLOCK_BYTES) || !(h.length as u64).is_multiple_of(BLOCK_BYTES) {
                    return Err(DecodeError::Inconsistent("zero/trim record not block aligned or has a body"));
                }
            }
            Kind::VolumeCreate => {
                if h.body_len == 0 || h.body_len as usize > crate::limits::NAME_BYTES_MAX {
                    return Err(DecodeError::Inconsistent("volume name length"));
                }
            }
            Kind::ResyncBegin => {
                if h.body_len != 0 {
                    return Err(DecodeError::Inconsistent("resync begin has a body"));
                }
            }
            Kind::ResyncCommit => {
                if h.body_len > RESYNC_COMMIT_BODY_MAX {
                    return Err(DecodeError::Inconsistent("resync commit body too long"));
                }
                if h.offset & !(COMMIT_IDENT_PRESENT | u32::MAX as u64) != 0 || (h.offset != 0 && h.offset & COMMIT_IDENT_PRESENT == 0) {
                    return Err(DecodeError::Inconsistent("resync commit identity field"));
                }
            }
            Kind::SnapCreate | Kind::MapCopy => {
                if h.body_len == 0 || h.body_len as usize > 4 * crate::limits::NAME_BYTES_MAX {
                    return Err(DecodeError::Inconsistent("snapshot operation body length"));
                }
                if h.offset > u32::MAX as u64 {
                    return Err(DecodeError::Inconsistent("snapshot operation source id"));
                }
            }
            Kind::Protect => {
                if h.body_len != 0 || h.flags & FLAG_RELOCATED == 0 {
                    return Err(DecodeError::Inconsistent("protect record has a body or is not local"));
                }
            }
            Kind::VolumeResize | Kind::VolumeDelete => {
                if h.body_len != 0 {
                    return Err(DecodeError::Inconsistent("volume operation has a body"));
                }
            }
        }
        Ok(h)
    }

    /// Checks the header CRC given the raw header bytes and the checked body.
    pub fn verify(&self, raw: &[u8; HEADER_BYTES], checked_body: &[u8]) -> Result<(), DecodeError> {
        let mut copy = *raw;
        copy[52..56].fill(0);
        let computed = crate::crc::crc32c_append(crate::crc::crc32c(&copy), checked_body);
        if computed != self.crc {
            return Err(DecodeError::Checksum { stored: self.crc, computed });
        }
        Ok(())
    }
}

/// CRC32C of each 4 KiB block of `payload`, little-endian, concatenated.
pub fn block_crcs(payload: &[u8]) -> Vec<u8> {
    debug_assert!((payload.len() as u64).is_multiple_of(BLOCK_BYTES));
    let mut out = Vec::with_capacity(payload.len() / BLOCK_BYTES as usize * 4);
    for block in payload.chunks(BLOCK_BYTES as usize) {
        out.extend_from_slice(&crate::crc::crc32c(block).to_le_bytes());
    }
    out
}

/// Reads the CRC of block `i` out of a block-CRC array.
pub fn crc_at(crcs: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(crcs[i * 4..i * 4 + 4].try_into().unwrap())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(kind: Kind) -> Header {
        Header {
            kind,
            flags: 0,
            epoch: 3,
            seq: 77,
            timestamp_ns: 123456789,
            volume: 2,
            length: 8192,
            offset: 4096 * 5,
            body_len: if kind == Kind::Write { 8 + 8192 } else { 0 },
            crc: 0,
            durable: 0,
        }
    }

    #[test]
    fn roundtrip_write() {
        let payload = vec![7u8; 8192];
        let crcs = block_crcs(&payload);
        let mut h = sample(Kind::Write);
        let mut raw = [0u8; HEADER_BYTES];
        h.encode(&crcs, &mut raw);
        let d = Header::decode(&raw).unwrap();
        assert_eq!(d, h);
        d.verify(&raw, &crcs).unwrap();
        let mut bad = crcs.clone();
        bad[0] ^= 1;
        assert!(matches!(d.verify(&raw, &bad), Err(DecodeError::Checksum { .. })));
    }

    #[test]
    fn rejects_inconsistent() {
        let mut h = sample(Kind::Write);
        h.body_len = 5;
        let mut raw = [0u8; HEADER_BYTES];
        h.encode_raw(&mut raw, 0);
        assert!(Header::decode(&raw).is_err());
        let mut h = sample(Kind::Trim);
        h.offset = 3;
        h.encode_raw(&mut raw, 0);
        assert!(Header::decode(&raw).is_err());
        // The last sequence number leaves none for the next record (a DR
        // would take it and every later one at the same number).
        let mut h = sample(Kind::Trim);
        h.seq = u64::MAX;
        h.encode(&[], &mut raw);
        assert!(matches!(Header::decode(&raw), Err(DecodeError::Inconsistent("sequence number out of range"))));
        h.seq = u64::MAX - 1;
        h.encode(&[], &mut raw);
        Header::decode(&raw).unwrap();
    }

    #[test]
    fn a_resync_commit_names_the_record_it_stands_for() {
        let mut raw = [0u8; HEADER_BYTES];
        for ident in [None, Some(0), Some(0xdead_beef), Some(u32::MAX)] {
            let mut h = sample(Kind::ResyncCommit);
            h.length = 0;
            h.offset = commit_offset(ident);
            h.encode(&[], &mut raw);
            assert_eq!(commit_ident(&Header::decode(&raw).unwrap()), ident);
        }
        // Anything else in the field is refused: an identity without its
        // flag, or bits above it.
        for offset in [5, COMMIT_IDENT_PRESENT << 1, (COMMIT_IDENT_PRESENT << 1) | COMMIT_IDENT_PRESENT] {
            let mut h = sample(Kind::ResyncCommit);
            h.offset = offset;
            h.encode_raw(&mut raw, 0);
            assert!(Header::decode(&raw).is_err(), "offset {offset:#x}");
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), HEADER_BYTES)) {
            let raw: [u8; HEADER_BYTES] = bytes.try_into().unwrap();
            let _ = Header::decode(&raw);
        }

        #[test]
        fn any_flipped_bit_is_caught(bit in 0usize..(HEADER_BYTES * 8 + 16 * 8)) {
            let payload = vec![0x5au8; 16384];
            let crcs = block_crcs(&payload);
            let mut h = sample(Kind::Write);
            h.length = 16384;
            h.body_len = 16 + 16384;
            let mut raw = [0u8; HEADER_BYTES];
            h.encode(&crcs, &mut raw);
            let mut crcs2 = crcs.clone();
            if bit < HEADER_BYTES * 8 {
                raw[bit / 8] ^= 1 << (bit % 8);
            } else {
                let b = bit - HEADER_BYTES * 8;
                crcs2[b / 8] ^= 1 << (b % 8);
            }
            let ok = Header::decode(&raw).and_then(|d| d.verify(&raw, &crcs2));
            prop_assert!(ok.is_err());
        }
    }
}
