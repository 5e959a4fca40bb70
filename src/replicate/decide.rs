//! The decisions of replication, without I/O: what a DR site does with each
//! incoming record, where a sender starts a session, and the window of
//! unacknowledged batches. `send.rs` and `receive.rs` (and
//! `Group::append_replicated`) call these; the tests below drive them with
//! seeded random event sequences.

use std::collections::VecDeque;

use crate::log::record::{Header, Kind, FLAG_RELOCATED, FLAG_RESYNC};

/// What a DR site knows when a record arrives.
#[derive(Clone, Copy, Debug)]
pub struct ReceiverView {
    /// Next sequence number it expects.
    pub next_seq: u64,
    /// Its epoch: records from an older one are refused.
    pub epoch: u64,
    /// A resync is being staged.
    pub staging: bool,
    /// Generation of the newest connection, and of the one delivering.
    pub current_gen: u64,
    pub conn_gen: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Append and apply it.
    Append,
    /// Already held (resent after a reconnect): skip it silently.
    Duplicate,
    /// Refuse it and end the connection, with the reason.
    Reject(String),
}

/// Is this record part of the ordered stream (as opposed to resync data)?
pub fn ordered(h: &Header) -> bool {
    h.flags & FLAG_RESYNC == 0 && !matches!(h.kind, Kind::ResyncBegin | Kind::ResyncCommit)
}

/// The receiver's rule: strictly the next seq, nothing from an older epoch or
/// an older connection, resync data only inside a resync, a commit never
/// behind what is held.
pub fn receive_verdict(v: &ReceiverView, h: &Header) -> Verdict {
    if v.conn_gen != v.current_gen {
        return Verdict::Reject("superseded by a newer replication connection".into());
    }
    if h.flags & FLAG_RELOCATED != 0 {
        return Verdict::Reject(format!("record seq {} is a GC relocation; those are never replicated", h.seq));
    }
    if h.epoch < v.epoch {
        return Verdict::Reject(format!("record seq {} has epoch {} older than this site's {}", h.seq, h.epoch, v.epoch));
    }
    if h.kind == Kind::ResyncBegin {
        return Verdict::Append;
    }
    if h.flags & FLAG_RESYNC != 0 {
        return if v.staging { Verdict::Append } else { Verdict::Reject("resync data without a resync in progress".into()) };
    }
    if h.kind == Kind::ResyncCommit {
        if !v.staging {
            return Verdict::Reject("resync commit without a resync in progress".into());
        }
        if h.seq + 1 < v.next_seq {
            return Verdict::Reject(format!("resync commit at seq {} is behind this site's seq {}", h.seq, v.next_seq - 1));
        }
        return Verdict::Append;
    }
    if h.seq < v.next_seq {
        return Verdict::Duplicate;
    }
    if h.seq != v.next_seq {
        return Verdict::Reject(format!("record out of order: expected seq {}, got {}", v.next_seq, h.seq));
    }
    Verdict::Append
}

/// How a sender starts a session, from the DR's HELLO_REPLY and its own log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// Stream records from `from` (pin the log at `pin`).
    Stream { from: u64, pin: u64 },
    /// Resync dirty regions first (`full`: the log no longer has what the
    /// DR needs, so every block is dirty).
    Resync { full: bool },
    /// Refuse: the DR claims records this primary never wrote.
    Refuse(String),
    /// The DR's history is not (provably) a prefix of this primary's: a
    /// full resync replaces its copy (the reason says why).
    Diverged(String),
}

/// What the primary found when it compared the DR's last record (named in
/// its HELLO reply) with its own record at that seq.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum History {
    /// Nothing to compare: the DR holds no record, or did not name it.
    Unchecked,
    /// The same record: the DR's history is a prefix of this primary's.
    Same,
    /// A different record. The DR holds writes this primary lost (its page
    /// cache went with a power loss after they were shipped) and its own
    /// history went on without them.
    Differs,
    /// This primary's log no longer holds that seq.
    Unknown,
}

/// The primary's dirty set for a DR site (dirty-region mode), if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirtySet {
    /// Not in dirty-region mode.
    Absent,
    /// It covers what the DR lacks: every block written after what the DR
    /// holds (or every block).
    Covers,
    /// It began after a seq the DR does not hold (a DR site that lost its
    /// data, or was restored from an older copy): the blocks written
    /// between are in neither the set nor, any more, the log.
    Short,
}

