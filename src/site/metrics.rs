//! Metrics in Prometheus text format, kept in atomics (no locks on the data
//! path beyond one lookup per connection).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::group::Group;

pub const OP_NAMES: [&str; 7] = ["read", "write", "flush", "trim", "write_zeroes", "block_status", "cache"];
/// Upper bounds of the request latency histogram, in seconds.
pub const LATENCY_BUCKETS_S: [f64; 14] =
    [0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

#[derive(Default)]
pub struct OpCounters {
    pub ops: [AtomicU64; 7],
}

/// Why a DR site refused (or dropped) a replication connection before it
/// authenticated: the `reason` label of `tidemark_replication_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refused {
    /// Too many unauthenticated connections from its source address.
    SourceLimit,
    /// A newer connection displaced it while it waited for its first bytes.
    DisplacedWaiting,
    /// A newer connection displaced it during its TLS handshake.
    DisplacedHandshake,
    /// It sent nothing before the handshake timeout.
    Silent,
    /// Its TLS handshake failed or timed out, or its certificate names no
    /// configured peer site.
    Handshake,
    /// The site ran as many connection threads as it takes.
    ConnectionLimit,
    /// A shortage (descriptors, threads) dropped it.
    Shortage,
}

impl Refused {
    pub const ALL: [Refused; 7] = [Refused::SourceLimit, Refused::DisplacedWaiting, Refused::DisplacedHandshake, Refused::Silent, Refused::Handshake, Refused::ConnectionLimit, Refused::Shortage];

    pub fn label(self) -> &'static str {
        match self {
            Refused::SourceLimit => "source_limit",
            Refused::DisplacedWaiting => "displaced_waiting",
            Refused::DisplacedHandshake => "displaced_handshake",
            Refused::Silent => "silent",
            Refused::Handshake => "handshake",
            Refused::ConnectionLimit => "connection_limit",
            Refused::Shortage => "shortage",
        }
    }
}

