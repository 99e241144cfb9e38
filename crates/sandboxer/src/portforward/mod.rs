//! Port forwarding for VM pods (CRI PortForward, `kubectl port-forward`).
//!
//! containerd serves a port-forward by entering the pod's network namespace
//! and dialing 127.0.0.1:PORT there. In a VM pod nothing listens in that
//! namespace: the pod's containers run in the guest. So, per pod, kuasar-vmm
//! keeps a relay in the namespace:
//!
//! - a TCP listener on 127.0.0.1 (an ephemeral port) in the pod's namespace,
//!   reachable from nowhere else (loopback of that namespace only);
//! - a netfilter rule there ([`rules`]) redirecting every TCP connection made
//!   to 127.0.0.1 (any port but the relay's own) to the listener;
//! - for each connection, the original port (`SO_ORIGINAL_DST`), a guest
//!   connection to 127.0.0.1:PORT opened by the agent, and the bytes moved
//!   both ways with agent calls ([`relay`]).
//!
//! Started once the VM is up and the pod's network attached, or when a
//! restarted kuasar-vmm takes the pod back; stopped (task, listener and rule
//! gone) when the pod's network is detached: the pod stops or its VM dies.
mod relay;
pub mod rules;

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::agent::Agent;
use crate::net::netns;
use crate::net::NetError;

pub use relay::Limits;

