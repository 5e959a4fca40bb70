//! Test support: run the real `tidemark` binary as a site process on free
//! loopback ports, kill it, restart it; run external tools; a small NBD
//! client for tests that must know exactly which writes were acknowledged.
#![allow(dead_code)]

pub mod nbd_client;
pub mod proxy;

use std::io::Read as _;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tidemark"))
}

static NEXT_PORT: AtomicU16 = AtomicU16::new(0);

/// Test ports stay in PORTS_FROM..PORTS_TO, below the kernel's ephemeral
/// range (32768–60999 here): a site restarted on its port after kill -9
/// must not find it taken as the local port of some outgoing connection
/// (it happened: "failed to listen for NBD on 127.0.0.1:36902").
const PORTS_FROM: u16 = 10000;
const PORTS_TO: u16 = 32000;

/// `n` consecutive ports from this process's range (each test binary starts
/// at its own place in it, so parallel tests do not race for the same one).
fn next_ports(n: u16) -> u16 {
    if NEXT_PORT.load(Ordering::Relaxed) == 0 {
        let base = PORTS_FROM + (std::process::id() % 200) as u16 * 100;
        let _ = NEXT_PORT.compare_exchange(0, base, Ordering::Relaxed, Ordering::Relaxed);
    }
    loop {
        let p = NEXT_PORT.fetch_add(n, Ordering::Relaxed);
        if p.checked_add(n).is_some_and(|end| end <= PORTS_TO) {
            return p;
        }
        // Wrapped: start over at the bottom (binds are checked anyway).
        let _ = NEXT_PORT.compare_exchange(p.wrapping_add(n), PORTS_FROM, Ordering::Relaxed, Ordering::Relaxed);
    }
}

/// A loopback port that is free now.
pub fn free_port() -> u16 {
    loop {
        let p = next_ports(1);
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// A base port P with P..P+40 free and reserved for this test (for `up`,
/// which uses P+i, P+10+i, P+20+i and P+30).
pub fn free_port_block() -> u16 {
    loop {
        let p = next_ports(40);
        if (p..p + 40).all(|q| std::net::TcpListener::bind(("127.0.0.1", q)).is_ok()) {
            return p;
        }
    }
}

pub struct Site {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub nbd_port: u16,
    pub api_port: u16,
    pub child: Option<Child>,
    _tmp: Option<tempfile::TempDir>,
}

impl Site {
    /// Starts a primary site with the given volumes (name, size) in group cg0.
    pub fn start(volumes: &[(&str, &str)]) -> Site {
        Site::start_with_role(volumes, "primary")
    }

    /// Starts a site with the given role ("primary" or "secondary").
    pub fn start_with_role(volumes: &[(&str, &str)], role: &str) -> Site {
        let tmp = tempfile::Builder::new().prefix("tidemark-test").tempdir_in(test_root()).unwrap();
        let mut s = Site::configure(tmp.path(), volumes);
        if role != "primary" {
            let cfg = std::fs::read_to_string(&s.config).unwrap().replace("role = \"primary\"", &format!("role = \"{role}\""));
            std::fs::write(&s.config, cfg).unwrap();
        }
        s._tmp = Some(tmp);
        s.spawn();
        s
    }

    pub fn configure(dir: &Path, volumes: &[(&str, &str)]) -> Site {
        let nbd_port = free_port();
        let api_port = free_port();
        let mut cfg = format!(
            "name = \"a\"\nrole = \"primary\"\ndata_dir = \".\"\nnbd_listen = \"127.0.0.1:{nbd_port}\"\napi_listen = \"127.0.0.1:{api_port}\"\n"
        );
        for (n, sz) in volumes {
            cfg.push_str(&format!("[[volume]]\nname = \"{n}\"\nsize = \"{sz}\"\ngroup = \"cg0\"\n"));
        }
        let config = dir.join("site.toml");
        std::fs::write(&config, cfg).unwrap();
        Site { dir: dir.to_path_buf(), config, nbd_port, api_port, child: None, _tmp: None }
    }

    /// Starts the process and waits until NBD accepts connections.
    /// Returns how long that took.
    pub fn spawn(&mut self) -> Duration {
        let t = Instant::now();
        let log = std::fs::File::options().create(true).append(true).open(self.dir.join("site.log")).unwrap();
        let child = Command::new(bin())
            .arg("site")
            .arg("--config")
            .arg(&self.config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(mut c) = TcpStream::connect(("127.0.0.1", self.nbd_port)) {
                // Ready means our site greets: not just something that
                // accepts a connection on the port.
                let mut magic = [0u8; 8];
                c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                match c.read_exact(&mut magic) {
                    Ok(()) if &magic == b"NBDMAGIC" => return t.elapsed(),
                    r => panic!("port {} answered but not with an NBD greeting ({r:?}, {magic:?}); site log:\n{}", self.nbd_port, self.log()),
                }
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("site exited during start ({st}); log:\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "site did not start; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("site.log")).unwrap_or_default()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let st = c.wait().unwrap();
            assert!(st.success(), "site exited with {st} on SIGTERM; log:\n{}", self.log());
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.nbd_port)
    }

    pub fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.nbd_port)
    }

    pub fn metrics(&self) -> String {
        let out = cmd_ok("curl", &["-sf", &format!("{}/metrics", self.api())]);
        String::from_utf8(out.stdout).unwrap()
    }

    /// Value of a metric line that starts with `prefix` (name and labels).
    pub fn metric(&self, prefix: &str) -> f64 {
        let m = self.metrics();
        m.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("metric {prefix} not found in:\n{m}"))
    }

    /// Resident set size of the site process, in bytes.
    pub fn rss_bytes(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let kb: u64 = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
        kb * 1024
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failed test: say whether the site was still running and
            // keep the end of its log (its directory goes with the test).
            let state = match self.child.as_mut().map(|c| c.try_wait()) {
                Some(Ok(Some(st))) => format!("had exited ({st})"),
                Some(Ok(None)) => "was running".to_string(),
                Some(Err(e)) => format!("unknown state ({e})"),
                None => "not started".to_string(),
            };
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(80)..].join("\n");
            eprintln!("site in {} (NBD port {}) {state}; the last {} lines of its log:\n{tail}", self.dir.display(), self.nbd_port, lines.len().min(80));
        }
        self.kill9();
    }
}

