//! Reaps the TIME_WAIT sockets that transparent connections leave in the node's network
//! namespace with pods' addresses (CAP-5, CAP-6). The kernel's early demux matches a packet the
//! node forwards against them, and `ip_forward` drops a packet claimed by a socket, so once a pod
//! is no longer proxied (the proxy stopped, or the pod left the mesh) its new connections that
//! reuse one of those 4-tuples would vanish for the 60 s a TIME_WAIT lasts.
//!
//! The sockets are listed and destroyed over `NETLINK_SOCK_DIAG` (`ss -K` does the same).

use std::{
    collections::HashSet,
    io, mem,
    net::{IpAddr, Ipv4Addr},
    os::fd::OwnedFd,
};

use super::netlink::{NETLINK_SOCK_DIAG, NlMsgHdr, as_bytes, messages, netlink_error, receive, send};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const TCP_TIME_WAIT: u32 = 6;
const TCP_LISTEN: u32 = 10;
/// Every TCP state but LISTEN (states 1 to 11 of `include/net/tcp_states.h`), as a state mask.
const ALL_BUT_LISTEN: u32 = ((1 << 12) - 2) & !(1 << TCP_LISTEN);
/// Destroy requests sent per `sendmsg`: the kernel handles every message of a buffer in turn.
const BATCH: usize = 128;

/// `struct inet_diag_sockid`: ports and addresses in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: u16,
    dport: u16,
    src: [u32; 4],
    dst: [u32; 4],
    interface: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagRequest {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// The head of `struct inet_diag_msg`, as far as it is read.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct DiagMessage {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Request {
    header: NlMsgHdr,
    body: DiagRequest,
}

/// Destroys the TIME_WAIT sockets of the current network namespace that carry one of `pods`
/// at either end and whose local address is not one of this host's (so only the proxy's
/// transparent sockets, never the node's own connections). With `stopping`, the proxy's other
/// such sockets too, in any state but LISTEN: the HBONE connections it pooled from pods'
/// addresses (L4-6) and what the drain left, which would otherwise close after the process
/// exits and linger as FIN_WAIT or TIME_WAIT (their peers get a reset instead of a FIN).
/// Returns how many were destroyed.
pub fn reap(pods: &HashSet<Ipv4Addr>, stopping: bool) -> io::Result<usize> {
    if pods.is_empty() {
        return Ok(0);
    }
    let host = host_addresses();
    let socket = super::netlink::open(NETLINK_SOCK_DIAG)?;
    let states = if stopping { ALL_BUT_LISTEN } else { 1 << TCP_TIME_WAIT };
    let found: Vec<SockId> = dump_sockets(&socket, states)?
        .into_iter()
        .filter(|id| {
            let (local, remote) = (ipv4(id.src[0]), ipv4(id.dst[0]));
            (pods.contains(&local) || pods.contains(&remote)) && !host.contains(&IpAddr::V4(local))
        })
        .collect();
    let mut destroyed = 0;
    for batch in found.chunks(BATCH) {
        destroyed += destroy(&socket, batch)?;
    }
    Ok(destroyed)
}

fn ipv4(network_order: u32) -> Ipv4Addr {
    Ipv4Addr::from(network_order.to_ne_bytes())
}

fn request(kind: u16, flags: u16, seq: u32, body: DiagRequest) -> Request {
    Request { header: NlMsgHdr { len: mem::size_of::<Request>() as u32, kind, flags, seq, pid: 0 }, body }
}

/// The IPv4 TCP sockets in one of `states` (a mask of `1 << state`).
fn dump_sockets(socket: &OwnedFd, states: u32) -> io::Result<Vec<SockId>> {
    let body =
        DiagRequest { family: libc::AF_INET as u8, protocol: libc::IPPROTO_TCP as u8, states, ..Default::default() };
    let answers = super::netlink::dump(socket, SOCK_DIAG_BY_FAMILY, as_bytes(&body))?;
    Ok(answers
        .iter()
        .filter(|payload| payload.len() >= mem::size_of::<DiagMessage>())
        // SAFETY: length checked; read_unaligned copes with any alignment.
        .map(|payload| unsafe { std::ptr::read_unaligned::<DiagMessage>(payload.as_ptr().cast()) })
        .filter(|msg| states & (1 << u32::from(msg.state).min(31)) != 0 && i32::from(msg.family) == libc::AF_INET)
        .map(|msg| msg.id)
        .collect())
}

/// Destroys one batch; a socket that expired meanwhile (`ENOENT`) is not an error.
fn destroy(socket: &OwnedFd, ids: &[SockId]) -> io::Result<usize> {
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    let mut bytes = Vec::with_capacity(ids.len() * mem::size_of::<Request>());
    for (seq, id) in ids.iter().enumerate() {
        let body = DiagRequest {
            family: libc::AF_INET as u8,
            protocol: libc::IPPROTO_TCP as u8,
            states: ALL_BUT_LISTEN,
            id: *id,
            ..Default::default()
        };
        bytes.extend_from_slice(as_bytes(&request(SOCK_DESTROY, flags, seq as u32 + 2, body)));
    }
    send(socket, &bytes)?;
    let (mut answered, mut destroyed) = (0, 0);
    let mut buffer = vec![0u8; 64 * 1024];
    while answered < ids.len() {
        let n = receive(socket, &mut buffer)?;
        for (kind, payload) in messages(&buffer[..n]) {
            if kind as libc::c_int != libc::NLMSG_ERROR {
                continue;
            }
            answered += 1;
            match netlink_error(payload) {
                None => destroyed += 1,
                Some(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Some(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("cannot destroy a socket (needs CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY): {e}"),
                    ));
                }
            }
        }
    }
    Ok(destroyed)
}

/// The addresses of this network namespace's interfaces.
fn host_addresses() -> HashSet<IpAddr> {
    let mut set = HashSet::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list we walk and free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return set;
    }
    let mut cursor = list;
    while !cursor.is_null() {
        // SAFETY: cursor walks the list getifaddrs returned until its null end.
        unsafe {
            let addr = (*cursor).ifa_addr;
            if !addr.is_null() && i32::from((*addr).sa_family) == libc::AF_INET {
                let v4 = &*addr.cast::<libc::sockaddr_in>();
                set.insert(IpAddr::V4(Ipv4Addr::from(v4.sin_addr.s_addr.to_ne_bytes())));
            }
            cursor = (*cursor).ifa_next;
        }
    }
    // SAFETY: freeing the list getifaddrs allocated, once.
    unsafe { libc::freeifaddrs(list) };
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_match_the_kernel() {
        assert_eq!(mem::size_of::<SockId>(), 48);
        assert_eq!(mem::size_of::<DiagRequest>(), 56);
        assert_eq!(mem::size_of::<Request>(), 72);
    }

    #[test]
    fn a_stop_reaps_every_state_but_listen() {
        // ESTABLISHED (1) to CLOSING (11), LISTEN (10) left out.
        assert_eq!(ALL_BUT_LISTEN, 0b1011_1111_1110);
        assert_ne!(ALL_BUT_LISTEN & (1 << TCP_TIME_WAIT), 0);
    }
}
