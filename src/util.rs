//! Small helpers shared by the CLI, config and API: size parsing, names, time.

use std::time::{SystemTime, UNIX_EPOCH};

/// Parses a size such as `1GiB`, `512M`, `4096`, `10k` (K M G T and KiB MiB
/// GiB TiB, all powers of 1024; a plain number is bytes).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty size".into());
    }
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!("size {s:?} does not start with a number"));
    }
    let n: u64 = num.parse().map_err(|_| format!("size {s:?}: number too large"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" | "b" => 1,
        "K" | "k" | "KiB" | "KB" | "kiB" | "kB" => 1 << 10,
        "M" | "m" | "MiB" | "MB" => 1 << 20,
        "G" | "g" | "GiB" | "GB" => 1 << 30,
        "T" | "t" | "TiB" | "TB" => 1 << 40,
        other => return Err(format!("size {s:?}: unknown unit {other:?} (use K, M, G, T or KiB, MiB, GiB, TiB)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("size {s:?} is too large"))
}

/// Checks a volume size: whole 4 KiB blocks, at least one, at most
/// `VOLUME_BYTES_MAX`.
pub fn check_volume_size(size: u64) -> Result<(), String> {
    use crate::limits::{BLOCK_BYTES, VOLUME_BYTES_MAX};
    if size == 0 || !size.is_multiple_of(BLOCK_BYTES) {
        return Err(format!("size {size} must be a positive multiple of {BLOCK_BYTES} bytes"));
    }
    if size > VOLUME_BYTES_MAX {
        return Err(format!("size {size} exceeds the largest volume size {VOLUME_BYTES_MAX}"));
    }
    Ok(())
}

/// Checks a volume or group name: 1..=128 bytes of `[A-Za-z0-9_.-]`, not
/// starting with `.` or `-`, and without `@` (reserved for snapshot exports).
pub fn check_name(kind: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > crate::limits::NAME_BYTES_MAX {
        return Err(format!("{kind} name {name:?} must be 1 to {} bytes", crate::limits::NAME_BYTES_MAX));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(format!("{kind} name {name:?} must not start with '.' or '-'"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-' || *c == '.')) {
        return Err(format!("{kind} name {name:?} contains {c:?}; use letters, digits, '_', '-' and '.'"));
    }
    Ok(())
}

/// `2026-11-22T03:00:00.123Z` for nanoseconds since the Unix epoch (UTC).
pub fn rfc3339(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let ms = (ns / 1_000_000) % 1000;
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil from days (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    #[cfg(test)]
    if let Some(t) = SIM_WALL_NS.with(|c| c.get()) {
        return t;
    }
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
}

#[cfg(test)]
thread_local! {
    static SIM_WALL_NS: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// Deterministic simulations set the wall clock of their thread (record
/// timestamps, heartbeats), so that a seed replays byte for byte.
#[cfg(test)]
pub fn set_sim_clock(ns: Option<u64>) {
    SIM_WALL_NS.with(|c| c.set(ns));
}

/// Is a deterministic simulation running on this thread? (Groups opened
/// there start no background threads: nothing happens that it did not choose.)
#[cfg(test)]
pub fn sim_active() -> bool {
    SIM_WALL_NS.with(|c| c.get().is_some())
}

/// One unit of a shared count (running threads, open connections): counted
/// from `enter` until dropped, however its holder ends.
pub struct Counted(std::sync::Arc<std::sync::atomic::AtomicUsize>);

impl Counted {
    pub fn enter(count: &std::sync::Arc<std::sync::atomic::AtomicUsize>) -> Counted {
        count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Counted(count.clone())
    }

    /// `enter`, unless that would make more than `max`.
    pub fn try_enter(count: &std::sync::Arc<std::sync::atomic::AtomicUsize>, max: usize) -> Option<Counted> {
        use std::sync::atomic::Ordering::{AcqRel, Acquire};
        count.fetch_update(AcqRel, Acquire, |n| (n < max).then_some(n + 1)).ok()?;
        Some(Counted(count.clone()))
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// At most one log line per `every` for one kind of recurring trouble (a
/// flood of refused connections, a listener out of file descriptors); each
/// line says how many went unlogged since the one before.
pub struct LogThrottle {
    every: std::time::Duration,
    last: Option<std::time::Instant>,
    unlogged: u64,
}

impl LogThrottle {
    pub fn new(every: std::time::Duration) -> LogThrottle {
        LogThrottle { every, last: None, unlogged: 0 }
    }

    /// Nothing logged within the last period: forgetting it loses at most
    /// the count of lines left out since (which callers also count elsewhere).
    pub fn idle(&self) -> bool {
        self.last.is_none_or(|t| t.elapsed() >= self.every)
    }

    /// `Some(n)` if a line may be logged now (`n` went unlogged before
    /// it), `None` if this one is only counted.
    pub fn admit(&mut self) -> Option<u64> {
        if self.last.is_some_and(|t| t.elapsed() < self.every) {
            self.unlogged += 1;
            return None;
        }
        self.last = Some(std::time::Instant::now());
        Some(std::mem::take(&mut self.unlogged))
    }
}

/// Lines that may repeat every few seconds while a condition lasts (a
/// DR out of space refusing each reconnect): each text is logged once a
/// minute, a new one at once. Up to `REPEAT_LOG_TEXTS` texts are
/// remembered (two groups refused in turn are each throttled); past that
/// the one unseen longest is forgotten.
pub struct RepeatLog {
    /// Most recently seen last.
    seen: std::sync::Mutex<Vec<(String, LogThrottle)>>,
}

const REPEAT_LOG_TEXTS: usize = 64;

impl RepeatLog {
    pub const fn new() -> RepeatLog {
        RepeatLog { seen: std::sync::Mutex::new(Vec::new()) }
    }

    /// As `LogThrottle::admit`, per text.
    pub fn admit(&self, text: &str) -> Option<u64> {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let mut entry = match seen.iter().position(|e| e.0 == text) {
            Some(i) => seen.remove(i),
            None => {
                if seen.len() >= REPEAT_LOG_TEXTS {
                    seen.remove(0);
                }
                (text.to_string(), LogThrottle::new(std::time::Duration::from_secs(60)))
            }
        };
        let n = entry.1.admit();
        seen.push(entry);
        n
    }
}

impl Default for RepeatLog {
    fn default() -> RepeatLog {
        RepeatLog::new()
    }
}

/// " (N more, unlogged, since the last such line)" or nothing.
pub fn unlogged_note(n: u64) -> String {
    match n {
        0 => String::new(),
        n => format!(" ({n} more, unlogged, since the last such line)"),
    }
}

/// The next connection on `listener`. Errors that concern one connection
/// (it was reset before we took it) are skipped; any other (out of file
/// descriptors, of memory) is logged, at most every 10 s, and waited out
/// with a short pause: a listener that gave up on them would take the
/// site down for a passing shortage (`what` names the listener).
pub async fn accept(listener: &tokio::net::TcpListener, what: &str, trouble: &mut LogThrottle) -> (tokio::net::TcpStream, std::net::SocketAddr) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset, Interrupted};
    // accept(2) also passes on network errors pending on the new
    // connection (see its manual): about that connection, not the listener.
    // (Not EPERM: a security module refusing accept itself leaves the
    // connection queued, and retrying at once would spin.)
    const ITS_OWN: [i32; 8] = [libc::EPROTO, libc::ENOPROTOOPT, libc::EHOSTDOWN, libc::ENONET, libc::EHOSTUNREACH, libc::EOPNOTSUPP, libc::ENETUNREACH, libc::ENETDOWN];
    let mut pause = std::time::Duration::from_millis(10);
    loop {
        match listener.accept().await {
            Ok(c) => return c,
            Err(e) if matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset | Interrupted) => continue,
            Err(e) if e.raw_os_error().is_some_and(|c| ITS_OWN.contains(&c)) => continue,
            Err(e) => {
                if let Some(n) = trouble.admit() {
                    tracing::warn!("{what}: cannot accept connections: {e}; retrying{}", unlogged_note(n));
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(std::time::Duration::from_millis(500));
            }
        }
    }
}

/// This process's limits on open files.
fn open_files_rlimit() -> std::io::Result<libc::rlimit> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit on this process with a valid struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r)
}

/// This process's (soft) limit on open files; `u64::MAX` if unknown.
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 here, not everywhere
pub fn open_files_limit() -> u64 {
    open_files_rlimit().map_or(u64::MAX, |r| r.rlim_cur as u64)
}

/// Raises this process's soft limit on open files to its hard limit (as
/// far as the kernel allows): a site holds a file per log segment and a
/// socket per connection, and the usual soft limit of 1024 is a shortage
/// waiting to happen. Returns (before, after).
#[allow(clippy::unnecessary_cast)] // rlim_t is u64 here, not everywhere
pub fn raise_open_files_limit() -> std::io::Result<(u64, u64)> {
    let mut r = open_files_rlimit()?;
    let before = r.rlim_cur as u64;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open").ok().and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(1 << 20);
    let want = (r.rlim_max as u64).min(nr_open);
    if want <= before {
        return Ok((before, before));
    }
    r.rlim_cur = want as libc::rlim_t;
    // SAFETY: setrlimit on this process with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((before, want))
}

/// A pipe, both ends close-on-exec: (read end, write end).
pub fn pipe() -> std::io::Result<(std::fs::File, std::fs::File)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two new descriptors on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both were just created and are owned by the caller alone.
    Ok(unsafe { (std::fs::File::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) })
}

/// The file system is full (or the quota used up): an error that passes
/// once space is freed or added, unlike an I/O error.
pub fn is_no_space(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
}

/// Bytes this process may still write on the file system of `path` (as
/// root, the blocks reserved for root count too: ext4 refuses root's
/// writes only once those are gone).
pub fn free_bytes(path: &std::path::Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs fills the struct for a valid NUL-terminated path.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: geteuid has no preconditions.
    let blocks = if unsafe { libc::geteuid() } == 0 { st.f_bfree } else { st.f_bavail };
    Ok((blocks as u64).saturating_mul(st.f_frsize as u64))
}

/// In a site process, a panic in any thread (a task's included) stops the
/// whole process at once, after an ERROR line naming the thread and where.
/// A panic means an invariant did not hold. Going on would leave a thread
/// dead in silence (a sender whose replica still reads "replicating", a
/// sync thread whose writers wait forever) and let other threads carry on
/// from state it may have half updated (locks here shrug off poisoning).
/// What was acknowledged is durable in the log, and a restart replays it
/// (`up` restarts a site that exits), which is the path the kill -9 tests
/// exercise. ARCHITECTURE.md "A panic stops the site".
pub fn stop_process_on_panic() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // Rust's own message first (plain stderr): out even if logging is
        // what panicked.
        default(info);
        let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
        let place = info.location().map_or_else(|| "an unknown place".to_string(), |l| format!("{}:{}", l.file(), l.line()));
        let payload = info.payload();
        let msg = payload.downcast_ref::<&str>().copied().or_else(|| payload.downcast_ref::<String>().map(String::as_str)).unwrap_or("(no message)");
        // One line, so that `up` echoes all of it (it echoes lines).
        let msg = msg.replace('\n', " / ");
        tracing::error!(
            event = "panic",
            "thread {thread} panicked at {place}: {msg}; this site stops now: an invariant did not hold, and going on could act on half-updated state (what was acknowledged is in the log; a restart replays it)"
        );
        std::process::abort();
    }));
}

