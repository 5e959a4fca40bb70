//! Scheduling priority of replication threads (ARCHITECTURE.md
//! "Replication priority"): a sender thread on the primary and a receiver
//! thread on a DR site run at a lower priority (a higher nice value) while
//! their group is async or periodic, where shipping and taking in records is
//! deferred work, and at the priority the site inherited while it is sync,
//! where an application write waits for both.

/// The scheduling priority of one replication thread, following its
/// group's mode: the nice value it inherited in sync mode, at least `nice`
/// in async and periodic mode.
pub struct Priority {
    tid: libc::pid_t,
    base: i32,
    nice: i32,
    current: i32,
    stuck: bool,
    role: &'static str,
}

/// The calling thread's id and nice value.
fn this_thread() -> (libc::pid_t, i32) {
    // SAFETY: plain syscalls about the calling thread; errno is reset first
    // because -1 is a valid nice value. (`SYS_gettid` rather than
    // `gettid()`, which needs glibc 2.30.)
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::pid_t;
        *libc::__errno_location() = 0;
        let p = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        (tid, if p == -1 && *libc::__errno_location() != 0 { 0 } else { p })
    }
}

/// Whether this process may lower a thread's nice value again once it has
/// raised it (CAP_SYS_NICE, or an RLIMIT_NICE that allows it). Probed once,
/// on a throwaway thread, so that a failed probe changes no thread that
/// matters.
pub fn can_restore_priority() -> bool {
    static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CAN.get_or_init(|| {
        std::thread::spawn(|| {
            let (tid, base) = this_thread();
            if base >= 19 {
                return false;
            }
            // SAFETY: setpriority on the probe thread's own id.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, base + 1) == 0 && libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, base) == 0 }
        })
        .join()
        .unwrap_or(false)
    })
}

/// Brings the calling thread to nice `nice` if it is elsewhere: a helper
/// thread that runs a replication thread's steps (the sender's resync
/// steps on its runtime's blocking pool) inherited that thread's value
/// when it was created, and without this kept it until it exited, 10 s
/// idle, so a resync step after a switch to sync could run deprioritised.
/// Returns whether it changed; a failure is logged once and the thread
/// keeps its value.
pub fn match_this_thread(nice: i32) -> bool {
    let (tid, current) = this_thread();
    if current == nice {
        return false;
    }
    // SAFETY: setpriority on the calling thread's own id.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } != 0 {
        let e = std::io::Error::last_os_error();
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| tracing::warn!("cannot set a replication helper thread's nice value from {current} to {nice}: {e}; it keeps {current}"));
        return false;
    }
    true
}

impl Priority {
    /// For the calling thread, which runs as a `role` ("sender",
    /// "receiver"; the setting is `<role>_nice`). If this process could not
    /// bring the thread back to its inherited value for sync mode, the
    /// policy is off: a sync writer must never wait on a deprioritised
    /// thread.
    pub fn of_this_thread(nice: i32, role: &'static str) -> Priority {
        let (tid, base) = this_thread();
        let nice = if nice > base && !can_restore_priority() {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                tracing::warn!("{role}_nice = {nice} not applied: bringing a replication thread back to normal priority when its group turns sync needs CAP_SYS_NICE, which this process lacks; replication threads run at nice {base}");
            });
            base
        } else {
            nice
        };
        Priority { tid, base, nice, current: base, stuck: false, role }
    }

    /// The value wanted in `mode`.
    pub fn wanted(&self, mode: super::Mode) -> i32 {
        if mode == super::Mode::Sync {
            self.base
        } else {
            self.base.max(self.nice)
        }
    }

    pub fn current(&self) -> i32 {
        self.current
    }

    /// Sets the thread's nice value for `mode` if it differs, and returns
    /// whether it changed. Should that fail (`of_this_thread` probed that
    /// it would not), the thread keeps its value and says so once.
    pub fn follow(&mut self, mode: super::Mode, what: &str) -> bool {
        let want = self.wanted(mode);
        if want == self.current || self.stuck {
            return false;
        }
        // SAFETY: setpriority on this thread's own id.
        let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, self.tid as libc::id_t, want) };
        if r != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!("{what}: cannot set the {}'s nice value from {} to {want} for {mode:?} mode: {e}; it stays at {} until the site restarts", self.role, self.current, self.current);
            self.stuck = true;
            return false;
        }
        tracing::debug!("{what}: {} nice {} -> {want} ({mode:?} mode)", self.role, self.current);
        self.current = want;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replicate::Mode;

    pub(crate) fn nice_of(tid: libc::pid_t) -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        // Field 19 (nice), counted after the ")" that ends the thread name.
        let rest = &stat[stat.rfind(')').unwrap() + 2..];
        rest.split(' ').nth(16).unwrap().parse().unwrap()
    }

    /// A helper thread created while its replication thread was at nice
    /// 10 (async) comes back to the inherited value for a step in sync mode.
    #[test]
    fn a_helper_thread_takes_the_value_of_the_step_it_runs() {
        std::thread::spawn(|| {
            let (tid, base) = this_thread();
            if !can_restore_priority() || base >= 10 {
                // Nothing to restore: the policy is off, helpers stay at base.
                assert!(!match_this_thread(base));
                return;
            }
            assert!(match_this_thread(10));
            assert_eq!(nice_of(tid), 10);
            assert!(!match_this_thread(10), "no change, no syscall");
            assert!(match_this_thread(base));
            assert_eq!(nice_of(tid), base, "back at the inherited value");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn priority_follows_the_mode() {
        std::thread::spawn(|| {
            let mut p = Priority::of_this_thread(10, "sender");
            let (tid, _) = this_thread();
            let base = nice_of(tid);
            if unsafe { libc::geteuid() } == 0 {
                assert!(can_restore_priority(), "root may restore a thread's priority");
            }
            assert_eq!(p.current(), base);
            // Without CAP_SYS_NICE the policy is off (see `of_this_thread`).
            let lowered = if can_restore_priority() { base.max(10) } else { base };
            p.follow(Mode::Async, "test");
            assert_eq!(nice_of(tid), lowered, "async replication thread runs at nice 10");
            p.follow(Mode::Periodic, "test");
            assert_eq!(nice_of(tid), lowered);
            p.follow(Mode::Sync, "test");
            assert_eq!(nice_of(tid), base, "sync replication thread is back at the inherited value");
            assert_eq!(p.current(), base);
            // A policy of 0 never touches the thread.
            let mut q = Priority::of_this_thread(0, "receiver");
            q.follow(Mode::Async, "test");
            assert_eq!(q.current(), nice_of(tid));
        })
        .join()
        .unwrap();
    }
}
