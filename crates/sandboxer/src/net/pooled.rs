//! The network of pooled VMs (warm start). A VM booted before its pod
//! exists gets one NIC on a tap kept in a network namespace of the pool's
//! own; when a pod takes the VM, the tap moves into the pod's namespace
//! under the name a cold boot would give it and is tied to the pod's
//! interface there, exactly as [`super::attach`] ties a new tap. The guest
//! NIC then takes the pod interface's MAC from the agent.
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use netlink_packet_route::link::LinkAttribute;

use super::{
    dump_links, link_index, netns, open, remove, scan, scan_here, step, tap, tap_name, wire,
    GuestNic, NetAttachment, NetError, NETNS_TIMEOUT,
};

/// The pool's network namespace: empty but for the pooled VMs' taps, held
/// open by kuasar-vmm alone (it goes when kuasar-vmm ends).
pub struct PoolNetns {
    fd: OwnedFd,
}

impl PoolNetns {
    /// A new network namespace, made on a thread of its own (the daemon's
    /// threads never change namespace).
    pub fn create() -> io::Result<Self> {
        std::thread::Builder::new()
            .name("kuasar-poolns".into())
            .spawn(|| {
                nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
                let f = File::open("/proc/thread-self/ns/net")?;
                Ok(PoolNetns { fd: f.into() })
            })?
            .join()
            .map_err(|_| io::Error::other("the pool namespace's thread panicked"))?
    }

    /// A path that opens the namespace (from any thread of this process).
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

/// Creates the tap `name` in the pool's namespace; its queue fd goes to
/// the pooled VM.
pub async fn create_tap(pool: &Path, name: &str) -> Result<OwnedFd, NetError> {
    let name = name.to_owned();
    netns::run_in(pool, NETNS_TIMEOUT, move |ns| {
        tap::create(&name).map_err(step(ns, format!("create tap {name}")))
    })
    .await
}

/// The pod's namespace with its one interface and its routes, as
/// [`scan_pod`] found them: what a pooled VM's single NIC is tied to.
pub struct PodLink {
    netns: PathBuf,
    link: scan::FoundLink,
    routes: Vec<super::PodRoute>,
}

/// Scans the pod's namespace for what a pooled VM can serve: exactly one
/// interface (the VM has one NIC). Called before a pooled VM is taken, so
/// that a pod with more interfaces boots its own VM and leaves the pool's
/// untouched ([`NetError::Interfaces`]).
pub async fn scan_pod(pod_netns: &Path) -> Result<PodLink, NetError> {
    let name = tap_name(0);
    netns::run_in(pod_netns, NETNS_TIMEOUT, move |ns| {
        let mut nl = open(ns)?;
        let (mut found, routes) = scan_here(&mut nl, ns)?;
        if found.len() != 1 {
            return Err(NetError::Interfaces {
                netns: ns.to_owned(),
                count: found.len(),
            });
        }
        let link = found.remove(0);
        // What a run that died midway may have left behind.
        remove(&mut nl, ns, &name, &link.config.name)?;
        Ok(PodLink {
            netns: ns.to_owned(),
            link,
            routes,
        })
    })
    .await
}

/// Moves the pooled VM's tap `pool_tap` (in the namespace at `pool`) into
/// the pod's namespace and ties it to the pod's interface (`pod`, from
/// [`scan_pod`]). `tap` is a queue fd of it, kept by the attachment as a
/// cold boot's is.
pub async fn hand_over(
    pool: &Path,
    pool_tap: &str,
    tap: OwnedFd,
    pod: PodLink,
) -> Result<NetAttachment, NetError> {
    let name = tap_name(0);
    let PodLink {
        netns: pod_netns,
        link,
        routes,
    } = pod;
    let (from, to, pod) = (pool_tap.to_owned(), name.clone(), pod_netns.clone());
    netns::run_in(pool, NETNS_TIMEOUT, move |ns| {
        move_link(ns, &from, &pod, &to)
    })
    .await?;
    let wired: scan::FoundLink = link.clone();
    netns::run_in(&pod_netns, NETNS_TIMEOUT, {
        let name = name.clone();
        move |ns| {
            let mut nl = open(ns)?;
            wire(&mut nl, ns, &name, &wired)
        }
    })
    .await?;
    Ok(NetAttachment {
        netns: pod_netns,
        nics: vec![GuestNic {
            tap,
            tap_name: name,
            interface: link.config,
        }],
        routes,
    })
}

/// Moves link `from` of the namespace the thread is in (`ns`) into the
/// namespace at `to_ns`, renamed `to`.
fn move_link(ns: &Path, from: &str, to_ns: &Path, to: &str) -> Result<(), NetError> {
    let mut nl = open(ns)?;
    let links = dump_links(&mut nl, ns)?;
    let index = link_index(&links, from).ok_or_else(|| NetError::Step {
        netns: ns.to_owned(),
        op: format!("find the pooled VM's tap {from}"),
        source: io::Error::from(io::ErrorKind::NotFound),
    })?;
    let target = File::open(to_ns).map_err(|source| NetError::OpenNetns {
        netns: to_ns.to_owned(),
        source,
    })?;
    nl.set_link(
        index,
        false,
        vec![
            LinkAttribute::NetNsFd(target.as_raw_fd()),
            LinkAttribute::IfName(to.to_owned()),
        ],
    )
    .map_err(step(
        ns,
        format!("move tap {from} into {} as {to}", to_ns.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::super::testns::{ip, pod, usable};
    use super::*;

    #[tokio::test]
    async fn a_pooled_tap_moves_into_the_pod_and_is_tied_to_its_interface() {
        if !usable() {
            return;
        }
        let (ns, _peer, pod) = pod("pt", "10.251.0.5/24");
        let n = ns.0.as_str();
        let pool = PoolNetns::create().expect("pool namespace");
        let tap = create_tap(&pool.path(), "kpool-test").await.expect("tap");
        let found = scan_pod(&pod).await.expect("scan the pod");
        let att = hand_over(&pool.path(), "kpool-test", tap, found)
            .await
            .expect("hand over");
        assert_eq!(att.nics.len(), 1);
        assert_eq!(att.nics[0].interface.cidrs(), ["10.251.0.5/24"]);
        let link = ip(&["-n", n, "link", "show", "dev", &att.nics[0].tap_name]);
        assert!(link.contains("mtu 1400") && link.contains(",UP"), "{link}");
        super::super::detach(att).await.expect("detach");
        assert!(!ip(&["-n", n, "link", "show"]).contains(super::super::TAP_SUFFIX));

        // A pod with more interfaces (eth0, eth1 and its peer) is refused.
        ip(&[
            "-n", n, "link", "add", "name", "eth1", "type", "veth", "peer", "name", "p1",
        ]);
        let err = scan_pod(&pod).await.err().expect("two interfaces refused");
        assert!(err.to_string().contains("3 pod interfaces"), "{err}");
    }
}
