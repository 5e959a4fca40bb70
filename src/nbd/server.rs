//! The NBD server's I/O layer: accepts connections, runs the handshake
//! (`proto::handle_option`), then pipelines requests: a reader task parses
//! requests and spawns one task per request; a writer task sends replies as
//! they complete, so replies go out of order.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};

use super::proto::{self, Command, ExportLookup, Handshake, Next};
use crate::group::{Group, IoError, Wait};
use crate::limits;
use crate::site::metrics::{Metrics, OpCounters};

/// A volume (or later a snapshot) as served over NBD.
#[derive(Clone)]
pub struct Export {
    pub name: String,
    pub group: Arc<Group>,
    pub volume: u32,
    pub read_only: bool,
}

/// Where the server finds exports (implemented by the site).
pub trait Exports: Send + Sync + 'static {
    fn export(&self, name: &str) -> Option<Export>;
    fn export_names(&self) -> Vec<String>;
}

struct Lookup<'a>(&'a dyn Exports);

impl ExportLookup for Lookup<'_> {
    fn lookup(&self, name: &str) -> Option<proto::ExportInfo> {
        let e = self.0.export(name)?;
        let size = e.group.volume_size(e.volume)?;
        Some(proto::ExportInfo { name: e.name, size, read_only: e.read_only })
    }
    fn names(&self) -> Vec<String> {
        self.0.export_names()
    }
}

pub async fn serve(listener: TcpListener, exports: Arc<dyn Exports>, metrics: Arc<Metrics>) -> Result<()> {
    let conns = Arc::new(Semaphore::new(limits::NBD_CONNECTIONS_MAX));
    let mut trouble = crate::util::LogThrottle::new(std::time::Duration::from_secs(10));
    let mut at_cap = crate::util::LogThrottle::new(std::time::Duration::from_secs(10));
    loop {
        let (sock, peer) = crate::util::accept(&listener, "nbd", &mut trouble).await;
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            if let Some(n) = at_cap.admit() {
                tracing::warn!("nbd: refusing connection from {peer}: {} connections already open{}", limits::NBD_CONNECTIONS_MAX, crate::util::unlogged_note(n));
            }
            continue;
        };
        let exports = exports.clone();
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _ = sock.set_nodelay(true);
            if let Err(e) = crate::util::set_keepalive(&sock, limits::NBD_KEEPALIVE) {
                tracing::debug!("nbd: {peer}: cannot set TCP keepalive: {e}");
            }
            match connection(sock, peer, exports, metrics).await {
                Ok(()) => tracing::debug!("nbd: {peer} disconnected"),
                // A client hanging up mid-handshake (nbdinfo --size, probes) is routine.
                Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::UnexpectedEof) => {
                    tracing::debug!("nbd: {peer} hung up: {e:#}")
                }
                Err(e) => tracing::info!("nbd: closed connection from {peer}: {e:#}"),
            }
        });
    }
}

async fn connection(sock: TcpStream, peer: std::net::SocketAddr, exports: Arc<dyn Exports>, metrics: Arc<Metrics>) -> Result<()> {
    let (rd, wr) = sock.into_split();
    let mut rd = BufReader::with_capacity(256 * 1024, rd);
    let mut wr = BufWriter::with_capacity(256 * 1024, wr);
    let limit = std::time::Duration::from_millis(limits::NBD_HANDSHAKE_TIMEOUT_MS);
    let chosen = match tokio::time::timeout(limit, handshake(&mut rd, &mut wr, &*exports, peer)).await {
        Ok(r) => r?,
        Err(_) => anyhow::bail!("no export chosen within {} ms of connecting; closed", limits::NBD_HANDSHAKE_TIMEOUT_MS),
    };
    let Some(chosen) = chosen else { return Ok(()) };
    let export = exports.export(&chosen.name).ok_or_else(|| anyhow::anyhow!("export {} vanished", chosen.name))?;
    tracing::debug!("nbd: serving {} (structured={}, block_status={})", chosen.name, chosen.structured, chosen.block_status);
    transmission(rd, wr, export, chosen.structured, chosen.block_status, metrics).await
}

