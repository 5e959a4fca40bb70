//! Replication: every write of a consistency group reaches every DR site in
//! sequence order, over mutually authenticated TLS.
//!
//! - `frame`: the wire format (versioned, length-limited frames; log records
//!   travel verbatim inside them).
//! - `session`: the session logic without I/O: `Sender` (primary side:
//!   HELLO, resync, records pipelined within a window, heartbeats) and
//!   `Receiver` (DR side: checks, appends byte for byte to its own log,
//!   applies strictly in sequence order, says what to acknowledge once
//!   durable). Frames in, frames out, time as an argument.
//! - `decide`: the single-function decisions both use (record verdicts,
//!   session plan, window).
//! - `send` / `receive`: the tokio drivers of those cores (TLS, tasks,
//!   timers), one sender task per (group, DR site).
//! - `dsim` (tests): the deterministic simulation of the cores; `sim`
//!   (tests): the seeded simulation of the tokio drivers.
//! - `heartbeat`: the DR's private, crash-safe region for the latest heartbeat.
//! - `tls`: the per-deployment CA and site certificates.
//! - `readahead`: large socket reads under a DR site's TLS layer.
//!
//! This file holds the per-group replication state shared by the NBD data
//! path (sync mode waits here) and the admin API (status, metrics).

pub mod decide;
pub mod frame;
pub mod heartbeat;
pub mod priority;
pub mod readahead;
pub mod receive;
pub mod send;
pub mod session;
pub mod tls;
#[cfg(test)]
mod sim;
#[cfg(test)]
mod dsim;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::Serialize;
use tokio::sync::watch;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Async,
    Sync,
    Periodic,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode, String> {
        match s {
            "async" => Ok(Mode::Async),
            "sync" => Ok(Mode::Sync),
            "periodic" => Ok(Mode::Periodic),
            o => Err(format!("mode {o:?} is not one of async, sync, periodic")),
        }
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Mode::Async => "async",
            Mode::Sync => "sync",
            Mode::Periodic => "periodic",
        }
    }
}

/// What a sync group does when a sync DR site is lost.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncLoss {
    /// Refuse writes (EIO) until the DR site is back: no acknowledged write
    /// exists only on the primary.
    Refuse,
    /// Keep accepting writes, replicating asynchronously, and say so (event).
    Async,
}

/// State of one DR replica of a group, as the primary sees it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Replica {
    pub site: String,
    /// `replicating`, `catching-up`, `resyncing` or `disconnected`.
    pub state: String,
    pub connected: bool,
    /// Highest sequence number the DR site holds durably.
    pub acked_seq: u64,
    /// Highest sequence number sent.
    pub sent_seq: u64,
    /// Timestamp of the oldest sent-but-unacknowledged record (0 if none).
    pub oldest_unacked_ns: u64,
    /// Bytes sent and not yet acknowledged, plus bytes not yet sent, as the
    /// sender last counted them (status and metrics count from the log:
    /// `lag`).
    pub lag_bytes: u64,
    pub sent_bytes_total: u64,
    pub data_bytes_total: u64,
    pub last_error: Option<String>,
    /// Nice value of the sender thread (`sender_nice` outside sync mode).
    pub sender_nice: i32,
    /// Full resyncs started because the DR's last record was not this
    /// primary's (since this process started).
    pub diverged_resyncs: u64,
    /// Sessions established with it since this process started: a
    /// watcher that polls sees a link lost and made again between two
    /// polls (a DR site restarted at once) by this changing.
    pub sessions: u64,
    /// Why the last session that was established ended (kept when the
    /// next connects, unlike `last_error`).
    pub last_lost: Option<String>,
}

