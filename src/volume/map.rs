//! The block map: for each 4 KiB block of a volume, where its current data
//! lives in the log (segment, offset, CRC) or that it is a hole / zeros.
//!
//! Two-level and sparse: the volume is cut into chunks of 64 blocks; a chunk
//! is absent (all holes), sparse (a short sorted list of 16-byte entries) or
//! dense (64 entries of 12 bytes). Memory is at most ~16 bytes per mapped
//! block plus 32 bytes per 256 KiB of volume size (the chunk slots), far
//! below the 32 bytes per mapped block budget for any realistic fill.

use crate::limits::BLOCK_BYTES;

pub const CHUNK_BLOCKS: usize = 64;
/// A sparse chunk turns dense once it holds more than this many entries
/// (at that point the dense form is no larger).
const SPARSE_MAX: usize = 48;

/// Segment id meaning "reads as zeros but counts as allocated".
pub const SEG_ZERO: u32 = u32::MAX;
/// Segment id meaning "unmapped" (a hole, reads as zeros).
pub const SEG_HOLE: u32 = 0;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Entry {
    pub seg: u32,
    pub off: u32,
    pub crc: u32,
}

impl Entry {
    pub const HOLE: Entry = Entry { seg: SEG_HOLE, off: 0, crc: 0 };
    pub const ZERO: Entry = Entry { seg: SEG_ZERO, off: 0, crc: 0 };
    pub fn is_hole(&self) -> bool {
        self.seg == SEG_HOLE
    }
    pub fn is_data(&self) -> bool {
        self.seg != SEG_HOLE && self.seg != SEG_ZERO
    }
}

#[derive(Clone, Copy, Debug)]
struct SparseEntry {
    idx: u32,
    e: Entry,
}

#[derive(Clone, Debug)]
enum Chunk {
    Empty,
    Sparse(Vec<SparseEntry>),
    Dense(Box<[Entry; CHUNK_BLOCKS]>),
}

#[derive(Clone, Debug, Default)]
pub struct BlockMap {
    chunks: Vec<Chunk>,
    mapped: u64,
}

impl BlockMap {
    pub fn new(blocks: u64) -> BlockMap {
        let mut m = BlockMap::default();
        m.resize(blocks);
        m
    }

    /// Number of blocks the map covers.
    pub fn blocks(&self) -> u64 {
        self.chunks.len() as u64 * CHUNK_BLOCKS as u64
    }

    /// Blocks that are not holes.
    pub fn mapped(&self) -> u64 {
        self.mapped
    }

    /// Grows or shrinks the map to cover `blocks` blocks. Entries past the new
    /// end are dropped; `on_drop` sees each so live counts stay exact.
    pub fn resize_with(&mut self, blocks: u64, mut on_drop: impl FnMut(Entry)) {
        let old_blocks = self.blocks();
        if blocks < old_blocks {
            for b in blocks..old_blocks {
                let old = self.set(b, Entry::HOLE);
                if !old.is_hole() {
                    on_drop(old);
                }
            }
        }
        let chunks = blocks.div_ceil(CHUNK_BLOCKS as u64) as usize;
        self.chunks.resize(chunks, Chunk::Empty);
        self.chunks.shrink_to_fit();
    }

    pub fn resize(&mut self, blocks: u64) {
        self.resize_with(blocks, |_| {});
    }

    pub fn get(&self, block: u64) -> Entry {
        let (c, i) = ((block / CHUNK_BLOCKS as u64) as usize, (block % CHUNK_BLOCKS as u64) as u32);
        match self.chunks.get(c) {
            None | Some(Chunk::Empty) => Entry::HOLE,
            Some(Chunk::Dense(d)) => d[i as usize],
            Some(Chunk::Sparse(v)) => match v.binary_search_by_key(&i, |s| s.idx) {
                Ok(p) => v[p].e,
                Err(_) => Entry::HOLE,
            },
        }
    }

    /// Sets one block, returning the previous entry. Out-of-range blocks are
    /// a caller bug (volumes check bounds first) and are ignored.
    pub fn set(&mut self, block: u64, e: Entry) -> Entry {
        let (c, i) = ((block / CHUNK_BLOCKS as u64) as usize, (block % CHUNK_BLOCKS as u64) as u32);
        let Some(chunk) = self.chunks.get_mut(c) else {
            debug_assert!(false, "block {block} outside map");
            return Entry::HOLE;
        };
        let old = match chunk {
            Chunk::Empty => {
                if !e.is_hole() {
                    let mut v = Vec::with_capacity(1);
                    v.push(SparseEntry { idx: i, e });
                    *chunk = Chunk::Sparse(v);
                }
                Entry::HOLE
            }
            Chunk::Dense(d) => {
                let old = d[i as usize];
                d[i as usize] = e;
                old
            }
            Chunk::Sparse(v) => match v.binary_search_by_key(&i, |s| s.idx) {
                Ok(p) => {
                    let old = v[p].e;
                    if e.is_hole() {
                        v.remove(p);
                        if v.is_empty() {
                            *chunk = Chunk::Empty;
                        }
                    } else {
                        v[p].e = e;
                    }
                    old
                }
                Err(p) => {
                    if !e.is_hole() {
                        if v.len() >= SPARSE_MAX {
                            let mut d = Box::new([Entry::HOLE; CHUNK_BLOCKS]);
                            for s in v.iter() {
                                d[s.idx as usize] = s.e;
                            }
                            d[i as usize] = e;
                            *chunk = Chunk::Dense(d);
                        } else {
                            v.reserve_exact(1);
                            v.insert(p, SparseEntry { idx: i, e });
                        }
                    }
                    Entry::HOLE
                }
            },
        };
        match (old.is_hole(), e.is_hole()) {
            (true, false) => self.mapped += 1,
            (false, true) => self.mapped -= 1,
            _ => {}
        }
        old
    }