/// Greeting and option haggling: the export chosen, or `None` if the
/// client ended the handshake.
async fn handshake(
    rd: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
    wr: &mut BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    exports: &dyn Exports,
    peer: std::net::SocketAddr,
) -> Result<Option<proto::ExportInfo2>> {

    // Greeting.
    let mut g = Vec::with_capacity(18);
    g.extend_from_slice(&proto::NBDMAGIC.to_be_bytes());
    g.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    g.extend_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
    wr.write_all(&g).await?;
    wr.flush().await?;
    let mut hs = Handshake::default();
    let flags = rd.read_u32().await?;
    proto::check_client_flags(&mut hs, flags).map_err(anyhow::Error::msg)?;

    // Option haggling.
    loop {
        if hs.options_seen >= limits::NBD_OPTIONS_PER_CONNECTION_MAX {
            anyhow::bail!("client sent more than {} options", limits::NBD_OPTIONS_PER_CONNECTION_MAX);
        }
        let magic = rd.read_u64().await?;
        if magic != proto::IHAVEOPT {
            anyhow::bail!("bad option magic {magic:#018x}");
        }
        let option = rd.read_u32().await?;
        let len = rd.read_u32().await?;
        if len > limits::NBD_OPTION_BYTES_MAX {
            if len > limits::NBD_OPTION_DISCARD_BYTES_MAX {
                anyhow::bail!("option {option} announces {len} bytes of data, above the {} byte limit", limits::NBD_OPTION_DISCARD_BYTES_MAX);
            }
            tokio::io::copy(&mut rd.take(len as u64), &mut tokio::io::sink()).await?;
            hs.options_seen += 1;
            let mut out = Vec::new();
            proto::OptReply { option, kind: proto::REP_ERR_TOO_BIG, data: b"option data too large".to_vec() }.encode(&mut out);
            wr.write_all(&out).await?;
            wr.flush().await?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        let (replies, next) = proto::handle_option(&mut hs, &Lookup(exports), option, &data);
        let mut out = Vec::new();
        for r in &replies {
            // A refused option (an unknown export, most often: a client
            // configured with the wrong name) is said, with who asked.
            if r.kind & 0x8000_0000 != 0 {
                tracing::info!("nbd: {peer}: option {option} refused: {}", String::from_utf8_lossy(&r.data));
            }
            r.encode(&mut out);
        }
        if let Next::Transmit(t) = &next {
            if let Some(raw) = &t.export_name_reply {
                out.extend_from_slice(raw);
            }
        }
        wr.write_all(&out).await?;
        wr.flush().await?;
        match next {
            Next::Continue => {}
            Next::Close(reason) => {
                tracing::info!("nbd: {peer}: handshake ended: {reason}");
                return Ok(None);
            }
            Next::Transmit(t) => return Ok(Some(t)),
        }
    }
}

async fn transmission(
    mut rd: BufReader<tokio::net::tcp::OwnedReadHalf>,
    mut wr: BufWriter<tokio::net::tcp::OwnedWriteHalf>,
    export: Export,
    structured: bool,
    block_status: bool,
    metrics: Arc<Metrics>,
) -> Result<()> {
    // A reply keeps its request's in-flight permits until it is written
    // to the socket: a client that does not read its replies holds at most
    // the in-flight budget here (they used to be given back once a reply
    // was queued, and a channel of 32 MiB replies held gigabytes).
    let (tx, mut rx) = mpsc::channel::<(Vec<u8>, Option<Permits>)>(limits::NBD_INFLIGHT_PER_CONNECTION_MAX);
    let writer = tokio::spawn(async move {
        while let Some((buf, permits)) = rx.recv().await {
            wr.write_all(&buf).await?;
            drop((buf, permits));
            // Batch: flush only when no further reply is ready.
            while let Ok((buf, permits)) = rx.try_recv() {
                wr.write_all(&buf).await?;
                drop((buf, permits));
            }
            wr.flush().await?;
        }
        wr.flush().await?;
        anyhow::Ok(())
    });
    let sync_waiters = Arc::new(SyncWaiters::default());
    let inflight = Arc::new(Semaphore::new(limits::NBD_INFLIGHT_PER_CONNECTION_MAX));
    let inflight_bytes = Arc::new(Semaphore::new(limits::NBD_INFLIGHT_BYTES_PER_CONNECTION_MAX));
    let counters = metrics.export_counters(&export.name);
    let export = Arc::new(export);
    let result: Result<()> = async {
        loop {
            let mut hdr = [0u8; 28];
            match rd.read_exact(&mut hdr).await {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    anyhow::bail!("client closed the connection without NBD_CMD_DISC")
                }
                Err(e) => return Err(e.into()),
            }
            let req = proto::parse_request(&hdr).map_err(anyhow::Error::msg)?;
            let started = Instant::now();
            // Deleted under the connection: said as such (it read as an
            // export of 0 bytes: "past the end" for every read, ENOSPC for
            // every write), and the connection ends.
            let Some(size) = export.group.volume_size(export.volume) else {
                let reason = format!("{} was deleted; the export is gone", export.name);
                tx.send((proto::error_reply(structured, proto::ESHUTDOWN, req.handle, &reason), None)).await?;
                anyhow::bail!(reason);
            };
            let checked = proto::validate(&req, size, export.read_only, block_status);
            // A WRITE's payload is on the wire whatever we think of it.
            let mut payload = Vec::new();
            if req.kind == proto::CMD_WRITE {
                if req.length > limits::NBD_REQUEST_BYTES_MAX {
                    anyhow::bail!("write of {} bytes exceeds the {} byte request limit", req.length, limits::NBD_REQUEST_BYTES_MAX);
                }
                // Read into spare capacity: no zeroing of a buffer the
                // payload overwrites anyway (up to 32 MiB per request).
                payload = Vec::with_capacity(req.length as usize);
                let got = (&mut rd).take(req.length as u64).read_to_end(&mut payload).await?;
                if got != req.length as usize {
                    anyhow::bail!("connection closed {got} bytes into a {} byte write payload", req.length);
                }
            }
            let cmd = match checked {
                Ok(c) => c,
                Err((errno, reason)) => {
                    tracing::debug!("nbd {}: request {:#x} refused: {reason}", export.name, req.handle);
                    tx.send((proto::error_reply(structured, errno, req.handle, &reason), None)).await?;
                    continue;
                }
            };
            if cmd == Command::Disconnect {
                return Ok(());
            }
            let permit = inflight.clone().acquire_owned().await?;
            let bytes = (payload.len().max(match cmd {
                Command::Read { len, .. } => len as usize,
                _ => 0,
            }))
            .clamp(1, limits::NBD_INFLIGHT_BYTES_PER_CONNECTION_MAX);
            let bytes_permit = inflight_bytes.clone().acquire_many_owned(bytes as u32).await?;
            let tx = tx.clone();
            let export = export.clone();
            let counters = counters.clone();
            let metrics = metrics.clone();
            let sync_waiters = sync_waiters.clone();
            tokio::spawn(async move {
                let reply = execute(&export, cmd, req.handle, payload, structured, &sync_waiters).await;
                counters.record(cmd);
                metrics.observe_request(started.elapsed());
                let _ = tx.send((reply, Some((permit, bytes_permit)))).await;
            });
        }
    }
    .await;
    // Let in-flight requests finish and their replies go out.
    let _ = inflight.acquire_many(limits::NBD_INFLIGHT_PER_CONNECTION_MAX as u32).await;
    drop(tx);
    let _ = writer.await;
    result
}

