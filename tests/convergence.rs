//! Convergence (R3, R5): under fio load at the primary, the DR site is
//! killed and restarted, then the link is cut long enough that the log cap
//! forces a dirty-region resync, then restored. Throughout, a stamped
//! writer runs on a second volume of the same group and a checker reads the
//! DR copy of it: every read must show exactly writes 1..k (the DR is never
//! half-synced). After the load stops, both volumes are byte-identical at
//! the DR site within 30 s.

mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::nbd_client::Client;
use common::proxy::Proxy;
use common::{cmd_ok, wait_until, Deployment};

const BLOCKS: u64 = 512;

use tidemark::oracle::stamp;

fn prefix_of(data: &[u8]) -> Result<u64, String> {
    tidemark::oracle::prefix_of(data, BLOCKS)
}

#[test]
fn dr_converges_after_kill_cut_and_dirty_region_resync() {
    let mut d = Deployment::init(&["a", "b"], &[("vol0", "256MiB"), ("ora", "2MiB")], "async");
    let proxy = Proxy::start(format!("127.0.0.1:{}", d.repl_port(1)).parse().unwrap());
    let (direct, via) = (format!("127.0.0.1:{}", d.repl_port(1)), proxy.addr().to_string());
    d.sites[0].edit_config(|c| c.replace(&direct, &via).replace("replication_log_cap = \"64GiB\"", "replication_log_cap = \"300MiB\""));
    d.start_all();
    let uri = d.sites[0].uri("vol0");
    let (pa, pb) = (d.sites[0].addr(), d.sites[1].addr());

    // Stamped writer on `ora`, and a checker of the DR's copy of it.
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, written, pa) = (stop.clone(), written.clone(), pa.clone());
        std::thread::spawn(move || {
            let mut c = Client::connect(&pa, "ora").unwrap();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let b = (i - 1) % BLOCKS;
                c.write(b * 4096, &stamp(i, b), false).unwrap();
                written.store(i, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };
    let checks = Arc::new(AtomicU64::new(0));
    let checker = {
        let (stop, checks, pb) = (stop.clone(), checks.clone(), pb.clone());
        std::thread::spawn(move || -> Result<(), String> {
            while !stop.load(Ordering::Relaxed) {
                // The DR site may be down (killed) for a while.
                if let Ok(mut c) = Client::connect(&pb, "ora") {
                    if let Ok(data) = c.read(0, (BLOCKS * 4096) as u32) {
                        prefix_of(&data).map_err(|e| format!("DR showed an inconsistent state: {e}"))?;
                        checks.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(())
        })
    };

    let mut fio = Command::new("fio")
        .args([
            "--name=load", "--ioengine=nbd", &format!("--uri={uri}"), "--rw=randwrite", "--bs=4k", "--iodepth=8",
            "--size=256m", "--time_based", "--runtime=32", "--rate=24m",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(3));
    d.sites[1].kill9();
    std::thread::sleep(Duration::from_secs(2));
    d.sites[1].spawn();
    std::thread::sleep(Duration::from_secs(3));
    proxy.cut();
    // Cut until the log cap pushes b into dirty-region tracking.
    wait_until(40, "dirty-region mode for b", || d.sites[0].status()["groups"][0]["replicas"][0]["dirty_tracking"] == true);
    std::thread::sleep(Duration::from_secs(2));
    proxy.restore();
    let st = fio.wait().unwrap();
    assert!(st.success(), "fio failed");
    let t = Instant::now();
    wait_until(30, "b byte-identical after the load (lag 0, replicating)", || {
        let s = d.sites[0].status();
        let r = &s["groups"][0]["replicas"][0];
        r["lag_writes"] == 0 && r["state"] == "replicating"
    });
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    checker.join().unwrap().unwrap();
    // The writer stopped after the wait; let its last writes arrive.
    wait_until(10, "final catch-up", || d.sites[0].status()["groups"][0]["replicas"][0]["lag_writes"] == 0);
    eprintln!("converged {:?} after the load; {} consistent DR reads checked", t.elapsed(), checks.load(Ordering::Relaxed));
    for v in ["vol0", "ora"] {
        let a = common::sha256_of(&cmd_ok("nbdcopy", &[&d.sites[0].uri(v), "-"]).stdout);
        let b = common::sha256_of(&cmd_ok("nbdcopy", &[&d.sites[1].uri(v), "-"]).stdout);
        assert_eq!(a, b, "{v} differs at the DR site");
    }
    let log = d.sites[0].log();
    assert!(log.contains("resync committed"), "no dirty-region resync happened:\n{}", &log[log.len().saturating_sub(3000)..]);
    assert!(checks.load(Ordering::Relaxed) > 50);
    let _ = written;
}
