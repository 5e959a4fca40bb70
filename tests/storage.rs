//! Space, restart time and memory of a fully written 1 GiB volume, driven by
//! fio over NBD against the real site process.
//!
//! - Space: overwrite a 1 GiB volume three times with 4 KiB random writes;
//!   once GC has caught up, disk used <= 1.5 GiB + the fixed log reserve, and
//!   no writer waited more than 100 ms for the group lock (GC's batches).
//! - Restart: the fully written volume serves again < 2 s after the process
//!   starts, after a clean stop and after SIGKILL.
//! - Memory: the site serving it stays under 128 MiB RSS.

mod common;

use std::time::{Duration, Instant};

use common::{cmd_ok, disk_usage, Site};

const GIB: u64 = 1 << 30;
use tidemark::limits::LOG_RESERVE_BYTES;

fn fio(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["--output-format=json"];
    a.extend_from_slice(args);
    let o = cmd_ok("fio", &a);
    // fio may print engine notes before the JSON document.
    let text = String::from_utf8_lossy(&o.stdout);
    let start = text.find("\n{").map(|i| i + 1).unwrap_or(0);
    serde_json::from_str(&text[start..]).unwrap_or_else(|e| panic!("fio json: {e}: {text}"))
}

/// Time from spawn until a read of the volume's last block succeeds.
fn time_to_serve(site: &mut Site) -> Duration {
    let t = Instant::now();
    site.spawn();
    let mut c = common::nbd_client::Client::connect(&site.addr(), "vol0").unwrap();
    c.read(GIB - 4096, 4096).unwrap();
    t.elapsed()
}

