//! Every bound in tidemark, in one place. Names carry their units.
//!
//! A limit that is not here is a bug: queues, buffers, batches and retry loops
//! all take their bound from this file so that reviewing resource use means
//! reading one page.

/// Size of one block of the block map. Writes that do not cover whole blocks
/// are widened by read-modify-write, so the map never holds partial blocks.
pub const BLOCK_BYTES: u64 = 4096;
/// Largest NBD request payload (read or write) the server accepts.
pub const NBD_REQUEST_BYTES_MAX: u32 = 32 * 1024 * 1024;
/// Largest payload of a write record: the largest NBD write, starting and
/// ending inside blocks, widens to whole blocks, one more than it spans.
pub const WRITE_RECORD_BYTES_MAX: u64 = NBD_REQUEST_BYTES_MAX as u64 + BLOCK_BYTES;
/// Largest option payload accepted during the NBD handshake.
pub const NBD_OPTION_BYTES_MAX: u32 = 64 * 1024;
/// Option bytes the server is willing to read and discard before giving up on
/// a client that announced a too-large option.
pub const NBD_OPTION_DISCARD_BYTES_MAX: u32 = 1024 * 1024;
/// Number of options a client may send before transmission (guards against a
/// client that loops forever in the handshake).
pub const NBD_OPTIONS_PER_CONNECTION_MAX: u32 = 1024;
/// Requests one connection may have in flight; further requests wait to be read.
pub const NBD_INFLIGHT_PER_CONNECTION_MAX: usize = 128;
/// Bytes of write payload one connection may have in flight.
pub const NBD_INFLIGHT_BYTES_PER_CONNECTION_MAX: usize = 128 * 1024 * 1024;
/// Concurrent NBD connections per site.
pub const NBD_CONNECTIONS_MAX: usize = 256;
/// NBD: time from accept to the end of option haggling; a connection that
/// has not chosen an export by then is closed (probes, half-open sockets
/// would otherwise hold a connection slot for good).
pub const NBD_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// How long an NBD request waits for its group's lock on a runtime worker
/// before it goes to the blocking pool to wait there (`Group::write_as(Wait::Briefly, …)`).
/// A writer holds the lock for an append, normally microseconds; one that
/// holds it this long is held up (a full page cache being written back, a
/// long snapshot operation, or a stalled disk), and the workers that every
/// other group's requests need must not wait with it.
pub const NBD_LOCK_WAIT_US: u64 = 1_000;
/// How often the site looks for a runtime worker stuck in an append (or a
/// log read), and how long one must have been, before it wakes another
/// worker to keep the sockets read (`Site::start_runtime_kicker`).
pub const NBD_KICK_MS: u64 = 10;
/// NBD calls of one group that wait on the blocking pool at once (the pool
/// has 512 threads; `nbd::server::off_worker`).
pub const NBD_POOL_CALLS_PER_GROUP: usize = 16;
/// NBD: TCP keepalive on client connections (idle seconds before the first
/// probe, seconds between probes, probes): a client that vanished without
/// a FIN (a crashed hypervisor host) gives its slot back after ~2 minutes.
pub const NBD_KEEPALIVE: (u32, u32, u32) = (60, 10, 6);
/// Descriptors in one BLOCK_STATUS reply.
pub const NBD_BLOCK_STATUS_EXTENTS_MAX: usize = 4096;
/// Longest export name (the protocol's own limit on strings).
pub const NBD_NAME_BYTES_MAX: usize = 4096;

/// Size of one log segment file (records never span segments).
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Log bytes written between metadata checkpoints; bounds replay after a crash.
pub const CHECKPOINT_INTERVAL_BYTES: u64 = 128 * 1024 * 1024;
/// Fixed reserve of log space on top of live data that GC does not try to
/// reclaim: the open segment plus everything after the last checkpoint.
pub const LOG_RESERVE_BYTES: u64 = SEGMENT_BYTES + CHECKPOINT_INTERVAL_BYTES + SEGMENT_BYTES;
/// GC keeps total log bytes at or below live bytes times this ratio (plus the reserve).
pub const GC_SPACE_RATIO: f64 = 1.25;
/// A sealed segment is worth cleaning only if at most this share of it is live.
pub const GC_LIVE_RATIO_MAX: f64 = 0.85;
/// Bytes GC relocates under one hold of the group lock (bounds write stalls).
pub const GC_BATCH_BYTES: u64 = 256 * 1024;
/// How often the maintenance thread looks at checkpoint and GC needs.
pub const MAINTENANCE_INTERVAL_MS: u64 = 50;
/// Largest checkpoint file accepted when opening a group (guards against a
/// corrupted length field driving an enormous allocation).
pub const CHECKPOINT_BYTES_MAX: u64 = 16 * 1024 * 1024 * 1024;
/// Largest volume size.
pub const VOLUME_BYTES_MAX: u64 = 64 * 1024 * 1024 * 1024 * 1024;
/// Longest volume or group name.
pub const NAME_BYTES_MAX: usize = 128;

