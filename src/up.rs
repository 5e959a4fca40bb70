//! `tidemark up`: a whole deployment on one machine. Writes each site's
//! config under `DIR/<site>/`, starts the sites as child processes,
//! waits until each serves NBD and its API, writes `DIR/endpoints.json`,
//! prints the `ready` event, restarts a site that dies, and on
//! SIGINT/SIGTERM stops them all cleanly.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::limits;
use crate::outlet::{OnFail, Outlet};
use crate::site::config::{PeerSpec, Role, SiteConfig, VolumeSpec};

pub struct UpArgs {
    pub dir: PathBuf,
    pub port_base: Option<u16>,
    pub dr_sites: Option<u32>,
    pub volumes: Vec<(String, u64)>,
    pub mode: Option<String>,
    pub json: bool,
}

/// What `up` records about a deployment, so that a second `up` resumes it.
#[derive(Serialize, Deserialize, Debug, Clone)]
struct Deployment {
    id: String,
    port_base: u16,
    dr_sites: u32,
    mode: String,
}

const DEPLOYMENT_FILE: &str = "deployment.json";

pub fn site_name(i: u32) -> String {
    ((b'a' + i as u8) as char).to_string()
}

/// `up`'s own output: events on stdout (JSON lines with `--json`) and its
/// sites' warnings on stderr, each through an `Outlet`, so that a reader
/// that stops reading or goes away (`up --json | head -1`) holds up no
/// supervision and no site (ARCHITECTURE.md "`up`'s output never holds it
/// up").
struct Output {
    json: bool,
    events: Outlet,
    echo: Outlet,
}

impl Output {
    fn start(json: bool) -> Result<Output> {
        let stderr_note = |what: &'static str| -> OnFail {
            Box::new(move |e| {
                let _ = writeln!(std::io::stderr(), "tidemark up: cannot write {what} any more ({e}); the sites keep running, and `tidemark status` shows their state");
            })
        };
        let events = Outlet::start(
            "up-events",
            Box::new(std::io::stdout()),
            limits::UP_OUTPUT_QUEUE_MAX,
            Box::new(move |n| {
                if json {
                    format!("{}\n", json!({"event": "events-dropped", "count": n}))
                } else {
                    format!("{n} events were not printed here: stdout was not being read\n")
                }
            }),
            stderr_note("events to stdout"),
        )?;
        let echo = Outlet::start(
            "up-echo",
            Box::new(std::io::stderr()),
            limits::UP_OUTPUT_QUEUE_MAX,
            Box::new(|n| format!("tidemark up: {n} warning lines of the sites were not echoed here (stderr was not being read); their log files have them\n")),
            // Where else would it say so: the sites' log files keep everything.
            Box::new(|_| {}),
        )?;
        Ok(Output { json, events, echo })
    }

    fn emit(&self, v: serde_json::Value, human: &str) {
        self.events.send(if self.json { format!("{v}\n") } else { format!("{human}\n") });
    }

    /// An event whose human form is `human_event`'s.
    fn emit_event(&self, v: serde_json::Value) {
        let human = human_event(&v);
        self.emit(v, &human);
    }

    /// An `error` event about `site`.
    fn error(&self, site: &str, e: &str) {
        self.emit(json!({"event": "error", "site": site, "error": e}), &format!("site {site}: {e}"));
    }

    /// Before `up` exits: its last events and echoes are out, if the
    /// readers read within `limit`.
    fn drain(&self, limit: Duration) {
        self.events.drain(limit);
        self.echo.drain(limit);
    }
}

fn check_dir(dir: &Path) -> Result<Option<Deployment>> {
    if dir.exists() {
        if !dir.is_dir() {
            bail!("{} exists and is not a directory", dir.display());
        }
        let dep = dir.join(DEPLOYMENT_FILE);
        if dep.exists() {
            let d: Deployment = serde_json::from_slice(&std::fs::read(&dep)?)
                .with_context(|| format!("{} is not a tidemark deployment file", dep.display()))?;
            check_deployment(&d).with_context(|| format!("{} is not a deployment `up` can run", dep.display()))?;
            return Ok(Some(d));
        }
        // A lone up.lock is what an `up` that failed before making the
        // deployment leaves: not a reason to refuse the directory.
        // Nor is another `up`'s write probe (it may be looking at the
        // same new directory just now).
        let non_empty = std::fs::read_dir(dir)?.any(|e| e.map_or(true, |e| e.file_name() != "up.lock" && e.file_name() != ".write-test"));
        if non_empty {
            bail!("{} holds files but no {DEPLOYMENT_FILE}: it is not a tidemark deployment (use an empty or new directory)", dir.display());
        }
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"").with_context(|| format!("{} is not writable", dir.display()))?;
    let _ = std::fs::remove_file(probe);
    Ok(None)
}

/// What `prepare_sites` needs of a deployment, checked before its file is
/// written (a value refused only later would stay in the file, and every
/// later `up` in the directory would fail on it) and after it is read.
fn check_deployment(d: &Deployment) -> Result<()> {
    if d.dr_sites > 9 {
        bail!("{} DR sites: at most 9 (10 sites per deployment: ports P..P+9 are for NBD)", d.dr_sites);
    }
    if d.port_base as u32 + 30 > u16::MAX as u32 {
        bail!("port base {} leaves no room for the site ports (needs P..P+30)", d.port_base);
    }
    // Else each site config written from it fails, one by one.
    crate::replicate::Mode::parse(&d.mode).map_err(anyhow::Error::msg)?;
    Ok(())
}

fn port_free(addr: SocketAddr) -> bool {
    TcpListener::bind(addr).is_ok()
}

/// Port `P + off + i` of `dep` on 127.0.0.1: the `i`-th site's NBD
/// (`off` 0), API (10) or replication (20) address.
fn site_addr(dep: &Deployment, off: u32, i: usize) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], (dep.port_base as u32 + off + i as u32) as u16))
}

/// The ports of the `i`-th site (`name`) of `dep` are free: NBD `P+i`, API
/// `P+10+i`, replication `P+20+i` (CONTRACT.md; a primary listens on its
/// replication port too).
fn check_site_ports(dep: &Deployment, i: usize, name: &str) -> Result<()> {
    for (what, off) in [("NBD", 0), ("API", 10), ("replication", 20)] {
        let a = site_addr(dep, off, i);
        if !port_free(a) {
            bail!("port {} ({what} of site {name}) is in use", a.port());
        }
    }
    Ok(())
}

