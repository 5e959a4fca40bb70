//! The replication session, without I/O: one `Sender` per (group, DR site)
//! connection on the primary and one `Receiver` per connection on the DR
//! site. They never touch a socket, a clock, a timer, a thread or a task:
//! frames go in as parsed frames (`on_frame`), frames come out as bytes
//! (`Action::Send`), time comes in as an argument (`Now`), and when there is
//! nothing to do the sender says what would make it have something to do
//! (`Action::Idle`: a deadline, new records in the log, or any frame).
//!
//! What they do call is the local storage: the group's log (read records,
//! append received ones, pins, the dirty sets of a resync) and the DR's
//! heartbeat region. Those calls are synchronous; a driver that must not
//! block (tokio) runs a step that may hit the disk on a blocking thread
//! (`Sender::blocking_step`, every `Receiver::on_frame`).
//!
//! Two drivers run these cores: `send::run` / `receive::receive` (tokio,
//! TLS, real time) and the deterministic simulation in `dsim.rs` (one
//! thread, virtual time, a seeded random choice of which event happens
//! next), so a failing seed replays exactly.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Result};

use super::decide::{self, Window};
use super::frame::{self, FrameHeader, Hello, HelloReply};
use super::heartbeat::Region;
use super::receive::Host;
use super::Mode;
use crate::group::resync::SentIndex;
use crate::group::Group;
use crate::limits;
use crate::log::record::{Header, Kind, FLAG_RELOCATED, HEADER_BYTES};
use crate::log::segment::{pos, pos_off, pos_seg, LogPos, View, SEGMENT_HEADER_BYTES};

/// The time a core is told: a monotonic clock for its own timing, and the
/// wall clock that goes into heartbeats.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub mono_ns: u64,
    pub wall_ns: u64,
}

#[derive(Clone, Debug)]
pub struct SenderConfig {
    /// This site (the primary).
    pub site: String,
    /// The DR site.
    pub peer: String,
    pub lz4: bool,
    pub heartbeat_interval: Duration,
    pub periodic_interval: Duration,
    /// Unacknowledged bytes in flight before the sender waits for an ack.
    pub window_bytes: u64,
    /// Silence from the DR site, while an answer is due, that ends the
    /// session (`Sender::check_link`).
    pub link_timeout: Duration,
}

/// A frame to write: its bytes, or (a RECORDS frame of the stream) its
/// header and the ranges of log segments it ships, read in place
/// (`Segment::view`), so that the only copy of shipped bytes on the primary
/// is the TLS layer's.
#[derive(Debug)]
pub enum Out {
    Bytes(Vec<u8>),
    Records { head: [u8; frame::HEADER_BYTES], pieces: Vec<View> },
}