/// What DR site `r` lacks, as status and metrics report it: (`lag_seconds`,
/// `lag_bytes`), `last` being the group's newest seq and `now_ns` the wall
/// clock.
///
/// * Seconds: the age of the oldest write it does not hold durably, from
///   the write time of record `acked_seq + 1` as the group sampled it
///   (`Group::written_at`), so writes not shipped yet count too: a
///   disconnected DR site, a periodic one between shipments, a sender that
///   has not run.
/// * Bytes: the log from that record on (`Group::bytes_after`), or in
///   dirty-region mode the dirty blocks (what a resync will copy).
///
/// Where the samples cannot say: with no sample at all (opened without
/// replaying a record, and no DR site has a pin) both fall back to what the
/// sender last published (the oldest record in flight, its own byte count);
/// for a seq older than every sample (a DR site that has not reconnected
/// since this site started counts from seq 1, and the log may no longer
/// hold the record) the oldest sample stands in, the oldest write this site
/// knows of. Samples are never later than the records they stand for
/// (`group/times.rs`), and `Group::sample_from_log` adds the DR's own
/// record from the log at open (its pin) and at HELLO.
pub fn lag(g: &crate::group::Group, r: &Replica, last: u64, now_ns: u64) -> (f64, u64) {
    if r.acked_seq >= last {
        return (0.0, 0);
    }
    let sample = g.written_at(r.acked_seq + 1);
    let since = sample.map_or(r.oldest_unacked_ns, |s| s.time_ns);
    let seconds = if since == 0 { 0.0 } else { now_ns.saturating_sub(since) as f64 / 1e9 };
    let bytes = if g.in_dirty_mode(&r.site) {
        g.dirty_blocks(&r.site) * crate::limits::BLOCK_BYTES
    } else {
        sample.map_or(r.lag_bytes, |s| g.bytes_after(s.at))
    };
    (seconds, bytes)
}

pub struct GroupReplication {
    mode: Mutex<Mode>,
    /// How long a sync write waits for a DR site that has not acknowledged
    /// it (disconnected, or connected but stalled) before the loss policy
    /// applies.
    sync_timeout: Mutex<std::time::Duration>,
    sync_loss: Mutex<SyncLoss>,
    /// Set once a sync group fell back to async because a DR site was lost.
    degraded: AtomicBool,
    replicas: watch::Sender<BTreeMap<String, Replica>>,
    /// Periodic mode: a storage operation (snapshot, restore, ...) at this
    /// seq ships now, with the batch pending before it.
    ship_through: std::sync::atomic::AtomicU64,
    /// What each DR site held when this group last saved its pins (set at
    /// open): a replica starts from there, not from 0, until its DR site
    /// says more at HELLO.
    known_acked: Mutex<BTreeMap<String, u64>>,
}

impl GroupReplication {
    pub fn new(mode: &str) -> GroupReplication {
        GroupReplication {
            mode: Mutex::new(Mode::parse(mode).unwrap_or(Mode::Async)),
            sync_timeout: Mutex::new(std::time::Duration::from_millis(crate::limits::SYNC_TIMEOUT_MS_DEFAULT)),
            sync_loss: Mutex::new(SyncLoss::Async),
            degraded: AtomicBool::new(false),
            replicas: watch::channel(BTreeMap::new()).0,
            ship_through: std::sync::atomic::AtomicU64::new(0),
            known_acked: Mutex::new(BTreeMap::new()),
        }
    }

    /// `site` is known to hold every seq up to `seq` durably (from the
    /// saved pins at open): its replica starts there, so its lag after a
    /// restart counts from the first write it lacks, not from seq 1.
    pub fn seed_acked(&self, site: &str, seq: u64) {
        self.known_acked.lock().unwrap().insert(site.to_string(), seq);
        self.update(site, |r| r.acked_seq = r.acked_seq.max(seq));
    }

    /// Asks periodic-mode senders to ship everything up to `seq` now.
    pub fn ship_through(&self, seq: u64) {
        self.ship_through.fetch_max(seq, Ordering::AcqRel);
    }

    /// Must a periodic sender whose next record is `next` ship before its period ends?
    pub fn ship_requested(&self, next: u64) -> bool {
        self.ship_through.load(Ordering::Acquire) >= next
    }

    pub fn mode(&self) -> Mode {
        *self.mode.lock().unwrap()
    }

    pub fn set_mode(&self, m: Mode) {
        *self.mode.lock().unwrap() = m;
        self.degraded.store(false, Ordering::Release);
        // Wake senders (periodic <-> continuous) and sync waiters.
        self.replicas.send_modify(|_| {});
    }