struct SiteProc {
    name: String,
    config: PathBuf,
    log: PathBuf,
    nbd: SocketAddr,
    api: SocketAddr,
    child: Option<Child>,
    /// Takes the running site's output to its log (`sitelog`).
    pump: Option<crate::sitelog::Pump>,
    /// When it was restarted in the last minute (a crash loop is paused).
    restarts: Vec<Instant>,
    /// Restarted, not serving yet.
    starting: Option<Starting>,
    /// Exited: when to start it again.
    restart_at: Option<Instant>,
    /// Restarts in a row that could not start the process (backoff).
    spawn_failures: u32,
    poll: Arc<PollState>,
}

#[derive(Clone, Copy)]
struct Starting {
    /// When it should serve by; past it, an `error` event (once), and it is
    /// still reported `site-restarted` if it serves later.
    by: Instant,
    late: bool,
}

/// How long a restarted site's API may take to answer the check of
/// whether it serves yet (each tick; a site that binds and then hangs
/// must not hold up supervision for `STATUS_POLL_LIMIT` a tick).
const START_PROBE_LIMIT: Duration = Duration::from_millis(500);

/// One step of supervision, which never waits on a site: a site that
/// exited is started again (at most `SITE_RESTARTS_PER_MINUTE_MAX` times a
/// minute, then after a pause of `SITE_RESTART_PAUSE_S`), and reported
/// restarted once it serves. A restart that cannot
/// start the process at all (its log file unopenable, no processes left)
/// is not a crash loop: it is tried again, backing off from 1 s to 32 s,
/// for as long as it takes. Before, `up` waited for a restarted site to
/// serve (up to a minute: a long log replay) with no signal handling and
/// no supervision of the others meanwhile, and a restart that could not
/// start the process ended `up`, and with it every healthy site.
/// True if a site's pid changed (exited, or started again).
fn supervise(procs: &mut [SiteProc], out: &Output, unanswered: &mut BTreeMap<String, Unanswered>) -> bool {
    let now = Instant::now();
    let mut changed = false;
    for p in procs.iter_mut() {
        if let Some(c) = p.child.as_mut() {
            let exited = match c.try_wait() {
                Ok(st) => st.map(|st| st.to_string()),
                Err(e) => {
                    // Cannot tell: make sure it is gone before another
                    // process opens its data.
                    let _ = c.kill();
                    let _ = c.wait();
                    Some(format!("cannot wait for it ({e}); killed"))
                }
            };
            if let Some(st) = exited {
                p.child = None;
                p.poll.active.store(false, Ordering::Release);
                p.poll.gen.fetch_add(1, Ordering::AcqRel);
                changed = true;
                // A new process starts with a clean record.
                unanswered.remove(&p.name);
                out.emit(json!({"event": "site-exited", "site": p.name, "status": st}), &format!("site {} exited ({st})", p.name));
                if p.starting.take().is_some() {
                    // What it said last says why.
                    out.error(&p.name, &exited_during_start(p, &st, Duration::from_millis(200)));
                }
                p.restart_at = Some(now);
            }
        }
        if p.child.is_none() && p.restart_at.is_some_and(|t| t <= now) {
            p.restart_at = None;
            p.restarts.retain(|t| now.duration_since(*t) < Duration::from_secs(60));
            if p.restarts.len() as u32 >= limits::SITE_RESTARTS_PER_MINUTE_MAX {
                // A crash loop: a pause, not the end (a DR site left down
                // for good over a passing shortage is the worse failure).
                let wait = Duration::from_secs(limits::SITE_RESTART_PAUSE_S);
                let e = format!("restarted {} times in the last minute; trying again in {} s (log: {})", p.restarts.len(), wait.as_secs(), p.log.display());
                out.error(&p.name, &e);
                p.restart_at = Some(now + wait);
                continue;
            }
            match spawn_site(p, &out.echo) {
                Ok(()) => {
                    p.restarts.push(now);
                    p.spawn_failures = 0;
                    p.starting = Some(Starting { by: now + Duration::from_millis(limits::SITE_START_TIMEOUT_MS), late: false });
                    changed = true;
                }
                Err(e) => {
                    let wait = Duration::from_secs(1 << p.spawn_failures.min(5));
                    p.spawn_failures += 1;
                    let e = format!("cannot restart it: {e:#}; trying again in {} s", wait.as_secs());
                    out.error(&p.name, &e);
                    p.restart_at = Some(now + wait);
                }
            }
        }
        if let Some(s) = p.starting {
            if serving(p, START_PROBE_LIMIT) {
                p.starting = None;
                p.poll.active.store(true, Ordering::Release);
                out.emit(json!({"event": "site-restarted", "site": p.name, "pid": p.child.as_ref().map(|c| c.id())}), &format!("site {} restarted", p.name));
            } else if !s.late && now > s.by {
                p.starting = Some(Starting { late: true, ..s });
                let e = format!("did not start serving within {} ms; left running (log: {})", limits::SITE_START_TIMEOUT_MS, p.log.display());
                out.error(&p.name, &e);
            }
        }
    }
    changed
}

/// What a site's poller thread found.
struct Poll {
    site: usize,
    /// `PollState::gen` when it asked.
    gen: u64,
    answer: std::result::Result<serde_json::Value, String>,
}

/// Shared by `up`'s loop and a site's poller: whether the site is running
/// and serving (polled), and which process that is (bumped at each exit).
#[derive(Default)]
struct PollState {
    active: AtomicBool,
    gen: AtomicU64,
}

/// One thread per site asks its status every 500 ms (each ask limited to
/// `STATUS_POLL_LIMIT`) and hands the answer to `up`'s loop. Before, the
/// loop asked the sites in turn, so one whose API hung held up, for 5 s a
/// round, the supervision of all the others: a crashed primary's restart,
/// and SIGTERM.
fn start_pollers(procs: &[SiteProc]) -> Result<std::sync::mpsc::Receiver<Poll>> {
    let (tx, rx) = std::sync::mpsc::channel();
    for (i, p) in procs.iter().enumerate() {
        p.poll.active.store(p.child.is_some() && p.starting.is_none(), Ordering::Release);
        let (tx, st, base) = (tx.clone(), p.poll.clone(), format!("http://{}", p.api));
        std::thread::Builder::new()
            .name(format!("up-poll-{}", p.name))
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(500));
                // `gen` first: an exit handled between the two loads then
                // shows as a stale `gen`, never as a new process's answer.
                let gen = st.gen.load(Ordering::Acquire);
                if !st.active.load(Ordering::Acquire) {
                    continue;
                }
                let answer = crate::client::call_within(&base, "GET", "/status", None, STATUS_POLL_LIMIT).map_err(|e| format!("{e:#}"));
                if tx.send(Poll { site: i, gen, answer }).is_err() {
                    break;
                }
            })
            .context("cannot start a status poller thread")?;
    }
    Ok(rx)
}

