//! Primary side of replication: one task per (group, DR site). It connects
//! over TLS, learns where the DR site stands (HELLO / HELLO_REPLY), then
//! reads records from the group's log in sequence order and ships them in
//! batches, pipelined within a window of unacknowledged bytes, with a
//! heartbeat every interval. Acknowledgements (durable at the DR site) move
//! the DR's pin in the log, so GC keeps exactly what the DR still needs.
//! On any error it reconnects with backoff and resumes from what the DR
//! site holds; state and lag are published in `GroupReplication`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::decide::{self, Window};
use super::frame::{self, Hello, HelloReply};
use super::Mode;
use crate::group::Group;
use crate::limits;
use crate::log::record::{Header, Kind, FLAG_RELOCATED, HEADER_BYTES};
use crate::log::segment::{pos, pos_off, pos_seg, LogPos, SEGMENT_HEADER_BYTES};

#[derive(Clone, Debug)]
pub struct PeerLink {
    pub name: String,
    pub addr: SocketAddr,
    pub lz4: bool,
}

/// Settings of a sender that come from the site config.
#[derive(Clone, Debug)]
pub struct SendSettings {
    pub site: String,
    pub heartbeat_interval: Duration,
    pub periodic_interval: Duration,
}

pub fn spawn(group: Arc<Group>, peer: PeerLink, tls: Arc<rustls::ClientConfig>, settings: SendSettings) {
    group.replication.add_replica(&peer.name);
    tokio::spawn(async move {
        let mut backoff = Duration::from_millis(100);
        loop {
            let started = Instant::now();
            let r = session(&group, &peer, &tls, &settings).await;
            let msg = match r {
                Ok(()) => "connection closed".to_string(),
                Err(e) => format!("{e:#}"),
            };
            let was_connected = group.replication.replicas().iter().any(|x| x.site == peer.name && x.connected);
            group.replication.update(&peer.name, |r| {
                r.connected = false;
                r.state = "disconnected".into();
                r.last_error = Some(msg.clone());
            });
            if was_connected {
                tracing::warn!(event = "dr-lost", "replication of {} to {}: lost: {msg}", group.name, peer.name);
            } else {
                tracing::debug!("replication of {} to {}: {msg}", group.name, peer.name);
            }
            if started.elapsed() > Duration::from_secs(5) {
                backoff = Duration::from_millis(100);
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(limits::REPL_RECONNECT_BACKOFF_MAX_MS));
        }
    });
}

async fn session(group: &Arc<Group>, peer: &PeerLink, tls: &Arc<rustls::ClientConfig>, st: &SendSettings) -> Result<()> {
    let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(peer.addr))
        .await
        .map_err(|_| anyhow!("connect to {} timed out", peer.addr))?
        .with_context(|| format!("cannot connect to {} at {}", peer.name, peer.addr))?;
    tcp.set_nodelay(true)?;
    let connector = tokio_rustls::TlsConnector::from(tls.clone());
    let name = super::tls::server_name(&peer.name)?;
    let stream = tokio::time::timeout(Duration::from_secs(10), connector.connect(name, tcp))
        .await
        .map_err(|_| anyhow!("TLS handshake with {} timed out", peer.name))?
        .with_context(|| format!("TLS handshake with {} failed", peer.name))?;
    run(group, peer, st, stream).await
}

