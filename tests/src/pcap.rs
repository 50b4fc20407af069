//! Reads TCP segments out of a pcap file written by tcpdump, so tests can check what crossed
//! the underlay: which ports, and whether any payload was readable.

use std::net::{Ipv4Addr, SocketAddrV4};

/// One captured TCP segment with its payload.
#[derive(Debug, Clone)]
pub struct Segment {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub payload: Vec<u8>,
}

const LINKTYPE_ETHERNET: u32 = 1;
const LINKTYPE_LINUX_SLL: u32 = 113;
const LINKTYPE_LINUX_SLL2: u32 = 276;

/// Parses a classic pcap file (either byte order, µs or ns timestamps); IPv4/TCP only.
pub fn tcp_segments(file: &[u8]) -> Result<Vec<Segment>, String> {
    let header = file.get(..24).ok_or("pcap file shorter than its header")?;
    let magic = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let little = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        _ => return Err(format!("not a pcap file (magic {magic:#x})")),
    };
    let read_u32 = |b: &[u8]| {
        let a = [b[0], b[1], b[2], b[3]];
        if little { u32::from_le_bytes(a) } else { u32::from_be_bytes(a) }
    };
    let link = read_u32(&header[20..24]);
    let (link_len, proto_at) = match link {
        LINKTYPE_ETHERNET => (14, 12),
        LINKTYPE_LINUX_SLL => (16, 14),
        LINKTYPE_LINUX_SLL2 => (20, 0),
        other => return Err(format!("unsupported link type {other}")),
    };
    let mut segments = Vec::new();
    let mut at = 24;
    while at + 16 <= file.len() {
        let captured = read_u32(&file[at + 8..at + 12]) as usize;
        let frame = file.get(at + 16..at + 16 + captured).ok_or("truncated pcap record")?;
        at += 16 + captured;
        if let Some(segment) = parse_frame(frame, link_len, proto_at) {
            segments.push(segment);
        }
    }
    Ok(segments)
}

fn parse_frame(frame: &[u8], link_len: usize, proto_at: usize) -> Option<Segment> {
    let proto = u16::from_be_bytes([*frame.get(proto_at)?, *frame.get(proto_at + 1)?]);
    if proto != 0x0800 {
        return None;
    }
    let ip = frame.get(link_len..)?;
    let ihl = usize::from(ip.first()? & 0x0f) * 4;
    if *ip.get(9)? != 6 {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]])).min(ip.len());
    let src_ip = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst_ip = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    let tcp = ip.get(ihl..total)?;
    let data_offset = usize::from(tcp.get(12)? >> 4) * 4;
    Some(Segment {
        src: SocketAddrV4::new(src_ip, u16::from_be_bytes([tcp[0], tcp[1]])),
        dst: SocketAddrV4::new(dst_ip, u16::from_be_bytes([tcp[2], tcp[3]])),
        payload: tcp.get(data_offset..)?.to_vec(),
    })
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
