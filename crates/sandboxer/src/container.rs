//! The sandboxer's view of containers and their processes.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use kuasar_api::ids::{self, IdError};
use tokio::sync::watch;

use crate::io::{Pumps, StdioPaths};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcState {
    Created,
    Running,
    Stopped {
        exit_status: u32,
        exited_at: SystemTime,
    },
}

pub struct Process {
    pub container_id: String,
    /// Empty for a container's init process.
    pub exec_id: String,
    pub stdio: StdioPaths,
    /// An exec's OCI process, as JSON (empty for init).
    pub spec: Vec<u8>,
    pid: AtomicU32,
    state: watch::Sender<ProcState>,
    pub pumps: tokio::sync::Mutex<Pumps>,
}

impl Process {
    pub fn new(container_id: &str, exec_id: &str, stdio: StdioPaths, spec: Vec<u8>) -> Arc<Self> {
        Arc::new(Process {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            stdio,
            spec,
            pid: AtomicU32::new(0),
            state: watch::channel(ProcState::Created).0,
            pumps: tokio::sync::Mutex::new(Pumps::default()),
        })
    }

    /// The id containerd uses for the process in events.
    pub fn id(&self) -> &str {
        if self.exec_id.is_empty() {
            &self.container_id
        } else {
            &self.exec_id
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid.load(Ordering::Relaxed)
    }

    pub fn set_pid(&self, pid: u32) {
        self.pid.store(pid, Ordering::Relaxed);
    }

    pub fn state(&self) -> ProcState {
        *self.state.borrow()
    }

    pub fn set_running(&self) {
        self.state.send_if_modified(|s| {
            let created = *s == ProcState::Created;
            if created {
                *s = ProcState::Running;
            }
            created
        });
    }

    /// Records the exit; false when it was already recorded.
    pub fn set_exited(&self, exit_status: u32, exited_at: SystemTime) -> bool {
        self.state.send_if_modified(|s| {
            let first = !matches!(s, ProcState::Stopped { .. });
            if first {
                *s = ProcState::Stopped {
                    exit_status,
                    exited_at,
                };
            }
            first
        })
    }

    /// Waits until the process has exited.
    pub async fn wait(&self) -> (u32, SystemTime) {
        let mut rx = self.state.subscribe();
        loop {
            if let ProcState::Stopped {
                exit_status,
                exited_at,
            } = *rx.borrow_and_update()
            {
                return (exit_status, exited_at);
            }
            if rx.changed().await.is_err() {
                return (255, SystemTime::now());
            }
        }
    }
}

pub struct Container {
    pub id: String,
    pub bundle: String,
    /// Host directory holding the mounted rootfs (`<shared>/<id>`).
    pub dir: PathBuf,
    pub init: Arc<Process>,
    pub execs: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    pub fn process(&self, exec_id: &str) -> Option<Arc<Process>> {
        if exec_id.is_empty() {
            return Some(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(exec_id)
            .cloned()
    }

    pub fn all_processes(&self) -> Vec<Arc<Process>> {
        let mut all = vec![self.init.clone()];
        all.extend(
            self.execs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned(),
        );
        all
    }
}

/// Checks an id that becomes a path component or a guest object name, with
/// kuasar-vmm's rules ([`ids::Boundary::Sandboxer`]).
pub fn validate_id(what: &str, id: &str) -> Result<(), crate::error::Error> {
    ids::check(ids::Boundary::Sandboxer, id).map_err(|e| {
        let why = match e {
            IdError::Empty => "is empty".to_owned(),
            IdError::TooLong { max, .. } => format!("is longer than {max} bytes"),
            IdError::DotName | IdError::DotDot => "contains `..`".to_owned(),
            IdError::BadChar(_) => "may only contain letters, digits and - _ . + @ :".to_owned(),
        };
        crate::error::Error::InvalidArgument(format!("{what} id {id:?} {why}"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("container", "abc-1_2.x").is_ok());
        for bad in ["", ".", "..", "a/b", "../x", "a..b", "x y", &"x".repeat(77)] {
            let err = validate_id("container", bad).unwrap_err().to_string();
            assert!(err.starts_with("invalid argument: container id"), "{err}");
        }
        // The wording kuasar-vmm has always used.
        let said = |id: &str| validate_id("sandbox", id).unwrap_err().to_string();
        assert_eq!(said(""), r#"invalid argument: sandbox id "" is empty"#);
        assert!(said(&"x".repeat(77)).ends_with(" is longer than 76 bytes"));
        assert_eq!(
            said("."),
            r#"invalid argument: sandbox id "." contains `..`"#
        );
        assert_eq!(
            said("a..b"),
            r#"invalid argument: sandbox id "a..b" contains `..`"#
        );
        assert_eq!(
            said("a/b"),
            r#"invalid argument: sandbox id "a/b" may only contain letters, digits and - _ . + @ :"#
        );
    }

    #[tokio::test]
    async fn exit_is_recorded_once_and_wakes_waiters() {
        let p = Process::new("c", "", StdioPaths::default(), vec![]);
        p.set_running();
        let waiter = {
            let p = p.clone();
            tokio::spawn(async move { p.wait().await.0 })
        };
        let at = SystemTime::now();
        assert!(p.set_exited(7, at));
        assert!(!p.set_exited(9, at));
        assert_eq!(waiter.await.unwrap(), 7);
        assert_eq!(p.id(), "c");
    }
}