/// Each site's NBD and API address and pid, as in the ready event and
/// `endpoints.json`.
/// What `endpoints.json` holds.
fn endpoints_json(dep: &Deployment, procs: &[SiteProc]) -> serde_json::Value {
    json!({"deployment": dep.id, "sites": sites_json(procs)})
}

fn sites_json(procs: &[SiteProc]) -> BTreeMap<String, serde_json::Value> {
    procs
        .iter()
        .map(|p| (p.name.clone(), json!({"nbd": format!("nbd://{}", p.nbd), "api": format!("http://{}", p.api), "pid": p.child.as_ref().map(|c| c.id())})))
        .collect()
}

/// `endpoints.json` rewritten after a restart (the new pid), by a thread
/// of its own: the file is on the deployment's disk, and supervision must
/// not wait on a stalled one. The newest contents win; older ones not yet
/// written are skipped. A failed write is said on stderr.
struct Endpoints {
    slot: Arc<(Mutex<EndpointsSlot>, Condvar)>,
}

#[derive(Default)]
struct EndpointsSlot {
    /// Contents not written yet, with their number.
    pending: Option<(u64, Vec<u8>)>,
    /// Number of the last contents given, and of the last written.
    given: u64,
    written: u64,
}

impl Endpoints {
    fn start(path: PathBuf) -> Result<Endpoints> {
        let slot: Arc<(Mutex<EndpointsSlot>, Condvar)> = Arc::default();
        let s2 = slot.clone();
        std::thread::Builder::new()
            .name("up-endpoints".into())
            .spawn(move || loop {
                let (n, bytes) = {
                    let mut g = s2.0.lock().unwrap_or_else(|p| p.into_inner());
                    loop {
                        if let Some(b) = g.pending.take() {
                            break b;
                        }
                        g = s2.1.wait(g).unwrap_or_else(|p| p.into_inner());
                    }
                };
                if let Err(e) = crate::crashsafe::write_file(&path, &bytes) {
                    let _ = writeln!(std::io::stderr(), "tidemark up: cannot update {}: {e:#}", path.display());
                }
                s2.0.lock().unwrap_or_else(|p| p.into_inner()).written = n;
                s2.1.notify_all();
            })
            .context("cannot start the up-endpoints thread")?;
        Ok(Endpoints { slot })
    }

    /// Queues new contents; returns their number (for `flush`).
    fn set(&self, v: &serde_json::Value) -> u64 {
        let bytes = serde_json::to_string_pretty(v).unwrap_or_default().into_bytes();
        let mut g = self.slot.0.lock().unwrap_or_else(|p| p.into_inner());
        g.given += 1;
        let n = g.given;
        g.pending = Some((n, bytes));
        self.slot.1.notify_all();
        n
    }

    /// `set`, then waits at most `limit` for it to be written.
    fn write_within(&self, v: &serde_json::Value, limit: Duration) {
        let n = self.set(v);
        self.flush(n, limit);
    }