    pub fn set_sync_timeout(&self, t: std::time::Duration) {
        *self.sync_timeout.lock().unwrap() = t;
    }

    pub fn set_sync_loss(&self, p: SyncLoss) {
        *self.sync_loss.lock().unwrap() = p;
    }

    /// Registers a configured DR site (disconnected until its sender connects).
    pub fn add_replica(&self, site: &str) {
        let acked = self.known_acked.lock().unwrap().get(site).copied().unwrap_or(0);
        self.replicas.send_modify(|m| {
            m.entry(site.to_string()).or_insert_with(|| Replica { site: site.to_string(), state: "disconnected".into(), acked_seq: acked, sent_seq: acked, ..Default::default() });
        });
    }

    pub fn update(&self, site: &str, f: impl FnOnce(&mut Replica)) {
        self.replicas.send_modify(|m| {
            if let Some(r) = m.get_mut(site) {
                f(r);
            }
        });
    }

    /// The lowest seq every DR site holds (0 if one holds nothing or there
    /// are none), read in place.
    pub fn min_acked(&self) -> u64 {
        self.replicas.borrow().values().map(|r| r.acked_seq).min().unwrap_or(0)
    }

    pub fn replicas(&self) -> Vec<Replica> {
        self.replicas.borrow().values().cloned().collect()
    }

    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<String, Replica>> {
        self.replicas.subscribe()
    }

    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// Before a write: a sync group that refuses on loss and has lost a DR
    /// site takes no write at all.
    pub fn check_writable(&self) -> Result<(), String> {
        if self.mode() != Mode::Sync || *self.sync_loss.lock().unwrap() != SyncLoss::Refuse {
            return Ok(());
        }
        match self.replicas.borrow().values().find(|r| !r.connected) {
            Some(r) => Err(format!("sync DR site {} is disconnected; refusing writes (sync_loss = refuse)", r.site)),
            None => Ok(()),
        }
    }

    /// In sync mode, waits until every DR site holds `seq` durably. A DR site
    /// that has not acknowledged it within the sync timeout (gone, or
    /// stalled) fails the write (refuse) or is skipped with an event (async
    /// fallback) until it has caught up again.
    /// Whether a write must wait for DR acknowledgements (sync mode, not
    /// degraded to async).
    pub fn waits_for_replicas(&self) -> bool {
        self.mode() == Mode::Sync && !self.degraded() && !self.replicas.borrow().is_empty()
    }

    pub async fn wait_replicated(&self, seq: u64) -> Result<(), String> {
        if !self.waits_for_replicas() {
            return Ok(());
        }
        let mut rx = self.replicas.subscribe();
        let timeout = *self.sync_timeout.lock().unwrap();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|m| self.mode() != Mode::Sync || m.values().all(|r| r.acked_seq >= seq))).await;
        if matches!(waited, Ok(Ok(_))) {
            return Ok(());
        }
        let lost: Vec<String> = self.replicas.borrow().values().filter(|r| r.acked_seq < seq).map(|r| r.site.clone()).collect();
        if lost.is_empty() || self.mode() != Mode::Sync {
            return Ok(());
        }
        match *self.sync_loss.lock().unwrap() {
            SyncLoss::Refuse => Err(format!(
                "sync DR site {} did not acknowledge seq {seq} within {timeout:?}; write refused (sync_loss = refuse)",
                lost.join(",")
            )),
            SyncLoss::Async => {
                if !self.degraded.swap(true, Ordering::AcqRel) {
                    tracing::warn!(event = "sync-degraded", "sync DR site {} did not acknowledge within {timeout:?}: replicating asynchronously until it has caught up", lost.join(","));
                }
                Ok(())
            }
        }
    }

    /// A DR site caught up again: a degraded sync group is sync again.
    pub fn clear_degraded(&self) {
        if self.degraded.swap(false, Ordering::AcqRel) {
            tracing::info!(event = "sync-restored", "all sync DR sites caught up: synchronous again");
        }
    }
}
