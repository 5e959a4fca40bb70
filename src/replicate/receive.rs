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
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use super::frame::{self, FrameHeader, Hello};
use super::heartbeat::{Heartbeat, Region};
use super::priority::Priority;
use super::session::{RecvAction, Receiver};
use crate::log::segment::LogPos;
use crate::group::iowatch::IoOp;
use crate::group::Group;
use crate::site::metrics::Refused;
use crate::site::Site;

/// What a DR site knows about each group it receives.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DrGroup {
    pub primary: String,
    pub connected: bool,
    pub heartbeat: Heartbeat,
    pub last_error: Option<String>,
    pub received_bytes_total: u64,
    /// The group's mode at the primary (its HELLO, then MODE frames).
    pub mode: String,
    /// Nice value of the thread that takes this group's records in.
    pub receiver_nice: i32,
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
    /// This site's `link_timeout_ms`, told to primaries in HELLO_REPLY so
    /// that they send heartbeats often enough for it.
    fn link_timeout(&self) -> Option<Duration> {
        None
    }
    /// A primary refuses every HELLO (`accept_group`) and keeps no DR
    /// state of the groups they name.
    fn is_primary(&self) -> bool {
        false
    }
    /// Turns true when this site stops: a connection then tells its
    /// primary so and closes with TLS close_notify.
    fn stopping(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        None
    }
}

/// Until `stop` turns true (never, without one).
async fn until_stopped(stop: &mut Option<tokio::sync::watch::Receiver<bool>>) {
    match stop {
        Some(rx) => {
            if rx.wait_for(|s| *s).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

/// Why a connection ended when its site stopped (logged as news, not as
/// a fault).
#[derive(Debug)]
pub struct SiteStopping(pub String);

impl std::fmt::Display for SiteStopping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "site {} is stopping", self.0)
    }
}

impl std::error::Error for SiteStopping {}

impl Host for Site {
    fn site_name(&self) -> String {
        self.cfg.name.clone()
    }
    fn accept_group(&self, hello: &Hello, epoch: u64) -> Result<Arc<Group>> {
        if !self.read_only() {
            bail!("site {} is a primary; it does not take replication (split brain guard)", self.cfg.name);
        }
        crate::util::check_name("group", &hello.group).map_err(anyhow::Error::msg)?;
        // A mode this site does not know (a newer primary's) is taken as
        // sync, as the session does: the group is still created.
        let mode = if super::Mode::parse(&hello.mode).is_ok() { hello.mode.as_str() } else { "sync" };
        let g = self.group_for_replication(&hello.group, hello.group_id, mode)?;
        check_group(&g, hello, epoch)?;
        Ok(g)
    }
    fn is_primary(&self) -> bool {
        !self.read_only()
    }
    fn dr(&self) -> &DrState {
        &self.dr
    }
    fn stopping(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        Some(self.stop_signal())
    }
    fn link_timeout(&self) -> Option<Duration> {
        Some(Duration::from_millis(self.cfg.link_timeout_ms))
    }
}

/// Group identity and epoch checks shared by every host, after the
/// group's storage is seen to answer (`answers_hello`).
pub fn check_group(g: &Group, hello: &Hello, epoch: u64) -> Result<()> {
    answers_hello(g)?;
    has_room(g)?;
    if g.id != hello.group_id {
        bail!("group {} here has id {:#x}, the primary's has id {:#x}", g.name, g.id, hello.group_id);
    }
    if epoch < g.epoch() {
        bail!("stale primary: epoch {epoch} is older than this site's epoch {}", g.epoch());
    }
    Ok(())
}

/// Refuses a HELLO for a group whose last append found its file system
/// full, until the append that failed would fit. Accepting sooner would
/// have the primary resend up to a window of data every couple of
/// seconds, for the append to fail again; the refusal costs a handshake
/// and says why (ARCHITECTURE.md "A full disk is waited out").
pub fn has_room(g: &Group) -> Result<()> {
    // `out_of_space` clears itself once the append that failed would fit.
    // Without the time it has lasted or the space free now (status shows
    // both): the same text at each refusal is logged once a minute.
    let Some((_, error, needed)) = g.out_of_space() else { return Ok(()) };
    bail!("group {} is out of space ({error}); it takes the stream again once {} MiB are free", g.name, needed.div_ceil(1 << 20))
}