    /// Waits at most `limit` for contents `n` (or later) to be written.
    fn flush(&self, n: u64, limit: Duration) {
        let deadline = Instant::now() + limit;
        let mut g = self.slot.0.lock().unwrap_or_else(|p| p.into_inner());
        while g.written < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            g = self.slot.1.wait_timeout(g, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

/// The executable `up` runs, opened when it started: sites are started
/// from it, not from its path, which an upgrade in place may have given
/// to another file (or to none) since. Also the path, for their argv[0].
static OWN_EXE: std::sync::OnceLock<(File, PathBuf)> = std::sync::OnceLock::new();

fn own_exe() -> Result<&'static (File, PathBuf)> {
    if let Some(e) = OWN_EXE.get() {
        return Ok(e);
    }
    use std::os::unix::fs::OpenOptionsExt;
    let path = std::env::current_exe().context("cannot find the tidemark executable")?;
    // O_PATH: exec needs no read permission (an execute-only install).
    let file = File::options().read(true).custom_flags(libc::O_PATH).open("/proc/self/exe").context("cannot open the tidemark executable (/proc/self/exe)")?;
    Ok(OWN_EXE.get_or_init(|| (file, path)))
}

fn spawn_site(p: &mut SiteProc, echo: &Outlet) -> Result<()> {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let (exe, path) = own_exe()?;
    // Through `up`, not into the file: the file is on the site's disk, and
    // a site writing it would wait in the write when that disk stalls.
    let (out, err, pump) = crate::sitelog::Pump::start(&p.name, &p.log, echo.clone())?;
    // The child's copy of the descriptor (close-on-exec: gone once the
    // exec has opened the file).
    let mut cmd = Command::new(format!("/proc/self/fd/{}", exe.as_raw_fd()));
    cmd.arg0(path);
    cmd.arg("site").arg("--config").arg(&p.config).stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: prctl is async-signal-safe; the child dies with `up`.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| format!("failed to start site {}", p.name))?;
    p.child = Some(child);
    p.pump = Some(pump);
    Ok(())
}

/// Longest a status poll of a site waits (on its poller's thread:
/// `start_pollers`).
const STATUS_POLL_LIMIT: Duration = Duration::from_secs(5);

fn serving(p: &SiteProc, limit: Duration) -> bool {
    TcpStream::connect_timeout(&p.nbd, Duration::from_millis(200)).is_ok()
        && crate::client::call_within(&format!("http://{}", p.api), "GET", "/status", None, limit).is_ok()
}

/// Why `p` exited before it served: its status and the last line it
/// wrote (from its pump's memory, waiting up to `limit` for its output to
/// end; not from its log file, on a disk that may be stalled).
fn exited_during_start(p: &SiteProc, status: &str, limit: Duration) -> String {
    let last = p.pump.as_ref().map(|pump| pump.last_line(limit)).unwrap_or_default();
    format!("exited during start ({status}): {last} (log: {})", p.log.display())
}

/// At `up`'s start: waits until `p` serves. `Some(signal)`: a signal
/// came first (taken from `signals`).
fn wait_serving(p: &mut SiteProc, signals: &Signals) -> Result<Option<&'static str>> {
    let deadline = Instant::now() + Duration::from_millis(limits::SITE_START_TIMEOUT_MS);
    loop {
        if let Some(sig) = signals.pending() {
            return Ok(Some(sig));
        }
        if serving(p, START_PROBE_LIMIT) {
            return Ok(None);
        }
        if let Some(c) = p.child.as_mut() {
            if let Some(st) = c.try_wait()? {
                bail!("site {} {}", p.name, exited_during_start(p, &st.to_string(), Duration::from_secs(1)));
            }
        }
        if Instant::now() > deadline {
            bail!("site {} did not start serving within {} ms (log: {})", p.name, limits::SITE_START_TIMEOUT_MS, p.log.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGTERM to every site, then SIGKILL to any still running after
/// `SITE_STOP_TIMEOUT_MS`, each said as a `site-killed` event (a site
/// that had to be killed did not close cleanly: its last writes are safe
/// in its log, but its close (sync, checkpoint) did not run).
fn stop_all(procs: &mut [SiteProc], out: &Output) {
    for p in procs.iter_mut() {
        if let Some(c) = &p.child {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + Duration::from_millis(limits::SITE_STOP_TIMEOUT_MS);
    for p in procs.iter_mut() {
        if let Some(mut c) = p.child.take() {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        let why = format!("did not stop within {} s of SIGTERM (stuck, or stopped with SIGSTOP); killed with SIGKILL", limits::SITE_STOP_TIMEOUT_MS / 1000);
                        out.emit(json!({"event": "site-killed", "site": p.name, "error": why}), &format!("site {}: {why}", p.name));
                        break;
                    }
                }
            }
        }
    }
    // What the sites said last (a failed close) is in their logs before
    // `up` exits; bounded, as the disk holding them may be stalled.
    for p in procs.iter() {
        if let Some(pump) = &p.pump {
            pump.wait_written(Duration::from_secs(2));
        }
    }
}

/// Writes the PKI and each site's config (first time only) and returns
/// the sites to run. Site i gets NBD P+i, API P+10+i, replication P+20+i.
fn prepare_sites(dir: &Path, dep: &Deployment, names: &[String], volumes: &[VolumeSpec], check_ports: bool) -> Result<Vec<SiteProc>> {
    // `dep` passed `check_deployment` (its port base among others) when it
    // was made or read; the names may be more than its DR sites (`init`).
    if names.len() > 10 {
        bail!("at most 10 sites per deployment (ports P..P+9 are for NBD)");
    }
    crate::replicate::tls::create_deployment_pki(dir, &dep.id, names)?;
    let addr = |off: u32, i: usize| site_addr(dep, off, i);
    let mut procs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        crate::util::check_name("site", name).map_err(anyhow::Error::msg)?;
        let sdir = dir.join(name);
        std::fs::create_dir_all(&sdir)?;
        let (nbd, api, repl) = (addr(0, i), addr(10, i), addr(20, i));
        if check_ports {
            check_site_ports(dep, i, name)?;
        }
        let config = sdir.join("site.toml");
        if !config.exists() {
            // The primary replicates to every DR site; a DR site accepts the primary.
            let peers: Vec<PeerSpec> = if i == 0 {
                names.iter().enumerate().skip(1).map(|(j, n)| PeerSpec { name: n.clone(), repl: addr(20, j), lz4: false }).collect()
            } else {
                vec![PeerSpec { name: names[0].clone(), repl: addr(20, 0), lz4: false }]
            };
            let cfg = SiteConfig {
                name: name.clone(),
                role: if i == 0 { Role::Primary } else { Role::Secondary },
                data_dir: PathBuf::from("."),
                nbd_listen: nbd,
                api_listen: api,
                repl_listen: Some(repl),
                mode: dep.mode.clone(),
                // DR sites get their volumes through the replication stream.
                volumes: if i == 0 { volumes.to_vec() } else { Vec::new() },
                peers,
                tls: Default::default(),
                sync_loss: "async".into(),
                sync_timeout_ms: crate::limits::SYNC_TIMEOUT_MS_DEFAULT,
                heartbeat_interval_ms: crate::limits::HEARTBEAT_INTERVAL_MS_DEFAULT,
                link_timeout_ms: crate::limits::LINK_TIMEOUT_MS_DEFAULT,
                periodic_interval_s: crate::limits::PERIODIC_INTERVAL_S_DEFAULT,
                sender_nice: crate::limits::SENDER_NICE_DEFAULT,
                receiver_nice: crate::limits::RECEIVER_NICE_DEFAULT,
                replication_log_cap: "64GiB".into(),
                protect_snapshots: false,
                admin_peer_auth: true,
            };
            cfg.validate()?;
            crate::crashsafe::write_file(&config, cfg.to_toml().as_bytes())?;
        }
        procs.push(SiteProc { name: name.clone(), config, log: sdir.join("site.log"), nbd, api, child: None, pump: None, restarts: Vec::new(), starting: None, restart_at: None, spawn_failures: 0, poll: Arc::default() });
    }
    Ok(procs)
}

/// `tidemark init DIR --sites a,b[,c]`: a deployment's CA, certificates and
/// site configs, to run each site with `tidemark site --config`.
pub fn init(dir: &Path, sites: &[String], port_base: Option<u16>, mode: Option<String>) -> Result<()> {
    if sites.is_empty() {
        bail!("--sites needs at least one site name");
    }
    // The names before anything is written: a refused init leaves no
    // deployment file for the next one to take its port base from.
    let mut given = BTreeSet::new();
    for n in sites {
        crate::util::check_name("site", n).map_err(anyhow::Error::msg)?;
        if !given.insert(n.as_str()) {
            bail!("site {n} is listed twice (--sites)");
        }
    }
    let existing = check_dir(dir)?;
    let dep = match existing {
        Some(d) => {
            // Another port base or other sites would be ignored, or make a
            // site no other one knows: refused, as `up` refuses them.
            if let Some(p) = port_base.filter(|p| *p != d.port_base) {
                bail!("{} holds a deployment on port base {}, not {p}", dir.display(), d.port_base);
            }
            let mut have: Vec<String> = Vec::new();
            for e in std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))? {
                let e = e?;
                if e.path().join("site.toml").is_file() {
                    have.push(e.file_name().to_string_lossy().into_owned());
                }
            }
            have.sort();
            let mut want: Vec<String> = sites.to_vec();
            want.sort();
            if sites.len() as u32 - 1 != d.dr_sites || (!have.is_empty() && have != want) {
                bail!(
                    "{} holds a deployment of {} ({} DR sites), not of sites {}: make a new deployment in another directory",
                    dir.display(),
                    if have.is_empty() { "other sites".to_string() } else { format!("sites {}", have.join(",")) },
                    d.dr_sites,
                    sites.join(",")
                );
            }
            if let Some(m) = mode.as_ref().filter(|m| **m != d.mode) {
                eprintln!("tidemark: note: --mode {m} not applied: {} holds a deployment already, whose groups keep their mode (change it online: tidemark group set GROUP --mode {m})", dir.display());
            }
            d
        }
        None => {
            let d = Deployment {
                id: format!("{:016x}", crate::util::now_ns() ^ ((std::process::id() as u64) << 32)),
                port_base: port_base.unwrap_or(10809),
                dr_sites: sites.len() as u32 - 1,
                mode: mode.unwrap_or_else(|| "async".into()),
            };
            check_deployment(&d)?;
            crate::crashsafe::write_file(&dir.join(DEPLOYMENT_FILE), &serde_json::to_vec_pretty(&d)?)?;
            d
        }
    };
    let vols = vec![VolumeSpec { name: "vol0".into(), size: "1GiB".into(), group: "cg0".into() }];
    let procs = prepare_sites(dir, &dep, sites, &vols, false)?;
    for p in procs {
        println!("site {}: tidemark site --config {}", p.name, p.config.display());
    }
    Ok(())
}