impl Out {
    /// Bytes on the wire.
    pub fn len(&self) -> usize {
        match self {
            Out::Bytes(b) => b.len(),
            Out::Records { pieces, .. } => frame::HEADER_BYTES + pieces.iter().map(View::len).sum::<usize>(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The frame kind (from its header).
    pub fn kind(&self) -> u8 {
        match self {
            Out::Bytes(b) => b[5],
            Out::Records { head, .. } => head[5],
        }
    }

    /// Part `i` of the frame's bytes (parts in order, from 0; None past
    /// the last). A piece of the log is cut into parts of at most
    /// `REPL_WRITE_PART_BYTES`, each faulted in here, just before the
    /// driver writes it. Reading a part of the log can fail.
    pub fn part(&self, i: usize) -> Option<Result<&[u8]>> {
        match self {
            Out::Bytes(b) => (i == 0).then_some(Ok(b.as_slice())),
            Out::Records { head, pieces, .. } => {
                let Some(mut i) = i.checked_sub(1) else { return Some(Ok(head.as_slice())) };
                let part = limits::REPL_WRITE_PART_BYTES;
                for p in pieces {
                    let parts = p.len().div_ceil(part);
                    if i < parts {
                        let at = i * part;
                        return Some(p.populated_range(at, part.min(p.len() - at)));
                    }
                    i -= parts;
                }
                None
            }
        }
    }

    /// The whole frame in one buffer.
    pub fn to_vec(&self) -> Result<Vec<u8>> {
        let mut v = Vec::with_capacity(self.len());
        let mut i = 0;
        while let Some(part) = self.part(i) {
            v.extend_from_slice(part?);
            i += 1;
        }
        Ok(v)
    }
}

/// Frames compare by their bytes (tests).
impl PartialEq for Out {
    fn eq(&self, other: &Out) -> bool {
        self.to_vec().ok() == other.to_vec().ok()
    }
}

impl Eq for Out {}

/// What the sender asks its driver to do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Write this frame to the link (and flush).
    Send(Out),
    /// Persist the replication pins (a small crash-safe file).
    SavePins,
    /// Nothing to do until `until` (monotonic ns), records are appended to
    /// the log (if `on_append`), or a frame arrives.
    Idle { until: Option<u64>, on_append: bool },
}

enum Phase {
    /// HELLO sent, waiting for the reply.
    Hello,
    Resync(Resync),
    Stream(Stream),
}

struct Resync {
    /// Last seq the DR holds (from its HELLO reply).
    dr_last: u64,
    /// Set once RESYNC_BEGIN is out.
    attempt: Option<u64>,
    /// What this attempt sent (the DR's staging starts empty at BEGIN).
    index: SentIndex,
    /// Blocks were taken from the dirty set (they go back unless committed).
    taken: bool,
    /// The commit is out: its seq and the frame count that acknowledges it.
    commit: Option<(u64, u64)>,
    started_ns: u64,
}

struct Stream {
    at: LogPos,
    last_ship: Option<u64>,
}

/// The primary's side of one connection.
pub struct Sender {
    group: Arc<Group>,
    cfg: SenderConfig,
    epoch: u64,
    phase: Phase,
    window: Window,
    /// Next seq to ship.
    next: u64,
    /// RECORDS frames sent on this connection.
    frames_sent: u64,
    pins_due: bool,
    pins_saved_ns: u64,
    /// The next frame: RECORDS frames are built in place (header room, then
    /// the records), and the driver hands the buffer back (`recycle`).
    buf: Vec<u8>,
    /// The mode HELLO names.
    hello_mode: Mode,
    /// The mode the DR site was last told, if it takes MODE frames.
    told: Option<Mode>,
    /// When the last frame from the DR site arrived (monotonic ns).
    heard_ns: u64,
    /// The DR site answers heartbeats (HELLO_REPLY `heartbeat_acks`).
    hb_acks: bool,
    /// When an answer last became due after none was (monotonic ns): the
    /// silence clock starts at the later of this and `heard_ns`.
    due_since: u64,
    /// When the last heartbeat went out (monotonic ns).
    last_heartbeat: Option<u64>,
    /// Between heartbeats: the configured interval, shorter if the DR
    /// site's link timeout needs it (HELLO_REPLY `link_timeout_ms`).
    hb_every: Duration,
    /// An ack moved the DR's pin since the pins were last saved.
    pins_moved: bool,
    /// The DR's history is not this primary's (a diverged full resync):
    /// what it acknowledges are its own records, not ours, so they count
    /// for nothing until the resync commits.
    diverged: bool,
}

impl Sender {
    /// A new session; `hello()` is its first frame.
    pub fn new(group: Arc<Group>, cfg: SenderConfig) -> Sender {
        let epoch = group.epoch();
        let hello_mode = group.replication.mode();
        Sender { hb_every: cfg.heartbeat_interval, group, cfg, epoch, phase: Phase::Hello, window: Window::new(0), next: 1, frames_sent: 0, pins_due: false, pins_saved_ns: 0, buf: Vec::new(), hello_mode, told: None, heard_ns: 0, hb_acks: false, due_since: 0, last_heartbeat: None, pins_moved: false, diverged: false }
    }

    /// When the link counts as dead if nothing arrives from the DR site
    /// before (monotonic ns): `link_timeout` after the last frame heard,
    /// while an answer is due. One is due always from a DR site that
    /// answers heartbeats (one goes out every interval), and from an older
    /// one while RECORDS frames are unacknowledged. None before the HELLO
    /// reply (the driver times that wait itself).
    pub fn link_deadline(&self) -> Option<u64> {
        self.answer_due().then(|| self.heard_ns.max(self.due_since).saturating_add(self.cfg.link_timeout.as_nanos() as u64))
    }

    fn answer_due(&self) -> bool {
        !matches!(self.phase, Phase::Hello) && (self.hb_acks || self.frames_sent > self.window.frames_acked)
    }

    /// Fails once the link has been silent past `link_deadline`: a link
    /// that drops what the DR site sends (or everything), or a DR site that
    /// stopped reading, ends the session like a broken connection (`dr-lost`,
    /// reconnect with backoff) instead of looking connected while the lag
    /// grows.
    pub fn check_link(&self, now: Now) -> Result<()> {
        if let Some(d) = self.link_deadline() {
            if now.mono_ns >= d {
                let silent = Duration::from_nanos(now.mono_ns.saturating_sub(self.heard_ns.max(self.due_since)));
                bail!(
                    "no frame from {} for {:.1} s (link_timeout {:?}): the link is silent (blackholed, or the DR site stalled); reconnecting",
                    self.cfg.peer,
                    silent.as_secs_f64(),
                    self.cfg.link_timeout
                );
            }
        }
        Ok(())
    }

    /// Gives back a frame's buffer once it is written, so that the next
    /// batch reuses its memory (optional: without it each batch allocates).
    /// Not one grown past `REPL_BUF_KEEP_BYTES` for a big record: a sender
    /// per group and DR site would keep it for good.
    pub fn recycle(&mut self, frame: Out) {
        let Out::Bytes(frame) = frame else { return };
        if frame.capacity() > self.buf.capacity() && frame.capacity() <= limits::REPL_BUF_KEEP_BYTES {
            self.buf = frame;
        }
    }

    pub fn hello(&self) -> Result<Vec<u8>> {
        let g = &self.group;
        let hello = Hello { site: self.cfg.site.clone(), group: g.name.clone(), group_id: g.id, epoch: self.epoch, last_seq: g.last_seq(), mode: self.hello_mode.as_str().into() };
        Ok(frame::encode(frame::HELLO, self.epoch, &serde_json::to_vec(&hello)?, false))
    }

    /// Will the next `poll` read log data in bulk (a resync)? A driver that
    /// must not block runs it on a blocking thread.
    pub fn blocking_step(&self) -> bool {
        matches!(self.phase, Phase::Resync(_))
    }

    /// A frame from the DR site. An error ends the session.
    pub fn on_frame(&mut self, now: Now, h: &FrameHeader, body: &[u8]) -> Result<()> {
        let peer = self.cfg.peer.clone();
        self.heard_ns = now.mono_ns;
        if matches!(self.phase, Phase::Hello) {
            if h.kind == frame::ERROR {
                bail!("{peer} refused: {}", String::from_utf8_lossy(body));
            }
            if h.kind != frame::HELLO_REPLY {
                bail!("{peer} answered HELLO with frame kind {}", h.kind);
            }
            let reply: HelloReply = frame::decode_json(body)?;
            return self.start(now, reply);
        }
        match h.kind {
            frame::ACK => {
                let (durable, frames) = frame::parse_two_u64(body)?;
                self.on_ack(now, durable, frames)
            }
            frame::ERROR => bail!("{peer} reported: {}", String::from_utf8_lossy(body)),
            k => bail!("{peer} sent unexpected frame kind {k}"),
        }
    }

    fn start(&mut self, now: Now, reply: HelloReply) -> Result<()> {
        let (g, peer) = (&self.group, &self.cfg.peer);
        if reply.site != *peer {
            bail!("peer says it is {:?}, expected {peer:?}", reply.site);
        }
        if reply.group != g.name {
            bail!("{peer} answered for group {:?}, not {:?}", reply.group, g.name);
        }
        // Durable is what it holds, so at most its last: a reply claiming
        // more would let sync writers and GC take records for held.
        if reply.durable_seq >= reply.next_seq.max(1) {
            bail!("{peer} says seq {} is durable but the next it expects is {}: a malformed HELLO_REPLY", reply.durable_seq, reply.next_seq);
        }
        self.next = reply.next_seq.max(1);
        let last = g.last_seq();
        // Is the DR's history a prefix of ours? Compare its last record
        // with ours at that seq (a DR ahead of us is refused anyway).
        let dr_last = self.next - 1;
        let history = match reply.last_ident {
            Some(theirs) if dr_last >= 1 && dr_last <= last => match g.record_ident(dr_last)? {
                Some(ours) if ours == theirs => decide::History::Same,
                Some(_) => decide::History::Differs,
                None => decide::History::Unknown,
            },
            _ => decide::History::Unchecked,
        };
        let suspect = g.unverified_from(peer).is_some_and(|from| dr_last >= from);
        // Checked, empty, or holding only seqs this primary kept through
        // every restart since: nothing it holds is suspect.
        if history == decide::History::Same || dr_last == 0 || !suspect {
            g.mark_verified(peer);
        }
        // A dirty set that began after a seq the DR lacks cannot serve it.
        let dirty_from = g.dirty_from(peer);
        let dirty = match dirty_from {
            None => decide::DirtySet::Absent,
            Some(Some(from)) if dr_last + 1 < from => decide::DirtySet::Short,
            Some(_) => decide::DirtySet::Covers,
        };
        let plan = decide::plan_session(reply.next_seq, reply.durable_seq, last, g.locate_seq(self.next).is_some(), dirty, history, suspect);
        let resyncing = match plan {
            decide::Start::Refuse(reason) => bail!("{peer}: {reason}; refusing to replicate"),
            decide::Start::Diverged(reason) => {
                self.diverged = true;
                tracing::warn!(event = "dr-diverged", "replication of {} to {peer}: {reason}; full resync (the DR keeps showing its last consistent state until it completes)", g.name);
                g.resync_everything(peer)?;
                g.replication.update(peer, |r| r.diverged_resyncs += 1);
                true
            }
            decide::Start::Resync { full } => {
                if full {
                    if dirty == decide::DirtySet::Short {
                        tracing::warn!("replication of {} to {peer}: it holds seq {dr_last} but the dirty set starts at seq {} (the DR lost data, or was restored from an older copy); full resync", g.name, dirty_from.flatten().unwrap_or(0));
                    } else {
                        tracing::warn!("replication of {} to {peer}: it needs seq {} but the log starts at seq {}; full resync", g.name, self.next, g.oldest_seq().unwrap_or(0));
                    }
                    g.resync_everything(peer)?;
                }
                true
            }
            decide::Start::Stream { pin, .. } => {
                g.set_pin(peer, pin);
                false
            }
        };
        tracing::info!(event = "dr-connected", "replication of {} to {peer}: connected, {}", g.name,
            if resyncing { "resyncing dirty regions".to_string() } else { format!("resuming at seq {}", self.next) });
        let next = self.next;
        let diverged = self.diverged;
        g.replication.update(peer, |r| {
            r.connected = true;
            r.sessions += 1;
            // A diverged DR holds none of this primary's records past where
            // the histories part, and where that is is not known: nothing
            // counts as held (sync writers wait for the resync's commit).
            r.acked_seq = if diverged { 0 } else { reply.durable_seq };
            r.sent_seq = next - 1;
            r.state = if resyncing { "resyncing".into() } else if next > last { "replicating".into() } else { "catching-up".into() };
            r.last_error = None;
        });
        // Its lag counts from the record after its last: known to the
        // samples unless it is older than what the last open replayed.
        g.sample_from_log(reply.durable_seq + 1);
        self.window = Window::new(reply.durable_seq);
        self.told = reply.mode_frames.then_some(self.hello_mode);
        self.hb_acks = reply.heartbeat_acks;
        // Four heartbeats (so four answers) within the DR's timeout: a DR
        // configured with a shorter one than our interval suits would
        // otherwise close a healthy, quiet link.
        if let Some(ms) = reply.link_timeout_ms.filter(|&ms| ms > 0) {
            self.hb_every = self.cfg.heartbeat_interval.min((Duration::from_millis(ms) / 4).max(Duration::from_millis(limits::HEARTBEAT_INTERVAL_MS_MIN)));
        }
        self.pins_due = true;
        self.phase = if resyncing {
            // RESYNC_BEGIN first; heartbeats follow at the interval.
            self.last_heartbeat = Some(now.mono_ns);
            Phase::Resync(Resync { dr_last: reply.next_seq.saturating_sub(1), attempt: None, index: SentIndex::default(), taken: false, commit: None, started_ns: now.mono_ns })
        } else {
            self.stream_from_next()?
        };
        Ok(())
    }

    fn on_ack(&mut self, now: Now, durable: u64, frames: u64) -> Result<()> {
        let (g, peer) = (&self.group, &self.cfg.peer);
        // An ack can only cover what this session sent (or the DR held at
        // HELLO): one past it would count records as held by the DR that
        // it never got (sync writers released, pins moved past them).
        let commit = match &self.phase {
            Phase::Resync(rs) => rs.commit.map_or(0, |(seq, _)| seq),
            _ => 0,
        };
        let bound = (self.next - 1).max(commit).max(self.window.acked);
        if durable > bound {
            bail!("{peer} acknowledged seq {durable}, past the last it was sent ({bound}): a malformed ACK");
        }
        if frames > self.frames_sent {
            bail!("{peer} acknowledged {frames} frames of this connection, more than the {} sent: a malformed ACK", self.frames_sent);
        }
        let advanced = durable > self.window.acked;
        let oldest = self.window.ack(durable, frames);
        let resyncing = g.in_dirty_mode(peer);
        if !resyncing {
            // Keeps the DR's last durable record for the next HELLO's check.
            g.set_pin(peer, durable.max(1));
            self.pins_moved |= advanced;
        }
        // Saved at most once a second, and only when an ack moved the pin
        // (an idle link's answers to heartbeats do not).
        if self.pins_moved && now.mono_ns.saturating_sub(self.pins_saved_ns) > 1_000_000_000 {
            self.pins_due = true;
        }
        let last = g.last_seq();
        let diverged = self.diverged;
        g.replication.update(peer, |r| {
            if !diverged {
                r.acked_seq = r.acked_seq.max(durable);
            }
            r.oldest_unacked_ns = oldest;
            if r.acked_seq >= last && !resyncing {
                if r.state != "replicating" {
                    tracing::info!(event = "dr-caught-up", "replication of {} to {peer}: caught up at seq {}", g.name, r.acked_seq);
                }
                r.state = "replicating".into();
            }
        });
        // Write times older than what every DR site holds are not needed
        // for anyone's lag.
        g.trim_written_at(g.replication.min_acked() + 1);
        if durable >= last && !resyncing {
            g.replication.clear_degraded();
        }
        // The ack of a resync commit ends the resync here and now, even if
        // the connection fails before the next poll.
        self.finish_commit(now)
    }

    /// If the DR acknowledged this session's resync commit: leave dirty
    /// mode and stream from the seq after it.
    fn finish_commit(&mut self, now: Now) -> Result<()> {
        let Phase::Resync(rs) = &mut self.phase else { return Ok(()) };
        let Some((seq, want)) = rs.commit else { return Ok(()) };
        if self.window.frames_acked < want {
            return Ok(());
        }
        let (g, peer) = (&self.group, &self.cfg.peer);
        let took = now.mono_ns.saturating_sub(rs.started_ns);
        rs.taken = false;
        let attempt = rs.attempt.unwrap_or(0);
        if !g.leave_dirty(peer, attempt)? {
            bail!("resync of {peer} committed at seq {seq}, but a newer attempt has begun; that one finishes it");
        }
        tracing::info!(event = "dr-resynced", "replication of {} to {peer}: resync committed at seq {seq} after {:?}", g.name, Duration::from_nanos(took));
        // The commit's ack came while still in dirty mode: if nothing
        // was written since, the DR is caught up now (no later ack may come).
        let last = g.last_seq();
        g.replication.update(peer, |r| {
            r.acked_seq = r.acked_seq.max(seq);
            r.sent_seq = seq;
            if r.acked_seq >= last {
                tracing::info!(event = "dr-caught-up", "replication of {} to {peer}: caught up at seq {}", g.name, r.acked_seq);
                r.state = "replicating".into();
            } else {
                r.state = "catching-up".into();
            }
        });
        self.next = seq + 1;
        self.diverged = false;
        self.phase = self.stream_from_next()?;
        Ok(())
    }

    /// Streaming from `self.next`; if the log no longer holds it, the DR
    /// goes to a full dirty-region resync and this session ends.
    fn stream_from_next(&self) -> Result<Phase> {
        let Some(at) = self.group.locate_seq(self.next) else {
            self.group.enter_dirty(&self.cfg.peer, None)?;
            bail!("{} needs seq {}, which the log no longer holds; resyncing", self.cfg.peer, self.next);
        };
        Ok(Phase::Stream(Stream { at, last_ship: None }))
    }

    /// The next thing to do. Call again after doing it; after `Idle`, when
    /// its condition holds (calling early is harmless).
    pub fn poll(&mut self, now: Now) -> Result<Action> {
        self.check_link(now)?;
        let was_due = self.answer_due();
        let a = self.next_action(now)?;
        if !was_due && self.answer_due() {
            self.due_since = now.mono_ns;
        }
        // An idle sender still wakes up in time to notice a silent link.
        Ok(match (a, self.link_deadline()) {
            (Action::Idle { until, on_append }, Some(d)) => Action::Idle { until: Some(until.map_or(d, |u| u.min(d))), on_append },
            (a, _) => a,
        })
    }

    fn next_action(&mut self, now: Now) -> Result<Action> {
        if self.pins_due {
            self.pins_due = false;
            self.pins_moved = false;
            self.pins_saved_ns = now.mono_ns;
            return Ok(Action::SavePins);
        }
        // A DR site that takes MODE frames learns of a mode change before
        // the records that follow it (it takes records in at lower priority
        // outside sync mode).
        if let Some(told) = self.told {
            let mode = self.group.replication.mode();
            if mode != told {
                self.told = Some(mode);
                let f = frame::encode(frame::MODE, self.epoch, mode.as_str().as_bytes(), false);
                self.group.replication.update(&self.cfg.peer, |r| r.sent_bytes_total += f.len() as u64);
                return Ok(Action::Send(Out::Bytes(f)));
            }
        }
        match self.phase {
            Phase::Hello => Ok(Action::Idle { until: None, on_append: false }),
            Phase::Resync(_) => self.resync_step(now),
            Phase::Stream(_) => self.stream_step(now),
        }
    }

    /// Dirty-region resync (see `group::resync`): RESYNC_BEGIN, the current
    /// content of every dirty block, then RESYNC_COMMIT at the seq where
    /// the dirty set was found empty; streaming resumes after its ack.
    fn resync_step(&mut self, now: Now) -> Result<Action> {
        // Heartbeats go on during a resync: the DR site's region (and its
        // silence clock) must not read a resync as a primary gone.
        let hb_due = match self.heartbeat(now) {
            Ok(hb) => return Ok(hb),
            Err(due) => due,
        };
        let Phase::Resync(rs) = &mut self.phase else { unreachable!() };
        let (g, peer) = (&self.group, &self.cfg.peer);
        let Some(attempt) = rs.attempt else {
            tracing::info!(event = "dr-resyncing", "replication of {} to {peer}: resync of {} dirty blocks", g.name, g.dirty_blocks(peer));
            rs.attempt = Some(g.begin_attempt(peer));
            let begin = g.resync_begin(g.resync_need(peer));
            self.frames_sent += 1;
            return Ok(Action::Send(Out::Bytes(frame::encode(frame::RECORDS, self.epoch, &begin, self.cfg.lz4))));
        };
        if rs.commit.is_some() {
            // Waiting for the commit's ack (`on_ack` finishes it).
            return Ok(Action::Idle { until: Some(hb_due), on_append: false });
        }
        loop {
            let runs = g.take_dirty(peer, attempt, limits::RESYNC_BATCH_BLOCKS);
            if runs.is_empty() {
                let Some((seq, ident, table)) = g.resync_point(peer, attempt, rs.dr_last) else {
                    if g.resync_attempt(peer) != Some(attempt) {
                        bail!("resync of {peer} superseded by a newer attempt");
                    }
                    // Written meanwhile: take those blocks too.
                    continue;
                };
                let commit = g.resync_commit(seq, ident, &table);
                self.frames_sent += 1;
                rs.commit = Some((seq, self.frames_sent));
                return Ok(Action::Send(Out::Bytes(frame::encode(frame::RECORDS, self.epoch, &commit, self.cfg.lz4))));
            }
            rs.taken = true;
            self.buf.clear();
            let data = g.resync_records(&runs, &mut rs.index, &mut self.buf)?;
            let f = frame::encode(frame::RECORDS, self.epoch, &self.buf, self.cfg.lz4);
            keep_small(&mut self.buf);
            self.frames_sent += 1;
            let left = g.dirty_blocks(peer);
            g.replication.update(peer, |r| {
                r.sent_bytes_total += f.len() as u64;
                r.data_bytes_total += data;
                r.lag_bytes = left * limits::BLOCK_BYTES;
                r.state = "resyncing".into();
            });
            return Ok(Action::Send(Out::Bytes(f)));
        }
    }

    /// A heartbeat if one is due (`Ok`), else when the next one is (`Err`).
    fn heartbeat(&mut self, now: Now) -> std::result::Result<Action, u64> {
        let hb_due = self.last_heartbeat.map_or(0, |t| t + self.hb_every.as_nanos() as u64);
        if now.mono_ns < hb_due {
            return Err(hb_due);
        }
        self.last_heartbeat = Some(now.mono_ns);
        let g = &self.group;
        let hb = frame::encode(frame::HEARTBEAT, self.epoch, &frame::two_u64(g.last_seq(), now.wall_ns), false);
        g.replication.update(&self.cfg.peer, |r| r.sent_bytes_total += hb.len() as u64);
        Ok(Action::Send(Out::Bytes(hb)))
    }

    /// Streaming: a heartbeat every interval; records from the log in
    /// batches while the window has room (in periodic mode, once a period
    /// or when a storage operation asks for it).
    fn stream_step(&mut self, now: Now) -> Result<Action> {
        if self.group.in_dirty_mode(&self.cfg.peer) {
            bail!("log cap reached: switching to dirty-region resync");
        }
        let hb_due = match self.heartbeat(now) {
            Ok(hb) => return Ok(hb),
            Err(due) => due,
        };
        let Phase::Stream(st) = &mut self.phase else { unreachable!() };
        let (g, peer) = (&self.group, &self.cfg.peer);
        let periodic = g.replication.mode() == Mode::Periodic;
        let period = self.cfg.periodic_interval.as_nanos() as u64;
        let period_end = st.last_ship.map_or(0, |t| t + period);
        let may_ship = !periodic || now.mono_ns >= period_end || g.replication.ship_requested(self.next);
        if !may_ship {
            return Ok(Action::Idle { until: Some(period_end.min(hb_due)), on_append: true });
        }
        if self.window.full(self.cfg.window_bytes) {
            // Room comes with an ack (a frame wakes the driver).
            return Ok(Action::Idle { until: Some(hb_due), on_append: false });
        }
        let mut pieces = Vec::new();
        let (n, first_ts, last_seq, data_bytes, batch_bytes) = read_batch(g, &mut st.at, self.next, &mut pieces)?;
        if n == 0 {
            if periodic {
                st.last_ship = Some(now.mono_ns);
            }
            let unacked = self.window.bytes;
            g.replication.update(peer, |r| r.lag_bytes = unacked);
            // Caught up: wait for new records, an ack, or the heartbeat.
            return Ok(Action::Idle { until: Some(hb_due), on_append: true });
        }
        let f = if self.cfg.lz4 {
            // Compressed from one buffer, kept for the next batch.
            self.buf.clear();
            for p in &pieces {
                self.buf.extend_from_slice(p.bytes());
            }
            let f = frame::encode(frame::RECORDS, self.epoch, &self.buf, true);
            keep_small(&mut self.buf);
            Out::Bytes(f)
        } else {
            let head = frame::records_header(self.epoch, batch_bytes as u32);
            Out::Records { head, pieces }
        };
        self.frames_sent += 1;
        self.next = last_seq + 1;
        self.window.sent(last_seq, batch_bytes, first_ts);
        let lag = self.window.bytes + g.bytes_after(st.at);
        g.replication.update(peer, |r| {
            r.sent_seq = last_seq;
            r.sent_bytes_total += f.len() as u64;
            r.data_bytes_total += data_bytes;
            if r.oldest_unacked_ns == 0 {
                r.oldest_unacked_ns = first_ts;
            }
            r.lag_bytes = lag;
            if r.state == "disconnected" {
                r.state = "catching-up".into();
            }
        });
        Ok(Action::Send(f))
    }
}

impl Drop for Sender {
    /// Blocks a resync took but did not commit are dirty again, however the
    /// session ends (error, cut link, dropped task).
    fn drop(&mut self) {
        if let Phase::Resync(Resync { attempt: Some(a), taken: true, .. }) = self.phase {
            self.group.return_dirty(&self.cfg.peer, a);
        }
    }
}

/// After a frame was encoded from the sender's buffer (compressed, or a
/// resync step): not kept if a big record grew it.
fn keep_small(buf: &mut Vec<u8>) {
    if buf.capacity() > limits::REPL_BUF_KEEP_BYTES {
        *buf = Vec::new();
    }
}

/// Collects records from `at` onwards (up to the log tail) into `pieces`
/// (ranges of segments, read in place), skipping GC relocations and records
/// before `next`, up to `REPL_BATCH_BYTES` (or one record, if that is
/// bigger). Returns (records, timestamp of the first, seq of the last,
/// payload bytes of writes, bytes of the records). Every record's header (which holds its block
/// CRCs) is checked here; the block data is checked by the receiver, which
/// verifies every block before it applies a record.
fn read_batch(group: &Group, at: &mut LogPos, next: u64, pieces: &mut Vec<View>) -> Result<(usize, u64, u64, u64, u64)> {
    let mut bytes = 0u64;
    let mut n = 0;
    let mut first_ts = 0;
    let mut last_seq = next.saturating_sub(1);
    let mut data = 0u64;
    'outer: while bytes < limits::REPL_BATCH_BYTES {
        let tail = group.flush_target();
        if *at >= tail {
            break;
        }
        let Some(seg) = group.segment(pos_seg(*at)) else {
            match group.next_segment(pos_seg(*at)) {
                Some(s) => {
                    *at = pos(s.id, SEGMENT_HEADER_BYTES as u32);
                    continue;
                }
                None => bail!("log segment {} vanished while replicating", pos_seg(*at)),
            }
        };
        let end = if seg.id == pos_seg(tail) { pos_off(tail) as u64 } else { seg.len() };
        let off = pos_off(*at) as u64;
        if off >= end {
            if seg.id == pos_seg(tail) {
                break;
            }
            match group.next_segment(seg.id) {
                Some(s) => {
                    *at = pos(s.id, SEGMENT_HEADER_BYTES as u32);
                    continue;
                }
                None => break,
            }
        }
        // Fault in what the batch has room for (the log tail permitting),
        // all at once; a first record bigger than that, whole.
        let room = limits::REPL_BATCH_BYTES - bytes;
        let mut window = (end - off).min(room.max(HEADER_BYTES as u64));
        let mut win = seg.view(off, window as usize)?;
        let mut p = 0u64;
        while p + HEADER_BYTES as u64 <= window {
            let r = off + p;
            let at_p = p as usize;
            let raw: [u8; HEADER_BYTES] = win.bytes()[at_p..at_p + HEADER_BYTES].try_into().unwrap();
            let h = Header::decode(&raw).map_err(|e| anyhow!("log segment {} offset {r}: {e}", seg.path.display()))?;
            let total = h.total_len();
            if r + total > end {
                bail!("log segment {} offset {r}: a record of {total} bytes runs past the end of the log ({end})", seg.path.display());
            }
            let ship = h.flags & FLAG_RELOCATED == 0 && h.seq >= next;
            if ship && n > 0 && bytes + total > limits::REPL_BATCH_BYTES {
                break 'outer; // the batch is full; this record starts the next
            }
            if p + total > window {
                if p > 0 {
                    break; // the next window starts at this record
                }
                window = total;
                win = seg.view(off, window as usize)?;
            }
            let checked = win
                .sub(at_p + HEADER_BYTES, h.checked_body_len())
                .ok_or_else(|| anyhow!("log segment {} offset {r}: checked body longer than the record", seg.path.display()))?;
            h.verify(&raw, checked.bytes()).map_err(|e| anyhow!("log segment {} offset {r}: {e}", seg.path.display()))?;
            if ship {
                if h.seq != last_seq + 1 {
                    bail!("log gap: expected seq {} at {} offset {r}, found {}", last_seq + 1, seg.path.display(), h.seq);
                }
                if h.kind == Kind::Write {
                    data += h.length as u64;
                }
                if n == 0 {
                    first_ts = h.timestamp_ns;
                }
                let rec = win.sub(at_p, total as usize).ok_or_else(|| anyhow!("log segment {} offset {r}: record past its read window", seg.path.display()))?;
                if !pieces.last_mut().is_some_and(|last| last.join(&rec)) {
                    pieces.push(rec);
                }
                bytes += total;
                n += 1;
                last_seq = h.seq;
            }
            p += total;
            *at = pos(seg.id, r as u32 + total as u32);
        }
        if p == 0 {
            bail!("log segment {} offset {off}: {} bytes left, less than a record header", seg.path.display(), end - off);
        }
    }
    Ok((n, first_ts, last_seq, data, bytes))
}

/// What the receiver asks its driver to do after a frame.
#[derive(Debug, PartialEq, Eq)]
pub enum RecvAction {
    /// Write this frame to the link.
    Send(Vec<u8>),
    /// Once the log is durable up to `end`, acknowledge seq `seq` and the
    /// first `frames` RECORDS frames of this connection (`ack_frame`).
    /// Acks may be coalesced: the newest ready one covers the older ones.
    Ack { end: LogPos, seq: u64, frames: u64 },
}

struct Accepted {
    group: Arc<Group>,
    region: Arc<Mutex<Region>>,
    /// This connection's generation: a newer connection supersedes it.
    gen: u64,
    frames: u64,
    epoch: u64,
    /// The group's mode at the primary (HELLO, then MODE frames).
    mode: Option<Mode>,
}

/// The DR site's side of one connection from primary site `peer` (already
/// authenticated by the driver's TLS layer).
pub struct Receiver {
    host: Arc<dyn Host>,
    peer: String,
    conn: Option<Accepted>,
    /// Group named by the HELLO (for status), accepted or not.
    group_name: Option<String>,
}

impl Receiver {
    pub fn new(host: Arc<dyn Host>, peer: String) -> Receiver {
        Receiver { host, peer, conn: None, group_name: None }
    }