/// Refuses a HELLO for a group whose storage does not answer: an append or
/// a log sync in progress for `REPL_HELLO_GROUP_WAIT_MS` or longer (a hung
/// fdatasync: the HELLO's own sync would wait behind it), or a lock not
/// free within that time (an append stuck on a stalled disk holds it).
/// Either would hold this connection's thread for as long as the stall
/// lasts, one more at every reconnect of the primary, which would learn
/// nothing. The refusal says why; the primary shows it and retries
/// (ARCHITECTURE.md "A stalled disk is reported, not silent").
pub fn answers_hello(g: &Group) -> Result<()> {
    let wait = Duration::from_millis(crate::limits::REPL_HELLO_GROUP_WAIT_MS);
    // The two a HELLO waits behind: the lock (held through an append) and
    // the sync (its own `sync_to`). A long checkpoint or pins write is not.
    let pending = || {
        [IoOp::Append, IoOp::Sync].into_iter().filter_map(|op| g.io.pending(op)).filter(|p| p.seconds >= wait.as_secs_f64()).min_by_key(|p| p.since)
    };
    let refuse = |p: crate::group::iowatch::Pending| {
        let what = if p.stalled() { "its storage is stalled" } else { "its storage is slow" };
        anyhow!("group {} does not answer (a {} has been in progress for {:.0} s): {what}; try again later", g.name, p.op.label(), p.seconds)
    };
    if let Some(p) = pending() {
        return Err(refuse(p));
    }
    if !g.answers_within(wait) {
        return Err(match pending() {
            Some(p) => refuse(p),
            None => anyhow!("group {} is busy (its lock was held for more than {} s); try again later", g.name, wait.as_secs_f64()),
        });
    }
    Ok(())
}

/// Accepts replication connections. Each authenticated one runs on a
/// thread of its own, with a single-threaded runtime: the thread's priority
/// follows its group's mode (`receiver_nice` outside sync mode;
/// ARCHITECTURE.md "Replication priority"), and its decryption and appends
/// never hold up the NBD tasks on the site's runtime workers.
///
/// Before authentication a connection is cheap, and bounded so that nobody
/// who can merely reach the port can keep the primaries out
/// (ARCHITECTURE.md "Link security"):
/// - it waits for its first bytes (a TLS ClientHello) as a task on this
///   runtime, without a thread; at most `REPL_PREAUTH_WAITING_MAX` wait (or
///   an eighth of the open-files limit), and a new one displaces the oldest
///   (a primary speaks at once);
/// - then it gets its thread for the handshake; at most
///   `REPL_PREAUTH_HANDSHAKES_MAX` are in one (or a 32nd of the open-files
///   limit), and again the oldest gives way to a new one;
/// - at most `REPL_PREAUTH_PER_SOURCE_MAX` from one source address are in
///   either phase, and all of it within `REPL_HANDSHAKE_TIMEOUT_MS`.
///
/// Threads are counted apart by phase: at most `REPL_RECV_CONNECTIONS_MAX`
/// for authenticated connections, and at most twice the handshakes allowed
/// for handshakes, counting displaced ones until their threads end (at
/// once: their sockets are shut down). So a site serving many links still
/// lets a reconnecting primary displace a stalled handshake; with one cap
/// for both, links plus stalled handshakes could fill it and refuse every
/// new connection. Refusals are logged at most every 10 s per source
/// address and reason.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, site: Arc<Site>) -> Result<()> {
    // Sized to the descriptors this process may open: a waiting
    // connection holds one, one in a handshake about four (its socket, the
    // duplicate to close it by, its runtime's epoll and eventfd).
    let files = crate::util::open_files_limit();
    let waiting_max = crate::limits::REPL_PREAUTH_WAITING_MAX.min((files / 8) as usize).max(1);
    let handshakes_max = crate::limits::REPL_PREAUTH_HANDSHAKES_MAX.min((files / 32) as usize).max(1);
    if waiting_max < crate::limits::REPL_PREAUTH_WAITING_MAX {
        tracing::info!("replication: the open-files limit ({files}) lets {waiting_max} connections wait for their first bytes and {handshakes_max} be in a TLS handshake");
    }
    let ctx = Accepting {
        acceptor: tokio_rustls::TlsAcceptor::from(tls),
        refusals: Refusals::new(site.metrics.clone()),
        live: site.receivers_live.clone(),
        site,
        handshaking: Arc::new(AtomicUsize::new(0)),
        preauth: PreAuth::new(handshakes_max),
    };
    let waiting: Arc<Mutex<Oldest<tokio::task::AbortHandle>>> = Arc::default();
    let mut trouble = crate::util::LogThrottle::new(Duration::from_secs(10));
    loop {
        let (sock, addr) = crate::util::accept(&listener, "replication", &mut trouble).await;
        let Some(slot) = ctx.preauth.take(addr.ip()) else {
            ctx.refusals.note(Refused::SourceLimit, addr, &format!("{} connections from its address are not authenticated yet, the most this site lets wait", crate::limits::REPL_PREAUTH_PER_SOURCE_MAX));
            continue;
        };
        let _ = sock.set_nodelay(true);
        let deadline = Instant::now() + Duration::from_millis(crate::limits::REPL_HANDSHAKE_TIMEOUT_MS);
        let ctx = ctx.clone();
        // Locked across the spawn: the task takes itself off the list under
        // the same lock, so it cannot do that before it is on it.
        let mut w = waiting.lock().unwrap_or_else(|p| p.into_inner());
        if w.len() >= waiting_max {
            if let Some((old, task)) = w.pop_oldest() {
                task.abort();
                ctx.refusals.note(Refused::DisplacedWaiting, old, &format!("displaced by a newer connection: {waiting_max} connections were waiting for their first bytes, the most this site lets wait"));
            }
        }
        let (waiting2, id) = (waiting.clone(), w.next_id());
        let task = tokio::spawn(async move {
            let mut b = [0u8; 1];
            let first = tokio::time::timeout_at(deadline.into(), sock.peek(&mut b)).await;
            if !waiting2.lock().unwrap_or_else(|p| p.into_inner()).remove(id) {
                return; // displaced meanwhile (its abort came too late to stop it)
            }
            match first {
                Err(_) => ctx.refusals.note(Refused::Silent, addr, &format!("sent nothing within {} ms", crate::limits::REPL_HANDSHAKE_TIMEOUT_MS)),
                Ok(Ok(0)) => tracing::debug!("replication: {addr} hung up before a word"),
                Ok(Err(e)) => tracing::debug!("replication: {addr}: {e}"),
                Ok(Ok(_)) => handshake_thread(sock, addr, slot, deadline, ctx),
            }
        });
        w.insert(id, addr, task.abort_handle());
    }
}

