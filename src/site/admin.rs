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
    /// Where the token is (named in refusals, so an operator knows where
    /// to look on the site's host).
    pub file: PathBuf,
    /// The user the site runs as.
    uid: u32,
}

/// Who a change was accepted from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admin {
    /// Sent this site's token.
    Token,
    /// A loopback client owned by this uid (the site's user, or root).
    LocalUser(u32),
}

impl AdminAuth {
    /// Reads `<data_dir>/admin.token`, creating it on the first start.
    pub fn load_or_create(data_dir: &Path) -> Result<AdminAuth> {
        let file = data_dir.join(TOKEN_FILE);
        let file = if file.is_absolute() { file } else { std::env::current_dir().map(|d| d.join(&file)).unwrap_or(file) };
        let token = match std::fs::read(&file) {
            Ok(raw) => parse_token(&raw).with_context(|| format!("{} is not a tidemark admin token: {} hex digits and a newline expected (delete it to have a new one made at the next start)", file.display(), 2 * TOKEN_BYTES))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
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
            Err(e) => return Err(e).with_context(|| format!("failed to read {}", file.display())),
        };
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        Ok(AdminAuth { token, file, uid })
    }

    /// Whether a change may be made. `authorization` is the request's
    /// `Authorization` header, `peer` the client's address and `local` the
    /// address it reached (the API's side of the connection). The error is
    /// the refusal's reason, for the client.
    pub fn admit(&self, site: &str, authorization: Option<&[u8]>, peer: SocketAddr, local: SocketAddr) -> Result<Admin, String> {
        if let Some(h) = authorization {
            let sent = std::str::from_utf8(h).ok().and_then(|h| h.strip_prefix("Bearer ")).map(str::trim);
            return match sent {
                Some(t) if same(t.as_bytes(), self.token.as_bytes()) => Ok(Admin::Token),
                Some(_) => Err(format!("the admin token sent is not site {site}'s (each site has its own, in {} on its host)", self.file.display())),
                None => Err("the Authorization header must be \"Bearer <token>\"".into()),
            };
        }
        let user = if self.uid == 0 { "root".to_string() } else { format!("its user (uid {}) or root", self.uid) };
        let how = format!("send site {site}'s admin token (`--token-file {}` on the command line; the file is on the site's host), or run the command on the site's host as {user}", self.file.display());
        if !peer.ip().to_canonical().is_loopback() {
            return Err(format!("changing site {site} from {} needs its admin token: {how}", peer.ip()));
        }
        match loopback_owner(peer, local) {
            Some(uid) if uid == self.uid || uid == 0 => Ok(Admin::LocalUser(uid)),
            Some(uid) => Err(format!("changing site {site} is not allowed for local user {uid}: {how}")),
            None => Err(format!("changing site {site}: the owner of the connection from {peer} was not found: {how}")),
        }
    }
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
    const LISTEN: &str = "0A";
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 || f[3] == LISTEN {
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
        // Garbage lines are skipped, not a panic.
        assert_eq!(owner_in_table("header\n 0: zz:zz yy 01 a b c notanumber\n 1:\n", client, api), None);
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

    #[test]
    fn a_token_is_made_once_kept_private_and_only_it_is_accepted() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = AdminAuth::load_or_create(dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join(TOKEN_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(a.token.len(), 64);
        let again = AdminAuth::load_or_create(dir.path()).unwrap();
        assert_eq!(again.token, a.token, "kept across starts");
        let other = AdminAuth::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        assert_ne!(other.token, a.token, "each site has its own");
        let remote = SocketAddr::from(([192, 0, 2, 1], 5000));
        let api = SocketAddr::from(([192, 0, 2, 2], 10819));
        let bearer = |t: &str| format!("Bearer {t}").into_bytes();
        assert_eq!(a.admit("a", Some(&bearer(&a.token)), remote, api), Ok(Admin::Token));
        assert!(a.admit("a", Some(&bearer(&a.token.to_uppercase())), remote, api).is_err(), "compared as sent");
        let e = a.admit("a", Some(&bearer(&other.token)), remote, api).unwrap_err();
        assert!(e.contains("not site a's"), "{e}");
        let e = a.admit("a", None, remote, api).unwrap_err();
        assert!(e.contains("needs its admin token") && e.contains("--token-file") && e.contains(TOKEN_FILE), "{e}");
        let e = a.admit("a", Some(b"Basic eDp5"), remote, api).unwrap_err();
        assert!(e.contains("Bearer"), "{e}");
        // A token sent from loopback is still checked.
        let lo = SocketAddr::from(([127, 0, 0, 1], 5000));
        assert!(a.admit("a", Some(&bearer(&other.token)), lo, api).is_err());
    }

    #[test]
    fn a_damaged_token_file_is_named_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(TOKEN_FILE), "short\n").unwrap();
        let e = format!("{:#}", AdminAuth::load_or_create(dir.path()).err().unwrap());
        assert!(e.contains(TOKEN_FILE) && e.contains("64 hex digits"), "{e}");
        assert_eq!(std::fs::read_to_string(dir.path().join(TOKEN_FILE)).unwrap(), "short\n");
        std::fs::write(dir.path().join(TOKEN_FILE), [b'g'; 64]).unwrap();
        assert!(AdminAuth::load_or_create(dir.path()).is_err());
    }

    #[test]
    fn comparison_needs_every_byte() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd") && !same(b"abc", b"ab") && !same(b"", b"a"));
    }
}