    /// A frame from the primary. An error ends the connection: send
    /// `farewell(&e)` first so the primary learns why.
    pub fn on_frame(&mut self, h: &FrameHeader, body: &[u8]) -> Result<Option<RecvAction>> {
        let peer = self.peer.clone();
        let Some(c) = &mut self.conn else {
            if h.kind != frame::HELLO {
                bail!("refused {peer}: first frame is kind {}, not HELLO", h.kind);
            }
            let hello: Hello = frame::decode_json(body)?;
            if hello.site != peer {
                bail!("refused {peer}: HELLO claims to be site {:?}, its certificate says {peer:?}", hello.site);
            }
            self.group_name = Some(hello.group.clone());
            let group = self.host.accept_group(&hello, h.epoch).map_err(|e| anyhow!("refused {peer} for group {}: {e:#}", hello.group))?;
            let region = self.host.dr().region(&group)?;
            // This connection supersedes any older one still draining.
            let gen = group.receiver_gen.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
            // A resync an older connection left can never be committed now.
            group.drop_dead_resync(gen, "was left by an earlier connection");
            // Make what we hold durable, then say where to resume. The seq
            // is read first: the tail read after it covers it, even if a
            // superseded connection's append lands in between.
            let (last, last_ident) = group.last_seq_ident();
            group.sync_to(group.flush_target())?;
            let reply = HelloReply { site: self.host.site_name(), group: group.name.clone(), next_seq: last + 1, durable_seq: last, last_ident, mode_frames: true, heartbeat_acks: true, link_timeout_ms: self.host.link_timeout().map(|d| d.as_millis() as u64) };
            // A mode this site does not know is taken as sync: full priority.
            let mode = Mode::parse(&hello.mode).ok();
            let epoch = group.epoch();
            tracing::info!(event = "primary-connected", "replication: {peer} connected for group {} (resuming at seq {})", group.name, last + 1);
            self.host.dr().update(&group.name, |d| {
                d.primary = peer.clone();
                d.connected = true;
                d.last_error = None;
                // What the primary said, as this site takes it: a name it
                // does not know is shown as such, cut short, not verbatim.
                d.mode = match mode {
                    Some(m) => m.as_str().into(),
                    None => format!("unknown ({:?}; taken as sync)", hello.mode.chars().take(32).collect::<String>()),
                };
            });
            let f = frame::encode(frame::HELLO_REPLY, epoch, &serde_json::to_vec(&reply)?, false);
            self.conn = Some(Accepted { group, region, gen, frames: 0, epoch, mode });
            return Ok(Some(RecvAction::Send(f)));
        };
        if h.epoch < c.epoch {
            bail!("stale frame: epoch {} is older than this site's epoch {}", h.epoch, c.epoch);
        }
        match h.kind {
            frame::RECORDS => {
                for r in frame::split_records(body)? {
                    // Duplicates (resent after a reconnect) come back as None.
                    c.group.append_replicated(r, c.gen).map_err(|e| anyhow!("{e}"))?;
                }
                c.frames += 1;
                self.host.dr().update(&c.group.name, |d| d.received_bytes_total += h.len as u64 + frame::HEADER_BYTES as u64);
                // The seq acknowledged must lie before the position waited
                // for: read together (a newer connection may append too).
                let (end, seq) = c.group.tail_and_last_seq();
                Ok(Some(RecvAction::Ack { end, seq, frames: c.frames }))
            }
            frame::HEARTBEAT => {
                let (seq, sent_ns) = frame::parse_two_u64(body)?;
                let hb = c.region.lock().unwrap().store(seq, sent_ns, h.epoch)?;
                self.host.dr().update(&c.group.name, |d| d.heartbeat = hb);
                // Answered (HELLO_REPLY `heartbeat_acks`) with what this
                // site holds, so the primary hears from a live link even
                // when no records flow.
                let (end, seq) = c.group.tail_and_last_seq();
                Ok(Some(RecvAction::Ack { end, seq, frames: c.frames }))
            }
            frame::MODE => {
                let mode = frame::parse_mode(body)?;
                tracing::debug!("replication: {peer} says group {} is now {}", c.group.name, mode.as_str());
                c.mode = Some(mode);
                self.host.dr().update(&c.group.name, |d| d.mode = mode.as_str().into());
                Ok(None)
            }
            k => bail!("unexpected frame kind {k} from {peer}"),
        }
    }

