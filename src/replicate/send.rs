//! Primary side of replication, the I/O half: one thread (with its own
//! single-threaded runtime) per (group, DR site). It connects over TLS and
//! drives a `session::Sender` (the decisions: HELLO / HELLO_REPLY, resync,
//! batches pipelined within a window of unacknowledged bytes, heartbeats,
//! pins moved by acknowledgements) with real time, the socket and the log's
//! append notifications. On any error it
//! reconnects with backoff and resumes from what the DR site holds; state
//! and lag are published in `GroupReplication`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::frame;
use super::priority::Priority;
use super::session::{Action, Now, Sender, SenderConfig};
use crate::group::Group;
use crate::limits;

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
    /// Silence that ends a session (`link_timeout_ms`; `Sender::check_link`).
    pub link_timeout: Duration,
    /// Turns true when the site stops: the session closes its link
    /// cleanly (TLS close_notify) and the sender ends.
    pub stop: tokio::sync::watch::Receiver<bool>,
    /// Running sender threads (this one counts until it ends).
    pub running: Arc<std::sync::atomic::AtomicUsize>,
    /// Nice value of this sender's thread while its group is not in sync
    /// mode (`sender_nice`; ARCHITECTURE.md "Replication priority").
    pub nice: i32,
}

/// Starts the sender of `group` to `peer` on a thread of its own, with a
/// single-threaded runtime: its blocking work (reading batches from the log,
/// TLS encryption of megabytes at a time) never holds up the NBD tasks on the
/// site's runtime workers (measured: ARCHITECTURE.md "Replication data
/// path"). It runs for the life of the process.
pub fn spawn(group: Arc<Group>, peer: PeerLink, tls: Arc<rustls::ClientConfig>, settings: SendSettings) -> Result<()> {
    group.replication.add_replica(&peer.name);
    // Counted until the thread ends (or, if it cannot start, at once).
    let guard = crate::util::Counted::enter(&settings.running);
    std::thread::Builder::new()
        .name(format!("send-{}-{}", group.name, peer.name))
        .spawn(move || {
            let _running = guard;
            // Built (and dropped) on this thread: a runtime may not be
            // dropped inside another runtime's `block_on`.
            match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                Ok(rt) => rt.block_on(run_forever(group, peer, tls, settings)),
                Err(e) => {
                    tracing::error!("replication of {} to {}: failed to build a sender runtime: {e}", group.name, peer.name);
                    group.replication.update(&peer.name, |r| r.last_error = Some(format!("failed to build a sender runtime: {e}")));
                }
            }
        })
        .context("failed to start a sender thread")?;
    Ok(())
}

