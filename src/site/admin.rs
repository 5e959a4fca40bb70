//! Who may change a site through its admin API (R25: "each site has its own
//! admin credentials"; ARCHITECTURE.md "Each site has its own admin
//! credentials").
//!
//! Reads (every GET: status, metrics, listings) are open to whoever can
//! reach the API. A change (any other method) is accepted from:
//!
//! * a client that sends this site's own admin token,
//!   `Authorization: Bearer <token>`. The token is 32 random bytes in hex,
//!   created at the site's first start in `<data_dir>/admin.token` (mode
//!   0600) and never sent anywhere by the site. Another site's token,
//!   another deployment's, or a wrong one is refused, even from a local
//!   administrator: credentials that are sent must be right;
//! * or, with no token sent, a client on this host's loopback whose socket
//!   belongs to the user the site runs as, or to root (who can read the
//!   token file anyway). This is PostgreSQL's `peer` authentication for
//!   TCP on loopback: the owner of a connection's socket is looked up in
//!   `/proc/net/tcp{,6}`.
//!
//! So an operator on the site's host needs nothing more than the contract's
//! CLI, a program of another local user cannot change the site, and from
//! another host (when `api_listen` is not loopback) only the holder of this
//! site's token can. A compromised primary holds its own token and TLS key,
//! never a DR site's token: it cannot delete the DR site's snapshots or
//! volumes through the DR site's API, and the replication link accepts only
//! the protocol (with the DR site's own `protect_snapshots` policy on top).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// The token file's name in a site's data directory.
pub const TOKEN_FILE: &str = "admin.token";
/// Random bytes in a token (hex-encoded in the file and on the wire).
const TOKEN_BYTES: usize = 32;

/// This site's admin credentials.
pub struct AdminAuth {
    /// Lower-case hex, `2 * TOKEN_BYTES` characters.
    token: String,
    /// Where the token is (named in refusals to local clients, so an
    /// operator knows where to look on the site's host).
    pub file: PathBuf,
    /// The user the site runs as.
    uid: u32,
    /// Whether a loopback client of the site's user or root needs no token
    /// (`admin_peer_auth` in site.toml, default true).
    peer_auth: bool,
}

/// Who a change was accepted from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admin {
    /// Sent this site's token.
    Token,
    /// A loopback client owned by this uid (the site's user, or root).
    LocalUser(u32),
}

/// What `AdminAuth::admit` knows of a request.
pub struct Asking<'a> {
    /// The `Authorization` header.
    pub authorization: Option<&'a [u8]>,
    /// The `Host` header.
    pub host: Option<&'a [u8]>,
    /// Whether an `Origin` or `Sec-Fetch-*` header came (a browser's request).
    pub origin: bool,
    /// The client's address.
    pub peer: SocketAddr,
    /// The address it reached (the API's side of the connection).
    pub local: SocketAddr,
}

/// Why a change was refused: the text for the client, and what kind of
/// refusal it is (with the client's address, what a log line is kept
/// from repeating by).
#[derive(Debug, PartialEq, Eq)]
pub struct Refusal {
    pub reason: String,
    pub kind: &'static str,
}

fn refusal(kind: &'static str, reason: String) -> Refusal {
    Refusal { reason, kind }
}

