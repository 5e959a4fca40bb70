//! A volume or snapshot: a name, a size and a block map into the group's log.
//!
//! Snapshots live in the same table as volumes (one id space per group), so
//! that everything that works on a map (writes to a writable snapshot,
//! replication, resync, GC relocation, checkpoints) works on snapshots
//! without a second code path. A snapshot's name is `VOLUME@SNAP`, which is
//! also its NBD export name.

pub mod map;

use map::BlockMap;
use serde::{Deserialize, Serialize};

use crate::limits::BLOCK_BYTES;

/// What makes a map a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapMeta {
    /// The map it was taken from (a volume or another snapshot), by id and
    /// by name as of creation (the parent may be deleted later).
    pub parent: u32,
    pub parent_name: String,
    /// Sequence number and time of the record that created it.
    pub created_seq: u64,
    pub created_ns: u64,
    pub writable: bool,
    /// DR site: the primary deleted it but this site's `protect_snapshots`
    /// refused; it stays until deleted here.
    #[serde(default)]
    pub retained: bool,
}

#[derive(Clone, Debug)]
pub struct Volume {
    pub id: u32,
    pub name: String,
    pub size: u64,
    pub map: BlockMap,
    pub snap: Option<SnapMeta>,
}

impl Volume {
    pub fn new(id: u32, name: String, size: u64) -> Volume {
        Volume { id, name, size, map: BlockMap::new(size.div_ceil(BLOCK_BYTES)), snap: None }
    }

    /// The volume a snapshot name belongs to (`vol0` for `vol0@s1`).
    pub fn root_name(&self) -> &str {
        self.name.split('@').next().unwrap_or(&self.name)
    }

    /// Is block `block` inside the volume (its map and its size)?
    pub fn covers(&self, block: u64) -> bool {
        block < self.map.blocks() && block * BLOCK_BYTES < self.size
    }

    pub fn writable(&self) -> bool {
        self.snap.as_ref().is_none_or(|s| s.writable)
    }
}