/// Returns once the site stops (never, if nobody can tell it to).
async fn stopping(stop: &mut tokio::sync::watch::Receiver<bool>) {
    if stop.wait_for(|s| *s).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Connects, runs a session until it ends, and reconnects with backoff.
async fn run_forever(group: Arc<Group>, peer: PeerLink, tls: Arc<rustls::ClientConfig>, settings: SendSettings) {
    let mut backoff = Duration::from_millis(100);
    let mut prio = Priority::of_this_thread(settings.nice, "sender");
    let nice = prio.current();
    group.replication.update(&peer.name, |r| r.sender_nice = nice);
    let mut stop = settings.stop.clone();
    // Since when this DR site has been out of reach (from the start, or
    // since the link was lost), and how often that is said: once it has
    // lasted `REPL_UNREACHABLE_WARN_MS`, then once a minute. Before, a DR
    // site never reached was retried in silence (debug lines only).
    let mut unreachable_since = Instant::now();
    let mut unreachable = crate::util::LogThrottle::new(Duration::from_secs(60));
    let lost = crate::util::RepeatLog::new();
    loop {
        if *stop.borrow() {
            return;
        }
        let started = Instant::now();
        // Not raced against `stop`: a session that stands sees it itself
        // and closes cleanly (dropping it here would not); one still
        // connecting is cut short by the process exit.
        let r = session(&group, &peer, &tls, &settings, &mut prio).await;
        if *stop.borrow() {
            group.replication.update(&peer.name, |r| {
                r.connected = false;
                r.state = "disconnected".into();
                r.last_error = Some("this site stopped".into());
            });
            return;
        }
        let msg = match r {
            Ok(()) => "connection closed".to_string(),
            Err(e) => format!("{e:#}"),
        };
        let was_connected = group.replication.replicas().iter().any(|x| x.site == peer.name && x.connected);
        group.replication.update(&peer.name, |r| {
            r.connected = false;
            r.state = "disconnected".into();
            r.last_error = Some(msg.clone());
            if was_connected {
                r.last_lost = Some(msg.clone());
            }
        });
        if was_connected {
            // Lost the same way at every reconnect: said once a minute.
            if let Some(n) = lost.admit(&msg) {
                tracing::warn!(event = "dr-lost", "replication of {} to {}: lost: {msg}{}", group.name, peer.name, crate::util::unlogged_note(n));
            }
            unreachable_since = Instant::now();
        } else if unreachable_since.elapsed() >= Duration::from_millis(limits::REPL_UNREACHABLE_WARN_MS) {
            if let Some(n) = unreachable.admit() {
                tracing::warn!(event = "dr-unreachable", "replication of {} to {}: not connected for {} s, retrying: {msg}{}", group.name, peer.name, unreachable_since.elapsed().as_secs(), crate::util::unlogged_note(n));
            }
        } else {
            tracing::debug!("replication of {} to {}: {msg}", group.name, peer.name);
        }
        if started.elapsed() > Duration::from_secs(5) {
            backoff = Duration::from_millis(100);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopping(&mut stop) => return,
        }
        backoff = (backoff * 2).min(Duration::from_millis(limits::REPL_RECONNECT_BACKOFF_MAX_MS));
    }
}

async fn session(group: &Arc<Group>, peer: &PeerLink, tls: &Arc<rustls::ClientConfig>, st: &SendSettings, prio: &mut Priority) -> Result<()> {
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
    run(group, peer, st, stream, prio).await
}

/// Runs one replication session on an established (authenticated) stream:
/// the `Sender` core decides, this loop does its I/O until an error.
pub async fn run<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static>(group: &Arc<Group>, peer: &PeerLink, st: &SendSettings, stream: S, prio: &mut Priority) -> Result<()> {
    let what = format!("replication of {} to {}", group.name, peer.name);
    let (mut rd, mut wr) = tokio::io::split(stream);
    let origin = Instant::now();
    let now = || Now { mono_ns: origin.elapsed().as_nanos() as u64, wall_ns: crate::util::now_ns() };
    // Until the core's link deadline (monotonic ns), or an hour if none.
    let until = |deadline: Option<u64>| Duration::from_nanos(deadline.map_or(3_600_000_000_000, |d| d.saturating_sub(now().mono_ns)));
    let cfg = SenderConfig { site: st.site.clone(), peer: peer.name.clone(), lz4: peer.lz4, heartbeat_interval: st.heartbeat_interval, periodic_interval: st.periodic_interval, window_bytes: limits::REPL_WINDOW_BYTES, link_timeout: st.link_timeout };
    let mut core = Sender::new(group.clone(), cfg);
    wr.write_all(&core.hello()?).await?;
    wr.flush().await?;
    // The DR makes its log durable before it answers: at least 30 s.
    let hello_wait = st.link_timeout.max(Duration::from_secs(30));
    let (h, body) = tokio::time::timeout(hello_wait, frame::read_frame_of(&mut rd, frame::FROM_DR))
        .await
        .map_err(|_| anyhow!("{} did not answer HELLO within {hello_wait:?}", peer.name))??
        .ok_or_else(|| anyhow!("{} closed the connection after HELLO", peer.name))?;
    core.on_frame(now(), &h, &body).with_context(|| format!("at {}", peer.addr))?;

    // Frames (acks) are read by their own task: a read is not cancel-safe,
    // so it cannot sit in the select below.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Result<(frame::FrameHeader, Vec<u8>)>>(64);
    let name = peer.name.clone();
    let reader = tokio::spawn(async move {
        loop {
            let r = match frame::read_frame_of(&mut rd, frame::FROM_DR).await {
                Ok(Some(f)) => Ok(f),
                Ok(None) => Err(anyhow!("{name} closed the connection")),
                Err(e) => Err(anyhow::Error::new(e).context(format!("reading from {name}"))),
            };
            let end = r.is_err();
            if tx.send(r).await.is_err() || end {
                break;
            }
        }
    });
    struct AbortOnDrop(tokio::task::JoinHandle<()>);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let _reader = AbortOnDrop(reader);

    let mut core = Some(core);
    let mut stop = st.stop.clone();
    loop {
        if *stop.borrow() {
            // Goodbye: close_notify, so the DR site knows this was a stop.
            let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
            return Ok(());
        }
        // `run_forever` published the starting value; changes follow here.
        if prio.follow(group.replication.mode(), &what) {
            let nice = prio.current();
            group.replication.update(&peer.name, |r| r.sender_nice = nice);
        }
        // Frames that arrived meanwhile first (acks open the window).
        loop {
            match rx.try_recv() {
                Ok(f) => {
                    let (h, body) = f?;
                    core.as_mut().unwrap().on_frame(now(), &h, &body)?;
                }
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => bail!("acknowledgement stream ended"),
            }
        }
        // Created before the core looks at the log: an append between its
        // look and our wait still wakes us (a `Notified` receives
        // `notify_waiters` from its creation on, polled or not).
        let appended = group.appended.notified();
        tokio::pin!(appended);
        let action = if core.as_ref().unwrap().blocking_step() {
            // A resync step reads dirty blocks from the log: off the reactor.
            let mut c = core.take().unwrap();
            let t = now();
            // At the sender's priority now, not the one the pool thread
            // inherited when it was made.
            let nice = prio.current();
            let (c, a) = tokio::task::spawn_blocking(move || {
                super::priority::match_this_thread(nice);
                let a = c.poll(t);
                (c, a)
            })
            .await?;
            core = Some(c);
            a?
        } else {
            core.as_mut().unwrap().poll(now())?
        };
        match action {
            Action::Send(f) => {
                // Acks keep coming while a big batch is on its way (sync
                // writers wait for them).
                {
                    let write = async {
                        // The records straight from the log (`Out`): the
                        // TLS layer's copy is the only one.
                        let mut i = 0;
                        while let Some(part) = f.part(i) {
                            wr.write_all(part?).await?;
                            i += 1;
                        }
                        wr.flush().await?;
                        anyhow::Ok(())
                    };
                    tokio::pin!(write);
                    loop {
                        tokio::select! {
                            // A frame that is there counts before the clock.
                            biased;
                            r = &mut write => {
                                r?;
                                break;
                            }
                            f = rx.recv() => {
                                let (h, body) = f.ok_or_else(|| anyhow!("acknowledgement stream ended"))??;
                                core.as_mut().unwrap().on_frame(now(), &h, &body)?;
                            }
                            // A write the DR site never takes (it stopped
                            // reading, or the link dropped its answers and
                            // the window is not full yet) still ends.
                            _ = tokio::time::sleep(until(core.as_ref().unwrap().link_deadline())) => {
                                core.as_ref().unwrap().check_link(now())?;
                            }
                            // A frame half written cannot be closed cleanly.
                            _ = stopping(&mut stop) => return Ok(()),
                        }
                    }
                }
                core.as_mut().unwrap().recycle(f);
            }
            Action::SavePins => group.save_pins_async(prio.current()).await,
            Action::Idle { until, on_append } => {
                let wait = until.map(|u| Duration::from_nanos(u.saturating_sub(now().mono_ns))).unwrap_or(Duration::from_secs(3600));
                tokio::select! {
                    f = rx.recv() => {
                        let (h, body) = f.ok_or_else(|| anyhow!("acknowledgement stream ended"))??;
                        core.as_mut().unwrap().on_frame(now(), &h, &body)?;
                    }
                    _ = &mut appended, if on_append => {}
                    _ = tokio::time::sleep(wait) => {}
                    _ = stopping(&mut stop) => {}
                }
            }
        }
    }
}
