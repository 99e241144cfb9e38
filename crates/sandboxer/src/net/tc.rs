//! The tc plumbing between the pod's interface and the tap ("tcfilter"):
//! an ingress qdisc on each, and on each a match-all u32 filter whose
//! mirred action redirects every frame to the other's egress. Frames from
//! the pod network reach the guest, the guest's frames leave by the veth.
use std::io;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::tc::{
    TcAction, TcActionAttribute, TcActionGeneric, TcActionMirror, TcActionMirrorOption,
    TcActionOption, TcActionType, TcAttribute, TcFilterU32, TcFilterU32Option, TcHandle, TcMessage,
    TcMirror, TcMirrorActionType, TcOption, TcU32Key, TcU32Selector, TcU32SelectorFlags,
};
use netlink_packet_route::RouteNetlinkMessage;

use kuasar_netlink::Netlink;

/// The ingress qdisc's handle, `ffff:`, which its filters name as parent.
const INGRESS_HANDLE: u32 = 0xffff_0000;
/// Priority of the redirect filter.
const FILTER_PRIORITY: u16 = 1;

fn ingress_qdisc(index: u32) -> TcMessage {
    let mut m = TcMessage::with_index(index as i32);
    m.header.parent = TcHandle::INGRESS;
    m.header.handle = TcHandle::from(INGRESS_HANDLE);
    m.attributes.push(TcAttribute::Kind("ingress".into()));
    m
}

/// Adds an ingress qdisc to link `index`.
pub fn add_ingress(nl: &mut Netlink, index: u32) -> io::Result<()> {
    nl.request(
        RouteNetlinkMessage::NewQueueDiscipline(ingress_qdisc(index)),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

/// Removes the ingress qdisc of link `index` and with it its filters;
/// true if there was one.
pub fn del_ingress(nl: &mut Netlink, index: u32) -> io::Result<bool> {
    match nl.request(
        RouteNetlinkMessage::DelQueueDiscipline(ingress_qdisc(index)),
        0,
    ) {
        Ok(()) => Ok(true),
        Err(e) if gone(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Errors meaning that the thing to remove does not exist.
pub fn gone(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOENT | libc::ENODEV | libc::EINVAL)
    )
}

/// The filter message: on link `from`'s ingress, every frame (u32 matching
/// zero bits at offset 0, protocol all) is stolen and sent out of `to`.
pub fn redirect_filter(from: u32, to: u32) -> TcMessage {
    let mut m = TcMessage::with_index(from as i32);
    m.header.parent = TcHandle::from(INGRESS_HANDLE);
    // tcm_info: priority in the upper half, the protocol (network byte
    // order, as tc writes it) in the lower.
    let protocol = (libc::ETH_P_ALL as u16).to_be();
    m.header.info = (u32::from(FILTER_PRIORITY) << 16) | u32::from(protocol);
    let mut selector = TcU32Selector::default();
    selector.flags = TcU32SelectorFlags::Terminal;
    selector.nkeys = 1;
    selector.keys = vec![TcU32Key::default()];
    let mut mirror = TcMirror::default();
    mirror.generic = TcActionGeneric::default();
    mirror.generic.action = TcActionType::Stolen;
    mirror.eaction = TcMirrorActionType::EgressRedir;
    mirror.ifindex = to;
    let mut action = TcAction::default();
    action.attributes = vec![
        TcActionAttribute::Kind(TcActionMirror::KIND.to_string()),
        TcActionAttribute::Options(vec![TcActionOption::Mirror(TcActionMirrorOption::Parms(
            mirror,
        ))]),
    ];
    m.attributes
        .push(TcAttribute::Kind(TcFilterU32::KIND.to_string()));
    m.attributes.push(TcAttribute::Options(vec![
        TcOption::U32(TcFilterU32Option::Selector(selector)),
        TcOption::U32(TcFilterU32Option::Action(vec![action])),
    ]));
    m
}

/// Redirects everything arriving on link `from` out of link `to`.
pub fn add_redirect(nl: &mut Netlink, from: u32, to: u32) -> io::Result<()> {
    nl.request(
        RouteNetlinkMessage::NewTrafficFilter(redirect_filter(from, to)),
        NLM_F_CREATE | NLM_F_EXCL,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_matches_all_protocols_on_ingress() {
        let m = redirect_filter(3, 4);
        assert_eq!(m.header.index, 3);
        assert_eq!(u32::from(m.header.parent), 0xffff_0000);
        // ETH_P_ALL (0x0003) in network byte order, as `tc ... protocol all`.
        // The kernel reads the lower half as a big-endian u16.
        assert_eq!(
            ((m.header.info & 0xffff) as u16).to_ne_bytes(),
            [0x00, 0x03]
        );
        assert_eq!(m.header.info >> 16, 1);
        assert!(m.attributes.contains(&TcAttribute::Kind("u32".to_string())));
    }
}
