//! The admin command line: argument parsing and the commands that talk to
//! a site's API. Exit codes: 0 success, 1 the operation failed, 2 usage.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

#[derive(Parser, Debug)]
#[command(name = "tidemark", version, about = "Disaster recovery for block storage")]
pub struct Cli {
    /// Deployment directory (reads DIR/endpoints.json).
    #[arg(long, global = true)]
    pub dir: Option<PathBuf>,
    /// API URL of a site (instead of --dir).
    #[arg(long, global = true, conflicts_with = "dir", value_parser = parse_api_url)]
    pub api: Option<String>,
    /// Site to talk to (default: the primary, `a`).
    #[arg(long, global = true, value_parser = name_of("site"))]
    pub site: Option<String>,
    /// Machine-readable output.
    #[arg(long, global = true)]
    pub json: bool,
    /// The site's admin token file (`<site data dir>/admin.token` on its
    /// host). Needed for changes from another host or by another local
    /// user than the site's; reads need none.
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Seconds to wait for the site's answer before failing (default 30
    /// for status and lists, 120 for changes).
    #[arg(long, global = true, value_name = "SECONDS", value_parser = parse_timeout)]
    pub timeout: Option<std::time::Duration>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run a whole deployment on this machine.
    Up {
        #[arg(long)]
        port_base: Option<u16>,
        #[arg(long)]
        dr_sites: Option<u32>,
        /// NAME=SIZE, repeatable (default vol0=1GiB).
        #[arg(long = "volume", value_parser = parse_volume_arg)]
        volumes: Vec<(String, u64)>,
        #[arg(long, value_parser = ["async", "sync", "periodic"])]
        mode: Option<String>,
    },
    /// Create a deployment's CA, site certificates and site configs.
    Init {
        dir: PathBuf,
        /// Site names, the primary first (e.g. a,b,c).
        #[arg(long, value_delimiter = ',', required = true)]
        sites: Vec<String>,
        #[arg(long)]
        port_base: Option<u16>,
        #[arg(long, value_parser = ["async", "sync", "periodic"])]
        mode: Option<String>,
    },
    /// Run one site from its config file.
    Site {
        #[arg(long)]
        config: PathBuf,
    },
    /// Sites, roles, epochs, groups, volumes and replication state.
    Status,
    /// Volume management.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Consistency group settings.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Snapshots (replicated: every DR site performs the same operation at
    /// the same place in the write stream).
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Snapshot VOL (a volume, or VOL@SNAP for a snapshot of a snapshot) as SNAP.
    Create {
        volume: String,
        #[arg(value_parser = name_of("snapshot"))]
        snapshot: String,
        /// Writable snapshot (its writes replicate to its DR twins).
        #[arg(long)]
        writable: bool,
    },
    /// The snapshot tree (of VOL, or of every volume).
    List { volume: Option<String> },
    /// Make VOL what SNAP holds.
    Restore { volume: String, snapshot: String },
    /// Make SNAP what VOL holds now.
    Refresh { volume: String, snapshot: String },
    /// Make snapshot SNAP_B equal to snapshot SNAP_A.
    Sync { snap_a: String, snap_b: String },
    /// Delete snapshot SNAP of VOL.
    Delete { volume: String, snapshot: String },
}

