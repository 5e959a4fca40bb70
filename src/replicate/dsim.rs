//! Deterministic simulation of replication over the sans-IO cores
//! (`session::Sender`, `session::Receiver`): one thread, virtual time, no
//! sockets, no tasks. The world is the primary's group, the DR's group
//! (both real, on tmpfs) and a set of connections, each two byte pipes with
//! a frame decoder at either end. At every step a seeded RNG picks what
//! happens next:
//!
//! - the sender is polled only when the `Idle` it returned says it has
//!   something to do (its deadline passed, records were appended, a frame
//!   arrived), so a missing wake-up shows as a failure to converge;
//! - maintenance runs on either site (log cap with a small cap, so the
//!   primary's own rule sends the DR to dirty-region resync; checkpoint; GC);
//! - the application writes (stamped blocks, `oracle.rs`) or runs a
//!   snapshot operation (create, snapshot of snapshot, refresh, sync,
//!   delete, a second volume) on the primary, or switches async/periodic;
//! - some bytes move along a pipe (frames arrive in pieces), the sender is
//!   polled, the DR fsyncs its log (and durable acks go out), time advances;
//! - a new connection opens while the old one still lingers (its frames,
//!   resync blocks in flight and acks arrive later, interleaved with the
//!   new one's: the reorders a real network makes between connections),
//!   a link is cut (at once, or after a random number of bytes), an end
//!   notices a dead link (late, like a TCP timeout);
//! - the DR loses power (its files as a power cut leaves them: each
//!   segment up to its last fdatasync, unsynced pages kept or lost at
//!   random) or the primary process crashes (reopened from its files), or
//!   the log cap sends the DR to dirty-region resync.
//!
//! Reordering inside one connection is not a fault a TLS link can show
//! (its record sequence numbers turn it into a broken connection, i.e. a
//! cut), so it is not simulated.
//!
//! Checked after every step: the DR never holds a seq the primary does not,
//! its volume shows exactly writes 1..k for some k (every snapshot too,
//! every few steps), and a power cut never loses a seq the DR acknowledged.
//! After the faults stop, the links heal and the DR must converge to the
//! primary, every map byte for byte.
//!
//! Nothing varies but the seed: the group id is fixed, record timestamps
//! come from the virtual clock (`util::set_sim_clock`), groups start no
//! background threads (maintenance runs when the RNG says so), and every
//! choice is drawn from the seed. So a failing seed replays exactly: `DSIM_SEED=<seed> cargo test --release --lib dsim`,
//! with `DSIM_TRACE=1` to print each step. A test checks that two runs of
//! the same seed produce the same trace.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::frame::{Decoder, Hello};
use super::receive::{self, DrState, Host};
use super::session::{Action, Now, RecvAction, Receiver, Sender, SenderConfig};
use super::Mode;
use crate::group::open::Create;
use crate::group::Group;
use crate::log::segment::LogPos;
use crate::oracle::stamp;

pub(super) const BLOCKS: u64 = 64;
/// Virtual silence after which a sender gives up on its link: events
/// advance time by up to 30 ms and the DR's acks wait for its fsyncs, so
/// some sessions end this way (then the sender reconnects, as for a cut).
const LINK_TIMEOUT_MS: u64 = 60;
/// The DR's timeout as it tells the sender in HELLO_REPLY (the simulated
/// DR does not time out itself: its end notices a dead link by the RNG).
const DR_LINK_TIMEOUT_MS: u64 = 48;
const GROUP_ID: u64 = 0x7e57_0000_0000_0001;
/// Virtual wall clock origin (2026-01-01).
const WALL0: u64 = 1_767_225_600_000_000_000;

pub(super) fn prefix_of(data: &[u8]) -> Result<u64, String> {
    crate::oracle::prefix_of(data, BLOCKS)
}

