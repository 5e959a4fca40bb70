//! A volume: a name, a size and a block map into the group's log.

pub mod map;

use map::BlockMap;

use crate::limits::BLOCK_BYTES;

#[derive(Clone, Debug)]
pub struct Volume {
    pub id: u32,
    pub name: String,
    pub size: u64,
    pub map: BlockMap,
}

impl Volume {
    pub fn new(id: u32, name: String, size: u64) -> Volume {
        Volume { id, name, size, map: BlockMap::new(size.div_ceil(BLOCK_BYTES)) }
    }
}