/// A request's place in the in-flight limits (count, bytes).
type Permits = (tokio::sync::OwnedSemaphorePermit, tokio::sync::OwnedSemaphorePermit);

fn io_errno(e: &IoError) -> u32 {
    match e {
        IoError::OutOfRange { .. } => proto::EINVAL,
        IoError::VolumeGone(_) => proto::ESHUTDOWN,
        IoError::Failed(_) => proto::EIO,
        // A client such as qemu pauses the guest on ENOSPC (werror=enospc,
        // its default) and resumes it once space is back.
        IoError::NoSpace(_) => proto::ENOSPC,
        IoError::ReadOnly(_) => proto::EPERM,
        // Done again where it may wait (`off_worker`); never a reply.
        IoError::Busy => proto::EIO,
    }
}

async fn execute(export: &Export, cmd: Command, handle: u64, payload: Vec<u8>, structured: bool, sync_waiters: &SyncWaiters) -> Vec<u8> {
    let g = &export.group;
    let v = export.volume;
    let res: Result<Vec<u8>, IoError> = async {
        match cmd {
            Command::Read { offset, len } => {
                let mut out;
                let data_at;
                if structured {
                    if len == 0 {
                        out = Vec::with_capacity(20);
                        proto::chunk_header(&mut out, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, handle, 0);
                        return Ok(out);
                    }
                    out = Vec::with_capacity(28 + len as usize);
                    proto::chunk_header(&mut out, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_OFFSET_DATA, handle, 8 + len);
                    out.extend_from_slice(&offset.to_be_bytes());
                    data_at = 28;
                } else {
                    out = Vec::with_capacity(16 + len as usize);
                    proto::simple_reply(&mut out, 0, handle);
                    data_at = 16;
                }
                out.resize(data_at + len as usize, 0);
                without_waiting(g, out, move |g, wait, out| g.read_as(wait, v, offset, &mut out[data_at..])).await.map(|(out, ())| out)
            }
            Command::Write { offset, fua, .. } => {
                g.replication.check_writable().map_err(IoError::Failed)?;
                let (_, at) = without_waiting(g, payload, move |g, wait, data| g.write_as(wait, v, offset, data)).await?;
                finish_write(g, at, fua, sync_waiters).await?;
                Ok(ok_reply(handle))
            }
            Command::Flush => {
                g.wait_durable(g.flush_target()).await?;
                Ok(ok_reply(handle))
            }
            Command::Trim { offset, len, fua } | Command::WriteZeroes { offset, len, fua, no_hole: false } => {
                g.replication.check_writable().map_err(IoError::Failed)?;
                let (_, at) = without_waiting(g, (), move |g, wait, _| g.zero_as(wait, v, offset, len as u64, false)).await?;
                finish_write(g, at, fua, sync_waiters).await?;
                Ok(ok_reply(handle))
            }
            Command::WriteZeroes { offset, len, fua, no_hole: true } => {
                g.replication.check_writable().map_err(IoError::Failed)?;
                let (_, at) = without_waiting(g, (), move |g, wait, _| g.zero_as(wait, v, offset, len as u64, true)).await?;
                finish_write(g, at, fua, sync_waiters).await?;
                Ok(ok_reply(handle))
            }
            Command::BlockStatus { offset, len, req_one } => {
                let max = if req_one { 1 } else { limits::NBD_BLOCK_STATUS_EXTENTS_MAX };
                let (_, ext) = without_waiting(g, (), move |g, wait, _| g.block_status_as(wait, v, offset, len as u64, max)).await?;
                let mut out = Vec::with_capacity(24 + ext.len() * 8);
                proto::chunk_header(&mut out, proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_BLOCK_STATUS, handle, 4 + 8 * ext.len() as u32);
                out.extend_from_slice(&proto::BASE_ALLOCATION_ID.to_be_bytes());
                for (l, hole, zero) in ext {
                    out.extend_from_slice(&(l as u32).to_be_bytes());
                    let f = if hole { proto::STATE_HOLE } else { 0 } | if zero { proto::STATE_ZERO } else { 0 };
                    out.extend_from_slice(&f.to_be_bytes());
                }
                Ok(out)
            }
            Command::Cache => Ok(ok_reply(handle)),
            Command::Disconnect => Ok(Vec::new()),
        }
    }
    .await;
    match res {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("nbd {}: {cmd:?} failed: {e}", export.name);
            proto::error_reply(structured, io_errno(&e), handle, &e.to_string())
        }
    }
}

