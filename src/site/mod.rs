//! One site: opens its consistency groups, serves their volumes over NBD
//! and the admin API over HTTP, and stops cleanly on SIGINT/SIGTERM (final
//! group commit and checkpoint).

pub mod admin;
pub mod api;
mod apiconn;
pub mod config;
pub mod metrics;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use anyhow::{bail, Context, Result};

use crate::group::iowatch::IoOp;
use crate::group::Group;
use crate::nbd::server::{Export, Exports};
use config::{Role, SiteConfig};
use metrics::Metrics;

pub struct Site {
    pub cfg: SiteConfig,
    pub groups: RwLock<BTreeMap<String, Arc<Group>>>,
    pub metrics: Arc<Metrics>,
    /// Who may change this site through its API.
    pub admin: admin::AdminAuth,
    /// What this site knows as a DR site (heartbeats, connected primary).
    pub dr: crate::replicate::receive::DrState,
    /// Started senders, by (group, peer): a group created later gets its own.
    senders: std::sync::Mutex<std::collections::BTreeSet<(String, String)>>,
    client_tls: std::sync::Mutex<Option<Arc<rustls::ClientConfig>>>,
    /// Set when the site stops: senders close their links with TLS
    /// close_notify, so DR sites can tell a stop from a broken link.
    stop: tokio::sync::watch::Sender<bool>,
    /// Sender threads still running.
    senders_running: Arc<std::sync::atomic::AtomicUsize>,
    /// Authenticated replication connections this site takes records on
    /// (each a thread): at a stop they say goodbye too.
    pub(crate) receivers_live: Arc<std::sync::atomic::AtomicUsize>,
    /// Each group's last complete status entry and epoch: what status
    /// shows (marked stale) while the group does not answer.
    pub status_cache: std::sync::Mutex<BTreeMap<String, (serde_json::Value, u64)>>,
    /// Held while a group's files are created (not the `groups` lock).
    creating: std::sync::Mutex<()>,
    _lock: File,
}

impl Site {
    fn groups_dir(&self) -> PathBuf {
        self.cfg.data_dir.join("groups")
    }

