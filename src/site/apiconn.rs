//! The admin API's connections, bounded like every other listener of a
//! site (ARCHITECTURE.md "Each site has its own admin credentials", last
//! part):
//!
//! * at most `API_CONNECTIONS_MAX` at once. When they are all taken, a new
//!   connection displaces the one that has waited longest without a
//!   request being answered (its socket is shut down); only if every one
//!   is answering a request is the new one closed at accept. So a client
//!   that holds connections open and says nothing cannot keep the
//!   operator's CLI or `up`'s status polls out, and descriptors stay
//!   bounded (the log's segment files and NBD clients need them too);
//! * a connection that has not had an answer written, nor a request being
//!   answered, for `API_IDLE_TIMEOUT_MS` since it was accepted or last
//!   answered is shut down: a whole request must arrive within that time
//!   (half a header sent a byte at a time does not keep it), and an idle
//!   keep-alive ends.
//!
//! A request being answered is never cut off, however long it takes (a
//! change on a stalled disk): the middleware marks the connection busy for
//! the length of each request. (Answers are small JSON bodies, written as
//! soon as the handler returns; a streamed body would need the mark held
//! until its end.)
//!
//! Closing works on the socket, not on hyper's polling of it: a reaper
//! task shuts down (`shutdown(2)`) the socket of a connection to close,
//! under a lock that the connection's drop takes before its descriptor is
//! closed, so a number reused by another file is never touched.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What the listener and its reaper know of one connection.
struct Slot {
    /// Requests of it being answered (`Busy`).
    busy: Arc<AtomicUsize>,
    /// Milliseconds from the listener's epoch to its accept or last answer.
    last: AtomicU64,
    /// Its descriptor, while open (`None` once the connection dropped it).
    /// Shut down only under this lock; the drop closes under it too.
    fd: Mutex<Option<RawFd>>,
}

impl Slot {
    /// Shuts the socket down (its reads see the end, hyper drops the
    /// connection). Nothing if it is already closed.
    fn shut(&self) {
        let fd = self.fd.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fd) = *fd {
            // SAFETY: the descriptor is open (the connection's drop takes
            // this lock and clears it before closing), and shutdown only
            // acts on it; an error (already disconnected) is of no interest.
            unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
        }
    }

    fn idle_since(&self, now_ms: u64) -> Option<u64> {
        (self.busy.load(Ordering::Acquire) == 0).then(|| now_ms.saturating_sub(self.last.load(Ordering::Acquire)))
    }
}

/// Accepts API connections under the cap.
pub struct ApiListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    max: usize,
    live: Arc<Mutex<Vec<Weak<Slot>>>>,
    epoch: Instant,
    trouble: crate::util::LogThrottle,
    at_cap: crate::util::LogThrottle,
    refused: Arc<AtomicU64>,
}

impl ApiListener {
    /// Must be called within a tokio runtime (it starts the reaper).
    pub fn new(inner: TcpListener, max: usize, idle: Duration, refused: Arc<AtomicU64>) -> ApiListener {
        let every = Duration::from_secs(10);
        let live: Arc<Mutex<Vec<Weak<Slot>>>> = Default::default();
        let epoch = Instant::now();
        let reaped = Arc::downgrade(&live);
        tokio::spawn(async move {
            let tick = (idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
            loop {
                tokio::time::sleep(tick).await;
                let Some(live) = reaped.upgrade() else { return };
                let now = epoch.elapsed().as_millis() as u64;
                let mut list = live.lock().unwrap_or_else(|p| p.into_inner());
                list.retain(|w| w.strong_count() > 0);
                for s in list.iter().filter_map(Weak::upgrade) {
                    if s.idle_since(now).is_some_and(|ms| ms >= idle.as_millis() as u64) {
                        s.shut();
                    }
                }
            }
        });
        ApiListener { inner, slots: Arc::new(Semaphore::new(max)), max, live, epoch, trouble: crate::util::LogThrottle::new(every), at_cap: crate::util::LogThrottle::new(every), refused }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A slot, displacing the longest idle connection if all are taken.
    /// None: every connection is answering a request.
    async fn slot(&mut self, peer: SocketAddr) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Some(p);
        }
        let now = self.now_ms();
        let victim = {
            let list = self.live.lock().unwrap_or_else(|p| p.into_inner());
            list.iter().filter_map(Weak::upgrade).filter_map(|s| s.idle_since(now).map(|ms| (ms, s))).max_by_key(|(ms, _)| *ms)
        };
        let why = match victim {
            Some((ms, s)) => {
                s.shut();
                // Its slot comes back once hyper has seen the end and
                // dropped it (at once, unless the machine is very busy).
                match tokio::time::timeout(Duration::from_secs(2), self.slots.clone().acquire_owned()).await {
                    Ok(Ok(p)) => {
                        if let Some(n) = self.at_cap.admit() {
                            tracing::warn!("api: {} connections open: closed one idle for {ms} ms to take one from {peer}{}", self.max, crate::util::unlogged_note(n));
                        }
                        return Some(p);
                    }
                    _ => "no connection gave its slot back in time",
                }
            }
            None => "every one is answering a request",
        };
        self.refused.fetch_add(1, Ordering::Relaxed);
        if let Some(n) = self.at_cap.admit() {
            tracing::warn!("api: refusing connection from {peer}: {} connections already open and {why}{}", self.max, crate::util::unlogged_note(n));
        }
        None
    }
}

