//! Finds the host-side interface of pods that bridge CNIs connect (flannel, the reference
//! `bridge` plugin, kubenet...): each pod's veth is a port of a bridge such as `cni0` that holds
//! the pod subnet's gateway address, and the node has no route per pod. The pod's address is
//! found in the node's neighbour table on the bridge (address → MAC), and its MAC in the
//! bridge's forwarding database (MAC → port), all read over `NETLINK_ROUTE`.
//!
//! Both tables learn from traffic, so a pod that has not sent anything yet is in neither: the
//! caller probes it (`probe`) and finds it at the next reconcile. The answers are kept per pod
//! while the port exists, since the tables forget a quiet pod after a few minutes while its
//! veth is still there.

use std::{
    collections::HashMap,
    io, mem,
    net::{Ipv4Addr, UdpSocket},
};

use super::{
    Interface,
    netlink::{NETLINK_ROUTE, as_bytes, attributes, dump, open},
};

const RTM_GETLINK: u16 = 18;
const RTM_GETNEIGH: u16 = 30;
const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MASTER: u16 = 10;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NDA_MASTER: u16 = 9;
const NUD_INCOMPLETE: u16 = 0x01;
const NUD_FAILED: u16 = 0x20;
const NUD_PERMANENT: u16 = 0x80;
const AF_BRIDGE: u8 = 7;
/// The discard port: a probe's datagram has no listener to bother.
const PROBE_PORT: u16 = 9;

/// `struct ifinfomsg`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct IfInfoMsg {
    family: u8,
    pad: u8,
    kind: u16,
    index: i32,
    flags: u32,
    change: u32,
}

/// `struct ndmsg`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NdMsg {
    family: u8,
    pad1: u8,
    pad2: u16,
    index: i32,
    state: u16,
    flags: u8,
    kind: u8,
}

/// A network interface as the link dump describes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    pub mac: Option<[u8; 6]>,
    /// The bridge (or bond) this interface is a port of.
    pub master: Option<u32>,
    pub is_bridge: bool,
}

/// A neighbour or forwarding-database entry: the interface, MAC, IPv4 address if any, the
/// bridge it belongs to if the kernel says, and its NUD state.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Neighbour {
    index: u32,
    mac: [u8; 6],
    ip: Option<Ipv4Addr>,
    master: Option<u32>,
    state: u16,
}

/// The node's interfaces, by index.
pub fn links() -> io::Result<HashMap<u32, Link>> {
    let socket = open(NETLINK_ROUTE)?;
    let request = IfInfoMsg { family: libc::AF_UNSPEC as u8, ..Default::default() };
    let answers = dump(&socket, RTM_GETLINK, as_bytes(&request))?;
    Ok(answers.iter().filter_map(|payload| parse_link(payload)).collect())
}

/// Pod address → bridge port (with the bridge's MAC) for every pod the neighbour table and the
/// bridges' forwarding databases know.
pub fn bridged_pods(links: &HashMap<u32, Link>) -> io::Result<HashMap<Ipv4Addr, Interface>> {
    if !links.values().any(|l| l.is_bridge) {
        return Ok(HashMap::new());
    }
    let socket = open(NETLINK_ROUTE)?;
    let arp = neighbours(&socket, libc::AF_INET as u8)?;
    let fdb = neighbours(&socket, AF_BRIDGE)?;
    Ok(match_ports(links, &arp, &fdb))
}

/// Makes the node resolve `ip`'s MAC, so that the neighbour table and the bridge learn it: one
/// empty datagram to the discard port, which goes out only after ARP.
pub fn probe(ip: Ipv4Addr) {
    if let Ok(socket) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) {
        let _ = socket.send_to(&[], (ip, PROBE_PORT));
    }
}

fn neighbours(socket: &std::os::fd::OwnedFd, family: u8) -> io::Result<Vec<Neighbour>> {
    let request = NdMsg { family, ..Default::default() };
    let answers = dump(socket, RTM_GETNEIGH, as_bytes(&request))?;
    Ok(answers.iter().filter_map(|payload| parse_neighbour(payload)).collect())
}

fn match_ports(links: &HashMap<u32, Link>, arp: &[Neighbour], fdb: &[Neighbour]) -> HashMap<Ipv4Addr, Interface> {
    let usable = |state: u16| state & (NUD_INCOMPLETE | NUD_FAILED) == 0;
    let mut out = HashMap::new();
    for entry in arp.iter().filter(|n| usable(n.state)) {
        let (Some(ip), Some(bridge)) = (entry.ip, links.get(&entry.index)) else { continue };
        let Some(bridge_mac) = bridge.mac.filter(|_| bridge.is_bridge) else { continue };
        // The port the bridge learned the pod's MAC on; the bridge's own (permanent, local)
        // entries name the ports' own addresses, never a pod's.
        let port = fdb.iter().find(|f| {
            f.mac == entry.mac
                && f.state & NUD_PERMANENT == 0
                && f.index != entry.index
                && f.master.or_else(|| links.get(&f.index).and_then(|l| l.master)) == Some(entry.index)
        });
        if let Some(port) = port
            && let Some(link) = links.get(&port.index)
        {
            out.insert(ip, Interface { name: link.name.clone(), index: port.index, bridge_mac: Some(bridge_mac) });
        }
    }
    out
}

