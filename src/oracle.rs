//! The write-order oracle, in one place for every test that needs it.
//!
//! Write number i (1, 2, 3, …) stamps block `(i - 1) % blocks` with i. Then
//! the state after writes 1..k is fully determined, and a copy of the
//! volume (read in one request, i.e. one consistent snapshot) can be checked
//! to be *exactly* that state for some k: no torn block, no block from the
//! future next to one from the past, nothing that was never written. This is
//! the invariant "a DR copy is always a prefix of the primary's write order".

/// The 4 KiB content of write `i` to `block`.
pub fn stamp(i: u64, block: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(4096);
    while b.len() < 4096 {
        b.extend_from_slice(&i.to_le_bytes());
        b.extend_from_slice(&block.to_le_bytes());
        b.extend_from_slice(b"tidemark");
    }
    b.truncate(4096);
    b
}

/// The block that write `i` stamps.
pub fn block_of(i: u64, blocks: u64) -> u64 {
    (i - 1) % blocks
}

/// Returns k if `data` (`blocks` blocks) is exactly the state after writes
/// 1..k, or a description of the first violation.
pub fn prefix_of(data: &[u8], blocks: u64) -> Result<u64, String> {
    if data.len() as u64 != blocks * 4096 {
        return Err(format!("expected {} bytes, got {}", blocks * 4096, data.len()));
    }
    let mut stamps = Vec::with_capacity(blocks as usize);
    let mut k = 0;
    for b in 0..blocks {
        let blk = &data[(b * 4096) as usize..((b + 1) * 4096) as usize];
        let i = u64::from_le_bytes(blk[0..8].try_into().unwrap());
        if i == 0 {
            if !blk.iter().all(|x| *x == 0) {
                return Err(format!("block {b} is neither zero nor a stamp"));
            }
        } else if block_of(i, blocks) != b || blk != &stamp(i, b)[..] {
            return Err(format!("block {b} is torn or holds write {i} meant for another block"));
        }
        k = k.max(i);
        stamps.push(i);
    }
    for b in 0..blocks {
        let expect = if k > b { k - ((k - 1 - b) % blocks) } else { 0 };
        if stamps[b as usize] != expect {
            return Err(format!("block {b} holds write {} but writes 1..{k} leave write {expect} there", stamps[b as usize]));
        }
    }
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_prefixes_and_rejects_the_rest() {
        let blocks = 8;
        let mut vol = vec![0u8; 8 * 4096];
        assert_eq!(prefix_of(&vol, blocks), Ok(0));
        for i in 1..=13u64 {
            let b = block_of(i, blocks);
            vol[(b * 4096) as usize..((b + 1) * 4096) as usize].copy_from_slice(&stamp(i, b));
            assert_eq!(prefix_of(&vol, blocks), Ok(i));
        }
        // Block 2 rolled back from write 11 to write 3 while 12 and 13 are
        // there: never a real state. (Rolling back the newest write, 13, to
        // its predecessor would be the state after 12 writes: a prefix.)
        let mut old = vol.clone();
        old[2 * 4096..3 * 4096].copy_from_slice(&stamp(3, 2));
        assert!(prefix_of(&old, blocks).is_err(), "an older write among newer ones");
        let mut newest_undone = vol.clone();
        newest_undone[4 * 4096..5 * 4096].copy_from_slice(&stamp(5, 4));
        assert_eq!(prefix_of(&newest_undone, blocks), Ok(12));
        let mut hole = vol.clone();
        hole[2 * 4096..3 * 4096].fill(0);
        assert!(prefix_of(&hole, blocks).is_err(), "a hole among newer writes");
        let mut moved = vol.clone();
        moved[5 * 4096..6 * 4096].copy_from_slice(&stamp(12, 5));
        assert!(prefix_of(&moved, blocks).is_err(), "a write in the wrong block");
        let mut torn = vol.clone();
        torn[100] ^= 1;
        assert!(prefix_of(&torn, blocks).is_err());
    }
}
