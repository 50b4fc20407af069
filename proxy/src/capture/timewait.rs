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
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const TCP_TIME_WAIT: u32 = 6;
/// Destroy requests sent per `sendmsg`: the kernel handles every message of a buffer in turn.
const BATCH: usize = 128;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct NlMsgHdr {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
    pid: u32,
}

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
/// transparent sockets, never the node's own connections). Returns how many were destroyed.
pub fn reap(pods: &HashSet<Ipv4Addr>) -> io::Result<usize> {
    if pods.is_empty() {
        return Ok(0);
    }
    let host = host_addresses();
    let socket = open()?;
    let found: Vec<SockId> = dump_time_wait(&socket)?
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

fn open() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn request(kind: u16, flags: u16, seq: u32, body: DiagRequest) -> Request {
    Request { header: NlMsgHdr { len: mem::size_of::<Request>() as u32, kind, flags, seq, pid: 0 }, body }
}

fn as_bytes<T: Copy>(value: &T) -> &[u8] {
    // SAFETY: T is a repr(C) plain-data struct without padding bytes that matter to the kernel.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), mem::size_of::<T>()) }
}

fn send(socket: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: sending a live buffer on a netlink socket (the kernel is the default peer).
    let sent = unsafe { libc::send(socket.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
    if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

fn receive(socket: &OwnedFd, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: receiving into a live buffer of the given length.
    let n = unsafe { libc::recv(socket.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Netlink messages in a received buffer: (type, payload).
fn messages(buffer: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut offset = 0;
    let header_len = mem::size_of::<NlMsgHdr>();
    while offset + header_len <= buffer.len() {
        // SAFETY: bounds checked above; read_unaligned copes with any alignment.
        let header: NlMsgHdr = unsafe { std::ptr::read_unaligned(buffer[offset..].as_ptr().cast()) };
        let len = header.len as usize;
        if len < header_len || offset + len > buffer.len() {
            break;
        }
        out.push((header.kind, &buffer[offset + header_len..offset + len]));
        offset += (len + 3) & !3;
    }
    out
}

fn dump_time_wait(socket: &OwnedFd) -> io::Result<Vec<SockId>> {
    let body = DiagRequest {
        family: libc::AF_INET as u8,
        protocol: libc::IPPROTO_TCP as u8,
        states: 1 << TCP_TIME_WAIT,
        ..Default::default()
    };
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    send(socket, as_bytes(&request(SOCK_DIAG_BY_FAMILY, flags, 1, body)))?;
    let mut found = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = receive(socket, &mut buffer)?;
        for (kind, payload) in messages(&buffer[..n]) {
            match kind as libc::c_int {
                libc::NLMSG_DONE => return Ok(found),
                libc::NLMSG_ERROR => {
                    return Err(netlink_error(payload).unwrap_or_else(|| io::Error::other("dump failed")));
                }
                _ if payload.len() >= mem::size_of::<DiagMessage>() => {
                    // SAFETY: length checked; read_unaligned copes with any alignment.
                    let msg: DiagMessage = unsafe { std::ptr::read_unaligned(payload.as_ptr().cast()) };
                    if u32::from(msg.state) == TCP_TIME_WAIT && i32::from(msg.family) == libc::AF_INET {
                        found.push(msg.id);
                    }
                }
                _ => {}
            }
        }
    }
}

/// The error an `NLMSG_ERROR` carries; `None` for an acknowledgement (error 0).
fn netlink_error(payload: &[u8]) -> Option<io::Error> {
    let code = i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?);
    (code != 0).then(|| io::Error::from_raw_os_error(-code))
}

/// Destroys one batch; a socket that expired meanwhile (`ENOENT`) is not an error.
fn destroy(socket: &OwnedFd, ids: &[SockId]) -> io::Result<usize> {
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    let mut bytes = Vec::with_capacity(ids.len() * mem::size_of::<Request>());
    for (seq, id) in ids.iter().enumerate() {
        let body = DiagRequest {
            family: libc::AF_INET as u8,
            protocol: libc::IPPROTO_TCP as u8,
            states: 1 << TCP_TIME_WAIT,
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
                        format!(
                            "cannot destroy a TIME_WAIT socket (needs CAP_NET_ADMIN and CONFIG_INET_DIAG_DESTROY): {e}"
                        ),
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
    fn parses_netlink_messages_and_errors() {
        let mut buffer = Vec::new();
        for (kind, code) in [(libc::NLMSG_ERROR as u16, 0i32), (libc::NLMSG_ERROR as u16, -libc::ENOENT)] {
            let header = NlMsgHdr { len: 20, kind, ..Default::default() };
            buffer.extend_from_slice(as_bytes(&header));
            buffer.extend_from_slice(&code.to_ne_bytes());
        }
        let parsed = messages(&buffer);
        assert_eq!(parsed.len(), 2);
        assert!(netlink_error(parsed[0].1).is_none());
        assert_eq!(netlink_error(parsed[1].1).and_then(|e| e.raw_os_error()), Some(libc::ENOENT));
    }
}