/// Runs a group call that could not have the group lock soon on a runtime
/// worker, or would have read from the disk there, again on the blocking
/// pool, where it may wait as long as the lock is held or the disk takes
/// (ARCHITECTURE.md "A stalled disk is reported, not silent"). A hand-off
/// to a pool thread costs tens of microseconds, so only calls that met a
/// lock held for `NBD_LOCK_WAIT_US`, data not in the page cache, a group
/// whose storage is already slow, or (writes, zeroings and trims) every
/// worker but one inside an append (`group::WORKER_APPENDS`), come here.
///
/// At most `NBD_POOL_CALLS_PER_GROUP` calls of one group wait there at a
/// time; the rest wait as tasks. Each call on the pool holds a thread for
/// as long as it waits, and without the cap the requests in flight to one
/// stalled group (up to 128 per connection) would fill the pool (512
/// threads), and the calls of healthy groups that met a busy lock would
/// queue behind them.
async fn off_worker<T: Send + 'static>(g: &Group, f: impl FnOnce() -> Result<T, IoError> + Send + 'static) -> Result<T, IoError> {
    let _slot = g.pool_calls.acquire().await.map_err(|_| IoError::Failed("the group is closing".into()))?;
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(IoError::Failed(format!("request failed on the blocking pool: {e}"))),
    }
}

