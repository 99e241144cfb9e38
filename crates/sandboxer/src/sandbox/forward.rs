//! The sandbox's port-forward relay (`crate::portforward`): started when
//! the VM is up with the pod's network attached (or taken back after a
//! restart), stopped with the pod's network.
use super::*;
use crate::portforward::PortForward;

impl Sandbox {
    /// Starts the pod's relay in `netns` towards `agent`. A failure is
    /// logged: the pod runs on, without port forwarding. The relay stops
    /// with the VM (`Sandbox::release`).
    pub(super) async fn start_port_forward(
        &self,
        netns: &Path,
        agent: &Agent,
    ) -> Option<PortForward> {
        match PortForward::start(&self.info.id, netns, agent.clone()).await {
            Ok(pf) => Some(pf),
            Err(e) => {
                tracing::warn!(
                    sandbox = %self.info.id,
                    "no port forwarding for this pod: {}",
                    crate::error::chain(&e)
                );
                None
            }
        }
    }
}
