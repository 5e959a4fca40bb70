//! A fault-injecting TCP proxy for tests: sits between a client and a server
//! on loopback and can cut connections, add latency, silently drop one
//! direction, or cap bandwidth. Every setting applies at once, also to
//! connections that are already open. Plain std::net and threads, so it does
//! not depend on any async runtime.
//!
//! Each connection has two directions; each direction is a reader thread
//! (short read timeouts, so cut and drop are prompt) feeding a timestamped
//! queue (the delay line) and a writer thread that releases each chunk once
//! its delay has passed, through a per-direction token bucket shared by all
//! connections of the proxy.
#![allow(dead_code)]

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often blocked threads look at the stop flag and the settings.
const TICK: Duration = Duration::from_millis(50);
/// Largest chunk read at once.
const CHUNK: usize = 64 * 1024;
/// Bytes a direction may hold in its delay line before the reader stops
/// reading (and TCP flow control pushes back on the sender).
const MAX_QUEUED: usize = 16 << 20;
/// Largest piece written under a bandwidth cap at once.
const MAX_PIECE: usize = 16 * 1024;
const UNLIMITED: u64 = u64::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    /// Client to server.
    Up,
    /// Server to client.
    Down,
}

impl Dir {
    fn idx(self) -> usize {
        match self {
            Dir::Up => 0,
            Dir::Down => 1,
        }
    }
}

struct Bucket {
    rate: u64,
    tokens: f64,
    last: Instant,
}

struct Conns {
    cut: bool,
    next_id: u64,
    /// (id, client socket, server socket) of every open connection.
    list: Vec<(u64, TcpStream, TcpStream)>,
}

struct Shared {
    target: SocketAddr,
    stop: AtomicBool,
    delay_ns: AtomicU64,
    blackhole: [AtomicBool; 2],
    bandwidth: AtomicU64,
    buckets: [Mutex<Bucket>; 2],
    bytes: [AtomicU64; 2],
    open: AtomicUsize,
    conns: Mutex<Conns>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_ns.load(Ordering::Relaxed))
    }

    fn blackholed(&self, dir: Dir) -> bool {
        self.blackhole[dir.idx()].load(Ordering::Relaxed)
    }

    /// Waits until the bandwidth cap allows writing some bytes in `dir`, and
    /// returns how many (at most `want`, at least 1). None if stopping.
    fn take_tokens(&self, dir: Dir, want: usize) -> Option<usize> {
        loop {
            if self.stopped() {
                return None;
            }
            let rate = self.bandwidth.load(Ordering::Relaxed);
            if rate == UNLIMITED {
                return Some(want);
            }
            let cap = (rate as f64 / 20.0).max(1.0); // 50 ms of burst
            let piece = want.min(cap as usize).clamp(1, MAX_PIECE);
            let mut b = lock(&self.buckets[dir.idx()]);
            let now = Instant::now();
            if b.rate != rate {
                b.rate = rate;
                b.tokens = 0.0;
                b.last = now;
            }
            b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate as f64).min(cap);
            b.last = now;
            if b.tokens >= piece as f64 {
                b.tokens -= piece as f64;
                return Some(piece);
            }
            let wait = if rate == 0 {
                TICK
            } else {
                Duration::from_secs_f64((piece as f64 - b.tokens) / rate as f64).clamp(Duration::from_millis(1), TICK)
            };
            drop(b);
            std::thread::sleep(wait);
        }
    }

    fn spawn(self: &Arc<Self>, f: impl FnOnce() + Send + 'static) {
        let h = std::thread::spawn(f);
        let mut t = lock(&self.threads);
        t.retain(|h| !h.is_finished());
        t.push(h);
    }
}

/// Held by the four threads of a connection; the last one out unregisters it.
struct ConnGuard {
    sh: Arc<Shared>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut c = lock(&self.sh.conns);
        if let Some(i) = c.list.iter().position(|e| e.0 == self.id) {
            c.list.swap_remove(i);
        }
        self.sh.open.fetch_sub(1, Ordering::SeqCst);
    }
}

enum Msg {
    Data(Instant, Vec<u8>),
    /// The source closed its sending side: pass the half-close on.
    Eof,
    /// The source failed (or we are stopping): tear the connection down.
    Abort,
}

