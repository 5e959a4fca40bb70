//! What a group's storage is doing right now, readable without the group's
//! lock (ARCHITECTURE.md "A stalled disk is reported, not silent").
//!
//! Every blocking operation on a group's files (an append, a log sync, a
//! checkpoint, a save of the replication pins, a read of the log that may
//! wait for the disk) marks its slot with the time it started and clears it
//! when it returns. A disk that stops answering
//! leaves a slot marked: the site's watchdog logs it, and `status` and
//! `/metrics` show it, while the operation itself (and every writer queued
//! behind it on the group's lock) waits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// The storage operations a group watches, one slot each. Each is
/// serialized by its own lock (the group lock, the sync lock, the
/// checkpoint lock, the pins lock), so a slot has one holder at a time;
/// except reads, which run side by side and share `READ_SLOTS` slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    Append = 0,
    Sync = 1,
    Checkpoint = 2,
    Pins = 3,
    Read = 4,
}

/// Reads watched at once: more than the NBD reads of a group that may wait
/// on the blocking pool at once (`NBD_POOL_CALLS_PER_GROUP`), with room
/// for the site's own readers (unaligned writes' edges, exports). A read
/// that finds every slot taken is not watched: with this many reads in
/// flight, a stalled disk shows in the others (an unwatched read that
/// alone hangs on one bad sector after the rest returned is the gap).
pub const READ_SLOTS: usize = 64;
const _: () = assert!(READ_SLOTS >= 2 * crate::limits::NBD_POOL_CALLS_PER_GROUP);

impl IoOp {
    pub const ALL: [IoOp; 5] = [IoOp::Append, IoOp::Sync, IoOp::Checkpoint, IoOp::Pins, IoOp::Read];

    pub fn label(self) -> &'static str {
        match self {
            IoOp::Append => "log append",
            IoOp::Sync => "log sync",
            IoOp::Checkpoint => "checkpoint write",
            IoOp::Pins => "replication pins write",
            IoOp::Read => "log read",
        }
    }
}

/// Nanoseconds on a monotonic clock since this process first asked, plus
/// one (so that 0 can mean "nothing in progress").
pub fn mono_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

pub struct IoWatch {
    /// Start (`mono_ns`) of the operation in progress in each slot; 0 when idle.
    since: [AtomicU64; 4],
    /// The same for reads (`IoOp::Read`), one slot per read in progress.
    reads: [AtomicU64; READ_SLOTS],
}

/// An operation in progress, for as long as it is held.
pub struct InProgress<'a> {
    /// None: a read that found every read slot taken.
    slot: Option<&'a AtomicU64>,
    started: u64,
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        // Only the holder's own mark is cleared.
        if let Some(slot) = self.slot {
            let _ = slot.compare_exchange(self.started, 0, Ordering::AcqRel, Ordering::Relaxed);
        }
    }
}

/// The oldest storage operation in progress.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Pending {
    pub op: IoOp,
    /// When it started (`mono_ns`).
    pub since: u64,
    pub seconds: f64,
}

impl Pending {
    /// In progress for `STORAGE_SLOW_MS` or longer: shown in status.
    pub fn slow(&self) -> bool {
        self.seconds * 1e3 >= crate::limits::STORAGE_SLOW_MS as f64
    }

    /// In progress for `STORAGE_STALL_MS` or longer: a stalled disk.
    pub fn stalled(&self) -> bool {
        self.seconds * 1e3 >= crate::limits::STORAGE_STALL_MS as f64
    }
}

impl Default for IoWatch {
    fn default() -> IoWatch {
        IoWatch { since: Default::default(), reads: [const { AtomicU64::new(0) }; READ_SLOTS] }
    }
}

