//! Replication frames: the only thing that crosses the link.
//!
//! ```text
//! header (24 bytes, little-endian):
//!   0 magic u32 "TMRF" | 4 version u8 | 5 kind u8 | 6 flags u16
//!   8 epoch u64 | 16 len u32 (payload bytes on the wire) | 20 crc32c u32 (of those bytes)
//! payload: `len` bytes; with FLAG_LZ4 an lz4 block whose first 4 bytes are
//!          the decompressed length (capped like `len`).
//! ```
//! A RECORDS frame's crc field is 0: its payload is log records, each with
//! its own header CRC and one CRC per 4 KiB block, and the receiver checks
//! all of them before it applies a record (`Group::append_replicated`). A
//! frame CRC over the same bytes would be a third pass over all replicated
//! data on each side, for nothing the record CRCs and TLS do not already
//! catch.
//! Kinds: HELLO and HELLO_REPLY (JSON, small), RECORDS (log records
//! concatenated, byte for byte as in the primary's log), ACK and HEARTBEAT
//! (two u64), ERROR (UTF-8 reason, then the sender closes), MODE (the
//! group's replication mode by name, sent when it changes, only to a DR site
//! whose HELLO_REPLY says `mode_frames`: a DR site takes records in at lower
//! priority outside sync mode, ARCHITECTURE.md "Replication priority").
//!
//! Every frame carries the sender's epoch; a receiver refuses a frame whose
//! epoch is older than its own. Decoding never allocates more than the bytes
//! that actually arrived, and never more than `FRAME_BYTES_MAX`.

use serde::{Deserialize, Serialize};

pub const MAGIC: u32 = u32::from_le_bytes(*b"TMRF");
/// 2: RECORDS frames carry no frame CRC (version 1 had one). A peer on the
/// other version is refused as "unsupported frame version", not as a
/// checksum error.
pub const VERSION: u8 = 2;
pub const HEADER_BYTES: usize = 24;
/// Largest payload of one frame (a batch of records), before and after compression.
pub const FRAME_BYTES_MAX: u32 = 40 * 1024 * 1024;
/// Largest control frame (HELLO, HELLO_REPLY, ERROR).
pub const CONTROL_BYTES_MAX: u32 = 64 * 1024;

pub const FLAG_LZ4: u16 = 1;

pub const HELLO: u8 = 1;
pub const HELLO_REPLY: u8 = 2;
pub const RECORDS: u8 = 3;
pub const ACK: u8 = 4;
pub const HEARTBEAT: u8 = 5;
pub const ERROR: u8 = 6;
pub const MODE: u8 = 7;
/// The frames a DR site sends its primary; a primary reads no others
/// (`read_frame_of`).
pub const FROM_DR: &[u8] = &[HELLO_REPLY, ACK, ERROR];
/// lz4 expands a byte of compressed input to at most 255 bytes of output
/// (a match length byte of 255 extends a match by 255).
const LZ4_EXPANSION_MAX: u64 = 255;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("bad frame magic {0:#010x} (not a tidemark replication peer?)")]
    Magic(u32),
    #[error("unsupported frame version {0}")]
    Version(u8),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("frame kind {kind} claims {len} bytes, above the limit of {max}")]
    TooLong { kind: u8, len: u32, max: u32 },
    #[error("unknown frame flags {0:#x}")]
    Flags(u16),
    #[error("frame checksum mismatch")]
    Checksum,
    #[error("frame payload is malformed: {0}")]
    Malformed(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: u8,
    pub flags: u16,
    pub epoch: u64,
    pub len: u32,
    pub crc: u32,
}