pub fn run(a: UpArgs) -> Result<()> {
    own_exe()?;
    let dir = if a.dir.is_absolute() { a.dir.clone() } else { std::env::current_dir()?.join(&a.dir) };
    check_dir(&dir)?;
    let lock_path = dir.join("up.lock");
    let lock = File::options().create(true).truncate(false).write(true).open(&lock_path).with_context(|| format!("cannot open {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        bail!("{} is in use by another running `tidemark up`", dir.display());
    }
    // Again under the lock: another `up` may have made the deployment (or
    // failed half-way) between the first look and the lock.
    let existing = check_dir(&dir)?;
    let mut given = BTreeSet::new();
    for (n, _) in &a.volumes {
        if !given.insert(n) {
            bail!("volume {n} is given twice (--volume)");
        }
    }
    let dep = match existing {
        Some(d) => {
            if let Some(p) = a.port_base {
                if p != d.port_base {
                    bail!("{} holds a deployment on port base {}, not {p}", dir.display(), d.port_base);
                }
            }
            if let Some(n) = a.dr_sites {
                if n != d.dr_sites {
                    bail!("{} holds a deployment with {} DR sites, not {n}", dir.display(), d.dr_sites);
                }
            }
            // What only a new deployment takes: said, not silently dropped.
            if let Some(m) = a.mode.as_ref().filter(|m| **m != d.mode) {
                eprintln!("tidemark: note: --mode {m} not applied: {} holds a deployment already, whose groups keep their mode (change it online: tidemark group set GROUP --mode {m})", dir.display());
            }
            if !a.volumes.is_empty() {
                eprintln!("tidemark: note: --volume not applied: {} holds a deployment already, with its volumes (add one: tidemark volume create NAME --size SIZE)", dir.display());
            }
            d
        }
        None => {
            let d = Deployment {
                id: format!("{:016x}", crate::util::now_ns() ^ ((std::process::id() as u64) << 32)),
                port_base: a.port_base.unwrap_or(10809),
                dr_sites: a.dr_sites.unwrap_or(1),
                mode: a.mode.clone().unwrap_or_else(|| "async".into()),
            };
            check_deployment(&d)?;
            // Every port before anything is written: a deployment file made
            // here would tie the directory to a port base that was refused.
            for i in 0..=d.dr_sites as usize {
                check_site_ports(&d, i, &site_name(i as u32))?;
            }
            crate::crashsafe::write_file(&dir.join(DEPLOYMENT_FILE), &serde_json::to_vec_pretty(&d)?)?;
            d
        }
    };
    let volumes: Vec<VolumeSpec> = if a.volumes.is_empty() {
        vec![VolumeSpec { name: "vol0".into(), size: "1GiB".into(), group: "cg0".into() }]
    } else {
        a.volumes.iter().map(|(n, s)| VolumeSpec { name: n.clone(), size: s.to_string(), group: "cg0".into() }).collect()
    };
    let names: Vec<String> = (0..=dep.dr_sites).map(site_name).collect();
    let mut procs = prepare_sites(&dir, &dep, &names, &volumes, true)?;

    let signals = Signals::install()?;
    let out = Output::start(a.json)?;
    match run_sites(&dir, &dep, &mut procs, &signals, &out) {
        Ok(()) => Ok(()),
        Err(e) => {
            stop_all(&mut procs, &out);
            // No site runs: endpoints.json (if a run wrote it) names no pid.
            let path = dir.join("endpoints.json");
            if path.exists() {
                if let Ok(ep) = Endpoints::start(path) {
                    ep.write_within(&endpoints_json(&dep, &procs), Duration::from_secs(2));
                }
            }
            // Said through the outlet, behind what the sites said last
            // (the why, often), and not held up by a stderr nobody reads.
            out.echo.send(format!("tidemark: {e:#}\n"));
            out.drain(Duration::from_secs(2));
            Err(anyhow::Error::new(AlreadySaid))
        }
    }
}

/// An error `up` has already written on its stderr: `main` exits 1
/// without writing it again.
#[derive(Debug)]
pub struct AlreadySaid;

impl std::fmt::Display for AlreadySaid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("(said above)")
    }
}

impl std::error::Error for AlreadySaid {}

