//! Real NBD peers against a live site: qemu-io, nbdinfo, nbdcopy, qemu-img,
//! fio's nbd engine, nbdsh (libnbd) with several connections, an ext4
//! filesystem on a loop device over nbdfuse, and the raw test client for
//! protocol errors and a seeded fuzz of malformed traffic.
//!
//! Each test starts its own site process on free loopback ports. The tools
//! are those listed in /work/shared/TOOLS.md (`scripts/test.sh` installs them).

mod common;

use common::nbd_client::{read_option_reply, send_option, Client, NBDMAGIC};
use common::{cmd, cmd_ok, sha256_file, test_root, Site};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;

fn text(o: &std::process::Output) -> String {
    format!("stdout:\n{}\nstderr:\n{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Runs qemu-io with the given commands in one process and asserts that it
/// succeeded, that no pattern check failed (qemu-io may print that and still
/// exit 0) and that every read/write/discard command reported completion.
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    let o = cmd("qemu-io", &args);
    let out = text(&o);
    assert!(o.status.success(), "qemu-io {cmds:?} failed ({}):\n{out}", o.status);
    assert!(!out.contains("Pattern verification failed"), "qemu-io {cmds:?}: pattern verification failed:\n{out}");
    assert!(!out.contains(" failed"), "qemu-io {cmds:?} reported a failure:\n{out}");
    let want = cmds
        .iter()
        .filter(|c| c.starts_with("read ") || c.starts_with("write ") || c.starts_with("discard "))
        .count();
    let got = String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter(|l| l.starts_with("read ") || l.starts_with("wrote ") || l.starts_with("discard "))
        .count();
    assert_eq!(got, want, "qemu-io {cmds:?}: expected {want} completed I/O commands:\n{out}");
    out
}

fn tmpdir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir_in(test_root()).unwrap()
}

// ---------------------------------------------------------------------------
// 1. qemu-io

#[test]
fn qemu_io_patterns() {
    let site = Site::start(&[("vol0", "1GiB")]);
    let u = site.uri("vol0");
    qemu_io(
        &u,
        &[
            "write -P 0xab 0 1M",
            "read -P 0xab 0 1M",
            // WRITE_ZEROES over data.
            "write -P 0xcd 1M 1M",
            "read -P 0xcd 1M 1M",
            "write -z 1M 1M",
            "read -P 0 1M 1M",
            // TRIM over data reads back as zeroes.
            "write -P 0xef 2M 1M",
            "read -P 0xef 2M 1M",
            "discard 2M 1M",
            "read -P 0 2M 1M",
            "flush",
            // FUA write.
            "write -f -P 0x5a 4M 64k",
            "read -P 0x5a 4M 64k",
            // Untouched region reads as zeroes.
            "read -P 0 100M 1M",
            "read -P 0 1023M 1M",
        ],
    );
    // Unaligned I/O inside the 0xab region (read-modify-write of blocks),
    // checked together with its untouched neighbours.
    qemu_io(
        &u,
        &[
            "write -P 0x11 512 512",
            "read -P 0x11 512 512",
            "write -P 0x22 1536 3072",
            "read -P 0x22 1536 3072",
            "write -P 0x33 7 1000",
            "read -P 0x33 7 1000",
            "write -P 0x44 4095 2",
            "read -P 0x44 4095 2",
        ],
    );
    // A second process (new connection) sees the same bytes.
    qemu_io(
        &u,
        &[
            "read -P 0xab 0 7",
            "read -P 0x33 7 1000",
            "read -P 0x11 1007 17",
            "read -P 0xab 1024 512",
            "read -P 0x22 1536 2559",
            "read -P 0x44 4095 2",
            "read -P 0x22 4097 511",
            "read -P 0xab 4608 1043968",
            "read -P 0 1M 2M",
            "read -P 0x5a 4M 64k",
            "read -P 0 4160k 1M",
        ],
    );
    // Unaligned zeroing and discard at odd offsets.
    qemu_io(
        &u,
        &[
            "write -P 0x66 8M 64k",
            "write -z 8195k 3001",
            "read -P 0x66 8M 3k",
            "read -P 0 8195k 3001",
            "read -P 0x66 8394681 59463",
        ],
    );
    assert!(!site.log().contains("panicked"), "site log:\n{}", site.log());
}

// ---------------------------------------------------------------------------
// 2. nbdinfo

