//! One site: opens its consistency groups, serves their volumes over NBD
//! and the admin API over HTTP, and stops cleanly on SIGINT/SIGTERM (final
//! group commit and checkpoint).

pub mod api;
pub mod config;
pub mod metrics;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use anyhow::{bail, Context, Result};

use crate::group::Group;
use crate::nbd::server::{Export, Exports};
use config::{Role, SiteConfig};
use metrics::Metrics;

pub struct Site {
    pub cfg: SiteConfig,
    pub groups: RwLock<BTreeMap<String, Arc<Group>>>,
    pub metrics: Arc<Metrics>,
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
        let site = Arc::new(Site { cfg, groups: RwLock::new(BTreeMap::new()), metrics: Arc::new(Metrics::default()), _lock: lock });
        let gdir = site.groups_dir();
        std::fs::create_dir_all(&gdir)?;
        let mut names: Vec<String> = Vec::new();
        for ent in std::fs::read_dir(&gdir)? {
            let ent = ent?;
            if ent.file_type()?.is_dir() {
                if let Some(n) = ent.file_name().to_str() {
                    names.push(n.to_string());
                }
            }
        }
        names.sort();
        for n in names {
            let g = Group::open(&gdir.join(&n), &n).with_context(|| format!("failed to open group {n}"))?;
            site.groups.write().unwrap().insert(n, g);
        }
        let marker = site.cfg.data_dir.join("initialized");
        if !marker.exists() {
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
        if let Some(g) = self.groups.read().unwrap().get(name) {
            return Ok(g.clone());
        }
        let mut groups = self.groups.write().unwrap();
        if let Some(g) = groups.get(name) {
            return Ok(g.clone());
        }
        let g = Group::open(&self.groups_dir().join(name), name)?;
        crate::crashsafe::fsync_dir(&self.groups_dir())?;
        groups.insert(name.to_string(), g.clone());
        Ok(g)
    }

    pub fn group_list(&self) -> Vec<Arc<Group>> {
        self.groups.read().unwrap().values().cloned().collect()
    }

    /// The group holding volume `name`.
    pub fn find_volume(&self, name: &str) -> Option<(Arc<Group>, u32)> {
        self.group_list().into_iter().find_map(|g| g.volume(name).map(|v| (g, v.id)))
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

impl Exports for Site {
    fn export(&self, name: &str) -> Option<Export> {
        let (group, volume) = self.find_volume(name)?;
        Some(Export { name: name.to_string(), group, volume, read_only: self.read_only() })
    }
    fn export_names(&self) -> Vec<String> {
        self.group_list().iter().flat_map(|g| g.volumes().into_iter().map(|v| v.name)).collect()
    }
}

/// Runs a site until SIGINT/SIGTERM.
pub fn run(cfg: SiteConfig) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let site = Site::open(cfg)?;
    let res = rt.block_on(async {
        let nbd = tokio::net::TcpListener::bind(site.cfg.nbd_listen)
            .await
            .with_context(|| format!("failed to listen for NBD on {}", site.cfg.nbd_listen))?;
        let api = tokio::net::TcpListener::bind(site.cfg.api_listen)
            .await
            .with_context(|| format!("failed to listen for the API on {}", site.cfg.api_listen))?;
        tracing::info!("site {} ({:?}) serving NBD on {} and the API on {}", site.cfg.name, site.cfg.role, site.cfg.nbd_listen, site.cfg.api_listen);
        let exports: Arc<dyn Exports> = site.clone();
        let nbd_task = tokio::spawn(crate::nbd::server::serve(nbd, exports, site.metrics.clone()));
        let api_task = tokio::spawn(api::serve(api, site.clone()));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            r = nbd_task => bail!("NBD server stopped: {r:?}"),
            r = api_task => bail!("API server stopped: {r:?}"),
        }
        anyhow::Ok(())
    });
    let s = site.clone();
    // Closing syncs and checkpoints; do it outside the runtime.
    s.close();
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    res
}
