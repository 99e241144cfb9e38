//! The pod's life as containerd's sandbox API sees it (the `shim`
//! sandboxer mode): create, start (boot the VM), status, wait, stop.
//! In the `podsandbox` mode the pause container plays this part instead.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::phase::{begin_teardown, end_teardown, Phase, Reason, TeardownStep};
use super::*;

/// How long a removed sandbox's VM gets to quit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// What SandboxStatus reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodStatus {
    /// The VM runs and its agent answers.
    pub ready: bool,
    /// The VMM's pid (0 before start and after the end).
    pub pid: u32,
    pub created_at: SystemTime,
    pub exited_at: Option<SystemTime>,
}

impl Sandbox {
    /// Records the pod a CreateSandbox describes. Idempotent for the same
    /// pod; a pod that differs from the one recorded is refused.
    pub fn create_pod(&self, pod: PodConfig) -> Result<()> {
        let mut current = self.pod.lock().unwrap_or_else(|p| p.into_inner());
        if self.managed.load(Ordering::SeqCst) {
            if current.as_ref() == Some(&pod) {
                return Ok(());
            }
            return Err(Error::AlreadyExists(format!("sandbox {}", self.info.id)));
        }
        *current = Some(pod);
        self.managed.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Whether containerd drives this sandbox through the sandbox API.
    pub fn is_managed(&self) -> bool {
        self.managed.load(Ordering::SeqCst)
    }

    /// Boots the pod's VM (once); returns the VMM's pid and when the
    /// sandbox was created.
    pub async fn start_pod(self: &Arc<Self>) -> Result<(u32, SystemTime)> {
        if self.phase.borrow().ended().is_some() {
            return Err(Error::FailedPrecondition(format!(
                "sandbox {} was stopped; create a new one",
                self.info.id
            )));
        }
        self.ensure_vm().await?;
        let pid = self.live().map(|live| live.pid).unwrap_or(0);
        Ok((pid, self.created()))
    }

    fn created(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.created_at)
    }

    pub fn pod_status(&self) -> PodStatus {
        let phase = self.phase.borrow();
        PodStatus {
            ready: phase.live().is_some(),
            pid: phase.live().map(|live| live.pid).unwrap_or(0),
            created_at: self.created(),
            exited_at: phase.ended().map(|e| e.at),
        }
    }

    /// Blocks until the sandbox ends; returns its exit status and time.
    pub async fn wait_pod(&self) -> (u32, SystemTime) {
        let mut rx = self.phase.subscribe();
        let ended = rx
            .wait_for(|p| p.ended().is_some())
            .await
            .ok()
            .and_then(|p| p.ended().map(|e| (e.status, e.at)));
        // None: the sandbox is gone (the sender dropped): it ended.
        ended.unwrap_or((0, SystemTime::now()))
    }

    /// Stops the pod's VM: its processes are reported killed, the VM is
    /// stopped and what it held on the host released; the sandbox stays
    /// known (NOTREADY) until removed. Idempotent.
    pub async fn stop_pod(&self, grace: Duration) -> Result<()> {
        self.teardown(Reason::Stop { grace }).await;
        Ok(())
    }

    /// Removes the sandbox: stops its VM if it runs (its processes reported
    /// killed) and removes everything it has on the host.
    pub async fn shutdown(&self) {
        self.teardown(Reason::Remove).await;
    }

    /// Waits until no boot or teardown is under way, then runs `step` on
    /// the phase; what it returns unless it asks to wait again.
    pub(super) async fn settled<T>(&self, mut step: impl FnMut(&mut Phase) -> Option<T>) -> T {
        let mut rx = self.phase.subscribe();
        loop {
            let mut out = None;
            self.phase.send_if_modified(|p| {
                out = step(p);
                // A step that does not wait may have changed the phase.
                out.is_some()
            });
            if let Some(out) = out {
                return out;
            }
            // Wait for the boot or teardown under way to end.
            let _ = rx.wait_for(|p| p.is_settled()).await;
        }
    }

    /// The one way a sandbox ends, whatever the reason: takes the VM out of
    /// the running phase (nothing new starts on it), reports every process
    /// not yet exited as killed (137), stops the VM, releases its network,
    /// port forwarding and shared files, and records the end. Removing the
    /// sandbox also forgets its containers and removes its directory.
    pub(super) async fn teardown(&self, reason: Reason) {
        let live = match self
            .settled(|p| match begin_teardown(p, reason) {
                TeardownStep::Wait => None,
                TeardownStep::Done => Some(None),
                TeardownStep::Proceed(live) => Some(Some(live)),
            })
            .await
        {
            None => return,
            Some(live) => live,
        };
        match reason {
            Reason::VmDied(exit) => {
                tracing::error!(sandbox = %self.info.id, ?exit, "the VM exited unexpectedly")
            }
            Reason::Stop { .. } | Reason::Remove => {}
        }
        let containers: Vec<_> = if reason == Reason::Remove {
            self.containers().drain().map(|(_, c)| c).collect()
        } else {
            self.containers().values().cloned().collect()
        };
        self.report_all_killed(&containers).await;
        let shape = live.as_ref().map(|live| live.shape.clone());
        let had_vm = live.is_some();
        if let Some(live) = live {
            let grace = match reason {
                Reason::Stop { grace } => Some(grace),
                Reason::Remove => Some(STOP_GRACE),
                Reason::VmDied(_) => None,
            };
            if let Some(grace) = grace {
                if let Err(e) = live.vmm.lock().await.stop(grace).await {
                    tracing::error!(sandbox = %self.info.id, "{e}");
                }
            }
            let held = std::mem::take(&mut *live.held.lock().unwrap_or_else(|p| p.into_inner()));
            self.release(held).await;
        }
        if reason == Reason::Remove {
            if let Err(e) = mount::remove_dir(&self.dir) {
                tracing::warn!(dir = %self.dir.display(), "remove sandbox directory: {e}");
            }
        } else {
            self.release_files();
        }
        let shape = shape.or_else(|| self.phase.borrow().ended().and_then(|e| e.shape.clone()));
        self.phase.send_modify(|p| end_teardown(p, reason, shape));
        match reason {
            Reason::Remove => tracing::info!(sandbox = %self.info.id, "sandbox removed"),
            Reason::Stop { .. } | Reason::VmDied(_) => {
                if had_vm {
                    // Its end, for a restarted sandboxer: no exit is
                    // reported twice.
                    self.save_record();
                    tracing::info!(sandbox = %self.info.id, "sandbox VM stopped");
                }
            }
        }
    }

    /// What a stopped VM leaves that goes at once: the mounts and the
    /// shared directory, the sockets. state.json and the logs stay until
    /// the sandbox is removed.
    fn release_files(&self) {
        for path in [
            self.dir.join("shared"),
            self.dir.join("agent.sock"),
            self.dir.join("qmp.sock"),
            // virtiofsd's (virtio-fs), which kuasar-vmm made.
            self.dir.join("fs.sock"),
        ] {
            let res = if path.is_dir() {
                mount::remove_dir(&path)
            } else {
                std::fs::remove_file(&path)
            };
            if let Err(e) = res {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), "release: {e}");
                }
            }
        }
    }

    /// Stops every process's output copies and reports the processes not
    /// yet exited as killed (137): the VM they ran in is gone.
    async fn report_all_killed(&self, containers: &[Arc<Container>]) {
        for c in containers {
            for p in c.all_processes() {
                p.pumps.lock().await.abort();
                if matches!(p.state(), ProcState::Running | ProcState::Created) {
                    self.report_exit(&p, 137, SystemTime::now()).await;
                }
            }
        }
    }
}