impl FrameHeader {
    /// Parses and checks a header; the payload length is checked against the
    /// limit for its kind before anyone allocates for it.
    pub fn decode(b: &[u8; HEADER_BYTES]) -> Result<FrameHeader, FrameError> {
        let magic = u32::from_le_bytes(b[0..4].try_into().unwrap());
        if magic != MAGIC {
            return Err(FrameError::Magic(magic));
        }
        if b[4] != VERSION {
            return Err(FrameError::Version(b[4]));
        }
        let kind = b[5];
        let max = match kind {
            HELLO | HELLO_REPLY | ERROR => CONTROL_BYTES_MAX,
            RECORDS => FRAME_BYTES_MAX,
            ACK | HEARTBEAT | MODE => 16,
            k => return Err(FrameError::Kind(k)),
        };
        let flags = u16::from_le_bytes([b[6], b[7]]);
        if flags & !FLAG_LZ4 != 0 || (flags & FLAG_LZ4 != 0 && kind != RECORDS) {
            return Err(FrameError::Flags(flags));
        }
        let len = u32::from_le_bytes(b[16..20].try_into().unwrap());
        if len > max {
            return Err(FrameError::TooLong { kind, len, max });
        }
        Ok(FrameHeader { kind, flags, epoch: u64::from_le_bytes(b[8..16].try_into().unwrap()), len, crc: u32::from_le_bytes(b[20..24].try_into().unwrap()) })
    }

    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut b = [0u8; HEADER_BYTES];
        b[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        b[4] = VERSION;
        b[5] = self.kind;
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.epoch.to_le_bytes());
        b[16..20].copy_from_slice(&self.len.to_le_bytes());
        b[20..24].copy_from_slice(&self.crc.to_le_bytes());
        b
    }
}

/// Builds a frame (header + payload), compressing RECORDS payloads with lz4
/// when asked and when it actually saves space.
pub fn encode(kind: u8, epoch: u64, payload: &[u8], lz4: bool) -> Vec<u8> {
    if lz4 && kind == RECORDS {
        let c = lz4_flex::compress_prepend_size(payload);
        if c.len() < payload.len() {
            return assemble(kind, FLAG_LZ4, epoch, &c);
        }
    }
    // One copy of the payload (batches are up to 4 MiB).
    assemble(kind, 0, epoch, payload)
}

/// The header of an uncompressed RECORDS frame whose payload (`len` bytes)
/// is written after it from elsewhere (the sender's records, read in place
/// from the log): `encode` would give the same header.
pub fn records_header(epoch: u64, len: u32) -> [u8; HEADER_BYTES] {
    FrameHeader { kind: RECORDS, flags: 0, epoch, len, crc: 0 }.encode()
}

/// The header's crc field: 0 for RECORDS (see the module docs).
fn frame_crc(kind: u8, body: &[u8]) -> u32 {
    if kind == RECORDS {
        0
    } else {
        crate::crc::crc32c(body)
    }
}

fn assemble(kind: u8, flags: u16, epoch: u64, body: &[u8]) -> Vec<u8> {
    let h = FrameHeader { kind, flags, epoch, len: body.len() as u32, crc: frame_crc(kind, body) };
    let mut out = Vec::with_capacity(HEADER_BYTES + body.len());
    out.extend_from_slice(&h.encode());
    out.extend_from_slice(body);
    out
}

/// Checks a received payload and undoes compression.
pub fn open_payload(h: &FrameHeader, body: Vec<u8>) -> Result<Vec<u8>, FrameError> {
    if body.len() != h.len as usize {
        return Err(FrameError::Malformed(format!("payload is {} bytes, header says {}", body.len(), h.len)));
    }
    if h.kind == RECORDS {
        // Checked record by record by the receiver (see the module docs).
        if h.crc != 0 {
            return Err(FrameError::Malformed(format!("RECORDS frame with checksum {:#010x} (must be 0: records carry their own)", h.crc)));
        }
    } else if crate::crc::crc32c(&body) != h.crc {
        return Err(FrameError::Checksum);
    }
    if h.flags & FLAG_LZ4 == 0 {
        return Ok(body);
    }
    if body.len() < 4 {
        return Err(FrameError::Malformed("lz4 payload without its size".into()));
    }
    let n = u32::from_le_bytes(body[0..4].try_into().unwrap());
    if n > FRAME_BYTES_MAX {
        return Err(FrameError::TooLong { kind: h.kind, len: n, max: FRAME_BYTES_MAX });
    }
    // The decompressor allocates the size claimed: no more than lz4 can
    // expand what is there to (at most 255 bytes per byte, plus a little).
    let expands_to = (body.len() as u64 - 4) * LZ4_EXPANSION_MAX + 64;
    if n as u64 > expands_to {
        return Err(FrameError::Malformed(format!("lz4 payload of {} bytes claims {n} bytes, more than it can expand to ({expands_to})", body.len() - 4)));
    }
    lz4_flex::decompress_size_prepended(&body).map_err(|e| FrameError::Malformed(format!("lz4: {e}")))
}