/// Replication: bytes of records in one RECORDS frame.
pub const REPL_BATCH_BYTES: u64 = 4 * 1024 * 1024;
/// Replication: the largest frame buffer a sender or a DR connection keeps
/// for the next frame. A batch holding one big record (up to 32 MiB) is
/// built in a buffer of its own, given back to the allocator after it.
pub const REPL_BUF_KEEP_BYTES: usize = 2 * REPL_BATCH_BYTES as usize + 64 * 1024;
/// The sender writes a batch read in place from the log in parts of at
/// most this, each faulted in just before it is written
/// (`session::Out::part`): a page reclaimed after that and then unreadable
/// would raise SIGBUS, so the window stays the time one part takes to go.
pub const REPL_WRITE_PART_BYTES: usize = 256 * 1024;
/// Replication: bytes sent to a DR site and not yet acknowledged.
pub const REPL_WINDOW_BYTES: u64 = 64 * 1024 * 1024;
/// Replication: a DR site reads its connection's socket up to this much at a
/// time (rustls on its own reads at most 4 KiB per call: 256 `recv`s per
/// MiB), starting from `REPL_READ_AHEAD_START_BYTES` (a handshake is small).
pub const REPL_READ_AHEAD_BYTES: usize = 256 * 1024;
pub const REPL_READ_AHEAD_START_BYTES: usize = 16 * 1024;
/// Replication: longest a DR site goes, while bytes arrive over a slow link,
/// without repeating its newest ACK (a primary's link timeout may be much
/// shorter than the DR's, and the DR cannot know it).
pub const REPL_ACK_REPEAT_MS_MAX: u64 = 100;
/// Replication: acknowledgements queued at a DR site before reading pauses.
pub const REPL_ACK_QUEUE_MAX: usize = 64;
/// Replication: authenticated connections a DR site serves at once (each
/// has a thread). Handshakes have threads of their own, counted apart
/// (at most twice `REPL_PREAUTH_HANDSHAKES_MAX`).
pub const REPL_RECV_CONNECTIONS_MAX: usize = 256;
/// Replication: connections from one source address a DR site lets wait for
/// their TLS handshake and certificate check at once; more are closed at
/// accept. Without it anyone who can reach the port could hold every
/// connection slot with idle sockets and lock the primaries out. Room for a
/// primary reconnecting many groups at once (one connection each), or for
/// several primaries behind one NAT address.
pub const REPL_PREAUTH_PER_SOURCE_MAX: usize = 32;
/// Replication: connections a DR site lets wait for their first bytes (no
/// thread yet); a new one displaces the oldest. At most an eighth of the
/// site's limit on open files.
pub const REPL_PREAUTH_WAITING_MAX: usize = 1024;
/// Replication: connections a DR site lets be in a TLS handshake at once
/// (each has a thread, and four file descriptors with its runtime's); a new
/// one displaces the oldest. At most a 32nd of the limit on open files.
pub const REPL_PREAUTH_HANDSHAKES_MAX: usize = 128;
/// Replication: time from accept to an authenticated peer.
pub const REPL_HANDSHAKE_TIMEOUT_MS: u64 = 10_000;
/// How long a DR site waits for a group's lock to answer a primary's HELLO
/// before it refuses the link, saying that the group's storage is stalled.
pub const REPL_HELLO_GROUP_WAIT_MS: u64 = 2_000;
/// Replication: longest wait between reconnection attempts.
pub const REPL_RECONNECT_BACKOFF_MAX_MS: u64 = 2_000;
/// Replication: how long a DR site may stay out of reach (never connected,
/// or since the link was lost) before the primary warns of it, and then
/// once a minute.
pub const REPL_UNREACHABLE_WARN_MS: u64 = 10_000;
/// Default log cap per group: beyond it a lagging DR site's pin gives way to
/// dirty-region tracking (R3).
pub const REPL_LOG_CAP_BYTES_DEFAULT: u64 = 64 * 1024 * 1024 * 1024;
/// Blocks taken from a dirty set per resync batch.
pub const RESYNC_BATCH_BLOCKS: u64 = 1024;
/// Default time a sync write waits for a DR site before the loss policy applies.
pub const SYNC_TIMEOUT_MS_DEFAULT: u64 = 5_000;
/// Default interval of heartbeats in the replication stream.
pub const HEARTBEAT_INTERVAL_MS_DEFAULT: u64 = 1_000;
/// Shortest heartbeat interval a DR site's named link timeout can ask a
/// primary for (HELLO_REPLY `link_timeout_ms` / 4): a peer's value, bounded.
pub const HEARTBEAT_INTERVAL_MS_MIN: u64 = 10;
/// Default silence after which a replication link is declared dead: no
/// frame from the DR site at the primary (which expects an answer to every
/// heartbeat), no byte from the primary at the DR site (ARCHITECTURE.md
/// "Silent links are dead links").
pub const LINK_TIMEOUT_MS_DEFAULT: u64 = 30_000;
/// Longest `link_timeout_ms` accepted (a day).
pub const LINK_TIMEOUT_MS_MAX: u64 = 86_400_000;
/// Nice value of an async or periodic group's sender threads (sync senders
/// keep the site's own): shipping is deferred work there, and under CPU saturation the
/// application's I/O goes first (ARCHITECTURE.md "Replication priority").
pub const SENDER_NICE_DEFAULT: i32 = 10;
/// Nice value of the thread a DR site takes an async or periodic group's
/// records in on (a sync group's keeps the site's own), for the same reason
/// (ARCHITECTURE.md "Replication priority").
pub const RECEIVER_NICE_DEFAULT: i32 = 10;
/// Default shipping interval of periodic mode.
pub const PERIODIC_INTERVAL_S_DEFAULT: u64 = 10;
/// Longest shipping interval of periodic mode (a day): longer is a DR copy
/// no one should rely on, and far longer overflowed the sender's clock.
pub const PERIODIC_INTERVAL_S_MAX: u64 = 86_400;