    /// The ACK frame for an `RecvAction::Ack` that is now durable.
    pub fn ack_frame(&self, seq: u64, frames: u64) -> Vec<u8> {
        frame::encode(frame::ACK, self.epoch(), &frame::two_u64(seq, frames), false)
    }

    /// The group's mode at the primary as far as this connection knows it,
    /// taken as sync (records are waited for) while unknown.
    pub fn mode(&self) -> Mode {
        self.conn.as_ref().and_then(|c| c.mode).unwrap_or(Mode::Sync)
    }

    /// The group of this connection, once accepted.
    pub fn group(&self) -> Option<&Arc<Group>> {
        self.conn.as_ref().map(|c| &c.group)
    }

    fn epoch(&self) -> u64 {
        self.conn.as_ref().map(|c| c.epoch).unwrap_or(0)
    }

    /// The ERROR frame that tells the primary why this connection ends; the
    /// reason also goes into this site's status.
    pub fn farewell(&self, e: &anyhow::Error) -> Vec<u8> {
        let msg = format!("{e:#}");
        if let Some(g) = self.group_name.as_ref().filter(|_| !self.host.is_primary()) {
            self.host.dr().update(g, |d| d.last_error = Some(msg.clone()));
        }
        frame::encode(frame::ERROR, self.epoch(), msg.as_bytes(), false)
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Some(c) = &self.conn {
            // A resync this connection left unfinished is dropped by the
            // group's maintenance, unless a newer connection came meanwhile.
            c.group.receiver_ended.fetch_max(c.gen, std::sync::atomic::Ordering::AcqRel);
            self.host.dr().update(&c.group.name, |d| d.connected = false);
            tracing::info!(event = "primary-disconnected", "replication: {} disconnected from group {}", self.peer, c.group.name);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The sender core driven by hand: events in, actions out, time as a
    //! number. (The receiver core and both together: `dsim.rs`.)
    use super::*;
    use crate::group::open::Create;

    const MS: u64 = 1_000_000;

    fn at(ms: u64) -> Now {
        Now { mono_ns: ms * MS, wall_ns: 1 }
    }

    fn primary(dir: &std::path::Path, mode: &str) -> Arc<Group> {
        let g = Group::open_or_create(&dir.join("p"), "cg0", &Create { id: Some(7), mode: mode.into(), written_here: true }).unwrap();
        g.create_volume("v", 1 << 20).unwrap();
        g.replication.add_replica("b");
        g
    }

    /// `primary`, with `n` 4 KiB writes to the first 8 blocks of its
    /// volume (write i filled with i).
    fn primary_with_writes(dir: &std::path::Path, mode: &str, n: u64) -> Arc<Group> {
        let g = primary(dir, mode);
        let v = g.volume("v").unwrap().id;
        for i in 0..n {
            g.write(v, (i % 8) * 4096, &[i as u8; 4096]).unwrap();
        }
        g
    }

    /// A primary whose volume has 16 written blocks, its DR in dirty mode
    /// (a full resync).
    fn dirty_primary(dir: &std::path::Path) -> Arc<Group> {
        let g = primary(dir, "async");
        let v = g.volume("v").unwrap().id;
        g.write(v, 0, &vec![5u8; 64 << 10]).unwrap();
        g.enter_dirty("b", None).unwrap();
        g
    }

    /// A frame as the DR would send it, through the decoder.
    fn deliver(s: &mut Sender, now: Now, kind: u8, body: &[u8]) -> Result<()> {
        let mut d = frame::Decoder::default();
        d.push(&frame::encode(kind, 1, body, false));
        let (h, body) = d.next_frame().unwrap().unwrap();
        s.on_frame(now, &h, &body)
    }

    /// A session whose DR answered HELLO with `next_seq` / `durable_seq`.
    fn answered(g: &Arc<Group>, next_seq: u64, durable_seq: u64) -> (Sender, Result<()>) {
        answered_naming(g, next_seq, durable_seq, None)
    }

    /// `answered`, the DR naming its last record's identity.
    fn answered_naming(g: &Arc<Group>, next_seq: u64, durable_seq: u64, last_ident: Option<u32>) -> (Sender, Result<()>) {
        answered_with(g, HelloReply { last_ident, ..reply(next_seq, durable_seq) })
    }

    /// DR site b's HELLO_REPLY as an older site sends it (no MODE frames,
    /// no answers to heartbeats, no link timeout named).
    fn reply(next_seq: u64, durable_seq: u64) -> HelloReply {
        HelloReply { site: "b".into(), group: "cg0".into(), next_seq, durable_seq, last_ident: None, mode_frames: false, heartbeat_acks: false, link_timeout_ms: None }
    }

    fn answered_with(g: &Arc<Group>, reply: HelloReply) -> (Sender, Result<()>) {
        let cfg = SenderConfig { site: "a".into(), peer: "b".into(), lz4: false, heartbeat_interval: Duration::from_millis(20), periodic_interval: Duration::from_millis(100), window_bytes: limits::REPL_WINDOW_BYTES, link_timeout: Duration::from_secs(2) };
        let mut s = Sender::new(g.clone(), cfg);
        let r = deliver(&mut s, at(0), frame::HELLO_REPLY, &serde_json::to_vec(&reply).unwrap());
        (s, r)
    }

    fn sender(g: &Arc<Group>, dr_last: u64) -> Sender {
        let (mut s, r) = answered(g, dr_last + 1, dr_last);
        r.unwrap();
        assert_eq!(s.poll(at(0)).unwrap(), Action::SavePins);
        s
    }

    /// A DR's answers can only speak of what it holds and was sent: a
    /// HELLO_REPLY naming more durable than it has, or another group, and
    /// an ACK past the records or frames sent end the session, and move
    /// nothing (a sync writer released on such an ack would count a write
    /// as held at the DR that it never got).
    #[test]
    fn a_dr_cannot_acknowledge_what_it_was_not_sent() {
        let dir = tempfile::tempdir().unwrap();
        let g = primary_with_writes(dir.path(), "sync", 3);
        let e = answered_with(&g, reply(2, 5)).1.unwrap_err();
        assert!(format!("{e:#}").contains("malformed HELLO_REPLY"), "{e:#}");
        let e = answered_with(&g, reply(1, u64::MAX)).1.unwrap_err();
        assert!(format!("{e:#}").contains("malformed HELLO_REPLY"), "{e:#}");
        let e = answered_with(&g, HelloReply { group: "cg1".into(), ..reply(1, 0) }).1.unwrap_err();
        assert!(format!("{e:#}").contains("answered for group \"cg1\""), "{e:#}");

        // The DR holds seq 1; the session sends the rest in one frame
        // (after a heartbeat).
        let mut s = sender(&g, 1);
        while first_frame(&mut s, at(1)) != frame::RECORDS {}
        let last = s.next - 1;
        assert!(last == 4 && last == g.last_seq(), "sent up to {last}");
        let e = ack(&mut s, at(2), last + 1, 1).unwrap_err();
        assert!(format!("{e:#}").contains("past the last it was sent"), "{e:#}");
        assert_eq!(g.replication.min_acked(), 1, "a malformed ack moved nothing");
        let e = ack(&mut s, at(2), last, 2).unwrap_err();
        assert!(format!("{e:#}").contains("more than the 1 sent"), "{e:#}");
        // What it was sent, it may acknowledge.
        ack(&mut s, at(3), last, 1).unwrap();
        assert_eq!(g.replication.min_acked(), last);
    }

    fn kind(a: &Action) -> u8 {
        match a {
            Action::Send(f) => f.kind(),
            _ => 0,
        }
    }

    /// The kind of the next frame the sender sends at `now` (pins saved on the way).
    fn first_frame(s: &mut Sender, now: Now) -> u8 {
        loop {
            match s.poll(now).unwrap() {
                Action::SavePins => {}
                a => return kind(&a),
            }
        }
    }

    fn ack(s: &mut Sender, now: Now, seq: u64, frames: u64) -> Result<()> {
        deliver(s, now, frame::ACK, &frame::two_u64(seq, frames))
    }

    /// A DR site that answers heartbeats is expected to be heard from all
    /// the time: any frame moves the deadline, and silence past
    /// `link_timeout` ends the session (an idle sender wakes up for it).
    #[test]
    fn a_silent_link_ends_the_session_and_any_frame_keeps_it_alive() {
        let dir = tempfile::tempdir().unwrap();
        let g = primary(dir.path(), "async");
        let last = g.last_seq();
        let (mut s, r) = answered_with(&g, HelloReply { mode_frames: true, heartbeat_acks: true, ..reply(last + 1, last) });
        r.unwrap();
        assert_eq!(s.link_deadline(), Some(2000 * MS));
        // Caught up and idle: it still wakes by the deadline.
        let until = loop {
            if let Action::Idle { until, .. } = s.poll(at(10)).unwrap() {
                break until;
            }
        };
        assert!(until.is_some_and(|u| u <= 2000 * MS), "idle until {until:?}");
        ack(&mut s, at(1500), last, 0).unwrap();
        assert_eq!(s.link_deadline(), Some(3500 * MS));
        s.poll(at(3499)).unwrap();
        let e = format!("{:#}", s.poll(at(3500)).unwrap_err());
        assert!(e.contains("no frame from b for 2.0 s") && e.contains("silent"), "{e}");
        g.abandon();
    }

    /// A DR site whose link timeout is short for our heartbeat interval
    /// gets heartbeats four times within it.
    #[test]
    fn heartbeats_come_often_enough_for_the_drs_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let g = primary(dir.path(), "async");
        let last = g.last_seq();
        // A DR naming 1 ms gets no heartbeat storm: 10 ms at the least.
        for (dr_timeout, every) in [(None, 20), (Some(1000), 20), (Some(40), 10), (Some(1), 10)] {
            let (mut s, r) = answered_with(&g, HelloReply { mode_frames: true, heartbeat_acks: true, link_timeout_ms: dr_timeout, ..reply(last + 1, last) });
            r.unwrap();
            let mut sent = Vec::new();
            for t in 0..45 {
                loop {
                    match s.poll(at(t)).unwrap() {
                        Action::Send(f) if f.kind() == frame::HEARTBEAT => sent.push(t),
                        Action::Send(_) | Action::SavePins => {}
                        Action::Idle { .. } => break,
                    }
                }
                ack(&mut s, at(t), last, 0).unwrap();
            }
            assert_eq!(sent, (0..45).step_by(every).collect::<Vec<_>>(), "DR timeout {dr_timeout:?}");
        }
        g.abandon();
    }

    /// An older DR site does not answer heartbeats: silence counts only
    /// while a RECORDS frame waits for its ack.
    #[test]
    fn an_older_dr_is_expected_to_answer_only_unacknowledged_records() {
        let dir = tempfile::tempdir().unwrap();
        let g = primary(dir.path(), "async");
        let mut s = sender(&g, g.last_seq());
        let idle = |s: &mut Sender, t: u64| loop {
            if let Action::Idle { until, .. } = s.poll(at(t)).unwrap() {
                return until;
            }
        };
        idle(&mut s, 1);
        assert_eq!(s.link_deadline(), None);
        idle(&mut s, 60_000); // a minute of quiet is fine
        let v = g.volume("v").unwrap().id;
        g.write(v, 0, &[1u8; 4096]).unwrap();
        let f = loop {
            match s.poll(at(60_001)).unwrap() {
                Action::Send(f) if f.kind() == frame::RECORDS => break f,
                Action::Send(_) => {}
                a => panic!("{a:?} with a record to ship"),
            }
        };
        s.recycle(f);
        // The clock starts when the answer became due, not at the last frame.
        assert_eq!(s.link_deadline(), Some(62_001 * MS));
        s.poll(at(62_000)).unwrap();
        let e = format!("{:#}", s.poll(at(62_001)).unwrap_err());
        assert!(e.contains("no frame from b for 2.0 s"), "{e}");
        g.abandon();
    }

    /// A big record is shipped from the log in place, with no frame buffer
    /// at all; with lz4 the buffer it grew is not kept for the next batch
    /// (a sender per group and DR site would hold it for good), a normal
    /// one is.
    #[test]
    fn a_big_records_frame_buffer_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let g = primary(dir.path(), "async");
        let v = g.create_volume("big", 64 << 20).unwrap();
        let mut s = sender(&g, g.last_seq());
        let mut t = 1;
        let mut ship = |s: &mut Sender| loop {
            t += 1;
            match s.poll(at(t)).unwrap() {
                Action::Send(f) if f.kind() == frame::RECORDS => break f,
                Action::Send(_) | Action::SavePins => {}
                a => panic!("{a:?} with a record to ship"),
            }
        };
        g.write(v, 0, &vec![7u8; 24 << 20]).unwrap();
        let f = ship(&mut s);
        assert!(matches!(f, Out::Records { .. }), "not read in place: {f:?}");
        assert!(f.len() > 24 << 20);
        assert_eq!(f.to_vec().unwrap().len(), f.len());
        // Written in parts no bigger than REPL_WRITE_PART_BYTES.
        let (mut parts, mut total) = (0, 0);
        while let Some(p) = f.part(parts) {
            let p = p.unwrap();
            assert!(p.len() <= limits::REPL_WRITE_PART_BYTES, "a part of {} bytes", p.len());
            total += p.len();
            parts += 1;
        }
        assert_eq!(total, f.len());
        assert!(parts > (24 << 20) / limits::REPL_WRITE_PART_BYTES, "{parts} parts");
        s.recycle(f);
        assert!(s.buf.capacity() <= limits::REPL_BUF_KEEP_BYTES, "kept a {} byte buffer", s.buf.capacity());
        // With lz4 the batch is built in the sender's buffer and compressed
        // into a new one: the big buffer is the sender's own.
        s.cfg.lz4 = true;
        g.write(v, 0, &vec![9u8; 24 << 20]).unwrap();
        let f = ship(&mut s);
        assert!(s.buf.capacity() <= limits::REPL_BUF_KEEP_BYTES, "kept a {} byte buffer after an lz4 frame", s.buf.capacity());
        s.recycle(f);
        assert!(s.buf.capacity() <= limits::REPL_BUF_KEEP_BYTES);
        g.write(v, 0, &vec![8u8; 1 << 20]).unwrap();
        ship(&mut s);
        assert!(s.buf.capacity() >= 1 << 20, "a normal lz4 batch buffer was not kept");
    }