/// Splits a RECORDS payload into records (header-declared lengths, checked
/// against what is there; the records' own checksums are checked when they
/// are appended).
pub fn split_records(payload: &[u8]) -> Result<Vec<&[u8]>, FrameError> {
    use crate::log::record::{Header, HEADER_BYTES as RH};
    let mut out = Vec::new();
    let mut at = 0usize;
    while at < payload.len() {
        let Some(hb) = payload.get(at..at + RH) else {
            return Err(FrameError::Malformed(format!("truncated record header at byte {at}")));
        };
        let h = Header::decode(hb.try_into().unwrap()).map_err(|e| FrameError::Malformed(format!("record at byte {at}: {e}")))?;
        let total = h.total_len() as usize;
        let Some(r) = payload.get(at..at + total) else {
            return Err(FrameError::Malformed(format!("record at byte {at} claims {total} bytes, only {} left", payload.len() - at)));
        };
        out.push(r);
        at += total;
    }
    Ok(out)
}

pub fn two_u64(a: u64, b: u64) -> [u8; 16] {
    let mut o = [0u8; 16];
    o[0..8].copy_from_slice(&a.to_le_bytes());
    o[8..16].copy_from_slice(&b.to_le_bytes());
    o
}

pub fn parse_two_u64(p: &[u8]) -> Result<(u64, u64), FrameError> {
    if p.len() != 16 {
        return Err(FrameError::Malformed(format!("expected 16 bytes, got {}", p.len())));
    }
    Ok((u64::from_le_bytes(p[0..8].try_into().unwrap()), u64::from_le_bytes(p[8..16].try_into().unwrap())))
}

/// First frame on a link, primary → DR site.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    pub site: String,
    pub group: String,
    pub group_id: u64,
    pub epoch: u64,
    pub last_seq: u64,
    pub mode: String,
}

/// The DR site's answer: where to resume.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HelloReply {
    pub site: String,
    pub group: String,
    /// Next sequence number the DR site expects.
    pub next_seq: u64,
    /// Highest sequence number it holds durably.
    pub durable_seq: u64,
    /// Identity of its record at `next_seq - 1` (`Inner::last_ident`): the
    /// primary checks it against its own. Absent from older sites.
    #[serde(default)]
    pub last_ident: Option<u32>,
    /// The DR site takes MODE frames (absent from older sites: none are
    /// sent to them).
    #[serde(default)]
    pub mode_frames: bool,
    /// The DR site answers every HEARTBEAT with an ACK, so the primary can
    /// tell a silent link from a quiet one (absent from older sites: the
    /// primary then expects frames only while records are unacknowledged).
    #[serde(default)]
    pub heartbeat_acks: bool,
    /// The DR site's `link_timeout_ms`: the primary sends heartbeats at
    /// least four times within it, whatever its own interval (at most
    /// every `HEARTBEAT_INTERVAL_MS_MIN`).
    #[serde(default)]
    pub link_timeout_ms: Option<u64>,
}

/// A MODE frame's payload: the mode by name.
pub fn parse_mode(p: &[u8]) -> Result<super::Mode, FrameError> {
    let s = std::str::from_utf8(p).map_err(|_| FrameError::Malformed(format!("MODE payload of {} bytes is not UTF-8", p.len())))?;
    super::Mode::parse(s).map_err(|e| FrameError::Malformed(format!("MODE frame: {e}")))
}