impl AdminAuth {
    /// Reads `<data_dir>/admin.token`, creating it on the first start. A
    /// token file that is a symbolic link, not the site user's, or
    /// readable by others is refused: it is no secret then, or not ours.
    pub fn load_or_create(data_dir: &Path, peer_auth: bool) -> Result<AdminAuth> {
        let file = data_dir.join(TOKEN_FILE);
        let file = if file.is_absolute() { file } else { std::env::current_dir().map(|d| d.join(&file)).unwrap_or(file) };
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        let token = match read_private(&file, uid) {
            Ok(raw) => parse_token(&raw).with_context(|| format!("{} is not a tidemark admin token: {} hex digits and a newline expected (delete it to have a new one made at the next start)", file.display(), 2 * TOKEN_BYTES))?,
            Err(e) if e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::NotFound) => {
                let mut raw = [0u8; TOKEN_BYTES];
                rustls::crypto::aws_lc_rs::default_provider()
                    .secure_random
                    .fill(&mut raw)
                    .map_err(|e| anyhow::anyhow!("no random bytes for the admin token: {e:?}"))?;
                let token = hex(&raw);
                crate::crashsafe::write_file_mode(&file, format!("{token}\n").as_bytes(), 0o600)?;
                tracing::info!("created this site's admin token in {}", file.display());
                token
            }
            Err(e) => return Err(e.context(format!("cannot use {} as this site's admin token", file.display()))),
        };
        Ok(AdminAuth { token, file, uid, peer_auth })
    }

    /// Whether a change may be made; the error says why not, for the client.
    pub fn admit(&self, site: &str, q: &Asking<'_>) -> Result<Admin, Refusal> {
        if let Some(h) = q.authorization {
            let text = std::str::from_utf8(h).unwrap_or_default();
            let sent = text.split_once(' ').filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")).map(|(_, t)| t.trim());
            return match sent {
                Some(t) if same(t.as_bytes(), self.token.as_bytes()) => Ok(Admin::Token),
                Some(_) => Err(refusal("wrong token", format!("the admin token sent is not site {site}'s (each site has its own, in {TOKEN_FILE} in the site's data directory on its host)"))),
                None => Err(refusal("bad header", "the Authorization header must be \"Bearer <token>\"".into())),
            };
        }
        let needs = format!("changing site {site} needs its admin token (`--token-file FILE`; {TOKEN_FILE} in the site's data directory on its host)");
        if !q.peer.ip().to_canonical().is_loopback() {
            return Err(refusal("remote, no token", needs));
        }
        // From here on the client is on this host: it may be told where.
        let user = if self.uid == 0 { "root".to_string() } else { format!("its user (uid {}) or root", self.uid) };
        let here = format!("changing site {site} needs its admin token (`--token-file {}`), or to run on the site's host as {user}", self.file.display());
        if !self.peer_auth {
            return Err(refusal("no token", format!("changing site {site} needs its admin token (`--token-file {}`): admin_peer_auth is off", self.file.display())));
        }
        // A browser on this host can be made to send requests to loopback
        // (a page, or DNS rebinding): those carry an Origin, or a Host that
        // is a name, never what a local command line sends.
        if q.origin {
            return Err(refusal("browser", format!("{here}; a request with an Origin header (from a web page) always does")));
        }
        if !q.host.is_some_and(host_is_local_literal) {
            return Err(refusal("host name", format!("{here}; a request whose Host is not an IP address or localhost always does")));
        }
        match loopback_owner(q.peer, q.local) {
            Some(uid) if uid == self.uid || uid == 0 => Ok(Admin::LocalUser(uid)),
            Some(uid) => Err(refusal("other user", format!("{here}; local user {uid} is neither"))),
            None => Err(refusal("owner unknown", format!("{here}; the owner of the connection was not found (it must be open, not closing)"))),
        }
    }
}

/// Reads `path` if it is a regular file (not a symbolic link) owned by
/// `uid` that nobody else may read or write.
fn read_private(path: &Path, uid: u32) -> Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let mut f = std::fs::File::options().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)?; // not a link; a FIFO planted there cannot hold the start
    let m = f.metadata()?;
    if !m.is_file() {
        bail!("not a regular file");
    }
    if m.uid() != uid {
        bail!("it belongs to uid {}, not to the site's user (uid {uid})", m.uid());
    }
    if m.mode() & 0o077 != 0 {
        bail!("others may read or change it (mode {:o}; `chmod 600` it, or delete it to have a new one made, if it may have been read)", m.mode() & 0o777);
    }
    let mut raw = Vec::new();
    f.by_ref().take(4096).read_to_end(&mut raw)?;
    Ok(raw)
}