fn parse_link(payload: &[u8]) -> Option<(u32, Link)> {
    let header_len = mem::size_of::<IfInfoMsg>();
    // SAFETY: length checked by get(); read_unaligned copes with any alignment.
    let header: IfInfoMsg = unsafe { std::ptr::read_unaligned(payload.get(..header_len)?.as_ptr().cast()) };
    let mut link = Link::default();
    for (kind, value) in attributes(&payload[header_len..]) {
        match kind {
            IFLA_IFNAME => link.name = String::from_utf8_lossy(value).trim_end_matches('\0').to_owned(),
            IFLA_ADDRESS => link.mac = value.try_into().ok(),
            IFLA_MASTER => link.master = value.try_into().ok().map(u32::from_ne_bytes),
            IFLA_LINKINFO => {
                link.is_bridge = attributes(value).iter().any(|(k, v)| *k == IFLA_INFO_KIND && v.starts_with(b"bridge"))
            }
            _ => {}
        }
    }
    Some((u32::try_from(header.index).ok()?, link))
}

fn parse_neighbour(payload: &[u8]) -> Option<Neighbour> {
    let header_len = mem::size_of::<NdMsg>();
    // SAFETY: length checked by get(); read_unaligned copes with any alignment.
    let header: NdMsg = unsafe { std::ptr::read_unaligned(payload.get(..header_len)?.as_ptr().cast()) };
    let (mut mac, mut ip, mut master) = (None, None, None);
    for (kind, value) in attributes(&payload[header_len..]) {
        match kind {
            NDA_LLADDR => mac = <[u8; 6]>::try_from(value).ok(),
            NDA_DST => ip = <[u8; 4]>::try_from(value).ok().map(Ipv4Addr::from),
            NDA_MASTER => master = value.try_into().ok().map(u32::from_ne_bytes),
            _ => {}
        }
    }
    Some(Neighbour { index: u32::try_from(header.index).ok()?, mac: mac?, ip, master, state: header.state })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(mem::size_of::<IfInfoMsg>(), 16);
        assert_eq!(mem::size_of::<NdMsg>(), 12);
    }

    fn link(name: &str, mac: u8, master: Option<u32>, is_bridge: bool) -> Link {
        Link { name: name.into(), mac: Some([2, 0, 0, 0, 0, mac]), master, is_bridge }
    }

    fn entry(index: u32, mac: u8, ip: Option<[u8; 4]>, master: Option<u32>, state: u16) -> Neighbour {
        Neighbour { index, mac: [2, 0, 0, 0, 0, mac], ip: ip.map(Ipv4Addr::from), master, state }
    }

    #[test]
    fn a_pod_is_found_on_the_port_its_mac_was_learned_on() {
        // 2 = cni0 (bridge), 3 and 4 = its ports, 5 = eth0.
        let links = HashMap::from([
            (2, link("cni0", 0xb0, None, true)),
            (3, link("veth-a", 0xa3, Some(2), false)),
            (4, link("veth-b", 0xa4, Some(2), false)),
            (5, link("eth0", 0xe0, None, false)),
        ]);
        let arp = [
            entry(2, 0x10, Some([10, 9, 0, 10]), None, 0x02),
            entry(2, 0x11, Some([10, 9, 0, 11]), None, 0x04),
            // Failed resolution and a neighbour on a plain interface are not pods of a bridge.
            entry(2, 0x12, Some([10, 9, 0, 12]), None, NUD_FAILED),
            entry(5, 0x13, Some([10, 255, 0, 1]), None, 0x02),
        ];
        let fdb = [
            entry(3, 0x10, None, Some(2), 0x02),
            entry(4, 0x11, None, None, 0x04),
            entry(3, 0xa3, None, Some(2), NUD_PERMANENT),
            entry(3, 0x12, None, Some(2), 0x02),
        ];
        let found = match_ports(&links, &arp, &fdb);
        let port = |name: &str, index| Interface { name: name.into(), index, bridge_mac: Some([2, 0, 0, 0, 0, 0xb0]) };
        assert_eq!(found.len(), 2, "{found:?}");
        assert_eq!(found[&Ipv4Addr::new(10, 9, 0, 10)], port("veth-a", 3));
        assert_eq!(found[&Ipv4Addr::new(10, 9, 0, 11)], port("veth-b", 4));
    }

    #[test]
    fn reads_this_namespace_links() {
        let links = links().expect("link dump");
        assert!(links.values().any(|l| l.name == "lo"), "{links:?}");
    }
}