    /// RECORDS frames hold whole records, in seq order, at most
    /// `REPL_BATCH_BYTES` each unless one record is bigger (then alone), and
    /// byte for byte as in the log.
    #[test]
    fn batches_hold_whole_records_in_order_within_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let g = primary(dir.path(), "async");
        let big = g.create_volume("big", 64 << 20).unwrap();
        let start = g.last_seq();
        let mut s = sender(&g, start);
        let sizes = [4096usize, 6 << 20, 1 << 20, 1 << 20, 1 << 20, 1 << 20, 4096, 9 << 20, 8192];
        for (i, n) in sizes.iter().enumerate() {
            g.write(big, (i as u64) << 20, &vec![i as u8 + 1; *n]).unwrap();
        }
        let last = g.last_seq();
        let mut seqs = Vec::new();
        let mut t = 1;
        while seqs.last().copied().unwrap_or(start) < last {
            t += 1;
            let Action::Send(f) = s.poll(at(t)).unwrap() else { panic!("idle with records to ship") };
            if f.kind() != frame::RECORDS {
                continue;
            }
            let mut d = frame::Decoder::default();
            d.push(&f.to_vec().unwrap());
            let (_, body) = d.next_frame().unwrap().unwrap();
            let recs = frame::split_records(&body).unwrap();
            assert!(body.len() as u64 <= limits::REPL_BATCH_BYTES || recs.len() == 1, "a {} byte batch of {} records", body.len(), recs.len());
            for r in recs {
                let h = Header::decode(r[..HEADER_BYTES].try_into().unwrap()).unwrap();
                h.verify(r[..HEADER_BYTES].try_into().unwrap(), &r[HEADER_BYTES..HEADER_BYTES + h.checked_body_len()]).unwrap();
                if h.kind == Kind::Write {
                    let data = &r[HEADER_BYTES + h.checked_body_len()..];
                    assert_eq!(data.len(), h.length as usize);
                    for (i, b) in data.chunks(limits::BLOCK_BYTES as usize).enumerate() {
                        assert_eq!(crate::crc::crc32c(b), crate::log::record::crc_at(&r[HEADER_BYTES..], i));
                    }
                }
                seqs.push(h.seq);
            }
            s.recycle(f);
        }
        assert_eq!(seqs, (start + 1..=last).collect::<Vec<_>>());
        g.abandon();
    }

