//! Replication modes (R2): sync with `sync_loss = refuse` fails writes while
//! the DR site is gone and resumes after; sync with the default async
//! fallback keeps writing and says so in status; periodic ships in batches;
//! lag_seconds and lag_bytes count writes not shipped yet;
//! lz4 on a link carries the same data in fewer bytes; the replication
//! threads on both sites run at lower priority outside sync mode.

mod common;

use std::time::{Duration, Instant};

use common::{cmd, cmd_ok, tidemark, wait_until, Deployment};

fn qemu_write(uri: &str, pattern: u8, off: &str) -> (bool, String) {
    qemu_write_len(uri, pattern, off, "64k")
}

fn qemu_write_len(uri: &str, pattern: u8, off: &str, len: &str) -> (bool, String) {
    let o = cmd("qemu-io", &["-f", "raw", "-c", &format!("write -P {pattern} {off} {len}"), uri]);
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    (o.status.success() && !out.contains("failed"), out)
}

#[test]
fn sync_refuse_fails_writes_without_the_dr_and_resumes() {
    let mut d = Deployment::init(&["a", "b"], &[("vol0", "16MiB")], "sync");
    d.sites[0].edit_config(|c| c.replace("sync_loss = \"async\"", "sync_loss = \"refuse\""));
    d.start_all();
    let uri = d.sites[0].uri("vol0");
    wait_until(20, "replicating", || d.sites[0].status()["groups"][0]["replicas"][0]["state"] == "replicating");
    let (ok, out) = qemu_write(&uri, 1, "0");
    assert!(ok, "{out}");
    d.sites[1].kill9();
    wait_until(10, "DR seen as lost", || d.sites[0].status()["groups"][0]["replicas"][0]["state"] == "disconnected");
    let (ok, out) = qemu_write(&uri, 2, "64k");
    assert!(!ok, "a sync write was acknowledged with the DR site gone: {out}");
    d.sites[1].spawn();
    wait_until(20, "replicating again", || d.sites[0].status()["groups"][0]["replicas"][0]["state"] == "replicating");
    let (ok, out) = qemu_write(&uri, 3, "128k");
    assert!(ok, "{out}");
    let s = d.sites[0].status();
    assert_eq!(s["groups"][0]["replicas"][0]["lag_writes"], 0, "{s}");
}

#[test]
fn sync_async_fallback_keeps_writing_and_reports_it() {
    let mut d = Deployment::init(&["a", "b"], &[("vol0", "16MiB")], "sync");
    d.start_all();
    let uri = d.sites[0].uri("vol0");
    wait_until(20, "replicating", || d.sites[0].status()["groups"][0]["replicas"][0]["state"] == "replicating");
    d.sites[1].kill9();
    wait_until(10, "DR seen as lost", || d.sites[0].status()["groups"][0]["replicas"][0]["state"] == "disconnected");
    let (ok, out) = qemu_write(&uri, 4, "0");
    assert!(ok, "async fallback must keep accepting writes: {out}");
    let s = d.sites[0].status();
    assert!(s["groups"][0]["degraded"].is_string(), "status must say the group fell back to async: {s}");
    assert!(d.sites[0].log().contains("sync-degraded"), "no event for the fallback");
    d.sites[1].spawn();
    wait_until(20, "caught up", || {
        let s = d.sites[0].status();
        s["groups"][0]["replicas"][0]["lag_writes"] == 0 && s["groups"][0]["degraded"].is_null()
    });
}

#[test]
fn periodic_mode_ships_in_batches() {
    let mut d = Deployment::init(&["a", "b"], &[("vol0", "16MiB")], "periodic");
    d.sites[0].edit_config(|c| c.replace("periodic_interval_s = 10", "periodic_interval_s = 2"));
    d.start_all();
    let uri = d.sites[0].uri("vol0");
    wait_until(20, "connected", || d.sites[0].status()["groups"][0]["replicas"][0]["state"] != "disconnected");
    // Let the first period pass, then write: the DR must not have it at once.
    std::thread::sleep(Duration::from_millis(2200));
    let (ok, out) = qemu_write(&uri, 5, "0");
    assert!(ok, "{out}");
    let t = Instant::now();
    let lag = d.sites[0].status()["groups"][0]["replicas"][0]["lag_writes"].as_u64().unwrap();
    assert!(lag > 0, "periodic mode shipped immediately");
    wait_until(10, "the next period", || d.sites[0].status()["groups"][0]["replicas"][0]["lag_writes"] == 0);
    eprintln!("shipped after {:?}", t.elapsed());
    assert!(t.elapsed() <= Duration::from_secs(5));
}

