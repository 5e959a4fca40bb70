//! A minimal blocking HTTP/1.1 client for the admin CLI (one request per
//! connection, `Connection: close`), so the CLI needs no HTTP stack.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use anyhow::{bail, Context, Result};

pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// How long a change (anything but GET) waits for each read of its answer:
/// a change may wait for its record to be durable, at every sync DR site.
pub const CHANGE_LIMIT: Duration = Duration::from_secs(120);
/// How long a query (GET) waits: a site answers one from memory, so a site
/// that has not answered in this long is stuck, and an operator asking
/// for its status must hear that rather than wait with it.
pub const QUERY_LIMIT: Duration = Duration::from_secs(30);
/// How long a connection may take to open (a host that drops packets
/// would otherwise take the kernel's SYN retries, about two minutes).
const CONNECT_LIMIT: Duration = Duration::from_secs(10);

/// Sends `method path` to `base` (`http://host:port`) with an optional
/// JSON body, each read waiting at most `limit` (the CLI's commands may
/// take long; a supervisor's status poll must not).
pub fn request_within(base: &str, method: &str, path: &str, body: Option<&serde_json::Value>, limit: Duration) -> Result<Response> {
    request_as(base, None, method, path, body, limit)
}

/// `request_within`, sending `token` as the site's admin token (a change
/// from another host, or by another local user, needs it: `site::admin`).
pub fn request_as(base: &str, token: Option<&str>, method: &str, path: &str, body: Option<&serde_json::Value>, limit: Duration) -> Result<Response> {
    let hostport = base.strip_prefix("http://").with_context(|| format!("API URL {base:?} must start with http://"))?;
    let hostport = hostport.trim_end_matches('/');
    let mut s = connect(hostport, limit.min(CONNECT_LIMIT)).with_context(|| format!("failed to connect to the API at {base}"))?;
    s.set_read_timeout(Some(limit))?;
    s.set_write_timeout(Some(limit))?;
    // A read or write past the limit fails with EAGAIN ("Resource
    // temporarily unavailable"), which says nothing of what happened.
    let late = |e: std::io::Error, what: &str| -> anyhow::Error {
        if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) {
            anyhow::anyhow!("the API at {base} accepted the connection but did not {what} within {} s: the site is stuck or overloaded", limit.as_secs_f64())
        } else {
            anyhow::Error::new(e).context(format!("failed to {what} from {base}"))
        }
    };
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {hostport}\r\nConnection: close\r\nAccept: application/json\r\n");
    if let Some(t) = token {
        // Never a way to end the header early and add others.
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            bail!("an admin token is printable ASCII without spaces");
        }
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if body.is_some() {
        req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", payload.len()));
    }
    req.push_str("\r\n");
    req.push_str(&payload);
    s.write_all(req.as_bytes()).map_err(|e| late(e, "take the request"))?;
    let mut raw = Vec::new();
    s.take(64 * 1024 * 1024).read_to_end(&mut raw).map_err(|e| late(e, "answer"))?;
    parse(&raw).with_context(|| format!("bad HTTP response from {base}"))
}

/// Connects to `hostport` (each address it names in turn), each attempt
/// bounded by `limit`.
fn connect(hostport: &str, limit: Duration) -> Result<TcpStream> {
    use std::net::ToSocketAddrs;
    let mut last = None;
    for a in hostport.to_socket_addrs().with_context(|| format!("cannot resolve {hostport:?}"))? {
        match TcpStream::connect_timeout(&a, limit) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => last = Some(anyhow::anyhow!("{a} did not answer within {} s", limit.as_secs_f64())),
            Err(e) => last = Some(anyhow::Error::new(e).context(a.to_string())),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("{hostport:?} names no address")))
}

fn parse(raw: &[u8]) -> Result<Response> {
    let end = raw.windows(4).position(|w| w == b"\r\n\r\n").context("no end of headers")?;
    let head = std::str::from_utf8(&raw[..end]).context("headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status: u16 = status_line.split(' ').nth(1).and_then(|s| s.parse().ok()).with_context(|| format!("bad status line {status_line:?}"))?;
    let mut chunked = false;
    let mut length: Option<usize> = None;
    for l in lines {
        let l = l.to_ascii_lowercase();
        if l.starts_with("transfer-encoding:") && l.contains("chunked") {
            chunked = true;
        }
        if let Some(v) = l.strip_prefix("content-length:") {
            length = Some(v.trim().parse().with_context(|| format!("bad Content-Length {:?}", v.trim()))?);
        }
    }
    let mut body = raw[end + 4..].to_vec();
    if let Some(n) = length.filter(|_| !chunked) {
        // A connection that ended early is not the whole answer.
        if body.len() < n {
            bail!("the answer was cut short: {} of the {n} bytes its Content-Length announced", body.len());
        }
        body.truncate(n);
    }
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let nl = rest.windows(2).position(|w| w == b"\r\n").context("bad chunk header")?;
            let line = std::str::from_utf8(&rest[..nl]).context("chunk header is not UTF-8")?;
            // A chunk extension (";name=value") says nothing we use.
            let digits = line.split(';').next().unwrap_or_default().trim();
            let size = usize::from_str_radix(digits, 16).with_context(|| format!("bad chunk size {line:?}"))?;
            rest = &rest[nl + 2..];
            if size == 0 {
                break;
            }
            // Checked: a size near usize::MAX must not wrap past the test.
            let need = size.checked_add(2).with_context(|| format!("chunk size {size:#x} is larger than any response"))?;
            if rest.len() < need {
                bail!("truncated chunk: {size} bytes announced, {} left", rest.len().saturating_sub(2));
            }
            if &rest[size..need] != b"\r\n" {
                bail!("chunk of {size} bytes is not followed by CRLF");
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[need..];
        }
        body = out;
    }
    Ok(Response { status, body })
}