    /// Opens every group under `data_dir/groups/` and, on the very first
    /// start, creates the volumes listed in the config.
    pub fn open(cfg: SiteConfig) -> Result<Arc<Site>> {
        std::fs::create_dir_all(&cfg.data_dir).with_context(|| format!("failed to create data directory {}", cfg.data_dir.display()))?;
        let lock_path = cfg.data_dir.join("site.lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .with_context(|| format!("failed to open {}", lock_path.display()))?;
        if lock.try_lock().is_err() {
            bail!("data directory {} is in use by another tidemark site", cfg.data_dir.display());
        }
        let admin = admin::AdminAuth::load_or_create(&cfg.data_dir, cfg.admin_peer_auth)?;
        let site = Arc::new(Site {
            cfg,
            groups: RwLock::new(BTreeMap::new()),
            metrics: Arc::new(Metrics::default()),
            admin,
            dr: Default::default(),
            senders: Default::default(),
            client_tls: Default::default(),
            stop: tokio::sync::watch::channel(false).0,
            senders_running: Default::default(),
            receivers_live: Default::default(),
            status_cache: Default::default(),
            creating: Default::default(),
            _lock: lock,
        });
        let gdir = site.groups_dir();
        std::fs::create_dir_all(&gdir).with_context(|| format!("cannot make the groups directory {}", gdir.display()))?;
        let mut names: Vec<String> = Vec::new();
        for ent in std::fs::read_dir(&gdir)? {
            let ent = ent?;
            // A symlink to a directory is a group too: how an operator puts
            // one group on a disk of its own. One that leads nowhere (its
            // disk not mounted) stops the start: serving without the group
            // would look like its volumes were gone.
            if ent.file_type()?.is_symlink() && !ent.path().is_dir() {
                let to = std::fs::read_link(ent.path()).map(|t| t.display().to_string()).unwrap_or_else(|e| format!("? ({e})"));
                anyhow::bail!("group directory {} is a symlink to {to}, which is not a directory (is its disk mounted?)", ent.path().display());
            }
            if ent.path().is_dir() {
                if let Some(n) = ent.file_name().to_str() {
                    names.push(n.to_string());
                }
            }
        }
        names.sort();
        for n in names {
            let d = gdir.join(&n);
            if !d.join(crate::group::open::META_FILE).exists() {
                // group.json is the first file a group gets: without it the
                // creation did not complete (a crash right after mkdir).
                // Opening it would give it a new id, and a DR site would
                // then refuse its primary's group (another id) for good.
                let mut segments = std::fs::read_dir(&d)?.filter_map(|e| e.ok()).filter(|e| e.file_name().to_str().and_then(crate::log::segment::parse_segment_file_name).is_some());
                if segments.next().is_some() {
                    anyhow::bail!("group directory {} holds log segments but no {}: restore it from a copy, or move it away to start the group afresh", d.display(), crate::group::open::META_FILE);
                }
                // A symlink is the operator's (a group's place on a disk of
                // its own): left for the group to be made in when it is.
                if std::fs::symlink_metadata(&d).is_ok_and(|m| m.file_type().is_symlink()) {
                    tracing::info!("group directory {} (a symlink) holds no group yet; it is used when group {n} is made", d.display());
                    continue;
                }
                tracing::warn!("removing group directory {}: its creation did not complete (no {})", d.display(), crate::group::open::META_FILE);
                std::fs::remove_dir_all(&d).with_context(|| format!("failed to remove {}", d.display()))?;
                continue;
            }
            // A DR site's log holds its primary's records, whose durability
            // marks say nothing of this log (`Create::written_here`).
            let own = crate::group::open::Create { id: None, mode: "async".into(), written_here: !site.read_only() };
            let g = Group::open_or_create(&d, &n, &own).with_context(|| format!("failed to open group {n}"))?;
            site.configure_group(&g);
            site.groups.write().unwrap().insert(n, g);
        }
        site.dr.load(&site.group_list());
        let marker = site.cfg.data_dir.join("initialized");
        if site.read_only() && !site.cfg.volumes.is_empty() {
            tracing::warn!("site {} is a DR site: its volumes come from the primary; ignoring [[volume]] in the config", site.cfg.name);
        }
        if !marker.exists() && !site.read_only() {
            for v in site.cfg.volumes.clone() {
                let size = crate::util::parse_size(&v.size).map_err(anyhow::Error::msg)?;
                let g = site.group_or_create(&v.group)?;
                if g.volume(&v.name).is_none() {
                    g.create_volume(&v.name, size)?;
                }
            }
            crate::crashsafe::write_file(&marker, b"1\n")?;
        }
        Ok(site)
    }

    pub fn group_or_create(&self, name: &str) -> Result<Arc<Group>> {
        crate::util::check_name("group", name).map_err(anyhow::Error::msg)?;
        let (g, new) = self.open_group(name, crate::group::open::Create { id: None, mode: self.cfg.mode.clone(), written_here: true })?;
        if new {
            self.start_senders(&g);
        }
        Ok(g)
    }

    /// The local copy of a group a primary replicates to this DR site,
    /// created with the primary's group id if it does not exist yet.
    pub fn group_for_replication(&self, name: &str, id: u64, mode: &str) -> Result<Arc<Group>> {
        Ok(self.open_group(name, crate::group::open::Create { id: Some(id), mode: mode.to_string(), written_here: false })?.0)
    }

    /// The group `name`, and whether this call opened it: opened or
    /// created as `create` says if this site does not serve it yet (up to
    /// `GROUPS_PER_SITE_MAX`). Created outside
    /// the `groups` lock (only `creating` serializes creators): its files
    /// are written and synced meanwhile, and on a stalled disk that lock
    /// would stall status and the watchdog too.
    fn open_group(&self, name: &str, create: crate::group::open::Create) -> Result<(Arc<Group>, bool)> {
        if let Some(g) = self.groups.read().unwrap().get(name) {
            return Ok((g.clone(), false));
        }
        let _one = self.creating.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(g) = self.groups.read().unwrap().get(name) {
            return Ok((g.clone(), false));
        }
        let n = self.groups.read().unwrap().len();
        if n >= crate::limits::GROUPS_PER_SITE_MAX {
            bail!("site {} already has {n} consistency groups, the most it creates; group {name} is not created", self.cfg.name);
        }
        let g = Group::open_or_create(&self.groups_dir().join(name), name, &create)?;
        crate::crashsafe::fsync_dir(&self.groups_dir())?;
        self.configure_group(&g);
        self.groups.write().unwrap().insert(name.to_string(), g.clone());
        Ok((g, true))
    }

    fn configure_group(&self, g: &Group) {
        let loss = if self.cfg.sync_loss == "refuse" { crate::replicate::SyncLoss::Refuse } else { crate::replicate::SyncLoss::Async };
        g.replication.set_sync_loss(loss);
        g.replication.set_sync_timeout(std::time::Duration::from_millis(self.cfg.sync_timeout_ms));
        g.protect_snapshots.store(self.cfg.protect_snapshots, std::sync::atomic::Ordering::Relaxed);
        if let Ok(cap) = crate::util::parse_size(&self.cfg.replication_log_cap) {
            g.log_cap.store(cap, std::sync::atomic::Ordering::Relaxed);
        }
        if !self.read_only() {
            for p in &self.cfg.peers {
                g.replication.add_replica(&p.name);
            }
        }
    }

    /// Starts one sender per (group, peer) on a primary (idempotent).
    pub fn start_senders(&self, g: &Arc<Group>) {
        if self.read_only() {
            return;
        }
        let Some(tls) = self.client_tls.lock().unwrap().clone() else { return };
        for p in &self.cfg.peers {
            if !self.senders.lock().unwrap().insert((g.name.clone(), p.name.clone())) {
                continue;
            }
            let link = crate::replicate::send::PeerLink { name: p.name.clone(), addr: p.repl, lz4: p.lz4 };
            let settings = crate::replicate::send::SendSettings {
                site: self.cfg.name.clone(),
                heartbeat_interval: std::time::Duration::from_millis(self.cfg.heartbeat_interval_ms),
                periodic_interval: std::time::Duration::from_secs(self.cfg.periodic_interval_s),
                link_timeout: std::time::Duration::from_millis(self.cfg.link_timeout_ms),
                stop: self.stop.subscribe(),
                running: self.senders_running.clone(),
                nice: self.cfg.sender_nice,
            };
            if let Err(e) = crate::replicate::send::spawn(g.clone(), link, tls.clone(), settings) {
                // Not started: a later start_senders (a new group, a restart) tries again.
                tracing::error!("replication of {} to {}: {e:#}", g.name, p.name);
                g.replication.update(&p.name, |r| r.last_error = Some(format!("{e:#}")));
                self.senders.lock().unwrap().remove(&(g.name.clone(), p.name.clone()));
            }
        }
    }

    /// Starts the thread that logs storage operations that do not return:
    /// at WARN once one has been in progress for `STORAGE_STALL_MS`, again
    /// once a minute while it stays, and when it returns (ARCHITECTURE.md
    /// "A stalled disk is reported, not silent"). It ends with the site.
    pub fn start_storage_watchdog(self: &Arc<Self>) {
        let site = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("storage-watchdog".into()).spawn(move || {
            let mut watch = StallLog::default();
            loop {
                std::thread::sleep(std::time::Duration::from_millis(500));
                let Some(site) = site.upgrade() else { return };
                for g in site.group_list() {
                    watch.check(&g.name, &g.dir, g.io.oldest());
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!("site {}: failed to start the storage watchdog: {e}", self.cfg.name);
        }
    }

    /// Keeps the runtime's I/O going while a worker is stuck in an append.
    ///
    /// A tokio worker that has nothing to do parks; one of the parked
    /// workers waits on the I/O driver (epoll), the others on a condvar,
    /// and a worker that runs a task wakes a parked one only when it queues
    /// more work than it can run itself. So a worker that takes the driver's
    /// wakeup, spawns a request's task into its own LIFO slot and then
    /// blocks in that request's append (a frozen or dying disk) leaves the
    /// other workers asleep, and nobody polls the driver: no socket of the
    /// site is read again, any group's, until the append returns
    /// (`tests/storage.rs::a_stalled_group_holds_up_no_other_group` failed
    /// that way in 5 of 7 runs). Every `NBD_KICK_MS` this thread looks for
    /// an append in progress for that long and, if it finds one, spawns an
    /// empty task from outside the runtime, which wakes a parked worker;
    /// that one then steals what is queued and parks on the driver.
    /// (Disabling the LIFO slot does the same on every spawn, and cost
    /// ~100 µs of synclat p50 on this machine's 2 vCPUs.)
    pub fn start_runtime_kicker(self: &Arc<Self>, rt: tokio::runtime::Handle) {
        let site = Arc::downgrade(self);
        let every = std::time::Duration::from_millis(crate::limits::NBD_KICK_MS);
        let spawned = std::thread::Builder::new().name("rt-kicker".into()).spawn(move || loop {
            std::thread::sleep(every);
            let Some(site) = site.upgrade() else { return };
            // An append holds its worker; so does a read where the file
            // system cannot read from the page cache only (FUSE). Reads
            // waiting on the blocking pool count too: an empty spawn
            // costs one wakeup.
            let stuck = site.group_list().iter().any(|g| [IoOp::Append, IoOp::Read].into_iter().any(|op| g.io.pending(op).is_some_and(|p| p.seconds >= every.as_secs_f64())));
            if stuck {
                drop(rt.spawn(async {}));
            }
        });
        if let Err(e) = spawned {
            tracing::error!("site {}: failed to start the runtime kicker: {e}", self.cfg.name);
        }
    }

    pub fn group_list(&self) -> Vec<Arc<Group>> {
        self.groups.read().unwrap().values().cloned().collect()
    }

    /// The group holding volume (or snapshot) `name`, and what it is.
    pub fn find_volume(&self, name: &str) -> Option<(Arc<Group>, crate::group::VolumeInfo)> {
        self.group_list().into_iter().find_map(|g| g.volume(name).map(|v| (g, v)))
    }

    /// Turns true when the site stops.
    pub(crate) fn stop_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stop.subscribe()
    }

    pub fn read_only(&self) -> bool {
        self.cfg.role != Role::Primary
    }

    /// Final sync and checkpoint of every group.
    pub fn close(&self) {
        for g in self.group_list() {
            if let Err(e) = g.close() {
                tracing::error!("group {}: close failed: {e:#}", g.name);
            }
        }
    }
}

/// What the storage watchdog has said about each group: the operation it
/// warned of (by start time) and when it last said so.
#[derive(Default)]
struct StallLog {
    warned: BTreeMap<String, (crate::group::iowatch::Pending, std::time::Instant)>,
}

impl StallLog {
    /// One look at a group's oldest storage operation in progress; returns
    /// what it logged ("stalled", "still", "returned"), for tests.
    fn check(&mut self, group: &str, dir: &std::path::Path, oldest: Option<crate::group::iowatch::Pending>) -> Vec<&'static str> {
        let mut said = Vec::new();
        if let Some((w, _)) = self.warned.get(group) {
            if oldest.map(|p| p.since) != Some(w.since) {
                let seconds = crate::group::iowatch::mono_ns().saturating_sub(w.since) as f64 / 1e9;
                let next_stuck = oldest.is_some_and(|p| p.slow());
                let tail = if next_stuck { "" } else { "; storage answers again" };
                tracing::warn!("group {group}: the {} stalled since {:.0} s ago has returned{tail}", w.op.label(), seconds);
                self.warned.remove(group);
                said.push("returned");
            }
        }
        let Some(p) = oldest else { return said };
        if !p.stalled() {
            return said;
        }
        match self.warned.get_mut(group) {
            None => {
                tracing::warn!(
                    "group {group}: a {} in {} has not returned for {:.0} s: its storage is stalled, and {} wait for it",
                    p.op.label(),
                    dir.display(),
                    p.seconds,
                    if p.op == IoOp::Read { "reads of the group that miss the page cache" } else { "writes to the group" }
                );
                self.warned.insert(group.to_string(), (p, std::time::Instant::now()));
                said.push("stalled");
            }
            Some((_, last)) if last.elapsed() >= std::time::Duration::from_secs(60) => {
                tracing::warn!("group {group}: the {} in {} still has not returned after {:.0} s", p.op.label(), dir.display(), p.seconds);
                *last = std::time::Instant::now();
                said.push("still");
            }
            Some(_) => {}
        }
        said
    }
}

impl Exports for Site {
    // Neither takes a group's lock (`group::Catalog`): a group whose disk
    // has stalled must not hold up the handshake of another's export.
    fn export(&self, name: &str) -> Option<Export> {
        let (group, v) = self.group_list().into_iter().find_map(|g| g.listed(name).map(|v| (g, v)))?;
        Some(Export { name: name.to_string(), group, volume: v.id, read_only: self.read_only() || !v.writable })
    }
    fn export_names(&self) -> Vec<String> {
        self.group_list().iter().flat_map(|g| g.listed_names()).collect()
    }
}

/// Runs a site until SIGINT/SIGTERM.
pub fn run(cfg: SiteConfig) -> Result<()> {
    // At least two workers, and never all of them inside an append: one
    // is always left for the groups whose disks answer
    // (`group::WORKER_APPENDS`).
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).max(2);
    crate::group::WORKER_APPENDS.set_max(workers - 1);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()?;
    let api_rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).thread_name("api").enable_all().build()?;
    let site = Site::open(cfg)?;
    site.start_storage_watchdog();
    site.start_runtime_kicker(rt.handle().clone());
    let res = rt.block_on(async {
        // Every listener is bound before any is served, the NBD listener
        // last: once a client can reach the NBD port, a primary's first
        // connect reaches the DR listener too, and a status request the
        // API (tests and scripts wait for the NBD port only).
        let tls_files = crate::replicate::tls::TlsFiles { ca: site.cfg.tls.ca.clone(), cert: site.cfg.tls.cert.clone(), key: site.cfg.tls.key.clone() };
        let mut repl_listener = None;
        // A primary listens too, where it has an address for it: a site
        // that also believes itself primary is told so with the reason
        // (split brain guard, `accept_group`), not met with a closed port;
        // and the port is this site's while it runs (CONTRACT: P+20+i).
        if !site.cfg.peers.is_empty() && (site.read_only() || site.cfg.repl_listen.is_some()) {
            let addr = site.cfg.repl_listen.context("a DR site with peers needs repl_listen")?;
            let l = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("failed to listen for replication on {addr}"))?;
            let server = crate::replicate::tls::server_config(&tls_files)?;
            tracing::info!("site {}: replication listener on {addr}", site.cfg.name);
            repl_listener = Some((l, server));
        }
        // The API has a runtime of its own: NBD requests append on the main
        // runtime's workers, and a stalled disk can hold every one of them;
        // status must still answer then (ARCHITECTURE.md "A stalled disk is
        // reported, not silent").
        let api = std::net::TcpListener::bind(site.cfg.api_listen)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .with_context(|| format!("failed to listen for the API on {}", site.cfg.api_listen))?;
        let nbd = tokio::net::TcpListener::bind(site.cfg.nbd_listen)
            .await
            .with_context(|| format!("failed to listen for NBD on {}", site.cfg.nbd_listen))?;
        // The bound addresses: a configured port 0 is the kernel's choice.
        let shown = |a: std::io::Result<std::net::SocketAddr>, cfg: std::net::SocketAddr| a.map(|a| a.to_string()).unwrap_or_else(|_| cfg.to_string());
        tracing::info!(
            "site {} ({:?}) serving NBD on {} and the API on {}",
            site.cfg.name,
            site.cfg.role,
            shown(nbd.local_addr(), site.cfg.nbd_listen),
            shown(api.local_addr(), site.cfg.api_listen)
        );
        if !site.cfg.nbd_listen.ip().to_canonical().is_loopback() {
            tracing::warn!(
                "NBD listens on {}, which is not loopback: NBD here has no authentication and no encryption, so whoever can reach that address can read and write every export; keep it on a network only the volumes' clients reach",
                site.cfg.nbd_listen
            );
        }
        if !site.cfg.api_listen.ip().to_canonical().is_loopback() {
            // The API is plain HTTP (ARCHITECTURE.md "Each site has its own
            // admin credentials (R25)").
            tracing::warn!(
                "the API listens on {}, which is not loopback, in plain HTTP: the admin token of a change sent to it, and every status, cross the network in clear; use a loopback address and a tunnel (ssh -L) to reach it from elsewhere",
                site.cfg.api_listen
            );
        }
        // Replication: a DR site listens; a primary sends to every peer
        // (and refuses any that sends to it).
        let repl_task = repl_listener.map(|(l, server)| tokio::spawn(crate::replicate::receive::serve(l, server, site.clone())));
        if !site.cfg.peers.is_empty() && !site.read_only() {
            *site.client_tls.lock().unwrap() = Some(crate::replicate::tls::client_config(&tls_files)?);
            for g in site.group_list() {
                site.start_senders(&g);
            }
        }
        let exports: Arc<dyn Exports> = site.clone();
        let nbd_task = tokio::spawn(crate::nbd::server::serve(nbd, exports, site.metrics.clone()));
        let api_site = site.clone();
        let api_task = api_rt.spawn(async move { api::serve(tokio::net::TcpListener::from_std(api)?, api_site).await });
        let repl_wait = async move {
            match repl_task {
                Some(t) => t.await,
                None => std::future::pending().await,
            }
        };
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            r = nbd_task => bail!("NBD server stopped: {r:?}"),
            r = api_task => bail!("API server stopped: {r:?}"),
            r = repl_wait => bail!("replication listener stopped: {r:?}"),
        }
        anyhow::Ok(())
    });
    let s = site.clone();
    // Senders and receivers say goodbye (a receiver tells its primary
    // why, then both close_notify) first; two seconds at most (a thread
    // at nice 10 on a busy machine may take a moment).
    s.stop.send_replace(true);
    let t = std::time::Instant::now();
    let running = || s.senders_running.load(std::sync::atomic::Ordering::Acquire) + s.receivers_live.load(std::sync::atomic::Ordering::Acquire);
    while running() > 0 && t.elapsed() < std::time::Duration::from_secs(2) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Closing syncs and checkpoints; do it outside the runtime.
    s.close();
    api_rt.shutdown_timeout(std::time::Duration::from_secs(1));
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    res
}

