//! DR side of replication: accept TLS connections from configured primary
//! sites, append what they send to this site's own log byte for byte, apply
//! strictly in sequence order, and acknowledge what is durable.
//!
//! A connection is refused (and logged with the reason) unless: the TLS
//! handshake succeeds with a client certificate from this deployment's CA,
//! the certificate names a configured peer site, this site is not itself a
//! primary, the group identity matches, and the epoch is not older than ours.
//! Nothing from a refused connection is applied.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::frame::{self, FrameHeader, Hello, HelloReply};
use super::heartbeat::{Heartbeat, Region};
use crate::group::Group;
use crate::site::Site;

/// What a DR site knows about each group it receives.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DrGroup {
    pub primary: String,
    pub connected: bool,
    pub heartbeat: Heartbeat,
    pub last_error: Option<String>,
    pub received_bytes_total: u64,
}

#[derive(Default)]
pub struct DrState {
    pub groups: Mutex<BTreeMap<String, DrGroup>>,
    regions: Mutex<BTreeMap<String, Arc<Mutex<Region>>>>,
}

impl DrState {
    fn update(&self, group: &str, f: impl FnOnce(&mut DrGroup)) {
        f(self.groups.lock().unwrap().entry(group.to_string()).or_default());
    }

    fn region(&self, g: &Group) -> Result<Arc<Mutex<Region>>> {
        let mut m = self.regions.lock().unwrap();
        if let Some(r) = m.get(&g.name) {
            return Ok(r.clone());
        }
        let r = Arc::new(Mutex::new(Region::open(&g.dir)?));
        let hb = r.lock().unwrap().latest();
        self.update(&g.name, |d| d.heartbeat = hb);
        m.insert(g.name.clone(), r.clone());
        Ok(r)
    }

    /// Loads the heartbeat regions of existing groups (status after restart).
    pub fn load(&self, groups: &[Arc<Group>]) {
        for g in groups {
            if g.dir.join(super::heartbeat::FILE_NAME).exists() {
                let _ = self.region(g);
            }
        }
    }
}

/// What the receiver needs from the site it runs in (the site itself, or a
/// test harness driving the same code over an in-memory link).
pub trait Host: Send + Sync + 'static {
    fn site_name(&self) -> String;
    /// The local group for a HELLO, created if needed; refuses (with the
    /// reason) a primary site, a mismatched group id or a stale epoch.
    fn accept_group(&self, hello: &Hello, epoch: u64) -> Result<Arc<Group>>;
    fn dr(&self) -> &DrState;
}

impl Host for Site {
    fn site_name(&self) -> String {
        self.cfg.name.clone()
    }
    fn accept_group(&self, hello: &Hello, epoch: u64) -> Result<Arc<Group>> {
        if !self.read_only() {
            bail!("site {} is a primary; it does not take replication (split brain guard)", self.cfg.name);
        }
        crate::util::check_name("group", &hello.group).map_err(anyhow::Error::msg)?;
        let g = self.group_for_replication(&hello.group, hello.group_id, &hello.mode)?;
        check_group(&g, hello, epoch)?;
        Ok(g)
    }
    fn dr(&self) -> &DrState {
        &self.dr
    }
}

/// Group identity and epoch checks shared by every host.
pub fn check_group(g: &Group, hello: &Hello, epoch: u64) -> Result<()> {
    if g.id != hello.group_id {
        bail!("group {} here has id {:#x}, the primary's has id {:#x}", g.name, g.id, hello.group_id);
    }
    if epoch < g.epoch() {
        bail!("stale primary: epoch {epoch} is older than this site's epoch {}", g.epoch());
    }
    Ok(())
}

pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, site: Arc<Site>) -> Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let (sock, addr) = listener.accept().await?;
        let acceptor = acceptor.clone();
        let site = site.clone();
        tokio::spawn(async move {
            let _ = sock.set_nodelay(true);
            if let Err(e) = connection(sock, acceptor, site).await {
                // A primary that stops or loses the link just hangs up.
                let hangup = e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof));
                if hangup {
                    tracing::info!("replication: connection from {addr} closed: {e:#}");
                } else {
                    tracing::warn!("replication: connection from {addr} ended: {e:#}");
                }
            }
        });
    }
}

enum Out {
    /// Acknowledge: log durable past `end` means seq `seq` and the first
    /// `frames` RECORDS frames of this connection are durable.
    Ack { end: u64, seq: u64, frames: u64 },
    Error(String),
}

async fn connection(sock: TcpStream, acceptor: tokio_rustls::TlsAcceptor, site: Arc<Site>) -> Result<()> {
    let tls = tokio::time::timeout(Duration::from_secs(10), acceptor.accept(sock))
        .await
        .map_err(|_| anyhow!("refused: TLS handshake timed out"))?
        .map_err(|e| anyhow!("refused: TLS handshake failed: {e}"))?;
    let allowed: Vec<String> = site.cfg.peers.iter().map(|p| p.name.clone()).collect();
    let peer = super::tls::peer_site(tls.get_ref().1.peer_certificates(), &allowed)
        .ok_or_else(|| anyhow!("refused: the client certificate names none of the configured peer sites {allowed:?}"))?;
    let host: Arc<dyn Host> = site;
    receive(tls, host, peer).await
}

