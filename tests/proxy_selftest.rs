mod common;

// Tests of the fault-injecting test proxy itself, against a small echo
// server: forwarding and byte counts, cut/restore, delay, blackhole and
// bandwidth caps, and prompt shutdown on drop.

use common::proxy::{Dir, Proxy};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// An echo server on loopback; runs until the test process exits.
fn echo_server() -> SocketAddr {
    let l = TcpListener::bind(("127.0.0.1", common::free_port())).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { continue };
            std::thread::spawn(move || {
                let mut r = s.try_clone().unwrap();
                let _ = std::io::copy(&mut r, &mut s);
                let _ = s.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

fn connect(p: &Proxy) -> TcpStream {
    let s = TcpStream::connect(p.addr()).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

fn round_trip(s: &mut TcpStream, msg: &[u8]) -> Duration {
    let t = Instant::now();
    s.write_all(msg).unwrap();
    let mut got = vec![0; msg.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
    t.elapsed()
}

/// Sends `n` patterned bytes from a thread and reads the echo back;
/// returns how long until all of it came back.
fn stream(s: &TcpStream, n: usize) -> Duration {
    let data: Vec<u8> = (0..n).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut w = s.try_clone().unwrap();
    let mut r = s.try_clone().unwrap();
    let t = Instant::now();
    let expect = data.clone();
    let sender = std::thread::spawn(move || {
        for c in data.chunks(8192) {
            w.write_all(c).unwrap();
        }
    });
    let mut got = vec![0; n];
    r.read_exact(&mut got).unwrap();
    let el = t.elapsed();
    sender.join().unwrap();
    assert!(got == expect, "echoed data differs");
    el
}

/// Whether the peer closed or reset `s` within `within`.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let deadline = Instant::now() + within;
    let mut b = [0u8; 64];
    while Instant::now() < deadline {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return true,
        }
    }
    false
}

fn wait_until(within: Duration, f: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    f()
}

#[test]
fn forwards_and_counts_bytes() {
    let p = Proxy::start(echo_server());
    assert_eq!(p.bytes(), (0, 0));
    let mut s = connect(&p);
    round_trip(&mut s, b"hello");
    assert!(wait_until(Duration::from_secs(1), || p.open_connections() == 1));
    stream(&s, 200_000);
    assert_eq!(p.bytes(), (200_005, 200_005));
    let mut s2 = connect(&p);
    round_trip(&mut s2, b"x");
    assert!(wait_until(Duration::from_secs(1), || p.open_connections() == 2));
    assert_eq!(p.bytes(), (200_006, 200_006));
    drop(s);
    drop(s2);
    assert!(wait_until(Duration::from_secs(1), || p.open_connections() == 0), "{} still open", p.open_connections());
}

#[test]
fn cut_and_restore() {
    let p = Proxy::start(echo_server());
    let mut s = connect(&p);
    round_trip(&mut s, b"before");
    p.cut();
    assert!(closed_within(&mut s, Duration::from_secs(1)), "open connection survived cut()");
    assert!(wait_until(Duration::from_secs(1), || p.open_connections() == 0));
    // New connections are accepted and closed at once while cut.
    for _ in 0..3 {
        let mut n = connect(&p);
        let _ = n.write_all(b"x");
        assert!(closed_within(&mut n, Duration::from_secs(1)), "new connection not refused while cut");
    }
    assert_eq!(p.open_connections(), 0);
    p.restore();
    let mut s = connect(&p);
    round_trip(&mut s, b"after");
    assert_eq!(p.open_connections(), 1);
}

#[test]
fn delay_is_a_delay_line() {
    let p = Proxy::start(echo_server());
    let mut s = connect(&p);
    let fast = round_trip(&mut s, b"a");
    assert!(fast < Duration::from_millis(300), "undelayed round trip took {fast:?}");
    // Applies to the connection that is already open.
    p.set_delay(Duration::from_millis(200));
    let slow = round_trip(&mut s, b"b");
    assert!(slow >= Duration::from_millis(390) && slow < Duration::from_secs(2), "delayed round trip took {slow:?}");
    let el = stream(&s, 1 << 20);
    assert!(el >= Duration::from_millis(390) && el < Duration::from_secs(4), "1 MiB with 200 ms delay took {el:?}");
    p.set_delay(Duration::ZERO);
    let fast = round_trip(&mut s, b"c");
    assert!(fast < Duration::from_millis(300), "round trip after clearing delay took {fast:?}");
}

#[test]
fn blackhole_drops_one_direction() {
    let p = Proxy::start(echo_server());
    let mut s = connect(&p);
    round_trip(&mut s, b"one");
    let before = p.bytes();
    p.blackhole(Dir::Up);
    s.write_all(b"lost").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    let mut b = [0u8; 16];
    match s.read(&mut b) {
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
        other => panic!("expected silence under blackhole, got {other:?}"),
    }
    assert_eq!(p.open_connections(), 1);
    assert_eq!(p.bytes(), before, "blackholed bytes were counted as forwarded");
    p.clear_blackhole();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    round_trip(&mut s, b"two"); // "lost" is gone for good
    // And the other way round: the server gets the data, the echo is lost.
    p.blackhole(Dir::Down);
    s.write_all(b"three").unwrap();
    assert!(wait_until(Duration::from_secs(1), || p.bytes().0 == before.0 + 3 + 5));
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(s.read(&mut b).is_err(), "echo arrived through a Down blackhole");
    p.clear_blackhole();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    round_trip(&mut s, b"four");
}

#[test]
fn bandwidth_cap() {
    let p = Proxy::start(echo_server());
    let s = connect(&p);
    let el = stream(&s, 1 << 20);
    assert!(el < Duration::from_secs(2), "uncapped 1 MiB took {el:?}");
    p.set_bandwidth(Some(1 << 20));
    let el = stream(&s, 3 << 20);
    assert!(el >= Duration::from_secs(2) && el <= Duration::from_secs(6), "3 MiB at 1 MiB/s took {el:?}");
    p.set_bandwidth(None);
    let el = stream(&s, 1 << 20);
    assert!(el < Duration::from_secs(2), "1 MiB after lifting the cap took {el:?}");
}

#[test]
fn drop_closes_everything_promptly() {
    let p = Proxy::start(echo_server());
    let addr = p.addr();
    let mut s = connect(&p);
    round_trip(&mut s, b"x");
    // A connection with data stuck in the delay line, too.
    p.set_delay(Duration::from_secs(30));
    s.write_all(b"queued").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    drop(p);
    assert!(t.elapsed() < Duration::from_millis(1500), "drop took {:?}", t.elapsed());
    assert!(closed_within(&mut s, Duration::from_secs(1)));
    assert!(TcpStream::connect(addr).is_err(), "proxy still listening after drop");
}
