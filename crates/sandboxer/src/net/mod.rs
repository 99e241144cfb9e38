//! Pod networking: the VM takes over the interface CNI put in the pod's
//! network namespace. In that namespace a tap device is created and tied to
//! the pod's interface with tc redirects both ways; QEMU gets the tap's fd,
//! the guest NIC gets the interface's MAC (so the bridge's ARP resolves to
//! the guest), and the agent gets the addresses and routes.
//!
//! Everything that touches the namespace runs on a dedicated thread (see
//! [`netns`]). The namespace itself belongs to CNI/containerd and is never
//! removed here.
pub(crate) mod netns;
pub mod pooled;
mod scan;
mod tap;
mod tc;

use std::fmt::Write as _;
use std::io;
use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use netlink_packet_route::address::AddressMessage;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use kuasar_netlink::{link_index, Netlink};

/// Suffix of the tap devices we create (`tap0_kuasar`, ...).
pub const TAP_SUFFIX: &str = "_kuasar";
/// How long attaching or detaching may take.
const NETNS_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("open network namespace {netns}")]
    OpenNetns { netns: PathBuf, source: io::Error },
    #[error("enter network namespace {netns}")]
    EnterNetns { netns: PathBuf, source: io::Error },
    #[error("network namespace {netns}: {op}")]
    Step {
        netns: PathBuf,
        op: String,
        source: io::Error,
    },
    #[error("network namespace {netns} has no pod interface (no Ethernet device but loopback)")]
    NoInterface { netns: PathBuf },
    #[error("network namespace {netns} has {count} pod interfaces; a pooled VM has one NIC")]
    Interfaces { netns: PathBuf, count: usize },
    #[error("network namespace {netns}: not done within {after:?}")]
    Timeout { netns: PathBuf, after: Duration },
    #[error("network namespace {netns}: start the worker thread")]
    Worker { netns: PathBuf, source: io::Error },
    #[error("network namespace {netns}: the worker thread panicked")]
    Panicked { netns: PathBuf },
}

/// An interface of the pod as the guest must set it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    pub name: String,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Addresses with their prefix length.
    pub addresses: Vec<(IpAddr, u8)>,
}

impl PodInterface {
    /// `aa:bb:cc:dd:ee:ff`.
    pub fn mac_string(&self) -> String {
        let mut s = String::new();
        for (i, b) in self.mac.iter().enumerate() {
            if i > 0 {
                s.push(':');
            }
            let _ = write!(s, "{b:02x}");
        }
        s
    }

    pub fn cidrs(&self) -> Vec<String> {
        self.addresses
            .iter()
            .map(|(ip, len)| format!("{ip}/{len}"))
            .collect()
    }
}

/// A route of the pod, through one of its interfaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRoute {
    /// None for the default route.
    pub destination: Option<(IpAddr, u8)>,
    pub gateway: Option<IpAddr>,
    /// The interface's name.
    pub device: String,
    pub source: Option<IpAddr>,
}

impl PodRoute {
    /// CIDR of the destination; empty for the default route.
    pub fn destination_cidr(&self) -> String {
        self.destination
            .map(|(ip, len)| format!("{ip}/{len}"))
            .unwrap_or_default()
    }
}

/// One pod interface taken over by the VM.
#[derive(Debug)]
pub struct GuestNic {
    /// The tap's queue, for the VMM.
    pub tap: OwnedFd,
    pub tap_name: String,
    pub interface: PodInterface,
}

/// The pod's network as attached to its VM. [`detach`] undoes it.
#[derive(Debug)]
pub struct NetAttachment {
    pub netns: PathBuf,
    pub nics: Vec<GuestNic>,
    pub routes: Vec<PodRoute>,
}

impl NetAttachment {
    pub fn interfaces(&self) -> impl Iterator<Item = &PodInterface> {
        self.nics.iter().map(|n| &n.interface)
    }

    /// (tap, pod interface) name pairs, what [`release`] needs.
    pub fn links(&self) -> Vec<(String, String)> {
        self.nics
            .iter()
            .map(|n| (n.tap_name.clone(), n.interface.name.clone()))
            .collect()
    }
}

/// The name of the tap for the pod's `n`th interface.
fn tap_name(n: usize) -> String {
    format!("tap{n}{TAP_SUFFIX}")
}

/// Finds the pod's interfaces in `netns` and ties each to a new tap device.
pub async fn attach(netns: &Path) -> Result<NetAttachment, NetError> {
    netns::run_in(netns, NETNS_TIMEOUT, attach_here).await
}

/// Removes what [`attach`] added to the namespace (the taps, the ingress
/// qdiscs with their filters) and closes the taps.
pub async fn detach(attachment: NetAttachment) -> Result<(), NetError> {
    let links = attachment.links();
    let NetAttachment { netns, nics, .. } = attachment;
    let res = release(&netns, links).await;
    drop(nics);
    res
}

