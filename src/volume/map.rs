//! The block map: for each 4 KiB block of a volume, where its current data
//! lives in the log (segment, offset, CRC) or that it is a hole / zeros.
//!
//! Sparse at every level: the volume is cut into chunks of 64 blocks, grouped
//! 512 to a top-level slot (128 MiB of volume). A slot is allocated on the
//! first write into its range; a chunk is empty (all holes), sparse (a short
//! sorted list of 16-byte entries) or dense (64 entries of 12 bytes). Memory
//! is ~12-16 bytes per mapped block plus 12 KiB per 128 MiB range written
//! at all: under the 32 bytes per mapped block budget for any realistic
//! fill, and a thin 64 TiB volume costs 4 MiB.
//!
//! Copy on write: the 128 MiB regions are shared (`Arc`) between maps, so a
//! snapshot, restore, refresh or snapshot sync is a clone of the region
//! pointer list (8 pointers per GiB), and the first write into a shared
//! region copies that region only. Each map also counts its references per
//! log segment (`seg_refs`), so GC learns which segments any map still
//! needs without walking maps, and a clone copies those counts too.

use std::collections::HashMap;
use std::sync::Arc;

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

/// Chunks per top-level group (512 x 64 blocks = 128 MiB of volume). Groups
/// are allocated on first write, so an empty or thin volume costs 8 bytes per
/// 128 MiB of size.
pub const GROUP_CHUNKS: usize = 512;
/// Blocks per region (shared unit between maps).
pub const REGION_BLOCKS: u64 = (GROUP_CHUNKS * CHUNK_BLOCKS) as u64;

type Region = Arc<[Chunk; GROUP_CHUNKS]>;

#[derive(Clone, Debug, Default)]
pub struct BlockMap {
    groups: Vec<Option<Region>>,
    chunks: usize,
    mapped: u64,
    /// Data entries per log segment (references, not unique blocks).
    seg_refs: HashMap<u32, u64>,
}

impl BlockMap {
    pub fn new(blocks: u64) -> BlockMap {
        let mut m = BlockMap::default();
        m.resize(blocks);
        m
    }

    /// Number of blocks the map covers (whole chunks).
    pub fn blocks(&self) -> u64 {
        self.chunks as u64 * CHUNK_BLOCKS as u64
    }

    /// Blocks that are not holes.
    pub fn mapped(&self) -> u64 {
        self.mapped
    }

    fn chunk(&self, c: usize) -> Option<&Chunk> {
        if c >= self.chunks {
            return None;
        }
        self.groups.get(c / GROUP_CHUNKS)?.as_ref().map(|g| &g[c % GROUP_CHUNKS])
    }

    fn chunk_mut(&mut self, c: usize, allocate: bool) -> Option<&mut Chunk> {
        if c >= self.chunks {
            return None;
        }
        let slot = self.groups.get_mut(c / GROUP_CHUNKS)?;
        if slot.is_none() {
            if !allocate {
                return None;
            }
            let b: Box<[Chunk; GROUP_CHUNKS]> = vec![Chunk::Empty; GROUP_CHUNKS].into_boxed_slice().try_into().expect("group size");
            *slot = Some(Arc::from(b));
        }
        // Copy on write: a region shared with another map is copied first.
        slot.as_mut().map(|g| &mut Arc::make_mut(g)[c % GROUP_CHUNKS])
    }

    /// Grows or shrinks the map to cover `blocks` blocks. Entries past the new
    /// end are dropped (`split_off`).
    pub fn resize(&mut self, blocks: u64) {
        if blocks < self.blocks() {
            drop(self.split_off(blocks));
        } else {
            self.set_blocks(blocks);
        }
    }

    fn set_blocks(&mut self, blocks: u64) {
        self.chunks = blocks.div_ceil(CHUNK_BLOCKS as u64) as usize;
        let groups = self.chunks.div_ceil(GROUP_CHUNKS);
        self.groups.resize(groups, None);
        self.groups.shrink_to_fit();
    }