#[test]
fn full_volume_space_restart_memory() {
    let mut site = Site::start(&[("vol0", "1GiB")]);
    let uri = site.uri("vol0");
    let j = fio(&[
        "--name=overwrite3x",
        "--ioengine=nbd",
        &format!("--uri={uri}"),
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=1g",
        "--loops=3",
        "--randrepeat=0",
    ]);
    let job = &j["jobs"][0];
    assert_eq!(job["error"], 0, "fio error: {job}");
    let written = job["write"]["io_bytes"].as_u64().unwrap();
    assert!(written >= 3 * GIB, "fio wrote only {written} bytes");
    let max_lat_ms = job["write"]["clat_ns"]["max"].as_f64().unwrap() / 1e6;
    eprintln!("fio: {written} bytes, max write latency {max_lat_ms:.1} ms");

    // GC catches up.
    let limit = GIB * 3 / 2 + LOG_RESERVE_BYTES;
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut used;
    loop {
        used = disk_usage(&site.dir.join("groups"));
        if used <= limit {
            break;
        }
        assert!(Instant::now() < deadline, "GC did not catch up: {used} bytes on disk > {limit}");
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!("disk used after GC: {:.3} GiB (limit {:.3} GiB)", used as f64 / GIB as f64, limit as f64 / GIB as f64);
    let relocated = site.metric("tidemark_gc_relocated_bytes_total{group=\"cg0\"}");
    let freed = site.metric("tidemark_gc_segments_freed_total{group=\"cg0\"}");
    assert!(freed > 0.0, "GC freed no segment");
    eprintln!("GC relocated {relocated} bytes, freed {freed} segments");
    let stall = site.metric("tidemark_group_lock_wait_max_seconds{group=\"cg0\"}");
    assert!(stall <= 0.1, "a write waited {stall} s for the group lock (GC must not stall writes > 100 ms)");

    // Memory while serving the fully written volume.
    let mut c = common::nbd_client::Client::connect(&site.addr(), "vol0").unwrap();
    for i in 0..64u64 {
        c.read(i * (16 << 20), 16 << 20).unwrap();
    }
    let rss = site.rss_bytes();
    eprintln!("RSS serving a full 1 GiB volume: {} MiB", rss >> 20);
    assert!(rss < 128 << 20, "RSS {} MiB >= 128 MiB", rss >> 20);

    // Restart after a clean stop.
    site.stop();
    let t = time_to_serve(&mut site);
    eprintln!("serving again {t:?} after a clean restart");
    assert!(t < Duration::from_secs(2), "restart took {t:?}");
    let rss = site.rss_bytes();
    assert!(rss < 128 << 20, "RSS after restart {} MiB >= 128 MiB", rss >> 20);

    // Restart after SIGKILL in the middle of writes (replay of the log tail).
    fio(&["--name=tail", "--ioengine=nbd", &format!("--uri={uri}"), "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=1g", "--io_size=96m"]);
    site.kill9();
    let t = time_to_serve(&mut site);
    eprintln!("serving again {t:?} after SIGKILL");
    assert!(t < Duration::from_secs(2), "restart after SIGKILL took {t:?}");
    assert!(!site.log().contains("panicked"));
}

/// A client that sends reads and never reads the replies holds at most the
/// per-connection in-flight budget (128 MiB) of the site's memory: a reply
/// counts against it until it is written to the socket. Before, a reply
/// gave its budget back once queued: 300 reads of 8 MiB held over 1 GiB.
#[test]
fn replies_a_client_does_not_read_are_bounded() {
    let site = Site::start(&[("vol0", "64MiB")]);
    let mut c = common::nbd_client::Client::connect(&site.addr(), "vol0").unwrap();
    c.read(0, 4096).unwrap();
    let before = site.rss_bytes();
    let mut s = c.s.try_clone().unwrap();
    // The writes block once the site stops taking requests: on a thread,
    // left behind when the test ends.
    std::thread::spawn(move || {
        use std::io::Write;
        for i in 0..300u64 {
            let mut b = Vec::with_capacity(28);
            b.extend_from_slice(&0x25609513u32.to_be_bytes());
            b.extend_from_slice(&0u16.to_be_bytes()); // flags
            b.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
            b.extend_from_slice(&(1000 + i).to_be_bytes());
            b.extend_from_slice(&((i % 8) * (8 << 20)).to_be_bytes());
            b.extend_from_slice(&(8u32 << 20).to_be_bytes());
            if s.write_all(&b).is_err() {
                return;
            }
        }
    });
    // Let the site take what it will.
    let mut peak = 0;
    for _ in 0..30 {
        std::thread::sleep(Duration::from_millis(100));
        peak = peak.max(site.rss_bytes());
    }
    let grew = peak.saturating_sub(before);
    eprintln!("RSS grew by {} MiB with replies unread", grew >> 20);
    assert!(grew < 400 << 20, "unread replies held {} MiB", grew >> 20);
    drop(c);
}

/// A connection that never chooses an export is closed once the handshake
/// time (10 s) is up, and a served one has TCP keepalive on: neither a
/// probe nor a client gone without a FIN (a crashed hypervisor host) holds
/// one of the 256 connection slots for good. Before, both did.
#[test]
fn idle_handshakes_are_closed_and_served_clients_kept_alive() {
    use std::io::Read;
    let site = Site::start(&[("vol0", "16MiB")]);
    let t = Instant::now();
    let mut idle = std::net::TcpStream::connect(site.addr()).unwrap();
    let c = common::nbd_client::Client::connect(&site.addr(), "vol0").unwrap();
    let port = c.s.local_addr().unwrap().port();
    // `ss` shows the timer that runs: keepalive once nothing is in flight.
    let mut ss = String::new();
    for _ in 0..40 {
        ss = String::from_utf8_lossy(&cmd_ok("ss", &["-tnoH", "state", "established", &format!("( dport = :{port} )")]).stdout).into_owned();
        if ss.contains("keepalive") {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(ss.contains("keepalive"), "no keepalive on the site's side of a served connection: {ss}");
    idle.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut greeting = [0u8; 18];
    idle.read_exact(&mut greeting).unwrap();
    let mut more = [0u8; 1];
    let n = idle.read(&mut more).expect("closed, not timed out");
    assert_eq!(n, 0, "the site said more to a silent client");
    let after = t.elapsed();
    assert!(after >= Duration::from_secs(9) && after < Duration::from_secs(16), "closed after {after:?}");
    // Logged as the connection task ends, just after the socket closes.
    common::wait_until(5, "the closed handshake to be logged", || site.log().contains("no export chosen within 10000 ms"));
}

/// A disk that stops answering (an ext4 frozen with `fsfreeze`) under a
/// primary with a write in flight: the write waits, and is acknowledged once
/// the disk answers again, with nothing lost; meanwhile status and
/// `/metrics` keep answering and say what is stalled (the API has its own
/// runtime, and reads no group whose lock a stuck writer holds), the site
/// logs the stall at WARN after `STORAGE_STALL_MS`, and then its end.
#[test]
fn a_stalled_disk_is_reported_while_the_write_waits() {
    const MIB: u64 = 1 << 20;
    let tmp = tempfile::Builder::new().prefix("tidemark-stall").tempdir_in(common::test_root()).unwrap();
    let mut disk = common::FrozenDisk::mount(tmp.path());
    let mnt = disk.mnt.clone();
    // The data on the disk that will stall; config and log beside it (a
    // log on the stalled disk would stall the messages about it).
    let sdir = tmp.path().join("site");
    std::fs::create_dir(&sdir).unwrap();
    let mut site = Site::configure(&sdir, &[("vol0", "64M")]);
    let cfg = std::fs::read_to_string(&site.config).unwrap().replace("data_dir = \".\"", &format!("data_dir = \"{}\"", mnt.join("data").display()));
    std::fs::write(&site.config, cfg).unwrap();
    site.spawn();
    let uri = site.uri("vol0");
    let addr = site.addr();
    let api = site.api();
    disk.site = Some(site);
    let log = || std::fs::read_to_string(sdir.join("site.log")).unwrap_or_default();
    let status = || -> serde_json::Value {
        // Within the API's own limit (4 s) plus a margin: it must answer.
        let o = cmd_ok("curl", &["-sf", "-m", "6", &format!("{api}/status")]);
        serde_json::from_slice(&o.stdout).unwrap()
    };
    cmd_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 1M", &uri]);
    let st = status();
    assert!(st["groups"][0]["storage_stall"].is_null(), "{st}");
    assert_eq!(st["groups"][0]["last_seq"], 2, "the volume's creation and the write: {st}");

    // More writers (each its own connection, opened before the freeze) than
    // the site has runtime workers: one waits in the stalled append, holding
    // its worker, the rest for the group's lock on the blocking pool.
    let writers = std::thread::available_parallelism().map_or(2, |n| n.get()) + 2;
    let clients: Vec<_> = (0..writers).map(|_| common::nbd_client::Client::connect(&addr, "vol0").unwrap()).collect();
    cmd_ok("fsfreeze", &["--freeze", mnt.to_str().unwrap()]);
    let frozen_at = Instant::now();
    let writer: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| std::thread::spawn(move || c.write(i as u64 * MIB, &vec![0x22 + i as u8; MIB as usize], false)))
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(writer.iter().all(|w| !w.is_finished()), "no write can complete on a frozen disk");

    // A request that needs the group itself waits (on the API's blocking
    // pool), and holds up no other request.
    let volumes = std::process::Command::new("curl")
        .args(["-sf", "-m", "60", &format!("{api}/volumes")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Status answers, from the group's last complete entry, and names the stall.
    let t = Instant::now();
    let st = status();
    let asked = t.elapsed();
    let g = &st["groups"][0];
    // A group's lock is waited for 1 s (STATUS_GROUP_WAIT_MS), not until
    // the whole request's limit (4 s) runs out.
    assert!(asked < Duration::from_secs(3), "status took {asked:?}");
    assert_eq!(g["stale"], true, "{st}");
    assert_eq!(g["volumes"][0]["name"], "vol0", "the last complete entry: {st}");
    assert!(g["unavailable"].as_str().unwrap().contains("log append in progress"), "{st}");
    assert_eq!(g["storage_stall"]["operation"], "log append", "{st}");
    assert!(g["storage_stall"]["seconds"].as_f64().unwrap() >= 1.0, "{st}");
    assert_eq!(g["storage_stall"]["stalled"], false, "not yet {} ms: {st}", tidemark::limits::STORAGE_STALL_MS);
    // The CLI says it too.
    let o = common::tidemark(&["--api", &api, "status"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success() && text.contains("storage slow: log append in progress"), "{text}");
    // Metrics answer with what needs no lock.
    let m = String::from_utf8(cmd_ok("curl", &["-sf", "-m", "6", &format!("{api}/metrics")]).stdout).unwrap();
    assert!(m.contains("tidemark_group_answering{group=\"cg0\"} 0"), "{m}");
    let pending: f64 = m.lines().find_map(|l| l.strip_prefix("tidemark_storage_pending_seconds{group=\"cg0\"} ")).unwrap().parse().unwrap();
    assert!(pending >= 1.0, "{m}");
    assert!(!m.contains("tidemark_log_bytes{group=\"cg0\"}"), "no lock-taking metric of a group that does not answer: {m}");

    // Past STORAGE_STALL_MS: a WARN line, and status says stalled.
    common::wait_until(20, "the stall is logged", || log().contains("has not returned for"));
    assert!(frozen_at.elapsed() >= Duration::from_millis(tidemark::limits::STORAGE_STALL_MS));
    let st = status();
    assert_eq!(st["groups"][0]["storage_stall"]["stalled"], true, "{st}");
    assert!(log().lines().any(|l| l.contains("WARN") && l.contains("a log append in") && l.contains("its storage is stalled")), "{}", log());
    assert!(writer.iter().all(|w| !w.is_finished()), "still waiting");

    // The disk answers again: the write completes, and the stall's end is logged.
    cmd_ok("fsfreeze", &["--unfreeze", mnt.to_str().unwrap()]);
    for w in writer {
        w.join().unwrap().expect("the write is acknowledged once the disk answers");
    }
    common::wait_until(10, "the stall's end is logged", || log().contains("has returned; storage answers again"));
    let out = volumes.wait_with_output().unwrap();
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"vol0\""), "GET /volumes after the thaw: {out:?}");
    let st = status();
    let g = &st["groups"][0];
    assert!(g["storage_stall"].is_null() && g.get("stale").is_none() && g.get("unavailable").is_none(), "{st}");
    assert_eq!(g["last_seq"], 2 + writers as u64, "{st}");
    let read_back = || {
        for i in 0..writers {
            cmd_ok("qemu-io", &["-f", "raw", "-r", "-c", &format!("read -P {} {}M 1M", 0x22 + i, i), &uri]);
        }
    };
    read_back();
    // A clean stop makes them durable; they read back after a restart.
    disk.site.as_mut().unwrap().stop();
    disk.site.as_mut().unwrap().spawn();
    read_back();
}

/// A site in `sdir`, started, with vol0 (64 MiB) in group cg0 beside it
/// and vol1 (64 MiB) in group cg1, whose directory is a symlink to
/// `mnt/cg1`: a group on a disk of its own.
fn site_with_cg1_on(mnt: &std::path::Path, sdir: &std::path::Path) -> Site {
    site_with_groups_on(mnt, sdir, 1)
}

/// A site with vol0 in cg0 on the test root, and vol1..=volN in groups
/// cg1..=cgN (64 MiB each), whose directories are on `mnt`.
fn site_with_groups_on(mnt: &std::path::Path, sdir: &std::path::Path, n: usize) -> Site {
    std::fs::create_dir_all(sdir.join("groups")).unwrap();
    let mut site = Site::configure(sdir, &[("vol0", "64M")]);
    let mut cfg = std::fs::read_to_string(&site.config).unwrap();
    for i in 1..=n {
        std::fs::create_dir(mnt.join(format!("cg{i}"))).unwrap();
        std::os::unix::fs::symlink(mnt.join(format!("cg{i}")), sdir.join(format!("groups/cg{i}"))).unwrap();
        cfg += &format!("[[volume]]\nname = \"vol{i}\"\nsize = \"64M\"\ngroup = \"cg{i}\"\n");
    }
    std::fs::write(&site.config, cfg).unwrap();
    site.spawn();
    site
}

/// Runs `args` within 20 s, so that a site that stops answering fails the
/// test instead of hanging it, and returns what it printed; a failure
/// shows the site's log.
fn run_within(site_log: &std::path::Path, args: &[&str]) -> String {
    let o = std::process::Command::new("timeout").arg("20").args(args).output().unwrap();
    let log = std::fs::read_to_string(site_log).unwrap_or_default();
    assert!(o.status.success(), "{args:?} (status {}): {}{}\nsite log:\n{log}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// While other groups are stalled: twice, `STORAGE_SLOW_MS` apart (before
/// and after the stall counts as slow), cg0 takes new qemu-io connections
/// to vol0, writes, flushes (with `zero`, also zeroes) and reads back, and
/// nbdinfo lists vol0..=vol`last`, each round within 10 s; `stuck` (what
/// still waits on the stalled groups) must still hold after each round.
fn cg0_answers_meanwhile(run: &dyn Fn(&[&str]) -> String, addr: &str, last: usize, zero: bool, stalled: &str, stuck: &dyn Fn() -> bool) {
    let uri0 = format!("nbd://{addr}/vol0");
    for round in 0..2u8 {
        let t = Instant::now();
        let p = 0x31 + round;
        let (write, read) = (format!("write -P {p} 0 2M"), format!("read -P {p} 0 2M"));
        let mut w = vec!["qemu-io", "-f", "raw", "-c", &write, "-c", "flush"];
        let mut r = vec!["qemu-io", "-f", "raw", "-r", "-c", &read];
        if zero {
            w.extend(["-c", "write -z 2M 1M"]);
            r.extend(["-c", "read -P 0 2M 1M"]);
        }
        w.push(&uri0);
        r.push(&uri0);
        run(&w);
        let out = run(&r);
        assert!(!out.contains("Pattern verification failed"), "{out}");
        let list = run(&["nbdinfo", "--list", &format!("nbd://{addr}")]);
        assert!((0..=last).all(|g| list.contains(&format!("vol{g}"))), "{list}");
        assert!(t.elapsed() < Duration::from_secs(10), "cg0 took {:?} to answer while {stalled}", t.elapsed());
        assert!(stuck(), "what waits on the stalled groups ({stalled}) was answered before the disk answered");
        std::thread::sleep(Duration::from_millis(tidemark::limits::STORAGE_SLOW_MS));
    }
}

/// A group on a disk of its own that stalls holds up no other group's NBD.
/// Before, its writers waited for its lock on the runtime's workers (and
/// each connection's reader took the lock to check every request's range),
/// so with as many writers as workers every export of the site stopped
/// answering, new connections included.
#[test]
fn a_stalled_group_holds_up_no_other_group() {
    const MIB: u64 = 1 << 20;
    let tmp = tempfile::Builder::new().prefix("tidemark-stall2").tempdir_in(common::test_root()).unwrap();
    let mut disk = common::FrozenDisk::mount(tmp.path());
    let mnt = disk.mnt.clone();
    let sdir = tmp.path().join("site");
    let site = site_with_cg1_on(&mnt, &sdir);
    let (addr, uri0, uri1, api) = (site.addr(), site.uri("vol0"), site.uri("vol1"), site.api());
    disk.site = Some(site);
    let site_log = sdir.join("site.log");
    let run = |args: &[&str]| run_within(&site_log, args);
    run(&["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", &uri1]);

    // Far more writers to cg1 than the site has runtime workers, and more
    // than it lets wait on the blocking pool (NBD_POOL_CALLS_PER_GROUP),
    // each on a connection of its own, opened before the freeze.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    let n = tidemark::limits::NBD_POOL_CALLS_PER_GROUP + 24;
    let clients: Vec<_> = (0..n).map(|_| common::nbd_client::Client::connect(&addr, "vol1").unwrap()).collect();
    cmd_ok("fsfreeze", &["--freeze", mnt.to_str().unwrap()]);
    let writers: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| std::thread::spawn(move || c.write(i as u64 * MIB, &vec![0x22 + i as u8; MIB as usize], false)))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(writers.iter().all(|w| !w.is_finished()), "no write to cg1 can complete on a frozen disk");
    // A reader of cg1 waits for its lock too, and holds nothing up either.
    let a = addr.clone();
    let reader = std::thread::spawn(move || common::nbd_client::Client::connect(&a, "vol1")?.read(0, MIB as u32));
    // So do a zeroing and a block status query (nbdinfo --map) of cg1.
    let later = |args: &[&str]| std::process::Command::new("timeout").arg("120").args(args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let zeroing = later(&["qemu-io", "-f", "raw", "-c", &format!("write -z {n}M 1M"), &uri1]);
    let mapping = later(&["nbdinfo", "--map", &uri1]);

    // cg0 answers meanwhile: a new connection (handshake, export list),
    // writes, a flush, reads, a zeroing; before and after the stall is
    // seen as slow (STORAGE_SLOW_MS), which sends cg1's requests straight
    // to the blocking pool.
    cg0_answers_meanwhile(&run, &addr, 1, true, "cg1 stalled", &|| writers.iter().all(|w| !w.is_finished()) && !reader.is_finished());
    let st: serde_json::Value = serde_json::from_slice(&cmd_ok("curl", &["-sf", "-m", "6", &format!("{api}/status")]).stdout).unwrap();
    let cg1 = st["groups"].as_array().unwrap().iter().find(|g| g["name"] == "cg1").unwrap();
    assert_eq!(cg1["storage_stall"]["operation"], "log append", "{st}");
    // The requests waiting on cg1 hold at most NBD_POOL_CALLS_PER_GROUP of
    // the pool's threads (tokio names workers and pool threads alike).
    let threads = threads_named(disk.site.as_ref().unwrap().pid(), "tokio-");
    assert!(threads <= workers + tidemark::limits::NBD_POOL_CALLS_PER_GROUP + 4, "{threads} runtime threads for {n} requests waiting on cg1");

    // The disk answers again: every cg1 write is acknowledged and reads back.
    cmd_ok("fsfreeze", &["--unfreeze", mnt.to_str().unwrap()]);
    for w in writers {
        w.join().unwrap().expect("the write is acknowledged once the disk answers");
    }
    assert!(reader.join().unwrap().is_ok(), "the cg1 read is answered once the disk answers");
    let z = zeroing.wait_with_output().unwrap();
    assert!(z.status.success(), "cg1 zeroing: {z:?}");
    let m = mapping.wait_with_output().unwrap();
    assert!(m.status.success() && String::from_utf8_lossy(&m.stdout).contains("data"), "cg1 map: {m:?}");
    let mut args: Vec<String> = vec!["-f".into(), "raw".into(), "-r".into(), "-c".into(), format!("read -P 0 {n}M 1M")];
    for i in 0..n {
        args.extend(["-c".into(), format!("read -P {} {i}M 1M", 0x22 + i)]);
    }
    args.push(uri1.clone());
    let mut a: Vec<&str> = vec!["qemu-io"];
    a.extend(args.iter().map(|s| s.as_str()));
    let out = run(&a);
    assert!(!out.contains("Pattern verification failed") && out.matches("read 1048576/1048576").count() == n + 1, "{out}");
    let out = run(&["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x32 0 2M", &uri0]);
    assert!(!out.contains("Pattern verification failed"), "{out}");
}

/// As many groups stalling at once as the site has runtime workers (a SAN
/// path failover stalls every LUN behind it) hold up no other group's NBD.
/// Each stalled group's first append is on a worker before the stall can
/// be seen, and a blocking `pwrite` holds its worker until the disk
/// answers: before, that took every worker, and every export of the site
/// stopped answering. Now all workers but one at most are inside an append
/// (`group::WORKER_APPENDS`); an append that would take the last one goes
/// to the blocking pool.
#[test]
fn as_many_stalled_groups_as_workers_hold_up_no_other_group() {
    const MIB: u64 = 1 << 20;
    let tmp = tempfile::Builder::new().prefix("tidemark-stalln").tempdir_in(common::test_root()).unwrap();
    let mut disk = common::FrozenDisk::mount(tmp.path());
    let mnt = disk.mnt.clone();
    let sdir = tmp.path().join("site");
    // The site's runtime has this many workers (site::run).
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).max(2);
    let site = site_with_groups_on(&mnt, &sdir, workers);
    let (addr, api) = (site.addr(), site.api());
    disk.site = Some(site);
    let site_log = sdir.join("site.log");
    let run = |args: &[&str]| run_within(&site_log, args);

    // Three writers to each stalled group, on connections opened before
    // the freeze: one in the append, the others behind its lock.
    let clients: Vec<_> = (1..=workers).flat_map(|g| (0..3u64).map(move |i| (g, i))).map(|(g, i)| (g, i, common::nbd_client::Client::connect(&addr, &format!("vol{g}")).unwrap())).collect();
    cmd_ok("fsfreeze", &["--freeze", mnt.to_str().unwrap()]);
    let writers: Vec<_> = clients
        .into_iter()
        .map(|(g, i, mut c)| (g, i, std::thread::spawn(move || c.write(i * MIB, &vec![((0x40 + 4 * g as u64 + i) % 256) as u8; MIB as usize], false))))
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(writers.iter().all(|w| !w.2.is_finished()), "no write can complete on a frozen disk");

    cg0_answers_meanwhile(&run, &addr, workers, true, &format!("{workers} groups stalled"), &|| writers.iter().all(|w| !w.2.is_finished()));
    // Some stalled group's first append found the gate full and went to
    // the pool.
    let m = String::from_utf8(cmd_ok("curl", &["-sf", "-m", "6", &format!("{api}/metrics")]).stdout).unwrap();
    let off: u64 = m.lines().filter_map(|l| l.strip_prefix("tidemark_nbd_appends_off_worker_total{group=\"cg")).filter(|l| !l.starts_with("0\"")).map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap()).sum();
    assert!(off >= 1, "no append of a stalled group was sent off the workers:\n{m}");

    // The disk answers again: every write is acknowledged and reads back.
    cmd_ok("fsfreeze", &["--unfreeze", mnt.to_str().unwrap()]);
    for (g, i, w) in writers {
        w.join().unwrap().unwrap_or_else(|e| panic!("write {i} to cg{g} not acknowledged after the thaw: {e}"));
    }
    for g in 1..=workers {
        let mut args: Vec<String> = vec!["qemu-io".into(), "-f".into(), "raw".into(), "-r".into()];
        for i in 0..3u64 {
            args.extend(["-c".into(), format!("read -P {} {i}M 1M", (0x40 + 4 * g as u64 + i) % 256)]);
        }
        args.push(format!("nbd://{addr}/vol{g}"));
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let out = run(&a);
        assert!(!out.contains("Pattern verification failed") && out.matches("read 1048576/1048576").count() == 3, "vol{g}: {out}");
    }
}

/// A group on a disk that stalls reads (a dying drive retrying a sector)
/// holds up no other group's NBD either, and shows the stalled read in
/// status. Before, an NBD read ran its `pread` on a runtime worker: two
/// readers of the stalled group held both workers of this machine, and
/// every export of the site stopped answering until the disk did. Now a
/// worker reads from the page cache only (`RWF_NOWAIT`), and a read that
/// would wait for the disk goes to the blocking pool.
#[test]
fn a_disk_that_stalls_reads_holds_up_no_other_group() {
    const MIB: u64 = 1 << 20;
    let tmp = tempfile::Builder::new().prefix("tidemark-readstall").tempdir_in(common::test_root()).unwrap();
    let mut disk = common::StallingDisk::mount(tmp.path());
    let mnt = disk.mnt.clone();
    let sdir = tmp.path().join("site");
    let site = site_with_cg1_on(&mnt, &sdir);
    let (addr, uri1, api) = (site.addr(), site.uri("vol1"), site.api());
    disk.site = Some(site);
    let site_log = sdir.join("site.log");
    let run = |args: &[&str]| run_within(&site_log, args);
    // Readers of cg1, more than the site has runtime workers, each on a
    // connection of its own and each reading a MiB of its own.
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    // (At most 40: vol1 is 64 MiB.)
    let n = (2 * workers + 2).min(40);
    let mut w = vec!["qemu-io".to_string(), "-f".into(), "raw".into()];
    for i in 0..n {
        w.extend(["-c".into(), format!("write -P {} {i}M 1M", 0x40 + i)]);
    }
    w.extend(["-c".into(), "flush".into(), uri1.clone()]);
    run(&w.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    let clients: Vec<_> = (0..n).map(|_| common::nbd_client::Client::connect(&addr, "vol1").unwrap()).collect();
    let off_worker = |api: &str| -> f64 {
        let m = String::from_utf8(cmd_ok("curl", &["-sf", "-m", "6", &format!("{api}/metrics")]).stdout).unwrap();
        m.lines().find_map(|l| l.strip_prefix("tidemark_nbd_reads_off_worker_total{group=\"cg1\"} ")).unwrap().parse().unwrap()
    };
    let before = off_worker(&api);
    disk.stall();
    let readers: Vec<_> = clients.into_iter().enumerate().map(|(i, mut c)| std::thread::spawn(move || c.read(i as u64 * MIB, MIB as u32))).collect();
    std::thread::sleep(Duration::from_millis(500));
    assert!(readers.iter().all(|r| !r.is_finished()), "no read of cg1 can complete while its disk does not answer");

    // cg0 answers meanwhile: new connections, writes, a flush, reads, the
    // export list; before and after the stalled read counts as slow.
    cg0_answers_meanwhile(&run, &addr, 1, false, "cg1's reads stalled", &|| readers.iter().all(|r| !r.is_finished()));
    // Status names the stalled read; every cg1 read went off the workers.
    let st: serde_json::Value = serde_json::from_slice(&cmd_ok("curl", &["-sf", "-m", "6", &format!("{api}/status")]).stdout).unwrap();
    let cg1 = st["groups"].as_array().unwrap().iter().find(|g| g["name"] == "cg1").unwrap();
    assert_eq!(cg1["storage_stall"]["operation"], "log read", "{st}");
    assert!(cg1["storage_stall"]["seconds"].as_f64().unwrap() >= 1.0, "{st}");
    let cg0 = st["groups"].as_array().unwrap().iter().find(|g| g["name"] == "cg0").unwrap();
    assert!(cg0["storage_stall"].is_null(), "{st}");
    assert!(off_worker(&api) - before >= n as f64, "{n} reads, {} off the workers", off_worker(&api) - before);

    // The disk answers again: every read completes with what was written.
    disk.answer();
    for (i, r) in readers.into_iter().enumerate() {
        let got = r.join().unwrap().expect("the read is answered once the disk answers");
        assert!(got.iter().all(|&b| b == 0x40 + i as u8), "read {i} came back wrong");
    }
    common::wait_until(10, "the read stall ends in status", || {
        let st: serde_json::Value = serde_json::from_slice(&cmd_ok("curl", &["-sf", "-m", "6", &format!("{api}/status")]).stdout).unwrap();
        st["groups"].as_array().unwrap().iter().all(|g| g["storage_stall"].is_null())
    });
}

/// A group's directory may be a symlink (how an operator puts one group on
/// a disk of its own): the group is made in it, and found again after a
/// restart. Before, the scan of `groups/` passed symlinks over, so after a
/// restart the group's volumes were gone from the site; and a symlink made
/// ready for a group to come would have been removed as a half-made group.
#[test]
fn a_group_directory_may_be_a_symlink() {
    let tmp = tempfile::Builder::new().prefix("tidemark-symlink").tempdir_in(common::test_root()).unwrap();
    let elsewhere = tmp.path().join("other-disk").join("cg1");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let sdir = tmp.path().join("site");
    std::fs::create_dir(&sdir).unwrap();
    let mut site = Site::configure(&sdir, &[("vol0", "16M")]);
    let cfg = std::fs::read_to_string(&site.config).unwrap() + "[[volume]]\nname = \"vol1\"\nsize = \"16M\"\ngroup = \"cg1\"\n";
    std::fs::write(&site.config, cfg).unwrap();
    std::fs::create_dir_all(sdir.join("groups")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, sdir.join("groups/cg1")).unwrap();
    site.spawn();
    cmd_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x44 0 64k", "-c", "flush", &site.uri("vol1")]);
    assert!(elsewhere.join("group.json").exists(), "cg1 was not made in the symlinked directory");
    site.stop();
    site.spawn();
    let o = cmd_ok("qemu-io", &["-f", "raw", "-r", "-c", "read -P 0x44 0 64k", &site.uri("vol1")]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed"));
    assert!(std::fs::symlink_metadata(sdir.join("groups/cg1")).unwrap().file_type().is_symlink());
    // Its disk gone (not mounted): the site does not start without it.
    site.stop();
    std::fs::rename(&elsewhere, tmp.path().join("other-disk/moved")).unwrap();
    let o = std::process::Command::new(common::bin()).args(["site", "--config", site.config.to_str().unwrap()]).output().unwrap();
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("groups/cg1") && e.contains("is its disk mounted"), "{e}");
}

/// Counts the threads of a process whose name starts with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| d.filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok()).filter(|n| n.starts_with(prefix)).count())
        .unwrap_or(0)
}

/// A DR site whose disk stalls: the primary's link times out and it
/// reconnects, and each new connection is refused with the reason (the
/// DR's storage is stalled) instead of adding a thread that waits on the
/// stalled group for as long as the stall lasts. The primary shows the
/// reason; once the disk answers, the DR catches up and matches.
#[test]
fn a_dr_site_whose_disk_stalls_refuses_new_links_with_the_reason() {
    let mut d = common::Deployment::init(&["a", "b"], &[("vol0", "64M")], "async");
    let tmp = tempfile::Builder::new().prefix("tidemark-drstall").tempdir_in(common::test_root()).unwrap();
    let mut disk = common::FrozenDisk::mount(tmp.path());
    let mnt = disk.mnt.clone();
    for s in &d.sites {
        s.edit_config(|c| c.replace("link_timeout_ms = 30000", "link_timeout_ms = 2000"));
    }
    d.sites[1].edit_config(|c| c.replace("data_dir = \".\"", &format!("data_dir = \"{}\"", mnt.join("data").display())));
    d.start_all();
    // The DR site goes with the disk, so that on any failure it is stopped
    // before the disk is unmounted.
    disk.site = Some(d.sites.remove(1));
    let dr = |disk: &common::FrozenDisk| -> (u32, String) {
        let s = disk.site.as_ref().unwrap();
        (s.pid(), s.addr())
    };
    let addr = d.sites[0].addr();
    let mut c = common::nbd_client::Client::connect(&addr, "vol0").unwrap();
    c.write(0, &vec![0x11; 1 << 20], false).unwrap();
    common::wait_until(20, "the DR site caught up", || caught_up(&d));

    cmd_ok("fsfreeze", &["--freeze", mnt.to_str().unwrap()]);
    for i in 1..8u64 {
        c.write(i << 20, &vec![0x11 + i as u8; 1 << 20], false).unwrap();
    }
    // The link times out (2 s); the reconnects are refused at once, as
    // "slow" and from 10 s on as "stalled".
    let (dr_pid, dr_addr) = dr(&disk);
    let last_error = || d.sites[0].status()["groups"][0]["replicas"][0]["last_error"].as_str().unwrap_or("").to_string();
    common::wait_until(20, "the primary names the DR's stalled storage", || {
        let e = last_error();
        e.contains("b refused") && e.contains("group cg0 does not answer (a log append has been in progress for") && e.contains("its storage is stalled")
    });
    let recv_threads = threads_named(dr_pid, "recv-");
    assert!(recv_threads <= 2, "{recv_threads} receiver threads at the DR site");
    // Said at WARN once the DR site has been out of reach for 10 s.
    common::wait_until(10, "the primary's log says why", || d.sites[0].log().lines().any(|l| l.contains("WARN") && l.contains("its storage is stalled")));
    assert!(threads_named(dr_pid, "recv-") <= 2);

    cmd_ok("fsfreeze", &["--unfreeze", mnt.to_str().unwrap()]);
    common::wait_until(30, "the DR site caught up after the stall", || caught_up(&d));
    let b = common::nbd_client::Client::connect(&dr_addr, "vol0").unwrap().read(0, 8 << 20).unwrap();
    let a = c.read(0, 8 << 20).unwrap();
    assert!(a == b, "the DR copy differs");
}

/// Each consistency group runs threads of its own (log sync, maintenance,
/// a sender per DR site), so a site creates at most
/// `GROUPS_PER_SITE_MAX`: `POST /volumes` naming ever new groups gets a
/// clear refusal past it, and the site goes on serving. Before, there was
/// no limit, and a failed thread start panicked in the request (leaving a
/// group directory half made).
#[test]
fn a_site_creates_groups_up_to_its_limit_and_refuses_more_with_the_reason() {
    let site = Site::start(&[("vol0", "1MiB")]);
    let max = tidemark::limits::GROUPS_PER_SITE_MAX;
    let create = |i: usize| tidemark::client::call(&site.api(), "POST", "/volumes", Some(&serde_json::json!({"name": format!("v{i}"), "size": "1MiB", "group": format!("g{i}")})));
    // cg0 (vol0's) is one.
    for i in 1..max {
        create(i).unwrap_or_else(|e| panic!("group {i} of {max}: {e:#}"));
    }
    let e = format!("{:#}", create(max).unwrap_err());
    assert!(e.contains(&format!("already has {max} consistency groups, the most it creates; group g{max} is not created")), "{e}");
    assert!(site.dir.join("groups").join("g1").is_dir() && !site.dir.join("groups").join(format!("g{max}")).exists(), "the refused group left a directory");
    // A volume in a group it has is still created, and the site serves.
    tidemark::client::call(&site.api(), "POST", "/volumes", Some(&serde_json::json!({"name": "more", "size": "1MiB", "group": "g1"}))).unwrap();
    let st = tidemark::client::call(&site.api(), "GET", "/status", None).unwrap();
    assert_eq!(st["groups"].as_array().unwrap().len(), max);
    let mut c = common::nbd_client::Client::connect(&site.addr(), "more").unwrap();
    c.write(0, &[7u8; 4096], false).unwrap();
    assert_eq!(c.read(0, 4096).unwrap(), vec![7u8; 4096]);
    assert!(!site.log().contains("panicked"));
}

/// A tmpfs of `size` mounted at `path`, grown with `grow`, unmounted (lazily)
/// when dropped, whatever the test did.
struct SmallDisk(std::path::PathBuf);

impl SmallDisk {
    fn mount(path: &std::path::Path, size: &str) -> SmallDisk {
        std::fs::create_dir_all(path).unwrap();
        cmd_ok("mount", &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", path.to_str().unwrap()]);
        SmallDisk(path.to_path_buf())
    }
    fn grow(&self, size: &str) {
        cmd_ok("mount", &["-o", &format!("remount,size={size}"), self.0.to_str().unwrap()]);
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = common::cmd("umount", &["-l", self.0.to_str().unwrap()]);
    }
}

/// The primary's (site 0) view of its one DR site.
fn replica(d: &common::Deployment) -> serde_json::Value {
    d.sites[0].status()["groups"][0]["replicas"][0].clone()
}

/// Its one DR site holds everything it wrote.
fn caught_up(d: &common::Deployment) -> bool {
    let r = replica(d);
    r["state"] == "replicating" && r["lag_writes"] == 0
}

/// A DR whose disk fills during a dirty-region resync (a 160 MiB tmpfs
/// under its groups, a resync of 256 MiB):
/// - it refuses its primary until there is room for the whole resync, and
///   says how much: its status and the primary's `last_error` name it, and
///   the link stays quiet meanwhile (not attempt after attempt, each
///   filling the disk again);
/// - it gives back what the failed attempt staged, and goes on showing its
///   last consistent state;
/// - once its file system is grown to that, the resync completes and the
///   copies are the same.
///
/// Before, the site took the stream again as soon as one record fit, and
/// the failed attempt's records stayed until a later attempt's commit.
#[test]
fn a_dr_that_fills_during_a_resync_asks_for_room_for_all_of_it() {
    let mut d = common::Deployment::init(&["a", "b"], &[("vol0", "512MiB")], "async");
    d.sites[0].edit_config(|c| c.replace("replication_log_cap = \"64GiB\"", "replication_log_cap = \"64MiB\""));
    let b_groups = d.sites[1].dir.join("groups");
    let b_disk = SmallDisk::mount(&b_groups, "160m");
    d.start_all();
    let (a, b) = (d.sites[0].uri("vol0"), d.sites[1].uri("vol0"));
    cmd_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x61 0 8M", "-c", "flush", &a]);
    common::wait_until(30, "b caught up", || caught_up(&d));
    d.sites[1].stop();
    cmd_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x62 8M 256M", "-c", "flush", &a]);
    common::wait_until(60, "dirty-region mode for b", || replica(&d)["dirty_tracking"] == true);
    // The primary says what the resync may take at b, before b is back.
    let estimate = replica(&d)["resync_need_bytes"].as_u64().unwrap();
    assert!((256 << 20..300 << 20).contains(&estimate), "resync_need_bytes {estimate}");
    d.sites[1].spawn();
    let needed = || d.sites[1].status()["groups"][0]["out_of_space"]["needed_bytes"].as_u64().unwrap_or(0);
    common::wait_until(60, "b out of space during the resync", || needed() >= 256 << 20);
    let oos = d.sites[1].status()["groups"][0]["out_of_space"].clone();
    assert!(oos["error"].as_str().is_some_and(|e| e.contains("the resync in progress may need up to")), "{oos}");
    // b asks for that, and the room it keeps for a checkpoint.
    assert!(needed() > estimate && needed() < estimate + (4 << 20), "b needs {}, the primary estimated {estimate}", needed());
    let mib = needed().div_ceil(1 << 20);
    common::wait_until(30, "the primary told how much", || replica(&d)["last_error"].as_str().is_some_and(|e| e.contains(&format!("once {mib} MiB are free"))));
    assert!(d.sites[1].status()["groups"][0]["failed"].is_null(), "b's group failed");
    // What the attempt staged is given back (its full segments: 64 MiB
    // at least of the ~150 staged) ...
    let held = || common::disk_usage(&b_groups);
    common::wait_until(30, "the failed attempt's space given back", || held() < 110 << 20);
    // ... and b shows what it showed before the resync began.
    let o = cmd_ok("qemu-io", &["-f", "raw", "-r", "-c", "read -P 0x61 0 8M", "-c", "read -P 0 8M 256M", &b]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed"), "b shows a state it never had");
    // Refused until there is room for the whole resync: nothing is sent.
    let sent = || replica(&d)["link_sent_bytes"].as_u64().unwrap();
    let before = sent();
    std::thread::sleep(Duration::from_secs(5));
    assert!(sent() - before < 1 << 20, "the primary sent {} bytes while b had no room for the resync", sent() - before);
    assert!(!caught_up(&d));
    b_disk.grow("640m");
    common::wait_until(120, "b caught up after its disk grew", || caught_up(&d));
    assert!(d.sites[1].status()["groups"][0]["out_of_space"].is_null());
    let sa = common::sha256_of(&cmd_ok("nbdcopy", &[&a, "-"]).stdout);
    let sb = common::sha256_of(&cmd_ok("nbdcopy", &[&b, "-"]).stdout);
    assert_eq!(sa, sb, "b differs from a");
}

/// A full disk is waited out, at the DR and at the primary, with the
/// reason shown and nothing lost:
/// - the DR's log fills (a 48 MiB tmpfs under its groups): its group does
///   not fail; it refuses the primary, saying it is out of space, until
///   the file system is grown, then catches up without a restart;
/// - the primary's log fills (160 MiB): a write fails with ENOSPC (what
///   qemu pauses a guest on), the group goes on, and the same write
///   succeeds once the file system is grown.
///
/// Before, the first full append failed the group until the site
/// restarted, at either end.
#[test]
fn a_full_disk_is_waited_out_at_the_dr_and_at_the_primary() {
    let mut d = common::Deployment::init(&["a", "b"], &[("vol0", "512MiB")], "async");
    let a_disk = SmallDisk::mount(&d.sites[0].dir.join("groups"), "160m");
    let b_disk = SmallDisk::mount(&d.sites[1].dir.join("groups"), "48m");
    d.start_all();
    let (a, b) = (d.sites[0].uri("vol0"), d.sites[1].uri("vol0"));
    cmd_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x61 0 96M", "-c", "flush", &a]);
    // The DR is out of space, says so, and refuses the primary with why.
    common::wait_until(30, "b out of space", || d.sites[1].status()["groups"][0]["out_of_space"]["error"].as_str().is_some_and(|e| e.contains("No space left on device")));
    common::wait_until(30, "the primary told why", || replica(&d)["last_error"].as_str().is_some_and(|e| e.contains("out of space")));
    assert!(d.sites[1].status()["groups"][0]["failed"].is_null(), "b's group failed");
    assert!(!caught_up(&d));
    b_disk.grow("512m");
    common::wait_until(60, "b caught up after its disk grew", || caught_up(&d));
    assert!(d.sites[1].status()["groups"][0]["out_of_space"].is_null());

    // The primary's own log fills: ENOSPC, not EIO, and not a failed group.
    let o = common::cmd("qemu-io", &["-f", "raw", "-c", "write -P 0x62 96M 128M", "-c", "flush", &a]);
    let said = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(said.contains("No space left on device"), "the write did not fail with ENOSPC: {said}");
    let st = d.sites[0].status();
    assert!(st["groups"][0]["failed"].is_null(), "a's group failed: {st}");
    assert!(st["groups"][0]["out_of_space"]["error"].as_str().is_some(), "{st}");
    // Reads go on meanwhile.
    let o = cmd_ok("qemu-io", &["-f", "raw", "-r", "-c", "read -P 0x61 0 96M", &a]);
    assert!(!String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed"));
    a_disk.grow("1g");
    cmd_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x62 96M 128M", "-c", "flush", &a]);
    assert!(d.sites[0].status()["groups"][0]["out_of_space"].is_null());
    common::wait_until(60, "b caught up after the primary's disk grew", || caught_up(&d));
    for (uri, what) in [(&a, "a"), (&b, "b")] {
        let o = cmd_ok("qemu-io", &["-f", "raw", "-r", "-c", "read -P 0x61 0 96M", "-c", "read -P 0x62 96M 128M", uri]);
        assert!(!String::from_utf8_lossy(&o.stdout).contains("Pattern verification failed"), "{what} lost data");
    }
    let sa = common::sha256_of(&cmd_ok("nbdcopy", &[&a, "-"]).stdout);
    let sb = common::sha256_of(&cmd_ok("nbdcopy", &[&b, "-"]).stdout);
    assert_eq!(sa, sb, "b differs from a");
}