/// What the accept loop shares with its connections.
#[derive(Clone)]
struct Accepting {
    acceptor: tokio_rustls::TlsAcceptor,
    site: Arc<Site>,
    /// Threads of authenticated connections.
    live: Arc<AtomicUsize>,
    /// Threads in a TLS handshake, or leaving one (displaced or refused).
    handshaking: Arc<AtomicUsize>,
    preauth: PreAuth,
    refusals: Refusals,
}

/// Unauthenticated connections in arrival order, so that the oldest can
/// give way to a new one.
struct Oldest<T> {
    next: u64,
    items: BTreeMap<u64, (std::net::SocketAddr, T)>,
}

impl<T> Default for Oldest<T> {
    fn default() -> Self {
        Oldest { next: 0, items: BTreeMap::new() }
    }
}

impl<T> Oldest<T> {
    fn next_id(&mut self) -> u64 {
        self.next += 1;
        self.next
    }
    fn insert(&mut self, id: u64, addr: std::net::SocketAddr, t: T) {
        self.items.insert(id, (addr, t));
    }
    /// Was it still there?
    fn remove(&mut self, id: u64) -> bool {
        self.items.remove(&id).is_some()
    }
    fn len(&self) -> usize {
        self.items.len()
    }
    fn pop_oldest(&mut self) -> Option<(std::net::SocketAddr, T)> {
        self.items.pop_first().map(|(_, v)| v)
    }
}

/// A connection that has sent its first bytes gets a thread for the TLS
/// handshake (and, once authenticated, for the whole session).
fn handshake_thread(sock: TcpStream, addr: std::net::SocketAddr, mut slot: PreAuthSlot, deadline: Instant, ctx: Accepting) {
    // Counted until authenticated (or, if it cannot start, at once). Twice
    // the handshakes allowed: a displaced one is counted until its thread
    // sees its socket shut down, which takes it moments.
    let threads_max = 2 * ctx.preauth.handshakes_max;
    let Some(counted) = crate::util::Counted::try_enter(&ctx.handshaking, threads_max) else {
        ctx.refusals.note(Refused::ConnectionLimit, addr, &format!("{threads_max} replication connections are in a TLS handshake or leaving one, the most this site runs"));
        return;
    };
    // Off this runtime's reactor, onto the connection thread's; and a
    // handle to close it by, should a newer one displace it. (Failures here
    // come with a shortage of descriptors: logged like refusals, throttled.)
    let sock = match sock.into_std().and_then(|s| Ok((s.try_clone()?, s))) {
        Ok((dup, s)) => {
            ctx.preauth.handshaking(&mut slot, addr, dup);
            s
        }
        Err(e) => {
            ctx.refusals.note(Refused::Shortage, addr, &format!("dropped before its handshake: {e}"));
            return;
        }
    };
    let ctx_refusals = ctx.refusals.clone();
    let spawned = std::thread::Builder::new().name(format!("recv-{}", addr.port())).spawn(move || {
        let handshaking = counted;
        // Built (and dropped) on this thread: a runtime may not be
        // dropped inside another runtime's `block_on`.
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                ctx.refusals.note(Refused::Shortage, addr, &format!("dropped before its handshake: failed to build its runtime: {e}"));
                return;
            }
        };
        rt.block_on(async move {
            let authenticated = match TcpStream::from_std(sock) {
                Ok(sock) => authenticate(sock, &ctx.acceptor, &ctx.site, deadline).await,
                Err(e) => Err(anyhow!("cannot register the socket: {e}")),
            };
            let displaced = || format!("displaced by a newer connection during its TLS handshake: {} were in one, the most this site lets wait", ctx.preauth.handshakes_max);
            let (tls, peer) = match authenticated {
                Ok(a) => a,
                Err(e) => {
                    let (kind, why) = if slot.displaced() { (Refused::DisplacedHandshake, displaced()) } else { (Refused::Handshake, format!("{e:#}")) };
                    ctx.refusals.note(kind, addr, &why);
                    return;
                }
            };
            // Authenticated: no longer counted against its source address,
            // nor among the handshakes, where a newer one could shut it.
            if !slot.release() {
                ctx.refusals.note(Refused::DisplacedHandshake, addr, &displaced());
                return;
            }
            drop(handshaking);
            let Some(_live) = crate::util::Counted::try_enter(&ctx.live, crate::limits::REPL_RECV_CONNECTIONS_MAX) else {
                ctx.refusals.note(Refused::ConnectionLimit, addr, &format!("{} authenticated replication connections are open, the most this site serves; refused {peer}'s", crate::limits::REPL_RECV_CONNECTIONS_MAX));
                return;
            };
            let site = ctx.site;
            let nice = site.cfg.receiver_nice;
            let link_timeout = Duration::from_millis(site.cfg.link_timeout_ms);
            let host: Arc<dyn Host> = site;
            if let Err(e) = receive(tls, host, peer, Intake::OwnThread { nice }, link_timeout).await {
                // A primary that stops or loses the link just hangs up.
                let hangup = e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::UnexpectedEof));
                if hangup || e.downcast_ref::<SiteStopping>().is_some() {
                    tracing::info!("replication: connection from {addr} closed: {e:#}");
                } else {
                    // The same reason at every reconnect (a group out of
                    // space refuses each) is said once a minute.
                    static ENDED: crate::util::RepeatLog = crate::util::RepeatLog::new();
                    let why = format!("{e:#}");
                    match ENDED.admit(&why) {
                        Some(n) => tracing::warn!("replication: connection from {addr} ended: {why}{}", crate::util::unlogged_note(n)),
                        None => tracing::debug!("replication: connection from {addr} ended: {why}"),
                    }
                }
            }
        });
    });
    if let Err(e) = spawned {
        ctx_refusals.note(Refused::Shortage, addr, &format!("dropped before its handshake: cannot start its thread: {e}"));
    }
}