    /// Shrinks the map to `blocks` blocks and returns what was cut off: a
    /// map of the old size holding exactly the entries at or past `blocks`,
    /// with their counts. Whole regions past the new end move to it as they
    /// are (still shared with any map that shares them), so the cost is a
    /// count of the moved entries plus the entries of one region, and no
    /// list of them: a shrink that drops a TiB neither copies nor
    /// allocates per block. Nothing to cut (`blocks` at or past the end)
    /// gives an empty map and leaves this one as it is.
    pub fn split_off(&mut self, blocks: u64) -> BlockMap {
        let mut tail = BlockMap { groups: vec![None; self.groups.len()], chunks: self.chunks, mapped: 0, seg_refs: HashMap::new() };
        if blocks >= self.blocks() {
            return tail;
        }
        let whole = blocks.div_ceil(REGION_BLOCKS) as usize;
        for r in whole..self.groups.len() {
            tail.groups[r] = self.groups[r].take();
        }
        tail.count_all();
        self.mapped -= tail.mapped;
        for (&seg, &n) in &tail.seg_refs {
            Self::unref(&mut self.seg_refs, seg, n);
        }
        // The region the new end falls in: its entries past the end, one
        // by one (at most one region's).
        let mut moved = Vec::new();
        self.for_each_mapped_in(blocks, whole as u64 * REGION_BLOCKS, |b, e| moved.push((b, e)));
        for (b, e) in moved {
            self.set(b, Entry::HOLE);
            tail.set(b, e);
        }
        self.set_blocks(blocks);
        tail
    }

    /// Sets `mapped` and `seg_refs` from the entries (runs of one segment
    /// counted as one addition).
    fn count_all(&mut self) {
        let (mut mapped, mut refs) = (0u64, HashMap::new());
        let (mut seg, mut run) = (SEG_HOLE, 0u64);
        let mut add = |e: &Entry| {
            mapped += 1;
            if e.seg != seg {
                if run > 0 && seg != SEG_ZERO {
                    *refs.entry(seg).or_insert(0) += run;
                }
                (seg, run) = (e.seg, 0);
            }
            run += 1;
        };
        for g in self.groups.iter().flatten() {
            for chunk in g.iter() {
                match chunk {
                    Chunk::Empty => {}
                    Chunk::Dense(d) => d.iter().filter(|e| !e.is_hole()).for_each(&mut add),
                    Chunk::Sparse(v) => v.iter().for_each(|s| add(&s.e)),
                }
            }
        }
        if run > 0 && seg != SEG_ZERO {
            *refs.entry(seg).or_insert(0) += run;
        }
        self.mapped = mapped;
        self.seg_refs = refs;
    }

