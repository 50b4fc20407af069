//! The little of netlink that capture needs: a socket, requests, dumps, and the messages and
//! attributes of what the kernel answers. Used for `NETLINK_SOCK_DIAG` (TIME_WAIT sockets) and
//! `NETLINK_ROUTE` (links, neighbours and bridge forwarding entries).

use std::{
    io, mem,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

pub const NETLINK_SOCK_DIAG: libc::c_int = 4;
pub const NETLINK_ROUTE: libc::c_int = 0;

/// `struct nlmsghdr`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct NlMsgHdr {
    pub len: u32,
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub pid: u32,
}

pub fn open(protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, protocol) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The bytes of a plain-data request structure.
pub fn as_bytes<T: Copy>(value: &T) -> &[u8] {
    // SAFETY: T is a repr(C) plain-data struct without padding bytes that matter to the kernel.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), mem::size_of::<T>()) }
}

pub fn send(socket: &OwnedFd, bytes: &[u8]) -> io::Result<()> {
    // SAFETY: sending a live buffer on a netlink socket (the kernel is the default peer).
    let sent = unsafe { libc::send(socket.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), 0) };
    if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

pub fn receive(socket: &OwnedFd, buffer: &mut [u8]) -> io::Result<usize> {
    // SAFETY: receiving into a live buffer of the given length.
    let n = unsafe { libc::recv(socket.as_raw_fd(), buffer.as_mut_ptr().cast(), buffer.len(), 0) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// Netlink messages in a received buffer: (type, payload).
pub fn messages(buffer: &[u8]) -> Vec<(u16, &[u8])> {
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
        offset += align(len);
    }
    out
}

/// The error an `NLMSG_ERROR` carries; `None` for an acknowledgement (error 0).
pub fn netlink_error(payload: &[u8]) -> Option<io::Error> {
    let code = i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?);
    (code != 0).then(|| io::Error::from_raw_os_error(-code))
}

/// Sends a dump request of type `kind` whose body is `body` (the family header the request
/// type wants) and returns the payload of every answer until `NLMSG_DONE`.
pub fn dump(socket: &OwnedFd, kind: u16, body: &[u8]) -> io::Result<Vec<Vec<u8>>> {
    let header_len = mem::size_of::<NlMsgHdr>();
    let header = NlMsgHdr {
        len: (header_len + body.len()) as u32,
        kind,
        flags: (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16,
        seq: 1,
        pid: 0,
    };
    let mut request = as_bytes(&header).to_vec();
    request.extend_from_slice(body);
    send(socket, &request)?;
    let mut found = Vec::new();
    // Dumps come in parts of at most a page or two each; 64 KiB takes any of them whole.
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = receive(socket, &mut buffer)?;
        for (kind, payload) in messages(&buffer[..n]) {
            match kind as libc::c_int {
                libc::NLMSG_DONE => return Ok(found),
                libc::NLMSG_ERROR => {
                    return Err(netlink_error(payload).unwrap_or_else(|| io::Error::other("dump failed")));
                }
                _ => found.push(payload.to_vec()),
            }
        }
    }
}

/// The attributes (`struct rtattr`: length, type, value) that follow a message's fixed header:
/// (type without the nested/byte-order flags, value).
pub fn attributes(bytes: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut offset = 0;
    while offset + 4 <= bytes.len() {
        let len = usize::from(u16::from_ne_bytes([bytes[offset], bytes[offset + 1]]));
        let kind = u16::from_ne_bytes([bytes[offset + 2], bytes[offset + 3]]) & 0x3fff;
        if len < 4 || offset + len > bytes.len() {
            break;
        }
        out.push((kind, &bytes[offset + 4..offset + len]));
        offset += align(len);
    }
    out
}

fn align(len: usize) -> usize {
    (len + 3) & !3
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn parses_attributes_with_padding_and_stops_at_a_truncated_one() {
        let mut bytes = Vec::new();
        // type 3, "ab\0" (7 bytes, padded to 8), then type 10 with a u32, then a truncated one.
        bytes.extend_from_slice(&7u16.to_ne_bytes());
        bytes.extend_from_slice(&3u16.to_ne_bytes());
        bytes.extend_from_slice(b"ab\0\0");
        bytes.extend_from_slice(&8u16.to_ne_bytes());
        bytes.extend_from_slice(&(10u16 | 0x8000).to_ne_bytes());
        bytes.extend_from_slice(&5u32.to_ne_bytes());
        bytes.extend_from_slice(&40u16.to_ne_bytes());
        bytes.extend_from_slice(&1u16.to_ne_bytes());
        let attrs = attributes(&bytes);
        assert_eq!(attrs.len(), 2);
        assert_eq!(attrs[0], (3, &b"ab\0"[..]));
        assert_eq!(attrs[1], (10, &5u32.to_ne_bytes()[..]));
    }
}