/// `127.0.0.1:10819`, `[::1]:10819`, `localhost:10819` (port optional):
/// what a command line on this host sends as `Host`.
fn host_is_local_literal(h: &[u8]) -> bool {
    let Ok(h) = std::str::from_utf8(h) else { return false };
    let host = match h.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, port)) if port.is_empty() || port.strip_prefix(':').is_some_and(|p| p.parse::<u16>().is_ok()) => return ip.parse::<std::net::Ipv6Addr>().is_ok(),
            _ => return false,
        },
        None => match h.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => host,
            Some(_) => return false,
            None => h,
        },
    };
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::Ipv4Addr>().is_ok()
}

/// A token read from its file: the hex digits, then optional white space.
pub fn parse_token(raw: &[u8]) -> Result<String> {
    let text = std::str::from_utf8(raw).context("not UTF-8")?.trim_end();
    if text.len() != 2 * TOKEN_BYTES {
        bail!("{} characters", text.len());
    }
    if !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("not hex");
    }
    Ok(text.to_ascii_lowercase())
}

fn hex(raw: &[u8]) -> String {
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal, taking the same time wherever the first difference is (a token
/// is not guessed a byte at a time from response times).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// The uid owning the client end of the TCP connection `peer` → `local`,
/// from this network namespace's `/proc/net/tcp` and `/proc/net/tcp6`.
fn loopback_owner(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|t| std::fs::read_to_string(t).ok().and_then(|text| owner_in_table(&text, peer, local)))
}

/// In a `/proc/net/tcp{,6}` table, the uid of the socket whose own address
/// is `peer` and whose remote address is `local` (the client's end: the
/// server's end of the same connection is the other way round).
fn owner_in_table(text: &str, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    // Only an open connection held by a process tells its owner: the
    // kernel shows uid 0 for a socket no process holds any more (closed,
    // FIN_WAIT, TIME_WAIT; inode 0), and a client must not pass for root
    // by sending a request and closing at once.
    const ESTABLISHED: &str = "01";
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 || f[3] != ESTABLISHED || f[9] == "0" {
            continue;
        }
        if parse_proc_addr(f[1]) == Some(canonical(peer)) && parse_proc_addr(f[2]) == Some(canonical(local)) {
            return f[7].parse().ok();
        }
    }
    None
}

