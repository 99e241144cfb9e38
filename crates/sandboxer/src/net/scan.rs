//! Reads what CNI gave the pod: its interfaces (MAC, MTU, addresses) and
//! the routes through them. Pure functions over netlink messages, so that
//! the selection rules are unit-tested without a namespace.
use std::net::IpAddr;

use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkLayerType, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteType,
};

use super::{PodInterface, PodRoute, TAP_SUFFIX};

/// A pod interface as found in the namespace, before anything is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundLink {
    pub index: u32,
    pub config: PodInterface,
}

/// The pod's interfaces: Ethernet links other than loopback and our own
/// taps, with their addresses (link-local IPv6 ones are left to the guest,
/// which derives its own from the same MAC).
pub fn pod_links(links: &[LinkMessage], addresses: &[AddressMessage]) -> Vec<FoundLink> {
    let mut found: Vec<FoundLink> = links
        .iter()
        .filter(|l| {
            l.header.link_layer_type == LinkLayerType::Ether
                && !l.header.flags.contains(LinkFlags::Loopback)
        })
        .filter_map(|l| {
            let mut name = None;
            let mut mac = None;
            let mut mtu = 1500;
            for a in &l.attributes {
                match a {
                    LinkAttribute::IfName(n) => name = Some(n.clone()),
                    LinkAttribute::Address(m) if m.len() == 6 => {
                        mac = Some(<[u8; 6]>::try_from(m.as_slice()).ok()?)
                    }
                    LinkAttribute::Mtu(m) => mtu = *m,
                    _ => {}
                }
            }
            let name = name?;
            if name.ends_with(TAP_SUFFIX) {
                return None;
            }
            Some(FoundLink {
                index: l.header.index,
                config: PodInterface {
                    name,
                    mac: mac?,
                    mtu,
                    addresses: Vec::new(),
                },
            })
        })
        .collect();
    for a in addresses {
        let Some(link) = found.iter_mut().find(|l| l.index == a.header.index) else {
            continue;
        };
        if a.header.scope != AddressScope::Universe {
            continue;
        }
        // IFA_LOCAL is the interface's own address where IFA_ADDRESS may be
        // the peer's (point-to-point); IPv6 has only IFA_ADDRESS.
        let local = a.attributes.iter().find_map(|x| match x {
            AddressAttribute::Local(ip) => Some(*ip),
            _ => None,
        });
        let address = local.or_else(|| {
            a.attributes.iter().find_map(|x| match x {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })
        });
        if let Some(ip) = address {
            link.config.addresses.push((ip, a.header.prefix_len));
        }
    }
    found.sort_by_key(|l| l.index);
    found
}

/// The routes of the main table through the pod's interfaces, except those
/// the kernel derives from addresses (the guest derives them too).
pub fn pod_routes(routes: &[RouteMessage], links: &[FoundLink]) -> Vec<PodRoute> {
    routes
        .iter()
        .filter(|r| {
            r.header.table == RouteHeader::RT_TABLE_MAIN
                && r.header.kind == RouteType::Unicast
                && r.header.protocol != RouteProtocol::Kernel
        })
        .filter_map(|r| {
            let mut dst = None;
            let mut gateway = None;
            let mut source = None;
            let mut oif = None;
            for a in &r.attributes {
                match a {
                    RouteAttribute::Destination(a) => dst = ip_of(a),
                    RouteAttribute::Gateway(a) => gateway = ip_of(a),
                    RouteAttribute::PrefSource(a) => source = ip_of(a),
                    RouteAttribute::Oif(i) => oif = Some(*i),
                    _ => {}
                }
            }
            let device = links.iter().find(|l| Some(l.index) == oif)?;
            if let Some(IpAddr::V6(v6)) = dst {
                // Link-local and multicast routes are the guest kernel's own.
                if (v6.segments()[0] & 0xffc0) == 0xfe80 || v6.is_multicast() {
                    return None;
                }
            }
            Some(PodRoute {
                destination: dst.map(|ip| (ip, r.header.destination_prefix_length)),
                gateway,
                device: device.config.name.clone(),
                source,
            })
        })
        .collect()
}

