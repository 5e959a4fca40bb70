//! Fan-out (R4): with two DR sites, one cut off for 30 s through the
//! fault-injecting proxy, the other's lag stays under 1 s under load, and the
//! cut one catches up afterwards; all three copies end byte-identical.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::{cmd_ok, wait_until, Deployment};

#[test]
fn one_dr_cut_off_does_not_slow_the_other() {
    let mut d = Deployment::init(&["a", "b", "c"], &[("vol0", "256MiB")], "async");
    let proxy = Proxy::start(format!("127.0.0.1:{}", d.repl_port(2)).parse().unwrap());
    let direct = format!("127.0.0.1:{}", d.repl_port(2));
    let via = proxy.addr().to_string();
    d.sites[0].edit_config(|c| c.replace(&direct, &via));
    d.start_all();
    let uri = d.sites[0].uri("vol0");
    wait_until(20, "both DR sites replicating", || {
        let s = d.sites[0].status();
        s["groups"][0]["replicas"].as_array().is_some_and(|r| r.len() == 2 && r.iter().all(|x| x["state"] == "replicating"))
    });

    // Load: 4 KiB random writes at a steady rate for the whole cut.
    let mut fio = Command::new("fio")
        .args([
            "--name=load", "--ioengine=nbd", &format!("--uri={uri}"), "--rw=randwrite", "--bs=4k", "--iodepth=8",
            "--size=256m", "--time_based", "--runtime=34", "--rate=8m",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    proxy.cut();
    let cut_at = Instant::now();
    let mut max_lag_b: f64 = 0.0;
    let mut c_state = String::new();
    while cut_at.elapsed() < Duration::from_secs(30) {
        let s = d.sites[0].status();
        for r in s["groups"][0]["replicas"].as_array().unwrap() {
            if r["site"] == "b" {
                max_lag_b = max_lag_b.max(r["lag_seconds"].as_f64().unwrap());
            } else {
                c_state = r["state"].as_str().unwrap().to_string();
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(c_state, "disconnected", "site c should be cut off");
    // Out of reach for 30 s: said at WARN, not retried in silence.
    assert!(d.sites[0].log().contains("replication of cg0 to c: not connected for"), "no warning of c out of reach:\n{}", d.sites[0].log());
    let lagging = d.sites[0].status()["groups"][0]["replicas"][1]["lag_writes"].as_u64().unwrap();
    assert!(lagging > 0, "c should have fallen behind");
    proxy.restore();
    let st = fio.wait().unwrap();
    assert!(st.success(), "fio failed");
    eprintln!("max lag of b during the 30 s cut of c: {max_lag_b:.3} s; c behind by {lagging} writes");
    assert!(max_lag_b < 1.0, "b lagged {max_lag_b} s while c was cut off");

    wait_until(60, "c to catch up", || {
        let s = d.sites[0].status();
        s["groups"][0]["replicas"].as_array().unwrap().iter().all(|r| r["lag_writes"] == 0 && r["state"] == "replicating")
    });
    let a = common::sha256_of(&cmd_ok("nbdcopy", &[&uri, "-"]).stdout);
    for i in [1, 2] {
        let x = common::sha256_of(&cmd_ok("nbdcopy", &[&d.sites[i].uri("vol0"), "-"]).stdout);
        assert_eq!(a, x, "DR site {i} differs from the primary");
    }
}