/// Connections per source address that have not authenticated yet, and
/// those of them in a TLS handshake (oldest first).
#[derive(Clone)]
struct PreAuth {
    state: Arc<Mutex<PreAuthState>>,
    handshakes_max: usize,
}

#[derive(Default)]
struct PreAuthState {
    per_source: std::collections::HashMap<std::net::IpAddr, usize>,
    handshakes: Oldest<(std::net::TcpStream, Arc<AtomicBool>)>,
}

/// One unauthenticated connection's place in `PreAuth`, given back when
/// released (authenticated) or dropped (refused, displaced, or gone).
struct PreAuthSlot {
    preauth: PreAuth,
    ip: std::net::IpAddr,
    /// Its entry among the handshakes, once it is in one.
    handshake: Option<(u64, Arc<AtomicBool>)>,
    released: bool,
}

impl PreAuth {
    fn new(handshakes_max: usize) -> PreAuth {
        PreAuth { state: Arc::default(), handshakes_max }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PreAuthState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, ip: std::net::IpAddr) -> Option<PreAuthSlot> {
        let mut st = self.lock();
        let n = st.per_source.entry(ip).or_default();
        if *n >= crate::limits::REPL_PREAUTH_PER_SOURCE_MAX {
            return None;
        }
        *n += 1;
        Some(PreAuthSlot { preauth: self.clone(), ip, handshake: None, released: false })
    }

    /// Enters `slot`'s connection among the handshakes; if that makes too
    /// many, the oldest is shut down (its handshake then fails at once).
    fn handshaking(&self, slot: &mut PreAuthSlot, addr: std::net::SocketAddr, sock: std::net::TcpStream) {
        let displaced = Arc::new(AtomicBool::new(false));
        let mut st = self.lock();
        if st.handshakes.len() >= self.handshakes_max {
            if let Some((_, (old, flag))) = st.handshakes.pop_oldest() {
                flag.store(true, Ordering::Release);
                let _ = old.shutdown(std::net::Shutdown::Both);
            }
        }
        let id = st.handshakes.next_id();
        st.handshakes.insert(id, addr, (sock, displaced.clone()));
        drop(st);
        slot.handshake = Some((id, displaced));
    }
}

impl PreAuthSlot {
    /// Was its connection shut down to make room for a newer one?
    fn displaced(&self) -> bool {
        self.handshake.as_ref().is_some_and(|(_, d)| d.load(Ordering::Acquire))
    }

    /// Gives the place back for an authenticated connection: false if it
    /// was displaced first (its socket is shut down, the session is over).
    /// Under the lock, so no newer connection can displace it after this.
    fn release(mut self) -> bool {
        let st = self.preauth.lock();
        let displaced = self.displaced();
        self.give_back(st);
        self.released = true;
        !displaced
    }

    fn give_back(&self, mut st: std::sync::MutexGuard<'_, PreAuthState>) {
        if let Some(n) = st.per_source.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                st.per_source.remove(&self.ip);
            }
        }
        if let Some((id, _)) = &self.handshake {
            st.handshakes.remove(*id);
        }
    }
}

impl Drop for PreAuthSlot {
    fn drop(&mut self) {
        if !self.released {
            self.give_back(self.preauth.lock());
        }
    }
}

/// Refused connections, logged at most once per 10 s per source address,
/// kind of refusal and message, each line with how many such went unlogged
/// since the line before, so that a flood does not flood the log too, and
/// distinct errors from one source (a misconfigured primary) still show.
/// Bounded whatever the peers send: past `MESSAGES_MAX` messages from one
/// source, or `SOURCES_MAX` sources with recent lines for one kind, the
/// rest share one throttle. Every refusal is counted in the metrics.
/// One kind's throttles: by source address, then by a hash of the message.
type KindLog = Bounded<std::net::IpAddr, Bounded<u64, crate::util::LogThrottle>>;