/// Runs one replication session on an established (authenticated) stream:
/// HELLO, resync if needed, then streaming until an error.
pub async fn run<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static>(group: &Arc<Group>, peer: &PeerLink, st: &SendSettings, stream: S) -> Result<()> {
    let (mut rd, mut wr) = tokio::io::split(stream);

    let epoch = group.epoch();
    let hello = Hello { site: st.site.clone(), group: group.name.clone(), group_id: group.id, epoch, last_seq: group.last_seq(), mode: group.replication.mode().as_str().into() };
    wr.write_all(&frame::encode(frame::HELLO, epoch, &serde_json::to_vec(&hello)?, false)).await?;
    wr.flush().await?;
    let (h, body) = tokio::time::timeout(Duration::from_secs(30), frame::read_frame(&mut rd))
        .await
        .map_err(|_| anyhow!("{} did not answer HELLO", peer.name))??
        .ok_or_else(|| anyhow!("{} closed the connection after HELLO", peer.name))?;
    if h.kind == frame::ERROR {
        bail!("{} refused: {}", peer.name, String::from_utf8_lossy(&body));
    }
    if h.kind != frame::HELLO_REPLY {
        bail!("{} answered HELLO with frame kind {}", peer.name, h.kind);
    }
    let reply: HelloReply = frame::decode_json(&body)?;
    if reply.site != peer.name {
        bail!("peer at {} says it is {:?}, expected {:?}", peer.addr, reply.site, peer.name);
    }
    let mut next = reply.next_seq.max(1);
    let last = group.last_seq();
    let plan = decide::plan_session(reply.next_seq, reply.durable_seq, last, group.locate_seq(next).is_some(), group.in_dirty_mode(&peer.name));
    let resyncing = match plan {
        decide::Start::Refuse(reason) => bail!("{}: {reason}; refusing to replicate", peer.name),
        decide::Start::Resync { full } => {
            if full {
                tracing::warn!("replication of {} to {}: it needs seq {next} but the log starts at seq {}; full resync", group.name, peer.name, group.oldest_seq().unwrap_or(0));
                group.enter_dirty(&peer.name, None)?;
            }
            true
        }
        decide::Start::Stream { pin, .. } => {
            group.set_pin(&peer.name, pin);
            false
        }
    };
    tracing::info!(event = "dr-connected", "replication of {} to {}: connected, {}", group.name, peer.name,
        if resyncing { "resyncing dirty regions".to_string() } else { format!("resuming at seq {next}") });
    group.replication.update(&peer.name, |r| {
        r.connected = true;
        r.acked_seq = reply.durable_seq;
        r.sent_seq = next - 1;
        r.state = if resyncing { "resyncing".into() } else if next > last { "replicating".into() } else { "catching-up".into() };
        r.last_error = None;
    });

    let inflight = Arc::new(Mutex::new(Window::new(reply.durable_seq)));
    let acked_notify = Arc::new(Notify::new());
    // Acknowledgements.
    group.save_pins_async().await;
    let ack_task = {
        let (group, peer, inflight, acked_notify) = (group.clone(), peer.name.clone(), inflight.clone(), acked_notify.clone());
        tokio::spawn(async move {
            let mut saved = Instant::now();
            loop {
                let Some((h, body)) = frame::read_frame(&mut rd).await? else {
                    bail!("{peer} closed the connection");
                };
                match h.kind {
                    frame::ACK => {
                        let (durable, frames) = frame::parse_two_u64(&body)?;
                        let oldest = inflight.lock().unwrap().ack(durable, frames);
                        let resyncing = group.in_dirty_mode(&peer);
                        if !resyncing {
                            group.set_pin(&peer, durable + 1);
                        }
                        if saved.elapsed() > Duration::from_secs(1) {
                            group.save_pins_async().await;
                            saved = Instant::now();
                        }
                        let last = group.last_seq();
                        group.replication.update(&peer, |r| {
                            r.acked_seq = r.acked_seq.max(durable);
                            r.oldest_unacked_ns = oldest;
                            if r.acked_seq >= last && !resyncing {
                                if r.state != "replicating" {
                                    tracing::info!(event = "dr-caught-up", "replication of {} to {peer}: caught up at seq {}", group.name, r.acked_seq);
                                }
                                r.state = "replicating".into();
                            }
                        });
                        if durable >= last && !resyncing {
                            group.replication.clear_degraded();
                        }
                        acked_notify.notify_waiters();
                    }
                    frame::ERROR => bail!("{peer} reported: {}", String::from_utf8_lossy(&body)),
                    k => bail!("{peer} sent unexpected frame kind {k}"),
                }
            }
            #[allow(unreachable_code)]
            anyhow::Ok(())
        })
    };
    let mut frames_sent = 0u64;
    if resyncing {
        match resync(group, peer, reply.next_seq.saturating_sub(1), &mut wr, &inflight, &acked_notify, &ack_task, &mut frames_sent).await {
            Ok(n) => next = n,
            Err(e) => {
                ack_task.abort();
                return Err(e);
            }
        }
    }
    let mut at = match group.locate_seq(next) {
        Some(p) => p,
        None => {
            ack_task.abort();
            group.enter_dirty(&peer.name, None)?;
            bail!("{} needs seq {next}, which the log no longer holds; resyncing", peer.name);
        }
    };
    let result = ship(group, peer, st, &mut wr, &mut at, next, &inflight, &acked_notify, &ack_task, &mut frames_sent).await;
    ack_task.abort();
    result
}

