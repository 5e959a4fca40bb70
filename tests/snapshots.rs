//! Storage operations in the replication stream (R6-R9, R25), driven from
//! outside through the CLI, NBD clients and the metrics:
//! - identical trees: seeded mixes of >= 200 operations (writes from
//!   concurrent clients, snapshot, snapshot of snapshot, restore, refresh,
//!   sync, resize, create/delete) end with every export byte-identical at
//!   the primary and the DR site, for >= 10 seeds;
//! - zero transfer: restore, refresh and sync send no data bytes;
//! - fallback: snapshots made while the DR is cut off and in dirty-region
//!   mode end identical, with only the differing regions sent;
//! - protection: a DR site with `protect_snapshots` keeps its copy of a
//!   snapshot the primary deletes, says so in its status, and keeps it
//!   across a restart.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::nbd_client::Client;
use common::proxy::Proxy;
use common::{cmd, cmd_ok, tidemark, wait_until, Deployment, Site};
use rand::{Rng, SeedableRng};
use serde_json::Value;

const MIB: u64 = 1 << 20;

/// Runs the CLI against a site's API; panics with its output on failure.
fn cli(site: &Site, args: &[&str]) -> Value {
    let api = site.api();
    let mut full = vec!["--api", api.as_str(), "--json"];
    full.extend_from_slice(args);
    let o = tidemark(&full);
    assert!(o.status.success(), "tidemark {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or(Value::Null)
}

/// The whole content of an export, read over NBD.
fn read_export(site: &Site, name: &str, size: u64) -> Vec<u8> {
    let mut c = Client::connect(&site.addr(), name).unwrap_or_else(|e| panic!("cannot open export {name}: {e}"));
    let mut out = Vec::with_capacity(size as usize);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(4 * MIB);
        out.extend_from_slice(&c.read(off, n as u32).unwrap());
        off += n;
    }
    out
}

/// Every export (volumes and snapshots) of a site: name -> size.
fn exports(site: &Site) -> std::collections::BTreeMap<String, u64> {
    let mut m = std::collections::BTreeMap::new();
    for v in cli(site, &["volume", "list"]).as_array().unwrap() {
        m.insert(v["name"].as_str().unwrap().to_string(), v["size"].as_u64().unwrap());
    }
    for s in cli(site, &["snapshot", "list"]).as_array().unwrap() {
        m.insert(s["name"].as_str().unwrap().to_string(), s["size"].as_u64().unwrap());
    }
    m
}

fn caught_up(d: &Deployment) -> bool {
    let s = d.sites[0].status();
    let g = &s["groups"][0];
    g["replicas"].as_array().unwrap().iter().all(|r| r["state"] == "replicating" && r["applied_seq"] == g["last_seq"])
}

/// Both sites hold the same exports with the same content.
fn assert_same_tree(d: &Deployment, when: &str) -> usize {
    wait_until(60, &format!("DR caught up ({when})"), || caught_up(d));
    let (a, b) = (exports(&d.sites[0]), exports(&d.sites[1]));
    assert_eq!(a, b, "{when}: the export lists differ");
    for (name, size) in &a {
        let x = common::sha256_of(&read_export(&d.sites[0], name, *size));
        let y = common::sha256_of(&read_export(&d.sites[1], name, *size));
        assert_eq!(x, y, "{when}: {name} differs between the primary and the DR site");
    }
    a.len()
}

fn link(d: &Deployment, which: &str) -> f64 {
    d.sites[0].metric(&format!("tidemark_link_{which}_bytes_total{{group=\"cg0\",peer=\"b\"}}"))
}

/// Routes the primary's link to b through a fault proxy and lowers the log
/// cap, so that a cut followed by enough writes forces dirty-region mode.
fn through_proxy(d: &mut Deployment) -> Proxy {
    let proxy = Proxy::start(format!("127.0.0.1:{}", d.repl_port(1)).parse().unwrap());
    let (direct, via) = (format!("127.0.0.1:{}", d.repl_port(1)), proxy.addr().to_string());
    d.sites[0].edit_config(|c| c.replace(&direct, &via).replace("replication_log_cap = \"64GiB\"", "replication_log_cap = \"96MiB\""));
    proxy
}

