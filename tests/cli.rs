//! `tidemark up` and the admin CLI, driven from outside as a user would:
//! ready event, endpoints.json, status JSON, volume commands, clean stop on
//! SIGTERM, resume on the same directory, and one-line errors for bad input.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{bin, cmd, cmd_ok, free_port_block, tidemark};

struct Up {
    child: Child,
    ready: serde_json::Value,
    lines: std::sync::mpsc::Receiver<String>,
    /// What `up` printed on stderr (its sites' WARN and ERROR lines).
    errs: std::sync::mpsc::Receiver<String>,
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tidemark up --json` and waits for its ready event.
fn up(dir: &Path, port: u16, extra: &[&str]) -> Up {
    up_from(&bin(), dir, port, extra)
}

/// `up`, run from the binary at `exe`.
fn up_from(exe: &Path, dir: &Path, port: u16, extra: &[&str]) -> Up {
    let mut c = Command::new(exe)
        .args(["up", "--dir", dir.to_str().unwrap(), "--port-base", &port.to_string(), "--json"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines_of = |r: Box<dyn std::io::Read + Send>| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(r).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        rx
    };
    let rx = lines_of(Box::new(c.stdout.take().unwrap()));
    let errs = lines_of(Box::new(c.stderr.take().unwrap()));
    let line = rx.recv_timeout(Duration::from_secs(60)).expect("up printed no ready line");
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
    assert_eq!(ready["event"], "ready", "{line}");
    Up { child: c, ready, lines: rx, errs }
}

impl Up {
    /// The lines `up` printed until one contained `what` (panics after `secs`).
    fn wait_event(&self, what: &str, secs: u64) -> Vec<String> {
        let mut events = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !events.iter().any(|l: &String| l.contains(what)) {
            assert!(Instant::now() < deadline, "no {what} event: {events:?}");
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                events.push(l);
            }
        }
        events
    }

    /// The first `event` event `up` printed for `site` (panics after `secs`).
    fn wait_site_event(&self, event: &str, site: &str, secs: u64) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut seen = Vec::new();
        loop {
            assert!(Instant::now() < deadline, "no {event} event for site {site}: {seen:?}");
            if let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&l) {
                    if v["event"] == event && v["site"] == site {
                        return v;
                    }
                }
                seen.push(l);
            }
        }
    }
}

fn sigterm_and_wait(u: &mut Up) {
    unsafe { libc::kill(u.child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(st) = u.child.try_wait().unwrap() {
            assert!(st.success(), "up exited with {st} after SIGTERM");
            return;
        }
        assert!(Instant::now() < deadline, "up did not stop after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Breaks `site`'s site.toml as a hand edit could (an unknown key: the
/// site refuses to start, naming it).
fn break_config(dir: &Path, site: &str) {
    let cfg = dir.join(site).join("site.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replacen("role", "rolle", 1)).unwrap();
}

fn pid_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

#[test]
fn up_serves_admin_commands_and_resumes() {
    let tmp = tempfile::tempdir_in(common::test_root()).unwrap();
    let dir = tmp.path().join("dep");
    let port = free_port_block();
    let mut u = up(&dir, port, &["--volume", "vol0=256MiB"]);
    let a = &u.ready["sites"]["a"];
    assert_eq!(a["nbd"], format!("nbd://127.0.0.1:{port}"));
    assert_eq!(a["api"], format!("http://127.0.0.1:{}", port + 10));
    let site_pid = a["pid"].as_u64().unwrap();
    // One DR site by default, reported once it is connected and caught up.
    assert_eq!(u.ready["sites"]["b"]["nbd"], format!("nbd://127.0.0.1:{}", port + 1));
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !events.iter().any(|l: &String| l.contains("dr-caught-up")) {
        assert!(Instant::now() < deadline, "no dr-connected/dr-caught-up events: {events:?}");
        if let Ok(l) = u.lines.recv_timeout(Duration::from_millis(200)) {
            events.push(l);
        }
    }
    assert!(events.iter().any(|l| l.contains("\"dr-connected\"") && l.contains("\"site\":\"b\"")), "{events:?}");
    assert!(dir.join("endpoints.json").exists());
    assert!(dir.join("a/site.toml").exists());
    let uri = format!("nbd://127.0.0.1:{port}/vol0");
    cmd_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x5c 0 1M", "-c", "flush", &uri]);

    let d = dir.to_str().unwrap();
    let o = tidemark(&["--dir", d, "--json", "status"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let s: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s["site"], "a");
    assert_eq!(s["role"], "primary");
    assert!(s["epoch"].as_u64().unwrap() >= 1);
    assert_eq!(s["groups"][0]["name"], "cg0");
    assert_eq!(s["groups"][0]["mode"], "async");
    assert_eq!(s["groups"][0]["volumes"][0]["name"], "vol0");
    assert_eq!(s["groups"][0]["volumes"][0]["size"], 256u64 << 20);
    assert!(s["groups"][0]["last_seq"].as_u64().unwrap() >= 2);
    assert_eq!(s["groups"][0]["replicas"][0]["site"], "b");
    // A name with URL syntax in it names nothing (before, `vol0?x=1`
    // reached the site as `vol0`, and the volume was deleted).
    for args in [&["volume", "delete", "vol0?x=1"][..], &["volume", "delete", "vol0#x"], &["volume", "resize", "vol0?x", "--size", "512M"], &["volume", "delete", ""], &["group", "set", "cg0 x", "--mode", "sync"]] {
        let o = tidemark(&[&["--dir", d][..], args].concat());
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.trim().lines().count() == 1 && (e.contains("does not exist") || e.contains("no API path")), "{args:?}: {e}");
    }
    // Every error answer of the API is JSON with an `error`, the router's
    // own too (they were empty or plain text).
    let api = format!("http://127.0.0.1:{}", port + 10);
    for (args, code, want) in [
        (vec!["-X", "GET", "/nosuch"], "404", "no API path /nosuch"),
        (vec!["-X", "DELETE", "/status"], "405", "/status does not take DELETE"),
        (vec!["-X", "POST", "-H", "content-type: application/json", "-d", "{}", "/groups/cg0"], "400", "nothing to change"),
    ] {
        let (path, opts) = args.split_last().unwrap();
        let url = format!("{api}{path}");
        let o = cmd("curl", &[&["-s", "-w", "\n%{http_code}"][..], opts, &[url.as_str()]].concat());
        let out = String::from_utf8_lossy(&o.stdout);
        let (body, got) = out.rsplit_once('\n').unwrap();
        assert_eq!(got, code, "{args:?}: {out}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {body}"));
        assert!(v["error"].as_str().unwrap_or_default().contains(want), "{args:?}: {v}");
    }
    let o = tidemark(&["--dir", d, "--json", "status"]);
    let s1: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s1["groups"][0]["volumes"][0]["size"], 256u64 << 20, "{s1}");
    // The DR site reports itself as secondary with its applied_seq.
    let o = tidemark(&["--dir", d, "--site", "b", "--json", "status"]);
    let sb: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(sb["role"], "secondary");
    assert!(sb["groups"][0]["applied_seq"].as_u64().is_some(), "{sb}");
    // Mode switch online.
    let o = tidemark(&["--dir", d, "group", "set", "cg0", "--mode", "sync"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    cmd_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x5d 1M 64k", &uri]);
    let o = tidemark(&["--dir", d, "--json", "status"]);
    let s2: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(s2["groups"][0]["mode"], "sync");
    assert_eq!(s2["groups"][0]["replicas"][0]["lag_writes"], 0, "sync write acknowledged before the DR had it: {s2}");
    // The DR site's group runs in the primary's mode, and says so.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = tidemark(&["--dir", d, "--site", "b", "--json", "status"]);
        let sb: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        if sb["groups"][0]["mode"] == "sync" {
            break;
        }
        assert!(Instant::now() < deadline, "b still shows its group's mode as {}", sb["groups"][0]["mode"]);
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every site holds its replication port, the primary too (P+20).
    assert!(std::net::TcpListener::bind(("127.0.0.1", port + 20)).is_err(), "a does not hold its replication port");
    let o = tidemark(&["--dir", d, "group", "set", "cg0", "--mode", "async"]);
    assert!(o.status.success());

    // Volume commands.
    let o = tidemark(&["--dir", d, "volume", "create", "v1", "--size", "64M", "--group", "cg1"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = tidemark(&["--dir", d, "--json", "volume", "list"]);
    let l: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(l.as_array().unwrap().iter().any(|v| v["name"] == "v1" && v["size"] == 64u64 << 20 && v["group"] == "cg1"), "{l}");
    let o = tidemark(&["--dir", d, "volume", "resize", "v1", "--size", "128MiB"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let info = cmd_ok("nbdinfo", &["--size", &format!("nbd://127.0.0.1:{port}/v1")]);
    assert_eq!(String::from_utf8_lossy(&info.stdout).trim(), (128u64 << 20).to_string());
    // Failures: exit 1 with one line naming the problem; usage errors exit 2.
    let o = tidemark(&["--dir", d, "volume", "create", "v1", "--size", "64M"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("v1") && err.contains("exists") && err.trim().lines().count() == 1, "{err}");
    let o = tidemark(&["--dir", d, "volume", "delete", "nosuch"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nosuch"));
    let o = tidemark(&["--dir", d, "volume", "create", "v2", "--size", "12X"]);
    assert_eq!(o.status.code(), Some(2));
    // Not whole blocks: a usage error, said before anything is asked of the site.
    let o = tidemark(&["--dir", d, "volume", "create", "v2", "--size", "1000"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("multiple of 4096"));
    let o = tidemark(&["--dir", d, "bogus-command"]);
    assert_eq!(o.status.code(), Some(2));
    let o = tidemark(&["--dir", d, "volume", "delete", "v1"]);
    assert!(o.status.success());

    // Metrics.
    let m = String::from_utf8(cmd_ok("curl", &["-sf", &format!("http://127.0.0.1:{}/metrics", port + 10)]).stdout).unwrap();
    assert!(m.contains("tidemark_nbd_requests_total{export=\"vol0\",op=\"write\"}"), "{m}");
    assert!(m.contains("tidemark_log_bytes{group=\"cg0\"}"));
    assert!(m.contains("tidemark_nbd_request_seconds_bucket"));

    // A second `up` on the same directory is refused while the first runs.
    let o = tidemark(&["up", "--dir", d, "--port-base", &port.to_string()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("in use"));

    // SIGTERM stops everything cleanly.
    sigterm_and_wait(&mut u);
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(site_pid) {
        assert!(Instant::now() < deadline, "site {site_pid} still running after up stopped");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Waited for: the reader thread may not have passed the last line on yet.
    u.wait_event("\"stopped\"", 10);

    // Resume with the data. What only a new deployment takes is said to
    // be left alone, not silently dropped.
    let u2 = up(&dir, port, &["--mode", "periodic", "--volume", "other=1G"]);
    let notes: Vec<String> = (0..2).map(|_| u2.errs.recv_timeout(Duration::from_secs(10)).expect("no note on stderr")).collect();
    assert!(notes.iter().any(|l| l.contains("--mode periodic not applied")), "{notes:?}");
    assert!(notes.iter().any(|l| l.contains("--volume not applied")), "{notes:?}");
    cmd_ok("qemu-io", &["-f", "raw", "-c", "read -P 0x5c 0 1M", &uri]);
    let o = cmd("qemu-io", &["-f", "raw", "-c", "read -P 0x5c 0 1M", &uri]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed"));
}

#[test]
fn up_restarts_a_killed_site_without_losing_flushed_writes() {
    let tmp = tempfile::tempdir_in(common::test_root()).unwrap();
    let dir = tmp.path().join("dep");
    let port = free_port_block();
    let u = up(&dir, port, &["--volume", "vol0=64MiB"]);
    let pid = u.ready["sites"]["a"]["pid"].as_u64().unwrap();
    let uri = format!("nbd://127.0.0.1:{port}/vol0");
    cmd_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x77 4096 64k", "-c", "flush", &uri]);
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let restarted = u.wait_site_event("site-restarted", "a", 30);
    let o = cmd_ok("qemu-io", &["-f", "raw", "-c", "read -P 0x77 4096 64k", &uri]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed"));
    // endpoints.json names the new process (a script that kills a site by
    // its pid must not hit a stale one).
    let new_pid = restarted["pid"].as_u64().unwrap();
    assert_ne!(new_pid, pid);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let e: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("endpoints.json")).unwrap()).unwrap();
        if e["sites"]["a"]["pid"].as_u64() == Some(new_pid) {
            assert_eq!(e["sites"]["b"]["pid"], u.ready["sites"]["b"]["pid"], "{e}");
            break;
        }
        assert!(Instant::now() < deadline, "endpoints.json still names the old pid: {e}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A restart that cannot even start the process (here: the site's log
/// file cannot be opened, as on a full or read-only disk) is an error
/// event and a retry a second later. Before, it ended `up`, and every
/// healthy site died with it.
#[test]
fn up_survives_a_restart_that_cannot_start_and_retries_it() {
    let tmp = tempfile::tempdir_in(common::test_root()).unwrap();
    let dir = tmp.path().join("dep");
    let port = free_port_block();
    let mut u = up(&dir, port, &["--volume", "vol0=64MiB"]);
    let b_pid = u.ready["sites"]["b"]["pid"].as_u64().unwrap();
    // The running pump keeps writing the renamed file; a new one cannot
    // open a directory.
    let log = dir.join("b/site.log");
    std::fs::rename(&log, dir.join("b/site.log.old")).unwrap();
    std::fs::create_dir(&log).unwrap();
    unsafe { libc::kill(b_pid as i32, libc::SIGKILL) };
    let err = u.wait_site_event("error", "b", 30);
    let e = err["error"].as_str().unwrap();
    assert!(e.contains("cannot restart it") && e.contains("site.log") && e.contains("trying again"), "{err}");
    assert!(u.child.try_wait().unwrap().is_none(), "up exited");
    // a serves on meanwhile.
    let uri = format!("nbd://127.0.0.1:{port}/vol0");
    cmd_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x3c 0 64k", "-c", "flush", &uri]);
    // Once the log file can be opened again, the retry starts b.
    std::fs::remove_dir(&log).unwrap();
    let restarted = u.wait_site_event("site-restarted", "b", 30);
    assert_ne!(restarted["pid"].as_u64().unwrap(), b_pid);
    let b_nbd = format!("nbd://127.0.0.1:{}/vol0", port + 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    let b_shows_it = || {
        let o = cmd("qemu-io", &["-f", "raw", "-r", "-c", "read -P 0x3c 0 64k", &b_nbd]);
        o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed")
    };
    while !b_shows_it() {
        assert!(Instant::now() < deadline, "b never showed a's write after its restart");
        std::thread::sleep(Duration::from_millis(200));
    }
    sigterm_and_wait(&mut u);
}

/// The binary `up` runs from is replaced (an upgrade in place) and then a
/// DR site is killed: `up` restarts it from the binary it runs itself
/// (before, from the path, which now held something else: "No such file",
/// retried for ever). The primary's `dr-lost` and `dr-connected` are
/// printed even though b is back before the next status poll could see it
/// gone (`sessions`). After a clean stop, endpoints.json names no pid.
#[test]
fn up_restarts_a_site_from_its_own_binary_and_reports_the_lost_link() {
    let tmp = tempfile::tempdir_in(common::test_root()).unwrap();
    let dir = tmp.path().join("dep");
    let exe = tmp.path().join("tidemark");
    std::fs::copy(bin(), &exe).unwrap();
    let port = free_port_block();
    let mut u = up_from(&exe, &dir, port, &["--volume", "vol0=64MiB"]);
    u.wait_site_event("dr-caught-up", "b", 30);
    // Replaced: another file at the same path.
    std::fs::remove_file(&exe).unwrap();
    std::fs::write(&exe, "#!/bin/sh\necho not tidemark >&2\nexit 7\n").unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut b_pid = u.ready["sites"]["b"]["pid"].as_u64().unwrap();
    for _ in 0..2 {
        unsafe { libc::kill(b_pid as i32, libc::SIGKILL) };
        // In the order they come (a restart may be seen before the loss).
        let want = ["site-restarted", "dr-lost", "dr-connected", "dr-caught-up"];
        let mut got: Vec<serde_json::Value> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !want.iter().all(|w| got.iter().any(|e| e["event"] == *w)) {
            assert!(Instant::now() < deadline, "events for b after a SIGKILL: {got:?}");
            if let Ok(l) = u.lines.recv_timeout(Duration::from_millis(200)) {
                let v: serde_json::Value = serde_json::from_str(&l).unwrap();
                if v["site"] == "b" {
                    got.push(v);
                }
            }
        }
        let at = |w: &str| got.iter().position(|e| e["event"] == w).unwrap();
        assert!(at("dr-lost") < at("dr-connected") && at("dr-connected") < at("dr-caught-up"), "{got:?}");
        let restarted = &got[at("site-restarted")];
        assert_ne!(restarted["pid"].as_u64().unwrap(), b_pid);
        b_pid = restarted["pid"].as_u64().unwrap();
    }
    sigterm_and_wait(&mut u);
    let ep: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("endpoints.json")).unwrap()).unwrap();
    assert!(ep["sites"]["a"]["pid"].is_null() && ep["sites"]["b"]["pid"].is_null(), "{ep}");
}

/// A site that cannot start (here: its site.toml, edited by hand, no
/// longer parses): `up` stops the others and exits 1, saying once which
/// site and why, with the site's own last line.
#[test]
fn up_says_why_a_site_cannot_start_and_stops_the_others() {
    let tmp = tempfile::tempdir_in(common::test_root()).unwrap();
    let dir = tmp.path().join("dep");
    let port = free_port_block();
    let mut u = up(&dir, port, &["--volume", "vol0=64MiB"]);
    sigterm_and_wait(&mut u);
    break_config(&dir, "b");
    let o = Command::new(bin())
        .args(["up", "--dir", dir.to_str().unwrap(), "--port-base", &port.to_string(), "--json"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let said: Vec<&str> = err.lines().filter(|l| l.starts_with("tidemark: ")).collect();
    assert_eq!(said.len(), 1, "{err}");
    assert!(said[0].contains("site b exited during start") && said[0].contains("rolle"), "{err}");
    // a was stopped with it: its NBD port is free again.
    assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(), "site a still runs");
}

/// A site that crashes on every start (its site.toml broken under it):
/// each start is an `error` event with the site's own reason, and after 5
/// in a minute `up` pauses its restarts (5 minutes) rather than loop or
/// give up for good; the other site serves on throughout.
#[test]
fn up_pauses_a_crash_loop_and_says_why() {
    let tmp = tempfile::tempdir_in(common::test_root()).unwrap();
    let dir = tmp.path().join("dep");
    let port = free_port_block();
    let mut u = up(&dir, port, &["--volume", "vol0=64MiB"]);
    let b_pid = u.ready["sites"]["b"]["pid"].as_u64().unwrap();
    break_config(&dir, "b");
    unsafe { libc::kill(b_pid as i32, libc::SIGKILL) };
    let mut reasons = 0;
    let pause = loop {
        let e = u.wait_site_event("error", "b", 60);
        let msg = e["error"].as_str().unwrap().to_string();
        if msg.contains("exited during start") {
            assert!(msg.contains("rolle"), "{e}");
            reasons += 1;
            continue;
        }
        break msg;
    };
    assert!(pause.contains("restarted 5 times in the last minute; trying again in 300 s"), "{pause}");
    assert_eq!(reasons, 5);
    assert!(u.child.try_wait().unwrap().is_none(), "up exited");
    let uri = format!("nbd://127.0.0.1:{port}/vol0");
    cmd_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x21 0 64k", "-c", "flush", &uri]);
    sigterm_and_wait(&mut u);
}

/// `up --json | head -1`: the reader of `up`'s events goes away after the
/// first. Before, the next event's `println!` panicked in `up`, and every
/// site died with it. Now `up` says once on stderr that it cannot print
/// events, and goes on supervising: a killed site is restarted and serves,
/// and SIGTERM still stops everything cleanly.
#[test]
fn up_outlives_a_reader_of_its_events_that_went_away() {
    let tmp = tempfile::tempdir_in(common::test_root()).unwrap();
    let dir = tmp.path().join("dep");
    let port = free_port_block();
    let mut c = Command::new(bin())
        .args(["up", "--dir", dir.to_str().unwrap(), "--port-base", &port.to_string(), "--json", "--volume", "vol0=64MiB"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(c.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON: {line}: {e}"));
    assert_eq!(ready["event"], "ready", "{line}");
    // The reader goes away, as `head -1` does.
    drop(out);
    let (etx, errs) = std::sync::mpsc::channel();
    let stderr = c.stderr.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = etx.send(l);
        }
    });
    let mut u = Up { child: c, ready, lines: std::sync::mpsc::channel().1, errs };
    // Events follow: b is connected, then killed (site-exited, site-restarted).
    let b_pid = u.ready["sites"]["b"]["pid"].as_u64().unwrap();
    let b_nbd = format!("nbd://127.0.0.1:{}/vol0", port + 1);
    let b_serves = || cmd("qemu-io", &["-f", "raw", "-r", "-c", "read 0 4k", &b_nbd]).status.success();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !b_serves() {
        assert!(Instant::now() < deadline, "b never served vol0");
        std::thread::sleep(Duration::from_millis(200));
    }
    unsafe { libc::kill(b_pid as i32, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut said = Vec::new();
    while !said.iter().any(|l: &String| l.contains("cannot write events to stdout any more")) {
        assert!(Instant::now() < deadline, "up did not say it cannot print its events: {said:?}");
        if let Ok(l) = u.errs.recv_timeout(Duration::from_millis(200)) {
            said.push(l);
        }
    }
    assert!(u.child.try_wait().unwrap().is_none(), "up exited: {said:?}");
    // b is back (a new process), serving, and a still serves.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pids: Vec<u64> = std::fs::read_dir("/proc")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .filter(|p| std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default().contains(&*dir.join("b/site.toml").to_string_lossy()))
            .collect();
        if pids.iter().any(|&p| p != b_pid && pid_alive(p)) && b_serves() {
            break;
        }
        assert!(Instant::now() < deadline, "site b was not restarted (up's stderr: {said:?})");
        std::thread::sleep(Duration::from_millis(200));
    }
    cmd_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 0 64k", "-c", "flush", &format!("nbd://127.0.0.1:{port}/vol0")]);
    assert!(u.child.try_wait().unwrap().is_none(), "up exited");
    // An admin command whose reader is gone ends by SIGPIPE, quietly.
    let mut fds = [0i32; 2];
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    unsafe { libc::close(fds[0]) };
    let gone = unsafe { <std::process::Stdio as std::os::fd::FromRawFd>::from_raw_fd(fds[1]) };
    let o = Command::new(bin()).args(["--dir", dir.to_str().unwrap(), "status"]).stdout(gone).output().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(o.status.signal(), Some(libc::SIGPIPE), "{}: {}", o.status, String::from_utf8_lossy(&o.stderr));
    assert!(o.stderr.is_empty(), "{}", String::from_utf8_lossy(&o.stderr));
    sigterm_and_wait(&mut u);
    let rest: Vec<String> = u.errs.try_iter().collect();
    assert!(!rest.iter().chain(&said).any(|l| l.contains("panicked")), "{said:?} {rest:?}");
}

#[test]
fn bad_input_gets_one_line_errors() {
    let tmp = tempfile::tempdir_in(common::test_root()).unwrap();
    let t = tmp.path();
    // Unknown flag and bad size: usage errors.
    let o = tidemark(&["up", "--bogus"]);
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("--bogus") && e.trim().lines().count() == 1, "{e}");
    let o = tidemark(&["up", "--dir", t.join("x").to_str().unwrap(), "--volume", "vol0=1X"]);
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("1X") && e.trim().lines().count() == 1, "{e}");
    // A directory holding something else.
    let other = t.join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("important.txt"), "x").unwrap();
    let o = tidemark(&["up", "--dir", other.to_str().unwrap(), "--port-base", &free_port_block().to_string()]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("not a tidemark deployment") && e.trim().lines().count() == 1, "{e}");
    // DIR not usable (a path below a regular file).
    let o = tidemark(&["up", "--dir", other.join("important.txt/sub").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("important.txt"));
    // Port in use.
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let p = busy.local_addr().unwrap().port();
    let o = tidemark(&["up", "--dir", t.join("p").to_str().unwrap(), "--port-base", &p.to_string()]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains(&p.to_string()) && e.contains("in use"), "{e}");
    // The primary's replication port (P+20) too, and the refusal leaves
    // the directory as it found it: no deployment tied to that port base.
    let base = free_port_block();
    let busy = std::net::TcpListener::bind(("127.0.0.1", base + 20)).unwrap();
    let fresh = t.join("fresh");
    let o = tidemark(&["up", "--dir", fresh.to_str().unwrap(), "--port-base", &base.to_string()]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains(&(base + 20).to_string()) && e.contains("replication of site a") && e.trim().lines().count() == 1, "{e}");
    drop(busy);
    assert!(!fresh.join("deployment.json").exists(), "a deployment was written before its ports were checked");
    // So is a refused port base (a lone up.lock is not in the way after).
    let o = tidemark(&["up", "--dir", fresh.to_str().unwrap(), "--port-base", "65530"]);
    assert_eq!(o.status.code(), Some(1));
    let o = tidemark(&["up", "--dir", fresh.to_str().unwrap(), "--port-base", &base.to_string(), "--dr-sites", "12"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("at most 9") && !e.contains("holds files"), "{e}");
    // Volume sizes and names are usage errors, found before anything is written.
    for (arg, want) in [("vol0=1000", "multiple of 4096"), ("vol0=0", "multiple of 4096")] {
        let o = tidemark(&["up", "--dir", t.join("v").to_str().unwrap(), "--volume", arg]);
        assert_eq!(o.status.code(), Some(2), "{arg}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want) && e.trim().lines().count() == 1, "{arg}: {e}");
    }
    let o = tidemark(&["up", "--dir", t.join("v").to_str().unwrap(), "--port-base", &free_port_block().to_string(), "--volume", "a=1M", "--volume", "a=2M"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("volume a is given twice"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!t.join("v").join("deployment.json").exists());
    // A malformed --api or --site is a usage error too.
    for args in [&["--api", "notaurl", "status"][..], &["--api", "http://127.0.0.1", "status"], &["--site", "b c", "status"]] {
        let o = tidemark(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(args[1]) && e.trim().lines().count() == 1, "{args:?}: {e}");
    }
    // A name a site would refuse, and a bad --timeout, are usage errors
    // too (not exit 1 from the site, after a group was made for it).
    for (args, want) in [
        (&["volume", "create", "a@b", "--size", "4M"][..], "a@b"),
        (&["volume", "create", "v", "--size", "4M", "--group", "../g"], "../g"),
        (&["snapshot", "create", "vol0", "s/1"], "s/1"),
        (&["--timeout", "0", "status"], "timeout \"0\""),
        (&["--timeout", "soon", "status"], "soon"),
    ] {
        let o = tidemark(&[&["--api", "http://127.0.0.1:9"][..], args].concat());
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want) && e.trim().lines().count() == 1, "{args:?}: {e}");
    }
    // A site that takes the connection and never answers (stopped, stuck):
    // exit 1 within --timeout, saying so (before: a wait of two minutes
    // per read, then "Resource temporarily unavailable").
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let api = format!("http://{}", mute.local_addr().unwrap());
    for args in [&["status"][..], &["volume", "create", "v", "--size", "4M"]] {
        let t0 = Instant::now();
        let o = tidemark(&[&["--api", api.as_str(), "--timeout", "0.5"][..], args].concat());
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("did not answer within 0.5 s") && e.contains("stuck") && e.trim().lines().count() == 1, "{args:?}: {e}");
        assert!(t0.elapsed() < Duration::from_secs(10), "{args:?} took {:?}", t0.elapsed());
    }
    drop(mute);
    // A missing argument is named.
    let o = tidemark(&["--dir", t.join("v").to_str().unwrap(), "volume", "create", "x"]);
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("--size") && e.trim().lines().count() == 1, "{e}");
    // Too many DR sites: refused before the deployment file is written
    // (before, it was written first, with the count, and the process ran
    // out of memory making four billion site names; every later `up` in
    // the directory did the same).
    let many = t.join("many");
    let o = tidemark(&["up", "--dir", many.to_str().unwrap(), "--dr-sites", "4294967295"]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("4294967295 DR sites: at most 9") && e.trim().lines().count() == 1, "{e}");
    assert!(!many.join("deployment.json").exists(), "the refused deployment was written");
    // A deployment file with such a count names the file.
    std::fs::create_dir_all(&many).unwrap();
    std::fs::write(many.join("deployment.json"), r#"{"id":"00","port_base":20000,"dr_sites":12,"mode":"async"}"#).unwrap();
    let o = tidemark(&["up", "--dir", many.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("deployment.json") && e.contains("12 DR sites: at most 9"), "{e}");
    // A site config with a typo names the file and the field.
    let cfg = t.join("site.toml");
    std::fs::write(&cfg, "name = \"a\"\nrole = \"primary\"\nnbd_listen = \"127.0.0.1:1\"\napi_listen = \"127.0.0.1:2\"\nmdoe = \"sync\"\n").unwrap();
    let o = tidemark(&["site", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("site.toml") && e.contains("mdoe"), "{e}");
    // init: bad site lists write nothing; an existing deployment is not
    // silently given other sites or another port base.
    let idir = t.join("init");
    let i = idir.to_str().unwrap();
    for (sites, want) in [("a,a", "site a is listed twice"), (",,", "site name \"\"")] {
        let o = tidemark(&["init", i, "--sites", sites, "--port-base", "30000"]);
        assert_eq!(o.status.code(), Some(1), "{sites}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want) && e.trim().lines().count() == 1, "{sites}: {e}");
        assert!(!idir.join("deployment.json").exists(), "{sites}: a refused init wrote the deployment");
    }
    let o = tidemark(&["init", i, "--sites", "a,b", "--port-base", "30100"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::read_to_string(idir.join("a/site.toml")).unwrap().contains("30100"), "the port base of a refused init was taken");
    for (args, want) in [
        (&["--sites", "a,b", "--port-base", "30200"][..], "on port base 30100, not 30200"),
        (&["--sites", "x,y"], "of sites a,b (1 DR sites), not of sites x,y"),
        (&["--sites", "a,b,c"], "not of sites a,b,c"),
    ] {
        let o = tidemark(&[&["init", i][..], args].concat());
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains(want) && e.trim().lines().count() == 1, "{args:?}: {e}");
    }
    assert!(!idir.join("x").exists() && !idir.join("c").exists(), "a refused init made a site");
    let o = tidemark(&["init", i, "--sites", "a,b"]);
    assert!(o.status.success(), "init again with the same sites: {}", String::from_utf8_lossy(&o.stderr));
    // Admin command without a deployment.
    let o = tidemark(&["--dir", t.join("none").to_str().unwrap(), "status"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("endpoints.json"));
}

/// `tidemark site --config site.toml` run from the site's own directory: the
/// config path has no directory part, and every crash-safe write (whose
/// directory fsync once got "" as the directory) must still work.
#[test]
fn site_runs_with_a_bare_config_file_name() {
    let tmp = tempfile::tempdir_in(common::test_root()).unwrap();
    let s = common::Site::configure(tmp.path(), &[("vol0", "16M")]);
    let log = std::fs::File::create(tmp.path().join("site.log")).unwrap();
    let mut child = Command::new(bin())
        .current_dir(tmp.path())
        .args(["site", "--config", "site.toml"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", s.nbd_port)).is_err() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("site exited during start ({st}); log:\n{}", s.log());
        }
        assert!(Instant::now() < deadline, "site did not start; log:\n{}", s.log());
        std::thread::sleep(Duration::from_millis(10));
    }
    let uri = s.uri("vol0");
    cmd_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x5a 0 64k", "-c", "flush", &uri]);
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let st = child.wait().unwrap();
    assert!(st.success(), "site exited with {st} on SIGTERM; log:\n{}", s.log());
}

/// A site whose API listens off loopback says at start that the API is
/// plain HTTP (a token sent to it crosses the network in clear), and one
/// whose NBD does, that NBD has no authentication; one on loopback says
/// nothing of the kind.
#[test]
fn a_site_warns_that_an_api_or_nbd_off_loopback_is_open() {
    let tmp = tempfile::tempdir_in(common::test_root()).unwrap();
    let mut s = common::Site::configure(tmp.path(), &[("vol0", "16M")]);
    s.spawn();
    s.stop();
    assert!(!s.log().contains("plain HTTP") && !s.log().contains("no authentication"), "warned on loopback:\n{}", s.log());
    let cfg = std::fs::read_to_string(&s.config).unwrap();
    let off = cfg
        .replace(&format!("api_listen = \"127.0.0.1:{}\"", s.api_port), &format!("api_listen = \"0.0.0.0:{}\"", s.api_port))
        .replace(&format!("nbd_listen = \"127.0.0.1:{}\"", s.nbd_port), &format!("nbd_listen = \"0.0.0.0:{}\"", s.nbd_port));
    assert_eq!(off.matches("0.0.0.0:").count(), 2, "no api_listen or nbd_listen line to change in:\n{cfg}");
    std::fs::write(&s.config, off).unwrap();
    s.spawn();
    let warned = |log: &str, port: u16, what: &str| log.lines().any(|l| l.contains("WARN") && l.contains(&format!("0.0.0.0:{port}")) && l.contains(what));
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(warned(&s.log(), s.api_port, "plain HTTP") && warned(&s.log(), s.nbd_port, "no authentication")) {
        assert!(Instant::now() < deadline, "no warnings that the API and NBD are open off loopback; log:\n{}", s.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    s.stop();
}

/// A site process that is alive and does not answer (here: stopped with
/// SIGSTOP) is a `site-unresponsive` event of `up --json`, and one that
/// answers again a `site-responsive` event; it is not restarted meanwhile.
#[test]
fn up_reports_a_site_that_stops_answering() {
    let tmp = tempfile::tempdir_in(common::test_root()).unwrap();
    let dir = tmp.path().join("dep");
    let port = free_port_block();
    let u = up(&dir, port, &["--volume", "vol0=16MiB"]);
    let pid = u.ready["sites"]["b"]["pid"].as_u64().unwrap();
    // Whatever happens, the site is not left stopped.
    struct Continue(i32);
    impl Drop for Continue {
        fn drop(&mut self) {
            unsafe { libc::kill(self.0, libc::SIGCONT) };
        }
    }
    let _continue = Continue(pid as i32);
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    let events = u.wait_event("\"site-unresponsive\"", 30);
    let ev: serde_json::Value = serde_json::from_str(events.iter().find(|l| l.contains("site-unresponsive")).unwrap()).unwrap();
    assert_eq!(ev["site"], "b", "{ev}");
    // b's API hangs (each status poll of it waits 5 s), and that holds up
    // no supervision of a: killed three times, a is seen gone and started
    // again each time at once (before, the loop polled the sites in turn
    // and sat in b's poll for 5 s of every 5.5).
    let mut a_pid = u.ready["sites"]["a"]["pid"].as_u64().unwrap();
    for round in 0..3 {
        unsafe { libc::kill(a_pid as i32, libc::SIGKILL) };
        let t = Instant::now();
        u.wait_site_event("site-exited", "a", 30);
        assert!(t.elapsed() < Duration::from_millis(2500), "round {round}: a's exit seen after {:?}, with b's API hung", t.elapsed());
        a_pid = u.wait_site_event("site-restarted", "a", 60)["pid"].as_u64().unwrap();
    }
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    let events = u.wait_event("\"site-responsive\"", 30);
    assert!(!events.iter().any(|l| l.contains("site-restarted") || l.contains("site-exited")), "{events:?}");
    assert!(pid_alive(pid));
}

/// A stop of `up` that finds a site that cannot stop (SIGSTOP) kills it
/// after 30 s and says so (`site-killed`), instead of a `stopped` that
/// reads as clean. And every site is named `tidemark` (not after the
/// descriptor `up` starts it through), so `pgrep -x tidemark` finds it.
#[test]
fn up_says_which_site_it_had_to_kill_at_a_stop() {
    let tmp = tempfile::tempdir_in(common::test_root()).unwrap();
    let dir = tmp.path().join("dep");
    let mut u = up(&dir, free_port_block(), &["--volume", "vol0=16MiB"]);
    for s in ["a", "b"] {
        let pid = u.ready["sites"][s]["pid"].as_u64().unwrap();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
        assert_eq!(comm.trim(), "tidemark", "site {s}'s process name");
    }
    let pid = u.ready["sites"]["b"]["pid"].as_u64().unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    unsafe { libc::kill(u.child.id() as i32, libc::SIGTERM) };
    let killed = u.wait_site_event("site-killed", "b", 45);
    assert!(killed["error"].as_str().unwrap().contains("did not stop within 30 s of SIGTERM"), "{killed}");
    u.wait_event("\"stopped\"", 10);
    let st = u.child.wait().unwrap();
    assert!(st.success(), "up exited with {st}");
    assert!(!pid_alive(pid), "b was left running");
}

/// A DR site that stops tells its primary why, and closes its link with
/// TLS close_notify: the primary's `dr-lost` says "site b is stopping"
/// (before: "peer closed connection without sending TLS close_notify",
/// as for a link that broke).
#[test]
fn a_dr_site_that_stops_tells_its_primary_why() {
    let tmp = tempfile::tempdir_in(common::test_root()).unwrap();
    let dir = tmp.path().join("dep");
    let mut u = up(&dir, free_port_block(), &["--volume", "vol0=16MiB"]);
    u.wait_event("\"dr-caught-up\"", 30);
    let pid = u.ready["sites"]["b"]["pid"].as_u64().unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let lost = u.wait_site_event("dr-lost", "b", 30);
    assert_eq!(lost["error"], "b reported: site b is stopping", "{lost}");
    // `up` restarts b (its events may come before or after dr-lost).
    u.wait_event("\"dr-caught-up\"", 30);
    sigterm_and_wait(&mut u);
}

/// A full disk under a running deployment (`up`'s whole directory on a
/// 48 MiB tmpfs, a 64 MiB write at the primary): `up --json` prints
/// `out-of-space` for the primary's group, with the error and the bytes
/// needed, and `space-recovered` once the file system is grown.
#[test]
fn up_reports_a_full_disk_and_its_recovery() {
    let tmp = tempfile::Builder::new().prefix("tidemark-upfull").tempdir_in(common::test_root()).unwrap();
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    cmd_ok("mount", &["-t", "tmpfs", "-o", "size=48m", "tmpfs", mnt.to_str().unwrap()]);
    // Dropped after `u` (declared before it): `up` and its sites stop first.
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = cmd("umount", &["-l", self.0.to_str().unwrap()]);
        }
    }
    let _unmount = Unmount(mnt.clone());
    let port = free_port_block();
    let u = up(&mnt.join("d"), port, &["--volume", "vol0=128MiB"]);
    let a = format!("nbd://127.0.0.1:{port}/vol0");
    let o = cmd("qemu-io", &["-f", "raw", "-c", "write -P 0x5c 0 64M", "-c", "flush", &a]);
    let said = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(said.contains("No space left on device"), "the write did not fail with ENOSPC: {said}");
    let ev = u.wait_site_event("out-of-space", "a", 30);
    assert_eq!(ev["group"].as_str(), Some("cg0"), "{ev}");
    assert!(ev["error"].as_str().is_some_and(|e| e.contains("No space left")) && ev["needed_bytes"].as_u64().is_some_and(|n| n > 0), "{ev}");
    cmd_ok("mount", &["-o", "remount,size=512m", mnt.to_str().unwrap()]);
    u.wait_site_event("space-recovered", "a", 30);
}

/// A disk that stops answering under a running deployment (`up`'s whole
/// directory on an ext4 frozen with `fsfreeze`, a write in flight at the
/// primary): `up --json` prints `storage-stalled` for the primary's group
/// (from its status, whose API answers while the write waits), the write
/// waits rather than fails, and once the disk answers `storage-recovered`
/// follows, the write completes, and it reads back at both sites.
#[test]
fn up_reports_a_stalled_disk_and_its_recovery() {
    let tmp = tempfile::Builder::new().prefix("tidemark-upstall").tempdir_in(common::test_root()).unwrap();
    let disk = common::FrozenDisk::mount(tmp.path());
    let mnt = disk.mnt.to_str().unwrap().to_string();
    let dir = disk.mnt.join("d");
    let port = free_port_block();
    let u = up(&dir, port, &["--volume", "vol0=64MiB"]);
    // Dropped before `u` if the test fails: `up`, killed, cannot finish
    // exiting while its log thread waits in a write to the frozen disk.
    struct Thaw(String);
    impl Drop for Thaw {
        fn drop(&mut self) {
            let _ = cmd("fsfreeze", &["--unfreeze", &self.0]);
        }
    }
    let _thaw = Thaw(mnt.clone());
    let (a, b) = (format!("nbd://127.0.0.1:{port}/vol0"), format!("nbd://127.0.0.1:{}/vol0", port + 1));
    cmd_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x5c 0 1M", &a]);
    cmd_ok("fsfreeze", &["--freeze", &mnt]);
    let w = Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 0x6d 1M 1M", &a]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    // The primary's (the DR site may report a stall of its own first).
    let ev = u.wait_site_event("storage-stalled", "a", 60);
    assert_eq!(ev["group"].as_str(), Some("cg0"), "{ev}");
    // Whichever storage operation the freeze caught first (the write's
    // append, a log sync, a pins or checkpoint write: CI saw "replication
    // pins write").
    let ops = ["log append", "log sync", "checkpoint write", "replication pins write"];
    assert!(ev["operation"].as_str().is_some_and(|o| ops.contains(&o)) && ev["seconds"].as_f64().is_some_and(|s| s >= 10.0), "{ev}");
    // The site's own WARN reaches the operator while its log file (on the
    // frozen disk) cannot be written: `up` echoes it on stderr. Before, the
    // site wrote the file itself, and the thread that logs the stall
    // waited in that write until the thaw.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut errs = Vec::new();
    while !errs.iter().any(|l: &String| l.starts_with("site a: ") && l.contains("WARN") && l.contains("its storage is stalled")) {
        assert!(Instant::now() < deadline, "no stall WARN from site a on up's stderr while frozen: {errs:?}");
        if let Ok(l) = u.errs.recv_timeout(Duration::from_millis(200)) {
            errs.push(l);
        }
    }
    cmd_ok("fsfreeze", &["--unfreeze", &mnt]);
    u.wait_site_event("storage-recovered", "a", 60);
    let out = w.wait_with_output().unwrap();
    assert!(out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("error"), "the write failed: {}", String::from_utf8_lossy(&out.stdout));
    let read_ok = |uri: &str| {
        let o = cmd("qemu-io", &["-f", "raw", "-r", "-c", "read -P 0x5c 0 1M", "-c", "read -P 0x6d 1M 1M", uri]);
        o.status.success() && !String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed")
    };
    assert!(read_ok(&a), "the primary does not read back both writes");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !read_ok(&b) {
        if Instant::now() >= deadline {
            let st = |p: u16| String::from_utf8_lossy(&cmd("curl", &["-s", &format!("http://127.0.0.1:{p}/status")]).stdout).into_owned();
            let log = |s: &str| std::fs::read_to_string(dir.join(s).join("site.log")).unwrap_or_default();
            panic!("the DR site does not read back both writes\na: {}\nb: {}\na log:\n{}\nb log:\n{}", st(port + 10), st(port + 11), log("a"), log("b"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // And once the disk answers, the file has the WARN too.
    let log = dir.join("a").join("site.log");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("its storage is stalled") {
        assert!(Instant::now() < deadline, "the stall WARN never reached {}", log.display());
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(u);
    drop(disk);
}

/// R25: each site has its own admin credentials. Reads are open; a change
/// is accepted from the site's own token, or from its host's loopback by
/// the site's user or root, and from nothing else: not another local user
/// without the token, not another site's token. A refusal changes nothing,
/// names what is needed, is logged and counted.
#[test]
fn each_site_has_its_own_admin_credentials() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir_in(common::test_root()).unwrap();
    let dir = tmp.path().join("dep");
    let port = free_port_block();
    let mut u = up(&dir, port, &["--volume", "vol0=64MiB"]);
    let d = dir.to_str().unwrap();
    let (api_a, api_b) = (format!("http://127.0.0.1:{}", port + 10), format!("http://127.0.0.1:{}", port + 11));
    let (tok_a, tok_b) = (dir.join("a/admin.token"), dir.join("b/admin.token"));
    for t in [&tok_a, &tok_b] {
        assert_eq!(std::fs::metadata(t).unwrap().permissions().mode() & 0o777, 0o600, "{}", t.display());
    }
    let (secret_a, secret_b) = (std::fs::read_to_string(&tok_a).unwrap(), std::fs::read_to_string(&tok_b).unwrap());
    assert_ne!(secret_a, secret_b, "each site has its own token");

    // The site's user (root here) on its host needs no token: the
    // contract's CLI works as it is.
    let o = tidemark(&["--dir", d, "volume", "create", "mine", "--size", "1M"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // Another local user: reads yes, changes no (curl, run as nobody).
    let as_nobody = |args: &[&str]| {
        let mut all = vec!["--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "curl", "-s", "-w", "\n%{http_code}"];
        all.extend_from_slice(args);
        let out = String::from_utf8_lossy(&cmd("setpriv", &all).stdout).into_owned();
        let (body, code) = out.rsplit_once('\n').unwrap_or_default();
        (code.to_string(), body.to_string())
    };
    let (code, _) = as_nobody(&[&format!("{api_a}/status")]);
    assert_eq!(code, "200");
    let create = |name: &str| format!("{{\"name\":\"{name}\",\"size\":\"1MiB\"}}");
    let (code, body) = as_nobody(&["-X", "POST", "-H", "Content-Type: application/json", "-d", &create("refused"), &format!("{api_a}/volumes")]);
    assert_eq!(code, "401", "{body}");
    assert!(body.contains("local user 65534") && body.contains(tok_a.to_str().unwrap()), "names who was refused and where the token is: {body}");
    // Nor by sending a change and closing at once (the kernel shows a
    // socket no process holds any more as root's).
    let o = tidemark(&["--dir", d, "volume", "create", "victim", "--size", "1M"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let hit_and_run = format!(
        "import socket\ns = socket.create_connection(('127.0.0.1', {}))\ns.sendall(b'DELETE /volumes/victim HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\nGET /status HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\n\\r\\n')\ns.close()\n",
        port + 10
    );
    // Site a is paused meanwhile, so it reads the request only once the
    // client's socket is closed (what a busy site does by itself, some
    // of the time).
    let pid_a = u.ready["sites"]["a"]["pid"].as_u64().unwrap() as i32;
    for _ in 0..5 {
        unsafe { libc::kill(pid_a, libc::SIGSTOP) };
        let o = cmd("setpriv", &["--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "/usr/bin/python3", "-c", &hit_and_run]);
        std::thread::sleep(Duration::from_millis(100));
        unsafe { libc::kill(pid_a, libc::SIGCONT) };
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    std::thread::sleep(Duration::from_millis(500));
    // A web page cannot either: requests from browsers carry an Origin.
    // (As root, who is otherwise let in.)
    for header in ["Origin: http://evil.example", "Sec-Fetch-Site: cross-site", "Host: evil.example"] {
        let o = cmd_ok("curl", &["-s", "-X", "DELETE", "-H", header, "-w", "%{http_code}", &format!("{api_a}/volumes/victim")]);
        assert!(String::from_utf8_lossy(&o.stdout).ends_with("401"), "{header}: {}", String::from_utf8_lossy(&o.stdout));
    }
    let o = tidemark(&["--dir", d, "--json", "volume", "list"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"victim\""), "a refused client deleted a volume: {}", String::from_utf8_lossy(&o.stdout));
    // With site a's token, the same user may.
    let bearer_a = format!("Authorization: Bearer {}", secret_a.trim());
    let (code, body) = as_nobody(&["-X", "POST", "-H", "Content-Type: application/json", "-H", &bearer_a, "-d", &create("granted"), &format!("{api_a}/volumes")]);
    assert_eq!(code, "200", "{body}");
    // A's token is not B's: refused at B even from root, before anything
    // is looked at; B's own token gets through to the operation.
    let o = tidemark(&["--dir", d, "--site", "b", "--token-file", tok_a.to_str().unwrap(), "snapshot", "delete", "vol0", "nosuch"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("not site b's") && err.trim().lines().count() == 1, "{err}");
    let o = tidemark(&["--api", &api_b, "--token-file", tok_b.to_str().unwrap(), "snapshot", "delete", "vol0", "nosuch"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("does not exist"), "{}", String::from_utf8_lossy(&o.stderr));
    let (code, body) = as_nobody(&["-X", "DELETE", "-H", &format!("Authorization: Bearer {}", secret_a.trim()), &format!("{api_b}/snapshots/vol0/nosuch")]);
    assert_eq!(code, "401", "{body}");
    // A token file that is not one is a clear error, before any request.
    std::fs::write(tmp.path().join("bad.token"), "not a token\n").unwrap();
    let o = tidemark(&["--dir", d, "--token-file", tmp.path().join("bad.token").to_str().unwrap(), "volume", "create", "x", "--size", "1M"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("bad.token"), "{}", String::from_utf8_lossy(&o.stderr));

    // What the refusals changed: nothing.
    let o = tidemark(&["--dir", d, "--json", "volume", "list"]);
    let names: Vec<String> = serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap().as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap().to_string()).collect();
    assert!(names.contains(&"mine".to_string()) && names.contains(&"granted".to_string()) && !names.contains(&"refused".to_string()), "{names:?}");
    // Counted and logged (up echoes the sites' warnings).
    let m = String::from_utf8(cmd_ok("curl", &["-sf", &format!("{api_a}/metrics")]).stdout).unwrap();
    let refused: u64 = m.lines().find_map(|l| l.strip_prefix("tidemark_admin_refused_total ")).unwrap().parse().unwrap();
    assert_eq!(refused, 1 + 5 + 3, "{m}");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut errs = Vec::new();
    while !errs.iter().any(|l: &String| l.contains("admin API: refused POST /volumes")) {
        assert!(Instant::now() < deadline, "refusal not logged: {errs:?}");
        if let Ok(l) = u.errs.recv_timeout(Duration::from_millis(200)) {
            errs.push(l);
        }
    }
    sigterm_and_wait(&mut u);
}

/// The admin API is bounded like the other listeners: a client holding
/// every connection it may have, idle, does not keep the operator out: a
/// new connection displaces the longest idle one (site::apiconn's unit
/// tests time the idle close and the refusal when all are busy).
#[test]
fn the_admin_api_bounds_its_connections() {
    use std::io::{Read, Write};
    let site = common::Site::start(&[("vol0", "16MiB")]);
    let addr = format!("127.0.0.1:{}", site.api_port);
    let mut held: Vec<std::net::TcpStream> = (0..tidemark::limits::API_CONNECTIONS_MAX).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let o = cmd("curl", &["-sf", "-m", "5", &format!("http://{addr}/status")]);
    assert!(o.status.success(), "the operator was kept out: {}", String::from_utf8_lossy(&o.stderr));
    // One held (one of the longest idle) was closed to make room, and
    // only one.
    let mut b = [0u8; 16];
    let closed: Vec<usize> = (0..held.len())
        .filter(|&i| {
            held[i].set_read_timeout(Some(Duration::from_millis(20))).unwrap();
            let n = held[i].read(&mut b);
            matches!(n, Ok(0)) || n.is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset)
        })
        .collect();
    assert_eq!(closed.len(), 1, "{closed:?}");
    // The others are still there (a request on one is answered).
    let last = &mut held[(closed[0] + 1) % tidemark::limits::API_CONNECTIONS_MAX];
    last.write_all(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    last.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut answer = String::new();
    let _ = last.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(site.log().contains("closed one idle"), "{}", site.log());
}