fn canonical(a: SocketAddr) -> (IpAddr, u16) {
    (a.ip().to_canonical(), a.port())
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): each 32-bit
/// word of the address is printed as the kernel holds it in memory, in the
/// machine's byte order.
fn parse_proc_addr(s: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::to_ne_bytes);
    let ip = match addr.len() {
        8 => IpAddr::from(word(addr)?),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[4 * i..4 * i + 4].copy_from_slice(&word(addr.get(8 * i..8 * i + 8)?)?);
            }
            IpAddr::from(b)
        }
        _ => return None,
    };
    Some((ip.to_canonical(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(ip: [u8; 4]) -> String {
        format!("{:08X}", u32::from_ne_bytes(ip))
    }

    #[test]
    fn the_client_end_of_a_connection_is_found_and_not_the_server_end() {
        let lo = [127, 0, 0, 1];
        let (api, client) = (SocketAddr::from((lo, 10819)), SocketAddr::from((lo, 40000)));
        let text = format!(
            "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
             0: {l}:2A43 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0\n\
             1: {l}:2A43 {l}:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0\n\
             2: {l}:9C40 {l}:2A43 01 00000000:00000000 00:00000000 00000000    65534        0 3 1 0\n",
            l = word(lo)
        );
        assert_eq!(owner_in_table(&text, client, api), Some(65534), "the client's socket, not the server's (uid 0)");
        assert_eq!(owner_in_table(&text, SocketAddr::from((lo, 40001)), api), None);
        assert_eq!(owner_in_table(&text, api, client), Some(0), "the other way round is the server's end");
        // A client that sent its request and closed: FIN_WAIT2 (05), or
        // TIME_WAIT (06), shown as uid 0 and inode 0. Not root.
        for gone in ["05", "06", "04", "08"] {
            let t = format!("header\n 2: {l}:9C40 {l}:2A43 {gone} 00000000:00000000 00:00000000 00000000     0        0 0 1 0\n", l = word(lo));
            assert_eq!(owner_in_table(&t, client, api), None, "state {gone}");
        }
        let t = format!("header\n 2: {l}:9C40 {l}:2A43 01 00000000:00000000 00:00000000 00000000     0        0 0 1 0\n", l = word(lo));
        assert_eq!(owner_in_table(&t, client, api), None, "established but held by no process");
        // Garbage lines are skipped, not a panic.
        assert_eq!(owner_in_table("header\n 0: zz:zz yy 01 a b c notanumber\n 1:\n", client, api), None);
    }

    #[test]
    #[cfg(target_endian = "little")]
    fn the_kernels_own_spelling_is_read() {
        // As /proc/net/tcp{,6} print them on x86_64 (not built with the
        // parser's own conversion).
        assert_eq!(parse_proc_addr("0100007F:2A43"), Some((IpAddr::from([127, 0, 0, 1]), 10819)));
        assert_eq!(parse_proc_addr("00000000000000000000000001000000:0050"), Some(("::1".parse().unwrap(), 80)));
        assert_eq!(parse_proc_addr("0000000000000000FFFF00000100007F:0050"), Some((IpAddr::from([127, 0, 0, 1]), 80)));
    }

    #[test]
    fn ipv6_and_ipv4_mapped_entries_are_read() {
        let mut v6 = [0u8; 16];
        v6[15] = 1; // ::1
        let hex6 = |b: [u8; 16]| (0..4).map(|i| word([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])).collect::<String>();
        assert_eq!(parse_proc_addr(&format!("{}:0050", hex6(v6))), Some((IpAddr::from(v6), 80)));
        let mut mapped = [0u8; 16];
        mapped[10..12].copy_from_slice(&[0xff, 0xff]);
        mapped[12..].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(parse_proc_addr(&format!("{}:0050", hex6(mapped))), Some((IpAddr::from([127, 0, 0, 1]), 80)), "a v4 client of a v6 socket");
        for bad in ["", ":", "0100007F", "0100007F:", "0100007F:XYZ", "01000:0050", "0100007F0100007F:0050", "é0000000:0050"] {
            assert_eq!(parse_proc_addr(bad), None, "{bad:?}");
        }
    }

    fn asking<'a>(authorization: Option<&'a [u8]>, peer: SocketAddr) -> Asking<'a> {
        Asking { authorization, host: Some(b"127.0.0.1:10819"), origin: false, peer, local: SocketAddr::from(([127, 0, 0, 1], 10819)) }
    }

    #[test]
    fn a_token_is_made_once_kept_private_and_only_it_is_accepted() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = AdminAuth::load_or_create(dir.path(), true).unwrap();
        let mode = std::fs::metadata(dir.path().join(TOKEN_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(a.token.len(), 64);
        let again = AdminAuth::load_or_create(dir.path(), true).unwrap();
        assert_eq!(again.token, a.token, "kept across starts");
        let other = AdminAuth::load_or_create(tempfile::tempdir().unwrap().path(), true).unwrap();
        assert_ne!(other.token, a.token, "each site has its own");
        let remote = SocketAddr::from(([192, 0, 2, 1], 5000));
        let bearer = |t: &str| format!("Bearer {t}").into_bytes();
        assert_eq!(a.admit("a", &asking(Some(&bearer(&a.token)), remote)), Ok(Admin::Token));
        assert_eq!(a.admit("a", &asking(Some(format!("bearer {}", a.token).as_bytes()), remote)), Ok(Admin::Token), "the scheme's case does not matter");
        assert!(a.admit("a", &asking(Some(&bearer(&a.token.to_uppercase())), remote)).is_err(), "the token is compared as sent");
        let e = a.admit("a", &asking(Some(&bearer(&other.token)), remote)).unwrap_err();
        assert!(e.reason.contains("not site a's"), "{e:?}");
        let e = a.admit("a", &asking(None, remote)).unwrap_err();
        assert!(e.reason.contains("needs its admin token") && e.reason.contains("--token-file"), "{e:?}");
        assert!(!e.reason.contains(&a.file.display().to_string()), "a remote client is not told the path: {e:?}");
        let e = a.admit("a", &asking(Some(b"Basic eDp5"), remote)).unwrap_err();
        assert!(e.reason.contains("Bearer"), "{e:?}");
        // A token sent from loopback is still checked.
        let lo = SocketAddr::from(([127, 0, 0, 1], 5000));
        assert!(a.admit("a", &asking(Some(&bearer(&other.token)), lo)).is_err());
        // Browsers, and requests naming a host, need the token even on loopback.
        let q = Asking { origin: true, ..asking(None, lo) };
        assert_eq!(a.admit("a", &q).unwrap_err().kind, "browser");
        let q = Asking { host: Some(b"evil.example:10819"), ..asking(None, lo) };
        assert_eq!(a.admit("a", &q).unwrap_err().kind, "host name");
        let q = Asking { host: None, ..asking(None, lo) };
        assert_eq!(a.admit("a", &q).unwrap_err().kind, "host name");
        // No such connection in /proc: refused, not guessed.
        assert_eq!(a.admit("a", &asking(None, lo)).unwrap_err().kind, "owner unknown");
        // With admin_peer_auth off, only the token.
        let strict = AdminAuth::load_or_create(dir.path(), false).unwrap();
        assert_eq!(strict.admit("a", &asking(None, lo)).unwrap_err().kind, "no token");
        assert_eq!(strict.admit("a", &asking(Some(&bearer(&a.token)), lo)), Ok(Admin::Token));
    }

    #[test]
    fn what_a_local_command_line_sends_as_host_is_told_from_names() {
        for ok in ["127.0.0.1:10819", "127.0.0.1", "localhost:1", "LOCALHOST", "[::1]:10819", "[::1]", "10.0.0.1:80"] {
            assert!(host_is_local_literal(ok.as_bytes()), "{ok}");
        }
        for bad in ["evil.example", "evil.example:10819", "127.0.0.1.nip.io:80", "[::1", "[::1]x", "[evil]:1", "127.0.0.1:port", "", "localhost.:1"] {
            assert!(!host_is_local_literal(bad.as_bytes()), "{bad}");
        }
    }

    #[test]
    fn a_damaged_or_exposed_token_file_is_named_not_replaced() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join(TOKEN_FILE);
        crate::crashsafe::write_file_mode(&f, b"short\n", 0o600).unwrap();
        let e = format!("{:#}", AdminAuth::load_or_create(dir.path(), true).err().unwrap());
        assert!(e.contains(TOKEN_FILE) && e.contains("64 hex digits"), "{e}");
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "short\n");
        crate::crashsafe::write_file_mode(&f, &[b'g'; 64], 0o600).unwrap();
        assert!(AdminAuth::load_or_create(dir.path(), true).is_err());
        // Readable by others: no secret.
        crate::crashsafe::write_file_mode(&f, &[b'a'; 64], 0o644).unwrap();
        let e = format!("{:#}", AdminAuth::load_or_create(dir.path(), true).err().unwrap());
        assert!(e.contains("mode 644") && e.contains(TOKEN_FILE), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(AdminAuth::load_or_create(dir.path(), true).is_ok());
        // A symbolic link is not followed.
        let elsewhere = dir.path().join("elsewhere");
        std::fs::rename(&f, &elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &f).unwrap();
        assert!(AdminAuth::load_or_create(dir.path(), true).is_err());
    }

    #[test]
    fn comparison_needs_every_byte() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd") && !same(b"abc", b"ab") && !same(b"", b"a"));
    }
}