/// Where a session starts. `history` matters only where the DR's seq is
/// one this primary has (a DR ahead is refused before). `suspect`: the
/// DR's last seq is at or after a point where this primary's log was cut
/// by a restart (`Inner::unverified`), so a record there that cannot be
/// checked may be one it lost.
pub fn plan_session(dr_next: u64, dr_durable: u64, primary_last: u64, log_holds_next: bool, dirty: DirtySet, history: History, suspect: bool) -> Start {
    let next = dr_next.max(1);
    if next > primary_last + 1 {
        return Start::Refuse(format!("the DR site holds seq {} but this primary's last is {primary_last}: the DR copy is ahead (split brain, or this primary lost writes it had shipped)", next - 1));
    }
    if history == History::Differs {
        return Start::Diverged(format!("its record at seq {} is not this primary's (this primary lost writes it had shipped, or the DR followed another primary)", next - 1));
    }
    if history == History::Unknown && suspect {
        // A dirty set covers what this primary wrote, not what it lost.
        return Start::Diverged(format!("this primary restarted before seq {} and its log no longer holds that seq to check the DR's record against", next - 1));
    }
    if dirty != DirtySet::Absent {
        return Start::Resync { full: dirty == DirtySet::Short };
    }
    if !log_holds_next {
        return Start::Resync { full: true };
    }
    if history == History::Unknown {
        return Start::Diverged(format!("this primary's log no longer holds seq {} to check the DR's record against", next - 1));
    }
    // The pin keeps the DR's last durable record, which the next HELLO
    // checks against.
    Start::Stream { from: next, pin: dr_durable.max(1) }
}

/// Batches sent and not yet acknowledged.
#[derive(Default, Debug)]
pub struct Window {
    batches: VecDeque<(u64 /* last seq */, u64 /* bytes */, u64 /* first timestamp */)>,
    pub bytes: u64,
    pub acked: u64,
    /// RECORDS frames of this connection the DR holds durably.
    pub frames_acked: u64,
}

