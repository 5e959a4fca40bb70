//! tidemark: disaster recovery for block storage.
//!
//! Data flows: NBD client → `nbd` (protocol) → `group` (block maps, one
//! write-ordered log per consistency group) → `log` (segments, records).
//! `site` runs one site (NBD server, HTTP API, metrics); `up` supervises a
//! whole local deployment; `cli` is the admin command line.

pub mod crashsafe;
pub mod crc;
pub mod group;
pub mod limits;
pub mod log;
pub mod util;
pub mod volume;
pub mod cli;
pub mod client;
pub mod nbd;
pub mod oracle;
pub mod outlet;
pub mod replicate;
pub mod site;
pub mod sitelog;
pub mod up;