/// Where tests put their data: on the same disk as the repo (not tmpfs), so
/// fsync and space behave as in production.
pub fn test_root() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(&p).unwrap();
    p
}

pub fn cmd(prog: &str, args: &[&str]) -> Output {
    Command::new(prog).args(args).stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("cannot run {prog}: {e}"))
}

/// Runs a command and asserts it succeeded, showing its output if not.
pub fn cmd_ok(prog: &str, args: &[&str]) -> Output {
    let o = cmd(prog, args);
    assert!(
        o.status.success(),
        "{prog} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Runs the tidemark CLI.
pub fn tidemark(args: &[&str]) -> Output {
    Command::new(bin()).args(args).stdin(Stdio::null()).output().unwrap()
}

pub fn sha256_file(p: &Path) -> String {
    use sha2::Digest;
    let mut f = std::fs::File::open(p).unwrap();
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    format!("{:x}", h.finalize())
}

/// Disk bytes used by a directory tree (allocated blocks, like `du`).
pub fn disk_usage(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut n = 0;
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap();
        let m = e.metadata().unwrap();
        if m.is_dir() {
            n += disk_usage(&e.path());
        } else {
            n += m.blocks() * 512;
        }
    }
    n
}

/// A multi-site deployment made by `tidemark init`, each site run by the
/// test as its own process (so it can be killed and restarted at will).
pub struct Deployment {
    pub dir: PathBuf,
    pub sites: Vec<Site>,
    _tmp: tempfile::TempDir,
}

impl Deployment {
    /// `tidemark init` with the given sites (primary first) on a free port
    /// block; the primary's volumes are replaced by `volumes`; `mode` is the
    /// groups' replication mode. Sites are configured but not started.
    pub fn init(names: &[&str], volumes: &[(&str, &str)], mode: &str) -> Deployment {
        let tmp = tempfile::Builder::new().prefix("tidemark-dep").tempdir_in(test_root()).unwrap();
        let dir = tmp.path().join("d");
        let port = free_port_block();
        let o = tidemark(&["init", dir.to_str().unwrap(), "--sites", &names.join(","), "--port-base", &port.to_string(), "--mode", mode]);
        assert!(o.status.success(), "init failed: {}", String::from_utf8_lossy(&o.stderr));
        let mut sites = Vec::new();
        for (i, n) in names.iter().enumerate() {
            let sdir = dir.join(n);
            let config = sdir.join("site.toml");
            let mut cfg = std::fs::read_to_string(&config).unwrap();
            // Short heartbeats so tests see them quickly.
            cfg = cfg.replace("heartbeat_interval_ms = 1000", "heartbeat_interval_ms = 200");
            if i == 0 {
                let start = cfg.find("[[volume]]").expect("primary has volumes");
                let end = ["[[peer]]", "[tls]"].iter().filter_map(|m| cfg[start..].find(m)).min().map(|e| start + e).unwrap_or(cfg.len());
                let mut vols = String::new();
                for (vn, sz) in volumes {
                    vols.push_str(&format!("[[volume]]\nname = \"{vn}\"\nsize = \"{sz}\"\ngroup = \"cg0\"\n\n"));
                }
                cfg.replace_range(start..end, &vols);
            }
            std::fs::write(&config, cfg).unwrap();
            sites.push(Site {
                dir: sdir,
                config,
                nbd_port: port + i as u16,
                api_port: port + 10 + i as u16,
                child: None,
                _tmp: None,
            });
        }
        if std::env::var("TIDEMARK_KEEP").is_ok() {
            eprintln!("keeping {}", tmp.path().display());
            std::mem::forget(tmp);
            return Deployment { dir, sites, _tmp: tempfile::tempdir().unwrap() };
        }
        Deployment { dir, sites, _tmp: tmp }
    }

    pub fn start_all(&mut self) {
        // DR sites first, so the primary finds them listening.
        for s in self.sites.iter_mut().skip(1) {
            s.spawn();
        }
        self.sites[0].spawn();
    }

    pub fn primary(&mut self) -> &mut Site {
        &mut self.sites[0]
    }

    /// Replication listener port of site i.
    pub fn repl_port(&self, i: usize) -> u16 {
        self.sites[0].nbd_port + 20 + i as u16
    }
}

impl Site {
    /// `GET /status` as JSON.
    pub fn status(&self) -> serde_json::Value {
        let out = cmd_ok("curl", &["-sf", &format!("{}/status", self.api())]);
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Rewrites this site's config with `f`, which must change it (a
    /// `replace` whose text is no longer in the config would otherwise
    /// leave the test running with the default).
    pub fn edit_config(&self, f: impl FnOnce(String) -> String) {
        let c = std::fs::read_to_string(&self.config).unwrap();
        let edited = f(c.clone());
        assert_ne!(edited, c, "the edit left {} unchanged:\n{c}", self.config.display());
        std::fs::write(&self.config, edited).unwrap();
    }
}

/// Polls `f` every 50 ms until it returns true or `secs` pass.
pub fn wait_until(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {secs} s waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn sha256_of(b: &[u8]) -> String {
    use sha2::Digest;
    format!("{:x}", sha2::Sha256::digest(b))
}

/// Undoes a frozen ext4 on a loop device, even when the test panics: thaw,
/// stop the site (it holds files there), unmount, detach.
pub struct FrozenDisk {
    pub mnt: std::path::PathBuf,
    loopdev: Option<String>,
    mounted: bool,
    pub site: Option<Site>,
}

impl FrozenDisk {
    /// A fresh 256 MiB ext4 on a loop device, mounted at `dir/mnt` (its
    /// image in `dir`, which must outlive it).
    pub fn mount(dir: &std::path::Path) -> FrozenDisk {
        let img = dir.join("disk.img");
        std::fs::File::create(&img).unwrap().set_len(256 << 20).unwrap();
        cmd_ok("mkfs.ext4", &["-q", "-F", img.to_str().unwrap()]);
        let mnt = dir.join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let mut disk = FrozenDisk { mnt: mnt.clone(), loopdev: None, mounted: false, site: None };
        let dev = String::from_utf8(cmd_ok("losetup", &["-f", "--show", img.to_str().unwrap()]).stdout).unwrap().trim().to_string();
        disk.loopdev = Some(dev.clone());
        cmd_ok("mount", &[&dev, mnt.to_str().unwrap()]);
        disk.mounted = true;
        disk
    }
}

impl Drop for FrozenDisk {
    fn drop(&mut self) {
        let m = self.mnt.to_str().unwrap().to_string();
        let _ = cmd("fsfreeze", &["--unfreeze", &m]);
        drop(self.site.take());
        if self.mounted && !cmd("umount", &[&m]).status.success() {
            let _ = cmd("umount", &["-l", &m]);
        }
        if let Some(d) = self.loopdev.take() {
            let _ = cmd("losetup", &["-d", &d]);
        }
    }
}


/// An ext4 whose reads can be made to stall: nbdkit serves an image over a
/// Unix socket, nbdfuse shows it as a file, a loop device over that file
/// holds the ext4, mounted at `dir/mnt`. `stall` stops nbdkit (SIGSTOP), so
/// every read the page cache cannot answer waits, as on a dying drive;
/// `answer` lets it go on. Undone on drop, even when the test panics.
pub struct StallingDisk {
    pub mnt: std::path::PathBuf,
    fuse: std::path::PathBuf,
    nbdkit: Option<std::process::Child>,
    nbdfuse: Option<std::process::Child>,
    loopdev: Option<String>,
    mounted: bool,
    pub site: Option<Site>,
}

impl StallingDisk {
    pub fn mount(dir: &std::path::Path) -> StallingDisk {
        let img = dir.join("disk.img");
        std::fs::File::create(&img).unwrap().set_len(256 << 20).unwrap();
        let (mnt, fuse, sock, pid) = (dir.join("mnt"), dir.join("fuse"), dir.join("nbd.sock"), dir.join("nbdkit.pid"));
        std::fs::create_dir(&mnt).unwrap();
        std::fs::create_dir(&fuse).unwrap();
        let mut disk = StallingDisk { mnt, fuse: fuse.clone(), nbdkit: None, nbdfuse: None, loopdev: None, mounted: false, site: None };
        let quiet = |c: &mut std::process::Command| c.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null()).spawn().unwrap();
        disk.nbdkit = Some(quiet(std::process::Command::new("nbdkit").args(["-f", "-P", pid.to_str().unwrap(), "-U", sock.to_str().unwrap(), "file", img.to_str().unwrap()])));
        // The pid file is written once nbdkit listens.
        wait_until(10, "nbdkit's pid file", || pid.exists());
        let file = fuse.join("disk");
        disk.nbdfuse = Some(quiet(std::process::Command::new("nbdfuse").arg(&file).arg(format!("nbd+unix:///?socket={}", sock.display()))));
        wait_until(10, "nbdfuse's file", || std::fs::metadata(&file).is_ok_and(|m| m.len() == 256 << 20));
        let dev = String::from_utf8(cmd_ok("losetup", &["-f", "--show", file.to_str().unwrap()]).stdout).unwrap().trim().to_string();
        disk.loopdev = Some(dev.clone());
        cmd_ok("mkfs.ext4", &["-q", "-F", &dev]);
        cmd_ok("mount", &[&dev, disk.mnt.to_str().unwrap()]);
        disk.mounted = true;
        disk
    }

    fn signal(&self, sig: &str) {
        if let Some(c) = &self.nbdkit {
            let _ = cmd("kill", &[sig, &c.id().to_string()]);
        }
    }

    /// Reads that miss the page cache wait from now on. This disk's pages
    /// are dropped first (its file system synced, then every file on it
    /// and the file under the loop device dropped from the page cache), so
    /// that reads of what is on it miss; nothing else's cache is touched.
    pub fn stall(&self) {
        cmd_ok("sync", &["-f", self.mnt.to_str().unwrap()]);
        fn files(d: &Path, out: &mut Vec<PathBuf>) {
            for e in std::fs::read_dir(d).unwrap().flatten() {
                let t = e.file_type().unwrap();
                if t.is_dir() {
                    files(&e.path(), out);
                } else if t.is_file() {
                    out.push(e.path());
                }
            }
        }
        let mut all = vec![self.fuse.join("disk")];
        files(&self.mnt, &mut all);
        for f in &all {
            // count=0 with iflag=nocache: drop the whole file's cached pages.
            cmd_ok("dd", &[&format!("if={}", f.display()), "iflag=nocache", "count=0", "status=none"]);
        }
        self.signal("-STOP");
    }

    pub fn answer(&self) {
        self.signal("-CONT");
    }
}

impl Drop for StallingDisk {
    fn drop(&mut self) {
        self.answer();
        drop(self.site.take());
        let m = self.mnt.to_str().unwrap().to_string();
        if self.mounted && !cmd("umount", &[&m]).status.success() {
            let _ = cmd("umount", &["-l", &m]);
        }
        if let Some(d) = self.loopdev.take() {
            let _ = cmd("losetup", &["-d", &d]);
        }
        if let Some(mut c) = self.nbdfuse.take() {
            let f = self.fuse.to_str().unwrap().to_string();
            if !cmd("fusermount3", &["-u", &f]).status.success() {
                let _ = cmd("fusermount3", &["-uz", &f]);
            }
            std::thread::sleep(Duration::from_millis(200));
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(mut c) = self.nbdkit.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
