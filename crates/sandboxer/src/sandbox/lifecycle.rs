//! The pod's life as containerd's sandbox API sees it (the `shim`
//! sandboxer mode): create, start (boot the VM), status, wait, stop.
//! In the `podsandbox` mode the pause container plays this part instead.
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::*;

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
        if self.exit.borrow().is_some() {
            return Err(Error::FailedPrecondition(format!(
                "sandbox {} was stopped; create a new one",
                self.info.id
            )));
        }
        self.ensure_vm().await?;
        Ok((self.vmm_pid.load(Ordering::Relaxed), self.created()))
    }

    fn created(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.created_at)
    }

    pub fn pod_status(&self) -> PodStatus {
        let exit = *self.exit.borrow();
        PodStatus {
            ready: self.is_running(),
            pid: if exit.is_none() {
                self.vmm_pid.load(Ordering::Relaxed)
            } else {
                0
            },
            created_at: self.created(),
            exited_at: exit.map(|(_, at)| at),
        }
    }

    /// Blocks until the sandbox ends; returns its exit status and time.
    pub async fn wait_pod(&self) -> (u32, SystemTime) {
        let mut rx = self.exit.subscribe();
        let ended = rx.wait_for(Option::is_some).await.map(|v| *v);
        match ended {
            Ok(Some(exit)) => exit,
            // The sandbox is gone (the sender dropped): it ended.
            _ => (0, SystemTime::now()),
        }
    }

    /// Records the sandbox's end (the first one counts) and wakes waiters.
    pub(super) fn mark_exited(&self, status: u32) {
        self.exit.send_if_modified(|e| {
            if e.is_some() {
                return false;
            }
            *e = Some((status, SystemTime::now()));
            true
        });
    }

    /// Stops the pod's VM: its processes are reported killed, the VM is
    /// stopped and what it held on the host released; the sandbox stays
    /// known (NOTREADY) until shut down. Idempotent.
    pub async fn stop_pod(&self, grace: Duration) -> Result<()> {
        let mut vm = self.vm.lock().await;
        let Some(mut v) = vm.take() else {
            self.mark_exited(0);
            return Ok(());
        };
        self.stopping.store(true, Ordering::SeqCst);
        self.report_all_killed().await;
        *self.agent.write().unwrap_or_else(|p| p.into_inner()) = None;
        self.mark_exited(0);
        if let Err(e) = v.stop(grace).await {
            tracing::error!(sandbox = %self.info.id, "{e}");
        }
        self.detach_net(None).await;
        let shared = self.dir.join("shared");
        if let Err(e) = mount::remove_dir(&shared) {
            tracing::warn!(dir = %shared.display(), "release: {e}");
        }
        tracing::info!(sandbox = %self.info.id, "sandbox VM stopped");
        Ok(())
    }
}