    pub fn get(&self, block: u64) -> Entry {
        let (c, i) = ((block / CHUNK_BLOCKS as u64) as usize, (block % CHUNK_BLOCKS as u64) as u32);
        match self.chunk(c) {
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
        if c >= self.chunks {
            debug_assert!(false, "block {block} outside map");
            return Entry::HOLE;
        }
        let Some(chunk) = self.chunk_mut(c, !e.is_hole()) else {
            return Entry::HOLE; // setting a hole where nothing is allocated
        };
        let old = match chunk {
            Chunk::Empty => {
                if !e.is_hole() {
                    *chunk = Chunk::Sparse(vec![SparseEntry { idx: i, e }]);
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
        if old.is_data() {
            Self::unref(&mut self.seg_refs, old.seg, 1);
        }
        if e.is_data() {
            *self.seg_refs.entry(e.seg).or_insert(0) += 1;
        }
        old
    }

    fn unref(refs: &mut HashMap<u32, u64>, seg: u32, n: u64) {
        if let Some(c) = refs.get_mut(&seg) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                refs.remove(&seg);
            }
        }
    }

    /// Data entries of this map pointing into segment `seg`.
    pub fn seg_refs(&self, seg: u32) -> u64 {
        self.seg_refs.get(&seg).copied().unwrap_or(0)
    }

    /// Segments this map points into, with the number of entries each.
    pub fn seg_ref_counts(&self) -> &HashMap<u32, u64> {
        &self.seg_refs
    }

    /// Number of 128 MiB regions the map covers.
    pub fn regions(&self) -> usize {
        self.groups.len()
    }

    /// Has region `r` ever been written (is it allocated)?
    pub fn region_present(&self, r: usize) -> bool {
        matches!(self.groups.get(r), Some(Some(_)))
    }

    /// Is region `r` the very same (shared, unmodified) in both maps?
    /// Absent in both counts as shared.
    pub fn region_shared(&self, other: &BlockMap, r: usize) -> bool {
        match (self.groups.get(r), other.groups.get(r)) {
            (Some(Some(a)), Some(Some(b))) => Arc::ptr_eq(a, b),
            (Some(None) | None, Some(None) | None) => true,
            _ => false,
        }
    }

    /// Chunk `c`'s 64 entries (holes past the end or where nothing is mapped).
    pub fn chunk_entries(&self, c: usize) -> [Entry; CHUNK_BLOCKS] {
        let mut out = [Entry::HOLE; CHUNK_BLOCKS];
        match self.chunk(c) {
            None | Some(Chunk::Empty) => {}
            Some(Chunk::Dense(d)) => out = **d,
            Some(Chunk::Sparse(v)) => {
                for s in v {
                    out[s.idx as usize] = s.e;
                }
            }
        }
        out
    }

    /// Do both maps hold the same entries in chunk `c` (blocks
    /// `c * CHUNK_BLOCKS ..`)? Cheap where they do: one comparison of the
    /// chunk, not one lookup per block.
    pub fn chunk_same(&self, other: &BlockMap, c: usize) -> bool {
        match (self.chunk(c), other.chunk(c)) {
            (None | Some(Chunk::Empty), None | Some(Chunk::Empty)) => true,
            (Some(Chunk::Dense(a)), Some(Chunk::Dense(b))) => a[..] == b[..],
            (Some(Chunk::Sparse(a)), Some(Chunk::Sparse(b))) => a.len() == b.len() && a.iter().zip(b.iter()).all(|(x, y)| x.idx == y.idx && x.e == y.e),
            _ => self.chunk_entries(c) == other.chunk_entries(c),
        }
    }

    /// Makes region `r` of this map the same shared region as `other`'s
    /// (used when loading a checkpoint that stored it once). Both maps must
    /// cover the region.
    pub fn adopt_region(&mut self, other: &BlockMap, r: usize) {
        if r >= self.groups.len() || r >= other.groups.len() {
            return;
        }
        let mut gone = Vec::new();
        self.for_each_mapped_in(r as u64 * REGION_BLOCKS, (r as u64 + 1) * REGION_BLOCKS, |_, e| gone.push(e));
        for e in gone {
            self.mapped -= 1;
            if e.is_data() {
                Self::unref(&mut self.seg_refs, e.seg, 1);
            }
        }
        self.groups[r] = other.groups[r].clone();
        let mut new = Vec::new();
        self.for_each_mapped_in(r as u64 * REGION_BLOCKS, (r as u64 + 1) * REGION_BLOCKS, |_, e| new.push(e));
        for e in new {
            self.mapped += 1;
            if e.is_data() {
                *self.seg_refs.entry(e.seg).or_insert(0) += 1;
            }
        }
    }

    /// Calls `f(block, entry)` for every non-hole block in `[from, to)`.
    pub fn for_each_mapped_in(&self, from: u64, to: u64, mut f: impl FnMut(u64, Entry)) {
        let first_chunk = (from / CHUNK_BLOCKS as u64) as usize;
        let end_chunk = (to.div_ceil(CHUNK_BLOCKS as u64) as usize).min(self.chunks);
        let mut c = first_chunk;
        while c < end_chunk {
            let Some(Some(g)) = self.groups.get(c / GROUP_CHUNKS) else {
                c = (c / GROUP_CHUNKS + 1) * GROUP_CHUNKS;
                continue;
            };
            let base = c as u64 * CHUNK_BLOCKS as u64;
            let mut visit = |b: u64, e: Entry| {
                if b >= from && b < to {
                    f(b, e)
                }
            };
            match &g[c % GROUP_CHUNKS] {
                Chunk::Empty => {}
                Chunk::Dense(d) => {
                    for (i, e) in d.iter().enumerate() {
                        if !e.is_hole() {
                            visit(base + i as u64, *e);
                        }
                    }
                }
                Chunk::Sparse(v) => {
                    for s in v {
                        visit(base + s.idx as u64, s.e);
                    }
                }
            }
            c += 1;
        }
    }

    /// Calls `f(block, entry)` for every non-hole block, in block order.
    pub fn for_each_mapped(&self, f: impl FnMut(u64, Entry)) {
        self.for_each_mapped_from(0, f)
    }

    /// Calls `f(block, entry)` for every non-hole block at or after `from`.
    pub fn for_each_mapped_from(&self, from: u64, f: impl FnMut(u64, Entry)) {
        self.for_each_mapped_in(from, u64::MAX, f)
    }

    /// Heap and inline bytes used by the map (for the memory budget).
    pub fn memory_bytes(&self) -> usize {
        let mut n = std::mem::size_of::<BlockMap>() + self.groups.capacity() * std::mem::size_of::<Option<Region>>();
        for g in self.groups.iter().flatten() {
            n += GROUP_CHUNKS * std::mem::size_of::<Chunk>();
            for chunk in g.iter() {
                n += match chunk {
                    Chunk::Empty => 0,
                    Chunk::Dense(_) => std::mem::size_of::<[Entry; CHUNK_BLOCKS]>(),
                    Chunk::Sparse(v) => v.capacity() * std::mem::size_of::<SparseEntry>(),
                };
            }
        }
        n
    }

    /// Fast check: is the whole chunk containing `block` unmapped?
    pub fn chunk_is_empty(&self, block: u64) -> bool {
        matches!(self.chunk((block / CHUNK_BLOCKS as u64) as usize), None | Some(Chunk::Empty))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::BLOCK_BYTES;
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
        m.clone().split_off(100).for_each_mapped(|_, _| dropped += 1);
        assert_eq!(dropped, model[100..].iter().filter(|e| !e.is_hole()).count());
        m.resize(100);
        assert_eq!(m.mapped(), model[..100].iter().filter(|e| !e.is_hole()).count() as u64);
    }

    /// Counts as `set` keeps them, from the entries.
    fn recount(m: &BlockMap) -> (u64, HashMap<u32, u64>) {
        let (mut n, mut refs) = (0, HashMap::new());
        m.for_each_mapped(|_, e| {
            n += 1;
            if e.is_data() {
                *refs.entry(e.seg).or_insert(0u64) += 1;
            }
        });
        (n, refs)
    }

    /// A shrink cuts off exactly the entries past the new end, with their
    /// counts, whether the end falls on a region's edge, inside a region or
    /// inside a chunk, and leaves a copy that shared the regions as it was.
    #[test]
    fn split_off_matches_a_flat_model() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let blocks = 3 * REGION_BLOCKS + REGION_BLOCKS / 2;
        for cut in [0, 1, 63, 64, 100, REGION_BLOCKS, REGION_BLOCKS + 7, 2 * REGION_BLOCKS + 4096, 3 * REGION_BLOCKS, blocks - 1, blocks, blocks + 64] {
            let mut m = BlockMap::new(blocks);
            let mut model = vec![Entry::HOLE; blocks as usize];
            for step in 0..20_000u32 {
                let b = rng.random_range(0..blocks);
                let e = if step % 5 == 0 { Entry::ZERO } else { data(step) };
                m.set(b, e);
                model[b as usize] = e;
            }
            // A snapshot of it, then writes that copy some regions.
            let snap = m.clone();
            let snap_model = model.clone();
            for step in 0..2_000u32 {
                let b = rng.random_range(0..blocks);
                let e = if step % 3 == 0 { Entry::HOLE } else { data(step + 1_000_000) };
                m.set(b, e);
                model[b as usize] = e;
            }
            let tail = m.split_off(cut);
            let end = cut.min(blocks);
            assert_eq!(m.blocks(), if cut >= blocks { blocks } else { cut.div_ceil(CHUNK_BLOCKS as u64) * CHUNK_BLOCKS as u64 }, "cut {cut}");
            for b in 0..blocks {
                let want = model[b as usize];
                let (head, cut_off) = if b < end { (want, Entry::HOLE) } else { (Entry::HOLE, want) };
                assert_eq!(m.get(b), head, "cut {cut}: block {b} of the shrunk map");
                assert_eq!(tail.get(b), cut_off, "cut {cut}: block {b} of what was cut off");
                assert_eq!(snap.get(b), snap_model[b as usize], "cut {cut}: block {b} of the snapshot");
            }
            for (name, map) in [("shrunk map", &m), ("cut off", &tail), ("snapshot", &snap)] {
                let (n, refs) = recount(map);
                assert_eq!(map.mapped(), n, "cut {cut}: {name}'s mapped count");
                assert_eq!(map.seg_ref_counts(), &refs, "cut {cut}: {name}'s segment references");
            }
            // Grown again, the cut-off space reads as holes.
            m.resize(blocks);
            assert!((end..blocks).all(|b| m.get(b).is_hole()), "cut {cut}: grown space is not all holes");
        }
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

        // A thin huge volume costs almost nothing until written.
        let huge = BlockMap::new((64u64 << 40) / BLOCK_BYTES);
        assert!(huge.memory_bytes() < 8 << 20, "empty 64 TiB map: {} bytes", huge.memory_bytes());
    }
}
