//! The sandbox's port-forward relay (`crate::portforward`): started when
//! the VM is up with the pod's network attached (or taken back after a
//! restart), stopped with the pod's network.
use super::*;
use crate::portforward::PortForward;

impl Sandbox {
    /// Starts the pod's relay in `netns` towards `agent`. A failure is
    /// logged: the pod runs on, without port forwarding.
    pub(super) async fn start_port_forward(&self, netns: &Path, agent: &Agent) {
        self.stop_port_forward().await;
        match PortForward::start(&self.info.id, netns, agent.clone()).await {
            Ok(pf) => {
                *self.port_forward.lock().unwrap_or_else(|p| p.into_inner()) = Some(pf);
            }
            Err(e) => tracing::warn!(
                sandbox = %self.info.id,
                "no port forwarding for this pod: {}",
                crate::error::chain(&e)
            ),
        }
    }

    /// Ends the pod's relay (its connections, listener and rule), if any.
    pub(super) async fn stop_port_forward(&self) {
        let pf = self
            .port_forward
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some(pf) = pf else { return };
        match pf.stop().await {
            Ok(()) => tracing::debug!(sandbox = %self.info.id, "port forwarding stopped"),
            Err(e) => tracing::warn!(sandbox = %self.info.id, "{}", crate::error::chain(&e)),
        }
    }
}