#[test]
fn nbdinfo_shows_export() {
    let site = Site::start(&[("vol0", "1GiB")]);
    let u = site.uri("vol0");

    let o = cmd_ok("nbdinfo", &["--json", &u]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("nbdinfo --json: {e}\n{}", text(&o)));
    let exports = v["exports"].as_array().unwrap_or_else(|| panic!("no exports in {v}"));
    assert_eq!(exports.len(), 1, "{v}");
    let e = &exports[0];
    assert_eq!(e["export-name"], "vol0", "{e}");
    assert_eq!(e["export-size"].as_u64(), Some(GIB), "{e}");
    for k in ["can_flush", "can_fua", "can_multi_conn", "can_trim", "can_zero"] {
        assert_eq!(e[k], serde_json::Value::Bool(true), "{k} in {e}");
    }
    assert_eq!(e["is_read_only"], serde_json::Value::Bool(false), "{e}");
    let contexts: Vec<&str> = e["contexts"].as_array().unwrap_or_else(|| panic!("no contexts in {e}")).iter().filter_map(|c| c.as_str()).collect();
    assert!(contexts.contains(&"base:allocation"), "{e}");

    let o = cmd_ok("nbdinfo", &["--list", &format!("nbd://127.0.0.1:{}", site.nbd_port)]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("export=\"vol0\""), "nbdinfo --list:\n{}", text(&o));

    let o = cmd("nbdinfo", &[&site.uri("nosuch")]);
    assert!(!o.status.success(), "nbdinfo of a missing export succeeded:\n{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nosuch"), "nbdinfo error does not name the export:\n{}", text(&o));

    qemu_io(&u, &["write -P 0x77 0 1M"]);
    let o = cmd_ok("nbdinfo", &["--map", "--json", &u]);
    let map: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("nbdinfo --map --json: {e}\n{}", text(&o)));
    let ext = map.as_array().unwrap_or_else(|| panic!("map is not a list: {map}"));
    assert!(!ext.is_empty(), "{map}");
    assert_eq!(ext[0]["offset"].as_u64(), Some(0), "{map}");
    assert_eq!(ext[0]["type"].as_u64(), Some(0), "first extent is not data: {map}");
    assert!(ext[0]["length"].as_u64().unwrap() >= MIB, "{map}");
    assert!(
        ext.iter().any(|x| x["offset"].as_u64().unwrap() >= MIB && x["type"].as_u64().unwrap() & 1 == 1),
        "no hole after the written MiB: {map}"
    );
    // Extents tile the whole export.
    let mut at = 0;
    for x in ext {
        assert_eq!(x["offset"].as_u64().unwrap(), at, "{map}");
        at += x["length"].as_u64().unwrap();
    }
    assert_eq!(at, GIB, "{map}");
    // Plain-text map too.
    let o = cmd_ok("nbdinfo", &["--map", &u]);
    let out = String::from_utf8_lossy(&o.stdout);
    let first = out.lines().next().unwrap_or_default().split_whitespace().collect::<Vec<_>>();
    assert_eq!(first.first(), Some(&"0"), "{out}");
    assert!(first.contains(&"data"), "{out}");
    assert!(out.contains("hole"), "{out}");
}

// ---------------------------------------------------------------------------
// 3. nbdcopy / qemu-img

