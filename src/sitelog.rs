//! A site's output under `up`: its stdout and stderr go through a pipe to
//! `up`, one of whose threads reads it and echoes WARN and ERROR lines to
//! `up`'s own stderr (through an `Outlet`, so a stderr nobody reads holds
//! up no site), while another appends everything to the site's log
//! file (`DIR/<site>/site.log`). The site never writes that file itself:
//! the file is on the site's data disk, and when that disk stalls a site
//! writing its log waits in the write, the thread that logs the stall
//! included. Now the site's writes go to a pipe that is always read, the
//! operator sees the stall's WARN as it happens, and the file catches up
//! once the disk answers (up to `LOG_PUMP_BUFFER_BYTES` are held in
//! memory meanwhile; past that, what is dropped is counted and said in the
//! file where it would have been).

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::outlet::Outlet;

/// Bytes of a site's output held while its log file cannot be written.
pub const LOG_PUMP_BUFFER_BYTES: usize = 4 * 1024 * 1024;
const READ_BYTES: usize = 64 * 1024;
/// Longest partial line kept for the echo (a longer one is not echoed).
const LINE_BYTES_MAX: usize = 64 * 1024;

/// The pump of one site process: started with it, ends when its output
/// ends (the process exited) and what was read is written.
pub struct Pump {
    written: Arc<AtomicBool>,
    held: Arc<(Mutex<Held>, Condvar)>,
}

const TAIL_BYTES: usize = 4096;

/// Output read and not yet written, in order; bytes dropped since the last
/// that fit (said in the file where they would have been); the last bytes
/// read (up to `TAIL_BYTES`: what a site said last, without reading its
/// log file); whether the output has ended.
#[derive(Default)]
struct Held {
    data: Vec<u8>,
    dropped: u64,
    tail: Vec<u8>,
    ended: bool,
}

fn dropped_note(site: &str, n: u64) -> String {
    format!("[up: {n} bytes of site {site}'s output were dropped here: this file could not be written for a while]\n")
}

