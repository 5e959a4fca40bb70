//! Output that must never hold up the code that produces it: `up`'s events
//! on its stdout and the site warnings it echoes on its stderr.
//!
//! `up` supervises every site of a deployment, and its sites die with it.
//! Printing straight to a pipe made both hostage to whoever reads it: a
//! reader that stopped reading (a stuck `| consumer`) blocked `up` in the
//! write, with no restarts and no signal handling meanwhile, and a reader
//! that went away (`| head -1`) made the next `println!` panic, which took
//! every site down with `up`. An `Outlet` queues each text (bounded) for a
//! thread of its own that writes it: `send` never blocks and never fails. A
//! text that finds the queue full is dropped and counted, and the count is
//! written where the texts went missing. A write that fails ends the
//! outlet's writing for good (said once, by `on_fail`); later texts are
//! taken and discarded.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Each message carries the number of texts dropped since the message
/// before it, so that the count is written where they went missing.
enum Msg {
    Text(u64, String),
    /// Answered once everything queued before it is written (or dropped).
    Drained(u64, std::sync::mpsc::Sender<()>),
}

/// What an outlet writes when texts were dropped: given their number.
pub type DroppedText = Box<dyn Fn(u64) -> String + Send>;
/// Called once, on the outlet's thread, when a write fails.
pub type OnFail = Box<dyn FnOnce(&std::io::Error) + Send>;

/// One output and the thread that writes to it; clones share both.
#[derive(Clone)]
pub struct Outlet {
    tx: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
}

impl Outlet {
    /// Starts the thread `name` writing to `out`, with room for `capacity`
    /// texts not yet written.
    pub fn start(name: &str, out: Box<dyn Write + Send>, capacity: usize, dropped_text: DroppedText, on_fail: OnFail) -> Result<Outlet> {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity.max(1));
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || write_loop(rx, out, dropped_text, on_fail))
            .with_context(|| format!("cannot start the {name} thread"))?;
        Ok(Outlet { tx, dropped: Arc::new(AtomicU64::new(0)) })
    }

    /// Queues `text` (written as is: end lines with '\n'); never blocks.
    pub fn send(&self, text: String) {
        let before = self.dropped.swap(0, Ordering::Relaxed);
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Msg::Text(before, text)) {
            self.dropped.fetch_add(before + 1, Ordering::Relaxed);
        }
    }

    /// Waits up to `limit` for everything queued so far to be written
    /// (before `up` exits, so that its last events are out).
    pub fn drain(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let (tx, rx) = std::sync::mpsc::channel();
        loop {
            let before = self.dropped.swap(0, Ordering::Relaxed);
            match self.tx.try_send(Msg::Drained(before, tx.clone())) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(_)) => {
                    self.dropped.fetch_add(before, Ordering::Relaxed);
                    if Instant::now() >= deadline {
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_ok()
    }
}

fn write_loop(rx: Receiver<Msg>, mut out: Box<dyn Write + Send>, dropped_text: DroppedText, on_fail: OnFail) {
    // Taken (and called) at the first failed write, after which nothing
    // more is written.
    let mut on_fail = Some(on_fail);
    // Writes `text` after the note of the `n` dropped before it, if any.
    let mut write = |n: u64, text: &str, out: &mut Box<dyn Write + Send>| {
        if on_fail.is_none() {
            return;
        }
        let mut all = if n > 0 { dropped_text(n) } else { String::new() };
        all.push_str(text);
        if all.is_empty() {
            return;
        }
        if let Err(e) = out.write_all(all.as_bytes()).and_then(|()| out.flush()) {
            if let Some(f) = on_fail.take() {
                f(&e);
            }
        }
    };
    for msg in rx {
        match msg {
            Msg::Text(n, t) => write(n, &t, &mut out),
            Msg::Drained(n, done) => {
                write(n, "", &mut out);
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::sync::Mutex;


    fn dropped_line() -> DroppedText {
        Box::new(|n| format!("[{n} dropped]\n"))
    }

    /// A reader that does not read: `send` still returns at once, every
    /// time, and once the reader reads, what it gets is the texts in order
    /// with the number of those that did not fit where they went missing.
    #[test]
    fn a_reader_that_does_not_read_holds_up_nobody() {
        let (mut rd, wr) = crate::util::pipe().unwrap();
        let failed = Arc::new(Mutex::new(None::<String>));
        let f2 = failed.clone();
        let o = Outlet::start("outlet-test", Box::new(wr), 16, dropped_line(), Box::new(move |e| *f2.lock().unwrap() = Some(e.to_string()))).unwrap();
        // 20,000 lines of 100 bytes: far more than the pipe (64 KiB) and
        // the queue (16) hold together.
        let total = 20_000;
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let o2 = o.clone();
        std::thread::spawn(move || {
            for i in 0..total {
                o2.send(format!("{i:>99}\n"));
            }
            done_tx.send(()).unwrap();
        });
        done_rx.recv_timeout(Duration::from_secs(20)).expect("send blocked on a reader that does not read");
        // Now read: drain, then close the writer's side by ending the outlet.
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            rd.read_to_string(&mut s).unwrap();
            s
        });
        assert!(o.drain(Duration::from_secs(20)), "outlet did not drain once read");
        drop(o);
        let text = reader.join().unwrap();
        let (mut next, mut written, mut dropped) = (0u64, 0u64, 0u64);
        for l in text.lines() {
            if let Some(n) = l.strip_prefix('[').and_then(|r| r.strip_suffix(" dropped]")) {
                dropped += n.parse::<u64>().unwrap();
                next += n.parse::<u64>().unwrap();
            } else {
                assert_eq!(l.trim().parse::<u64>().unwrap(), next, "out of order or lost without a count: {l:?}");
                next += 1;
                written += 1;
            }
        }
        assert_eq!(written + dropped, total, "written {written} + dropped {dropped}");
        assert!(dropped > 0 && written > 16, "written {written}, dropped {dropped}");
        assert!(failed.lock().unwrap().is_none());
    }

    /// A reader that went away: no panic, one note of why, and the outlet
    /// keeps taking texts (and draining) as if they were written.
    #[test]
    fn a_reader_that_went_away_is_said_once_and_nothing_else_changes() {
        let (rd, wr) = crate::util::pipe().unwrap();
        drop(rd);
        let notes = Arc::new(Mutex::new(Vec::<String>::new()));
        let n2 = notes.clone();
        let o = Outlet::start("outlet-test", Box::new(wr), 16, dropped_line(), Box::new(move |e| n2.lock().unwrap().push(e.to_string()))).unwrap();
        for i in 0..1000 {
            o.send(format!("{i}\n"));
        }
        assert!(o.drain(Duration::from_secs(10)));
        let notes = notes.lock().unwrap();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("Broken pipe"), "{notes:?}");
    }
}
