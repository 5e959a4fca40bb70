//! The admin API's connections, bounded like every other listener of a
//! site: at most `API_CONNECTIONS_MAX` at once (one more is closed at
//! accept, logged once in a while), and a connection that sends nothing
//! for `API_IDLE_TIMEOUT_MS` while no request of it is being answered is
//! closed (a client that opens connections and sends nothing, or half a
//! header, would otherwise hold a descriptor for good; descriptors are
//! what the log's segment files and NBD clients need too).
//!
//! A request being answered is never cut off, however long it takes (a
//! change on a stalled disk): the middleware marks the connection busy for
//! the length of each request, and the idle clock only runs while it is not.

use std::net::SocketAddr;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Accepts API connections under the cap.
pub struct ApiListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    max: usize,
    idle: Duration,
    trouble: crate::util::LogThrottle,
    at_cap: crate::util::LogThrottle,
    refused: Arc<std::sync::atomic::AtomicU64>,
}

impl ApiListener {
    pub fn new(inner: TcpListener, max: usize, idle: Duration, refused: Arc<std::sync::atomic::AtomicU64>) -> ApiListener {
        let every = Duration::from_secs(10);
        ApiListener { inner, slots: Arc::new(Semaphore::new(max)), max, idle, trouble: crate::util::LogThrottle::new(every), at_cap: crate::util::LogThrottle::new(every), refused }
    }
}

impl axum::serve::Listener for ApiListener {
    type Io = ApiConn;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (ApiConn, SocketAddr) {
        loop {
            let (io, peer) = crate::util::accept(&self.inner, "api", &mut self.trouble).await;
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                self.refused.fetch_add(1, Ordering::Relaxed);
                if let Some(n) = self.at_cap.admit() {
                    tracing::warn!("api: refusing connection from {peer}: {} connections already open{}", self.max, crate::util::unlogged_note(n));
                }
                continue;
            };
            let local = io.local_addr().ok();
            let conn = ApiConn { io, local, busy: Default::default(), idle: self.idle, clock: Box::pin(tokio::time::sleep(self.idle)), _slot: slot };
            return (conn, peer);
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// One API connection: its socket, its slot under the cap, and its idle clock.
pub struct ApiConn {
    io: TcpStream,
    /// The API's side of the connection (whose the client's end is, is
    /// looked up by the pair: `admin`).
    pub local: Option<SocketAddr>,
    /// Requests of this connection being answered (`Busy`).
    pub busy: Arc<AtomicUsize>,
    idle: Duration,
    clock: Pin<Box<tokio::time::Sleep>>,
    _slot: OwnedSemaphorePermit,
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
    fn progress(&mut self) {
        let at = tokio::time::Instant::now() + self.idle;
        self.clock.as_mut().reset(at);
    }
}

impl AsyncRead for ApiConn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                this.progress();
                Poll::Ready(r)
            }
            Poll::Pending => {
                // While a request is answered the clock is not watched; the
                // answer's first write restarts it, and the next read waits
                // on it again.
                if this.busy.load(Ordering::Acquire) == 0 && this.clock.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no request for {} ms", this.idle.as_millis()))));
                }
                Poll::Pending
            }
        }
    }
}

impl AsyncWrite for ApiConn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                this.progress();
            }
        }
        r
    }
    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            if n > 0 {
                this.progress();
            }
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::serve::Listener;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    /// Reads until the peer closes; Err if it is still open after `limit`.
    async fn closed_within(s: &mut tokio::net::TcpStream, limit: Duration) -> Result<(), &'static str> {
        let mut b = [0u8; 64];
        match tokio::time::timeout(limit, async {
            loop {
                match s.read(&mut b).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        {
            Ok(()) => Ok(()),
            Err(_) => Err("still open"),
        }
    }

    #[test]
    fn connections_past_the_cap_are_closed_at_once_and_slots_come_back() {
        rt().block_on(async {
            let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = inner.local_addr().unwrap();
            let refused = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let mut l = ApiListener::new(inner, 2, Duration::from_secs(60), refused.clone());
            let mut clients = Vec::new();
            let mut held = Vec::new();
            for _ in 0..2 {
                clients.push(TcpStream::connect(addr).await.unwrap());
                held.push(l.accept().await.0);
            }
            // The third is accepted and closed; accept goes on waiting.
            let mut third = TcpStream::connect(addr).await.unwrap();
            let waiting = tokio::time::timeout(Duration::from_millis(300), l.accept()).await;
            assert!(waiting.is_err(), "nothing under the cap to hand out");
            closed_within(&mut third, Duration::from_secs(5)).await.unwrap();
            assert_eq!(refused.load(Ordering::Relaxed), 1);
            // A connection that ends gives its slot back.
            held.pop();
            let _fourth = TcpStream::connect(addr).await.unwrap();
            tokio::time::timeout(Duration::from_secs(5), l.accept()).await.expect("a slot came back");
        });
    }

    #[test]
    fn a_silent_connection_is_closed_unless_a_request_of_it_is_being_answered() {
        rt().block_on(async {
            let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = inner.local_addr().unwrap();
            let mut l = ApiListener::new(inner, 8, Duration::from_millis(300), Default::default());
            // Silent: the server's read fails with TimedOut after the idle time.
            let _c = TcpStream::connect(addr).await.unwrap();
            let mut conn = l.accept().await.0;
            let t = std::time::Instant::now();
            let mut b = [0u8; 16];
            let e = conn.read(&mut b).await.unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
            assert!(t.elapsed() >= Duration::from_millis(250), "{:?}", t.elapsed());
            // Bytes keep it open: each read restarts the clock.
            let mut c = TcpStream::connect(addr).await.unwrap();
            let mut conn = l.accept().await.0;
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(150)).await;
                c.write_all(b"x").await.unwrap();
                assert_eq!(conn.read(&mut b).await.unwrap(), 1);
            }
            // Busy (a request being answered): no timeout however long.
            let busy = Busy::new(&conn.busy);
            let r = tokio::time::timeout(Duration::from_millis(900), conn.read(&mut b)).await;
            assert!(r.is_err(), "a busy connection was timed out: {r:?}");
            // The answer is written (the clock restarts), then it idles again.
            conn.write_all(b"answer").await.unwrap();
            drop(busy);
            let e = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut b)).await.unwrap().unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        });
    }
}