/// Removes the taps (with the pod interfaces' redirects) named by `links`,
/// (tap, pod interface) pairs, from `netns`: [`detach`] for a pod whose
/// attachment an earlier run of the sandboxer made.
pub async fn release(netns: &Path, links: Vec<(String, String)>) -> Result<(), NetError> {
    netns::run_in(netns, NETNS_TIMEOUT, move |netns| {
        let mut nl = open(netns)?;
        for (tap, pod_if) in &links {
            remove(&mut nl, netns, tap, pod_if)?;
        }
        Ok(())
    })
    .await
}

fn step(netns: &Path, op: impl Into<String>) -> impl FnOnce(io::Error) -> NetError {
    let netns = netns.to_owned();
    let op = op.into();
    move |source| NetError::Step { netns, op, source }
}

fn open(netns: &Path) -> Result<Netlink, NetError> {
    Netlink::open().map_err(step(netns, "open a netlink socket"))
}

fn dump_links(nl: &mut Netlink, netns: &Path) -> Result<Vec<LinkMessage>, NetError> {
    nl.links().map_err(step(netns, "list links"))
}

/// The pod's interfaces and routes in the namespace the thread is in.
fn scan_here(
    nl: &mut Netlink,
    netns: &Path,
) -> Result<(Vec<scan::FoundLink>, Vec<PodRoute>), NetError> {
    let links = dump_links(nl, netns)?;
    let mut addresses = Vec::new();
    let mut routes = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut a = AddressMessage::default();
        a.header.family = family;
        for m in nl
            .dump(RouteNetlinkMessage::GetAddress(a))
            .map_err(step(netns, "list addresses"))?
        {
            if let RouteNetlinkMessage::NewAddress(a) = m {
                addresses.push(a);
            }
        }
        let mut r = RouteMessage::default();
        r.header.address_family = family;
        for m in nl
            .dump(RouteNetlinkMessage::GetRoute(r))
            .map_err(step(netns, "list routes"))?
        {
            if let RouteNetlinkMessage::NewRoute(r) = m {
                routes.push(r);
            }
        }
    }
    let found = scan::pod_links(&links, &addresses);
    if found.is_empty() {
        return Err(NetError::NoInterface {
            netns: netns.to_owned(),
        });
    }
    let routes = scan::pod_routes(&routes, &found);
    Ok((found, routes))
}

/// Runs inside the namespace.
fn attach_here(netns: &Path) -> Result<NetAttachment, NetError> {
    let mut nl = open(netns)?;
    let (found, routes) = scan_here(&mut nl, netns)?;
    let mut nics = Vec::new();
    for (n, link) in found.into_iter().enumerate() {
        let tap_name = tap_name(n);
        // What a run that died midway may have left behind.
        remove(&mut nl, netns, &tap_name, &link.config.name)?;
        let nic = match connect(&mut nl, netns, &tap_name, &link) {
            Ok(tap) => GuestNic {
                tap,
                tap_name,
                interface: link.config,
            },
            Err(e) => {
                let _ = remove(&mut nl, netns, &tap_name, &link.config.name);
                for nic in &nics {
                    let GuestNic {
                        tap_name,
                        interface,
                        ..
                    } = nic;
                    let _ = remove(&mut nl, netns, tap_name, &interface.name);
                }
                return Err(e);
            }
        };
        nics.push(nic);
    }
    Ok(NetAttachment {
        netns: netns.to_owned(),
        nics,
        routes,
    })
}

/// Creates the tap `tap_name`, sets it up with the pod interface's MTU and
/// redirects both ways between them.
fn connect(
    nl: &mut Netlink,
    netns: &Path,
    tap_name: &str,
    link: &scan::FoundLink,
) -> Result<OwnedFd, NetError> {
    let tap = tap::create(tap_name).map_err(step(netns, format!("create tap {tap_name}")))?;
    wire(nl, netns, tap_name, link)?;
    Ok(tap)
}

/// Sets the tap `tap_name` (in the namespace) up with the pod interface's
/// MTU and redirects both ways between them.
fn wire(
    nl: &mut Netlink,
    netns: &Path,
    tap_name: &str,
    link: &scan::FoundLink,
) -> Result<(), NetError> {
    let pod_if = &link.config.name;
    let links = dump_links(nl, netns)?;
    let tap_index = link_index(&links, tap_name).ok_or_else(|| NetError::Step {
        netns: netns.to_owned(),
        op: format!("find the new tap {tap_name}"),
        source: io::Error::from(io::ErrorKind::NotFound),
    })?;
    nl.set_link(tap_index, true, vec![LinkAttribute::Mtu(link.config.mtu)])
        .map_err(step(
            netns,
            format!("set {tap_name} up with MTU {}", link.config.mtu),
        ))?;
    for index in [link.index, tap_index] {
        let name = if index == tap_index { tap_name } else { pod_if };
        tc::add_ingress(nl, index)
            .map_err(step(netns, format!("add an ingress qdisc to {name}")))?;
    }
    tc::add_redirect(nl, link.index, tap_index).map_err(step(
        netns,
        format!("redirect {pod_if} ingress to {tap_name}"),
    ))?;
    tc::add_redirect(nl, tap_index, link.index).map_err(step(
        netns,
        format!("redirect {tap_name} ingress to {pod_if}"),
    ))?;
    Ok(())
}

