//! `site.toml`: everything one site process needs.
//!
//! ```toml
//! name = "a"
//! role = "primary"                # or "secondary"
//! data_dir = "."                  # relative to this file
//! nbd_listen = "127.0.0.1:10809"
//! api_listen = "127.0.0.1:10819"
//! repl_listen = "127.0.0.1:10829"
//! mode = "async"                  # default replication mode of new groups
//! [[volume]]                      # created on the first start only
//! name = "vol0"
//! size = "1GiB"
//! group = "cg0"
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Secondary,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    pub name: String,
    pub size: String,
    #[serde(default = "default_group")]
    pub group: String,
}

fn default_group() -> String {
    "cg0".into()
}
fn default_mode() -> String {
    "async".into()
}
fn default_data_dir() -> PathBuf {
    PathBuf::from(".")
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteConfig {
    pub name: String,
    pub role: Role,
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    pub nbd_listen: SocketAddr,
    pub api_listen: SocketAddr,
    #[serde(default)]
    pub repl_listen: Option<SocketAddr>,
    #[serde(default = "default_mode")]
    pub mode: String,
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeSpec>,
    /// Other sites: a primary replicates to each; a DR site accepts
    /// replication only from these.
    #[serde(default, rename = "peer")]
    pub peers: Vec<PeerSpec>,
    /// TLS files of this site (relative to the config file).
    #[serde(default)]
    pub tls: TlsSpec,
    /// What a sync group does when a DR site is lost: `async` (continue,
    /// with an event) or `refuse` (fail writes until it is back).
    #[serde(default = "default_sync_loss")]
    pub sync_loss: String,
    /// How long a sync write waits for a DR site before `sync_loss` applies.
    #[serde(default = "default_sync_timeout_ms")]
    pub sync_timeout_ms: u64,
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_interval_ms: u64,
    #[serde(default = "default_periodic_s")]
    pub periodic_interval_s: u64,
    /// A replication link that stays silent this long is closed and
    /// reconnected, with a `dr-lost` event: at the primary, no frame from a
    /// DR site (which answers every heartbeat); at a DR site, no byte from
    /// the primary while waiting for one. At least twice
    /// `heartbeat_interval_ms`. A DR site tells its primaries its value,
    /// and they send heartbeats four times within it. Slow links are fine:
    /// a DR site repeats its last answer while bytes keep arriving.
    #[serde(default = "default_link_timeout_ms")]
    pub link_timeout_ms: u64,
    /// Nice value (0-19) of the sender threads of async and periodic
    /// groups; sync senders run at the nice value the site inherited. 0
    /// turns the policy off; so does a site that lacks CAP_SYS_NICE (it
    /// could not bring a sender back for sync mode).
    #[serde(default = "default_sender_nice")]
    pub sender_nice: i32,
    /// DR site: nice value (0-19) of the thread that takes in an async or
    /// periodic group's records; a sync group's runs at the nice value the
    /// site inherited. 0 turns the policy off, as for `sender_nice`.
    #[serde(default = "default_receiver_nice")]
    pub receiver_nice: i32,
    /// Log bytes per group beyond which a lagging DR site stops holding the
    /// log and falls back to dirty-region resync (R3), e.g. "64GiB".
    #[serde(default = "default_log_cap")]
    pub replication_log_cap: String,
    /// DR site: refuse the primary's deletion of snapshots (R25). The
    /// primary's copy is still deleted; this site keeps its own until an
    /// admin deletes it here.
    #[serde(default)]
    pub protect_snapshots: bool,
    /// Whether a change through the admin API from this host's loopback,
    /// by the site's user or root, needs no token (`site::admin`). Off:
    /// every change needs `<data_dir>/admin.token`, e.g. where other
    /// sites or proxies run as the same user on this host.
    #[serde(default = "yes")]
    pub admin_peer_auth: bool,
}

fn yes() -> bool {
    true
}

fn default_log_cap() -> String {
    "64GiB".into()
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerSpec {
    pub name: String,
    /// The peer's replication listener.
    pub repl: SocketAddr,
    /// Compress RECORDS frames to this peer with lz4.
    #[serde(default)]
    pub lz4: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSpec {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Default for TlsSpec {
    fn default() -> Self {
        TlsSpec { ca: "tls/ca.pem".into(), cert: "tls/cert.pem".into(), key: "tls/key.pem".into() }
    }
}

fn default_sync_loss() -> String {
    "async".into()
}
fn default_sync_timeout_ms() -> u64 {
    crate::limits::SYNC_TIMEOUT_MS_DEFAULT
}
fn default_heartbeat_ms() -> u64 {
    crate::limits::HEARTBEAT_INTERVAL_MS_DEFAULT
}
fn default_link_timeout_ms() -> u64 {
    crate::limits::LINK_TIMEOUT_MS_DEFAULT
}
fn default_sender_nice() -> i32 {
    crate::limits::SENDER_NICE_DEFAULT
}
fn default_receiver_nice() -> i32 {
    crate::limits::RECEIVER_NICE_DEFAULT
}
fn default_periodic_s() -> u64 {
    crate::limits::PERIODIC_INTERVAL_S_DEFAULT
}

impl SiteConfig {
    /// Reads and checks a config file; errors name the file and the field.
    pub fn load(path: &Path) -> Result<SiteConfig> {
        let raw = std::fs::read(path).with_context(|| format!("failed to read site config {}", path.display()))?;
        let text = String::from_utf8(raw).map_err(|e| anyhow::anyhow!("site config {} is not UTF-8 text (byte {} is not)", path.display(), e.utf8_error().valid_up_to()))?;
        let mut cfg: SiteConfig = toml::from_str(&text).map_err(|e| anyhow::anyhow!("site config {}: {e}", path.display()))?;
        cfg.validate().with_context(|| format!("site config {}", path.display()))?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        for p in [&mut cfg.tls.ca, &mut cfg.tls.cert, &mut cfg.tls.key] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if cfg.data_dir.is_relative() {
            // Normalised (no `.` components) so that paths in messages are clean.
            cfg.data_dir = base.join(&cfg.data_dir).components().filter(|c| *c != std::path::Component::CurDir).collect();
        }
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<()> {
        crate::util::check_name("site", &self.name).map_err(anyhow::Error::msg)?;
        if !["async", "sync", "periodic"].contains(&self.mode.as_str()) {
            bail!("mode {:?} is not one of async, sync, periodic", self.mode);
        }
        if !["async", "refuse"].contains(&self.sync_loss.as_str()) {
            bail!("sync_loss {:?} is not one of async, refuse", self.sync_loss);
        }
        crate::util::parse_size(&self.replication_log_cap).map_err(|e| anyhow::anyhow!("replication_log_cap: {e}"))?;
        if self.heartbeat_interval_ms == 0 || self.periodic_interval_s == 0 {
            bail!("heartbeat_interval_ms and periodic_interval_s must be positive");
        }
        if self.periodic_interval_s > crate::limits::PERIODIC_INTERVAL_S_MAX {
            bail!("periodic_interval_s {} is more than a day ({} s)", self.periodic_interval_s, crate::limits::PERIODIC_INTERVAL_S_MAX);
        }
        let floor = self.heartbeat_interval_ms.saturating_mul(2);
        if self.link_timeout_ms < floor || self.link_timeout_ms > crate::limits::LINK_TIMEOUT_MS_MAX {
            bail!(
                "link_timeout_ms {} is not between twice heartbeat_interval_ms ({floor}) and {}",
                self.link_timeout_ms,
                crate::limits::LINK_TIMEOUT_MS_MAX
            );
        }
        if !(0..=19).contains(&self.sender_nice) {
            bail!("sender_nice {} is not in 0..=19", self.sender_nice);
        }
        if !(0..=19).contains(&self.receiver_nice) {
            bail!("receiver_nice {} is not in 0..=19", self.receiver_nice);
        }
        if self.sync_timeout_ms == 0 || self.sync_timeout_ms > 86_400_000 {
            bail!("sync_timeout_ms {} is not between 1 and a day (86400000)", self.sync_timeout_ms);
        }
        let mut peers = std::collections::BTreeSet::new();
        for p in &self.peers {
            crate::util::check_name("peer", &p.name).map_err(anyhow::Error::msg)?;
            if p.name == self.name {
                bail!("peer {} is this site itself", p.name);
            }
            if !peers.insert(p.name.as_str()) {
                bail!("peer {} is listed twice ([[peer]])", p.name);
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for v in &self.volumes {
            crate::util::check_name("volume", &v.name).map_err(anyhow::Error::msg)?;
            crate::util::check_name("group", &v.group).map_err(anyhow::Error::msg)?;
            let size = crate::util::parse_size(&v.size).map_err(|e| anyhow::anyhow!("volume {}: {e}", v.name))?;
            // A DR site ignores its volume list (with a warning): only a
            // primary's must be one it can make.
            if self.role == Role::Primary {
                crate::util::check_volume_size(size).map_err(|e| anyhow::anyhow!("volume {}: {e}", v.name))?;
                if !names.insert(v.name.as_str()) {
                    bail!("volume {} is listed twice", v.name);
                }
            }
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_field_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("site.toml");
        std::fs::write(&p, "name = \"a\"\nrole = \"primary\"\nnbd_listen = \"127.0.0.1:1\"\napi_listen = \"nonsense\"\n").unwrap();
        let e = format!("{:#}", SiteConfig::load(&p).unwrap_err());
        assert!(e.contains("site.toml") && e.contains("api_listen") || e.contains("line 4"), "{e}");
        std::fs::write(&p, "name = \"a\"\nrole = \"primary\"\nnbd_listen = \"127.0.0.1:1\"\napi_listen = \"127.0.0.1:2\"\nbogus = 1\n").unwrap();
        let e = format!("{:#}", SiteConfig::load(&p).unwrap_err());
        assert!(e.contains("bogus"), "{e}");
        std::fs::write(&p, "name = \"a\"\nrole = \"primary\"\nnbd_listen = \"127.0.0.1:1\"\napi_listen = \"127.0.0.1:2\"\n[[volume]]\nname=\"v\"\nsize=\"1Q\"\n").unwrap();
        let e = format!("{:#}", SiteConfig::load(&p).unwrap_err());
        assert!(e.contains("volume v") && e.contains("unknown unit"), "{e}");
        std::fs::write(&p, "name = \"a\"\nrole = \"primary\"\nnbd_listen = \"127.0.0.1:1\"\napi_listen = \"127.0.0.1:2\"\n").unwrap();
        let c = SiteConfig::load(&p).unwrap();
        assert_eq!(c.data_dir, dir.path());
        assert_eq!(c.sender_nice, crate::limits::SENDER_NICE_DEFAULT);
        std::fs::write(&p, "name = \"a\"\nrole = \"primary\"\nnbd_listen = \"127.0.0.1:1\"\napi_listen = \"127.0.0.1:2\"\nsender_nice = 20\n").unwrap();
        let e = format!("{:#}", SiteConfig::load(&p).unwrap_err());
        assert!(e.contains("site.toml") && e.contains("sender_nice 20 is not in 0..=19"), "{e}");
        std::fs::write(&p, b"name = \"a\"\nrole = \"primary\"\nnbd_listen = \"127.0.0.1:1\"\napi_listen = \"127.0.0.1:2\xff\"\n").unwrap();
        let e = format!("{:#}", SiteConfig::load(&p).unwrap_err());
        assert!(e.contains("site.toml") && e.contains("not UTF-8") && e.contains("byte 80"), "{e}");
        std::fs::write(&p, "name = \"a\"\nrole = \"primary\"\nnbd_listen = \"127.0.0.1:1\"\napi_listen = \"127.0.0.1:2\"\nsync_timeout_ms = 0\n").unwrap();
        let e = format!("{:#}", SiteConfig::load(&p).unwrap_err());
        assert!(e.contains("sync_timeout_ms 0"), "{e}");
        let peer = "[[peer]]\nname = \"b\"\nrepl = \"127.0.0.1:3\"\n";
        std::fs::write(&p, format!("name = \"a\"\nrole = \"primary\"\nnbd_listen = \"127.0.0.1:1\"\napi_listen = \"127.0.0.1:2\"\n{peer}{peer}")).unwrap();
        let e = format!("{:#}", SiteConfig::load(&p).unwrap_err());
        assert!(e.contains("peer b is listed twice"), "{e}");
        std::fs::write(&p, "name = \"a\"\nrole = \"primary\"\nnbd_listen = \"127.0.0.1:1\"\napi_listen = \"127.0.0.1:2\"\nsender_nice = 0\n").unwrap();
        assert_eq!(SiteConfig::load(&p).unwrap().sender_nice, 0);
        assert_eq!(SiteConfig::load(&p).unwrap().receiver_nice, crate::limits::RECEIVER_NICE_DEFAULT);
        std::fs::write(&p, "name = \"b\"\nrole = \"secondary\"\nnbd_listen = \"127.0.0.1:1\"\napi_listen = \"127.0.0.1:2\"\nreceiver_nice = -1\n").unwrap();
        let e = format!("{:#}", SiteConfig::load(&p).unwrap_err());
        assert!(e.contains("site.toml") && e.contains("receiver_nice -1 is not in 0..=19"), "{e}");
        assert_eq!(c.link_timeout_ms, crate::limits::LINK_TIMEOUT_MS_DEFAULT);
        std::fs::write(&p, "name = \"a\"\nrole = \"primary\"\nnbd_listen = \"127.0.0.1:1\"\napi_listen = \"127.0.0.1:2\"\nheartbeat_interval_ms = 1000\nlink_timeout_ms = 1500\n").unwrap();
        let e = format!("{:#}", SiteConfig::load(&p).unwrap_err());
        assert!(e.contains("site.toml") && e.contains("link_timeout_ms 1500 is not between twice heartbeat_interval_ms (2000)"), "{e}");
        std::fs::write(&p, "name = \"a\"\nrole = \"primary\"\nnbd_listen = \"127.0.0.1:1\"\napi_listen = \"127.0.0.1:2\"\nlink_timeout_ms = 2000\n").unwrap();
        assert_eq!(SiteConfig::load(&p).unwrap().link_timeout_ms, 2000);
        std::fs::write(&p, "name = \"a\"\nrole = \"primary\"\nnbd_listen = \"127.0.0.1:1\"\napi_listen = \"127.0.0.1:2\"\nperiodic_interval_s = 18446744073\n").unwrap();
        let e = format!("{:#}", SiteConfig::load(&p).unwrap_err());
        assert!(e.contains("site.toml") && e.contains("periodic_interval_s 18446744073 is more than a day"), "{e}");
    }
}