#[test]
fn nbdcopy_roundtrip_256m() {
    let site = Site::start(&[("vol0", "256MiB")]);
    let u = site.uri("vol0");
    let tmp = tmpdir("peers-nbdcopy");
    let inp = tmp.path().join("in.raw");
    let out = tmp.path().join("out.raw");
    {
        let mut rng = StdRng::seed_from_u64(0x71de);
        let mut f = std::io::BufWriter::new(std::fs::File::create(&inp).unwrap());
        let mut buf = vec![0u8; MIB as usize];
        for i in 0..256 {
            rng.fill_bytes(&mut buf);
            // A few all-zero MiBs so sparse detection paths are used too.
            if i % 37 == 5 {
                buf.fill(0);
            }
            f.write_all(&buf).unwrap();
        }
        f.flush().unwrap();
    }
    let t = Instant::now();
    cmd_ok("nbdcopy", &[inp.to_str().unwrap(), &u]);
    let up = t.elapsed();
    let t = Instant::now();
    cmd_ok("nbdcopy", &[&u, out.to_str().unwrap()]);
    let down = t.elapsed();
    eprintln!("nbdcopy 256 MiB: up {up:?}, down {down:?}");
    assert_eq!(std::fs::metadata(&out).unwrap().len(), 256 * MIB);
    assert_eq!(sha256_file(&inp), sha256_file(&out), "nbdcopy round trip changed the data");
    let o = cmd("qemu-img", &["compare", "-f", "raw", "-F", "raw", inp.to_str().unwrap(), &u]);
    assert!(o.status.success(), "qemu-img compare:\n{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("Images are identical"), "{}", text(&o));
}

// ---------------------------------------------------------------------------
// 4. fio

/// Runs fio with JSON output; asserts success, no job errors, no verify
/// complaints, and that the verify phase read back everything written.
fn fio_json(args: &[&str]) -> serde_json::Value {
    // No verify state files left in the working directory.
    let mut a = vec!["--output-format=json", "--verify_state_save=0"];
    a.extend_from_slice(args);
    let o = cmd("fio", &a);
    let all = text(&o);
    assert!(o.status.success(), "fio {args:?} failed ({}):\n{all}", o.status);
    let s = String::from_utf8_lossy(&o.stdout);
    let start = s.find('{').unwrap_or_else(|| panic!("no JSON from fio:\n{all}"));
    // fio prints verify failures ("verify: bad magic header", "crc32c: verify
    // failed") as text, outside the JSON document.
    let plain = format!("{}{}", &s[..start], String::from_utf8_lossy(&o.stderr)).to_lowercase();
    assert!(!plain.contains("verify") && !plain.contains("bad magic") && !plain.contains("crc32c"), "fio {args:?} reported verify errors:\n{all}");
    let v: serde_json::Value = serde_json::from_str(&s[start..]).unwrap_or_else(|e| panic!("fio JSON: {e}\n{all}"));
    let jobs = v["jobs"].as_array().unwrap_or_else(|| panic!("no jobs: {v}"));
    assert!(!jobs.is_empty());
    for j in jobs {
        assert_eq!(j["error"].as_u64(), Some(0), "fio job error: {j}");
        assert!(j["write"]["io_bytes"].as_u64().unwrap() > 0, "fio wrote nothing: {j}");
    }
    v
}

#[test]
fn fio_verify() {
    let site = Site::start(&[("vol0", "1GiB")]);
    let u = format!("--uri={}", site.uri("vol0"));
    let v = fio_json(&[
        "--name=randwrite4k",
        "--ioengine=nbd",
        &u,
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--size=128M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    ]);
    let j = &v["jobs"][0];
    let w = j["write"]["io_bytes"].as_u64().unwrap();
    let r = j["read"]["io_bytes"].as_u64().unwrap();
    assert_eq!(w, 128 * MIB, "{j}");
    assert_eq!(r, w, "verify phase did not read back everything: {j}");

    // Mixed sizes 512..64k (sub-block and block-straddling), reads mixed in.
    let v = fio_json(&[
        "--name=randrw-mixed",
        "--ioengine=nbd",
        &u,
        "--rw=randrw",
        "--bsrange=512-64k",
        "--iodepth=16",
        "--offset=256M",
        "--size=64M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    ]);
    let j = &v["jobs"][0];
    assert!(j["read"]["io_bytes"].as_u64().unwrap() > 0, "{j}");

    // Unaligned block sizes with verify: writes then verify reads.
    fio_json(&[
        "--name=randwrite-odd",
        "--ioengine=nbd",
        &u,
        "--rw=randwrite",
        "--bsrange=512-64k",
        "--blockalign=512",
        "--iodepth=16",
        "--offset=512M",
        "--size=64M",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
    ]);
    assert!(!site.log().contains("panicked"), "site log:\n{}", site.log());
}

// ---------------------------------------------------------------------------
// 5. multi-connection consistency with libnbd

#[test]
fn multi_conn_flush() {
    let site = Site::start(&[("vol0", "1GiB")]);
    let script = r#"
import os, random
u = os.environ["TM_URI"]
hs = []
for i in range(3):
    x = nbd.NBD()
    x.connect_uri(u)
    assert x.can_multi_conn(), "no multi-conn"
    hs.append(x)
h1, h2, h3 = hs
rnd = random.Random(42)
model = {}
# Write on one connection, FLUSH on another, read on the third.
for i in range(200):
    w, f, r = rnd.sample(hs, 3)
    off = rnd.randrange(0, 64 << 20)
    ln = rnd.choice([1, 511, 512, 4096, 4097, 65536, 1 << 20, rnd.randrange(1, 200000)])
    data = rnd.randbytes(ln)
    fua = rnd.random() < 0.3
    w.pwrite(data, off, nbd.CMD_FLAG_FUA if fua else 0)
    if not fua:
        f.flush()
    got = r.pread(ln, off)
    assert got == data, "iteration %d: read on another connection differs (off=%d len=%d fua=%s)" % (i, off, ln, fua)
# Concurrent async writes on two connections to disjoint ranges, one flush on the third.
bufs = []
for k in range(64):
    c = hs[k % 2]
    data = rnd.randbytes(65536 + k)
    off = (128 << 20) + k * (1 << 20) + k
    b = nbd.Buffer.from_bytearray(bytearray(data))
    c.aio_pwrite(b, off)
    bufs.append((off, data, b))
for c in (h1, h2):
    while c.aio_in_flight() > 0:
        c.poll(-1)
h3.flush()
for off, data, _ in bufs:
    assert h3.pread(len(data), off) == data, "async write at %d not visible" % off
    assert h1.pread(len(data), off) == data
# Zeroes and trims from one connection seen by another.
h1.pwrite(b"\xaa" * 8192, 300 << 20)
h2.zero(4096, (300 << 20) + 1024)
h3.flush()
assert h3.pread(8192, 300 << 20) == b"\xaa" * 1024 + b"\0" * 4096 + b"\xaa" * 3072
h2.trim(8192, 300 << 20)
h1.flush()
assert h3.pread(8192, 300 << 20) == b"\0" * 8192
for x in hs:
    x.shutdown()
print("MULTI_CONN_OK")
"#;
    let path = format!("/usr/bin:/usr/sbin:/bin:/sbin:{}", std::env::var("PATH").unwrap_or_default());
    let o = Command::new("nbdsh")
        .arg("-c")
        .arg(script)
        .env("PATH", path)
        .env("TM_URI", site.uri("vol0"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "nbdsh failed ({}):\n{}", o.status, text(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("MULTI_CONN_OK"), "{}", text(&o));
}

// ---------------------------------------------------------------------------
// 6. ext4 on a loop device over nbdfuse

/// Undoes whatever was set up, even when the test panics.
struct FuseGuard {
    fusemnt: PathBuf,
    fuse: Option<Child>,
    loopdev: Option<String>,
    mounted: Option<PathBuf>,
}

impl FuseGuard {
    fn umount(&mut self) {
        if let Some(m) = self.mounted.take() {
            cmd_ok("umount", &[m.to_str().unwrap()]);
        }
    }
    fn detach(&mut self) {
        if let Some(d) = self.loopdev.take() {
            cmd_ok("losetup", &["-d", &d]);
        }
    }
    fn unfuse(&mut self) {
        if let Some(mut c) = self.fuse.take() {
            let o = cmd("fusermount3", &["-u", self.fusemnt.to_str().unwrap()]);
            if !o.status.success() {
                let _ = cmd("umount", &["-l", self.fusemnt.to_str().unwrap()]);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().unwrap().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if c.try_wait().unwrap().is_none() {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
    }
}

impl Drop for FuseGuard {
    fn drop(&mut self) {
        if let Some(m) = self.mounted.take() {
            let o = cmd("umount", &[m.to_str().unwrap()]);
            if !o.status.success() {
                let _ = cmd("umount", &["-l", m.to_str().unwrap()]);
            }
        }
        if let Some(d) = self.loopdev.take() {
            let _ = cmd("losetup", &["-d", &d]);
        }
        if let Some(mut c) = self.fuse.take() {
            let o = cmd("fusermount3", &["-u", self.fusemnt.to_str().unwrap()]);
            if !o.status.success() {
                let _ = cmd("fusermount3", &["-uz", self.fusemnt.to_str().unwrap()]);
            }
            std::thread::sleep(Duration::from_millis(200));
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn mount(dev: &str, at: &Path) {
    cmd_ok("mount", &[dev, at.to_str().unwrap()]);
}

fn verify_manifest(root: &Path, manifest: &[(String, String)]) {
    for (name, want) in manifest {
        assert_eq!(&sha256_file(&root.join(name)), want, "{name} changed");
    }
    let listed = std::fs::read_to_string(root.join("MANIFEST")).unwrap();
    let expect: String = manifest.iter().map(|(n, h)| format!("{h}  {n}\n")).collect();
    assert_eq!(listed, expect, "MANIFEST changed");
}

#[test]
fn ext4_on_nbdfuse() {
    let site = Site::start(&[("vol0", "512MiB")]);
    let u = site.uri("vol0");
    let tmp = tmpdir("peers-ext4");
    let fusemnt = tmp.path().join("fusemnt");
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir_all(&fusemnt).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    let vol = fusemnt.join("vol");
    let fuse_log = std::fs::File::create(tmp.path().join("nbdfuse.log")).unwrap();
    let child = Command::new("nbdfuse")
        .arg(&vol)
        .arg(&u)
        .stdin(Stdio::null())
        .stdout(fuse_log.try_clone().unwrap())
        .stderr(fuse_log)
        .spawn()
        .expect("cannot run nbdfuse");
    let mut g = FuseGuard { fusemnt: fusemnt.clone(), fuse: Some(child), loopdev: None, mounted: None };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if std::fs::metadata(&vol).map(|m| m.len() == 512 * MIB).unwrap_or(false) {
            break;
        }
        if let Some(st) = g.fuse.as_mut().unwrap().try_wait().unwrap() {
            panic!("nbdfuse exited ({st}): {}", std::fs::read_to_string(tmp.path().join("nbdfuse.log")).unwrap_or_default());
        }
        assert!(Instant::now() < deadline, "nbdfuse did not expose {vol:?}");
        std::thread::sleep(Duration::from_millis(20));
    }

    let o = cmd_ok("losetup", &["-f", "--show", vol.to_str().unwrap()]);
    let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
    assert!(dev.starts_with("/dev/loop"), "losetup printed {dev:?}");
    g.loopdev = Some(dev.clone());

    cmd_ok("mkfs.ext4", &["-q", &dev]);
    mount(&dev, &mnt);
    g.mounted = Some(mnt.clone());

    let mut rng = StdRng::seed_from_u64(6);
    let mut manifest = Vec::new();
    std::fs::create_dir_all(mnt.join("d")).unwrap();
    for i in 0..20 {
        // Mostly 1 MiB, a few odd sizes.
        let len = if i % 5 == 4 { rng.random_range(1..3 * MIB as usize) } else { MIB as usize };
        let mut data = vec![0u8; len];
        rng.fill_bytes(&mut data);
        let name = if i % 2 == 0 { format!("f{i:02}") } else { format!("d/f{i:02}") };
        std::fs::write(mnt.join(&name), &data).unwrap();
        let h = sha256_file(&mnt.join(&name));
        manifest.push((name, h));
    }
    let list: String = manifest.iter().map(|(n, h)| format!("{h}  {n}\n")).collect();
    std::fs::write(mnt.join("MANIFEST"), list).unwrap();
    cmd_ok("sync", &[]);
    g.umount();

    let o = cmd("fsck.ext4", &["-n", "-f", &dev]);
    assert!(o.status.success(), "fsck.ext4 -n -f {dev} ({}):\n{}", o.status, text(&o));

    mount(&dev, &mnt);
    g.mounted = Some(mnt.clone());
    verify_manifest(&mnt, &manifest);
    g.umount();
    g.detach();
    g.unfuse();

    // What the server holds (not the kernel's caches): copy the export out
    // and check the filesystem and two files in the copy.
    let img = tmp.path().join("image.raw");
    cmd_ok("nbdcopy", &[&u, img.to_str().unwrap()]);
    let o = cmd("fsck.ext4", &["-n", "-f", img.to_str().unwrap()]);
    assert!(o.status.success(), "fsck.ext4 on a copy of the export ({}):\n{}", o.status, text(&o));
    for (name, want) in [&manifest[0], &manifest[19]] {
        let dump = tmp.path().join("dump");
        cmd_ok("debugfs", &["-R", &format!("dump /{name} {}", dump.display()), img.to_str().unwrap()]);
        assert_eq!(&sha256_file(&dump), want, "{name} in a copy of the export");
    }
    assert!(!site.log().contains("panicked"), "site log:\n{}", site.log());
}

// ---------------------------------------------------------------------------
// 7. protocol errors with the raw client

const TIMEOUT: Duration = Duration::from_secs(10);

/// Connects and completes the greeting (fixed newstyle, no zeroes); option
/// haggling comes next.
fn greet(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s.set_write_timeout(Some(TIMEOUT)).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    assert_eq!(u64::from_be_bytes(g[0..8].try_into().unwrap()), NBDMAGIC);
    s.write_all(&3u32.to_be_bytes()).unwrap();
    s
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

/// Reads until EOF; Ok(bytes read) if the peer closed, Err on timeout.
fn read_to_eof(s: &mut TcpStream, limit: Duration) -> Result<usize, String> {
    s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let deadline = Instant::now() + limit;
    let mut n = 0;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(k) => n += k,
            Err(e) if e.kind() == ErrorKind::ConnectionReset || e.kind() == ErrorKind::BrokenPipe => return Ok(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut => {
                if Instant::now() > deadline {
                    return Err(format!("no EOF after {limit:?} ({n} bytes read)"));
                }
            }
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

fn client(site: &Site) -> Client {
    let c = Client::connect(&site.addr(), "vol0").unwrap();
    c.s.set_read_timeout(Some(TIMEOUT)).unwrap();
    c.s.set_write_timeout(Some(TIMEOUT)).unwrap();
    c
}

fn works(site: &Site) {
    let mut c = client(site);
    let data: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
    c.write(12345, &data, true).unwrap();
    assert_eq!(c.read(12345, data.len() as u32).unwrap(), data);
    c.disconnect();
}

/// A site short of file descriptors keeps serving. `accept` failing with
/// EMFILE used to end the NBD listener, and with it the whole site
/// ("NBD server stopped"); now it is logged and waited out, and clients
/// connect again once descriptors are free. A site also takes its whole
/// hard limit on open files at start (soft = hard), since each log segment
/// and each connection holds one.
#[test]
fn running_out_of_file_descriptors_is_waited_out() {
    let mut site = Site::start(&[("vol0", "64MiB")]);
    let pid = site.pid();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let v: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(v[3], v[4], "the soft limit on open files was not raised to the hard one: {line}");
    // Leave the site 8 descriptors, then open 40 connections.
    let open = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let limit = open + 8;
    cmd_ok("prlimit", &["--pid", &pid.to_string(), &format!("--nofile={limit}:{limit}")]);
    let held: Vec<TcpStream> = (0..40)
        .map(|i| TcpStream::connect(site.addr()).unwrap_or_else(|e| panic!("connection {i}: {e}: did the site exit when out of file descriptors? log:\n{}", site.log())))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !site.log().contains("nbd: cannot accept connections") {
        assert!(site.child.as_mut().unwrap().try_wait().unwrap().is_none(), "the site exited when out of file descriptors; log:\n{}", site.log());
        assert!(Instant::now() < deadline, "no accept error logged with {limit} descriptors and 40 connections; log:\n{}", site.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert!(site.child.as_mut().unwrap().try_wait().unwrap().is_none(), "the site exited when out of file descriptors; log:\n{}", site.log());
    let lines = site.log().matches("cannot accept connections").count();
    assert!(lines <= 2, "{lines} accept error lines in about a second: not throttled; log:\n{}", site.log());
    drop(held);
    // Clients get through again (the dead connections queued meanwhile are
    // taken and closed first).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = cmd("nbdinfo", &["--size", &site.uri("vol0")]);
        if o.status.success() {
            assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), (64 * MIB).to_string());
            break;
        }
        assert!(Instant::now() < deadline, "no client got through after the descriptors were freed: {}; log:\n{}", text(&o), site.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    works(&site);
}

/// A volume deleted while a client is connected to it: the next request
/// gets ESHUTDOWN saying so and the connection ends (before, the export
/// read as 0 bytes long: EINVAL "past the end" for reads, ENOSPC for
/// writes, and FLUSH still succeeded). An unknown export asked for is
/// logged with the client's address.
#[test]
fn a_deleted_volume_ends_its_connections() {
    let site = Site::start(&[("vol0", "64MiB"), ("v1", "16MiB")]);
    let mut c = Client::connect(&site.addr(), "v1").unwrap();
    c.s.set_read_timeout(Some(TIMEOUT)).unwrap();
    c.write(0, &[7u8; 4096], true).unwrap();
    cmd_ok(common::bin().to_str().unwrap(), &["--api", &site.api(), "volume", "delete", "v1"]);
    let h = c.raw_request(0, 0, 0, 4096, &[]).unwrap();
    let (rh, err) = c.reply().unwrap();
    assert_eq!((rh, err), (h, 108), "a read of the deleted volume: expected ESHUTDOWN");
    let mut rest = Vec::new();
    let _ = c.s.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the connection went on after the deletion: {} more bytes", rest.len());
    common::wait_until(10, "the deletion logged", || site.log().contains("v1 was deleted; the export is gone"));
    assert!(Client::connect(&site.addr(), "v1").is_err(), "v1 is still exported");
    common::wait_until(10, "the refused export logged", || site.log().contains("option 7 refused: unknown export \"v1\""));
    works(&site);
}

#[test]
fn read_only_and_unknown_export_errors() {
    let site = Site::start(&[("vol0", "1GiB")]);
    let addr = site.addr();

    // Unknown export: GO refused with NBD_REP_ERR_UNKNOWN naming it; the
    // connection stays in option haggling and a GO for vol0 then works.
    let mut s = greet(&addr);
    send_option(&mut s, 7, &go_data("nosuch-export")).unwrap();
    let (typ, data) = read_option_reply(&mut s).unwrap();
    assert_eq!(typ, 0x8000_0006, "reply {typ:#x} {:?}", String::from_utf8_lossy(&data));
    assert!(String::from_utf8_lossy(&data).contains("nosuch-export"), "message does not name the export: {:?}", String::from_utf8_lossy(&data));
    send_option(&mut s, 7, &go_data("vol0")).unwrap();
    let mut size = None;
    let mut flags = 0u16;
    loop {
        let (typ, data) = read_option_reply(&mut s).unwrap();
        match typ {
            1 => break,
            3 => {
                if data.len() >= 12 && data[0..2] == [0, 0] {
                    size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                    flags = u16::from_be_bytes(data[10..12].try_into().unwrap());
                }
            }
            t => panic!("GO vol0 after a refused GO: {t:#x} {:?}", String::from_utf8_lossy(&data)),
        }
    }
    assert_eq!(size, Some(GIB));
    assert_eq!(flags & 2, 0, "vol0 is read-only?");
    drop(s);

    // The same through the client helper.
    let e = Client::connect(&addr, "nosuch").err().expect("GO for a missing export succeeded");
    let msg = e.to_string();
    assert!(msg.contains("0x80000006") && msg.contains("nosuch"), "{msg}");

    // Bad request magic after GO: the server closes without a reply.
    let mut c = client(&site);
    c.s.write_all(&[0x5au8; 28]).unwrap();
    assert_eq!(read_to_eof(&mut c.s, TIMEOUT), Ok(0), "bad request magic");
    works(&site);

    // Bad option magic during haggling: closed.
    let mut s = greet(&addr);
    s.write_all(&[0xffu8; 16]).unwrap();
    assert_eq!(read_to_eof(&mut s, TIMEOUT), Ok(0), "bad option magic");

    // Unknown client flags: closed.
    let mut s = TcpStream::connect(&addr).unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).unwrap();
    s.write_all(&0xffff_fff0u32.to_be_bytes()).unwrap();
    assert_eq!(read_to_eof(&mut s, TIMEOUT), Ok(0), "unknown client flags");

    // Truncated frames, then the server still serves new connections.
    let mut c = client(&site);
    let mut hdr = Vec::new();
    hdr.extend_from_slice(&0x25609513u32.to_be_bytes());
    hdr.extend_from_slice(&0u16.to_be_bytes());
    hdr.extend_from_slice(&0u16.to_be_bytes());
    hdr.extend_from_slice(&9u64.to_be_bytes());
    c.s.write_all(&hdr[..14]).unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut c.s, TIMEOUT), Ok(0), "half a request header");
    works(&site);

    // A write header whose payload is cut short.
    let mut c = client(&site);
    c.raw_request(1, 0, 0, 4096, &[7u8; 100]).unwrap();
    c.s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut c.s, TIMEOUT), Ok(0), "short write payload");
    works(&site);

    // Half an option header, and an option whose data is cut short.
    let mut s = greet(&addr);
    s.write_all(&common::nbd_client::IHAVEOPT.to_be_bytes()[..5]).unwrap();
    drop(s);
    let mut s = greet(&addr);
    let mut b = common::nbd_client::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&7u32.to_be_bytes());
    b.extend_from_slice(&100u32.to_be_bytes());
    b.extend_from_slice(&[1, 2, 3]);
    s.write_all(&b).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_to_eof(&mut s, TIMEOUT), Ok(0), "short option data");
    // Connection closed right after the greeting.
    let s = TcpStream::connect(&addr).unwrap();
    drop(s);

    // Read past the end and an oversized read: EINVAL, connection usable.
    let mut c = client(&site);
    let h = c.raw_request(0, 0, GIB - 100, 4096, &[]).unwrap();
    assert_eq!(c.reply().unwrap(), (h, 22));
    let h = c.raw_request(0, 0, 0, 64 << 20, &[]).unwrap();
    assert_eq!(c.reply().unwrap(), (h, 22));
    let h = c.raw_request(0, 0, u64::MAX - 10, 100, &[]).unwrap();
    assert_eq!(c.reply().unwrap(), (h, 22));
    assert_eq!(c.read(GIB - 100, 100).unwrap(), vec![0u8; 100]);
    c.disconnect();

    works(&site);
    assert!(site.child.as_ref().is_some());
    let mut site = site;
    assert!(site.child.as_mut().unwrap().try_wait().unwrap().is_none(), "site died; log:\n{}", site.log());
    assert!(!site.log().contains("panicked"), "site log:\n{}", site.log());
}

// ---------------------------------------------------------------------------
// 8. seeded fuzz of malformed traffic against the live server

fn opt_header(opt: u32, len: u32) -> Vec<u8> {
    let mut b = common::nbd_client::IHAVEOPT.to_be_bytes().to_vec();
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// Reads one simple reply (16 bytes) within `limit`.
fn simple_reply(s: &mut TcpStream) -> std::io::Result<(u32, u64)> {
    let mut r = [0u8; 16];
    s.read_exact(&mut r)?;
    let magic = u32::from_be_bytes(r[0..4].try_into().unwrap());
    if magic != 0x67446698 {
        return Err(std::io::Error::other(format!("reply magic {magic:#x}")));
    }
    Ok((u32::from_be_bytes(r[4..8].try_into().unwrap()), u64::from_be_bytes(r[8..16].try_into().unwrap())))
}

fn fuzz_length(rng: &mut StdRng) -> u32 {
    match rng.random_range(0..6) {
        0 => rng.random_range(0..64),
        1 => rng.random_range(0..=64 * 1024),
        2 => rng.random_range(64 * 1024 + 1..=1024 * 1024),
        3 => rng.random_range(1024 * 1024 + 1..=u32::MAX),
        4 => u32::MAX,
        _ => rng.random_range(0..4096),
    }
}

static REQUESTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// One fuzz connection; returns a short description of what happened.
fn fuzz_one(addr: &str, size: u64, rng: &mut StdRng, n: usize) -> Result<&'static str, String> {
    let ctx = |what: &str, e: &dyn std::fmt::Display| format!("connection {n} ({what}): {e}");
    match rng.random_range(0..4) {
        // Random bytes right after the greeting.
        0 => {
            let mut s = TcpStream::connect(addr).map_err(|e| ctx("connect", &e))?;
            s.set_read_timeout(Some(TIMEOUT)).unwrap();
            let mut g = [0u8; 18];
            s.read_exact(&mut g).map_err(|e| ctx("greeting", &e))?;
            let mut junk = vec![0u8; rng.random_range(0..512)];
            rng.fill_bytes(&mut junk);
            let _ = s.write_all(&junk);
            let _ = s.shutdown(Shutdown::Write);
            read_to_eof(&mut s, TIMEOUT).map_err(|e| ctx("garbage after greeting", &e))?;
            Ok("garbage")
        }
        // Random options with random (possibly huge) lengths.
        1 => {
            let mut s = greet(addr);
            // Drawn before any I/O so the sequence does not depend on timing.
            let mut msgs = Vec::new();
            for _ in 0..rng.random_range(1..6) {
                let opt = if rng.random_bool(0.5) { rng.random_range(0..12) } else { rng.random() };
                let len = fuzz_length(rng);
                let send = (len as usize).min(rng.random_range(0..8192));
                let mut b = opt_header(opt, len);
                let mut d = vec![0u8; send];
                rng.fill_bytes(&mut d);
                b.extend_from_slice(&d);
                msgs.push((b, send as u32 == len));
            }
            for (b, complete) in msgs {
                if s.write_all(&b).is_err() || !complete {
                    break; // the server closed already, or it waits for the rest
                }
            }
            let _ = s.shutdown(Shutdown::Write);
            read_to_eof(&mut s, TIMEOUT).map_err(|e| ctx("random options", &e))?;
            Ok("options")
        }
        // Well-formed options with random data (names, contexts, info requests).
        2 => {
            let mut s = greet(addr);
            let mut msgs = Vec::new();
            for _ in 0..rng.random_range(1..8) {
                let opt = [1u32, 2, 3, 5, 6, 7, 8, 9, 10][rng.random_range(0..9)];
                let mut d = vec![0u8; rng.random_range(0..300)];
                rng.fill_bytes(&mut d);
                if rng.random_bool(0.5) && d.len() >= 4 {
                    // A plausible length prefix that may or may not fit.
                    let l = rng.random_range(0..d.len() as u32 + 8);
                    d[0..4].copy_from_slice(&l.to_be_bytes());
                }
                msgs.push((opt, d));
            }
            for (opt, d) in msgs {
                if send_option(&mut s, opt, &d).is_err() {
                    break;
                }
            }
            let _ = s.shutdown(Shutdown::Write);
            read_to_eof(&mut s, TIMEOUT).map_err(|e| ctx("option data", &e))?;
            Ok("option-data")
        }
        // Random transmission requests after a proper GO, one at a time.
        _ => {
            let mut c = Client::connect(addr, "vol0").map_err(|e| ctx("GO", &e))?;
            c.s.set_read_timeout(Some(TIMEOUT)).unwrap();
            c.s.set_write_timeout(Some(TIMEOUT)).unwrap();
            for _ in 0..rng.random_range(1..60) {
                let kind: u16 = match rng.random_range(0..100) {
                    0 => 2, // NBD_CMD_DISC, rarely: it ends the connection
                    1..=5 => rng.random(),
                    6..=40 => 0,
                    41..=70 => 1,
                    _ => [3u16, 4, 5, 6, 7, 8, 9][rng.random_range(0..7)],
                };
                let flags: u16 = if rng.random_bool(0.7) { rng.random_range(0..2) } else { rng.random() };
                let offset: u64 = match rng.random_range(0..4) {
                    0 => rng.random_range(0..size),
                    1 => size - rng.random_range(0..8192).min(size),
                    2 => rng.random(),
                    _ => rng.random_range(0..1 << 20),
                };
                let len: u32 = match rng.random_range(0..20) {
                    0..=7 => rng.random_range(0..8192),
                    8..=12 => rng.random_range(0..=65536),
                    13 => rng.random_range(32 * 1024 * 1024 + 1..=u32::MAX),
                    14 => rng.random(),
                    15 => 32 * 1024 * 1024 + rng.random_range(0..2),
                    _ => rng.random_range(0..=1 << 20),
                };
                let len = if kind == 1 && len > 1 << 20 && rng.random_bool(0.8) { len % 65536 } else { len };
                REQUESTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if kind == 2 {
                    c.raw_request(2, 0, 0, 0, &[]).map_err(|e| ctx("disc", &e))?;
                    read_to_eof(&mut c.s, TIMEOUT).map_err(|e| ctx("after NBD_CMD_DISC", &e))?;
                    return Ok("disc");
                }
                if kind == 1 {
                    if len > 32 * 1024 * 1024 {
                        // Oversized write: the server must close (no reply, no allocation).
                        let _ = c.raw_request(1, flags, offset, len, &[0u8; 1000]);
                        let _ = c.s.shutdown(Shutdown::Write);
                        let n = read_to_eof(&mut c.s, TIMEOUT).map_err(|e| ctx("oversized write", &e))?;
                        if n != 0 {
                            return Err(ctx("oversized write", &format!("got {n} bytes of reply instead of a close")));
                        }
                        return Ok("oversized-write");
                    }
                    if len > 1 << 20 {
                        // Cut the payload short and hang up.
                        let _ = c.raw_request(1, flags, offset, len, &vec![0u8; 4096]);
                        let _ = c.s.shutdown(Shutdown::Write);
                        read_to_eof(&mut c.s, TIMEOUT).map_err(|e| ctx("short write", &e))?;
                        return Ok("short-write");
                    }
                }
                let payload = if kind == 1 {
                    let mut p = vec![0u8; len as usize];
                    rng.fill_bytes(&mut p);
                    p
                } else {
                    Vec::new()
                };
                let h = c.raw_request(kind, flags, offset, len, &payload).map_err(|e| ctx("request", &e))?;
                let (err, rh) = simple_reply(&mut c.s).map_err(|e| ctx(&format!("reply to kind {kind} flags {flags:#x} {offset}+{len}"), &e))?;
                if rh != h {
                    return Err(ctx("reply", &format!("handle {rh} for request {h}")));
                }
                let past_end = offset.checked_add(len as u64).is_none_or(|e| e > size);
                if kind == 0 && (past_end || len > 32 * 1024 * 1024) && err != 22 {
                    return Err(ctx("read", &format!("{offset}+{len} past the end / too big answered {err}, not EINVAL")));
                }
                if ![0u32, 1, 5, 22, 28, 75, 95, 108].contains(&err) {
                    return Err(ctx("reply", &format!("unexpected errno {err} for kind {kind} flags {flags:#x} {offset}+{len}")));
                }
                if kind == 0 && err == 0 {
                    let mut d = vec![0u8; len as usize];
                    c.s.read_exact(&mut d).map_err(|e| ctx("read payload", &e))?;
                }
            }
            let _ = c.s.shutdown(Shutdown::Write);
            read_to_eof(&mut c.s, TIMEOUT).map_err(|e| ctx("end of transmission", &e))?;
            Ok("requests")
        }
    }
}

#[test]
fn bad_input_fuzz_live() {
    let mut site = Site::start(&[("vol0", "1GiB")]);
    let addr = site.addr();
    let rss_before = site.rss_bytes();
    let t = Instant::now();
    // Four threads of 50 connections each, seeded.
    let threads: Vec<_> = (0..4u64)
        .map(|k| {
            let addr = addr.clone();
            std::thread::spawn(move || {
                let mut rng = StdRng::seed_from_u64(0xf022 + k);
                let mut kinds = std::collections::BTreeMap::new();
                for n in 0..50 {
                    let what = fuzz_one(&addr, GIB, &mut rng, k as usize * 1000 + n)?;
                    *kinds.entry(what).or_insert(0) += 1;
                }
                Ok::<_, String>(kinds)
            })
        })
        .collect();
    let mut failures = Vec::new();
    for t in threads {
        match t.join() {
            Ok(Ok(k)) => eprintln!("fuzz: {k:?}"),
            Ok(Err(e)) => failures.push(e),
            Err(p) => failures.push(format!("fuzz thread panicked: {p:?}")),
        }
    }
    eprintln!("fuzz: 200 connections, {} transmission requests, in {:?}", REQUESTS.load(std::sync::atomic::Ordering::Relaxed), t.elapsed());
    assert!(site.child.as_mut().unwrap().try_wait().unwrap().is_none(), "site died; log:\n{}", site.log());
    assert!(failures.is_empty(), "fuzz failures:\n{}", failures.join("\n"));
    let rss_after = site.rss_bytes();
    assert!(rss_after < rss_before + 512 * MIB, "RSS grew from {rss_before} to {rss_after}");

    let u = site.uri("vol0");
    qemu_io(&u, &["write -P 0x3c 900M 1M", "read -P 0x3c 900M 1M", "write -P 0x3d 901M 777", "read -P 0x3d 901M 777", "flush"]);
    qemu_io(&u, &["read -P 0x3c 900M 1M"]);
    works(&site);
    let log = site.log();
    assert!(!log.contains("panicked"), "site log has a panic:\n{log}");
}