impl IoWatch {
    pub fn start(&self, op: IoOp) -> InProgress<'_> {
        let started = mono_ns();
        if op == IoOp::Read {
            let slot = self.reads.iter().find(|s| s.compare_exchange(0, started, Ordering::AcqRel, Ordering::Relaxed).is_ok());
            return InProgress { slot, started };
        }
        let slot = &self.since[op as usize];
        slot.store(started, Ordering::Release);
        InProgress { slot: Some(slot), started }
    }

    /// The operation of kind `op` in progress (the oldest, for reads), if any.
    pub fn pending(&self, op: IoOp) -> Option<Pending> {
        let since = match op {
            IoOp::Read => self.reads.iter().map(|s| s.load(Ordering::Acquire)).filter(|&t| t != 0).min().unwrap_or(0),
            _ => self.since[op as usize].load(Ordering::Acquire),
        };
        (since != 0).then(|| Pending { op, since, seconds: mono_ns().saturating_sub(since) as f64 / 1e9 })
    }

    /// Whether an NBD call on a runtime worker should go straight to the
    /// blocking pool: an append in progress for `STORAGE_SLOW_MS` holds the
    /// group lock for long, and so may a log read that slow (an unaligned
    /// write's edge, read under the lock); any operation in progress for
    /// `STORAGE_STALL_MS` (a log sync that has not returned) may stall
    /// reads too. One look at each slot: it is asked on every NBD call.
    pub fn holds_up_calls(&self) -> bool {
        IoOp::ALL.iter().filter_map(|&op| self.pending(op)).any(|p| p.stalled() || (matches!(p.op, IoOp::Append | IoOp::Read) && p.slow()))
    }

    /// The oldest operation still in progress, if any.
    pub fn oldest(&self) -> Option<Pending> {
        IoOp::ALL.iter().filter_map(|&op| self.pending(op)).min_by_key(|p| p.since)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_operation_in_progress_is_reported_until_it_returns() {
        let w = IoWatch::default();
        assert_eq!(w.oldest(), None);
        let sync = w.start(IoOp::Sync);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let append = w.start(IoOp::Append);
        let p = w.oldest().unwrap();
        assert_eq!(p.op, IoOp::Sync);
        assert!(p.seconds >= 0.005, "{p:?}");
        drop(sync);
        assert_eq!(w.oldest().unwrap().op, IoOp::Append);
        drop(append);
        assert_eq!(w.oldest(), None);
    }

    #[test]
    fn a_guard_clears_only_its_own_mark() {
        let w = IoWatch::default();
        let first = w.start(IoOp::Pins);
        std::thread::sleep(std::time::Duration::from_millis(1));
        let second = w.start(IoOp::Pins);
        drop(first);
        assert_eq!(w.oldest().map(|p| p.op), Some(IoOp::Pins), "the later mark stays");
        drop(second);
        assert_eq!(w.oldest(), None);
    }

    #[test]
    fn reads_side_by_side_show_the_oldest_and_more_than_the_slots_are_let_be() {
        let w = IoWatch::default();
        let first = w.start(IoOp::Read);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let mut later: Vec<_> = (0..READ_SLOTS + 3).map(|_| w.start(IoOp::Read)).collect();
        assert_eq!(w.pending(IoOp::Read).unwrap().since, first.started, "the oldest read");
        assert_eq!(later.iter().filter(|g| g.slot.is_none()).count(), 4, "one slot per read while they last");
        drop(first);
        let p = w.pending(IoOp::Read).unwrap();
        assert!(p.since > 0 && later.iter().any(|g| g.started == p.since), "the next oldest: {p:?}");
        // Unwatched reads clear nothing; the watched ones clear their own.
        later.retain(|g| g.slot.is_some());
        assert_eq!(later.len(), READ_SLOTS - 1);
        let fresh = w.start(IoOp::Read);
        assert!(fresh.slot.is_some(), "a freed slot is taken again");
        drop(later);
        assert_eq!(w.oldest().map(|p| (p.op, p.since)), Some((IoOp::Read, fresh.started)));
        drop(fresh);
        assert_eq!(w.oldest(), None);
    }
}
