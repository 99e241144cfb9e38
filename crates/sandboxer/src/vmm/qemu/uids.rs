//! One uid per QEMU (its gid the same number), from `[qemu] uid_base` on:
//! two VMs' QEMUs never share a uid, so a guest that took one over can
//! neither signal, trace nor read the memory of another. The numbers need
//! no entry in /etc/passwd.
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// The uids of `[qemu] uid_base .. uid_base + uid_count`, and which are held.
#[derive(Debug)]
pub struct Uids {
    base: u32,
    count: u32,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    held: BTreeSet<u32>,
    /// Where the next search starts: a uid just given back is the last to
    /// be handed out again.
    next: u32,
}

/// A uid held by one QEMU; given back when dropped.
#[derive(Debug)]
pub struct UidLease {
    uid: u32,
    uids: Arc<Uids>,
}

impl UidLease {
    pub fn uid(&self) -> u32 {
        self.uid
    }
}

impl Drop for UidLease {
    fn drop(&mut self) {
        let mut s = self.uids.state.lock().unwrap_or_else(|e| e.into_inner());
        s.held.remove(&self.uid);
    }
}

impl Uids {
    pub fn new(base: u32, count: u32) -> Arc<Self> {
        Arc::new(Uids {
            base,
            count,
            state: Mutex::default(),
        })
    }

    /// A free uid, or None when all `count` are held.
    pub fn take(self: &Arc<Self>) -> Option<UidLease> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for i in 0..self.count {
            let offset = (s.next + i) % self.count;
            let uid = self.base + offset;
            if s.held.insert(uid) {
                s.next = (offset + 1) % self.count;
                return Some(UidLease {
                    uid,
                    uids: self.clone(),
                });
            }
        }
        None
    }

    /// Holds `uid`, the uid of a QEMU adopted after a restart; None when it
    /// is outside the range (a QEMU started unconfined) or already held.
    pub fn claim(self: &Arc<Self>, uid: u32) -> Option<UidLease> {
        let in_range = uid >= self.base && uid - self.base < self.count;
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        (in_range && s.held.insert(uid)).then(|| UidLease {
            uid,
            uids: self.clone(),
        })
    }
}

/// The real uid of process `pid` (`Uid:` of its /proc status).
pub fn uid_of(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_lease_is_its_own_uid_and_a_returned_one_comes_back_last() {
        let uids = Uids::new(1000, 3);
        let a = uids.take().unwrap();
        let b = uids.take().unwrap();
        assert_eq!((a.uid(), b.uid()), (1000, 1001));
        drop(a);
        let c = uids.take().unwrap();
        assert_eq!(c.uid(), 1002, "the freed 1000 is not reused first");
        let d = uids.take().unwrap();
        assert_eq!(d.uid(), 1000);
        assert!(uids.take().is_none(), "all three are held");
    }

    #[test]
    fn an_adopted_uid_is_held_once_and_only_in_range() {
        let uids = Uids::new(1000, 3);
        let a = uids.claim(1001).unwrap();
        assert!(uids.claim(1001).is_none());
        assert!(uids.claim(999).is_none());
        assert!(uids.claim(1003).is_none());
        let b = uids.take().unwrap();
        let c = uids.take().unwrap();
        assert_eq!((b.uid(), c.uid()), (1000, 1002));
        drop(a);
        assert_eq!(uids.take().unwrap().uid(), 1001);
    }

    #[test]
    fn our_own_uid_is_read_from_proc() {
        let me = nix::unistd::getuid().as_raw();
        assert_eq!(uid_of(std::process::id()), Some(me));
    }
}