/// Turns on TCP keepalive on `sock`: `(idle, interval, probes)` in seconds
/// and probes, so that a peer gone without a FIN is noticed.
pub fn set_keepalive(sock: &impl std::os::fd::AsRawFd, (idle, interval, probes): (u32, u32, u32)) -> std::io::Result<()> {
    let fd = sock.as_raw_fd();
    let set = |level: libc::c_int, name: libc::c_int, v: libc::c_int| -> std::io::Result<()> {
        // SAFETY: setsockopt on a socket we own, with a c_int option value.
        let r = unsafe { libc::setsockopt(fd, level, name, (&v as *const libc::c_int).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t) };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    set(libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, idle as libc::c_int)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL, interval as libc::c_int)?;
    set(libc::IPPROTO_TCP, libc::TCP_KEEPCNT, probes as libc::c_int)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeated_texts_are_each_said_once_a_minute() {
        let r = RepeatLog::new();
        assert_eq!(r.admit("group g1 is out of space"), Some(0));
        assert_eq!(r.admit("group g2 is out of space"), Some(0));
        for _ in 0..5 {
            assert_eq!(r.admit("group g1 is out of space"), None);
            assert_eq!(r.admit("group g2 is out of space"), None);
        }
        assert_eq!(r.admit("something else"), Some(0));
        // More texts than it remembers: none is lost track of wrongly (a
        // forgotten text is simply said again).
        for i in 0..200 {
            assert_eq!(r.admit(&format!("text {i}")), Some(0));
        }
    }

    /// A panic in some thread of a process that called
    /// `stop_process_on_panic` ends the process (SIGABRT) with an ERROR line
    /// naming the thread: run in a child process (this test binary again,
    /// this test only, with `TIDEMARK_PANIC_CHILD` set).
    #[test]
    fn a_panic_in_any_thread_stops_the_process_loudly() {
        if std::env::var_os("TIDEMARK_PANIC_CHILD").is_some() {
            tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(false).init();
            stop_process_on_panic();
            let t = std::thread::Builder::new().name("worker-x".into()).spawn(|| {
                let v: Vec<u32> = Vec::new();
                v[std::hint::black_box(3)]
            });
            let _ = t.unwrap().join();
            // Only reached if the panic did not stop the process.
            std::process::exit(0);
        }
        let o = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "util::tests::a_panic_in_any_thread_stops_the_process_loudly", "--nocapture", "--test-threads=1"])
            .env("TIDEMARK_PANIC_CHILD", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(o.status.signal(), Some(libc::SIGABRT), "{}: {err}", o.status);
        // All of it on the one ERROR line (what `up` echoes).
        let line = err.lines().find(|l| l.contains(" ERROR ")).unwrap_or_else(|| panic!("no ERROR line: {err}"));
        assert!(line.contains("thread worker-x panicked at src/util.rs:") && line.contains("index out of bounds") && line.contains("this site stops now"), "{line}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("2TiB").unwrap(), 2 << 40);
        assert_eq!(parse_size("8k").unwrap(), 8192);
        assert!(parse_size("").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("1X").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn rfc3339_dates() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(1_795_316_400_123_000_000), "2026-11-22T03:00:00.123Z");
        assert_eq!(super::rfc3339(951_782_400_000_000_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn names() {
        assert!(check_name("volume", "vol0").is_ok());
        assert!(check_name("volume", "").is_err());
        assert!(check_name("volume", "a@b").is_err());
        assert!(check_name("volume", "a/b").is_err());
        assert!(check_name("volume", "-x").is_err());
        assert!(check_name("volume", &"x".repeat(200)).is_err());
    }
}
