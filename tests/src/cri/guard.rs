//! Guards that remove what a test created through CRI, also when it panics.
use super::client::Cri;
use super::proto::PodSandboxConfig;
use super::Code;

/// A pod; stopped and removed when dropped.
pub struct PodGuard<'a> {
    cri: &'a Cri,
    pub id: String,
    pub config: PodSandboxConfig,
}

impl<'a> PodGuard<'a> {
    /// RunPodSandbox with `handler`.
    pub fn run(
        cri: &'a Cri,
        config: PodSandboxConfig,
        handler: &str,
    ) -> Result<Self, super::Status> {
        let id = cri.run_pod(&config, handler)?;
        Ok(Self { cri, id, config })
    }

    /// Stops and removes the pod now (also its containers); the guard then
    /// has nothing left to do.
    pub fn remove(mut self) -> Result<(), super::Status> {
        let id = std::mem::take(&mut self.id);
        self.cri.stop_and_remove_pod(&id)
    }
}

impl Drop for PodGuard<'_> {
    fn drop(&mut self) {
        if self.id.is_empty() {
            return;
        }
        if let Err(e) = self.cri.stop_and_remove_pod(&self.id) {
            eprintln!("kuasar-e2e: removing pod {}: {e}", self.id);
        }
    }
}

/// A container; stopped (no grace period) and removed when dropped.
pub struct ContainerGuard<'a> {
    cri: &'a Cri,
    pub id: String,
}

impl<'a> ContainerGuard<'a> {
    pub fn new(cri: &'a Cri, id: String) -> Self {
        Self { cri, id }
    }
}

impl Drop for ContainerGuard<'_> {
    fn drop(&mut self) {
        let _ = self.cri.stop_container(&self.id, 0);
        match self.cri.remove_container(&self.id) {
            Err(e) if e.code() != Code::NotFound => {
                eprintln!("kuasar-e2e: removing container {}: {e}", self.id)
            }
            _ => {}
        }
    }
}