/// Makes a group call (`call(group, wait, data)`) on this runtime worker
/// with `Wait::Briefly`; if that gives `Busy` (the lock was held, a read
/// would have waited for the disk, the group's storage is slow, or an
/// append would have taken the last worker not inside one), makes it
/// again, whole, on the blocking pool with `Wait::Forever`. A zeroing that gave `Busy` after some of its
/// steps is done again whole, which is harmless (zeroing is idempotent).
/// `data` (a read's reply buffer, a write's payload) goes to the pool with
/// the call and comes back with its result.
async fn without_waiting<D, T, F>(g: &Arc<Group>, mut data: D, call: F) -> Result<(D, T), IoError>
where
    D: Send + 'static,
    T: Send + 'static,
    F: Fn(&Group, Wait, &mut D) -> Result<T, IoError> + Send + 'static,
{
    match call(g, Wait::Briefly, &mut data) {
        Err(IoError::Busy) => {
            let g2 = g.clone();
            off_worker(g, move || call(&g2, Wait::Forever, &mut data).map(|t| (data, t))).await
        }
        r => r.map(|t| (data, t)),
    }
}

/// Completes a write: local durability for FUA, and in sync mode the
/// acknowledgement of every sync DR site.
///
/// In sync mode a write that is the only one of its connection waiting for
/// the DR sites starts the local fdatasync first, so that it overlaps their
/// round trip: the FLUSH (or FUA) that follows then finds the log already
/// durable instead of starting a second, serial fdatasync (`SyncWaiters`).
async fn finish_write(g: &Group, at: crate::group::Appended, fua: bool, sync_waiters: &SyncWaiters) -> Result<(), IoError> {
    let _waiting = g.replication.waits_for_replicas().then(|| sync_waiters.enter(g, at.end));
    if fua {
        g.wait_durable(at.end).await?;
    }
    g.replication.wait_replicated(at.seq).await.map_err(IoError::Failed)
}

/// The sync-mode writes of one NBD connection that are waiting for their
/// DR acknowledgements.
///
/// A write that finds none of its connection's other writes waiting starts
/// the group's local fdatasync at once: its client is latency-bound (a
/// database commit: write, then FLUSH), and the sync overlaps the DR round
/// trip. A write behind others of its connection does not: that client's
/// next FLUSH covers them all, and a sync started for each write kept the
/// sync thread in back-to-back fdatasyncs (about six times as many at queue
/// depth 16; ARCHITECTURE.md "Modes"). Counted per connection, not per
/// group, so that one busy client does not take the overlap from another
/// client's commits in the same group.
#[derive(Default)]
struct SyncWaiters(AtomicUsize);

impl SyncWaiters {
    /// A write ending at `end` starts waiting; the guard ends the wait
    /// however the write ends (reply, error, dropped connection).
    fn enter<'a>(&'a self, g: &Group, end: crate::log::segment::LogPos) -> SyncWaiting<'a> {
        if self.0.fetch_add(1, Ordering::AcqRel) == 0 {
            g.request_durable(end);
        }
        SyncWaiting(&self.0)
    }
}

struct SyncWaiting<'a>(&'a AtomicUsize);

impl Drop for SyncWaiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn ok_reply(handle: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    proto::simple_reply(&mut out, 0, handle);
    out
}

impl OpCounters {
    fn record(&self, cmd: Command) {
        let i = match cmd {
            Command::Read { .. } => 0,
            Command::Write { .. } => 1,
            Command::Flush => 2,
            Command::Trim { .. } => 3,
            Command::WriteZeroes { .. } => 4,
            Command::BlockStatus { .. } => 5,
            Command::Cache => 6,
            Command::Disconnect => return,
        };
        self.ops[i].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_connections_lone_sync_write_starts_the_sync_early() {
        let dir = tempfile::tempdir().unwrap();
        let g = Group::open(dir.path(), "cg0").unwrap();
        let vol = g.create_volume("v", 1 << 20).unwrap();
        let end: Vec<_> = (0..4u64).map(|i| g.write(vol, i * 4096, &vec![i as u8; 4096]).unwrap().end).collect();
        let (one, two) = (SyncWaiters::default(), SyncWaiters::default());
        let first = one.enter(&g, end[0]);
        assert_eq!(g.requested_durable(), end[0], "a lone waiting write asks for the sync");
        {
            let _behind = one.enter(&g, end[1]);
            assert_eq!(g.requested_durable(), end[0], "a write behind another of its connection leaves it to the FLUSH");
            let _other = two.enter(&g, end[2]);
            assert_eq!(g.requested_durable(), end[2], "another connection's lone write still asks");
        }
        drop(first);
        let _again = one.enter(&g, end[3]);
        assert_eq!(g.requested_durable(), end[3], "once its others are done, a lone write asks again");
    }
}