/// The DR's volume `v` as writes 1..k (None before it exists); with
/// `maps`, every snapshot it holds is checked too.
pub(super) fn dr_state(d: &Group, maps: bool) -> Result<Option<u64>, String> {
    let Some(v) = d.volume("v") else { return Ok(None) };
    let mut buf = vec![0u8; (BLOCKS * 4096) as usize];
    d.read(v.id, 0, &mut buf).map_err(|e| e.to_string())?;
    if maps {
        for m in d.maps().into_iter().filter(|m| m.snapshot) {
            let mut s = vec![0u8; (BLOCKS * 4096) as usize];
            match d.read(m.id, 0, &mut s) {
                Ok(()) => {}
                // Deleted by the stream since it was listed.
                Err(crate::group::IoError::VolumeGone(_)) => continue,
                Err(e) => return Err(e.to_string()),
            }
            prefix_of(&s).map_err(|e| format!("snapshot {}: {e}", m.name))?;
        }
    }
    prefix_of(&buf).map(Some)
}

/// Name -> content of every map (volume and snapshots).
pub(super) fn contents(g: &Group) -> BTreeMap<String, Vec<u8>> {
    g.maps()
        .into_iter()
        .map(|m| {
            let mut b = vec![0u8; m.size as usize];
            let _ = g.read(m.id, 0, &mut b);
            (m.name, b)
        })
        .collect()
}

/// Converged: same maps, same bytes.
pub(super) fn compare(p: &Group, d: &Group) -> Result<(), String> {
    let (want, got) = (contents(p), contents(d));
    if want.keys().ne(got.keys()) {
        return Err(format!("converged with different maps: primary {:?}, DR {:?}", want.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>()));
    }
    if let Some((name, c)) = want.iter().find(|(n, c)| got.get(*n) != Some(*c)) {
        return Err(format!("converged but {name} differs between the primary ({:?}) and the DR ({:?})", prefix_of(c), prefix_of(&got[name])));
    }
    Ok(())
}

/// One random snapshot operation on the primary (in the stream between
/// the writes). Returns a description for the trace.
pub(super) fn snapshot_op(p: &Group, rng: &mut StdRng, step: u64) -> Result<String, String> {
    let snaps: Vec<String> = p.maps().into_iter().filter(|m| m.snapshot).map(|m| m.name).collect();
    let pick = |rng: &mut StdRng| snaps[rng.random_range(0..snaps.len())].clone();
    let vsnaps: Vec<String> = snaps.iter().filter(|n| n.starts_with("v@")).cloned().collect();
    let op = rng.random_range(0..6);
    let (what, r) = match op {
        0 if !vsnaps.is_empty() => {
            let s = vsnaps[rng.random_range(0..vsnaps.len())].clone();
            (format!("restore v from {s}"), p.refresh_snapshot("v", &s).map(|_| ()))
        }
        // A second volume with a snapshot: syncs between its snapshots
        // and v's make maps whose base the DR may lack.
        5 => (format!("volume w{step} and w{step}@a"), p.create_volume(&format!("w{step}"), BLOCKS * 4096).and_then(|_| p.create_snapshot(&format!("w{step}"), "a", false)).map(|_| ())),
        1 if snaps.len() >= 2 => {
            let (a, b) = (pick(rng), pick(rng));
            (format!("sync {a} -> {b}"), if a == b { Ok(()) } else { p.sync_snapshots(&a, &b).map(|_| ()) })
        }
        2 if !snaps.is_empty() => {
            let s = pick(rng);
            (format!("delete {s}"), p.delete_snapshot("v", &s))
        }
        3 if !snaps.is_empty() => {
            let s = pick(rng);
            (format!("snapshot {s}@s{step}"), p.create_snapshot(&s, &format!("s{step}"), false).map(|_| ()))
        }
        _ => (format!("snapshot v@s{step}"), p.create_snapshot("v", &format!("s{step}"), false).map(|_| ())),
    };
    r.map_err(|e| format!("snapshot operation {what} failed: {e:#}"))?;
    Ok(what)
}

pub(super) struct DrHost {
    pub group: Mutex<Arc<Group>>,
    pub dr: DrState,
}

impl Host for DrHost {
    fn site_name(&self) -> String {
        "b".into()
    }
    fn accept_group(&self, hello: &Hello, epoch: u64) -> Result<Arc<Group>> {
        let g = self.group.lock().unwrap().clone();
        receive::check_group(&g, hello, epoch)?;
        Ok(g)
    }
    fn dr(&self) -> &DrState {
        &self.dr
    }
    /// Shorter than four of the sender's 20 ms heartbeat intervals, so the
    /// sender adapts (heartbeats every 12 ms), as a real primary does for a
    /// DR configured with a short timeout.
    fn link_timeout(&self) -> Option<Duration> {
        Some(Duration::from_millis(DR_LINK_TIMEOUT_MS))
    }
}