/// HTTP API request body limit.
pub const API_BODY_BYTES_MAX: usize = 64 * 1024;
/// Concurrent admin API connections per site (`up`'s polls and an
/// operator's commands use one each, briefly). One more displaces the
/// longest idle one, or is closed at accept if every one is answering a
/// request (`site::apiconn`).
pub const API_CONNECTIONS_MAX: usize = 64;
/// An API connection with no answer written and no request being answered
/// for this long since its accept or last answer is closed (half a header,
/// an idle keep-alive).
pub const API_IDLE_TIMEOUT_MS: u64 = 30_000;
/// How long status and metrics wait for a group's lock before they report
/// the group from what they can read without it (a writer holds the lock
/// through its append, so a stalled disk holds it as long as the stall;
/// ARCHITECTURE.md "A stalled disk is reported, not silent").
pub const STATUS_GROUP_WAIT_MS: u64 = 1_000;
/// Longest a status or metrics request takes: past it, the answer is built
/// from what needs no lock at all.
pub const STATUS_TIME_LIMIT_MS: u64 = 4_000;
/// A storage operation in progress for this long shows in status
/// (`storage_stall`, with `stalled: false` until `STORAGE_STALL_MS`).
pub const STORAGE_SLOW_MS: u64 = 1_000;
/// A storage operation in progress for this long is a stalled disk: logged
/// at WARN (then once a minute until it returns) and a `storage-stalled`
/// event of `up --json`.
pub const STORAGE_STALL_MS: u64 = 10_000;
/// How long `up` waits for a site to start serving before giving up.
pub const SITE_START_TIMEOUT_MS: u64 = 60_000;
/// How long `up` waits for sites to stop after SIGTERM before SIGKILL.
pub const SITE_STOP_TIMEOUT_MS: u64 = 30_000;
/// Restarts of a crashed site by `up` within one minute before it gives up.
pub const SITE_RESTARTS_PER_MINUTE_MAX: u32 = 5;
/// How long `up` pauses a site's restarts once it has crashed
/// `SITE_RESTARTS_PER_MINUTE_MAX` times within a minute.
pub const SITE_RESTART_PAUSE_S: u64 = 300;
/// Texts `up` holds for its stdout (events) and for its stderr (the sites'
/// warnings) while nobody reads them; past that they are dropped and
/// counted (`outlet`), never waited for.
pub const UP_OUTPUT_QUEUE_MAX: usize = 4096;

const _: () = assert!(STATUS_GROUP_WAIT_MS < STATUS_TIME_LIMIT_MS && STORAGE_SLOW_MS < STORAGE_STALL_MS);
const _: () = assert!(BLOCK_BYTES.is_power_of_two());
const _: () = assert!((NBD_REQUEST_BYTES_MAX as u64).is_multiple_of(BLOCK_BYTES));
// A maximal write record (header + one CRC per block + payload) fits a segment.
const _: () = assert!(64 + WRITE_RECORD_BYTES_MAX * 1025 / 1024 + 64 <= SEGMENT_BYTES);
const _: () = assert!(SEGMENT_BYTES < u32::MAX as u64);
// A batch, or one maximal record (which may exceed a batch alone), fits a frame.
const _: () = assert!(REPL_BATCH_BYTES <= 40 * 1024 * 1024);
const _: () = assert!(64 + WRITE_RECORD_BYTES_MAX * 1025 / 1024 <= 40 * 1024 * 1024);

/// Consistency groups a site creates (each runs a log sync thread, a
/// maintenance thread and, on a primary, a sender per DR site): a `POST
/// /volumes` or a primary's HELLO naming ever new groups must not take
/// every thread and file the system has. Groups already on disk at start
/// are opened whatever their number.
pub const GROUPS_PER_SITE_MAX: usize = 256;
/// Volumes plus snapshots in one consistency group. Every map is walked by
/// GC accounting and checkpoints, so the count is bounded.
pub const MAPS_PER_GROUP_MAX: usize = 4096;