#[cfg(test)]
mod tests {
    use super::StallLog;
    use crate::group::iowatch::{IoOp, Pending};

    /// An operation in progress; `since` tells operations apart (the
    /// watchdog reads the age from `seconds`).
    fn pending(op: IoOp, since: u64, seconds: f64) -> Pending {
        Pending { op, since, seconds }
    }

    #[test]
    fn a_stall_is_logged_once_when_it_starts_and_once_when_it_ends() {
        let mut log = StallLog::default();
        let dir = std::path::Path::new("/data/groups/cg0");
        assert!(log.check("cg0", dir, None).is_empty());
        let slow = pending(IoOp::Sync, 1, 2.0);
        assert!(log.check("cg0", dir, Some(slow)).is_empty(), "slow is not stalled yet");
        let stalled = Pending { seconds: 11.0, ..slow };
        assert_eq!(log.check("cg0", dir, Some(stalled)), ["stalled"]);
        assert!(log.check("cg0", dir, Some(Pending { seconds: 12.0, ..slow })).is_empty(), "said once, until a minute passes");
        // Another group is told apart.
        assert_eq!(log.check("cg1", dir, Some(pending(IoOp::Append, 2, 30.0))), ["stalled"]);
        // It returns; the next operation is quick.
        assert_eq!(log.check("cg0", dir, None), ["returned"]);
        assert!(log.check("cg0", dir, None).is_empty());
        // A new operation that stalls right after another returned.
        let again = pending(IoOp::Checkpoint, 3, 15.0);
        assert_eq!(log.check("cg1", dir, Some(again)), ["returned", "stalled"]);
    }
}