/// `lag_seconds` is the age of the oldest write the DR lacks and
/// `lag_bytes` the log from it on, whether or not the sender has shipped
/// it: between two periodic shipments, and with the DR site down. (Both
/// used to count only what the sender had read, and read 0 in both cases
/// once the last shipment was acknowledged.)
#[test]
fn lag_counts_writes_not_shipped_yet() {
    let mut d = Deployment::init(&["a", "b"], &[("vol0", "16MiB")], "periodic");
    d.sites[0].edit_config(|c| c.replace("periodic_interval_s = 10", "periodic_interval_s = 3"));
    d.start_all();
    let uri = d.sites[0].uri("vol0");
    let replica = |d: &Deployment| d.sites[0].status()["groups"][0]["replicas"][0].clone();
    wait_until(20, "connected", || replica(&d)["state"] != "disconnected");
    // A first write shipped marks the start of a period. (Each write here
    // has its own size, so a figure left over from the one before shows.)
    let (ok, out) = qemu_write(&uri, 4, "0");
    assert!(ok, "{out}");
    wait_until(10, "the first write shipped", || replica(&d)["lag_writes"] == 0);
    // Write, then watch the lag until the next period ships it: every
    // sample with the write pending is at least as old as the write.
    let before = Instant::now();
    let (ok, out) = qemu_write_len(&uri, 5, "0", "512k");
    assert!(ok, "{out}");
    let written = Instant::now();
    let mut pending_samples = 0;
    loop {
        let t_min = written.elapsed().as_secs_f64();
        // The metric first: if the status after it still has the write
        // pending, so did the metric.
        let secs = d.sites[0].metric("tidemark_replication_lag_seconds{");
        let r = replica(&d);
        // Read after the status answered: the lag it holds was computed
        // before now, however long the two requests took.
        let t_max = before.elapsed().as_secs_f64();
        if r["lag_writes"] == 0 {
            break;
        }
        pending_samples += 1;
        let lag = r["lag_seconds"].as_f64().unwrap();
        assert!(lag >= t_min - 0.01 && lag <= t_max + 1.0, "lag_seconds {lag} for a write made {t_min:.3}..{t_max:.3} s ago");
        let bytes = r["lag_bytes"].as_u64().unwrap();
        assert!((512 << 10..576 << 10).contains(&bytes), "lag_bytes {bytes} with one 512 KiB write pending");
        assert!(secs >= t_min - 0.2, "metric lag_seconds {secs} for a write made {t_min:.3} s ago");
        assert!(before.elapsed() < Duration::from_secs(10), "not shipped within 10 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(pending_samples >= 3, "the write was shipped before the lag could be seen ({pending_samples} samples)");
    // The DR site down: the lag of a new write grows while it is away.
    d.sites[1].stop();
    wait_until(20, "disconnected", || replica(&d)["state"] == "disconnected");
    let before = Instant::now();
    let (ok, out) = qemu_write_len(&uri, 6, "1m", "2m");
    assert!(ok, "{out}");
    let written = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let r = replica(&d);
    assert_eq!(r["lag_writes"], 1, "{r}");
    let lag = r["lag_seconds"].as_f64().unwrap();
    assert!((1.5..5.0).contains(&lag), "lag_seconds {lag} with the DR site away 1.5 s after the write");
    let bytes = r["lag_bytes"].as_u64().unwrap();
    assert!((2 << 20..(2 << 20) + (64 << 10)).contains(&bytes), "lag_bytes {bytes} with one 2 MiB write and the DR site away");
    let metric = d.sites[0].metric("tidemark_replication_lag_bytes{");
    assert_eq!(metric, bytes as f64, "metrics and status agree");
    // The primary restarts with the DR site still away: the DR's lag still
    // counts from that write (its place was saved with the pins), not from
    // the group's first record, seconds older.
    d.sites[0].stop();
    d.sites[0].spawn();
    let r = replica(&d);
    assert_eq!(r["state"], "disconnected", "{r}");
    assert_eq!(r["lag_writes"], 1, "after a restart: {r}");
    let lag = r["lag_seconds"].as_f64().unwrap();
    let (t_min, t_max) = (written.elapsed().as_secs_f64(), before.elapsed().as_secs_f64());
    assert!(lag >= t_min - 0.01 && lag <= t_max + 1.0, "after a restart, lag_seconds {lag} for a write made {t_min:.3}..{t_max:.3} s ago");
    let bytes = r["lag_bytes"].as_u64().unwrap();
    assert!((2 << 20..(2 << 20) + (64 << 10)).contains(&bytes), "after a restart, lag_bytes {bytes} with one 2 MiB write pending");
}

#[test]
fn lz4_link_carries_the_same_data_in_fewer_bytes() {
    let mut d = Deployment::init(&["a", "b"], &[("vol0", "64MiB")], "async");
    d.sites[0].edit_config(|c| c.replace("lz4 = false", "lz4 = true"));
    d.start_all();
    let uri = d.sites[0].uri("vol0");
    cmd_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x33 0 32M", &uri]);
    wait_until(20, "caught up", || d.sites[0].status()["groups"][0]["replicas"][0]["lag_writes"] == 0);
    let r = &d.sites[0].status()["groups"][0]["replicas"][0];
    let (sent, data) = (r["link_sent_bytes"].as_u64().unwrap(), r["link_data_bytes"].as_u64().unwrap());
    assert!(data >= 32 << 20, "{r}");
    assert!(sent < data / 10, "lz4 sent {sent} bytes for {data} bytes of a constant pattern");
    let a = common::sha256_of(&cmd_ok("nbdcopy", &[&uri, "-"]).stdout);
    let b = common::sha256_of(&cmd_ok("nbdcopy", &[&d.sites[1].uri("vol0"), "-"]).stdout);
    assert_eq!(a, b);
}

/// Nice values of the threads of process `pid` whose name starts with
/// `prefix` (as `/proc` shows them).
fn nices(pid: u32, prefix: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with(prefix) {
            continue;
        }
        if let Some(n) = nice_in_stat(&t.path().join("stat")) {
            out.push(n);
        }
    }
    out
}

/// The nice value in a `/proc/.../stat` file: field 19, counted after the
/// ")" that ends the thread name. None if the task is gone.
fn nice_in_stat(path: &std::path::Path) -> Option<i32> {
    let stat = std::fs::read_to_string(path).ok()?;
    stat.rfind(')').and_then(|i| stat[i + 2..].split(' ').nth(16)).and_then(|n| n.parse().ok())
}

/// Outside sync mode the primary's sender and the DR site's receiver run
/// at nice 10 (`sender_nice`, `receiver_nice`); `group set --mode sync`
/// brings both back to the site's own value, the DR's by a MODE frame
/// before the next records, and `--mode async` lowers them again. The DR's
/// status shows the mode it was told and its receiver's nice value.
#[test]
fn replication_threads_follow_the_mode_on_both_sites() {
    let mut d = Deployment::init(&["a", "b"], &[("vol0", "16MiB")], "async");
    d.start_all();
    let uri = d.sites[0].uri("vol0");
    let api = d.sites[0].api();
    wait_until(20, "replicating", || d.sites[0].status()["groups"][0]["replicas"][0]["state"] == "replicating");
    let (pa, pb) = (d.sites[0].pid(), d.sites[1].pid());
    // The sites' own value: what their main threads run at.
    let main_nice = |pid: u32| nice_in_stat(std::path::Path::new(&format!("/proc/{pid}/task/{pid}/stat"))).expect("the site runs");
    let base = main_nice(pb);
    assert_eq!(main_nice(pa), base);
    let low = base.max(10);
    let check = |mode: &str, want: i32, d: &Deployment| {
        wait_until(10, &format!("{mode}: both replication threads at nice {want}"), || {
            let (send, recv) = (nices(pa, "send-"), nices(pb, "recv-"));
            let s = d.sites[1].status();
            let p = &s["groups"][0]["primary"];
            send == [want] && recv == [want] && p["mode"] == mode && p["receiver_nice"] == want
        });
    };
    check("async", low, &d);
    for (i, (mode, want)) in [("sync", base), ("async", low), ("periodic", low), ("sync", base)].into_iter().enumerate() {
        let o = tidemark(&["--api", &api, "group", "set", "cg0", "--mode", mode]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        // A write wakes the sender, which says the new mode first.
        let (ok, out) = qemu_write(&uri, i as u8 + 1, &format!("{}k", i * 64));
        assert!(ok, "{out}");
        check(mode, want, &d);
    }
    // Sync writes still reach the DR before they are acknowledged.
    let (ok, out) = qemu_write(&uri, 9, "1M");
    assert!(ok, "{out}");
    assert_eq!(d.sites[0].status()["groups"][0]["replicas"][0]["lag_writes"], 0);
}