/// `up` once its output is set up: start the sites, say ready, supervise
/// until a signal. An error stops every site (the caller).
fn run_sites(dir: &Path, dep: &Deployment, procs: &mut [SiteProc], signals: &Signals, out: &Output) -> Result<()> {
    let stopped = |sig: &str, procs: &mut [SiteProc], endpoints: Option<&Endpoints>| {
        out.emit(json!({"event": "stopping", "signal": sig}), &format!("{sig}: stopping all sites"));
        stop_all(procs, out);
        // No site runs: endpoints.json says so (pid null) before `stopped`.
        if let Some(e) = endpoints {
            e.write_within(&endpoints_json(dep, procs), Duration::from_secs(2));
        }
        out.emit(json!({"event": "stopped"}), "stopped");
        out.drain(Duration::from_secs(2));
    };
    for p in procs.iter_mut() {
        spawn_site(p, &out.echo)?;
    }
    for i in 0..procs.len() {
        if let Some(sig) = wait_serving(&mut procs[i], signals)? {
            stopped(sig, procs, None);
            return Ok(());
        }
    }
    let sites = sites_json(procs);
    let endpoints = endpoints_json(dep, procs);
    crate::crashsafe::write_file(&dir.join("endpoints.json"), serde_json::to_string_pretty(&endpoints)?.as_bytes())?;
    let endpoints = Endpoints::start(dir.join("endpoints.json"))?;
    let mut ready = format!("ready: site {} (primary) serves nbd://{} (API http://{})", procs[0].name, procs[0].nbd, procs[0].api);
    for p in &procs[1..] {
        ready.push_str(&format!(", DR site {} nbd://{} read-only (API http://{})", p.name, p.nbd, p.api));
    }
    // `./x` joined to the working directory reads `/wd/./x`.
    ready.push_str(&format!("; data in {}", dir.components().collect::<PathBuf>().display()));
    out.emit(json!({"event": "ready", "sites": sites}), &ready);

    // Supervise, and report what the sites' status says: replication
    // state changes seen at the primary, storage stalls everywhere.
    let mut seen = ReplicaSeen::default();
    let mut refusals_seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut stalls_seen: BTreeSet<(String, String, &'static str)> = BTreeSet::new();
    let mut unanswered: BTreeMap<String, Unanswered> = BTreeMap::new();
    let polls = start_pollers(procs)?;
    loop {
        if let Some(sig) = signals.pending() {
            stopped(sig, procs, Some(&endpoints));
            return Ok(());
        }
        if supervise(procs, out, &mut unanswered) {
            endpoints.set(&endpoints_json(dep, procs));
        }
        while let Ok(poll) = polls.try_recv() {
            let (i, p) = (poll.site, &mut procs[poll.site]);
            // Asked of a process that has exited since, or of one not
            // serving yet: not news of the running one. (Taken after
            // `supervise`, which sees exits; and a miss from a process that
            // is exiting but not yet reaped is no miss either: its
            // listeners close before it can be waited for.)
            if poll.gen != p.poll.gen.load(Ordering::Acquire) || !p.poll.active.load(Ordering::Acquire) {
                continue;
            }
            if poll.answer.is_err() && !p.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None))) {
                continue;
            }
            let p = &*p;
            let state = unanswered.entry(p.name.clone()).or_default();
            if let Some(ev) = responsiveness_event(&p.name, poll.answer.as_ref().map(|_| ()).map_err(|e| e.clone()), state) {
                out.emit_event(ev);
            }
            let Ok(st) = poll.answer else { continue };
            let mut events = if i == 0 {
                replica_events(&st, &mut seen)
            } else {
                // DR sites report what only they know: refused snapshot deletions.
                refusal_events(&p.name, &st, &mut refusals_seen)
            };
            events.extend(storage_events(&p.name, &st, &mut stalls_seen));
            for ev in events {
                out.emit_event(ev);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `snapshot-delete-refused` events for refusals a DR site reports since
/// the last poll (its `snapshot_delete_refusals` list only grows).
fn refusal_events(site: &str, status: &serde_json::Value, seen: &mut BTreeMap<(String, String), usize>) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for g in status["groups"].as_array().into_iter().flatten() {
        let group = g["name"].as_str().unwrap_or("?").to_string();
        let list = g["snapshot_delete_refusals"].as_array().cloned().unwrap_or_default();
        let n = seen.entry((site.to_string(), group.clone())).or_insert(0);
        for r in list.iter().skip(*n) {
            out.push(json!({"event": "snapshot-delete-refused", "site": site, "group": group, "snapshot": r["snapshot"], "seq": r["seq"]}));
        }
        *n = (*n).max(list.len());
    }
    out
}

/// Status polls of a running site that went unanswered in a row, and
/// whether that was reported.
#[derive(Default)]
struct Unanswered {
    count: u32,
    reported: bool,
}

/// Unanswered status polls in a row after which a running site is
/// reported unresponsive (a process that is alive and does not answer:
/// stopped, wedged, or out of threads).
const UNANSWERED_POLLS_MAX: u32 = 2;

/// `site-unresponsive` once a running site has not answered
/// `UNANSWERED_POLLS_MAX` status polls in a row, `site-responsive` when it
/// answers again.
fn responsiveness_event(site: &str, answer: Result<(), String>, st: &mut Unanswered) -> Option<serde_json::Value> {
    match answer {
        Ok(()) => {
            let was = std::mem::take(st);
            was.reported.then(|| json!({"event": "site-responsive", "site": site}))
        }
        Err(e) => {
            st.count += 1;
            (st.count >= UNANSWERED_POLLS_MAX && !std::mem::replace(&mut st.reported, true))
                .then(|| json!({"event": "site-unresponsive", "site": site, "polls": st.count, "error": e}))
        }
    }
}

/// Per site and group, each once when it starts and once when it ends:
/// - `storage-stalled` when a site's status first shows a group's storage
///   stalled (`storage_stall.stalled`), `storage-recovered` when it no
///   longer does;
/// - `out-of-space` when it first shows the group's log file system full
///   (`out_of_space`: the error and the bytes needed, at a DR in the middle
///   of a resync the whole resync's), `space-recovered` when it no longer
///   does.
fn storage_events(site: &str, status: &serde_json::Value, seen: &mut BTreeSet<(String, String, &'static str)>) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut now = BTreeSet::new();
    for g in status["groups"].as_array().into_iter().flatten() {
        let group = g["name"].as_str().unwrap_or("?").to_string();
        let (stall, full) = (&g["storage_stall"], &g["out_of_space"]);
        let started = [
            ("storage-stalled", (stall["stalled"] == true).then(|| json!({"operation": stall["operation"], "seconds": stall["seconds"]}))),
            ("out-of-space", full.is_object().then(|| json!({"error": full["error"], "needed_bytes": full["needed_bytes"]}))),
        ];
        for (kind, what) in started {
            let Some(mut ev) = what else { continue };
            let key = (site.to_string(), group.clone(), kind);
            if !seen.contains(&key) {
                ev["event"] = kind.into();
                ev["site"] = site.into();
                ev["group"] = group.clone().into();
                out.push(ev);
            }
            now.insert(key);
        }
    }
    for (s, group, kind) in seen.iter().filter(|k| k.0 == site) {
        if !now.contains(&(s.clone(), group.clone(), *kind)) {
            let ended = if *kind == "storage-stalled" { "storage-recovered" } else { "space-recovered" };
            out.push(json!({"event": ended, "site": site, "group": group}));
        }
    }
    seen.retain(|k| k.0 != site);
    seen.extend(now);
    out
}

/// What `replica_events` remembers of each replica (group, site) and group
/// between polls of the primary's status.
#[derive(Default)]
struct ReplicaSeen {
    /// State and sessions established, per (group, site).
    replicas: BTreeMap<(String, String), (String, u64)>,
    /// Groups whose sync mode was degraded at the last poll.
    degraded: BTreeSet<String>,
}

/// Events for replica state changes between two status snapshots of the
/// primary, and for a sync group degrading to async and back.
///
/// One line for a person, for `up` without `--json`: `dr-lost: error
/// connection closed, group cg0, site b`: the event's name, then its
/// fields by name (null ones left out, strings unquoted).
fn human_event(ev: &serde_json::Value) -> String {
    let name = ev["event"].as_str().unwrap_or("event");
    let fields: Vec<String> = ev
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| k.as_str() != "event" && !v.is_null())
        .map(|(k, v)| format!("{} {}", k.replace('_', " "), v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string())))
        .collect();
    if fields.is_empty() {
        name.to_string()
    } else {
        format!("{name}: {}", fields.join(", "))
    }
}