/// One direction of a connection: bytes in flight.
#[derive(Default)]
struct Pipe {
    bytes: VecDeque<u8>,
    dec: Decoder,
}

struct Conn {
    id: u64,
    sender: Option<Sender>,
    receiver: Option<Receiver>,
    a2b: Pipe,
    b2a: Pipe,
    /// The link broke: nothing more crosses it; each end finds out later.
    dead: bool,
    /// Bytes primary -> DR the link still carries before it breaks.
    budget: Option<u64>,
    /// The primary closed its end (after an error): the DR reads what is
    /// in flight, then the end of the stream.
    a_closed: bool,
    /// The DR closed its end (after an error): nothing more is read there.
    b_closed: bool,
    /// Acks waiting for the DR's log to be durable.
    acks: Vec<(LogPos, u64, u64)>,
    /// The sender's last `Idle` (deadline, wake on append, primary seq
    /// then); None: it has something to do.
    idle: Option<(Option<u64>, bool, u64)>,
}

impl Conn {
    fn gone(&self) -> bool {
        self.sender.is_none() && self.receiver.is_none()
    }

    /// Would a real driver poll the sender now?
    fn woken(&self, now: u64, seq: u64) -> bool {
        self.sender.is_some()
            && match self.idle {
                None => true,
                Some((until, on_append, at)) => until.is_some_and(|u| now >= u) || (on_append && seq > at),
            }
    }
}

struct World {
    rng: StdRng,
    dir: tempfile::TempDir,
    p: Arc<Group>,
    host: Arc<DrHost>,
    conns: Vec<Conn>,
    next_conn: u64,
    now: u64,
    writes: u64,
    dr_gen: u64,
    step: u64,
    trace: Vec<String>,
    print: bool,
    /// (DR generation, DR log tail, with maps) last checked.
    checked: Option<(u64, u64, bool)>,
    /// Highest seq the DR acknowledged (promised durable) on any connection.
    acked_max: u64,
    log_cap: u64,
}

fn create(mode: &str) -> Create {
    Create { id: Some(GROUP_ID), mode: mode.into(), written_here: false }
}