#[derive(Default)]
pub struct Metrics {
    exports: Mutex<BTreeMap<String, Arc<OpCounters>>>,
    /// Replication connections refused before authentication, by `Refused`.
    refused: [AtomicU64; 7],
    /// Admin API changes refused for want of this site's credentials.
    admin_refused: AtomicU64,
    /// API connections closed at accept: `API_CONNECTIONS_MAX` were open
    /// and none could be displaced.
    pub api_connections_refused: Arc<AtomicU64>,
    buckets: [AtomicU64; LATENCY_BUCKETS_S.len()],
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Metrics {
    pub fn export_counters(&self, name: &str) -> Arc<OpCounters> {
        self.exports.lock().unwrap_or_else(|p| p.into_inner()).entry(name.to_string()).or_default().clone()
    }

    pub fn count_refused(&self, why: Refused) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count_admin_refused(&self) {
        self.admin_refused.fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused(&self, why: Refused) -> u64 {
        self.refused[why as usize].load(Ordering::Relaxed)
    }

    pub fn observe_request(&self, d: Duration) {
        let s = d.as_secs_f64();
        if let Some(i) = LATENCY_BUCKETS_S.iter().position(|b| s <= *b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.sum_ns.fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// Every metric. A group whose lock is not free within
    /// `STATUS_GROUP_WAIT_MS` (a writer stuck in a stalled disk holds it)
    /// gets only the metrics that need no lock, and
    /// `tidemark_group_answering` 0.
    pub fn render(&self, site: &str, groups: &[Arc<Group>]) -> String {
        // One wait for all groups, as in status.
        let deadline = std::time::Instant::now() + Duration::from_millis(crate::limits::STATUS_GROUP_WAIT_MS);
        let ready: Vec<Arc<Group>> = groups.iter().filter(|g| g.answers_within(deadline.saturating_duration_since(std::time::Instant::now()))).cloned().collect();
        self.render_parts(site, groups, &ready)
    }

    /// The metrics that need no group lock (what `/metrics` answers when
    /// `render` did not finish within `STATUS_TIME_LIMIT_MS`).
    pub fn render_without_locks(&self, site: &str, groups: &[Arc<Group>]) -> String {
        self.render_parts(site, groups, &[])
    }

    /// `ready`: the groups whose lock-taking metrics are rendered.
    fn render_parts(&self, site: &str, groups: &[Arc<Group>], ready: &[Arc<Group>]) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "# HELP tidemark_nbd_requests_total NBD requests completed, by export and operation.");
        let _ = writeln!(o, "# TYPE tidemark_nbd_requests_total counter");
        for (name, c) in self.exports.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            for (i, op) in OP_NAMES.iter().enumerate() {
                let _ = writeln!(o, "tidemark_nbd_requests_total{{export=\"{name}\",op=\"{op}\"}} {}", c.ops[i].load(Ordering::Relaxed));
            }
        }
        let _ = writeln!(o, "# HELP tidemark_nbd_request_seconds Time from reading an NBD request to queueing its reply.");
        let _ = writeln!(o, "# TYPE tidemark_nbd_request_seconds histogram");
        let mut cum = 0;
        for (i, b) in LATENCY_BUCKETS_S.iter().enumerate() {
            cum += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(o, "tidemark_nbd_request_seconds_bucket{{le=\"{b}\"}} {cum}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(o, "tidemark_nbd_request_seconds_bucket{{le=\"+Inf\"}} {count}");
        let _ = writeln!(o, "tidemark_nbd_request_seconds_sum {}", self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9);
        let _ = writeln!(o, "tidemark_nbd_request_seconds_count {count}");
        type Gauge = (&'static str, &'static str, &'static str, fn(&Group) -> u64);
        let gauges: [Gauge; 11] = [
            ("tidemark_log_bytes", "gauge", "Bytes held by the group's log on this site.", |g| g.log_bytes()),
            ("tidemark_log_live_bytes", "gauge", "Bytes of the log still referenced by a block map.", |g| g.live_bytes()),
            ("tidemark_log_segments", "gauge", "Segment files in the group's log.", |g| g.segment_count() as u64),
            ("tidemark_log_last_seq", "gauge", "Sequence number of the newest record.", |g| g.last_seq()),
            ("tidemark_log_syncs_total", "counter", "fdatasync rounds of group commit.", |g| g.stats.syncs.load(Ordering::Relaxed)),
            ("tidemark_log_checkpoints_total", "counter", "Metadata checkpoints written.", |g| g.stats.checkpoints.load(Ordering::Relaxed)),
            ("tidemark_gc_relocated_bytes_total", "counter", "Live bytes rewritten by garbage collection.", |g| g.stats.gc_relocated_bytes.load(Ordering::Relaxed)),
            ("tidemark_gc_segments_freed_total", "counter", "Log segments freed by garbage collection.", |g| g.stats.gc_segments_freed.load(Ordering::Relaxed)),
            (
                "tidemark_gc_skipped_segments",
                "gauge",
                "Log segments garbage collection set aside because a live block in them is unreadable or fails its checksum.",
                |g| g.gc_skipped().len() as u64,
            ),
            ("tidemark_snapshots", "gauge", "Snapshots held in the group on this site.", |g| g.maps().iter().filter(|m| m.snapshot).count() as u64),
            (
                "tidemark_snapshot_delete_refusals_total",
                "counter",
                "Snapshot deletions from the primary this DR site refused (protect_snapshots) since start.",
                |g| g.refusals.lock().unwrap_or_else(|p| p.into_inner()).len() as u64,
            ),
        ];
        for (name, kind, help, f) in gauges {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
            for g in ready {
                let _ = writeln!(o, "{name}{{group=\"{}\"}} {}", g.name, f(g));
            }
        }
        let _ = writeln!(o, "# HELP tidemark_group_answering 1 if this scrape could read the group, 0 if its lock was held longer than it waits (see tidemark_storage_pending_seconds).");
        let _ = writeln!(o, "# TYPE tidemark_group_answering gauge");
        for g in groups {
            let answering = ready.iter().any(|r| Arc::ptr_eq(r, g));
            let _ = writeln!(o, "tidemark_group_answering{{group=\"{}\"}} {}", g.name, answering as u8);
        }
        let _ = writeln!(o, "# HELP tidemark_storage_pending_seconds Age of the group's oldest storage operation in progress (append, sync, checkpoint, pins, a read that waits for the disk), 0 if none: a stalled disk grows it.");
        let _ = writeln!(o, "# TYPE tidemark_storage_pending_seconds gauge");
        for g in groups {
            let _ = writeln!(o, "tidemark_storage_pending_seconds{{group=\"{}\"}} {}", g.name, g.io.oldest().map_or(0.0, |p| p.seconds));
        }
        let _ = writeln!(o, "# HELP tidemark_replication_refused_total Replication connections this site refused or dropped before they authenticated, by reason.");
        let _ = writeln!(o, "# TYPE tidemark_replication_refused_total counter");
        for r in Refused::ALL {
            let _ = writeln!(o, "tidemark_replication_refused_total{{reason=\"{}\"}} {}", r.label(), self.refused(r));
        }
        let _ = writeln!(o, "# HELP tidemark_admin_refused_total Admin API changes refused for want of this site's admin credentials.");
        let _ = writeln!(o, "# TYPE tidemark_admin_refused_total counter");
        let _ = writeln!(o, "tidemark_admin_refused_total {}", self.admin_refused.load(Ordering::Relaxed));
        let _ = writeln!(o, "# HELP tidemark_api_connections_refused_total Admin API connections closed at accept: the limit of open ones was reached and every one was answering a request.");
        let _ = writeln!(o, "# TYPE tidemark_api_connections_refused_total counter");
        let _ = writeln!(o, "tidemark_api_connections_refused_total {}", self.api_connections_refused.load(Ordering::Relaxed));
        let _ = writeln!(o, "# HELP tidemark_group_lock_wait_max_seconds Longest wait of a writer for its group's lock since start.");
        let _ = writeln!(o, "# TYPE tidemark_group_lock_wait_max_seconds gauge");
        for g in groups {
            let us = g.stats.write_lock_wait_max_us.load(Ordering::Relaxed);
            let _ = writeln!(o, "tidemark_group_lock_wait_max_seconds{{group=\"{}\"}} {}", g.name, us as f64 / 1e6);
        }
        let _ = writeln!(o, "# HELP tidemark_nbd_reads_off_worker_total NBD requests whose log reads (a read, an unaligned write's edge blocks) were not all in the page cache, done on the blocking pool so that a disk slow to read holds up no runtime worker.");
        let _ = writeln!(o, "# TYPE tidemark_nbd_reads_off_worker_total counter");
        for g in groups {
            let _ = writeln!(o, "tidemark_nbd_reads_off_worker_total{{group=\"{}\"}} {}", g.name, g.stats.nbd_reads_off_worker.load(Ordering::Relaxed));
        }
        let _ = writeln!(o, "# HELP tidemark_nbd_appends_off_worker_total NBD writes, zeroings and trims that found every runtime worker but one inside an append, done on the blocking pool so that disks stalling in several groups at once cannot hold every worker.");
        let _ = writeln!(o, "# TYPE tidemark_nbd_appends_off_worker_total counter");
        for g in groups {
            let _ = writeln!(o, "tidemark_nbd_appends_off_worker_total{{group=\"{}\"}} {}", g.name, g.stats.nbd_appends_off_worker.load(Ordering::Relaxed));
        }
        let repl: [(&str, &str, &str); 7] = [
            ("tidemark_link_sent_bytes_total", "counter", "Every byte written to the replication link."),
            ("tidemark_link_data_bytes_total", "counter", "Application write payload bytes sent on the link."),
            ("tidemark_replication_lag_bytes", "gauge", "Bytes the DR site does not hold durably yet."),
            ("tidemark_replication_lag_seconds", "gauge", "Age of the oldest write the DR site does not hold durably yet."),
            ("tidemark_replication_lag_writes", "gauge", "Writes the DR site does not hold durably yet."),
            ("tidemark_replication_connected", "gauge", "1 while the link to the DR site is up."),
            ("tidemark_replication_diverged_resyncs_total", "counter", "Full resyncs because the DR site's last record was not this primary's."),
        ];
        let now = crate::util::now_ns();
        for (name, kind, help) in repl {
            let _ = writeln!(o, "# HELP {name} {help}");
            let _ = writeln!(o, "# TYPE {name} {kind}");
            for g in ready {
                let last = g.last_seq();
                for r in g.replication.replicas() {
                    let lag_writes = last.saturating_sub(r.acked_seq);
                    let v = match name {
                        "tidemark_link_sent_bytes_total" => r.sent_bytes_total as f64,
                        "tidemark_link_data_bytes_total" => r.data_bytes_total as f64,
                        "tidemark_replication_lag_bytes" => crate::replicate::lag(g, &r, last, now).1 as f64,
                        "tidemark_replication_lag_seconds" => crate::replicate::lag(g, &r, last, now).0,
                        "tidemark_replication_lag_writes" => lag_writes as f64,
                        "tidemark_replication_diverged_resyncs_total" => r.diverged_resyncs as f64,
                        _ => if r.connected { 1.0 } else { 0.0 },
                    };
                    let _ = writeln!(o, "{name}{{group=\"{}\",peer=\"{}\"}} {v}", g.name, r.site);
                }
            }
        }
        let _ = writeln!(o, "# HELP tidemark_site_info Site identity.");
        let _ = writeln!(o, "# TYPE tidemark_site_info gauge");
        let _ = writeln!(o, "tidemark_site_info{{site=\"{site}\"}} 1");
        o
    }
}
