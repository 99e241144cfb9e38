//! The one child reaper of PID 1.
//!
//! Every child (OCI runtime invocations, and container processes re-parented to the
//! agent) is reaped here with `waitpid(-1, WNOHANG)` on SIGCHLD. Whoever wants
//! the exit status of a pid registers with [`Reaper::watch`]; exits nobody has
//! asked for yet are kept ("unclaimed") so a process that exits before its pid
//! is known (pid files are read after the runtime returns) is not lost. Each recorded
//! exit gets a sequence number: a watcher only claims exits recorded after
//! the spawn it cares about ([`Reaper::mark`]), so a stale exit of a reused
//! pid is never handed out.
use std::collections::{HashMap, VecDeque};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;
use tracing::{debug, warn};

/// How many unclaimed exits are remembered (oldest are forgotten first).
const MAX_UNCLAIMED: usize = 1024;

/// A process's end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExitInfo {
    /// The exit code, or 128 + the signal that ended the process.
    pub status: u32,
    /// Nanoseconds since the Unix epoch.
    pub at_ns: i64,
}

/// Maps a wait status to (pid, exit status); `None` for stop/continue events.
pub fn exit_status(ws: &WaitStatus) -> Option<(i32, u32)> {
    match *ws {
        WaitStatus::Exited(pid, code) => Some((pid.as_raw(), (code & 0xff) as u32)),
        WaitStatus::Signaled(pid, sig, _) => Some((pid.as_raw(), 128 + sig as i32 as u32)),
        _ => None,
    }
}

#[derive(Default)]
struct State {
    /// Sequence number the next recorded exit gets.
    seq: u64,
    unclaimed: HashMap<i32, (u64, ExitInfo)>,
    order: VecDeque<(i32, u64)>,
    waiters: HashMap<i32, oneshot::Sender<ExitInfo>>,
}

#[derive(Default)]
pub struct Reaper {
    state: Mutex<State>,
    /// Held (shared) while spawning, (exclusive) while reaping: the standard
    /// library waits for a child itself when its exec fails, which must not
    /// race with `waitpid(-1)`.
    spawn_lock: RwLock<()>,
}

impl Reaper {
    /// Creates the reaper and starts reaping on SIGCHLD. Needs a tokio runtime.
    pub fn start() -> std::io::Result<Arc<Self>> {
        let reaper = Arc::new(Reaper::default());
        let mut sigchld = signal(SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    warn!("SIGCHLD stream ended");
                    return;
                }
            }
        });
        Ok(reaper)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The mark to pass to [`Reaper::watch`] for a process spawned after now.
    pub fn mark(&self) -> u64 {
        self.lock().seq
    }

    /// Resolves with the exit of `pid`, considering only exits recorded at or
    /// after `since` (see [`Reaper::mark`]).
    pub fn watch(&self, pid: i32, since: u64) -> oneshot::Receiver<ExitInfo> {
        let (tx, rx) = oneshot::channel();
        let mut st = self.lock();
        if let Some(&(seq, info)) = st.unclaimed.get(&pid) {
            if seq >= since {
                st.unclaimed.remove(&pid);
                let _ = tx.send(info);
                return rx;
            }
        }
        st.waiters.insert(pid, tx);
        rx
    }

    /// Spawns `cmd` and returns its pid with a receiver of its exit.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<(i32, oneshot::Receiver<ExitInfo>)> {
        let _guard = self.spawn_lock.read().unwrap_or_else(|e| e.into_inner());
        let mark = self.mark();
        let child: Child = cmd.spawn()?;
        let pid = child.id() as i32;
        // Dropping a Child neither kills nor waits for it.
        drop(child);
        Ok((pid, self.watch(pid, mark)))
    }

    /// Reaps every exited child without blocking.
    pub fn reap_all(&self) {
        let _guard = self.spawn_lock.write().unwrap_or_else(|e| e.into_inner());
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(ws) => {
                    if let Some((pid, status)) = exit_status(&ws) {
                        self.record(pid, status);
                    }
                }
                Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!("waitpid: {e}");
                    return;
                }
            }
        }
    }

    fn record(&self, pid: i32, status: u32) {
        let info = ExitInfo {
            status,
            at_ns: now_ns(),
        };
        debug!(pid, status, "reaped");
        let mut st = self.lock();
        if let Some(tx) = st.waiters.remove(&pid) {
            let _ = tx.send(info);
            return;
        }
        let seq = st.seq;
        st.seq += 1;
        st.unclaimed.insert(pid, (seq, info));
        st.order.push_back((pid, seq));
        while st.order.len() > MAX_UNCLAIMED {
            if let Some((old_pid, old_seq)) = st.order.pop_front() {
                if st
                    .unclaimed
                    .get(&old_pid)
                    .is_some_and(|&(s, _)| s == old_seq)
                {
                    st.unclaimed.remove(&old_pid);
                }
            }
        }
    }
}

/// Nanoseconds since the Unix epoch.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use nix::unistd::Pid;

    #[test]
    fn exit_status_mapping() {
        let pid = Pid::from_raw(42);
        assert_eq!(exit_status(&WaitStatus::Exited(pid, 0)), Some((42, 0)));
        assert_eq!(exit_status(&WaitStatus::Exited(pid, 7)), Some((42, 7)));
        assert_eq!(
            exit_status(&WaitStatus::Signaled(pid, Signal::SIGKILL, false)),
            Some((42, 137))
        );
        assert_eq!(
            exit_status(&WaitStatus::Signaled(pid, Signal::SIGTERM, true)),
            Some((42, 143))
        );
        assert_eq!(
            exit_status(&WaitStatus::Stopped(pid, Signal::SIGSTOP)),
            None
        );
        assert_eq!(exit_status(&WaitStatus::Continued(pid)), None);
    }

    #[test]
    fn early_exit_is_kept_until_claimed() {
        let r = Reaper::default();
        let mark = r.mark();
        r.record(10, 3);
        let mut rx = r.watch(10, mark);
        assert_eq!(rx.try_recv().unwrap().status, 3);
        // Claimed once only.
        let mut rx = r.watch(10, mark);
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn stale_exit_of_reused_pid_is_ignored() {
        let r = Reaper::default();
        r.record(11, 1);
        let mark = r.mark();
        let mut rx = r.watch(11, mark);
        assert!(rx.try_recv().is_err());
        r.record(11, 2);
        assert_eq!(rx.try_recv().unwrap().status, 2);
    }

    #[test]
    fn unclaimed_exits_are_bounded() {
        let r = Reaper::default();
        for pid in 0..(MAX_UNCLAIMED as i32 + 10) {
            r.record(pid, 0);
        }
        let st = r.lock();
        assert_eq!(st.unclaimed.len(), MAX_UNCLAIMED);
        assert!(!st.unclaimed.contains_key(&0));
    }
}