/// How long the namespace work (bind, rules) may take.
const NETNS_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum StartPortForwardError {
    #[error("start port forwarding in {netns}")]
    Netns {
        netns: PathBuf,
        #[source]
        source: NetError,
    },
    #[error("bind the port-forward relay on 127.0.0.1 in {netns}")]
    Bind {
        netns: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("redirect 127.0.0.1 to the port-forward relay in {netns}")]
    Rules {
        netns: PathBuf,
        #[source]
        source: rules::IptablesError,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StopPortForwardError {
    #[error("stop port forwarding in {netns}")]
    Netns {
        netns: PathBuf,
        #[source]
        source: NetError,
    },
    #[error("remove the port-forward redirect in {netns}")]
    Rules {
        netns: PathBuf,
        #[source]
        source: rules::IptablesError,
    },
}

/// A pod's running relay. Dropping it ends the relay (and every connection
/// it carries) but leaves the rule: [`PortForward::stop`] removes both.
#[derive(Debug)]
pub struct PortForward {
    netns: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for PortForward {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl PortForward {
    /// Starts the relay of pod `sandbox` in `netns` towards `agent`'s guest:
    /// the guest's connections of an earlier relay are closed first.
    pub async fn start(
        sandbox: &str,
        netns: &Path,
        agent: Agent,
    ) -> Result<Self, StartPortForwardError> {
        match agent.port_forward_reset().await {
            Ok(()) => {}
            Err(e) if e.is_unimplemented() => tracing::warn!(
                sandbox,
                "the guest agent has no port forwarding (a guest image older than kuasar-vmm): port-forward connections to this pod will be closed"
            ),
            Err(e) => tracing::warn!(sandbox, "port forwarding: reset the guest's connections: {}", crate::error::chain(&e)),
        }
        let listener = netns::run_in(netns, NETNS_TIMEOUT, |ns| Ok(listen_here(ns)))
            .await
            .map_err(|source| StartPortForwardError::Netns {
                netns: netns.to_owned(),
                source,
            })??;
        let relay_port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
        let listener = listener
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(listener))
            .map_err(|source| StartPortForwardError::Bind {
                netns: netns.to_owned(),
                source,
            });
        let listener = match listener {
            Ok(l) => l,
            Err(e) => {
                let _ = remove_rules(netns).await;
                return Err(e);
            }
        };
        let task = tokio::spawn(relay::serve(
            listener,
            Arc::new(agent),
            Limits::default(),
            sandbox.to_owned(),
            relay::original_port,
        ));
        tracing::info!(sandbox, netns = %netns.display(), relay_port, "port forwarding ready");
        Ok(PortForward {
            netns: netns.to_owned(),
            task,
        })
    }

    /// Ends the relay and removes its rule.
    pub async fn stop(self) -> Result<(), StopPortForwardError> {
        self.task.abort();
        remove_rules(&self.netns).await
    }
}

/// Runs inside the namespace: binds the listener, then points the rule at
/// it (a half-made rule is removed again).
fn listen_here(netns: &Path) -> Result<std::net::TcpListener, StartPortForwardError> {
    let listener = std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))
        .map_err(|source| StartPortForwardError::Bind {
            netns: netns.to_owned(),
            source,
        })?;
    let port = listener
        .local_addr()
        .map_err(|source| StartPortForwardError::Bind {
            netns: netns.to_owned(),
            source,
        })?
        .port();
    if let Err(source) = rules::install(port) {
        let _ = rules::remove();
        return Err(StartPortForwardError::Rules {
            netns: netns.to_owned(),
            source,
        });
    }
    Ok(listener)
}

/// Removes the relay's rule from `netns` (a namespace already gone has none).
pub async fn remove_rules(netns: &Path) -> Result<(), StopPortForwardError> {
    let res = netns::run_in(netns, NETNS_TIMEOUT, |_| Ok(rules::remove())).await;
    match res {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(StopPortForwardError::Rules {
            netns: netns.to_owned(),
            source,
        }),
        Err(NetError::OpenNetns { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            Ok(())
        }
        Err(source) => Err(StopPortForwardError::Netns {
            netns: netns.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Removes the test namespace however the test ends.
    struct Ns(String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    fn nat_rules(ns: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", ns, rules::IPTABLES, "-t", "nat", "-S"])
            .output()
            .expect("run iptables");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[tokio::test]
    async fn the_rule_sends_any_loopback_port_to_the_relay_and_goes_again() {
        let have_iptables = Command::new(rules::IPTABLES)
            .arg("--version")
            .output()
            .is_ok();
        if !nix::unistd::Uid::effective().is_root() || !have_iptables {
            eprintln!("SKIP: needs root and iptables");
            return;
        }
        let ns = Ns(format!("kuasar-pf-ut-{}", std::process::id()));
        let st = Command::new("ip").args(["netns", "add", &ns.0]).status();
        assert!(st.unwrap().success());
        let st = Command::new("ip")
            .args(["-n", &ns.0, "link", "set", "lo", "up"])
            .status();
        assert!(st.unwrap().success());
        let path = PathBuf::from(format!("/var/run/netns/{}", ns.0));
        let listener = netns::run_in(&path, NETNS_TIMEOUT, |ns| Ok(listen_here(ns)))
            .await
            .unwrap()
            .unwrap();
        let relay_port = listener.local_addr().unwrap().port();
        let rules = nat_rules(&ns.0);
        assert!(
            rules.contains(&format!("-A OUTPUT -j {}", rules::CHAIN)),
            "{rules}"
        );
        assert!(
            rules.contains(&format!("--to-ports {relay_port}")),
            "{rules}"
        );
        // A client in the namespace dials 127.0.0.1:8080: the relay gets it
        // and reads 8080.
        let client = netns::run_in(&path, NETNS_TIMEOUT, |_| {
            Ok(std::net::TcpStream::connect(("127.0.0.1", 8080)))
        })
        .await
        .unwrap()
        .expect("the redirect answers for port 8080");
        let (accepted, _) = listener.accept().unwrap();
        accepted.set_nonblocking(true).unwrap();
        let accepted = tokio::net::TcpStream::from_std(accepted).unwrap();
        assert_eq!(relay::original_port(&accepted).unwrap(), 8080);
        drop((client, accepted));
        // Nothing answers on the relay's port from the root namespace.
        assert!(std::net::TcpStream::connect(("127.0.0.1", relay_port)).is_err());
        remove_rules(&path).await.unwrap();
        let rules = nat_rules(&ns.0);
        assert!(!rules.contains(rules::CHAIN), "{rules}");
        // Twice is fine, and so is a namespace that is gone.
        remove_rules(&path).await.unwrap();
        remove_rules(Path::new("/var/run/netns/kuasar-pf-none"))
            .await
            .unwrap();
    }
}