pub fn decode_json<T: for<'de> Deserialize<'de>>(p: &[u8]) -> Result<T, FrameError> {
    serde_json::from_slice(p).map_err(|e| FrameError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn roundtrip_plain_and_lz4() {
        let payload = vec![7u8; 100_000];
        for lz4 in [false, true] {
            let f = encode(RECORDS, 3, &payload, lz4);
            let h = FrameHeader::decode(f[..HEADER_BYTES].try_into().unwrap()).unwrap();
            assert_eq!(h.epoch, 3);
            assert_eq!(h.flags & FLAG_LZ4 != 0, lz4);
            if lz4 {
                assert!(f.len() < 10_000);
            }
            assert_eq!(open_payload(&h, f[HEADER_BYTES..].to_vec()).unwrap(), payload);
        }
        // Header, then payload from elsewhere: byte for byte the frame
        // `encode` builds.
        let mut mixed: Vec<u8> = (0..50_000u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        mixed.extend_from_slice(&[1u8; 300]);
        for payload in [&payload, &mixed] {
            let mut f = records_header(9, payload.len() as u32).to_vec();
            f.extend_from_slice(payload);
            assert_eq!(f, encode(RECORDS, 9, payload, false));
        }
    }

    #[test]
    fn mode_frames_name_a_mode_and_older_replies_lack_the_flag() {
        for m in [super::super::Mode::Async, super::super::Mode::Sync, super::super::Mode::Periodic] {
            let f = encode(MODE, 2, m.as_str().as_bytes(), false);
            let h = FrameHeader::decode(f[..HEADER_BYTES].try_into().unwrap()).unwrap();
            assert_eq!(parse_mode(&open_payload(&h, f[HEADER_BYTES..].to_vec()).unwrap()), Ok(m));
        }
        assert!(matches!(parse_mode(b"fast"), Err(FrameError::Malformed(e)) if e.contains("\"fast\"")));
        assert!(matches!(parse_mode(&[0xff, 0xfe]), Err(FrameError::Malformed(e)) if e.contains("not UTF-8")));
        // A longer payload is refused by its header, before it is read.
        let b = FrameHeader { kind: MODE, flags: 0, epoch: 1, len: 17, crc: 0 }.encode();
        assert!(matches!(FrameHeader::decode(&b), Err(FrameError::TooLong { .. })));
        // A reply from a site before MODE frames existed.
        let old: HelloReply = decode_json(br#"{"site":"b","group":"cg0","next_seq":5,"durable_seq":4,"last_ident":7}"#).unwrap();
        assert!(!old.mode_frames);
        // Nor did answers to heartbeats: the primary then expects frames
        // only while records are unacknowledged.
        assert!(!old.heartbeat_acks);
        assert_eq!(old.link_timeout_ms, None);
    }

    #[test]
    fn refuses_another_frame_version() {
        let mut b = FrameHeader { kind: RECORDS, flags: 0, epoch: 1, len: 0, crc: 0 }.encode();
        b[4] = 1;
        assert_eq!(FrameHeader::decode(&b), Err(FrameError::Version(1)));
    }

    #[test]
    fn refuses_bad_headers_before_allocating() {
        let mut b = FrameHeader { kind: RECORDS, flags: 0, epoch: 1, len: FRAME_BYTES_MAX + 1, crc: 0 }.encode();
        assert!(matches!(FrameHeader::decode(&b), Err(FrameError::TooLong { .. })));
        b = FrameHeader { kind: HELLO, flags: 0, epoch: 1, len: CONTROL_BYTES_MAX + 1, crc: 0 }.encode();
        assert!(matches!(FrameHeader::decode(&b), Err(FrameError::TooLong { .. })));
        b[0] = b'X';
        assert!(matches!(FrameHeader::decode(&b), Err(FrameError::Magic(_))));
        let b = FrameHeader { kind: 99, flags: 0, epoch: 1, len: 0, crc: 0 }.encode();
        assert_eq!(FrameHeader::decode(&b), Err(FrameError::Kind(99)));
        let b = FrameHeader { kind: ACK, flags: FLAG_LZ4, epoch: 1, len: 16, crc: 0 }.encode();
        assert!(matches!(FrameHeader::decode(&b), Err(FrameError::Flags(_))));
    }

    /// A claimed size lz4 cannot reach from the bytes there is refused
    /// before the decompressor allocates it.
    #[test]
    fn lz4_claiming_more_than_it_can_expand_to_is_refused() {
        let mut body = (FRAME_BYTES_MAX - 1).to_le_bytes().to_vec();
        body.extend_from_slice(&[0u8; 10]);
        let h = FrameHeader { kind: RECORDS, flags: FLAG_LZ4, epoch: 1, len: body.len() as u32, crc: 0 };
        let e = open_payload(&h, body).unwrap_err();
        assert!(matches!(&e, FrameError::Malformed(m) if m.contains("more than it can expand to")), "{e}");
        // Highly compressible data at its best ratio still opens.
        let data = vec![7u8; 4 << 20];
        let f = encode(RECORDS, 1, &data, true);
        let h = FrameHeader::decode(f[..HEADER_BYTES].try_into().unwrap()).unwrap();
        assert_eq!(open_payload(&h, f[HEADER_BYTES..].to_vec()).unwrap(), data);
    }

    /// A primary reads only the frames a DR sends: another kind (a 40 MiB
    /// RECORDS frame) is refused at its header, its payload never read.
    #[test]
    fn a_primary_reads_only_what_a_dr_sends() {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let head = FrameHeader { kind: RECORDS, flags: 0, epoch: 1, len: FRAME_BYTES_MAX, crc: 0 }.encode();
        let e = rt.block_on(read_frame_of(&mut &head[..], FROM_DR)).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        assert!(e.to_string().contains("unexpected frame kind 3"), "{e}");
        let ack = encode(ACK, 1, &two_u64(5, 1), false);
        let (h, body) = rt.block_on(read_frame_of(&mut &ack[..], FROM_DR)).unwrap().unwrap();
        assert_eq!((h.kind, parse_two_u64(&body).unwrap()), (ACK, (5, 1)));
    }

    #[test]
    fn lz4_bomb_is_refused() {
        // A compressed payload claiming a huge decompressed size.
        let mut body = (FRAME_BYTES_MAX + 1).to_le_bytes().to_vec();
        body.extend_from_slice(&[0u8; 16]);
        let h = FrameHeader { kind: RECORDS, flags: FLAG_LZ4, epoch: 1, len: body.len() as u32, crc: 0 };
        assert!(matches!(open_payload(&h, body), Err(FrameError::TooLong { .. })));
    }

    #[test]
    fn frame_checksums_cover_control_frames_and_records_carry_their_own() {
        let f = encode(HELLO, 1, b"{}", false);
        let h = FrameHeader::decode(f[..HEADER_BYTES].try_into().unwrap()).unwrap();
        assert_ne!(h.crc, 0);
        let mut bad = f[HEADER_BYTES..].to_vec();
        bad[0] ^= 1;
        assert_eq!(open_payload(&h, bad), Err(FrameError::Checksum));
        let f = encode(RECORDS, 1, &[5u8; 100], false);
        let h = FrameHeader::decode(f[..HEADER_BYTES].try_into().unwrap()).unwrap();
        assert_eq!(h.crc, 0);
        let liar = FrameHeader { crc: 7, ..h };
        assert!(matches!(open_payload(&liar, f[HEADER_BYTES..].to_vec()), Err(FrameError::Malformed(_))));
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            if bytes.len() >= HEADER_BYTES {
                if let Ok(h) = FrameHeader::decode(bytes[..HEADER_BYTES].try_into().unwrap()) {
                    prop_assert!(h.len <= FRAME_BYTES_MAX);
                    let body = bytes[HEADER_BYTES..].to_vec();
                    if let Ok(p) = open_payload(&h, body) {
                        let _ = split_records(&p);
                        let _ = decode_json::<Hello>(&p);
                        let _ = parse_two_u64(&p);
                    }
                }
            }
            let _ = split_records(&bytes);
        }

        /// The sans-IO decoder gives the same frames whatever pieces the
        /// bytes arrive in, and never panics on garbage.
        #[test]
        fn decoder_takes_any_split(payloads in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 1..6), cuts in proptest::collection::vec(1usize..200, 1..20), junk in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut wire = Vec::new();
            for (i, p) in payloads.iter().enumerate() {
                wire.extend(encode(RECORDS, i as u64, p, i % 2 == 0));
            }
            let mut d = Decoder::default();
            let mut got = Vec::new();
            let mut at = 0;
            let mut c = cuts.iter().cycle();
            while at < wire.len() {
                let n = (*c.next().unwrap()).min(wire.len() - at);
                d.push(&wire[at..at + n]);
                at += n;
                while let Some((h, b)) = d.next_frame().unwrap() {
                    got.push((h.epoch, b));
                }
            }
            prop_assert!(!d.partial());
            prop_assert_eq!(got, payloads.iter().enumerate().map(|(i, p)| (i as u64, p.clone())).collect::<Vec<_>>());
            let mut g = Decoder::default();
            g.push(&junk);
            while let Ok(Some(_)) = g.next_frame() {}
        }

        #[test]
        fn valid_header_with_random_payload(kind in 1u8..7, lz4 in any::<bool>(), payload in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let flags = if lz4 && kind == RECORDS { FLAG_LZ4 } else { 0 };
            let h = FrameHeader { kind, flags, epoch: 1, len: payload.len() as u32, crc: frame_crc(kind, &payload) };
            if let Ok(h) = FrameHeader::decode(&h.encode()) {
                if let Ok(p) = open_payload(&h, payload) {
                    let _ = split_records(&p);
                }
            }
        }
    }
}

/// Reads one frame: the header, then the payload as it arrives (the buffer
/// grows with the bytes received, so a lying length costs nothing up front).
/// `Ok(None)` at a clean end of stream before a header.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<(FrameHeader, Vec<u8>)>> {
    read_frame_into(r, Vec::new()).await
}