#[derive(Subcommand, Debug)]
pub enum GroupCmd {
    /// Change a group's settings online (e.g. `--mode sync`).
    Set {
        name: String,
        /// The replication mode (required: a `group set` that sets
        /// nothing is a usage error).
        #[arg(long, required = true, value_parser = ["async", "sync", "periodic"])]
        mode: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum VolumeCmd {
    Create {
        #[arg(value_parser = name_of("volume"))]
        name: String,
        #[arg(long, value_parser = parse_size_arg)]
        size: u64,
        #[arg(long, value_parser = name_of("group"))]
        group: Option<String>,
    },
    List,
    Resize {
        name: String,
        #[arg(long, value_parser = parse_size_arg)]
        size: u64,
    },
    Delete {
        name: String,
    },
}

/// `http://HOST:PORT[/]` (a usage error, exit 2, otherwise).
fn parse_api_url(s: &str) -> Result<String, String> {
    let hostport = s.strip_prefix("http://").ok_or_else(|| format!("API URL {s:?} must start with http://"))?.trim_end_matches('/');
    let (host, port) = hostport.rsplit_once(':').ok_or_else(|| format!("API URL {s:?} has no port (http://HOST:PORT)"))?;
    if host.is_empty() || host.contains('/') || port.parse::<u16>().is_err() {
        return Err(format!("API URL {s:?} is not http://HOST:PORT"));
    }
    Ok(s.to_string())
}

/// A name of `kind` (site, volume, group, snapshot) as the sites check
/// it (`util::check_name`): one the site would refuse is a usage error
/// (exit 2), found before any site is asked.
fn name_of(kind: &'static str) -> impl Fn(&str) -> Result<String, String> + Clone + Send + Sync + 'static {
    move |s| crate::util::check_name(kind, s).map(|()| s.to_string())
}

/// `--timeout SECONDS`: more than 0, at most a day.
fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    let secs: f64 = s.trim().parse().map_err(|_| format!("timeout {s:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err(format!("timeout {s:?} must be more than 0 and at most 86400 seconds"));
    }
    Ok(std::time::Duration::from_secs_f64(secs))
}

/// A volume size (a usage error, exit 2, if it cannot be one).
fn parse_size_arg(s: &str) -> Result<u64, String> {
    let n = crate::util::parse_size(s)?;
    crate::util::check_volume_size(n)?;
    Ok(n)
}

fn parse_volume_arg(s: &str) -> Result<(String, u64), String> {
    let (n, sz) = s.split_once('=').ok_or_else(|| format!("{s:?} is not NAME=SIZE"))?;
    crate::util::check_name("volume", n)?;
    Ok((n.to_string(), parse_size_arg(sz).map_err(|e| format!("volume {n}: {e}"))?))
}

/// API base URL for the chosen site.
pub fn api_url(cli: &Cli) -> Result<String> {
    if let Some(a) = &cli.api {
        return Ok(a.trim_end_matches('/').to_string());
    }
    let dir = cli.dir.clone().unwrap_or_else(|| PathBuf::from("./tidemark-data"));
    let path = dir.join("endpoints.json");
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {} (is `tidemark up` running with --dir {}?)", path.display(), dir.display()))?;
    let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", path.display()))?;
    let site = cli.site.clone().unwrap_or_else(|| "a".into());
    let api = v["sites"][&site]["api"].as_str().map(str::to_string).with_context(|| format!("{} has no site {site}", path.display()))?;
    // Checked as --api is: what the file says is used as a URL next.
    parse_api_url(&api).map_err(|e| anyhow::anyhow!("{}: site {site}: {e}", path.display()))
}

fn human_size(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut f = n as f64;
    let mut i = 0;
    while f >= 1024.0 && i < U.len() - 1 && (f / 1024.0).fract() == 0.0 {
        f /= 1024.0;
        i += 1;
    }
    format!("{f}{}", U[i])
}

/// `name` as one URL path segment or query value: every byte but the
/// unreserved ones percent-encoded. Sent raw, `vol0?x=1` reached the
/// site as volume `vol0` (and `volume delete` deleted it), and a space
/// or CRLF broke the request line.
fn seg(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A site's API, with the admin token to send, if one was given.
struct Api {
    base: String,
    token: Option<String>,
    timeout: Option<std::time::Duration>,
}

impl Api {
    fn of(cli: &Cli) -> Result<Api> {
        let token = match &cli.token_file {
            None => None,
            Some(f) => {
                let raw = std::fs::read(f).with_context(|| format!("cannot read the admin token file {}", f.display()))?;
                Some(crate::site::admin::parse_token(&raw).with_context(|| format!("{} is not a tidemark admin token", f.display()))?)
            }
        };
        Ok(Api { base: api_url(cli)?, token, timeout: cli.timeout })
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        crate::client::call_as(&self.base, self.token.as_deref(), method, path, body, self.timeout)
    }
}

pub fn run_admin(cli: &Cli) -> Result<()> {
    let api = Api::of(cli)?;
    let out: Value = match &cli.cmd {
        Cmd::Status => {
            let s = api.call("GET", "/status", None)?;
            if !cli.json {
                println!("site {} role {} epoch {}", s["site"].as_str().unwrap_or("?"), s["role"].as_str().unwrap_or("?"), s["epoch"]);
                for g in s["groups"].as_array().into_iter().flatten() {
                    println!("  group {} mode {} last_seq {}", g["name"].as_str().unwrap_or("?"), g["mode"].as_str().unwrap_or("?"), g["last_seq"]);
                    let stall = &g["storage_stall"];
                    if !stall.is_null() {
                        let what = if stall["stalled"] == true { "STALLED" } else { "slow" };
                        println!("    storage {what}: {} in progress for {}s", stall["operation"].as_str().unwrap_or("?"), stall["seconds"]);
                    }
                    if let Some(u) = g["unavailable"].as_str() {
                        println!("    {u}");
                    }
                    for s in g["gc_skipped_segments"].as_array().into_iter().flatten() {
                        println!("    log segment {} set aside by GC: {}", s["segment"].as_str().unwrap_or("?"), s["error"].as_str().unwrap_or("?"));
                    }
                    for v in g["volumes"].as_array().into_iter().flatten() {
                        println!("    volume {} {}", v["name"].as_str().unwrap_or("?"), human_size(v["size"].as_u64().unwrap_or(0)));
                    }
                    if g["snapshots"].as_u64().unwrap_or(0) > 0 {
                        println!("    snapshots {}", g["snapshots"]);
                    }
                    for r in g["retained_snapshots"].as_array().into_iter().flatten() {
                        println!("    snapshot {} retained: the primary deleted it, protect_snapshots kept it", r.as_str().unwrap_or("?"));
                    }
                    for r in g["replicas"].as_array().into_iter().flatten() {
                        println!(
                            "    replica {} {} applied_seq {} lag {} writes {:.3}s",
                            r["site"].as_str().unwrap_or("?"),
                            r["state"].as_str().unwrap_or("?"),
                            r["applied_seq"],
                            r["lag_writes"],
                            r["lag_seconds"].as_f64().unwrap_or(0.0)
                        );
                    }
                    if let Some(p) = g.get("primary") {
                        let age = g["heartbeat"]["age_seconds"].as_f64().map(|a| format!("{a:.1}s ago")).unwrap_or_else(|| "never".into());
                        println!(
                            "    from primary {} ({}), last heartbeat {age}",
                            p["site"].as_str().unwrap_or("?"),
                            if p["connected"].as_bool() == Some(true) { "connected" } else { "disconnected" }
                        );
                    }
                }
                return Ok(());
            }
            s
        }
        Cmd::Volume(VolumeCmd::Create { name, size, group }) => {
            let mut body = json!({"name": name, "size": size});
            if let Some(g) = group {
                body["group"] = json!(g);
            }
            let v = api.call("POST", "/volumes", Some(&body))?;
            if !cli.json {
                println!("created volume {name} ({})", human_size(*size));
                return Ok(());
            }
            v
        }
        Cmd::Volume(VolumeCmd::List) => {
            let v = api.call("GET", "/volumes", None)?;
            if !cli.json {
                for x in v.as_array().into_iter().flatten() {
                    println!("{}\t{}\t{}", x["name"].as_str().unwrap_or("?"), human_size(x["size"].as_u64().unwrap_or(0)), x["group"].as_str().unwrap_or("?"));
                }
                return Ok(());
            }
            v
        }
        Cmd::Volume(VolumeCmd::Resize { name, size }) => {
            let v = api.call("POST", &format!("/volumes/{}/resize", seg(name)), Some(&json!({"size": size})))?;
            if !cli.json {
                println!("resized volume {name} to {}", human_size(*size));
                return Ok(());
            }
            v
        }
        Cmd::Volume(VolumeCmd::Delete { name }) => {
            let v = api.call("DELETE", &format!("/volumes/{}", seg(name)), None)?;
            if !cli.json {
                println!("deleted volume {name}");
                return Ok(());
            }
            v
        }
        Cmd::Group(GroupCmd::Set { name, mode }) => {
            let v = api.call("POST", &format!("/groups/{}", seg(name)), Some(&json!({"mode": mode})))?;
            if !cli.json {
                println!("group {name}: mode {}", v["mode"].as_str().unwrap_or("?"));
                return Ok(());
            }
            v
        }
        Cmd::Snapshot(c) => match run_snapshot(&api, c, cli.json)? {
            Some(v) => v,
            None => return Ok(()),
        },
        Cmd::Up { .. } | Cmd::Site { .. } | Cmd::Init { .. } => unreachable!("handled by main"),
    };
    println!("{out}");
    Ok(())
}

/// `snapshot ...`: returns the JSON to print, or None when it printed text.
fn run_snapshot(api: &Api, c: &SnapshotCmd, json_out: bool) -> Result<Option<Value>> {
    let (v, text) = match c {
        SnapshotCmd::Create { volume, snapshot, writable } => {
            let v = api.call("POST", "/snapshots", Some(&json!({"volume": volume, "name": snapshot, "writable": writable})))?;
            let t = format!("created snapshot {} of {volume} at seq {}", v["name"].as_str().unwrap_or("?"), v["created_seq"]);
            (v, t)
        }
        SnapshotCmd::List { volume } => {
            let path = match volume {
                Some(vol) => format!("/snapshots?volume={}", seg(vol)),
                None => "/snapshots".into(),
            };
            let v = api.call("GET", &path, None)?;
            let mut t = String::from("NAME\tPARENT\tSEQ\tCREATED\tSIZE\tUNIQUE\tMODE");
            for x in v.as_array().into_iter().flatten() {
                t.push_str(&format!(
                    "\n{}\t{}\t{}\t{}\t{}\t{}\t{}{}",
                    x["name"].as_str().unwrap_or("?"),
                    x["parent"].as_str().unwrap_or("?"),
                    x["created_seq"],
                    x["created"].as_str().unwrap_or("?"),
                    human_size(x["size"].as_u64().unwrap_or(0)),
                    human_size(x["unique_bytes"].as_u64().unwrap_or(0)),
                    if x["writable"].as_bool() == Some(true) { "rw" } else { "ro" },
                    if x["retained"].as_bool() == Some(true) { " (retained: deleted at the primary)" } else { "" },
                ));
            }
            (v, t)
        }
        SnapshotCmd::Restore { volume, snapshot } => {
            let v = api.call("POST", "/snapshots/restore", Some(&json!({"volume": volume, "snapshot": snapshot})))?;
            (v, format!("restored {volume} from snapshot {snapshot}"))
        }
        SnapshotCmd::Refresh { volume, snapshot } => {
            let v = api.call("POST", "/snapshots/refresh", Some(&json!({"volume": volume, "snapshot": snapshot})))?;
            (v, format!("refreshed snapshot {snapshot} from {volume}"))
        }
        SnapshotCmd::Sync { snap_a, snap_b } => {
            let v = api.call("POST", "/snapshots/sync", Some(&json!({"from": snap_a, "to": snap_b})))?;
            (v, format!("snapshot {snap_b} now equals {snap_a}"))
        }
        SnapshotCmd::Delete { volume, snapshot } => {
            let v = api.call("DELETE", &format!("/snapshots/{}/{}", seg(volume), seg(snapshot)), None)?;
            (v, format!("deleted snapshot {snapshot} of {volume}"))
        }
    };
    if json_out {
        return Ok(Some(v));
    }
    println!("{text}");
    Ok(None)
}
