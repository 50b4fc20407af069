//! Operating-system facts and socket set-up the proxy needs: privilege checks, transparent
//! listeners, marked upstream sockets.

use std::{fs, io, net::SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use strait_ebpf_common::PROXY_MARK;
use tokio::net::{TcpSocket, TcpStream};

/// Linux capability numbers (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_BPF: u32 = 39;

/// Checks that the process may load eBPF programs and change routing; the error says what is
/// missing and what to do.
pub fn check_node_privileges() -> Result<(), String> {
    let status = fs::read_to_string("/proc/self/status").map_err(|e| format!("cannot read /proc/self/status: {e}"))?;
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .ok_or("cannot read the process capabilities from /proc/self/status")?;
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "strait node must run as root (or with CAP_BPF and CAP_NET_ADMIN) to load its eBPF programs \
             and set up policy routing; this process lacks {}",
            missing.join(" and ")
        ))
    }
}

/// A listener that accepts connections addressed to any IP: `IP_TRANSPARENT` lets a socket the
/// capture program assigned packets to answer from the original destination address.
pub fn transparent_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_ip_transparent_v4(true)?;
    socket.set_reuse_address(true)?;
    // A successor normally takes these very sockets over (OPS-3); if that fails it must still be
    // able to bind while this process drains.
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    // A large backlog: bursts of new connections must queue, not be refused.
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Connects to `addr` with Nagle off, for proxies whose sockets need no mark.
pub async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects to `addr` from a socket carrying the proxy's mark, so that its packets are never
/// captured again.
pub async fn connect_marked(addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = upstream_socket(addr)?;
    socket.set_mark(PROXY_MARK)?;
    let socket = TcpSocket::from_std_stream(socket.into());
    let stream = socket.connect(addr).await?;
    // Proxied traffic is mostly request/response: never hold a small write back.
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Connects to `addr` from `source` (an address that need not be local), so the destination
/// sees the original client's IP (L4-6). Replies come back through the capture program, which
/// hands them to this socket.
pub async fn connect_transparent(source: std::net::IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    let socket = upstream_socket(addr)?;
    socket.set_mark(PROXY_MARK)?;
    socket.set_ip_transparent_v4(true)?;
    // Without this, bind() picks the ephemeral port for the source IP alone and keeps it from
    // every other connection from that IP, whatever the destination: many HBONE tunnels and
    // inbound deliveries share one pod's address as source, and would exhaust its port range.
    // With it, the port is picked at connect(), per 4-tuple.
    set_bind_address_no_port(&socket)?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    let socket = TcpSocket::from_std_stream(socket.into());
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A non-blocking TCP socket for `addr`'s family, made so by `socket(2)` itself: two `fcntl`
/// calls fewer per upstream connection than setting it afterwards (measured: 2 of the node
/// proxy's 20 system calls per new inbound connection).
fn upstream_socket(addr: SocketAddr) -> io::Result<Socket> {
    Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), Some(Protocol::TCP))
}

/// `IP_BIND_ADDRESS_NO_PORT`: a bind to port 0 defers choosing the port to connect().
fn set_bind_address_no_port(socket: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on an open socket with a pointer to a local int and its size.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::addr_of!(on).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret == 0 { Ok(()) } else { Err(io::Error::last_os_error()) }
}

/// Raises the open-file limit as far as allowed, or sets it to `wanted`: a node proxy holds two
/// sockets per proxied connection, and the usual soft limit of 1024 would cap it at a few
/// hundred connections. Returns the limit in force.
pub fn set_fd_limit(wanted: Option<u64>) -> u64 {
    const HIGH: libc::rlim_t = 1 << 20;
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if let Some(wanted) = wanted {
            let set = libc::rlimit { rlim_cur: wanted, rlim_max: limit.rlim_max.max(wanted) };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &set) == 0 {
                return wanted;
            }
        }
        if limit.rlim_max < HIGH {
            // Needs CAP_SYS_RESOURCE; keep the old hard limit if refused.
            let raised = libc::rlimit { rlim_cur: HIGH, rlim_max: HIGH };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return HIGH;
            }
        }
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        limit.rlim_cur
    }
}