impl Window {
    pub fn new(acked: u64) -> Window {
        Window { acked, ..Default::default() }
    }
    pub fn sent(&mut self, last_seq: u64, bytes: u64, first_ts: u64) {
        self.batches.push_back((last_seq, bytes, first_ts));
        self.bytes += bytes;
    }
    /// An ACK: returns the timestamp of the oldest batch still unacknowledged (0 if none).
    pub fn ack(&mut self, durable: u64, frames: u64) -> u64 {
        self.acked = self.acked.max(durable);
        self.frames_acked = self.frames_acked.max(frames);
        while self.batches.front().is_some_and(|b| b.0 <= self.acked) {
            let b = self.batches.pop_front().unwrap();
            self.bytes -= b.1;
        }
        self.batches.front().map(|b| b.2).unwrap_or(0)
    }
    pub fn full(&self, max_bytes: u64) -> bool {
        self.bytes >= max_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn rec(seq: u64, kind: Kind, flags: u16) -> Header {
        Header { kind, flags, epoch: 2, seq, timestamp_ns: 0, volume: 1, length: 4096, offset: 0, body_len: 0, crc: 0, durable: 0 }
    }

    /// A seeded model: the primary's stream is resent from random points
    /// (reconnects), interleaved with stale deliveries from older
    /// connections and random junk; whatever the receiver appends must be
    /// exactly 1, 2, 3, … with no gap and no repeat. 5000 schedules.
    #[test]
    fn receiver_appends_exactly_the_sequence_under_resends_and_stale_connections() {
        let base: u64 = std::env::var("CORE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
        for s in 0..5000u64 {
            let seed = base.wrapping_add(s);
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let last = rng.random_range(1..200u64);
            let mut next = 1u64;
            let mut gen = 1u64;
            let mut appended = Vec::new();
            for _ in 0..400 {
                // A new connection resumes from what the DR says (next) or,
                // buggy or stale, from anywhere.
                let conn = if rng.random_bool(0.1) { gen - rng.random_range(0..gen.min(3)) } else { gen };
                if rng.random_bool(0.05) {
                    gen += 1;
                }
                let seq = if rng.random_bool(0.8) { next } else { rng.random_range(1..=last + 2) };
                let v = ReceiverView { next_seq: next, epoch: 1, staging: false, current_gen: gen, conn_gen: conn };
                match receive_verdict(&v, &rec(seq, Kind::Write, 0)) {
                    Verdict::Append => {
                        assert_eq!(seq, next, "seed {seed}: appended seq {seq} while expecting {next}");
                        assert_eq!(conn, gen, "seed {seed}: appended from a stale connection");
                        appended.push(seq);
                        next += 1;
                    }
                    Verdict::Duplicate => assert!(seq < next, "seed {seed}"),
                    Verdict::Reject(_) => assert!(seq > next || conn != gen, "seed {seed}: refused seq {seq} at next {next}"),
                }
            }
            assert!(appended.iter().enumerate().all(|(i, s)| *s == i as u64 + 1), "seed {seed}: {appended:?}");
        }
    }

    #[test]
    fn resync_records_only_inside_a_resync() {
        let v = ReceiverView { next_seq: 10, epoch: 2, staging: false, current_gen: 1, conn_gen: 1 };
        assert!(matches!(receive_verdict(&v, &rec(0, Kind::Write, FLAG_RESYNC)), Verdict::Reject(_)));
        assert!(matches!(receive_verdict(&v, &rec(20, Kind::ResyncCommit, 0)), Verdict::Reject(_)));
        assert_eq!(receive_verdict(&v, &rec(0, Kind::ResyncBegin, 0)), Verdict::Append);
        let s = ReceiverView { staging: true, ..v };
        assert_eq!(receive_verdict(&s, &rec(0, Kind::Write, FLAG_RESYNC)), Verdict::Append);
        assert_eq!(receive_verdict(&s, &rec(20, Kind::ResyncCommit, 0)), Verdict::Append);
        assert!(matches!(receive_verdict(&s, &rec(5, Kind::ResyncCommit, 0)), Verdict::Reject(_)), "commit behind");
        let mut old = rec(10, Kind::Write, 0);
        old.epoch = 1; // older than the site's epoch 2
        assert!(matches!(receive_verdict(&v, &old), Verdict::Reject(_)), "stale epoch");
        assert!(matches!(receive_verdict(&v, &rec(10, Kind::Write, FLAG_RELOCATED)), Verdict::Reject(_)));
    }

    #[test]
    fn session_plans() {
        use History::*;
        for h in [Unchecked, Same] {
            assert_eq!(plan_session(5, 4, 10, true, DirtySet::Absent, h, false), Start::Stream { from: 5, pin: 4 });
            assert_eq!(plan_session(5, 3, 10, true, DirtySet::Absent, h, false), Start::Stream { from: 5, pin: 3 });
            assert_eq!(plan_session(11, 10, 10, true, DirtySet::Absent, h, false), Start::Stream { from: 11, pin: 10 });
            assert_eq!(plan_session(5, 4, 10, false, DirtySet::Absent, h, false), Start::Resync { full: true });
            assert_eq!(plan_session(5, 4, 10, true, DirtySet::Covers, h, false), Start::Resync { full: false });
        }
        assert_eq!(plan_session(0, 0, 0, true, DirtySet::Absent, Unchecked, false), Start::Stream { from: 1, pin: 1 });
        // A DR ahead is refused whatever the history says.
        for h in [Unchecked, Same, Differs, Unknown] {
            assert!(matches!(plan_session(12, 11, 10, true, DirtySet::Absent, h, false), Start::Refuse(_)));
        }
        // A DR whose last record differs is resynced in full, even where
        // the log or a dirty set could have served it.
        for (holds, dirty) in [(true, DirtySet::Absent), (false, DirtySet::Absent), (true, DirtySet::Covers), (true, DirtySet::Short)] {
            assert!(matches!(plan_session(5, 4, 10, holds, dirty, Differs, false), Start::Diverged(_)));
            assert!(matches!(plan_session(11, 10, 10, holds, dirty, Differs, false), Start::Diverged(_)));
        }
        // An unverifiable record: never streamed; a dirty set or a full
        // resync covers it.
        assert!(matches!(plan_session(5, 4, 10, true, DirtySet::Absent, Unknown, false), Start::Diverged(_)));
        assert_eq!(plan_session(5, 4, 10, false, DirtySet::Absent, Unknown, false), Start::Resync { full: true });
        assert_eq!(plan_session(5, 4, 10, true, DirtySet::Covers, Unknown, false), Start::Resync { full: false });
        // ... unless this primary restarted before that seq: then the DR may
        // hold writes it lost, which no dirty set covers.
        for (holds, dirty) in [(true, DirtySet::Absent), (false, DirtySet::Absent), (true, DirtySet::Covers), (true, DirtySet::Short)] {
            assert!(matches!(plan_session(5, 4, 10, holds, dirty, Unknown, true), Start::Diverged(_)));
        }
        // Suspect but checked: the check decides.
        assert_eq!(plan_session(5, 4, 10, true, DirtySet::Absent, Same, true), Start::Stream { from: 5, pin: 4 });
        assert_eq!(plan_session(5, 4, 10, true, DirtySet::Covers, Same, true), Start::Resync { full: false });
        // A dirty set that began after a seq the DR does not hold cannot
        // serve it (the DR lost its data): everything is resent.
        for h in [Unchecked, Same, Unknown] {
            assert_eq!(plan_session(1, 0, 10, true, DirtySet::Short, h, false), Start::Resync { full: true });
        }
    }

    #[test]
    fn window_accounts_bytes_and_oldest() {
        let mut w = Window::new(0);
        w.sent(10, 100, 1000);
        w.sent(20, 50, 2000);
        assert!(w.full(150) && !w.full(151));
        assert_eq!(w.ack(9, 1), 1000);
        assert_eq!(w.ack(15, 1), 2000);
        assert_eq!(w.bytes, 50);
        assert_eq!(w.ack(20, 2), 0);
        assert_eq!((w.bytes, w.frames_acked, w.acked), (0, 2, 20));
        assert_eq!(w.ack(5, 1), 0, "acks never go back");
        assert_eq!(w.acked, 20);
    }
}