/// Cuts the link and overwrites 4 MiB of vol0 at `offset` until the log cap
/// sends b to dirty-region tracking.
fn cut_until_dirty(d: &Deployment, proxy: &Proxy, offset: u64) {
    proxy.cut();
    let mut c = Client::connect(&d.sites[0].addr(), "vol0").unwrap();
    let mut i = 0u8;
    wait_until(60, "dirty-region mode for b", || {
        for _ in 0..8 {
            i = i.wrapping_add(1);
            c.write(offset, &vec![i; 4 * MIB as usize], false).unwrap();
        }
        d.sites[0].status()["groups"][0]["replicas"][0]["dirty_tracking"] == true
    });
}

#[test]
fn identical_trees_after_seeded_mixed_operations() {
    let mut d = Deployment::init(&["a", "b"], &[("vol0", "8MiB")], "async");
    d.start_all();
    let seeds: u64 = std::env::var("SNAP_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let first: u64 = std::env::var("SNAP_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random::<u32>) as u64;
    for seed in first..first + seeds {
        eprintln!("snapshot tree seed {seed} (replay with SNAP_SEED={seed} SNAP_SEEDS=1)");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let vol = format!("v{seed}");
        cli(&d.sites[0], &["volume", "create", &vol, "--size", "8MiB"]);
        // Two clients write to the volume throughout (first 4 MiB, which
        // every size the volume takes below still has).
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..2u64)
            .map(|w| {
                let (stop, addr, vol) = (stop.clone(), d.sites[0].addr(), vol.clone());
                std::thread::spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 10 + w);
                    let mut c = Client::connect(&addr, &vol).unwrap();
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let off = rng.random_range(0..1024u64) * 4096;
                        let len = rng.random_range(1..=8u64) * 4096;
                        let len = len.min(4 * MIB - off);
                        c.write(off, &vec![(n as u8) ^ (w as u8 * 0x55); len as usize], false).unwrap();
                        n += 1;
                        std::thread::sleep(Duration::from_micros(300));
                    }
                    n
                })
            })
            .collect();
        let mut snaps: Vec<(String, bool)> = Vec::new(); // (full name, writable)
        let mut extra: Vec<String> = Vec::new();
        let mut n = 0;
        for op in 0..200 {
            n += 1;
            if op == 100 && seed % 2 == 1 {
                // Half the seeds: the DR site dies mid-sequence and catches
                // up from the primary's log after its restart.
                d.sites[1].kill9();
                d.sites[1].spawn();
            }
            match rng.random_range(0..100) {
                0..=24 => {
                    let src = if snaps.is_empty() || rng.random_bool(0.6) { vol.clone() } else { snaps[rng.random_range(0..snaps.len())].0.clone() };
                    let w = rng.random_bool(0.3);
                    let name = format!("s{n}");
                    let mut args = vec!["snapshot", "create", src.as_str(), name.as_str()];
                    if w {
                        args.push("--writable");
                    }
                    cli(&d.sites[0], &args);
                    snaps.push((format!("{vol}@{name}"), w));
                }
                25..=34 if !snaps.is_empty() => {
                    let s = &snaps[rng.random_range(0..snaps.len())].0;
                    cli(&d.sites[0], &["snapshot", "restore", &vol, s]);
                }
                35..=44 if !snaps.is_empty() => {
                    let s = &snaps[rng.random_range(0..snaps.len())].0;
                    cli(&d.sites[0], &["snapshot", "refresh", &vol, s]);
                }
                45..=52 if snaps.len() >= 2 => {
                    let a = rng.random_range(0..snaps.len());
                    let b = rng.random_range(0..snaps.len());
                    if a != b {
                        cli(&d.sites[0], &["snapshot", "sync", &snaps[a].0, &snaps[b].0]);
                    }
                }
                53..=62 if !snaps.is_empty() => {
                    let i = rng.random_range(0..snaps.len());
                    let (s, _) = snaps.remove(i);
                    cli(&d.sites[0], &["snapshot", "delete", &vol, &s]);
                }
                63..=69 => {
                    let size = format!("{}MiB", rng.random_range(4..=12u64));
                    cli(&d.sites[0], &["volume", "resize", &vol, "--size", &size]);
                }
                70..=74 => {
                    let x = format!("x{seed}-{n}");
                    cli(&d.sites[0], &["volume", "create", &x, "--size", "1MiB"]);
                    let mut c = Client::connect(&d.sites[0].addr(), &x).unwrap();
                    c.write(rng.random_range(0..255u64) * 4096, &[n as u8; 4096], false).unwrap();
                    extra.push(x);
                }
                75..=77 if !extra.is_empty() => {
                    let x = extra.remove(rng.random_range(0..extra.len()));
                    cli(&d.sites[0], &["volume", "delete", &x]);
                }
                _ => {
                    // A write to a writable snapshot, or to the volume.
                    let writable: Vec<&String> = snaps.iter().filter(|s| s.1).map(|s| &s.0).collect();
                    let target = if writable.is_empty() || rng.random_bool(0.3) { vol.clone() } else { writable[rng.random_range(0..writable.len())].clone() };
                    let mut c = Client::connect(&d.sites[0].addr(), &target).unwrap();
                    // 8 KiB within the first 4 MiB: the smallest size any
                    // target takes (resize goes down to 4 MiB).
                    c.write(rng.random_range(0..1023u64) * 4096, &vec![op as u8; 8192], true).unwrap();
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
        let written: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
        let maps = assert_same_tree(&d, &format!("seed {seed}"));
        eprintln!("seed {seed}: {maps} exports identical at a and b ({written} concurrent writes)");
        // Clean up this seed's tree so exports stay few.
        for (s, _) in snaps {
            cli(&d.sites[0], &["snapshot", "delete", &vol, &s]);
        }
        for x in extra {
            cli(&d.sites[0], &["volume", "delete", &x]);
        }
        cli(&d.sites[0], &["volume", "delete", &vol]);
    }
    // The DR restarted replays the same tree from its own log.
    d.sites[1].kill9();
    d.sites[1].spawn();
    assert_same_tree(&d, "after the DR restarted");
}

#[test]
fn restore_refresh_and_sync_send_no_data() {
    let mut d = Deployment::init(&["a", "b"], &[("vol0", "256MiB")], "async");
    d.start_all();
    // Fill the volume with distinct data (nbdcopy from a file).
    let fill = d.dir.join("fill.bin");
    let data: Vec<u8> = (0..256 * MIB).map(|i| (i / 4096 % 251) as u8 ^ (i % 7) as u8).collect();
    std::fs::write(&fill, &data).unwrap();
    cmd_ok("nbdcopy", &[fill.to_str().unwrap(), &d.sites[0].uri("vol0")]);
    let a = &d.sites[0];
    cli(a, &["snapshot", "create", "vol0", "base"]);
    // Change 8 MiB, take a second snapshot: two in-stream snapshots that differ.
    let mut c = Client::connect(&a.addr(), "vol0").unwrap();
    c.write(16 * MIB, &vec![0xEE; 8 * MIB as usize], true).unwrap();
    cli(a, &["snapshot", "create", "vol0", "later"]);
    assert_same_tree(&d, "before the operations");
    for (what, args) in [
        ("restore", vec!["snapshot", "restore", "vol0", "base"]),
        ("refresh", vec!["snapshot", "refresh", "vol0", "later"]),
        ("sync", vec!["snapshot", "sync", "vol0@later", "vol0@base"]),
    ] {
        let (data0, sent0) = (link(&d, "data"), link(&d, "sent"));
        cli(&d.sites[0], &args);
        wait_until(30, "DR caught up", || caught_up(&d));
        let (data1, sent1) = (link(&d, "data"), link(&d, "sent"));
        eprintln!("{what}: link data bytes +{}, link bytes +{}", data1 - data0, sent1 - sent0);
        assert_eq!(data1, data0, "{what} sent data bytes");
        assert!(sent1 - sent0 < 64.0 * 1024.0, "{what} sent {} bytes on the link", sent1 - sent0);
    }
    assert_same_tree(&d, "after restore, refresh and sync");
    // And the volume really is the base snapshot again at the DR site.
    let got = read_export(&d.sites[1], "vol0", 256 * MIB);
    assert!(got == data, "DR volume after restore is not the original content");
}

#[test]
fn snapshots_made_while_dr_is_cut_off_end_identical_sending_only_differences() {
    let mut d = Deployment::init(&["a", "b"], &[("vol0", "64MiB")], "async");
    let proxy = through_proxy(&mut d);
    d.start_all();
    let fill = d.dir.join("fill.bin");
    let data: Vec<u8> = (0..64 * MIB).map(|i| (i / 4096 % 241) as u8 ^ 0x3c).collect();
    std::fs::write(&fill, &data).unwrap();
    cmd_ok("nbdcopy", &[fill.to_str().unwrap(), &d.sites[0].uri("vol0")]);
    cli(&d.sites[0], &["snapshot", "create", "vol0", "before"]);
    assert_same_tree(&d, "before the cut");
    cut_until_dirty(&d, &proxy, 0);
    // Storage operations the DR cannot take in order.
    let a = &d.sites[0];
    let mut c = Client::connect(&a.addr(), "vol0").unwrap();
    cli(a, &["snapshot", "create", "vol0", "cut1"]);
    c.write(32 * MIB, &vec![0x77; 2 * MIB as usize], false).unwrap();
    cli(a, &["snapshot", "create", "vol0@cut1", "cut2", "--writable"]);
    let mut w = Client::connect(&a.addr(), "vol0@cut2").unwrap();
    w.write(48 * MIB, &vec![0x99; MIB as usize], true).unwrap();
    cli(a, &["snapshot", "refresh", "vol0", "before"]);
    c.write(8 * MIB, &vec![0x55; MIB as usize], true).unwrap();
    cli(a, &["snapshot", "create", "vol0", "cut3"]);
    cli(a, &["snapshot", "restore", "vol0", "cut1"]);
    // A volume made during the cut, snapshotted, and synced into a snapshot
    // the DR holds with other data: the DR must build it from nothing plus
    // w's 1 MiB, not from its old copy.
    cli(a, &["volume", "create", "w", "--size", "64MiB"]);
    Client::connect(&a.addr(), "w").unwrap().write(20 * MIB, &vec![0x42; MIB as usize], true).unwrap();
    cli(a, &["snapshot", "create", "w", "wa"]);
    cli(a, &["snapshot", "sync", "w@wa", "vol0@before"]);
    let data_before = link(&d, "data");
    proxy.restore();
    wait_until(60, "resync committed", || d.sites[0].log().contains("resync committed"));
    let n = assert_same_tree(&d, "after the resync");
    let sent = link(&d, "data") - data_before;
    // Regions that differ from what b held: 4 + 2 + 1 + 1 MiB, plus w's
    // 1 MiB (sent once for w, w@wa and vol0@before). Seven maps of 64 MiB
    // would be 448 MiB if copied whole.
    eprintln!("fallback: {n} exports identical; {sent} data bytes sent for them");
    assert!(n == 7, "expected vol0, w and five snapshots, got {n}");
    assert!(sent <= 10.0 * MIB as f64, "resync sent {sent} data bytes; only ~9 MiB differ");
}

#[test]
fn protected_dr_snapshots_survive_primary_delete() {
    let mut d = Deployment::init(&["a", "b"], &[("vol0", "16MiB")], "async");
    d.sites[1].edit_config(|c| c.replace("protect_snapshots = false", "protect_snapshots = true"));
    let proxy = through_proxy(&mut d);
    d.start_all();
    let a = &d.sites[0];
    let mut c = Client::connect(&a.addr(), "vol0").unwrap();
    c.write(0, &vec![0xAB; 4 * MIB as usize], true).unwrap();
    cli(a, &["snapshot", "create", "vol0", "keep"]);
    c.write(0, &vec![0xCD; MIB as usize], true).unwrap();
    assert_same_tree(&d, "before the delete");
    let want = common::sha256_of(&read_export(&d.sites[1], "vol0@keep", 16 * MIB));
    cli(&d.sites[0], &["snapshot", "delete", "vol0", "keep"]);
    wait_until(30, "DR caught up", || caught_up(&d));
    assert!(cli(&d.sites[0], &["snapshot", "list"]).as_array().unwrap().is_empty(), "the primary's copy is deleted");
    let check_dr = |d: &Deployment| {
        let got = common::sha256_of(&read_export(&d.sites[1], "vol0@keep", 16 * MIB));
        assert_eq!(got, want, "the DR copy changed");
        let st = d.sites[1].status();
        let g = &st["groups"][0];
        assert_eq!(g["retained_snapshots"], serde_json::json!(["vol0@keep"]), "DR status: {g}");
        let list = cli(&d.sites[1], &["snapshot", "list"]);
        assert_eq!(list[0]["retained"], true);
    };
    check_dr(&d);
    let st = d.sites[1].status();
    assert_eq!(st["groups"][0]["snapshot_delete_refusals"][0]["snapshot"], "vol0@keep");
    assert!(d.sites[1].log().contains("snapshot-delete-refused"));
    assert_eq!(d.sites[1].metric("tidemark_snapshot_delete_refusals_total{group=\"cg0\"}"), 1.0);
    assert_eq!(d.sites[1].metric("tidemark_snapshots{group=\"cg0\"}"), 1.0);
    assert_eq!(d.sites[0].metric("tidemark_snapshots{group=\"cg0\"}"), 0.0);
    // A restart replays the refusal from the DR's own log.
    d.sites[1].kill9();
    d.sites[1].spawn();
    wait_until(30, "DR caught up after restart", || caught_up(&d));
    check_dr(&d);
    // The primary may reuse the name; the retained copy steps aside.
    cli(&d.sites[0], &["snapshot", "create", "vol0", "keep"]);
    wait_until(30, "DR caught up", || caught_up(&d));
    let names: Vec<String> = cli(&d.sites[1], &["snapshot", "list"]).as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_string()).collect();
    assert!(names.contains(&"vol0@keep".to_string()) && names.iter().any(|n| n.starts_with("vol0@keep.retained-")), "{names:?}");
    // Only the DR's admin deletes the retained copy.
    let retained = names.iter().find(|n| n.contains(".retained-")).unwrap().clone();
    let o = tidemark(&["--api", &d.sites[1].api(), "snapshot", "delete", "vol0", &retained]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = tidemark(&["--api", &d.sites[1].api(), "snapshot", "delete", "vol0", "keep"]);
    assert_eq!(o.status.code(), Some(1), "a replicated snapshot cannot be deleted at the DR site");
    assert!(String::from_utf8_lossy(&o.stderr).contains("delete it there"));

    // A deletion the DR misses while cut off (dirty-region mode) reaches it
    // as a resync commit without the snapshot: refused the same way.
    cut_until_dirty(&d, &proxy, 8 * MIB);
    cli(&d.sites[0], &["snapshot", "delete", "vol0", "keep"]);
    proxy.restore();
    wait_until(60, "resync committed", || d.sites[0].log().contains("resync committed"));
    wait_until(30, "DR caught up", || caught_up(&d));
    let st = d.sites[1].status();
    assert_eq!(st["groups"][0]["retained_snapshots"], serde_json::json!(["vol0@keep"]), "{st}");
    // (The DR restarted since the first refusal; its list holds this one.)
    let refusals = st["groups"][0]["snapshot_delete_refusals"].as_array().unwrap().clone();
    assert_eq!(refusals.last().unwrap()["snapshot"], "vol0@keep", "{st}");
    let x = common::sha256_of(&read_export(&d.sites[0], "vol0", 16 * MIB));
    let y = common::sha256_of(&read_export(&d.sites[1], "vol0", 16 * MIB));
    assert_eq!(x, y, "vol0 differs after the resync");
}

/// Snapshot exports through real clients: nbdinfo lists them, qemu-io
/// reads them, a read-only one refuses writes (EPERM) and a writable one
/// takes them and replicates them to its twin.
#[test]
fn snapshot_exports_with_real_clients() {
    let mut d = Deployment::init(&["a", "b"], &[("vol0", "16MiB")], "async");
    d.start_all();
    let a = &d.sites[0];
    cmd_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 1M", &a.uri("vol0")]);
    cli(a, &["snapshot", "create", "vol0", "ro"]);
    cli(a, &["snapshot", "create", "vol0", "rw", "--writable"]);
    cmd_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x22 0 1M", &a.uri("vol0")]);
    let list = String::from_utf8(cmd_ok("nbdinfo", &["--list", &format!("nbd://127.0.0.1:{}", a.nbd_port)]).stdout).unwrap();
    assert!(list.contains("vol0@ro") && list.contains("vol0@rw"), "{list}");
    cmd_ok("qemu-io", &["-f", "raw", "-r", "-c", "read -P 0x11 0 1M", &a.uri("vol0@ro")]);
    let o = cmd("qemu-io", &["-f", "raw", "-c", "write -P 0x33 0 4k", &a.uri("vol0@ro")]);
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(!o.status.success() || text.contains("Operation not permitted") || text.contains("read-only") || text.contains("Permission"), "write to read-only snapshot: {text}");
    cmd_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x44 4M 1M", &a.uri("vol0@rw")]);
    assert_same_tree(&d, "after writes to the writable snapshot");
    cmd_ok("qemu-io", &["-f", "raw", "-r", "-c", "read -P 0x44 4M 1M", &d.sites[1].uri("vol0@rw")]);
    cmd_ok("qemu-io", &["-f", "raw", "-r", "-c", "read -P 0x11 0 1M", &d.sites[1].uri("vol0@ro")]);
    // Usage and operation errors: exit 2 and 1, one line naming the problem.
    let o = tidemark(&["--api", &a.api(), "snapshot", "create", "vol0"]);
    assert_eq!(o.status.code(), Some(2));
    let o = tidemark(&["--api", &a.api(), "snapshot", "restore", "vol0", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("vol0@nope does not exist"), "{}", String::from_utf8_lossy(&o.stderr));
    let o = tidemark(&["--api", &a.api(), "volume", "delete", "vol0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("has snapshots"));
    let o = tidemark(&["--api", &d.sites[1].api(), "snapshot", "create", "vol0", "x"]);
    assert_eq!(o.status.code(), Some(1), "snapshot create at a DR site must fail");
}

/// Periodic mode: writes wait for the period, but a storage operation ships
/// at once, together with the batch pending before it.
#[test]
fn periodic_mode_ships_the_pending_batch_with_an_operation() {
    let mut d = Deployment::init(&["a", "b"], &[("vol0", "16MiB")], "periodic");
    d.sites[0].edit_config(|c| {
        let start = c.find("periodic_interval_s = ").unwrap();
        let end = start + c[start..].find('\n').unwrap();
        format!("{}periodic_interval_s = 600{}", &c[..start], &c[end..])
    });
    d.start_all();
    wait_until(30, "first period shipped", || caught_up(&d));
    let a = &d.sites[0];
    let mut c = Client::connect(&a.addr(), "vol0").unwrap();
    c.write(0, &vec![0x5A; 2 * MIB as usize], true).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let dr_seq = |d: &Deployment| d.sites[1].status()["groups"][0]["last_seq"].as_u64().unwrap();
    let before = dr_seq(&d);
    let last = a.status()["groups"][0]["last_seq"].as_u64().unwrap();
    assert!(before < last, "periodic mode shipped a write before its period (DR at {before}, primary at {last})");
    let t = std::time::Instant::now();
    cli(a, &["snapshot", "create", "vol0", "p1"]);
    wait_until(10, "the batch and the snapshot at the DR", || dr_seq(&d) == last + 1);
    eprintln!("periodic: batch and snapshot arrived {:?} after the operation", t.elapsed());
    let x = common::sha256_of(&read_export(&d.sites[0], "vol0@p1", 16 * MIB));
    let y = common::sha256_of(&read_export(&d.sites[1], "vol0@p1", 16 * MIB));
    assert_eq!(x, y);
}