impl Pump {
    /// The site's stdout and stderr, and the pump that takes them to `log`
    /// (opened now, for appending) and echoes the site's warnings as
    /// `site <name>: <line>` on stderr.
    pub fn start(site: &str, log: &Path, echo: Outlet) -> Result<(Stdio, Stdio, Pump)> {
        let mut file = File::options().create(true).append(true).open(log).with_context(|| format!("cannot open {}", log.display()))?;
        let (mut rd, wr) = crate::util::pipe().context("cannot make a pipe for a site's output")?;
        let wr2 = wr.try_clone().context("cannot duplicate a site's output pipe")?;
        let held = Arc::new((Mutex::new(Held::default()), Condvar::new()));
        let written = Arc::new(AtomicBool::new(false));
        let (name, h2) = (site.to_string(), held.clone());
        std::thread::Builder::new()
            .name(format!("log-read-{site}"))
            .spawn(move || {
                let mut buf = vec![0u8; READ_BYTES];
                let mut line = Vec::new();
                loop {
                    let n = match rd.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => break,
                    };
                    echo_warnings(&name, &buf[..n], &mut line, &mut |l| echo.send(l));
                    let mut st = h2.0.lock().unwrap_or_else(|p| p.into_inner());
                    st.tail.extend_from_slice(&buf[..n]);
                    let excess = st.tail.len().saturating_sub(TAIL_BYTES);
                    st.tail.drain(..excess);
                    // Past the bound (the file is not being written: a
                    // stalled disk) the bytes are dropped, counted, never
                    // waited for: the site must not wait on its log.
                    if st.data.len() + n > LOG_PUMP_BUFFER_BYTES {
                        st.dropped += n as u64;
                        continue;
                    }
                    if st.dropped > 0 {
                        let note = dropped_note(&name, std::mem::take(&mut st.dropped));
                        st.data.extend_from_slice(note.as_bytes());
                    }
                    st.data.extend_from_slice(&buf[..n]);
                    h2.1.notify_one();
                }
                h2.0.lock().unwrap_or_else(|p| p.into_inner()).ended = true;
                h2.1.notify_one();
            })
            .context("cannot start a thread for a site's output")?;
        let (w2, name, h3) = (written.clone(), site.to_string(), held.clone());
        std::thread::Builder::new()
            .name(format!("log-write-{site}"))
            .spawn(move || {
                loop {
                    let (out, ended) = {
                        let mut st = held.0.lock().unwrap_or_else(|p| p.into_inner());
                        while st.data.is_empty() && !st.ended {
                            st = held.1.wait(st).unwrap_or_else(|p| p.into_inner());
                        }
                        (std::mem::take(&mut st.data), st.ended)
                    };
                    // All that was read so far, in one write. One that
                    // fails (a full disk) counts as dropped, said with the
                    // next that fits.
                    if file.write_all(&out).is_err() {
                        held.0.lock().unwrap_or_else(|p| p.into_inner()).dropped += out.len() as u64;
                    }
                    // Ended: the reader adds nothing more.
                    if ended {
                        let dropped = std::mem::take(&mut held.0.lock().unwrap_or_else(|p| p.into_inner()).dropped);
                        if dropped > 0 {
                            let _ = file.write_all(dropped_note(&name, dropped).as_bytes());
                        }
                        break;
                    }
                }
                w2.store(true, Ordering::Release);
            })
            .context("cannot start a thread for a site's log")?;
        Ok((Stdio::from(wr), Stdio::from(wr2), Pump { written, held: h3 }))
    }

    /// The last non-empty line the site wrote, without terminal colours,
    /// once its output has ended (waiting up to `limit` for that): why a
    /// site that exited during start did, from memory, not from its log
    /// file on a disk that may be stalled.
    pub fn last_line(&self, limit: Duration) -> String {
        // Polled, not waited on the condvar: the writer thread waits there,
        // and the reader's one wake-up at the end must reach it.
        let deadline = Instant::now() + limit;
        loop {
            let st = self.held.0.lock().unwrap_or_else(|p| p.into_inner());
            if st.ended || Instant::now() >= deadline {
                let text = String::from_utf8_lossy(&st.tail);
                return strip_ansi(text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("")).trim_end().to_string();
            }
            drop(st);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits up to `limit` for everything the exited site wrote to be in
    /// its log file (before `up` exits).
    pub fn wait_written(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while !self.written.load(Ordering::Acquire) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

/// Echoes each complete WARN or ERROR line of `chunk` (after `partial`,
/// the incomplete line the last chunk ended with) to `out` as
/// `site <name>: <line>\n`, without the terminal colours the log carries.
fn echo_warnings(site: &str, chunk: &[u8], partial: &mut Vec<u8>, out: &mut impl FnMut(String)) {
    let mut rest = chunk;
    while let Some(i) = rest.iter().position(|&b| b == b'\n') {
        partial.extend_from_slice(&rest[..i]);
        rest = &rest[i + 1..];
        let line = strip_ansi(&String::from_utf8_lossy(partial));
        if line.contains(" WARN ") || line.contains(" ERROR ") {
            out(format!("site {site}: {}\n", line.trim_end()));
        }
        partial.clear();
    }
    if partial.len() + rest.len() <= LINE_BYTES_MAX {
        partial.extend_from_slice(rest);
    } else {
        partial.clear();
    }
}

/// `s` without ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_are_echoed_whole_and_plain_whatever_the_chunks() {
        let log = "\x1b[2m2026-12-07T04:00:00Z\x1b[0m \x1b[32m INFO\x1b[0m tidemark::site: serving\n\
                   \x1b[2m2026-12-07T04:00:01Z\x1b[0m \x1b[33m WARN\x1b[0m tidemark::site: group cg0: a log append has been in progress for 10 s\n\
                   2026-12-07T04:00:02Z ERROR tidemark::group: failed\npartial WARN ";
        for cut in [1, 7, 64, log.len()] {
            let (mut partial, mut out) = (Vec::new(), String::new());
            for piece in log.as_bytes().chunks(cut) {
                echo_warnings("a", piece, &mut partial, &mut |l| out.push_str(&l));
            }
            assert_eq!(
                out,
                "site a: 2026-12-07T04:00:01Z  WARN tidemark::site: group cg0: a log append has been in progress for 10 s\n\
                 site a: 2026-12-07T04:00:02Z ERROR tidemark::group: failed\n",
                "chunks of {cut}"
            );
            assert_eq!(partial, b"partial WARN ");
        }
    }

    fn sink_outlet() -> Outlet {
        Outlet::start("echo-test", Box::new(std::io::sink()), 16, Box::new(|n| format!("[{n} dropped]\n")), Box::new(|_| {})).unwrap()
    }

    /// `up`'s stderr is a pipe nobody reads: a site printing warning after
    /// warning is not held up (before, the echo's write blocked the pump,
    /// and the site then blocked on its own output), and its log file
    /// still gets every line.
    #[test]
    fn a_stderr_nobody_reads_holds_up_no_site() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("site.log");
        // The read end stays open and unread for the whole test.
        let (_unread, wr) = crate::util::pipe().unwrap();
        let echo = Outlet::start("echo-test", Box::new(wr), 16, Box::new(|n| format!("[{n} dropped]\n")), Box::new(|_| {})).unwrap();
        let (out, err, pump) = Pump::start("a", &log, echo).unwrap();
        // 20,000 warnings of ~110 bytes: ~2 MiB, far past the pipe's 64 KiB.
        let mut child = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 20000 ]; do echo \"2026-12-07T06:00:00Z  WARN tidemark::site: warning number $i of a site that warns a lot\"; i=$((i+1)); done"])
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < deadline, "the site was held up by a stderr nobody reads");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(pump.wait_written(Duration::from_secs(10)));
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(text.lines().count(), 20_000);
        assert!(text.lines().last().unwrap().contains("warning number 19999 "), "{:?}", text.lines().last());
    }

    /// Everything the site writes reaches the file, in order, and the pump
    /// says when it is all there.
    #[test]
    fn a_sites_output_reaches_its_log_file() {
        let d = tempfile::tempdir().unwrap();
        let log = d.path().join("site.log");
        std::fs::write(&log, "before\n").unwrap();
        let (out, err, pump) = Pump::start("a", &log, sink_outlet()).unwrap();
        let mut child = std::process::Command::new("sh")
            .args(["-c", "for i in $(seq 1 2000); do echo line $i; done; echo on stderr >&2"])
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap();
        assert!(child.wait().unwrap().success());
        assert!(pump.wait_written(Duration::from_secs(10)));
        let text = std::fs::read_to_string(&log).unwrap();
        let want: String = std::iter::once("before".to_string()).chain((1..=2000).map(|i| format!("line {i}"))).chain(std::iter::once("on stderr".to_string())).map(|l| l + "\n").collect();
        assert_eq!(text, want);
        assert_eq!(pump.last_line(Duration::from_secs(1)), "on stderr");
    }
}