#[derive(Clone)]
struct Refusals {
    logs: Arc<Mutex<[KindLog; Refused::ALL.len()]>>,
    metrics: Arc<crate::site::metrics::Metrics>,
}

/// Values by key, at most `max` of them: a new key past that (once the
/// idle ones are forgotten) shares `others`. Bounded whatever keys the
/// peers bring.
struct Bounded<K, V> {
    map: std::collections::HashMap<K, V>,
    others: V,
    max: usize,
    make: fn() -> V,
    idle: fn(&V) -> bool,
}

impl<K: std::hash::Hash + Eq, V> Bounded<K, V> {
    fn new(max: usize, make: fn() -> V, idle: fn(&V) -> bool) -> Self {
        Bounded { map: std::collections::HashMap::new(), others: make(), max, make, idle }
    }

    /// The value for `key`, and whether it is the shared one.
    fn get(&mut self, key: K) -> (&mut V, bool) {
        let (make, idle) = (self.make, self.idle);
        if !self.map.contains_key(&key) && self.map.len() >= self.max {
            self.map.retain(|_, v| !idle(v));
        }
        if self.map.contains_key(&key) || self.map.len() < self.max {
            (self.map.entry(key).or_insert_with(make), false)
        } else {
            (&mut self.others, true)
        }
    }

    fn all_idle(&self) -> bool {
        self.map.values().chain([&self.others]).all(self.idle)
    }
}

impl Refusals {
    const SOURCES_MAX: usize = 256;
    const MESSAGES_MAX: usize = 8;
    const EVERY: Duration = Duration::from_secs(10);

    fn new(metrics: Arc<crate::site::metrics::Metrics>) -> Refusals {
        let messages = || Bounded::new(Self::MESSAGES_MAX, || crate::util::LogThrottle::new(Self::EVERY), crate::util::LogThrottle::idle);
        let logs = std::array::from_fn(|_| Bounded::new(Self::SOURCES_MAX, messages, Bounded::all_idle));
        Refusals { logs: Arc::new(Mutex::new(logs)), metrics }
    }

    /// Counts a refusal (`tidemark_replication_refused_total`) and logs it
    /// unless throttled.
    fn note(&self, kind: Refused, addr: std::net::SocketAddr, why: &str) {
        use std::hash::{Hash, Hasher};
        self.metrics.count_refused(kind);
        let mut h = std::collections::hash_map::DefaultHasher::new();
        why.hash(&mut h);
        let mut logs = self.logs.lock().unwrap_or_else(|p| p.into_inner());
        let (messages, many) = logs[kind as usize].get(addr.ip());
        let (t, shared) = messages.get(h.finish());
        if let Some(n) = t.admit() {
            let from = if many { format!("{addr} (one of more than {} addresses)", Self::SOURCES_MAX) } else { addr.to_string() };
            let also = if shared { " (and other reasons)" } else { "" };
            tracing::warn!("replication: refused a connection from {from}: {why}{}{also}", crate::util::unlogged_note(n));
        }
    }
}

/// The TLS handshake (by `deadline`) and the check that the certificate
/// names a configured peer site: the peer's name, or why it was refused.
async fn authenticate(sock: TcpStream, acceptor: &tokio_rustls::TlsAcceptor, site: &Site, deadline: Instant) -> Result<(tokio_rustls::server::TlsStream<super::readahead::ReadAhead<TcpStream>>, String)> {
    // rustls asks its reader for at most 4 KiB at a time; read-ahead turns
    // that into one `recv` per 256 KiB (and as many fewer window updates),
    // for one copy of the ciphertext within the cache (ARCHITECTURE.md
    // "Replication data path").
    let sock = super::readahead::ReadAhead::new(sock, crate::limits::REPL_READ_AHEAD_START_BYTES, crate::limits::REPL_READ_AHEAD_BYTES);
    let tls = tokio::time::timeout_at(deadline.into(), acceptor.accept(sock))
        .await
        .map_err(|_| anyhow!("refused: TLS handshake timed out"))?
        .map_err(|e| anyhow!("refused: TLS handshake failed: {e}"))?;
    let allowed: Vec<String> = site.cfg.peers.iter().map(|p| p.name.clone()).collect();
    let peer = super::tls::peer_site(tls.get_ref().1.peer_certificates(), &allowed)
        .ok_or_else(|| anyhow!("refused: the client certificate names none of the configured peer sites {allowed:?}"))?;
    Ok((tls, peer))
}

/// Where `receive` runs the core's steps (each appends to the log).
#[derive(Clone, Copy, Debug)]
pub enum Intake {
    /// On the calling thread, which is this connection's alone (`serve`):
    /// its priority follows the group's mode, at nice `nice` (at least)
    /// outside sync mode.
    OwnThread { nice: i32 },
    /// On the runtime's blocking pool (a shared runtime); priorities are
    /// left alone.
    BlockingPool,
}