#[allow(clippy::too_many_arguments)]
async fn ship<W: tokio::io::AsyncWrite + Unpin>(
    group: &Arc<Group>,
    peer: &PeerLink,
    st: &SendSettings,
    wr: &mut W,
    at: &mut LogPos,
    mut next: u64,
    inflight: &Arc<Mutex<Window>>,
    acked_notify: &Arc<Notify>,
    ack_task: &tokio::task::JoinHandle<Result<()>>,
    frames_sent: &mut u64,
) -> Result<()> {
    let epoch = group.epoch();
    let mut last_heartbeat = Instant::now() - st.heartbeat_interval;
    let mut last_ship = Instant::now() - st.periodic_interval;
    let mut buf = Vec::new();
    loop {
        if ack_task.is_finished() {
            bail!("acknowledgement stream ended");
        }
        if group.in_dirty_mode(&peer.name) {
            bail!("log cap reached: switching to dirty-region resync");
        }
        if last_heartbeat.elapsed() >= st.heartbeat_interval {
            let hb = frame::encode(frame::HEARTBEAT, epoch, &frame::two_u64(group.last_seq(), crate::util::now_ns()), false);
            wr.write_all(&hb).await?;
            wr.flush().await?;
            group.replication.update(&peer.name, |r| r.sent_bytes_total += hb.len() as u64);
            last_heartbeat = Instant::now();
        }
        let periodic = group.replication.mode() == Mode::Periodic;
        let may_ship = !periodic || last_ship.elapsed() >= st.periodic_interval || group.replication.ship_requested(next);
        let window_full = inflight.lock().unwrap().full(limits::REPL_WINDOW_BYTES);
        let mut shipped = false;
        if may_ship && !window_full {
            let notified = group.appended.notified();
            let (n, first_ts, last_seq, data_bytes) = read_batch(group, at, next, &mut buf)?;
            if n > 0 {
                let f = frame::encode(frame::RECORDS, epoch, &buf, peer.lz4);
                wr.write_all(&f).await?;
                wr.flush().await?;
                *frames_sent += 1;
                next = last_seq + 1;
                inflight.lock().unwrap().sent(last_seq, buf.len() as u64, first_ts);
                let unsent = group.bytes_after(*at);
                group.replication.update(&peer.name, |r| {
                    r.sent_seq = last_seq;
                    r.sent_bytes_total += f.len() as u64;
                    r.data_bytes_total += data_bytes;
                    if r.oldest_unacked_ns == 0 {
                        r.oldest_unacked_ns = first_ts;
                    }
                    r.lag_bytes = inflight.lock().unwrap().bytes + unsent;
                    if r.state == "disconnected" {
                        r.state = "catching-up".into();
                    }
                });
                shipped = true;
            } else {
                if periodic {
                    last_ship = Instant::now();
                }
                let unacked = inflight.lock().unwrap().bytes;
                group.replication.update(&peer.name, |r| r.lag_bytes = unacked);
                // Caught up: wait for new records, an ack, or the heartbeat.
                let wait = st.heartbeat_interval.saturating_sub(last_heartbeat.elapsed());
                tokio::select! {
                    _ = notified => {},
                    _ = tokio::time::sleep(wait.max(Duration::from_millis(1))) => {},
                }
                continue;
            }
        }
        if !shipped {
            // Window full or waiting for the next period.
            let wait = if periodic && !may_ship {
                st.periodic_interval.saturating_sub(last_ship.elapsed())
            } else {
                Duration::from_millis(100)
            };
            let wait = wait.min(st.heartbeat_interval.saturating_sub(last_heartbeat.elapsed())).max(Duration::from_millis(1));
            let acked = acked_notify.notified();
            tokio::select! {
                _ = acked => {},
                _ = tokio::time::sleep(wait) => {},
            }
        }
    }
}