pub struct Proxy {
    sh: Arc<Shared>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    /// Listens on 127.0.0.1 on a free port and forwards each accepted
    /// connection to `target`.
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = loop {
            if let Ok(l) = TcpListener::bind(("127.0.0.1", super::free_port())) {
                break l;
            }
        };
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let now = Instant::now();
        let bucket = || Mutex::new(Bucket { rate: UNLIMITED, tokens: 0.0, last: now });
        let sh = Arc::new(Shared {
            target,
            stop: AtomicBool::new(false),
            delay_ns: AtomicU64::new(0),
            blackhole: [AtomicBool::new(false), AtomicBool::new(false)],
            bandwidth: AtomicU64::new(UNLIMITED),
            buckets: [bucket(), bucket()],
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            open: AtomicUsize::new(0),
            conns: Mutex::new(Conns { cut: false, next_id: 0, list: Vec::new() }),
            threads: Mutex::new(Vec::new()),
        });
        let sh2 = sh.clone();
        let acceptor = std::thread::spawn(move || accept_loop(sh2, listener));
        Proxy { sh, addr, acceptor: Some(acceptor) }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every open connection (both sides, abruptly) and, until
    /// `restore()`, accepts and immediately closes new ones.
    pub fn cut(&self) {
        let mut c = lock(&self.sh.conns);
        c.cut = true;
        for (_, a, b) in &c.list {
            let _ = a.shutdown(Shutdown::Both);
            let _ = b.shutdown(Shutdown::Both);
        }
    }

    pub fn restore(&self) {
        lock(&self.sh.conns).cut = false;
    }

