//! DR side of replication, the I/O half: accept TLS connections from
//! configured primary sites and drive a `session::Receiver` (which appends
//! what they send to this site's own log byte for byte, applies strictly in
//! sequence order, and says what to acknowledge once durable).
//!
//! A connection is refused (and logged with the reason) unless: the TLS
//! handshake succeeds with a client certificate from this deployment's CA,
//! the certificate names a configured peer site, this site is not itself a
//! primary, the group identity matches, and the epoch is not older than ours.
//! Nothing from a refused connection is applied.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::frame::{self, FrameHeader, Hello};
use super::heartbeat::{Heartbeat, Region};
use super::session::{RecvAction, Receiver};
use crate::log::segment::LogPos;
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
    pub(super) fn update(&self, group: &str, f: impl FnOnce(&mut DrGroup)) {
        f(self.groups.lock().unwrap().entry(group.to_string()).or_default());
    }

    pub(super) fn region(&self, g: &Group) -> Result<Arc<Mutex<Region>>> {
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

/// Runs the receiving side on an authenticated stream from site `peer`: the
/// `Receiver` core decides (on a blocking thread: it appends to the log),
/// this loop reads frames and sends each acknowledgement once durable.
pub async fn receive<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static>(stream: S, site: Arc<dyn Host>, peer: String) -> Result<()> {
    let (mut rd, mut wr) = tokio::io::split(stream);
    let mut core = Receiver::new(site, peer.clone());

    let (h, body) = tokio::time::timeout(Duration::from_secs(10), frame::read_frame(&mut rd))
        .await
        .map_err(|_| anyhow!("refused {peer}: no HELLO within 10 s"))??
        .ok_or_else(|| anyhow!("refused {peer}: closed before HELLO"))?;
    let (c, r) = step(core, h, body).await?;
    core = c;
    match r {
        Ok(Some(RecvAction::Send(f))) => {
            wr.write_all(&f).await?;
            wr.flush().await?;
        }
        Ok(_) => bail!("refused {peer}: HELLO got no reply"),
        Err(e) => {
            wr.write_all(&core.farewell(&e)).await.ok();
            wr.flush().await.ok();
            return Err(e);
        }
    }
    let group = core.group().cloned().ok_or_else(|| anyhow!("HELLO accepted without a group"))?;

    // Acknowledgements go out from one task, each once its records are durable.
    enum Out {
        Ack { end: LogPos, frame: Vec<u8> },
        Error(Vec<u8>),
    }
    let (tx, mut rx) = mpsc::channel::<Out>(crate::limits::REPL_ACK_QUEUE_MAX);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            match m {
                Out::Ack { mut end, mut frame } => {
                    // Coalesce: acknowledge the newest batch that is ready.
                    while let Ok(Out::Ack { end: e, frame: f }) = rx.try_recv() {
                        end = e;
                        frame = f;
                    }
                    group.wait_durable(end).await.map_err(|e| anyhow!("{e}"))?;
                    wr.write_all(&frame).await?;
                    wr.flush().await?;
                }
                Out::Error(f) => {
                    wr.write_all(&f).await.ok();
                    wr.flush().await.ok();
                    break;
                }
            }
        }
        anyhow::Ok(())
    });

    let mut spare = Vec::new();
    let result = loop {
        let (h, body) = match frame::read_frame_into(&mut rd, std::mem::take(&mut spare)).await {
            Ok(Some(f)) => f,
            Ok(None) => break Ok(()),
            // Undecodable bytes (a frame, or a TLS record) are the peer's
            // fault; an end without TLS close_notify is a primary that
            // stopped or a link that broke, not a bad frame.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => break Err(anyhow::Error::new(e).context("bad frame")),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Err(anyhow::Error::new(e).context("connection ended mid-stream (the primary stopped or the link broke)")),
            Err(e) => break Err(anyhow::Error::new(e).context("connection lost")),
        };
        let (c, r) = match step_keeping(core, h, body).await {
            Ok((c, r, body)) => {
                spare = body;
                (c, r)
            }
            Err(e) => {
                // The core is lost with its thread; still tell the primary.
                let _ = tx.send(Out::Error(frame::encode(frame::ERROR, 0, format!("{e:#}").as_bytes(), false))).await;
                drop(tx);
                let _ = writer.await;
                return Err(e);
            }
        };
        core = c;
        match r {
            Ok(Some(RecvAction::Ack { end, seq, frames })) => {
                let frame = core.ack_frame(seq, frames);
                if tx.send(Out::Ack { end, frame }).await.is_err() {
                    break Err(anyhow!("acknowledgement writer stopped"));
                }
            }
            Ok(Some(RecvAction::Send(f))) => break Err(anyhow!("unexpected reply of {} bytes after HELLO", f.len())),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
    };
    if let Err(e) = &result {
        let _ = tx.send(Out::Error(core.farewell(e))).await;
    }
    drop(tx);
    let _ = writer.await;
    drop(core);
    result
}

/// One frame through the core, on a blocking thread (it appends to the log).
async fn step(core: Receiver, h: FrameHeader, body: Vec<u8>) -> Result<(Receiver, Result<Option<RecvAction>>)> {
    step_keeping(core, h, body).await.map(|(c, r, _)| (c, r))
}

/// `step`, handing the body back for the next frame to be read into.
async fn step_keeping(mut core: Receiver, h: FrameHeader, body: Vec<u8>) -> Result<(Receiver, Result<Option<RecvAction>>, Vec<u8>)> {
    tokio::task::spawn_blocking(move || {
        let r = core.on_frame(&h, &body);
        (core, r, body)
    })
    .await
    .map_err(|e| anyhow!("replication receiver step failed: {e}"))
}