/// Reads records from `at` onwards (up to the log tail) into `buf`, skipping
/// GC relocations and records before `next`, up to `REPL_BATCH_BYTES`.
/// Returns (records, timestamp of the first, seq of the last, payload bytes
/// of writes). Every record is checked (header and block CRCs) before it
/// leaves the site.
fn read_batch(group: &Group, at: &mut LogPos, next: u64, buf: &mut Vec<u8>) -> Result<(usize, u64, u64, u64)> {
    buf.clear();
    let mut n = 0;
    let mut first_ts = 0;
    let mut last_seq = next.saturating_sub(1);
    let mut data = 0u64;
    let mut chunk = Vec::new();
    'outer: while (buf.len() as u64) < limits::REPL_BATCH_BYTES {
        let tail = group.flush_target();
        if *at >= tail {
            break;
        }
        let Some(seg) = group.segment(pos_seg(*at)) else {
            match group.next_segment(pos_seg(*at)) {
                Some(s) => {
                    *at = pos(s.id, SEGMENT_HEADER_BYTES as u32);
                    continue;
                }
                None => bail!("log segment {} vanished while replicating", pos_seg(*at)),
            }
        };
        let end = if seg.id == pos_seg(tail) { pos_off(tail) as u64 } else { seg.len() };
        let off = pos_off(*at) as u64;
        if off >= end {
            if seg.id == pos_seg(tail) {
                break;
            }
            match group.next_segment(seg.id) {
                Some(s) => {
                    *at = pos(s.id, SEGMENT_HEADER_BYTES as u32);
                    continue;
                }
                None => break,
            }
        }
        let want = (end - off).min(limits::REPL_BATCH_BYTES + limits::NBD_REQUEST_BYTES_MAX as u64 + 65536);
        chunk.resize(want as usize, 0);
        seg.read_at(&mut chunk, off)?;
        let mut p = 0usize;
        while p + HEADER_BYTES <= chunk.len() {
            let raw: [u8; HEADER_BYTES] = chunk[p..p + HEADER_BYTES].try_into().unwrap();
            let h = Header::decode(&raw).map_err(|e| anyhow!("log segment {} offset {}: {e}", seg.path.display(), off + p as u64))?;
            let total = h.total_len() as usize;
            if p + total > chunk.len() {
                break; // continue with a fresh read from this record
            }
            let checked = &chunk[p + HEADER_BYTES..p + HEADER_BYTES + h.checked_body_len()];
            h.verify(&raw, checked).map_err(|e| anyhow!("log segment {} offset {}: {e}", seg.path.display(), off + p as u64))?;
            if h.flags & FLAG_RELOCATED == 0 && h.seq >= next {
                if buf.len() + total > limits::REPL_BATCH_BYTES as usize && n > 0 {
                    break 'outer;
                }
                if h.seq != last_seq + 1 {
                    bail!("log gap: expected seq {} at {} offset {}, found {}", last_seq + 1, seg.path.display(), off + p as u64, h.seq);
                }
                if h.kind == Kind::Write {
                    let payload = &chunk[p + HEADER_BYTES + checked.len()..p + total];
                    for (i, b) in payload.chunks(limits::BLOCK_BYTES as usize).enumerate() {
                        if crc32c::crc32c(b) != crate::log::record::crc_at(checked, i) {
                            bail!("checksum mismatch in log segment {} at offset {} (record seq {}, block {i}); not shipping it", seg.path.display(), off + p as u64, h.seq);
                        }
                    }
                    data += h.length as u64;
                }
                if n == 0 {
                    first_ts = h.timestamp_ns;
                }
                buf.extend_from_slice(&chunk[p..p + total]);
                n += 1;
                last_seq = h.seq;
            }
            p += total;
            *at = pos(seg.id, (off + p as u64) as u32);
        }
        if p == 0 {
            bail!("log segment {} offset {off}: record does not fit the read window", seg.path.display());
        }
    }
    Ok((n, first_ts, last_seq, data))
}