/// A link lost and made again between two polls (a DR site killed and
/// restarted at once) leaves the state as it was; the replica's
/// `sessions` count says it happened, and it is reported as it would have
/// been seen: `dr-lost` (with why the session ended), then `dr-connected`.
fn replica_events(status: &serde_json::Value, seen: &mut ReplicaSeen) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    for g in status["groups"].as_array().into_iter().flatten() {
        let group = g["name"].as_str().unwrap_or("?").to_string();
        for r in g["replicas"].as_array().into_iter().flatten() {
            let site = r["site"].as_str().unwrap_or("?").to_string();
            let state = r["state"].as_str().unwrap_or("?").to_string();
            let sessions = r["sessions"].as_u64().unwrap_or(0);
            let prev = seen.replicas.insert((group.clone(), site.clone()), (state.clone(), sessions));
            let mut was_up = prev.as_ref().is_some_and(|(p, _)| p != "disconnected");
            // Fewer: the primary restarted (its counts start again).
            let new_session = prev.as_ref().is_some_and(|(_, n)| sessions != *n);
            if was_up && new_session {
                out.push(json!({"event": "dr-lost", "group": group, "site": site, "state": "disconnected", "applied_seq": r["applied_seq"], "error": r["last_lost"]}));
                was_up = false;
            } else if prev.as_ref().is_some_and(|(p, _)| *p == state) {
                continue;
            }
            let event = match state.as_str() {
                "disconnected" if was_up => "dr-lost",
                "disconnected" => continue,
                "resyncing" => "dr-resyncing",
                "replicating" if was_up => "dr-caught-up",
                _ if !was_up => "dr-connected",
                _ => continue,
            };
            out.push(json!({"event": event, "group": group, "site": site, "state": state, "applied_seq": r["applied_seq"], "error": r["last_error"]}));
            if event == "dr-connected" && state == "replicating" {
                out.push(json!({"event": "dr-caught-up", "group": group, "site": site, "state": state, "applied_seq": r["applied_seq"]}));
            }
        }
        let degraded = g["degraded"].as_str();
        if let Some(why) = degraded {
            if seen.degraded.insert(group.clone()) {
                out.push(json!({"event": "sync-degraded", "group": group, "reason": why}));
            }
        } else if seen.degraded.remove(&group) {
            out.push(json!({"event": "sync-restored", "group": group}));
        }
    }
    out
}

/// SIGINT/SIGTERM noted by a handler thread, polled by the supervisor.
struct Signals {
    rx: std::sync::mpsc::Receiver<&'static str>,
}

