//! NBD: the protocol (`proto`, pure) and the server (`server`, tokio I/O).

pub mod proto;
pub mod server;
