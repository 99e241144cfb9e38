//! The guest's network, as the host hands it over in SetupSandbox: the
//! pod's interfaces (found by MAC: the host gave each virtio NIC the MAC of
//! the pod interface it stands for), their addresses, the routes, DNS.
use std::net::IpAddr;
use std::time::{Duration, Instant};

use kuasar_api::agent::{Interface, Route};
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::address::{AddressAttribute, AddressHeaderFlags, AddressMessage};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use crate::error::{Context, Error, Result};
use kuasar_netlink::{link_mac, link_name, Netlink};

/// How long a NIC may take to show up after its driver is loaded.
const NIC_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest interface name the kernel accepts.
const MAX_IFNAME: usize = 15;

fn netlink() -> Result<Netlink> {
    Netlink::open().context("open a netlink socket")
}

fn links(nl: &mut Netlink) -> Result<Vec<LinkMessage>> {
    nl.links().context("list links")
}

fn set_link(
    nl: &mut Netlink,
    index: u32,
    up: bool,
    attrs: Vec<LinkAttribute>,
    what: &str,
) -> Result<()> {
    nl.set_link(index, up, attrs).context(what.to_owned())
}

/// Brings the loopback interface up (the kernel gives it 127.0.0.1 and ::1).
pub fn loopback_up() -> Result<()> {
    let mut nl = netlink()?;
    let lo = links(&mut nl)?
        .into_iter()
        .find(|l| link_name(l) == Some("lo"))
        .ok_or_else(|| Error::Internal("no loopback interface".into()))?;
    set_link(&mut nl, lo.header.index, true, Vec::new(), "set lo up")
}