/// `read_frame` into `buf` (cleared first): a receiver hands back the last
/// body so that a stream of 4 MiB frames does not regrow (and copy) a
/// buffer from nothing for each one. `buf` only ever grew by bytes that
/// arrived, so the no-allocation-on-claims property holds.
pub async fn read_frame_into<R: tokio::io::AsyncRead + Unpin>(r: &mut R, buf: Vec<u8>) -> std::io::Result<Option<(FrameHeader, Vec<u8>)>> {
    read_frame_kinds(r, buf, None).await
}

/// `read_frame` for frames of `kinds` only: another kind is an error
/// before its payload is read. A primary reads its DR's answers with it
/// (`FROM_DR`), so a DR cannot have it read and queue 40 MiB RECORDS
/// frames, which no DR sends.
pub async fn read_frame_of<R: tokio::io::AsyncRead + Unpin>(r: &mut R, kinds: &[u8]) -> std::io::Result<Option<(FrameHeader, Vec<u8>)>> {
    read_frame_kinds(r, Vec::new(), Some(kinds)).await
}

async fn read_frame_kinds<R: tokio::io::AsyncRead + Unpin>(r: &mut R, mut buf: Vec<u8>, kinds: Option<&[u8]>) -> std::io::Result<Option<(FrameHeader, Vec<u8>)>> {
    use tokio::io::AsyncReadExt;
    let mut hb = [0u8; HEADER_BYTES];
    let mut got = 0;
    while got < HEADER_BYTES {
        let n = r.read(&mut hb[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("stream ended inside a frame header ({got} of {HEADER_BYTES} bytes)")));
        }
        got += n;
    }
    let h = FrameHeader::decode(&hb).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    if kinds.is_some_and(|k| !k.contains(&h.kind)) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, format!("unexpected frame kind {} ({} bytes) from this peer", h.kind, h.len)));
    }
    buf.clear();
    let mut body = buf;
    let n = r.take(h.len as u64).read_to_end(&mut body).await?;
    if n != h.len as usize {
        return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("stream ended inside a frame payload ({n} of {} bytes)", h.len)));
    }
    let body = open_payload(&h, body).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok(Some((h, body)))
}

/// The same decoding as `read_frame`, without I/O: bytes go in as they
/// arrive (in any pieces), whole frames come out. Used by the deterministic
/// simulation; a header is checked (and its length limited) before any of
/// its payload is buffered.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
    header: Option<FrameHeader>,
}

impl Decoder {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<(FrameHeader, Vec<u8>)>, FrameError> {
        if self.header.is_none() {
            if self.buf.len() < HEADER_BYTES {
                return Ok(None);
            }
            let hb: [u8; HEADER_BYTES] = self.buf[..HEADER_BYTES].try_into().unwrap();
            self.header = Some(FrameHeader::decode(&hb)?);
            self.buf.drain(..HEADER_BYTES);
        }
        let h = self.header.unwrap();
        if self.buf.len() < h.len as usize {
            return Ok(None);
        }
        let body: Vec<u8> = self.buf.drain(..h.len as usize).collect();
        self.header = None;
        Ok(Some((h, open_payload(&h, body)?)))
    }

    /// Bytes of a frame begun but not finished.
    pub fn partial(&self) -> bool {
        self.header.is_some() || !self.buf.is_empty()
    }
}
