//! When records were written, sampled, so that a primary can say how old the
//! oldest write is that a DR site does not hold yet (`lag_seconds` in status
//! and metrics; ARCHITECTURE.md "Replication lag").
//!
//! The age has to come from the primary's own records, not from what its
//! sender last shipped: a DR site that is disconnected, or in periodic mode
//! between two shipments, lacks writes the sender has not read yet, and
//! those are the ones whose age matters.
//!
//! Every record's header carries its write time; this keeps (seq, time) for
//! the first record of every millisecond (`MIN_GAP_NS`), at most `CAP` of
//! them. When it is full, older samples are thinned to gaps under an eighth
//! of their age (`thin`), so recent samples stay 1 ms apart and older ones
//! thin out geometrically: memory is bounded whatever the write rate or the
//! DR's distance, a lag of seconds is measured to the millisecond and one
//! of an hour to minutes. Samples below what every DR site holds are
//! dropped (`trim_below`).
//!
//! `sample_for(seq)` returns the newest sample at or before `seq`, whose time is
//! never later than the record's own time, so the age it gives is never
//! below the true one (a DR site is never reported closer than it is), and
//! above it by less than the gap to the next sample.

use std::collections::VecDeque;

use crate::log::segment::LogPos;

/// Samples kept at most (24 bytes each).
pub const CAP: usize = 4096;
/// Least time between two samples.
pub const MIN_GAP_NS: u64 = 1_000_000;
/// Thinning keeps the gap around a sample under 1/THIN_RATIO of its age.
const THIN_RATIO: u64 = 8;

/// One record: its seq, write time (ns since the epoch) and log position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    pub seq: u64,
    pub time_ns: u64,
    pub at: LogPos,
}

#[derive(Debug, Default)]
pub struct SeqTimes {
    /// Increasing in seq.
    samples: VecDeque<Sample>,
}

impl SeqTimes {
    /// Record `seq`, at `at` in the log, was written at `time_ns`. Records
    /// come in seq order (appends, and replay of the log at open); an older
    /// seq is ignored.
    ///
    /// A sample's time is the earliest of every record from its seq on, so
    /// that a wall clock that stepped back (or had been ahead) never makes
    /// a lag look smaller than it is: a record older than the newest
    /// samples replaces them, at the first of their seqs.
    pub fn note(&mut self, seq: u64, time_ns: u64, at: LogPos) {
        let mut from = None;
        while let Some(b) = self.samples.back() {
            if seq <= b.seq {
                return;
            }
            if b.time_ns <= time_ns {
                break;
            }
            from = Some((b.seq, b.at));
            self.samples.pop_back();
        }
        if let Some((seq, at)) = from {
            self.samples.push_back(Sample { seq, time_ns, at });
            return;
        }
        if let Some(b) = self.samples.back() {
            if time_ns < b.time_ns.saturating_add(MIN_GAP_NS) {
                return;
            }
        }
        self.samples.push_back(Sample { seq, time_ns, at });
        if self.samples.len() > CAP {
            self.thin();
        }
    }

    /// Record `seq`, older than every sample, was written at `time_ns`
    /// (read from the log for a DR site that lacks records from before the
    /// replay start); ignored if not older. Its time is capped by the
    /// oldest sample's, as in `note`.
    pub fn note_older(&mut self, seq: u64, time_ns: u64, at: LogPos) {
        if self.samples.front().is_none_or(|f| seq < f.seq) {
            let time_ns = self.samples.front().map_or(time_ns, |f| f.time_ns.min(time_ns));
            self.samples.push_front(Sample { seq, time_ns, at });
            if self.samples.len() > CAP {
                self.thin();
            }
        }
    }

    /// Makes room: drops each sample whose neighbours are within an eighth
    /// of their age of each other (measured from the newest sample), oldest
    /// first. What stays is spaced 1 ms apart among the newest and
    /// geometrically further apart with age: a few hundred samples span a
    /// year, and the error of `sample_for` stays under an eighth of the age.
    fn thin(&mut self) {
        let Some(newest) = self.samples.back().map(|b| b.time_ns) else { return };
        let old = std::mem::take(&mut self.samples);
        let last = old.len() - 1;
        for (i, &sample) in old.iter().enumerate() {
            if i > 0 && i < last {
                let prev = self.samples.back().expect("the oldest sample is kept").time_ns;
                let next = old[i + 1].time_ns;
                if next.saturating_sub(prev) <= newest.saturating_sub(next) / THIN_RATIO {
                    continue;
                }
            }
            self.samples.push_back(sample);
        }
    }

    /// Forgets samples only needed for seqs below `seq` (the newest sample
    /// at or below it stays: it answers `sample_for(seq)`).
    pub fn trim_below(&mut self, seq: u64) {
        while self.samples.len() >= 2 && self.samples[1].seq <= seq {
            self.samples.pop_front();
        }
    }

    /// The newest sample at or before `seq` (see the module comment), or
    /// the oldest sample if `seq` is older than all of them (records from
    /// before the replay start of the last open: check `seq`); `None` if
    /// nothing was sampled.
    pub fn sample_for(&self, seq: u64) -> Option<Sample> {
        let i = self.samples.partition_point(|s| s.seq <= seq);
        self.samples.get(i.saturating_sub(1)).copied()
    }

