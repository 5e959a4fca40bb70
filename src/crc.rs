//! CRC-32C (Castagnoli, the iSCSI CRC): the checksum of log records (the
//! header, and one per 4 KiB block), segment headers, checkpoints,
//! heartbeat slots and control frames. (RECORDS frames carry none: their
//! records carry their own. The small JSON files are written crash-safe
//! and parsed strictly instead.)
//!
//! Computed with `crc-fast` (carry-less multiply folding, AVX-512/VPCLMULQDQ
//! where the CPU has it, SSE4.2/PCLMULQDQ or a table otherwise, chosen at
//! run time). Block CRCs are on the write path of the primary and on the
//! DR's receive path; on the bench machine `crc-fast` does a 4 KiB block
//! at ~40 GB/s where the `crc32c` crate did ~13 GB/s (ARCHITECTURE.md
//! "Record format"). The values are the standard CRC-32C, so logs written
//! before the switch read the same; a test checks both against the `crc32c`
//! crate.

/// CRC-32C of `data`.
#[inline]
pub fn crc32c(data: &[u8]) -> u32 {
    crc_fast::crc32_iscsi(data)
}

/// CRC-32C of `a ++ data`, given `crc = crc32c(a)`. Every record header
/// goes through this (with its block CRC list or body).
///
/// A `Digest` started from the register value `!crc` (crc-fast 1.10 keeps
/// the register before the final inversion as its state). Not
/// `checksum_combine`: that builds GF(2) matrices per call, tens of µs,
/// which put ~10% on a sync-mode write's latency when tried.
/// `tests::same_values_as_the_crc32c_crate` guards the state convention.
pub fn crc32c_append(crc: u32, data: &[u8]) -> u32 {
    let mut d = crc_fast::Digest::new_with_init_state(crc_fast::CrcAlgorithm::Crc32Iscsi, u64::from(!crc));
    d.update(data);
    d.finalize() as u32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32c(b""), 0);
    }

    #[test]
    fn same_values_as_the_crc32c_crate() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for len in (0..600).chain([4095, 4096, 4097, 8192, 65536, 1 << 20]) {
            let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            assert_eq!(crc32c(&data), ::crc32c::crc32c(&data), "len {len}");
            let cut = if len == 0 { 0 } else { rng.random_range(0..=len) };
            let (a, b) = data.split_at(cut);
            assert_eq!(crc32c_append(crc32c(a), b), ::crc32c::crc32c(&data), "len {len} cut {cut}");
            assert_eq!(crc32c_append(0x1234_5678, b), ::crc32c::crc32c_append(0x1234_5678, b), "len {len} cut {cut}");
        }
    }
}