/// Sends a request and returns the JSON body, turning an API error into an
/// error carrying the API's own message.
pub fn call(base: &str, method: &str, path: &str, body: Option<&serde_json::Value>) -> Result<serde_json::Value> {
    call_as(base, None, method, path, body, None)
}

/// `call` with the admin token `token`, if any, waiting `limit` (or, if
/// none is given, `QUERY_LIMIT` for a GET and `CHANGE_LIMIT` otherwise).
pub fn call_as(base: &str, token: Option<&str>, method: &str, path: &str, body: Option<&serde_json::Value>, limit: Option<Duration>) -> Result<serde_json::Value> {
    let limit = limit.unwrap_or(if method == "GET" { QUERY_LIMIT } else { CHANGE_LIMIT });
    json_of(request_as(base, token, method, path, body, limit)?, base, method, path)
}

/// `call` with `request_within`'s limit.
pub fn call_within(base: &str, method: &str, path: &str, body: Option<&serde_json::Value>, limit: Duration) -> Result<serde_json::Value> {
    json_of(request_within(base, method, path, body, limit)?, base, method, path)
}

/// The JSON of a success; for a failure, the site's own `error` message,
/// or (from something that is not a site's API) what it answered, to
/// which request. A success that is not JSON is not taken for one.
fn json_of(r: Response, base: &str, method: &str, path: &str) -> Result<serde_json::Value> {
    let v: Option<serde_json::Value> = serde_json::from_slice(&r.body).ok();
    let text = || {
        let t = String::from_utf8_lossy(&r.body);
        let t = t.trim();
        if t.is_empty() {
            "an empty body".to_string()
        } else {
            format!("{:?}", t.chars().take(200).collect::<String>())
        }
    };
    if r.status >= 400 {
        if let Some(msg) = v.as_ref().and_then(|v| v.get("error")).and_then(|e| e.as_str()).filter(|m| !m.is_empty()) {
            bail!("{msg}");
        }
        bail!("{base} answered {method} {path} with HTTP {} and {}", r.status, text());
    }
    v.with_context(|| format!("{base} answered {method} {path} with HTTP {} and {}, not JSON: is that a tidemark site's API?", r.status, text()))
}

#[cfg(test)]
mod tests {
    /// A site that takes the connection and never answers (stopped, or
    /// stuck) is an error within the limit that says so, not a wait
    /// without end nor "Resource temporarily unavailable".
    #[test]
    fn a_site_that_never_answers_is_an_error_that_says_so() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        let t = std::time::Instant::now();
        let e = super::call_as(&base, None, "GET", "/status", None, Some(std::time::Duration::from_millis(300))).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("accepted the connection but did not answer within 0.3 s"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(5), "took {:?}", t.elapsed());
        drop(l);
    }

    /// Whatever answers on the API port, a success must be a site's
    /// (JSON, whole) and a failure says what was asked and answered.
    #[test]
    fn answers_that_are_not_a_sites_are_errors() {
        let r = |raw: &[u8]| super::parse(raw).and_then(|r| super::json_of(r, "http://h:1", "POST", "/volumes"));
        let e = format!("{:#}", r(b"HTTP/1.1 200 OK\r\n\r\nhello").unwrap_err());
        assert!(e.contains("HTTP 200") && e.contains("\"hello\"") && e.contains("not JSON"), "{e}");
        let e = format!("{:#}", r(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"a\":1}").unwrap_err());
        assert!(e.contains("cut short: 7 of the 100 bytes"), "{e}");
        let e = format!("{:#}", r(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").unwrap_err());
        assert_eq!(e, "http://h:1 answered POST /volumes with HTTP 404 and an empty body");
        let e = format!("{:#}", r(b"HTTP/1.1 409 Conflict\r\n\r\n{\"error\":\"volume v already exists\"}").unwrap_err());
        assert_eq!(e, "volume v already exists");
        assert_eq!(r(b"HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n{\"a\":1}").unwrap()["a"], 1);
    }

    #[test]
    fn parses_plain_and_chunked() {
        let r = super::parse(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, &r.body[..]), (200, &b"{}"[..]));
        let r = super::parse(b"HTTP/1.1 404 Not Found\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap();
        assert_eq!((r.status, &r.body[..]), (404, &b"abcde"[..]));
        assert!(super::parse(b"garbage").is_err());
    }

    /// Whatever answers on the API port (another process, after a site
    /// stopped) cannot make the CLI or `up` panic: chunk sizes that would
    /// wrap past the length check, and chunks that lie, are errors.
    #[test]
    fn lying_chunks_are_errors_not_panics() {
        let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
        for (body, want) in [
            ("ffffffffffffffff\r\nX", "larger than any response"),
            ("fffffffffffffffe\r\nX", "larger than any response"),
            ("fffffffffffffffd\r\nX", "truncated chunk"),
            ("10000000000000000\r\nX", "bad chunk size"),
            ("5\r\nab", "truncated chunk"),
            ("2\r\nabcd\r\n0\r\n\r\n", "not followed by CRLF"),
            ("zz\r\n", "bad chunk size"),
            ("3", "bad chunk header"),
        ] {
            let e = match super::parse(format!("{head}{body}").as_bytes()) {
                Ok(r) => panic!("{body:?} parsed: {:?}", r.body),
                Err(e) => format!("{e:#}"),
            };
            assert!(e.contains(want), "{body:?}: {e}");
        }
        let r = super::parse(format!("{head}3;x=y\r\nabc\r\n0\r\n\r\n").as_bytes()).unwrap();
        assert_eq!(r.body, b"abc");
    }
}