impl axum::serve::Listener for ApiListener {
    type Io = ApiConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (ApiConn, SocketAddr) {
        loop {
            let (io, peer) = crate::util::accept(&self.inner, "api", &mut self.trouble).await;
            let Some(permit) = self.slot(peer).await else { continue };
            let local = io.local_addr().ok();
            let slot = Arc::new(Slot { busy: Default::default(), last: AtomicU64::new(self.now_ms()), fd: Mutex::new(Some(io.as_raw_fd())) });
            self.live.lock().unwrap_or_else(|p| p.into_inner()).push(Arc::downgrade(&slot));
            let conn = ApiConn { io: Some(io), local, slot, epoch: self.epoch, _permit: permit };
            return (conn, peer);
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// One API connection: its socket and its slot under the cap.
pub struct ApiConn {
    /// Always Some until dropped (taken in `drop`, under the slot's lock).
    io: Option<TcpStream>,
    /// The API's side of the connection (whose the client's end is, is
    /// looked up by the pair: `admin`).
    pub local: Option<SocketAddr>,
    slot: Arc<Slot>,
    epoch: Instant,
    _permit: OwnedSemaphorePermit,
}

impl Drop for ApiConn {
    fn drop(&mut self) {
        let mut fd = self.slot.fd.lock().unwrap_or_else(|p| p.into_inner());
        *fd = None;
        drop(self.io.take());
    }
}

/// Marks a connection busy while it lives (the middleware holds one for
/// the length of each request).
pub struct Busy(Arc<AtomicUsize>);

impl Busy {
    pub fn new(busy: &Arc<AtomicUsize>) -> Busy {
        busy.fetch_add(1, Ordering::AcqRel);
        Busy(busy.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ApiConn {
    /// Requests of this connection being answered (`Busy`).
    pub fn busy(&self) -> &Arc<AtomicUsize> {
        &self.slot.busy
    }

    fn io(&mut self) -> Pin<&mut TcpStream> {
        Pin::new(self.io.as_mut().expect("an ApiConn has its socket until dropped"))
    }

    /// An answer went out: the idle time counts from now.
    fn answered(&self, r: &Poll<std::io::Result<usize>>) {
        if matches!(r, Poll::Ready(Ok(n)) if *n > 0) {
            self.slot.last.store(self.epoch.elapsed().as_millis() as u64, Ordering::Release);
        }
    }
}

impl AsyncRead for ApiConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        self.io().poll_read(cx, buf)
    }
}

impl AsyncWrite for ApiConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = self.io().poll_write(cx, buf);
        self.answered(&r);
        r
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        let r = self.io().poll_write_vectored(cx, bufs);
        self.answered(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.as_ref().is_some_and(|io| io.is_write_vectored())
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.io().poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.io().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
    }

    /// Serves, through `ApiListener` and axum as the site does, `/slow`
    /// (answered after `slow`, busy meanwhile) and `/fast`.
    async fn serve(max: usize, idle: Duration, slow: Duration) -> (SocketAddr, Arc<AtomicU64>) {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        let refused = Arc::new(AtomicU64::new(0));
        let l = ApiListener::new(inner, max, idle, refused.clone());
        #[derive(Clone)]
        struct C(Arc<AtomicUsize>);
        impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, ApiListener>> for C {
            fn connect_info(s: axum::serve::IncomingStream<'_, ApiListener>) -> C {
                C(s.io().busy().clone())
            }
        }
        let app = axum::Router::new()
            .route(
                "/slow",
                axum::routing::get(move |axum::extract::ConnectInfo(c): axum::extract::ConnectInfo<C>| async move {
                    let _b = Busy::new(&c.0);
                    tokio::time::sleep(slow).await;
                    "slow"
                }),
            )
            .route("/fast", axum::routing::get(|| async { "fast" }));
        tokio::spawn(async move { axum::serve(l, app.into_make_service_with_connect_info::<C>()).await });
        (addr, refused)
    }

    /// Reads until the server closes; how long that took, or None if it
    /// was still open after `limit`.
    async fn closed_within(s: &mut TcpStream, limit: Duration) -> Option<Duration> {
        let t = Instant::now();
        let mut b = [0u8; 256];
        tokio::time::timeout(limit, async {
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .ok()
        .map(|()| t.elapsed())
    }

    async fn get(s: &mut TcpStream, path: &str) -> String {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
        let mut b = vec![0u8; 4096];
        let n = s.read(&mut b).await.unwrap();
        String::from_utf8_lossy(&b[..n]).into_owned()
    }

    #[test]
    fn a_silent_connection_is_closed_and_a_trickling_one_too() {
        rt().block_on(async {
            let (addr, _) = serve(8, Duration::from_millis(400), Duration::ZERO).await;
            let mut silent = TcpStream::connect(addr).await.unwrap();
            let took = closed_within(&mut silent, Duration::from_secs(5)).await.expect("a silent connection stayed open");
            assert!(took >= Duration::from_millis(350), "{took:?}");
            // Half a header a byte at a time does not keep it open.
            let mut trickle = TcpStream::connect(addr).await.unwrap();
            let t = Instant::now();
            for b in b"GET /fast HTTP/1.1\r\n".iter().cycle().take(40) {
                if trickle.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(closed_within(&mut trickle, Duration::from_secs(5)).await.is_some());
            assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        });
    }

    #[test]
    fn a_long_answer_is_not_cut_off_and_the_connection_idles_out_after_it() {
        rt().block_on(async {
            let (addr, _) = serve(8, Duration::from_millis(300), Duration::from_millis(900)).await;
            let mut c = TcpStream::connect(addr).await.unwrap();
            let answer = get(&mut c, "/slow").await;
            assert!(answer.starts_with("HTTP/1.1 200") && answer.ends_with("slow"), "{answer}");
            // Kept alive by hyper, then closed about the idle time after
            // its answer (not never: the deadline passed while it was busy).
            let took = closed_within(&mut c, Duration::from_secs(5)).await.expect("an idle keep-alive stayed open");
            assert!(took >= Duration::from_millis(200), "{took:?}");
        });
    }

    #[test]
    fn when_all_are_taken_the_longest_idle_is_displaced_and_busy_ones_are_kept() {
        rt().block_on(async {
            let (addr, refused) = serve(3, Duration::from_secs(60), Duration::from_millis(1500)).await;
            let mut idle = Vec::new();
            for _ in 0..3 {
                idle.push(TcpStream::connect(addr).await.unwrap());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            // A new client gets in; the oldest idle one is closed.
            let mut c = TcpStream::connect(addr).await.unwrap();
            assert!(get(&mut c, "/fast").await.ends_with("fast"));
            assert!(closed_within(&mut idle[0], Duration::from_secs(2)).await.is_some(), "the longest idle was not displaced");
            assert!(closed_within(&mut idle[2], Duration::from_millis(200)).await.is_none(), "a younger one was closed too");
            assert_eq!(refused.load(Ordering::Relaxed), 0);
            // All three answering requests: a fourth is closed at accept
            // and the three are answered in full.
            drop(idle);
            drop(c);
            tokio::time::sleep(Duration::from_millis(200)).await;
            let mut busy = Vec::new();
            for _ in 0..3 {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
                busy.push(s);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut late = TcpStream::connect(addr).await.unwrap();
            assert!(closed_within(&mut late, Duration::from_secs(1)).await.is_some(), "one past the cap was kept");
            assert_eq!(refused.load(Ordering::Relaxed), 1);
            for s in &mut busy {
                let mut b = vec![0u8; 4096];
                let n = s.read(&mut b).await.unwrap();
                assert!(String::from_utf8_lossy(&b[..n]).ends_with("slow"));
            }
        });
    }
}