impl Signals {
    fn install() -> Result<Signals> {
        let (tx, rx) = std::sync::mpsc::channel();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        std::thread::spawn(move || {
            rt.block_on(async move {
                let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
                let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).expect("SIGINT handler");
                loop {
                    let s = tokio::select! {
                        _ = term.recv() => "SIGTERM",
                        _ = int.recv() => "SIGINT",
                    };
                    if tx.send(s).is_err() {
                        break;
                    }
                }
            })
        });
        Ok(Signals { rx })
    }
    fn pending(&self) -> Option<&'static str> {
        self.rx.try_recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    /// A DR site restarted between two polls is reported lost and
    /// connected again (its state alone reads the same before and after);
    /// a sync group's degradation comes and goes as events.
    /// Without `--json`, events are lines for a person, not JSON.
    #[test]
    fn events_read_as_lines_without_json() {
        let ev = serde_json::json!({"event": "dr-lost", "group": "cg0", "site": "b", "error": "connection closed", "applied_seq": 12, "state": null});
        assert_eq!(super::human_event(&ev), "dr-lost: applied seq 12, error connection closed, group cg0, site b");
        assert_eq!(super::human_event(&serde_json::json!({"event": "stopped"})), "stopped");
    }

    #[test]
    fn replica_events_see_what_happened_between_polls() {
        let st = |state: &str, sessions: u64, degraded: bool| {
            let mut g = json!({"name": "cg0", "replicas": [{"site": "b", "state": state, "sessions": sessions, "applied_seq": 7, "last_error": null, "last_lost": "connection closed"}]});
            if degraded {
                g["degraded"] = json!("sync DR site lost: replicating asynchronously");
            }
            json!({"groups": [g]})
        };
        let names = |ev: Vec<serde_json::Value>| -> Vec<String> { ev.iter().map(|e| e["event"].as_str().unwrap().to_string()).collect() };
        let mut seen = super::ReplicaSeen::default();
        assert_eq!(names(super::replica_events(&st("replicating", 1, false), &mut seen)), ["dr-connected", "dr-caught-up"]);
        assert!(super::replica_events(&st("replicating", 1, false), &mut seen).is_empty());
        let ev = super::replica_events(&st("replicating", 2, false), &mut seen);
        assert_eq!(names(ev.clone()), ["dr-lost", "dr-connected", "dr-caught-up"]);
        assert_eq!(ev[0]["error"], "connection closed");
        assert_eq!(names(super::replica_events(&st("catching-up", 3, false), &mut seen)), ["dr-lost", "dr-connected"]);
        assert_eq!(names(super::replica_events(&st("replicating", 3, false), &mut seen)), ["dr-caught-up"]);
        assert_eq!(names(super::replica_events(&st("disconnected", 3, true), &mut seen)), ["dr-lost", "sync-degraded"]);
        assert!(super::replica_events(&st("disconnected", 3, true), &mut seen).is_empty(), "once");
        assert_eq!(names(super::replica_events(&st("replicating", 4, false), &mut seen)), ["dr-connected", "dr-caught-up", "sync-restored"]);
        // The primary restarted: its count starts again.
        assert_eq!(names(super::replica_events(&st("replicating", 1, false), &mut seen)), ["dr-lost", "dr-connected", "dr-caught-up"]);
    }

    /// Unresponsive after two unanswered polls in a row, once; responsive
    /// when it answers again.
    #[test]
    fn a_site_that_stops_answering_is_one_event_each_way() {
        let mut st = super::Unanswered::default();
        let no = || Err("timed out".to_string());
        assert!(super::responsiveness_event("b", no(), &mut st).is_none(), "one miss is not yet");
        assert!(super::responsiveness_event("b", Ok(()), &mut st).is_none(), "answered: nothing to report");
        assert!(super::responsiveness_event("b", no(), &mut st).is_none());
        let ev = super::responsiveness_event("b", no(), &mut st).unwrap();
        assert_eq!((ev["event"].as_str(), ev["site"].as_str(), ev["error"].as_str()), (Some("site-unresponsive"), Some("b"), Some("timed out")));
        assert!(super::responsiveness_event("b", no(), &mut st).is_none(), "once");
        assert_eq!(super::responsiveness_event("b", Ok(()), &mut st).unwrap()["event"], "site-responsive");
        assert!(super::responsiveness_event("b", Ok(()), &mut st).is_none());
    }

    /// A stall is one event when it starts and one when it ends, per site and group.
    #[test]
    fn storage_stalls_become_one_event_each_way() {
        let st = |stalled: bool| json!({"groups": [{"name": "cg0", "storage_stall": {"operation": "log append", "seconds": 12.0, "stalled": stalled}}, {"name": "cg1", "storage_stall": null}]});
        let mut seen = std::collections::BTreeSet::new();
        assert!(super::storage_events("a", &st(false), &mut seen).is_empty(), "slow is not stalled");
        let ev = super::storage_events("a", &st(true), &mut seen);
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0]["event"].as_str(), ev[0]["site"].as_str(), ev[0]["group"].as_str()), (Some("storage-stalled"), Some("a"), Some("cg0")));
        assert!(super::storage_events("a", &st(true), &mut seen).is_empty(), "once");
        // Another site's stall is its own.
        assert_eq!(super::storage_events("b", &st(true), &mut seen).len(), 1);
        let ev = super::storage_events("a", &json!({"groups": [{"name": "cg0", "storage_stall": null}]}), &mut seen);
        assert_eq!((ev.len(), ev[0]["event"].as_str()), (1, Some("storage-recovered")));
        assert!(super::storage_events("a", &st(false), &mut seen).is_empty());
        assert!(super::storage_events("b", &st(true), &mut seen).is_empty(), "b is still stalled");
    }

    /// A full log file system is one event when it starts (with the bytes
    /// needed) and one when it ends, apart from a stall of the same group.
    #[test]
    fn out_of_space_becomes_one_event_each_way() {
        let full = |needed: u64| json!({"groups": [{"name": "cg0", "storage_stall": null, "out_of_space": {"seconds": 1.0, "error": "No space left on device", "needed_bytes": needed}}]});
        let mut seen = std::collections::BTreeSet::new();
        let ev = super::storage_events("b", &full(4096), &mut seen);
        assert_eq!(ev.len(), 1);
        assert_eq!((ev[0]["event"].as_str(), ev[0]["site"].as_str(), ev[0]["group"].as_str()), (Some("out-of-space"), Some("b"), Some("cg0")));
        assert_eq!((ev[0]["needed_bytes"].as_u64(), ev[0]["error"].as_str()), (Some(4096), Some("No space left on device")));
        assert!(super::storage_events("b", &full(300 << 20), &mut seen).is_empty(), "once");
        let mut both = full(4096);
        both["groups"][0]["storage_stall"] = json!({"operation": "log append", "seconds": 12.0, "stalled": true});
        let ev = super::storage_events("b", &both, &mut seen);
        assert_eq!((ev.len(), ev[0]["event"].as_str()), (1, Some("storage-stalled")));
        let ev = super::storage_events("b", &json!({"groups": [{"name": "cg0", "storage_stall": null, "out_of_space": null}]}), &mut seen);
        let mut names: Vec<&str> = ev.iter().map(|e| e["event"].as_str().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["space-recovered", "storage-recovered"]);
    }

    /// A DR site's refusal list only grows: each refusal becomes one event, once.
    #[test]
    fn refusal_events_once_each() {
        let mut seen = Default::default();
        let st = |n: usize| {
            let list: Vec<_> = (0..n).map(|i| json!({"snapshot": format!("vol0@s{i}"), "seq": 10 + i})).collect();
            json!({"groups": [{"name": "cg0", "snapshot_delete_refusals": list}]})
        };
        assert!(super::refusal_events("b", &st(0), &mut seen).is_empty());
        let ev = super::refusal_events("b", &st(2), &mut seen);
        assert_eq!(ev.len(), 2);
        assert_eq!(ev[1]["event"], "snapshot-delete-refused");
        assert_eq!(ev[1]["snapshot"], "vol0@s1");
        assert_eq!(ev[1]["site"], "b");
        assert!(super::refusal_events("b", &st(2), &mut seen).is_empty());
        assert_eq!(super::refusal_events("b", &st(3), &mut seen).len(), 1);
    }
}