    /// Added latency per chunk forwarded, in both directions (zero = none).
    /// A delay line: throughput is not limited to one chunk per delay.
    pub fn set_delay(&self, d: Duration) {
        self.sh.delay_ns.store(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// Silently drops all bytes in one direction (the connection stays open)
    /// until `clear_blackhole()`.
    pub fn blackhole(&self, dir: Dir) {
        self.sh.blackhole[dir.idx()].store(true, Ordering::Relaxed);
    }

    pub fn clear_blackhole(&self) {
        for b in &self.sh.blackhole {
            b.store(false, Ordering::Relaxed);
        }
    }

    /// Caps throughput per direction (over all connections) in bytes per
    /// second; None = unlimited.
    pub fn set_bandwidth(&self, bytes_per_sec: Option<u64>) {
        let v = match bytes_per_sec {
            Some(r) => r.min(UNLIMITED - 1),
            None => UNLIMITED,
        };
        self.sh.bandwidth.store(v, Ordering::Relaxed);
    }

    /// Bytes forwarded so far (up, down). Counted as they are handed to the
    /// socket, so a peer that has received N bytes sees them counted.
    pub fn bytes(&self) -> (u64, u64) {
        (self.sh.bytes[0].load(Ordering::SeqCst), self.sh.bytes[1].load(Ordering::SeqCst))
    }

    /// Number of connections currently open.
    pub fn open_connections(&self) -> usize {
        self.sh.open.load(Ordering::SeqCst)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.sh.stop.store(true, Ordering::SeqCst);
        {
            let c = lock(&self.sh.conns);
            for (_, a, b) in &c.list {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            }
        }
        if let Some(h) = self.acceptor.take() {
            let _ = h.join();
        }
        let threads = std::mem::take(&mut *lock(&self.sh.threads));
        for h in threads {
            let _ = h.join();
        }
    }
}

fn accept_loop(sh: Arc<Shared>, listener: TcpListener) {
    while !sh.stopped() {
        match listener.accept() {
            Ok((client, _)) => handle(&sh, client),
            Err(_) => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn handle(sh: &Arc<Shared>, client: TcpStream) {
    if lock(&sh.conns).cut {
        let _ = client.shutdown(Shutdown::Both);
        return;
    }
    let server = match TcpStream::connect_timeout(&sh.target, Duration::from_millis(500)) {
        Ok(s) => s,
        Err(_) => {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
    };
    let close = || {
        let _ = client.shutdown(Shutdown::Both);
        let _ = server.shutdown(Shutdown::Both);
    };
    // Registry copies, writer destinations, and (per writer) copies of both
    // sockets so that a failure in either direction tears down the whole
    // connection.
    let setup = || -> std::io::Result<_> {
        client.set_nonblocking(false)?;
        for s in [&client, &server] {
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(TICK))?;
            s.set_write_timeout(Some(TICK))?;
        }
        let both = || -> std::io::Result<[TcpStream; 2]> { Ok([client.try_clone()?, server.try_clone()?]) };
        Ok((both()?, server.try_clone()?, client.try_clone()?, both()?, both()?))
    };
    let Ok(([c_reg, s_reg], up_dst, down_dst, up_abort, down_abort)) = setup() else {
        return close();
    };
    let id = {
        let mut c = lock(&sh.conns);
        if c.cut || sh.stopped() {
            drop(c);
            return close();
        }
        let id = c.next_id;
        c.next_id += 1;
        c.list.push((id, c_reg, s_reg));
        sh.open.fetch_add(1, Ordering::SeqCst);
        id
    };
    let guard = Arc::new(ConnGuard { sh: sh.clone(), id });
    for (dir, src, dst, abort) in [(Dir::Up, client, up_dst, up_abort), (Dir::Down, server, down_dst, down_abort)] {
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let (sh1, q1, g1) = (sh.clone(), queued.clone(), guard.clone());
        sh.spawn(move || reader(sh1, dir, src, tx, q1, g1));
        let (sh2, g2) = (sh.clone(), guard.clone());
        sh.spawn(move || writer(sh2, dir, rx, dst, abort, queued, g2));
    }
}

fn reader(sh: Arc<Shared>, dir: Dir, mut src: TcpStream, tx: Sender<Msg>, queued: Arc<AtomicUsize>, _g: Arc<ConnGuard>) {
    let mut buf = vec![0u8; CHUNK];
    loop {
        if sh.stopped() {
            let _ = tx.send(Msg::Abort);
            return;
        }
        if queued.load(Ordering::Relaxed) >= MAX_QUEUED {
            std::thread::sleep(Duration::from_millis(2));
            continue;
        }
        match src.read(&mut buf) {
            Ok(0) => {
                let _ = tx.send(Msg::Eof);
                return;
            }
            Ok(n) => {
                if sh.blackholed(dir) {
                    continue;
                }
                queued.fetch_add(n, Ordering::Relaxed);
                if tx.send(Msg::Data(Instant::now(), buf[..n].to_vec())).is_err() {
                    return;
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {}
            Err(_) => {
                let _ = tx.send(Msg::Abort);
                return;
            }
        }
    }
}

fn writer(
    sh: Arc<Shared>,
    dir: Dir,
    rx: Receiver<Msg>,
    mut dst: TcpStream,
    both: [TcpStream; 2],
    queued: Arc<AtomicUsize>,
    _g: Arc<ConnGuard>,
) {
    let abort = || {
        for s in &both {
            let _ = s.shutdown(Shutdown::Both);
        }
    };
    loop {
        let msg = match rx.recv_timeout(TICK) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => {
                if sh.stopped() {
                    return abort();
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return abort(),
        };
        let (t, data) = match msg {
            Msg::Data(t, data) => (t, data),
            Msg::Eof => {
                let _ = dst.shutdown(Shutdown::Write);
                return;
            }
            Msg::Abort => return abort(),
        };
        // The delay line: each chunk leaves `delay` after it arrived, using
        // the delay in force now, so changes apply to queued data too.
        loop {
            if sh.stopped() {
                return abort();
            }
            let due = t + sh.delay();
            let now = Instant::now();
            if now >= due {
                break;
            }
            std::thread::sleep((due - now).min(TICK));
        }
        queued.fetch_sub(data.len(), Ordering::Relaxed);
        if sh.blackholed(dir) {
            continue;
        }
        let mut off = 0;
        while off < data.len() {
            let Some(piece) = sh.take_tokens(dir, data.len() - off) else {
                return abort();
            };
            let end = off + piece;
            // Counted before writing, so that whoever receives the bytes
            // already sees them in bytes(); what fails to go out is taken
            // back off.
            let counter = &sh.bytes[dir.idx()];
            counter.fetch_add(piece as u64, Ordering::SeqCst);
            while off < end {
                let failed = match dst.write(&data[off..end]) {
                    Ok(0) => true,
                    Ok(n) => {
                        off += n;
                        false
                    }
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                        sh.stopped()
                    }
                    Err(_) => true,
                };
                if failed {
                    counter.fetch_sub((end - off) as u64, Ordering::SeqCst);
                    return abort();
                }
            }
        }
    }
}