/// A reader that notes when bytes last arrived, for the silence check.
struct Watched<R> {
    inner: R,
    origin: Instant,
    /// Nanoseconds after `origin` of the last read that returned bytes.
    last: Arc<AtomicU64>,
}

impl<R: AsyncRead + Unpin> AsyncRead for Watched<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.last.store(self.origin.elapsed().as_nanos() as u64, Ordering::Relaxed);
        }
        r
    }
}

/// Runs the receiving side on an authenticated stream from site `peer`: the
/// `Receiver` core decides (where `intake` says: it appends to the log),
/// this loop reads frames and sends each acknowledgement once durable.
/// After HELLO, `link_timeout` without a byte from the primary (which sends
/// a heartbeat every interval) ends the connection: the link is silent.
/// Bytes, not frames: over a slow link one big frame may take longer than
/// that to arrive, and it is still alive.
pub async fn receive<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static>(stream: S, site: Arc<dyn Host>, peer: String, intake: Intake, link_timeout: Duration) -> Result<()> {
    let (rd, mut wr) = tokio::io::split(stream);
    let origin = Instant::now();
    let last_byte = Arc::new(AtomicU64::new(0));
    let mut rd = Watched { inner: rd, origin, last: last_byte.clone() };
    // When the last byte arrived (or this site began to wait for one).
    let heard = || origin + Duration::from_nanos(last_byte.load(Ordering::Relaxed));
    let mut core = Receiver::new(site.clone(), peer.clone());

    let (h, body) = tokio::time::timeout(Duration::from_secs(10), frame::read_frame(&mut rd))
        .await
        .map_err(|_| anyhow!("refused {peer}: no HELLO within 10 s"))??
        .ok_or_else(|| anyhow!("refused {peer}: closed before HELLO"))?;
    let (c, r, _) = step_keeping(core, h, body, intake).await?;
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
    let what = format!("replication of {} from {peer}", group.name);
    let mut prio = match intake {
        Intake::OwnThread { nice } => {
            name_this_thread(&format!("recv-{}-{peer}", group.name));
            Some(Priority::of_this_thread(nice, "receiver"))
        }
        Intake::BlockingPool => None,
    };
    let mut follow = |mode| {
        if let Some(p) = prio.as_mut() {
            p.follow(mode, &what);
            let nice = p.current();
            site.dr().update(&group.name, |d| d.receiver_nice = nice);
        }
    };
    follow(core.mode());
    let writer_group = group.clone();

    // Acknowledgements go out from one task, each once its records are durable.
    enum Out {
        Ack { end: LogPos, frame: Vec<u8> },
        Error(Vec<u8>),
    }
    let (tx, mut rx) = mpsc::channel::<Out>(crate::limits::REPL_ACK_QUEUE_MAX);
    // The newest acknowledgement sent (at first: what this site held at
    // HELLO), repeated as a sign of life while bytes arrive and no frame
    // completes: over a slow link one big frame takes longer than the
    // primary's link_timeout, and its heartbeats queue behind it. (A frame
    // that gets no ack of its own, MODE, also counts as progress: at most
    // one repeat per such frame.)
    let mut last_ack = core.ack_frame(group.last_seq(), 0);
    let progress = last_byte.clone();
    let mut writer = tokio::spawn(async move {
        // Often enough for a primary whose own timeout is far shorter than
        // ours (down to about 400 ms), seldom enough to cost nothing (at
        // most ten 40-byte frames a second, and only while bytes arrive).
        let mut tick = tokio::time::interval((link_timeout / 4).clamp(Duration::from_millis(50), Duration::from_millis(crate::limits::REPL_ACK_REPEAT_MS_MAX)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut seen = progress.load(Ordering::Relaxed);
        let mut wrote = false;
        // The newest acknowledgement queued and not yet waited for (older
        // ones it covers are dropped: acks are cumulative), a farewell
        // queued behind it (sent last), and whether the queue has closed.
        let mut next: Option<(LogPos, Vec<u8>)> = None;
        let mut farewell: Option<Vec<u8>> = None;
        let mut closed = false;
        // A tick: the newest ack again, if bytes came and none went out.
        macro_rules! on_tick {
            () => {{
                let now = progress.load(Ordering::Relaxed);
                if now != seen && !wrote {
                    wr.write_all(&last_ack).await?;
                    wr.flush().await?;
                }
                seen = now;
                wrote = false;
            }};
        }
        // What the reading loop queued.
        macro_rules! on_queued {
            ($m:expr) => {
                match $m {
                    Some(Out::Ack { end, frame }) => next = Some((end, frame)),
                    Some(Out::Error(f)) => farewell = Some(f),
                    None => closed = true,
                }
            };
        }
        loop {
            if let Some((end, frame)) = next.take() {
                // While the batch becomes durable the ticks go on (a log
                // sync slower than the primary's link_timeout, on a busy
                // disk, is not a silent link), and so does the queue (the
                // reading loop does not wait on it, and its newest ack
                // replaces the older ones). A sync that takes longer than
                // our link_timeout ends the link: the disk has stalled, and
                // a new HELLO is refused while it has (`answers_hello`).
                let waited = Instant::now();
                let durable = writer_group.wait_durable(end);
                tokio::pin!(durable);
                let limit = tokio::time::sleep(link_timeout);
                tokio::pin!(limit);
                loop {
                    tokio::select! {
                        // Durability first: a batch that became durable while
                        // this thread was busy past the limit is acknowledged,
                        // not taken for a stall.
                        biased;
                        r = &mut durable => {
                            r.map_err(|e| anyhow!("{e}"))?;
                            break;
                        }
                        _ = &mut limit => {
                            let storage = storage_now(&writer_group, "no storage operation is in progress");
                            let why = format!(
                                "acknowledgements have waited {:.1} s (link_timeout) for the log to become durable ({storage}); closing the link",
                                waited.elapsed().as_secs_f64()
                            );
                            // The primary is told why (the socket is fine; a
                            // primary that reads nothing does not hold this).
                            let f = frame::encode(frame::ERROR, 0, why.as_bytes(), false);
                            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                                wr.write_all(&f).await?;
                                wr.flush().await
                            })
                            .await;
                            return Err(StorageStall(why).into());
                        }
                        _ = tick.tick() => on_tick!(),
                        m = rx.recv(), if !closed && farewell.is_none() => on_queued!(m),
                    }
                }
                wr.write_all(&frame).await?;
                wr.flush().await?;
                last_ack = frame;
                wrote = true;
                continue;
            }
            if let Some(f) = farewell.take() {
                wr.write_all(&f).await.ok();
                wr.flush().await.ok();
                break;
            }
            if closed {
                break;
            }
            tokio::select! {
                m = rx.recv() => on_queued!(m),
                _ = tick.tick() => on_tick!(),
            }
        }
        // TLS close_notify: the primary can tell this end (a stop, or a
        // farewell that said why) from a link that broke. Bounded: a
        // primary that reads nothing does not hold it.
        let _ = tokio::time::timeout(Duration::from_secs(1), wr.shutdown()).await;
        anyhow::Ok(())
    });

    let mut stop = site.stopping();
    let mut spare = Vec::new();
    // Set when acknowledgements could not be queued for `link_timeout`: the
    // writer is stuck, so no farewell is queued and it is not waited for.
    let mut acks_stuck = false;
    // Set once the writer's end has been awaited (it is awaited only once).
    let mut writer_done = false;
    let result = loop {
        // The clock runs while this site waits for the primary, not while
        // it works on what arrived.
        last_byte.store(origin.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let read = frame::read_frame_into(&mut rd, std::mem::take(&mut spare));
        tokio::pin!(read);
        let mut stopped = false;
        let got = loop {
            tokio::select! {
                // Bytes that are there count before the clock does.
                biased;
                // First: a primary that never stops sending must not keep
                // a stopping site from saying goodbye.
                _ = until_stopped(&mut stop) => {
                    stopped = true;
                    break None;
                }
                r = &mut read => break Some(r),
                _ = tokio::time::sleep_until((heard() + link_timeout).into()) => {
                    if heard().elapsed() >= link_timeout {
                        break None;
                    }
                }
            }
        };
        if stopped {
            break Err(SiteStopping(site.site_name()).into());
        }
        let Some(got) = got else {
            break Err(anyhow!(
                "no byte from {peer} for {:.1} s (link_timeout {link_timeout:?}): the link is silent (blackholed, or the primary stalled); closing it",
                heard().elapsed().as_secs_f64()
            ));
        };
        let (h, body) = match got {
            Ok(Some(f)) => f,
            Ok(None) => {
                // The writer gave the link up first (a log sync past
                // link_timeout) and told the primary, which then closed:
                // that is why the session ends, not a primary that stopped.
                if writer.is_finished() {
                    writer_done = true;
                    if let Some(w) = finish_writer(&mut writer, link_timeout).await {
                        if w.downcast_ref::<StorageStall>().is_some() {
                            break Err(w);
                        }
                    }
                }
                // TLS close_notify: the primary stopped, as opposed to a
                // link that broke (an end without it).
                tracing::info!("replication: {peer} closed the connection for group {} (it stopped)", group.name);
                site.dr().update(&group.name, |d| d.last_error = Some(format!("{peer} closed the connection (it stopped)")));
                break Ok(());
            }
            // Undecodable bytes (a frame, or a TLS record) are the peer's
            // fault; an end without TLS close_notify is a primary that
            // stopped or a link that broke, not a bad frame.
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => break Err(anyhow::Error::new(e).context("bad frame")),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => break Err(anyhow::Error::new(e).context("connection ended mid-stream (the primary stopped or the link broke)")),
            Err(e) => break Err(anyhow::Error::new(e).context("connection lost")),
        };
        let (c, r) = match step_keeping(core, h, body, intake).await {
            Ok((c, r, body)) => {
                // Not a buffer a big record grew: one per connection, kept.
                if body.capacity() <= crate::limits::REPL_BUF_KEEP_BYTES {
                    spare = body;
                }
                (c, r)
            }
            Err(e) => {
                // The core is lost with its thread; still tell the primary.
                let _ = tokio::time::timeout(link_timeout, tx.send(Out::Error(frame::encode(frame::ERROR, 0, format!("{e:#}").as_bytes(), false)))).await;
                drop(tx);
                let _ = finish_writer(&mut writer, link_timeout).await;
                return Err(e);
            }
        };
        core = c;
        if h.kind == frame::MODE {
            follow(core.mode());
        }
        match r {
            Ok(Some(RecvAction::Ack { end, seq, frames })) => {
                // The sync thread starts on it now, not when the writer
                // task next runs (on a thread of its own that is after
                // the frames already buffered have been appended).
                group.request_durable(end);
                let frame = core.ack_frame(seq, frames);
                // Bounded: a writer that cannot send (its log sync hung, or
                // a primary that takes nothing) must not hold this loop,
                // and with it this thread, past the link's timeout; the
                // primary has given up on the link by then anyway.
                match tokio::time::timeout(link_timeout, tx.send(Out::Ack { end, frame })).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => {
                        // The writer ended (a log sync past link_timeout, a
                        // socket error): its reason is the session's, in
                        // this site's status and log.
                        writer_done = true;
                        break Err(finish_writer(&mut writer, link_timeout).await.unwrap_or_else(|| anyhow!("acknowledgement writer stopped")));
                    }
                    Err(_) => {
                        acks_stuck = true;
                        let storage = storage_now(&group, "no storage operation is in progress, so the primary takes none");
                        break Err(anyhow!(
                            "{} acknowledgements have waited {:.1} s (link_timeout) to go out ({storage}); closing the link",
                            crate::limits::REPL_ACK_QUEUE_MAX,
                            link_timeout.as_secs_f64()
                        ));
                    }
                }
                if matches!(intake, Intake::OwnThread { .. }) {
                    // Let the writer send what is durable before the next append.
                    tokio::task::yield_now().await;
                }
            }
            Ok(Some(RecvAction::Send(f))) => break Err(anyhow!("unexpected reply of {} bytes after HELLO", f.len())),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
    };
    if let Err(e) = &result {
        if !acks_stuck {
            // Bounded like every send to the writer.
            let _ = tokio::time::timeout(link_timeout, tx.send(Out::Error(core.farewell(e)))).await;
        }
    }
    drop(tx);
    let writer_failed = if acks_stuck {
        writer.abort();
        None
    } else if writer_done {
        None
    } else {
        finish_writer(&mut writer, link_timeout).await
    };
    drop(core);
    // A writer that failed first (a log sync, the socket) is why the
    // session ended, not "writer stopped": say its reason.
    match (result, writer_failed) {
        (Err(e), Some(w)) => Err(e.context(format!("{w:#}"))),
        (r, _) => r,
    }
}

/// What `g`'s storage is doing, for why acknowledgements could not go
/// out: its oldest operation in progress, or `idle`.
fn storage_now(g: &Group, idle: &str) -> String {
    match g.io.oldest() {
        Some(p) => format!("a {} has been in progress for {:.1} s", p.op.label(), p.seconds),
        None => idle.to_string(),
    }
}

/// The acknowledgement writer's end when the log did not become durable
/// within the link timeout: the session's reason even when the primary,
/// told so, closes the link first.
#[derive(Debug)]
struct StorageStall(String);

impl std::fmt::Display for StorageStall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StorageStall {}

/// Waits for the acknowledgement writer to send what it has (the farewell
/// last), but not past `limit`: a link that takes nothing more (full
/// buffers, nobody reading) must not hold the connection open.
/// Returns the writer's own error, if it ended with one.
async fn finish_writer(writer: &mut tokio::task::JoinHandle<Result<()>>, limit: Duration) -> Option<anyhow::Error> {
    match tokio::time::timeout(limit, &mut *writer).await {
        Ok(Ok(Err(e))) => Some(e.context("the acknowledgement writer failed")),
        Ok(_) => None,
        Err(_) => {
            writer.abort();
            None
        }
    }
}

/// One frame through the core, where `intake` says (it appends to the
/// log), handing the body back for the next frame to be read into.
async fn step_keeping(mut core: Receiver, h: FrameHeader, body: Vec<u8>, intake: Intake) -> Result<(Receiver, Result<Option<RecvAction>>, Vec<u8>)> {
    match intake {
        // The thread is this connection's: blocking it holds up nobody else.
        Intake::OwnThread { .. } => {
            let r = core.on_frame(&h, &body);
            Ok((core, r, body))
        }
        Intake::BlockingPool => tokio::task::spawn_blocking(move || {
            let r = core.on_frame(&h, &body);
            (core, r, body)
        })
        .await
        .map_err(|e| anyhow!("replication receiver step failed: {e}")),
    }
}

/// Names the calling thread (as `top -H` and `/proc/*/task/*/comm` show it;
/// Linux keeps the first 15 bytes).
fn name_this_thread(name: &str) {
    let mut b: Vec<u8> = name.bytes().filter(|&c| c != 0).take(15).collect();
    b.push(0);
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes
    // from a pointer that is valid for the call.
    unsafe {
        libc::prctl(libc::PR_SET_NAME, b.as_ptr() as libc::c_ulong, 0, 0, 0);
    }
}