/// Runs the receiving side on an authenticated stream from site `peer`.
pub async fn receive<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static>(stream: S, site: Arc<dyn Host>, peer: String) -> Result<()> {
    let (mut rd, mut wr) = tokio::io::split(stream);

    let (h, body) = tokio::time::timeout(Duration::from_secs(10), frame::read_frame(&mut rd))
        .await
        .map_err(|_| anyhow!("refused {peer}: no HELLO within 10 s"))??
        .ok_or_else(|| anyhow!("refused {peer}: closed before HELLO"))?;
    if h.kind != frame::HELLO {
        bail!("refused {peer}: first frame is kind {}, not HELLO", h.kind);
    }
    let hello: Hello = frame::decode_json(&body)?;
    if hello.site != peer {
        bail!("refused {peer}: HELLO claims to be site {:?}, its certificate says {peer:?}", hello.site);
    }
    let group = match site.accept_group(&hello, h.epoch) {
        Ok(g) => g,
        Err(e) => {
            let msg = format!("{e:#}");
            wr.write_all(&frame::encode(frame::ERROR, 0, msg.as_bytes(), false)).await.ok();
            wr.flush().await.ok();
            site.dr().update(&hello.group, |d| d.last_error = Some(msg.clone()));
            bail!("refused {peer} for group {}: {msg}", hello.group);
        }
    };
    let region = site.dr().region(&group)?;
    // This connection supersedes any older one still draining.
    let gen = group.receiver_gen.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
    // Make what we hold durable, then say where to resume.
    let g2 = group.clone();
    tokio::task::spawn_blocking(move || g2.sync_to(g2.flush_target())).await??;
    let last = group.last_seq();
    let reply = HelloReply { site: site.site_name(), group: group.name.clone(), next_seq: last + 1, durable_seq: last };
    let epoch = group.epoch();
    wr.write_all(&frame::encode(frame::HELLO_REPLY, epoch, &serde_json::to_vec(&reply)?, false)).await?;
    wr.flush().await?;
    tracing::info!(event = "primary-connected", "replication: {peer} connected for group {} (resuming at seq {})", group.name, last + 1);
    site.dr().update(&group.name, |d| {
        d.primary = peer.clone();
        d.connected = true;
        d.last_error = None;
    });

    // Acknowledgements go out from one task, each once its records are durable.
    let (tx, mut rx) = mpsc::channel::<Out>(crate::limits::REPL_ACK_QUEUE_MAX);
    let ack_group = group.clone();
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            match m {
                Out::Ack { mut end, mut seq, mut frames } => {
                    // Coalesce: acknowledge the newest batch that is ready.
                    while let Ok(Out::Ack { end: e, seq: s, frames: f }) = rx.try_recv() {
                        end = e;
                        seq = s;
                        frames = f;
                    }
                    ack_group.wait_durable(end).await.map_err(|e| anyhow!("{e}"))?;
                    wr.write_all(&frame::encode(frame::ACK, epoch, &frame::two_u64(seq, frames), false)).await?;
                    wr.flush().await?;
                }
                Out::Error(reason) => {
                    wr.write_all(&frame::encode(frame::ERROR, epoch, reason.as_bytes(), false)).await.ok();
                    wr.flush().await.ok();
                    break;
                }
            }
        }
        anyhow::Ok(())
    });

    let result = receive_loop(&mut rd, &group, &site, &peer, &region, &tx, gen).await;
    if let Err(e) = &result {
        let _ = tx.send(Out::Error(format!("{e:#}"))).await;
        site.dr().update(&group.name, |d| d.last_error = Some(format!("{e:#}")));
    }
    drop(tx);
    let _ = writer.await;
    site.dr().update(&group.name, |d| d.connected = false);
    tracing::info!(event = "primary-disconnected", "replication: {peer} disconnected from group {}", group.name);
    result
}

async fn receive_loop<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    group: &Arc<Group>,
    site: &Arc<dyn Host>,
    peer: &str,
    region: &Arc<Mutex<Region>>,
    tx: &mpsc::Sender<Out>,
    gen: u64,
) -> Result<()> {
    let my_epoch = group.epoch();
    let mut frames = 0u64;
    loop {
        let Some((h, body)) = frame::read_frame(rd).await.context("bad frame")? else {
            return Ok(());
        };
        check_epoch(&h, my_epoch)?;
        match h.kind {
            frame::RECORDS => {
                let wire = h.len as u64;
                let records = frame::split_records(&body)?;
                let g = group.clone();
                // Appends are blocking file writes; keep them off the reactor.
                let owned: Vec<Vec<u8>> = records.iter().map(|r| r.to_vec()).collect();
                let last = tokio::task::spawn_blocking(move || -> Result<Option<u64>> {
                    let mut last = None;
                    for r in &owned {
                        // Duplicates (resent after a reconnect) come back as None.
                        if let Some((end, _)) = g.append_replicated(r, gen).map_err(|e| anyhow!("{e}"))? {
                            last = Some(end);
                        }
                    }
                    Ok(last)
                })
                .await??;
                frames += 1;
                site.dr().update(&group.name, |d| d.received_bytes_total += wire + frame::HEADER_BYTES as u64);
                let end = last.unwrap_or_else(|| group.flush_target());
                if tx.send(Out::Ack { end, seq: group.last_seq(), frames }).await.is_err() {
                    bail!("acknowledgement writer stopped");
                }
            }
            frame::HEARTBEAT => {
                let (seq, sent_ns) = frame::parse_two_u64(&body)?;
                let r = region.clone();
                let epoch = h.epoch;
                let hb = tokio::task::spawn_blocking(move || r.lock().unwrap().store(seq, sent_ns, epoch)).await??;
                site.dr().update(&group.name, |d| d.heartbeat = hb);
            }
            k => bail!("unexpected frame kind {k} from {peer}"),
        }
    }
}

fn check_epoch(h: &FrameHeader, mine: u64) -> Result<()> {
    if h.epoch < mine {
        bail!("stale frame: epoch {} is older than this site's epoch {mine}", h.epoch);
    }
    Ok(())
}
