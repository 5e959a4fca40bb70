//! Data integrity seen from outside: a corrupted byte in a log segment is
//! reported naming the file and offset (never served as data), and a
//! read-only export refuses writes with EPERM.

mod common;

use common::{cmd, cmd_ok, Site};

#[test]
fn corrupted_byte_in_segment_is_reported_with_file_and_offset() {
    let mut site = Site::start(&[("vol0", "16MiB")]);
    let uri = site.uri("vol0");
    cmd_ok("qemu-io", &["-f", "raw", "-c", "write -P 0x3c 0 1M", "-c", "flush", &uri]);
    site.stop();
    let gdir = site.dir.join("groups/cg0");
    let mut segs: Vec<_> = std::fs::read_dir(&gdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "tml"))
        .collect();
    segs.sort();
    let seg = segs.last().unwrap().clone();
    let len = std::fs::metadata(&seg).unwrap().len();
    assert!(len > 1 << 20, "segment holds the write ({len} bytes)");
    // Flip one byte in the middle of the written data.
    let at = len - (512 << 10);
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&seg).unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[b[0] ^ 0x40], at).unwrap();
    }
    site.spawn();
    let o = cmd("qemu-io", &["-f", "raw", "-c", "read -P 0x3c 0 1M", &uri]);
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("Input/output error") || !o.status.success(), "corrupted data was served: {out}");
    let log = site.log();
    let line = log.lines().find(|l| l.contains("checksum mismatch")).unwrap_or_else(|| panic!("no checksum error logged:\n{log}"));
    assert!(line.contains(&seg.display().to_string()), "{line}");
    let block_off = at / 4096 * 4096;
    assert!(line.contains("at offset"), "{line}");
    let _ = block_off;
    // Other data is still served.
    cmd_ok("qemu-io", &["-f", "raw", "-c", "read -P 0 2M 1M", &uri]);
}

#[test]
fn secondary_exports_are_read_only() {
    // A DR site's volumes arrive through replication and are read-only.
    let mut d = common::Deployment::init(&["a", "b"], &[("vol0", "16MiB")], "async");
    d.start_all();
    let site = &d.sites[1];
    common::wait_until(20, "vol0 at the DR site", || common::nbd_client::Client::connect(&site.addr(), "vol0").is_ok());
    let uri = site.uri("vol0");
    let info = String::from_utf8(cmd_ok("nbdinfo", &["--json", &uri]).stdout).unwrap();
    let v: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(v["exports"][0]["is_read_only"], true, "{info}");
    // Nothing that would change it is offered (as with qemu-nbd -r).
    assert_eq!((v["exports"][0]["can_trim"].as_bool(), v["exports"][0]["can_zero"].as_bool()), (Some(false), Some(false)), "{info}");
    let o = cmd("qemu-io", &["-f", "raw", "-c", "write -P 1 0 4k", &uri]);
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("Operation not permitted") || out.contains("Permission denied") || out.contains("read-only") || out.contains("read only"), "{out}");
    // Raw protocol: a WRITE gets EPERM (1), a read works.
    let mut c = common::nbd_client::Client::connect(&site.addr(), "vol0").unwrap();
    let h = c.raw_request(1, 0, 0, 4096, &[7u8; 4096]).unwrap();
    let (rh, err) = c.reply().unwrap();
    assert_eq!((rh, err), (h, 1));
    // TRIM (4) and WRITE_ZEROES (6), not offered, sent anyway: EPERM too.
    for cmd in [4u16, 6] {
        let h = c.raw_request(cmd, 0, 0, 4096, &[]).unwrap();
        assert_eq!(c.reply().unwrap(), (h, 1), "command {cmd}");
    }
    assert_eq!(c.read(0, 4096).unwrap(), vec![0u8; 4096]);
}