fn ip_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::AddressFamily;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn link(index: u32, name: &str, kind: LinkLayerType, flags: LinkFlags) -> LinkMessage {
        let mut l = LinkMessage::default();
        l.header.index = index;
        l.header.link_layer_type = kind;
        l.header.flags = flags;
        l.attributes = vec![
            LinkAttribute::IfName(name.into()),
            LinkAttribute::Address(vec![2, 0, 0, 0, 0, index as u8]),
            LinkAttribute::Mtu(1450),
        ];
        l
    }

    fn addr(index: u32, ip: IpAddr, prefix: u8, scope: AddressScope) -> AddressMessage {
        let mut a = AddressMessage::default();
        a.header.index = index;
        a.header.prefix_len = prefix;
        a.header.scope = scope;
        a.attributes = vec![AddressAttribute::Address(ip)];
        if ip.is_ipv4() {
            a.attributes.push(AddressAttribute::Local(ip));
        }
        a
    }

    fn route(
        dst: Option<(IpAddr, u8)>,
        gw: Option<IpAddr>,
        oif: u32,
        proto: RouteProtocol,
    ) -> RouteMessage {
        let mut r = RouteMessage::default();
        r.header.address_family = AddressFamily::Inet;
        r.header.table = RouteHeader::RT_TABLE_MAIN;
        r.header.kind = RouteType::Unicast;
        r.header.protocol = proto;
        if let Some((ip, len)) = dst {
            r.header.destination_prefix_length = len;
            r.attributes.push(RouteAttribute::Destination(ip.into()));
        }
        if let Some(gw) = gw {
            r.attributes.push(RouteAttribute::Gateway(gw.into()));
        }
        r.attributes.push(RouteAttribute::Oif(oif));
        r
    }

    #[test]
    fn finds_the_veth_not_loopback_nor_our_tap_nor_tunnels() {
        let links = [
            link(1, "lo", LinkLayerType::Loopback, LinkFlags::Loopback),
            link(2, "tunl0", LinkLayerType::Tunnel, LinkFlags::empty()),
            link(3, "eth0", LinkLayerType::Ether, LinkFlags::Up),
            link(4, "tap0_kuasar", LinkLayerType::Ether, LinkFlags::Up),
        ];
        let addrs = [
            addr(
                3,
                Ipv4Addr::new(10, 88, 0, 5).into(),
                16,
                AddressScope::Universe,
            ),
            addr(3, "fd00::5".parse().unwrap(), 64, AddressScope::Universe),
            addr(3, "fe80::1".parse().unwrap(), 64, AddressScope::Link),
            addr(1, Ipv4Addr::LOCALHOST.into(), 8, AddressScope::Host),
        ];
        let found = pod_links(&links, &addrs);
        assert_eq!(found.len(), 1);
        let eth0 = &found[0];
        assert_eq!(eth0.index, 3);
        assert_eq!(eth0.config.name, "eth0");
        assert_eq!(eth0.config.mac, [2, 0, 0, 0, 0, 3]);
        assert_eq!(eth0.config.mtu, 1450);
        assert_eq!(
            eth0.config.cidrs(),
            ["10.88.0.5/16".to_string(), "fd00::5/64".to_string()]
        );
        assert_eq!(eth0.config.mac_string(), "02:00:00:00:00:03");
    }

    #[test]
    fn keeps_static_routes_through_pod_links_only() {
        let links = pod_links(&[link(3, "eth0", LinkLayerType::Ether, LinkFlags::Up)], &[]);
        let gw: IpAddr = Ipv4Addr::new(10, 88, 0, 1).into();
        let routes = [
            route(None, Some(gw), 3, RouteProtocol::Boot),
            route(
                Some((Ipv4Addr::new(10, 88, 0, 0).into(), 16)),
                None,
                3,
                RouteProtocol::Kernel,
            ),
            route(
                Some((Ipv4Addr::new(10, 99, 0, 0).into(), 16)),
                Some(gw),
                3,
                RouteProtocol::Static,
            ),
            route(None, Some(gw), 7, RouteProtocol::Boot),
            route(
                Some((Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0).into(), 64)),
                None,
                3,
                RouteProtocol::Boot,
            ),
        ];
        let found = pod_routes(&routes, &links);
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[0].destination, None);
        assert_eq!(found[0].gateway, Some(gw));
        assert_eq!(found[0].device, "eth0");
        assert_eq!(found[1].destination_cidr(), "10.99.0.0/16");
    }
}