/// Dirty-region resync (see `group::resync`): RESYNC_BEGIN, the current
/// content of every dirty block, then RESYNC_COMMIT at the seq where the
/// dirty set was found empty. Returns the seq to stream from afterwards.
#[allow(clippy::too_many_arguments)]
async fn resync<W: tokio::io::AsyncWrite + Unpin>(
    group: &Arc<Group>,
    peer: &PeerLink,
    dr_last: u64,
    wr: &mut W,
    inflight: &Arc<Mutex<Window>>,
    acked_notify: &Arc<Notify>,
    ack_task: &tokio::task::JoinHandle<Result<()>>,
    frames_sent: &mut u64,
) -> Result<u64> {
    use crate::log::record::Kind;
    let epoch = group.epoch();
    let started = Instant::now();
    let total = group.dirty_blocks(&peer.name);
    tracing::info!(event = "dr-resyncing", "replication of {} to {}: resync of {total} dirty blocks", group.name, peer.name);
    // Blocks taken from the dirty set go back into it unless the DR
    // acknowledged the commit, whether this future fails or is dropped.
    struct Taken<'a> {
        group: &'a Group,
        peer: &'a str,
        attempt: u64,
        runs: Vec<crate::group::resync::Run>,
    }
    impl Drop for Taken<'_> {
        fn drop(&mut self) {
            if !self.runs.is_empty() {
                self.group.return_dirty(self.peer, self.attempt);
            }
        }
    }
    let mut sent = Taken { group, peer: &peer.name, attempt: 0, runs: Vec::new() };
    let result: Result<u64> = async {
        let begin = group.resync_control(Kind::ResyncBegin, 0, &[]);
        wr.write_all(&frame::encode(frame::RECORDS, epoch, &begin, peer.lz4)).await?;
        *frames_sent += 1;
        let attempt = group.begin_attempt(&peer.name);
        sent.attempt = attempt;
        let mut buf = Vec::new();
        // What this attempt sent (the DR's staging starts empty at BEGIN).
        let mut index = crate::group::resync::SentIndex::default();
        loop {
            if ack_task.is_finished() {
                bail!("acknowledgement stream ended during resync");
            }
            let runs = group.take_dirty(&peer.name, attempt, limits::RESYNC_BATCH_BLOCKS);
            if runs.is_empty() {
                let Some((seq, table)) = group.resync_point(&peer.name, attempt, dr_last) else {
                    if group.resync_attempt(&peer.name) != Some(attempt) {
                        bail!("resync of {} superseded by a newer attempt", peer.name);
                    }
                    continue;
                };
                let commit = group.resync_control(Kind::ResyncCommit, seq, &table);
                wr.write_all(&frame::encode(frame::RECORDS, epoch, &commit, peer.lz4)).await?;
                wr.flush().await?;
                *frames_sent += 1;
                let want = *frames_sent;
                // Wait until the DR holds the commit durably.
                loop {
                    let notified = acked_notify.notified();
                    if inflight.lock().unwrap().frames_acked >= want {
                        break;
                    }
                    if ack_task.is_finished() {
                        bail!("acknowledgement stream ended before the resync commit was acknowledged");
                    }
                    let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
                }
                return Ok(seq);
            }
            sent.runs.extend_from_slice(&runs);
            buf.clear();
            let g = group.clone();
            let mut idx = std::mem::take(&mut index);
            let (data, b, idx) = tokio::task::spawn_blocking(move || {
                let mut b = Vec::new();
                g.resync_records(&runs, &mut idx, &mut b).map(|d| (d, b, idx))
            })
            .await??;
            index = idx;
            buf = b;
            let f = frame::encode(frame::RECORDS, epoch, &buf, peer.lz4);
            wr.write_all(&f).await?;
            *frames_sent += 1;
            let left = group.dirty_blocks(&peer.name);
            group.replication.update(&peer.name, |r| {
                r.sent_bytes_total += f.len() as u64;
                r.data_bytes_total += data;
                r.lag_bytes = left * limits::BLOCK_BYTES;
                r.state = "resyncing".into();
            });
        }
    }
    .await;
    match result {
        Ok(seq) => {
            sent.runs.clear();
            group.leave_dirty(&peer.name)?;
            tracing::info!(event = "dr-resynced", "replication of {} to {}: resync committed at seq {seq} after {:?}", group.name, peer.name, started.elapsed());
            // The commit's ack came while still in dirty mode: if nothing
            // was written since, the DR is caught up now (no later ack may come).
            let last = group.last_seq();
            group.replication.update(&peer.name, |r| {
                r.acked_seq = r.acked_seq.max(seq);
                r.sent_seq = seq;
                if r.acked_seq >= last {
                    tracing::info!(event = "dr-caught-up", "replication of {} to {}: caught up at seq {}", group.name, peer.name, r.acked_seq);
                    r.state = "replicating".into();
                } else {
                    r.state = "catching-up".into();
                }
            });
            Ok(seq + 1)
        }
        // Whatever was sent may not be committed at the DR: `sent` puts it back.
        Err(e) => Err(e),
    }
}