/// `aa:bb:cc:dd:ee:ff` to bytes.
pub fn parse_mac(mac: &str) -> Result<[u8; 6]> {
    let bad = || Error::InvalidArgument(format!("MAC address {mac:?} is not aa:bb:cc:dd:ee:ff"));
    let mut out = [0u8; 6];
    let mut parts = mac.split(':');
    for b in out.iter_mut() {
        let p = parts.next().ok_or_else(bad)?;
        if p.len() != 2 {
            return Err(bad());
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(out)
}

/// `10.88.0.5/16` or `fd00::5/64` to (address, prefix length).
pub fn parse_cidr(cidr: &str) -> Result<(IpAddr, u8)> {
    let bad = |why: &str| Error::InvalidArgument(format!("address {cidr:?}: {why}"));
    let (ip, len) = cidr.split_once('/').ok_or_else(|| bad("no /prefix"))?;
    let ip: IpAddr = ip.parse().map_err(|_| bad("not an IP address"))?;
    let len: u8 = len.parse().map_err(|_| bad("bad prefix length"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(bad("prefix length too long"));
    }
    Ok((ip, len))
}

fn family(ip: &IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

/// The address message for `ip/len` on link `index` (IPv6 without duplicate
/// address detection: the address is the pod's, usable at once).
pub fn address_message(index: u32, ip: IpAddr, len: u8) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = family(&ip);
    m.header.prefix_len = len;
    m.header.index = index;
    m.attributes.push(AddressAttribute::Local(ip));
    m.attributes.push(AddressAttribute::Address(ip));
    match ip {
        IpAddr::V4(v4) if len < 31 => {
            let brd = u32::from(v4) | (u32::MAX >> len);
            m.attributes.push(AddressAttribute::Broadcast(brd.into()));
        }
        IpAddr::V4(_) => {}
        IpAddr::V6(_) => m.header.flags = AddressHeaderFlags::Nodad,
    }
    m
}

/// The route message for `r`, through link `index`.
pub fn route_message(r: &Route, index: u32) -> Result<RouteMessage> {
    let dst = (!r.destination.is_empty())
        .then(|| parse_cidr(&r.destination))
        .transpose()?;
    let parse_ip = |what: &str, s: &str| -> Result<Option<IpAddr>> {
        if s.is_empty() {
            return Ok(None);
        }
        s.parse()
            .map(Some)
            .map_err(|_| Error::InvalidArgument(format!("route {what} {s:?} is not an IP address")))
    };
    let gateway = parse_ip("gateway", &r.gateway)?;
    let source = parse_ip("source", &r.source)?;
    let fam = match (dst, gateway) {
        (Some((ip, _)), _) | (None, Some(ip)) => family(&ip),
        (None, None) => {
            return Err(Error::InvalidArgument(
                "a route needs a destination or a gateway".into(),
            ))
        }
    };
    for ip in gateway.iter().chain(source.iter()) {
        if family(ip) != fam {
            return Err(Error::InvalidArgument(format!(
                "route to {:?}: {ip} is of another address family",
                r.destination
            )));
        }
    }
    let mut m = RouteMessage::default();
    m.header.address_family = fam;
    m.header.table = RouteHeader::RT_TABLE_MAIN;
    m.header.protocol = RouteProtocol::Boot;
    m.header.kind = RouteType::Unicast;
    m.header.scope = if gateway.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    if let Some((ip, len)) = dst {
        m.header.destination_prefix_length = len;
        m.attributes.push(RouteAttribute::Destination(ip.into()));
    }
    if let Some(gw) = gateway {
        m.attributes.push(RouteAttribute::Gateway(gw.into()));
    }
    if let Some(src) = source {
        m.attributes.push(RouteAttribute::PrefSource(src.into()));
    }
    m.attributes.push(RouteAttribute::Oif(index));
    Ok(m)
}

/// Checks a request before anything is changed.
fn validate(interfaces: &[Interface], routes: &[Route]) -> Result<()> {
    for i in interfaces {
        if i.name.is_empty() || i.name.len() > MAX_IFNAME || i.name.contains(['/', ' ', ':']) {
            return Err(Error::InvalidArgument(format!(
                "interface name {:?} is not a valid Linux interface name",
                i.name
            )));
        }
        parse_mac(&i.mac)?;
        if !i.nic_mac.is_empty() {
            parse_mac(&i.nic_mac)?;
        }
        for a in &i.addresses {
            parse_cidr(a)?;
        }
    }
    for r in routes {
        if !interfaces.iter().any(|i| i.name == r.device) {
            return Err(Error::InvalidArgument(format!(
                "route to {:?} names device {:?}, which is not among the interfaces",
                r.destination, r.device
            )));
        }
        route_message(r, 0)?;
    }
    Ok(())
}

/// Finds each interface by MAC (waiting for NICs still being probed),
/// names it, sets its MTU and addresses, brings it up, then adds the routes
/// (directly connected ones first: the others' gateways may need them).
pub fn setup(interfaces: &[Interface], routes: &[Route]) -> Result<()> {
    if interfaces.is_empty() && routes.is_empty() {
        return Ok(());
    }
    validate(interfaces, routes)?;
    let mut nl = netlink()?;
    let indexes = find_nics(&mut nl, interfaces)?;
    rename_nics(&mut nl, interfaces, &indexes)?;
    configure_nics(&mut nl, interfaces, &indexes)?;
    add_routes(&mut nl, interfaces, &indexes, routes)
}

/// The link index of each interface's NIC, in the order of `interfaces`:
/// the link with the interface's MAC (its `nic_mac` when set), waiting up
/// to `NIC_TIMEOUT` (in all) for NICs the kernel has not shown yet.
fn find_nics(nl: &mut Netlink, interfaces: &[Interface]) -> Result<Vec<u32>> {
    let deadline = Instant::now() + NIC_TIMEOUT;
    let mut indexes = Vec::new();
    for i in interfaces {
        let mac = parse_mac(if i.nic_mac.is_empty() {
            &i.mac
        } else {
            &i.nic_mac
        })?;
        let index = loop {
            let found = links(nl)?
                .into_iter()
                .find(|l| link_mac(l) == Some(&mac[..]))
                .map(|l| l.header.index);
            match found {
                Some(index) => break index,
                None if Instant::now() >= deadline => {
                    return Err(Error::NotFound(format!(
                        "no guest NIC with MAC {} (for {}) within {NIC_TIMEOUT:?}",
                        i.mac, i.name
                    )))
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        indexes.push(index);
    }
    Ok(indexes)
}

/// Gives each NIC (at `indexes`) its interface's name, if it has another.
/// Two passes of renames (first to temporary names, then to the right
/// ones), so that NICs may swap names (eth0 <-> eth1).
fn rename_nics(nl: &mut Netlink, interfaces: &[Interface], indexes: &[u32]) -> Result<()> {
    let current = links(nl)?;
    let name = |index: u32| {
        current
            .iter()
            .find(|l| l.header.index == index)
            .and_then(link_name)
            .map(str::to_owned)
    };
    let renames: Vec<(u32, &str)> = interfaces
        .iter()
        .zip(indexes)
        .filter(|(i, &index)| name(index).as_deref() != Some(i.name.as_str()))
        .map(|(i, &index)| (index, i.name.as_str()))
        .collect();
    for (n, (index, _)) in renames.iter().enumerate() {
        set_link(
            nl,
            *index,
            false,
            vec![LinkAttribute::IfName(format!("kuasartmp{n}"))],
            "rename a NIC",
        )?;
    }
    for (index, to) in &renames {
        set_link(
            nl,
            *index,
            false,
            vec![LinkAttribute::IfName(to.to_string())],
            &format!("rename the NIC to {to}"),
        )?;
    }
    Ok(())
}

/// Interface by interface: sets the NIC's MTU (if the host gave one), adds
/// its addresses (one already there is fine), then brings it up.
fn configure_nics(nl: &mut Netlink, interfaces: &[Interface], indexes: &[u32]) -> Result<()> {
    for (i, &index) in interfaces.iter().zip(indexes) {
        if !i.nic_mac.is_empty() && i.nic_mac != i.mac {
            set_link(
                nl,
                index,
                false,
                vec![LinkAttribute::Address(parse_mac(&i.mac)?.to_vec())],
                &format!("give {} the MAC {}", i.name, i.mac),
            )?;
        }
        if i.mtu > 0 {
            set_link(
                nl,
                index,
                false,
                vec![LinkAttribute::Mtu(i.mtu)],
                &format!("set the MTU of {} to {}", i.name, i.mtu),
            )?;
        }
        for a in &i.addresses {
            let (ip, len) = parse_cidr(a)?;
            match nl.request(
                RouteNetlinkMessage::NewAddress(address_message(index, ip, len)),
                NLM_F_CREATE | NLM_F_EXCL,
            ) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(e).context(format!("add {a} to {}", i.name)),
            }
        }
        set_link(nl, index, true, Vec::new(), &format!("set {} up", i.name))?;
    }
    Ok(())
}

/// Adds the routes through the NICs of their devices, directly connected
/// ones first (the others' gateways may need them); a route already there
/// is fine.
fn add_routes(
    nl: &mut Netlink,
    interfaces: &[Interface],
    indexes: &[u32],
    routes: &[Route],
) -> Result<()> {
    let (direct, via): (Vec<&Route>, Vec<&Route>) =
        routes.iter().partition(|r| r.gateway.is_empty());
    for r in direct.into_iter().chain(via) {
        let index = interfaces
            .iter()
            .zip(indexes)
            .find(|(i, _)| i.name == r.device)
            .map(|(_, &index)| index)
            .ok_or_else(|| Error::InvalidArgument(format!("route device {:?}", r.device)))?;
        let m = route_message(r, index)?;
        match nl.request(RouteNetlinkMessage::NewRoute(m), NLM_F_CREATE | NLM_F_EXCL) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
            Err(e) => {
                let dst = if r.destination.is_empty() {
                    "default"
                } else {
                    &r.destination
                };
                return Err(e).context(format!(
                    "add the route {dst} via {:?} dev {}",
                    r.gateway, r.device
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_and_cidrs_parse_or_are_refused_by_name() {
        assert_eq!(
            parse_mac("02:42:0a:58:00:05").unwrap(),
            [2, 0x42, 10, 0x58, 0, 5]
        );
        assert!(parse_mac("02:42:0a:58:00").is_err());
        assert!(parse_mac("02:42:0a:58:00:05:06").is_err());
        assert!(parse_mac("zz:42:0a:58:00:05").is_err());
        assert_eq!(
            parse_cidr("10.88.0.5/16").unwrap(),
            ("10.88.0.5".parse().unwrap(), 16)
        );
        assert_eq!(parse_cidr("fd00::5/64").unwrap().1, 64);
        let err = parse_cidr("10.88.0.5/33").unwrap_err().to_string();
        assert!(err.contains("10.88.0.5/33"), "{err}");
        assert!(parse_cidr("10.88.0.5").is_err());
    }

    #[test]
    fn ipv4_addresses_get_a_broadcast_ipv6_ones_skip_dad() {
        let m = address_message(2, "10.88.0.5".parse().unwrap(), 16);
        assert!(m.attributes.contains(&AddressAttribute::Broadcast(
            "10.88.255.255".parse().unwrap()
        )));
        let m = address_message(2, "fd00::5".parse().unwrap(), 64);
        assert_eq!(m.header.family, AddressFamily::Inet6);
        assert!(m.header.flags.contains(AddressHeaderFlags::Nodad));
    }

    #[test]
    fn routes_default_via_gateway_and_direct() {
        let r = Route {
            gateway: "10.88.0.1".into(),
            device: "eth0".into(),
            ..Default::default()
        };
        let m = route_message(&r, 2).unwrap();
        assert_eq!(m.header.destination_prefix_length, 0);
        assert_eq!(m.header.scope, RouteScope::Universe);
        let r = Route {
            destination: "10.99.0.0/16".into(),
            device: "eth0".into(),
            ..Default::default()
        };
        assert_eq!(route_message(&r, 2).unwrap().header.scope, RouteScope::Link);
        let mixed = Route {
            destination: "10.99.0.0/16".into(),
            gateway: "fd00::1".into(),
            device: "eth0".into(),
            ..Default::default()
        };
        assert!(route_message(&mixed, 2).is_err());
    }

    #[test]
    fn a_nic_mac_to_replace_must_be_a_mac() {
        let mut i = Interface {
            name: "eth0".into(),
            mac: "02:42:0a:58:00:05".into(),
            nic_mac: "02:00:00:00:00:01".into(),
            ..Default::default()
        };
        validate(std::slice::from_ref(&i), &[]).unwrap();
        i.nic_mac = "pool".into();
        let err = validate(&[i], &[]).unwrap_err().to_string();
        assert!(err.contains("\"pool\""), "{err}");
    }

    #[test]
    fn routes_must_name_a_given_interface() {
        let i = Interface {
            name: "eth0".into(),
            mac: "02:42:0a:58:00:05".into(),
            addresses: vec!["10.88.0.5/16".into()],
            mtu: 1500,
            ..Default::default()
        };
        let r = Route {
            gateway: "10.88.0.1".into(),
            device: "eth1".into(),
            ..Default::default()
        };
        let err = validate(&[i], &[r]).unwrap_err().to_string();
        assert!(err.contains("eth1"), "{err}");
    }
}