    #[test]
    fn heartbeats_follow_the_given_clock() {
        let dir = tempfile::tempdir().unwrap();
        let g = primary(dir.path(), "async");
        let mut s = sender(&g, g.last_seq());
        assert_eq!(kind(&s.poll(at(0)).unwrap()), frame::HEARTBEAT);
        // Nothing to ship: idle until the next heartbeat, woken by appends.
        assert_eq!(s.poll(at(5)).unwrap(), Action::Idle { until: Some(20 * MS), on_append: true });
        assert_eq!(s.poll(at(19)).unwrap(), Action::Idle { until: Some(20 * MS), on_append: true });
        assert_eq!(kind(&s.poll(at(20)).unwrap()), frame::HEARTBEAT);
        // A write ships at once, then a heartbeat when due.
        let v = g.volume("v").unwrap().id;
        g.write(v, 0, &[1u8; 4096]).unwrap();
        assert_eq!(kind(&s.poll(at(21)).unwrap()), frame::RECORDS);
        assert!(matches!(s.poll(at(22)).unwrap(), Action::Idle { .. }));
        assert_eq!(kind(&s.poll(at(40)).unwrap()), frame::HEARTBEAT);
        g.abandon();
    }

    #[test]
    fn periodic_mode_ships_once_a_period_or_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let g = primary(dir.path(), "periodic");
        let mut s = sender(&g, g.last_seq());
        assert_eq!(kind(&s.poll(at(0)).unwrap()), frame::HEARTBEAT);
        // First look: nothing pending, the period starts.
        assert!(matches!(s.poll(at(0)).unwrap(), Action::Idle { .. }));
        let v = g.volume("v").unwrap().id;
        g.write(v, 0, &[1u8; 4096]).unwrap();
        assert_eq!(s.poll(at(10)).unwrap(), Action::Idle { until: Some(20 * MS), on_append: true }, "held until the period ends");
        assert_eq!(kind(&s.poll(at(20)).unwrap()), frame::HEARTBEAT);
        assert_eq!(s.poll(at(30)).unwrap(), Action::Idle { until: Some(40 * MS), on_append: true });
        // A storage operation asks for its seq to ship now.
        g.replication.ship_through(g.last_seq());
        assert_eq!(kind(&s.poll(at(31)).unwrap()), frame::RECORDS);
        g.write(v, 0, &[2u8; 4096]).unwrap();
        assert_eq!(kind(&s.poll(at(100)).unwrap()), frame::HEARTBEAT);
        assert_eq!(kind(&s.poll(at(100)).unwrap()), frame::RECORDS, "the period ended");
        g.abandon();
    }

    /// A DR site that says it takes MODE frames hears of each mode change
    /// before the records written after it; an older one never gets one.
    #[test]
    fn mode_changes_reach_a_dr_that_takes_mode_frames_before_later_records() {
        let dir = tempfile::tempdir().unwrap();
        let g = primary(dir.path(), "async");
        let v = g.volume("v").unwrap().id;
        for mode_frames in [true, false] {
            g.set_mode(Mode::Async).unwrap();
            let last = g.last_seq();
            let (mut s, r) = answered_with(&g, HelloReply { mode_frames, ..reply(last + 1, last) });
            r.unwrap();
            assert_eq!(s.poll(at(0)).unwrap(), Action::SavePins);
            assert_eq!(kind(&s.poll(at(0)).unwrap()), frame::HEARTBEAT);
            assert!(matches!(s.poll(at(0)).unwrap(), Action::Idle { .. }), "nothing changed, nothing to say");
            let mut said = Vec::new();
            for (t, mode) in [(1, Mode::Sync), (2, Mode::Sync), (3, Mode::Periodic), (4, Mode::Async)] {
                g.set_mode(mode).unwrap();
                g.replication.ship_through(g.last_seq() + 1);
                g.write(v, 0, &[t as u8; 4096]).unwrap();
                let mut a = s.poll(at(t)).unwrap();
                if let Action::Send(f) = &a {
                    if f.kind() == frame::MODE {
                        let mut d = frame::Decoder::default();
                        d.push(&f.to_vec().unwrap());
                        let (_, body) = d.next_frame().unwrap().unwrap();
                        said.push(frame::parse_mode(&body).unwrap());
                        a = s.poll(at(t)).unwrap();
                    }
                }
                assert_eq!(kind(&a), frame::RECORDS, "mode {mode:?}: the write follows");
            }
            if mode_frames {
                assert_eq!(said, [Mode::Sync, Mode::Periodic, Mode::Async], "one frame per change, none for a repeat");
            } else {
                assert!(said.is_empty(), "an older DR gets no MODE frames");
            }
        }
        g.abandon();
    }

    /// A DR shows the primary's mode as it takes it: a name it does not
    /// know (a newer primary's, or nonsense) as unknown, cut short, and
    /// taken as sync; not the string as sent.
    #[test]
    fn a_dr_shows_a_mode_it_does_not_know_as_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let d = Group::open_or_create(&dir.path().join("d"), "cg0", &Create { id: Some(7), mode: "async".into(), written_here: false }).unwrap();
        let host = Arc::new(crate::replicate::dsim::DrHost { group: std::sync::Mutex::new(d.clone()), dr: crate::replicate::receive::DrState::default() });
        let long = "warp".repeat(100);
        for (sent, shown, taken) in [("periodic", "periodic".to_string(), Mode::Periodic), (long.as_str(), format!("unknown ({:?}; taken as sync)", "warp".repeat(8)), Mode::Sync)] {
            let mut r = Receiver::new(host.clone(), "a".into());
            let hello = Hello { site: "a".into(), group: "cg0".into(), group_id: 7, epoch: d.epoch(), last_seq: d.last_seq(), mode: sent.into() };
            let mut dec = frame::Decoder::default();
            dec.push(&frame::encode(frame::HELLO, d.epoch(), &serde_json::to_vec(&hello).unwrap(), false));
            let (h, body) = dec.next_frame().unwrap().unwrap();
            assert!(matches!(r.on_frame(&h, &body).unwrap(), Some(RecvAction::Send(_))), "{sent}: no HELLO_REPLY");
            let mode = host.dr.groups.lock().unwrap()["cg0"].mode.clone();
            assert_eq!(mode, shown);
            assert_eq!(r.mode(), taken);
        }
        d.abandon();
    }

    #[test]
    fn a_full_window_waits_for_an_ack() {
        let dir = tempfile::tempdir().unwrap();
        let g = primary(dir.path(), "async");
        let start = g.last_seq();
        let mut s = sender(&g, start);
        assert_eq!(kind(&s.poll(at(0)).unwrap()), frame::HEARTBEAT);
        let v = g.volume("v").unwrap().id;
        let big = vec![3u8; 1 << 20];
        let mut frames = 0;
        loop {
            g.write(v, 0, &big).unwrap();
            match s.poll(at(1)).unwrap() {
                Action::Send(f) => {
                    assert_eq!(f.kind(), frame::RECORDS);
                    frames += 1;
                }
                Action::Idle { on_append, .. } => {
                    assert!(!on_append, "a full window is not opened by appends");
                    break;
                }
                a => panic!("{a:?}"),
            }
            assert!(frames < 1000, "the window never filled");
        }
        // The DR acknowledges everything sent: records flow again.
        ack(&mut s, at(2), g.last_seq() - 1, frames).unwrap();
        assert_eq!(kind(&s.poll(at(2)).unwrap()), frame::RECORDS);
        g.abandon();
    }

    #[test]
    fn a_dr_ahead_of_the_primary_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let g = primary(dir.path(), "async");
        let last = g.last_seq();
        let e = answered(&g, last + 5, last + 4).1.unwrap_err();
        assert!(format!("{e:#}").contains("ahead"), "{e:#}");
        g.abandon();
    }

    /// A DR with another history holds none of this primary's records past
    /// where the two part, and where that is is not known: its durable seq
    /// and its acks count for nothing until the full resync commits, so a
    /// sync writer is not released on them. Before, its HELLO_REPLY's
    /// durable seq released every writer up to it.
    #[test]
    fn a_diverged_drs_acks_count_for_nothing_until_its_resync_commits() {
        let dir = tempfile::tempdir().unwrap();
        let g = primary_with_writes(dir.path(), "sync", 10);
        let last = g.last_seq();
        let theirs = g.record_ident(last).unwrap().unwrap() ^ 0x5a5a;
        let acked = |g: &Arc<Group>| g.replication.replicas()[0].acked_seq;
        let (mut s, r) = answered_naming(&g, last + 1, last, Some(theirs));
        r.unwrap();
        assert!(g.in_dirty_mode("b"));
        assert_eq!(acked(&g), 0, "a diverged DR's durable seq is not ours");
        ack(&mut s, at(1), last, 0).unwrap();
        assert_eq!(acked(&g), 0, "nor are its acks");
        // The resync: begin, the blocks, the commit; then its ack counts.
        for _ in 0..100 {
            if matches!(&s.phase, Phase::Resync(rs) if rs.commit.is_some()) {
                break;
            }
            s.poll(at(2)).unwrap();
        }
        let Phase::Resync(rs) = &s.phase else { panic!("not resyncing") };
        let (seq, frames) = rs.commit.expect("the resync reached its commit");
        ack(&mut s, at(3), seq, frames).unwrap();
        assert_eq!(acked(&g), seq, "the commit's ack counts");
        assert!(!s.diverged);
    }

    /// A DR whose last record is not the primary's record at that seq (the
    /// primary lost writes it had shipped, then went on) gets a full
    /// resync, never the stream; one with the same record streams.
    #[test]
    fn a_dr_with_another_history_is_resynced_in_full() {
        let dir = tempfile::tempdir().unwrap();
        let g = primary_with_writes(dir.path(), "async", 40);
        let last = g.last_seq();
        let older = last - 20;
        let ours_last = g.record_ident(last).unwrap().expect("the newest record is known");
        let ours_older = g.record_ident(older).unwrap().expect("an older record is found in the log");
        assert_ne!(ours_last, ours_older);
        assert_eq!(g.record_ident(last + 1).unwrap(), None, "no record past the last");
        // The same history (newest or older): streaming, no dirty set.
        for (seq, ident) in [(last, Some(ours_last)), (older, Some(ours_older)), (older, None)] {
            let (_s, r) = answered_naming(&g, seq + 1, seq, ident);
            r.unwrap();
            assert!(!g.in_dirty_mode("b"), "seq {seq}: a DR on this primary's history streams");
        }
        // Another history at the same seq: every block of the volume is dirty.
        for seq in [older, last] {
            let (_s, r) = answered_naming(&g, seq + 1, seq, Some(ours_older ^ 0x5a5a));
            r.unwrap();
            assert!(g.in_dirty_mode("b"), "seq {seq}: a diverged DR is not streamed");
            assert_eq!(g.dirty_blocks("b"), (1 << 20) / 4096, "seq {seq}: the whole volume is resynced");
            let attempt = g.begin_attempt("b");
            g.take_dirty("b", attempt, u64::MAX);
            assert!(g.resync_point("b", attempt, seq).is_some());
            assert!(g.leave_dirty("b", attempt).unwrap());
        }
        assert_eq!(g.replication.replicas()[0].diverged_resyncs, 2, "each counted");
        // A dirty set that only held the latest writes becomes whole too.
        g.enter_dirty("b", Some(last)).unwrap();
        let partial = g.dirty_blocks("b");
        assert!(partial < (1 << 20) / 4096, "{partial}");
        answered_naming(&g, older + 1, older, Some(ours_older ^ 0x5a5a)).1.unwrap();
        assert_eq!(g.dirty_blocks("b"), (1 << 20) / 4096, "a partial dirty set is filled for a diverged DR");
        g.abandon();
    }

    /// A DR site that comes back empty (its data lost, or a new disk) while
    /// the primary holds a dirty set from some seq on: the set lacks every
    /// block written before, so everything is resent.
    #[test]
    fn an_empty_dr_against_a_partial_dirty_set_is_resynced_in_full() {
        let dir = tempfile::tempdir().unwrap();
        let g = primary_with_writes(dir.path(), "async", 8);
        let last = g.last_seq();
        g.enter_dirty("b", Some(last)).unwrap();
        assert_eq!(g.dirty_from("b"), Some(Some(last)));
        assert!(g.dirty_blocks("b") < (1 << 20) / 4096);
        // A DR holding everything before the set: the set serves it.
        answered(&g, last, last - 1).1.unwrap();
        assert!(g.dirty_blocks("b") < (1 << 20) / 4096, "the set covers a DR at seq {}", last - 1);
        // An empty one: everything.
        answered(&g, 1, 0).1.unwrap();
        assert_eq!(g.dirty_blocks("b"), (1 << 20) / 4096);
        assert_eq!(g.dirty_from("b"), Some(None));
        g.abandon();
    }

    #[test]
    fn resync_blocks_taken_go_back_when_the_session_ends_uncommitted() {
        let dir = tempfile::tempdir().unwrap();
        let g = dirty_primary(dir.path());
        let dirty = g.dirty_blocks("b");
        assert!(dirty >= 16);
        let mut s = sender(&g, 0);
        assert!(s.blocking_step());
        // BEGIN, then data: the blocks are in flight.
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let a = s.poll(at(1)).unwrap();
            kinds.push(kind(&a));
        }
        assert_eq!(kinds, [frame::RECORDS, frame::RECORDS]);
        assert!(g.dirty_blocks("b") < dirty, "taken blocks are in flight");
        drop(s);
        assert_eq!(g.dirty_blocks("b"), dirty, "an uncommitted resync gives its blocks back");
        // A session that commits (acked) leaves dirty mode and streams.
        let mut s = sender(&g, 0);
        let mut frames = 0;
        loop {
            match s.poll(at(2)).unwrap() {
                Action::Send(_) => frames += 1,
                // Waiting for the commit's ack, and no later than the next
                // heartbeat (one goes out every interval during a resync
                // too; the link deadline, 2 s on, is later).
                Action::Idle { on_append: false, until } => {
                    assert_eq!(until, Some(20 * MS));
                    break;
                }
                a => panic!("{a:?}"),
            }
        }
        assert!(g.in_dirty_mode("b"));
        assert_eq!(first_frame(&mut s, at(25)), frame::HEARTBEAT, "heartbeats go on during a resync");
        ack(&mut s, at(26), 0, frames).unwrap();
        assert_eq!(first_frame(&mut s, at(50)), frame::HEARTBEAT, "streaming after the commit");
        assert!(!g.in_dirty_mode("b"));
        drop(s);
        assert!(!g.in_dirty_mode("b"));
        g.abandon();
    }

    /// Found by the deterministic simulation: session A's resync commit is
    /// acknowledged after a newer session B began its own attempt (and
    /// committed at a later seq, which moved the pin past what the DR
    /// holds). A must not end dirty mode: that left the pin at B's seq and
    /// the writes between A's and B's commits unprotected.
    #[test]
    fn a_superseded_commit_ack_leaves_the_newer_attempt_in_charge() {
        let dir = tempfile::tempdir().unwrap();
        let g = dirty_primary(dir.path());
        let v = g.volume("v").unwrap().id;
        let drain = |s: &mut Sender| {
            let mut n = 0;
            while let Action::Send(_) = s.poll(at(1)).unwrap() {
                n += 1;
            }
            n
        };
        let mut a = sender(&g, 0);
        let fa = drain(&mut a);
        g.write(v, 1 << 16, &vec![6u8; 4096]).unwrap();
        let mut b = sender(&g, 0);
        let fb = drain(&mut b);
        assert!(fa >= 3 && fb >= 3, "{fa} {fb}");
        let e = ack(&mut a, at(2), 0, fa).unwrap_err();
        assert!(format!("{e:#}").contains("newer attempt"), "{e:#}");
        assert!(g.in_dirty_mode("b"), "the older commit's ack ended the newer attempt");
        drop(a);
        ack(&mut b, at(3), 0, fb).unwrap();
        assert!(!g.in_dirty_mode("b"));
        assert_eq!(first_frame(&mut b, at(30)), frame::HEARTBEAT);
        g.abandon();
    }
}
