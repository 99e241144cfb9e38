//! A blocking rtnetlink socket: one request at a time, answered by an ack or
//! a dump; shared by kuasar-vmm (pod networks on the host) and kuasar-agent
//! (the guest NIC). Meant for a thread that has entered a network namespace
//! (the socket works in the namespace it was created in).
use std::io;
use std::time::Duration;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// How long one receive may block: the kernel answers at once, so this only
/// bounds a wedged socket.
const RECV_TIMEOUT: Duration = Duration::from_secs(5);
/// Receive buffer; a dump answer arrives in several datagrams of at most this.
const RECV_BUF: usize = 64 * 1024;
/// Most messages accepted in one dump (a pod's netns has a handful).
const MAX_DUMP: usize = 10_000;

pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    pub fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        let tv = nix::sys::time::TimeVal::new(RECV_TIMEOUT.as_secs() as _, 0);
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::ReceiveTimeout, &tv)
            .map_err(io::Error::from)?;
        Ok(Netlink {
            socket,
            seq: 0,
            buf: vec![0; RECV_BUF],
        })
    }

    fn send(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let mut out = vec![0; packet.buffer_len()];
        packet.serialize(&mut out);
        self.socket.send(&out, 0)?;
        Ok(self.seq)
    }

    /// Receives the answers to request `seq` until `done` says the exchange
    /// is over; each inner message goes to `each`.
    fn receive(
        &mut self,
        seq: u32,
        mut each: impl FnMut(RouteNetlinkMessage) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut seen = 0usize;
        loop {
            let n = self.socket.recv(&mut &mut self.buf[..], 0)?;
            let mut off = 0;
            while off < n {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&self.buf[off..n])
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e.to_string()))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "netlink message of length 0",
                    ));
                }
                off += (len + 3) & !3;
                if msg.header.sequence_number != seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(()),
                            Some(_) => Err(e.to_io()),
                        }
                    }
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::InnerMessage(inner) => {
                        seen += 1;
                        if seen > MAX_DUMP {
                            return Err(io::Error::other("netlink dump too long"));
                        }
                        each(inner)?;
                    }
                    _ => {}
                }
            }
        }
    }

    /// Sends a request that changes something and waits for its ack.
    pub fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let seq = self.send(msg, flags | NLM_F_ACK)?;
        self.receive(seq, |_| Ok(()))
    }

    /// Sends a dump request and collects the answer.
    pub fn dump(&mut self, msg: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        let seq = self.send(msg, NLM_F_DUMP)?;
        let mut out = Vec::new();
        self.receive(seq, |m| {
            out.push(m);
            Ok(())
        })?;
        Ok(out)
    }

    /// Every link of the namespace the socket was opened in.
    pub fn links(&mut self) -> io::Result<Vec<LinkMessage>> {
        Ok(self
            .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewLink(l) => Some(l),
                _ => None,
            })
            .collect())
    }

    /// Sets `attrs` on the link at `index`, and brings it up if `up`.
    pub fn set_link(&mut self, index: u32, up: bool, attrs: Vec<LinkAttribute>) -> io::Result<()> {
        let mut m = LinkMessage::default();
        m.header.index = index;
        if up {
            m.header.flags = LinkFlags::Up;
            m.header.change_mask = LinkFlags::Up;
        }
        m.attributes = attrs;
        self.request(RouteNetlinkMessage::SetLink(m), 0)
    }
}

/// A link's interface name.
pub fn link_name(l: &LinkMessage) -> Option<&str> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// A link's hardware address.
pub fn link_mac(l: &LinkMessage) -> Option<&[u8]> {
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::Address(m) => Some(m.as_slice()),
        _ => None,
    })
}

/// The index of the link called `name` among `links`.
pub fn link_index(links: &[LinkMessage], name: &str) -> Option<u32> {
    links
        .iter()
        .find(|l| link_name(l) == Some(name))
        .map(|l| l.header.index)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, mac: [u8; 6]) -> LinkMessage {
        let mut l = LinkMessage::default();
        l.header.index = index;
        l.attributes = vec![
            LinkAttribute::IfName(name.into()),
            LinkAttribute::Address(mac.to_vec()),
        ];
        l
    }

    #[test]
    fn finds_links_by_name_and_reads_their_mac() {
        let links = [link(1, "lo", [0; 6]), link(7, "eth0", [2, 0, 0, 0, 0, 7])];
        assert_eq!(link_index(&links, "eth0"), Some(7));
        assert_eq!(link_index(&links, "eth1"), None);
        assert_eq!(link_name(&links[0]), Some("lo"));
        assert_eq!(link_mac(&links[1]), Some(&[2, 0, 0, 0, 0, 7][..]));
        assert_eq!(link_mac(&LinkMessage::default()), None);
    }
}