    /// `sample_for(seq)`'s write time.
    #[cfg(test)]
    fn time_of(&self, seq: u64) -> Option<u64> {
        self.sample_for(seq).map(|s| s.time_ns)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.samples.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    const MS: u64 = 1_000_000;

    #[test]
    fn the_age_is_never_below_the_truth_and_recent_ages_are_exact_to_the_millisecond() {
        let seed: u64 = std::env::var("TIMES_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut t = SeqTimes::default();
        let mut truth = Vec::new(); // (seq, time) of every record
        let mut now = 1_000 * MS;
        for seq in 1..=200_000u64 {
            // Bursts of many writes per millisecond, and idle gaps.
            now += match rng.random_range(0..10) {
                0 => rng.random_range(0..50 * MS),
                _ => rng.random_range(0..MS / 8),
            };
            t.note(seq, now, seq);
            truth.push((seq, now));
            assert!(t.len() <= CAP, "seed {seed}: {} samples", t.len());
        }
        for _ in 0..2_000 {
            let (seq, at) = truth[rng.random_range(0..truth.len())];
            let got = t.time_of(seq).unwrap();
            assert!(got <= at, "seed {seed}: seq {seq} written at {at}, sample says {got} (later)");
            // Recent samples are 1 ms apart; older ones within an eighth of their age.
            assert!(at - got < MIN_GAP_NS.max((now - at) / THIN_RATIO), "seed {seed}: seq {seq}: off by {} ns at age {} ns", at - got, now - at);
            if now - at < 16 * MS {
                assert!(at - got < MIN_GAP_NS, "seed {seed}: seq {seq}: off by {} ns", at - got);
            }
        }
    }

    #[test]
    fn thinning_keeps_the_oldest_and_bounds_the_error_by_the_age() {
        let mut t = SeqTimes::default();
        // One write per millisecond for 100 s: 100 000 records, 4096 samples.
        let n = 100_000u64;
        for seq in 1..=n {
            t.note(seq, seq * MS, seq);
        }
        assert!(t.len() <= CAP);
        assert_eq!(t.time_of(1), Some(MS), "the oldest sample stays");
        for seq in [2, 10, 1_000, 50_000, 90_000, 97_000, n] {
            let got = t.time_of(seq).unwrap();
            let err = seq * MS - got;
            let age = (n - seq) * MS;
            // Older samples are sparser, but the error stays a fraction of the age.
            assert!(err < MIN_GAP_NS.max(age / THIN_RATIO), "seq {seq}: error {err} ns at age {age} ns");
        }
        assert_eq!(t.time_of(n), Some(n * MS));
    }

    #[test]
    fn a_clock_that_steps_back_never_makes_a_lag_smaller() {
        let mut t = SeqTimes::default();
        for seq in 1..=100u64 {
            t.note(seq, seq * 10 * MS, seq);
        }
        // A record written while the clock was a day ahead, then the clock
        // is right again (and steps back 0.5 s on top).
        t.note(101, 86_400_000 * MS, 101);
        t.note(102, 1_010 * MS, 102);
        t.note(103, 500 * MS, 103);
        for seq in 101..=103 {
            assert_eq!(t.time_of(seq), Some(500 * MS), "seq {seq}: the earliest time from it on");
        }
        // Samples before the step that are later than it are cut back too.
        assert_eq!(t.time_of(50), Some(500 * MS));
        assert_eq!(t.sample_for(50).unwrap().seq, 50, "at the first of the seqs it replaced");
        assert_eq!(t.time_of(49), Some(490 * MS));
        // Times stay in order, so thinning and lookups keep working.
        for seq in 104..=20_000u64 {
            t.note(seq, 500 * MS + seq * MS, seq);
        }
        assert!(t.len() <= CAP);
        let got = t.time_of(49).unwrap();
        assert!(got <= 490 * MS && 490 * MS - got < (20_500 - 490) * MS / THIN_RATIO, "{got}");
        assert_eq!(t.time_of(20_000), Some(20_500 * MS));
    }

    #[test]
    fn trimming_keeps_what_answers_the_lowest_seq_still_needed() {
        let mut t = SeqTimes::default();
        for seq in 1..=100u64 {
            t.note(seq, seq * 10 * MS, seq * 100);
        }
        t.trim_below(40);
        assert_eq!(t.time_of(40), Some(400 * MS));
        assert_eq!(t.time_of(41), Some(410 * MS));
        assert_eq!(t.sample_for(41), Some(Sample { seq: 41, time_ns: 410 * MS, at: 4_100 }), "with its log position");
        assert_eq!(t.len(), 61);
        // Below the samples: the oldest one kept.
        assert_eq!(t.time_of(3), Some(400 * MS));
        // Out of order, or within a millisecond of the last: not sampled.
        t.note(50, 5_000 * MS, 0);
        t.note(101, 1_000 * MS + MS / 2, 0);
        assert_eq!(t.time_of(101), Some(1_000 * MS));
        assert_eq!(SeqTimes::default().time_of(1), None);
        // Older than every sample (read from the log at open).
        t.note_older(7, 70 * MS, 700);
        assert_eq!(t.time_of(8), Some(70 * MS));
        assert_eq!(t.time_of(40), Some(400 * MS));
        t.note_older(8, 60 * MS, 800);
        assert_eq!(t.time_of(8), Some(70 * MS), "not older: ignored");
        t.note_older(6, 90 * MS, 600);
        assert_eq!(t.time_of(6), Some(70 * MS), "capped by the oldest sample's time");
    }
}