    /// Calls `f(block, entry)` for every non-hole block, in block order.
    pub fn for_each_mapped(&self, mut f: impl FnMut(u64, Entry)) {
        for (c, chunk) in self.chunks.iter().enumerate() {
            let base = c as u64 * CHUNK_BLOCKS as u64;
            match chunk {
                Chunk::Empty => {}
                Chunk::Dense(d) => {
                    for (i, e) in d.iter().enumerate() {
                        if !e.is_hole() {
                            f(base + i as u64, *e);
                        }
                    }
                }
                Chunk::Sparse(v) => {
                    for s in v {
                        f(base + s.idx as u64, s.e);
                    }
                }
            }
        }
    }

    /// Heap and inline bytes used by the map (for the memory budget).
    pub fn memory_bytes(&self) -> usize {
        let mut n = std::mem::size_of::<BlockMap>() + self.chunks.capacity() * std::mem::size_of::<Chunk>();
        for chunk in &self.chunks {
            n += match chunk {
                Chunk::Empty => 0,
                Chunk::Dense(_) => std::mem::size_of::<[Entry; CHUNK_BLOCKS]>(),
                Chunk::Sparse(v) => v.capacity() * std::mem::size_of::<SparseEntry>(),
            };
        }
        n
    }

    /// Fast check: is the whole chunk containing `block` unmapped?
    pub fn chunk_is_empty(&self, block: u64) -> bool {
        matches!(self.chunks.get((block / CHUNK_BLOCKS as u64) as usize), None | Some(Chunk::Empty))
    }
}

/// Bytes of volume covered by one block.
pub const fn block_bytes() -> u64 {
    BLOCK_BYTES
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn data(i: u32) -> Entry {
        Entry { seg: 1 + i % 7, off: i, crc: i.wrapping_mul(31) }
    }

    #[test]
    fn matches_a_flat_model() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let blocks = 5000u64;
        let mut m = BlockMap::new(blocks);
        let mut model = vec![Entry::HOLE; blocks as usize];
        for step in 0..200_000u32 {
            let b = rng.random_range(0..blocks);
            let e = match rng.random_range(0..4) {
                0 => Entry::HOLE,
                1 => Entry::ZERO,
                _ => data(step),
            };
            assert_eq!(m.set(b, e), model[b as usize]);
            model[b as usize] = e;
        }
        for b in 0..blocks {
            assert_eq!(m.get(b), model[b as usize]);
        }
        assert_eq!(m.mapped(), model.iter().filter(|e| !e.is_hole()).count() as u64);
        let mut seen = 0;
        m.for_each_mapped(|b, e| {
            assert_eq!(model[b as usize], e);
            seen += 1;
        });
        assert_eq!(seen, m.mapped());
        // Shrink drops entries past the end.
        let mut dropped = 0;
        m.resize_with(100, |_| dropped += 1);
        assert_eq!(dropped, model[100..].iter().filter(|e| !e.is_hole()).count());
        assert_eq!(m.mapped(), model[..100].iter().filter(|e| !e.is_hole()).count() as u64);
    }

    /// Memory budget: at most 32 bytes per mapped 4 KiB block, for a fully
    /// written 1 GiB volume and for a 10% randomly written one.
    #[test]
    fn memory_per_mapped_block() {
        let blocks = (1u64 << 30) / BLOCK_BYTES;
        let mut full = BlockMap::new(blocks);
        for b in 0..blocks {
            full.set(b, data(b as u32));
        }
        let per = full.memory_bytes() as f64 / full.mapped() as f64;
        assert!(per <= 32.0, "full volume: {per} bytes per mapped block");

        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut sparse = BlockMap::new(blocks);
        while sparse.mapped() < blocks / 10 {
            let b = rng.random_range(0..blocks);
            sparse.set(b, data(b as u32));
        }
        let per = sparse.memory_bytes() as f64 / sparse.mapped() as f64;
        assert!(per <= 32.0, "10% written volume: {per} bytes per mapped block");
    }
}