/// Deletes the tap `tap_name` and the ingress qdisc of `pod_if`; what does
/// not exist is fine.
fn remove(nl: &mut Netlink, netns: &Path, tap_name: &str, pod_if: &str) -> Result<(), NetError> {
    let links = dump_links(nl, netns)?;
    if let Some(index) = link_index(&links, tap_name) {
        let mut del = LinkMessage::default();
        del.header.index = index;
        match nl.request(RouteNetlinkMessage::DelLink(del), 0) {
            Ok(()) => {}
            Err(e) if tc::gone(&e) => {}
            Err(e) => return Err(step(netns, format!("delete tap {tap_name}"))(e)),
        }
    }
    if let Some(index) = link_index(&links, pod_if) {
        tc::del_ingress(nl, index)
            .map_err(step(netns, format!("remove the ingress qdisc of {pod_if}")))?;
    }
    Ok(())
}

/// Test namespaces: a pod's (with `eth0`, a veth to a peer namespace) made
/// with `ip`, removed when dropped.
#[cfg(test)]
pub(crate) mod testns {
    use std::path::PathBuf;
    use std::process::Command;

    pub fn ip(args: &[&str]) -> String {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(out.status.success(), "ip {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Root, and /dev/net/tun for taps; else the test says it skipped.
    pub fn usable() -> bool {
        let ok = nix::unistd::Uid::effective().is_root()
            && std::path::Path::new("/dev/net/tun").exists();
        if !ok {
            eprintln!("SKIP: needs root and /dev/net/tun");
        }
        ok
    }

    pub struct Ns(pub String);
    impl Drop for Ns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    /// A pod namespace `kuasar-<tag>-<pid>` whose `eth0` (MTU 1400, up)
    /// has `cidr`, its peer namespace, and the pod namespace's path.
    pub fn pod(tag: &str, cidr: &str) -> (Ns, Ns, PathBuf) {
        let ns = Ns(format!("kuasar-{tag}-{}", std::process::id()));
        let peer = Ns(format!("kuasar-{tag}-{}-peer", std::process::id()));
        ip(&["netns", "add", &ns.0]);
        ip(&["netns", "add", &peer.0]);
        let n = ns.0.as_str();
        ip(&[
            "-n", n, "link", "add", "name", "eth0", "mtu", "1400", "type", "veth", "peer", "name",
            "peer0", "netns", &peer.0,
        ]);
        ip(&["-n", n, "addr", "add", cidr, "dev", "eth0"]);
        ip(&["-n", n, "link", "set", "dev", "eth0", "up"]);
        let path = PathBuf::from(format!("/var/run/netns/{n}"));
        (ns, peer, path)
    }
}

#[cfg(test)]
mod tests {
    use super::testns::{ip, pod, usable};
    use super::*;
    use std::process::Command;

    fn tc(ns: &str, args: &[&str]) -> String {
        let out = Command::new("tc")
            .args(["-n", ns])
            .args(args)
            .output()
            .expect("run tc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    #[tokio::test]
    async fn attach_ties_a_tap_to_the_veth_and_detach_undoes_it() {
        if !usable() {
            return;
        }
        let (ns, _peer, path) = pod("ut", "10.250.0.5/24");
        let n = ns.0.as_str();
        ip(&["-n", n, "route", "add", "default", "via", "10.250.0.1"]);
        let att = attach(&path).await.expect("attach");
        assert_eq!(att.nics.len(), 1, "{att:?}");
        let eth0 = att.nics[0].interface.clone();
        assert_eq!(eth0.name, "eth0");
        assert_eq!(eth0.cidrs(), ["10.250.0.5/24"]);
        assert_eq!(eth0.mtu, 1400);
        assert!(att
            .routes
            .iter()
            .any(|r| r.destination.is_none() && r.gateway == Some("10.250.0.1".parse().unwrap())));
        let tap = &att.nics[0].tap_name;
        let link = ip(&["-n", n, "link", "show", "dev", tap]);
        assert!(link.contains("mtu 1400") && link.contains(",UP"), "{link}");
        let filters = tc(n, &["filter", "show", "dev", "eth0", "ingress"]);
        assert!(
            filters.contains(&format!("Redirect to device {tap})")),
            "{filters}"
        );
        let filters = tc(n, &["filter", "show", "dev", tap, "ingress"]);
        assert!(filters.contains("Redirect to device eth0)"), "{filters}");
        detach(att).await.expect("detach");
        let links = ip(&["-n", n, "link", "show"]);
        assert!(!links.contains(TAP_SUFFIX), "{links}");
        assert!(!tc(n, &["qdisc", "show", "dev", "eth0"]).contains("ingress"));
        assert!(path.exists(), "the namespace itself stays");
    }

    #[tokio::test]
    async fn a_missing_namespace_is_named() {
        let err = attach(Path::new("/nonexistent/netns")).await.unwrap_err();
        assert!(err.to_string().contains("/nonexistent/netns"), "{err}");
    }
}