impl World {
    fn new(seed: u64, print: bool) -> Result<World, String> {
        crate::util::set_sim_clock(Some(WALL0));
        let dir = tempfile::Builder::new().prefix("tidemark-dsim").tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir()).map_err(|e| e.to_string())?;
        let p = Group::open_or_create(&dir.path().join("p"), "cg0", &Create { written_here: true, ..create("async") }).map_err(|e| e.to_string())?;
        p.create_volume("v", BLOCKS * 4096).map_err(|e| e.to_string())?;
        p.replication.add_replica("b");
        let d = Group::open_or_create(&dir.path().join("d0"), "cg0", &create("async")).map_err(|e| e.to_string())?;
        let host = Arc::new(DrHost { group: Mutex::new(d), dr: DrState::default() });
        let mut rng = StdRng::seed_from_u64(seed);
        // A small log cap in half the schedules: maintenance then sends a
        // lagging DR to dirty-region resync by the primary's own rule.
        let log_cap = if rng.random_bool(0.5) { rng.random_range(64u64 << 10..1 << 20) } else { crate::limits::REPL_LOG_CAP_BYTES_DEFAULT };
        p.log_cap.store(log_cap, std::sync::atomic::Ordering::Relaxed);
        Ok(World { rng, log_cap, dir, p, host, conns: Vec::new(), next_conn: 1, now: 0, writes: 0, dr_gen: 0, step: 0, trace: Vec::new(), print, checked: None, acked_max: 0 })
    }

    fn note(&mut self, s: String) {
        // Paths differ between runs of a seed; what happened does not.
        let s = s.replace(&self.dir.path().display().to_string(), "<dir>");
        if self.print {
            eprintln!("[{} t={}ms] {s}", self.step, self.now / 1_000_000);
        }
        self.trace.push(s);
    }

    fn time(&self) -> Now {
        crate::util::set_sim_clock(Some(WALL0 + self.now));
        Now { mono_ns: self.now, wall_ns: WALL0 + self.now }
    }

    fn dr(&self) -> Arc<Group> {
        self.host.group.lock().unwrap().clone()
    }

    fn connect(&mut self, budget: Option<u64>) -> Result<(), String> {
        let lz4 = self.rng.random_bool(0.3);
        let window_bytes = if self.rng.random_bool(0.5) { self.rng.random_range(4096..256 << 10) } else { crate::limits::REPL_WINDOW_BYTES };
        let cfg = SenderConfig { site: "a".into(), peer: "b".into(), lz4, heartbeat_interval: Duration::from_millis(20), periodic_interval: Duration::from_millis(50), window_bytes, link_timeout: Duration::from_millis(LINK_TIMEOUT_MS) };
        let s = Sender::new(self.p.clone(), cfg);
        let hello = s.hello().map_err(|e| e.to_string())?;
        let host: Arc<dyn Host> = self.host.clone();
        let mut c = Conn { id: self.next_conn, sender: Some(s), receiver: Some(Receiver::new(host, "a".into())), a2b: Pipe::default(), b2a: Pipe::default(), dead: false, budget, a_closed: false, b_closed: false, acks: Vec::new(), idle: None };
        c.a2b.bytes.extend(hello);
        self.next_conn += 1;
        self.note(format!("connect #{} (lz4 {lz4}, window {window_bytes}, cut after {budget:?} bytes)", c.id));
        self.conns.push(c);
        Ok(())
    }

    /// The primary's end of connection `i` fails with `why`.
    fn close_sender(&mut self, i: usize, why: String) {
        let c = &mut self.conns[i];
        c.sender = None;
        c.a_closed = true;
        c.b2a.bytes.clear();
        let id = c.id;
        self.note(format!("#{id} sender ends: {why}"));
    }

    /// The DR's end of connection `i` fails with `e` (its ERROR frame goes out first).
    fn close_receiver(&mut self, i: usize, e: Option<anyhow::Error>) {
        if e.is_some() && !self.conns[i].dead && !self.conns[i].acks.is_empty() {
            // The real ack writer sends what is queued (after the sync it
            // waits for) before the ERROR frame.
            let _ = self.dr_sync_conn(Some(i));
        }
        let c = &mut self.conns[i];
        let Some(r) = c.receiver.take() else { return };
        if let Some(e) = &e {
            if !c.dead {
                c.b2a.bytes.extend(r.farewell(e));
            }
        }
        drop(r);
        c.b_closed = true;
        c.a2b.bytes.clear();
        c.acks.clear();
        let id = c.id;
        self.note(format!("#{id} receiver ends: {}", e.map(|e| format!("{e:#}")).unwrap_or_else(|| "end of stream".into())));
    }

    /// Moves up to `n` bytes primary -> DR on connection `i`.
    fn deliver_a2b(&mut self, i: usize, n: usize) {
        let c = &mut self.conns[i];
        if c.dead || c.receiver.is_none() {
            return;
        }
        let mut n = n.min(c.a2b.bytes.len());
        if let Some(b) = c.budget {
            n = n.min(b as usize);
        }
        let chunk: Vec<u8> = c.a2b.bytes.drain(..n).collect();
        c.a2b.dec.push(&chunk);
        let breaks = c.budget.as_mut().is_some_and(|b| {
            *b -= n as u64;
            *b == 0
        });
        self.receive(i);
        if breaks {
            self.conns[i].dead = true;
            let id = self.conns[i].id;
            self.note(format!("#{id} link breaks after its byte budget"));
        }
    }

    /// The DR's end of connection `i` takes the frames that have arrived.
    fn receive(&mut self, i: usize) {
        loop {
            let c = &mut self.conns[i];
            let Some(r) = c.receiver.as_mut() else { return };
            let (h, body) = match c.a2b.dec.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    self.close_receiver(i, Some(anyhow::anyhow!("bad frame: {e}")));
                    return;
                }
            };
            let r = r.on_frame(&h, &body);
            let (id, kind) = (c.id, h.kind);
            match r {
                Ok(Some(RecvAction::Send(f))) => {
                    c.b2a.bytes.extend(f);
                    let held = self.dr().last_seq();
                    self.note(format!("#{id} DR accepts HELLO, holds seq {held}"));
                }
                Ok(Some(RecvAction::Ack { end, seq, frames })) => {
                    c.acks.push((end, seq, frames));
                    self.note(format!("#{id} DR took frame {frames}, at seq {seq}"));
                }
                Ok(None) => self.note(format!("#{id} DR took frame kind {kind}")),
                Err(e) => {
                    self.close_receiver(i, Some(e));
                    return;
                }
            }
        }
        let c = &self.conns[i];
        if c.a_closed && c.a2b.bytes.is_empty() {
            self.close_receiver(i, None);
        }
    }

    /// Moves up to `n` bytes DR -> primary on connection `i`.
    fn deliver_b2a(&mut self, i: usize, n: usize) {
        let c = &mut self.conns[i];
        if c.dead || c.sender.is_none() {
            return;
        }
        let n = n.min(c.b2a.bytes.len());
        let chunk: Vec<u8> = c.b2a.bytes.drain(..n).collect();
        c.b2a.dec.push(&chunk);
        let now = self.time();
        loop {
            let c = &mut self.conns[i];
            let Some(s) = c.sender.as_mut() else { return };
            let r = match c.b2a.dec.next_frame() {
                Ok(Some((h, body))) => s.on_frame(now, &h, &body).map(|_| Some(h.kind)),
                Ok(None) => break,
                Err(e) => Err(anyhow::anyhow!("bad frame: {e}")),
            };
            if let Ok(Some(kind)) = r {
                c.idle = None;
                let (id, acked) = (c.id, self.p.replication.replicas().first().map(|r| r.acked_seq).unwrap_or(0));
                self.note(format!("#{id} primary took frame kind {kind}, DR acked seq {acked}"));
            }
            if let Err(e) = r {
                self.close_sender(i, format!("{e:#}"));
                return;
            }
        }
        let c = &self.conns[i];
        if c.b_closed && c.b2a.bytes.is_empty() {
            self.close_sender(i, "the DR closed the connection".into());
        }
    }

    /// Polls the sender of connection `i` until it idles (at most `max` actions).
    fn poll(&mut self, i: usize, max: usize) -> Result<usize, String> {
        let mut sent = 0;
        for _ in 0..max {
            let now = self.time();
            let c = &mut self.conns[i];
            let Some(s) = c.sender.as_mut() else { break };
            match s.poll(now) {
                Ok(Action::Send(f)) => {
                    c.idle = None;
                    if !c.dead {
                        let f = f.to_vec().map_err(|e| format!("sender frame: {e:#}"))?;
                        c.a2b.bytes.extend(f);
                    }
                    sent += 1;
                }
                Ok(Action::SavePins) => self.p.save_pins().map_err(|e| format!("save pins: {e:#}"))?,
                Ok(Action::Idle { until, on_append }) => {
                    c.idle = Some((until, on_append, self.p.last_seq()));
                    let id = c.id;
                    self.note(format!("#{id} sender sent {sent} frames, idle until {until:?} (append {on_append})"));
                    break;
                }
                Err(e) => {
                    self.close_sender(i, format!("{e:#}"));
                    break;
                }
            }
        }
        Ok(sent)
    }

    /// The DR's fsync: acks whose records are now durable go out (the
    /// newest ready one per connection, as the real writer coalesces).
    fn dr_sync(&mut self) -> Result<(), String> {
        self.dr_sync_conn(None)
    }

    fn dr_sync_conn(&mut self, only: Option<usize>) -> Result<(), String> {
        let d = self.dr();
        d.sync_to(d.flush_target()).map_err(|e| format!("DR sync: {e:#}"))?;
        let durable = d.durable_pos();
        for (i, c) in self.conns.iter_mut().enumerate() {
            if only.is_some_and(|o| o != i) {
                continue;
            }
            let Some(r) = &c.receiver else { continue };
            let ready = c.acks.iter().take_while(|a| a.0 <= durable).count();
            if ready > 0 {
                let (_, seq, frames) = c.acks[ready - 1];
                c.acks.drain(..ready);
                if !c.dead {
                    c.b2a.bytes.extend(r.ack_frame(seq, frames));
                    self.acked_max = self.acked_max.max(seq);
                }
            }
        }
        Ok(())
    }

    fn live(&self) -> Vec<usize> {
        (0..self.conns.len()).filter(|i| !self.conns[*i].gone()).collect()
    }

    fn pick(&mut self, v: &[usize]) -> Option<usize> {
        if v.is_empty() {
            None
        } else {
            Some(v[self.rng.random_range(0..v.len())])
        }
    }

    fn write(&mut self, n: u64) -> Result<(), String> {
        let vol = self.p.volume("v").ok_or("volume v vanished")?.id;
        for _ in 0..n {
            self.writes += 1;
            let b = (self.writes - 1) % BLOCKS;
            self.p.write(vol, b * 4096, &stamp(self.writes, b)).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn dr_power_cut(&mut self) -> Result<(), String> {
        let acked = self.acked_max;
        // Every connection's DR end dies with the process; the primary's
        // ends find out later.
        for i in 0..self.conns.len() {
            self.conns[i].dead = true;
            let c = &mut self.conns[i];
            c.receiver = None;
            c.acks.clear();
        }
        let old = self.dr();
        old.abandon();
        self.dr_gen += 1;
        let to = self.dir.path().join(format!("d{}", self.dr_gen));
        crate::group::tests::power_cut::cut_copy(&old, &to, &mut self.rng);
        let d = Group::open_or_create(&to, "cg0", &create("async")).map_err(|e| format!("DR log does not open after a power cut: {e:#}"))?;
        self.note(format!("DR power cut: held seq {}, {} after (acked {acked})", old.last_seq(), d.last_seq()));
        if d.last_seq() < acked {
            return Err(format!("DR acknowledged seq {acked} but holds only {} after a power cut", d.last_seq()));
        }
        self.host = Arc::new(DrHost { group: Mutex::new(d), dr: DrState::default() });
        Ok(())
    }

    fn primary_crash(&mut self) -> Result<(), String> {
        // The process dies: its connections' primary ends are gone at
        // once (the DR ends find out later).
        for c in &mut self.conns {
            c.dead = true;
            c.sender = None;
        }
        self.p.abandon();
        self.p = Group::open(&self.dir.path().join("p"), "cg0").map_err(|e| format!("primary log does not open after a crash: {e:#}"))?;
        self.p.replication.add_replica("b");
        self.p.log_cap.store(self.log_cap, std::sync::atomic::Ordering::Relaxed);
        self.note(format!("primary crash: reopened at seq {}", self.p.last_seq()));
        Ok(())
    }

    /// One random event.
    fn event(&mut self) -> Result<(), String> {
        self.time();
        let live = self.live();
        let roll = self.rng.random_range(0..1000);
        match roll {
            0..=99 => {
                let n = self.rng.random_range(1..12);
                self.write(n)?;
                self.note(format!("{n} writes (now {})", self.writes));
            }
            100..=124 => {
                let step = self.step;
                let what = snapshot_op(&self.p, &mut self.rng, step)?;
                self.note(what);
            }
            125..=144 => {
                // A new connection; the old ones linger until they notice.
                let budget = if self.rng.random_bool(0.4) { Some(self.rng.random_range(1..200_000)) } else { None };
                self.connect(budget)?;
            }
            145..=154 => {
                if let Some(i) = self.pick(&live) {
                    self.conns[i].dead = true;
                    let id = self.conns[i].id;
                    self.note(format!("#{id} link cut"));
                }
            }
            155..=184 => {
                // An end notices its link is dead (keepalive, write error).
                let dead: Vec<usize> = live.iter().copied().filter(|i| self.conns[*i].dead).collect();
                if let Some(i) = self.pick(&dead) {
                    if self.rng.random_bool(0.5) && self.conns[i].sender.is_some() {
                        self.close_sender(i, "link dead".into());
                    } else {
                        self.close_receiver(i, None);
                    }
                }
            }
            185..=464 => {
                if let Some(i) = self.pick(&live) {
                    let n = self.rng.random_range(1..100_000);
                    self.deliver_a2b(i, n);
                }
            }
            465..=614 => {
                if let Some(i) = self.pick(&live) {
                    let n = self.rng.random_range(1..200);
                    self.deliver_b2a(i, n);
                }
            }
            615..=829 => {
                let (now, seq) = (self.now, self.p.last_seq());
                let woken: Vec<usize> = live.iter().copied().filter(|i| self.conns[*i].woken(now, seq)).collect();
                if let Some(i) = self.pick(&woken) {
                    let max = self.rng.random_range(1..8);
                    self.poll(i, max)?;
                }
            }
            830..=834 => {
                // Maintenance, when the RNG says so: the log cap rule, GC,
                // and now and then a checkpoint, on either site.
                let dr = self.rng.random_bool(0.5);
                let g = if dr { self.dr() } else { self.p.clone() };
                let ckpt = self.rng.random_bool(0.3);
                if ckpt {
                    g.checkpoint().map_err(|e| format!("checkpoint: {e:#}"))?;
                }
                g.maintain().map_err(|e| format!("maintenance: {e:#}"))?;
                let dirty = self.p.in_dirty_mode("b");
                self.note(format!("maintenance at {} (checkpoint {ckpt}); DR in dirty mode: {dirty}", if dr { "the DR" } else { "the primary" }));
            }
            835..=934 => self.dr_sync()?,
            935..=984 => {
                self.now += self.rng.random_range(0..30_000_000);
            }
            985..=989 => {
                let m = if self.p.replication.mode() == Mode::Periodic { Mode::Async } else { Mode::Periodic };
                self.p.set_mode(m).map_err(|e| e.to_string())?;
                self.note(format!("mode {}", m.as_str()));
            }
            990..=994 => {
                // The log cap (or a lost log) sends the DR to dirty-region resync.
                let full = self.rng.random_bool(0.3);
                let pin = self.p.replication.replicas().first().map(|r| r.acked_seq + 1).unwrap_or(1);
                self.p.enter_dirty("b", if full { None } else { Some(pin) }).map_err(|e| e.to_string())?;
                self.note(format!("enter dirty mode (full {full})"));
            }
            995..=997 => self.dr_power_cut()?,
            _ => self.primary_crash()?,
        }
        self.conns.retain(|c| !c.gone());
        Ok(())
    }

    fn check(&mut self, maps: bool) -> Result<(), String> {
        let d = self.dr();
        if d.last_seq() > self.p.last_seq() {
            return Err(format!("DR is ahead: seq {} > primary's {}", d.last_seq(), self.p.last_seq()));
        }
        // The DR's state changes only when it appends (or loses power).
        let at = (self.dr_gen, d.flush_target(), maps);
        if self.checked == Some(at) {
            return Ok(());
        }
        self.checked = Some(at);
        dr_state(&d, maps).map_err(|e| format!("DR shows an inconsistent state: {e}"))?;
        Ok(())
    }

    /// Faults stop, one clean connection: the DR must converge.
    fn converge(&mut self) -> Result<(), String> {
        for c in &mut self.conns {
            c.dead = true;
        }
        while let Some(i) = self.live().first().copied() {
            self.close_sender(i, "healing".into());
            self.close_receiver(i, None);
            self.conns.retain(|c| !c.gone());
        }
        self.p.replication.set_mode(Mode::Async);
        self.connect(None)?;
        for _ in 0..20_000 {
            let i = 0;
            if self.conns.is_empty() {
                // An end failed for a reason of its own (e.g. a resync
                // superseded): like the real sender, reconnect.
                self.connect(None)?;
            }
            let before = (self.conns[i].a2b.bytes.len(), self.conns[i].b2a.bytes.len(), self.dr().flush_target());
            self.deliver_a2b(i, usize::MAX);
            self.dr_sync()?;
            self.deliver_b2a(i, usize::MAX);
            let mut sent = 0;
            if self.conns[i].woken(self.now, self.p.last_seq()) {
                sent = self.poll(i, 64)?;
            }
            let moved = self.conns.get(i).is_some_and(|c| (c.a2b.bytes.len(), c.b2a.bytes.len(), self.dr().flush_target()) != before);
            self.conns.retain(|c| !c.gone());
            self.check(false).map_err(|e| format!("while converging: {e}"))?;
            let d = self.dr();
            if d.last_seq() == self.p.last_seq() && !self.p.in_dirty_mode("b") && self.conns.first().is_some_and(|c| c.a2b.bytes.is_empty()) {
                let k = dr_state(&d, true)?;
                if k == Some(self.writes) {
                    compare(&self.p, &d)?;
                    // The replay check compares outcomes, not only events.
                    let digest = contents(&d).iter().fold(0u32, |c, (n, b)| crate::crc::crc32c_append(crate::crc::crc32c_append(c, n.as_bytes()), b));
                    self.note(format!("converged at seq {}: {} maps, content crc {digest:08x}", d.last_seq(), d.maps().len()));
                    return Ok(());
                }
            }
            if sent == 0 && !moved {
                // Nothing moves: time passes until the sender's deadline.
                let until = self.conns.first().and_then(|c| c.idle).and_then(|(u, _, _)| u);
                self.now = until.unwrap_or(self.now + 5_000_000).max(self.now + 1);
            }
        }
        let d = self.dr();
        Err(format!("did not converge: DR seq {} shows writes 1..{:?}, primary seq {} has {} writes", d.last_seq(), dr_state(&d, false), self.p.last_seq(), self.writes))
    }

    fn finish(self) {
        drop(self.conns);
        self.p.abandon();
        self.host.group.lock().unwrap().abandon();
        crate::util::set_sim_clock(None);
    }
}

/// Runs schedule `seed`; returns its trace (for the replay check).
fn schedule(seed: u64, print: bool) -> Result<Vec<String>, String> {
    let mut w = World::new(seed, print)?;
    let steps = w.rng.random_range(200..800);
    let r = (|| {
        w.connect(None)?;
        for step in 0..steps {
            w.step = step;
            w.event().map_err(|e| format!("step {step}: {e}"))?;
            w.check(step % 16 == 0).map_err(|e| format!("step {step}: {e}"))?;
        }
        w.converge()
    })();
    let trace = std::mem::take(&mut w.trace);
    w.finish();
    r.map(|_| trace)
}

#[test]
fn deterministic_schedules_keep_order_and_converge() {
    let print = std::env::var("DSIM_TRACE").is_ok();
    if let Some(seed) = std::env::var("DSIM_SEED").ok().and_then(|s| s.parse::<u64>().ok()) {
        schedule(seed, print).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        return;
    }
    let n: u64 = std::env::var("DSIM_SCHEDULES").ok().and_then(|s| s.parse().ok()).unwrap_or(1000);
    let base: u64 = rand::random();
    let started = Instant::now();
    let mut events = 0;
    for i in 0..n {
        let seed = base.wrapping_add(i);
        match schedule(seed, print) {
            Ok(t) => events += t.len(),
            Err(e) => panic!("simulation failed with seed {seed} (replay: DSIM_SEED={seed} cargo test --release --lib dsim): {e}"),
        }
    }
    eprintln!("{n} schedules ({events} traced events) in {:?}", started.elapsed());
}

/// Seeds that once failed, each with what it found; replayed on every run
/// (a code change may alter the schedule a seed produces, so these are a
/// floor, not a proof).
#[test]
fn seeds_that_found_bugs_pass() {
    // A snapshot overwritten by `snapshot sync` during a resync attempt kept
    // the blocks the attempt had already staged for it.
    // (A list: the next seed that finds a bug goes here too.)
    let seeds: &[u64] = &[15275524333980183884];
    for &seed in seeds {
        schedule(seed, false).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    }
}

/// A seed replays exactly: the same events, in the same order, with the
/// same outcomes (what each end saw, what the DR held after each power cut).
#[test]
fn a_seed_replays_exactly() {
    let base: u64 = rand::random();
    for i in 0..5 {
        let seed = base.wrapping_add(i);
        let a = schedule(seed, false).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let b = schedule(seed, false).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert!(a.len() > 20, "seed {seed}: only {} events traced", a.len());
        if let Some(k) = (0..a.len().min(b.len())).find(|k| a[*k] != b[*k]) {
            panic!("seed {seed} diverged at event {k}: {:?} vs {:?}", a[k], b[k]);
        }
        assert_eq!(a.len(), b.len(), "seed {seed}");
    }
}
