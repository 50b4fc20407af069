//! Listener handover between two `strait node` processes on one node (OPS-3). A new process
//! asks the running one for its listening sockets over a Unix socket and receives them
//! (SCM_RIGHTS): the same kernel sockets, so the connections queued in them are accepted by
//! the new process and no new connection is ever refused across a restart or an upgrade.
//!
//! The exchange, one line each: the new process sends `take`; the old one answers with the
//! three sockets; the new one registers them with the capture programs, starts accepting and
//! sends `took`, and only then does the old one stop accepting and drain. A successor that
//! dies before `took` changes nothing: the old process keeps serving.

use std::{
    io::{self, Read as _, Write as _},
    mem,
    net::TcpListener as StdTcpListener,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        linux::net::SocketAddrExt as _,
        unix::{
            fs::PermissionsExt as _,
            net::{SocketAddr as UnixAddr, UnixListener, UnixStream},
        },
    },
    path::{Path, PathBuf},
    time::Duration,
};

use tracing::{info, warn};

const TAKE: &[u8] = b"strait-handover/1 take\n";
const GIVE: &[u8] = b"strait-handover/1 outbound inbound-plaintext hbone\n";
const TOOK: &[u8] = b"strait-handover/1 took\n";
/// How long either side waits for the other's next line.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The node proxy's three listening sockets.
#[derive(Debug)]
pub struct Listeners {
    pub outbound: StdTcpListener,
    pub plaintext: StdTcpListener,
    pub hbone: StdTcpListener,
}

/// The running process the listeners came from, waiting to hear they are in use.
pub struct Predecessor(UnixStream);

impl Predecessor {
    /// Tells the old process the listeners are being accepted from here: it stops accepting,
    /// and closes its handover socket (this returns once it has, so `serve` can bind it).
    pub fn confirm(mut self) {
        if let Err(e) = self.0.write_all(TOOK) {
            warn!("cannot tell the previous strait node that the listeners were taken over: {e}");
            return;
        }
        let mut rest = Vec::new();
        let _ = self.0.read_to_end(&mut rest);
    }
}

/// Where the handover socket lives: `@name` is a name in the abstract namespace, which belongs
/// to the network namespace (so one per node, with nothing on disk to go stale); anything else
/// is a file path.
fn address(path: &Path) -> io::Result<UnixAddr> {
    match path.to_str().and_then(|p| p.strip_prefix('@')) {
        Some(name) => UnixAddr::from_abstract_name(name.as_bytes()),
        None => UnixAddr::from_pathname(path),
    }
}

/// Asks a running node proxy listening on `path` for its listeners. `Ok(None)` when none runs.
pub fn take_over(path: &Path) -> io::Result<Option<(Listeners, Predecessor)>> {
    let mut stream = match UnixStream::connect_addr(&address(path)?) {
        Ok(s) => s,
        Err(e) if matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused) => return Ok(None),
        Err(e) => return Err(e),
    };
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.set_write_timeout(Some(STEP_TIMEOUT))?;
    stream.write_all(TAKE)?;
    let (line, fds) = receive_fds(&stream)?;
    if line != GIVE {
        return Err(io::Error::other(format!(
            "the running strait node answered {:?}, not its listeners (a different version?)",
            String::from_utf8_lossy(&line)
        )));
    }
    let [outbound, plaintext, hbone]: [OwnedFd; 3] = fds
        .try_into()
        .map_err(|fds: Vec<OwnedFd>| io::Error::other(format!("expected 3 listening sockets, got {}", fds.len())))?;
    let listeners = Listeners {
        outbound: StdTcpListener::from(outbound),
        plaintext: StdTcpListener::from(plaintext),
        hbone: StdTcpListener::from(hbone),
    };
    for l in [&listeners.outbound, &listeners.plaintext, &listeners.hbone] {
        l.set_nonblocking(true)?;
    }
    Ok(Some((listeners, Predecessor(stream))))
}

/// Serves handover requests on `path` for `listeners` until one succeeds; calls `taken` then.
/// Runs on its own thread: handover is rare and must work while the runtime is busy.
pub fn serve(path: PathBuf, listeners: [RawFd; 3], taken: impl FnOnce() + Send + 'static) -> io::Result<()> {
    let server = bind(&path)?;
    std::thread::Builder::new().name("handover".into()).spawn(move || {
        for stream in server.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    warn!("handover socket: {e}");
                    continue;
                }
            };
            match give(&stream, &listeners) {
                Ok(()) => {
                    info!("a new strait node took over the listeners; no longer accepting connections");
                    taken();
                    // The name goes first, then the connection: the successor binds the name
                    // once it sees the connection close.
                    drop(server);
                    drop(stream);
                    return;
                }
                Err(e) => warn!("listener handover failed, still serving: {e}"),
            }
        }
    })?;
    Ok(())
}

/// Binds the handover socket, replacing a stale one (a socket file nobody listens on).
fn bind(path: &Path) -> io::Result<UnixListener> {
    let addr = address(path)?;
    if addr.as_abstract_name().is_some() {
        // Gone with the process that bound it: nothing stale to remove, no file to protect
        // (`check_peer` keeps other users out).
        return UnixListener::bind_addr(&addr);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        // A live predecessor has handed over by now (`take_over` runs first); what is left is
        // either its socket, which no longer matters, or a crashed run's.
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    // Whoever can connect can take the node's traffic: the owner only.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

fn give(mut stream: &UnixStream, listeners: &[RawFd; 3]) -> io::Result<()> {
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.set_write_timeout(Some(STEP_TIMEOUT))?;
    check_peer(stream)?;
    let mut request = [0u8; TAKE.len()];
    stream.read_exact(&mut request)?;
    if request != TAKE {
        return Err(io::Error::other("not a handover request"));
    }
    send_fds(stream, GIVE, listeners)?;
    let mut answer = [0u8; TOOK.len()];
    stream.read_exact(&mut answer)?;
    if answer != TOOK {
        return Err(io::Error::other("the new process did not confirm"));
    }
    Ok(())
}

/// Only a process of our own user may take the listeners (the socket file is 0600 too).
fn check_peer(stream: &UnixStream) -> io::Result<()> {
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt fills a correctly sized ucred for a valid socket.
    let rc = unsafe {
        libc::getsockopt(stream.as_raw_fd(), libc::SOL_SOCKET, libc::SO_PEERCRED, (&raw mut cred).cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: geteuid has no preconditions.
    let ours = unsafe { libc::geteuid() };
    if cred.uid != ours {
        return Err(io::Error::other(format!("refusing a handover to uid {} (pid {})", cred.uid, cred.pid)));
    }
    Ok(())
}

/// Room for the control message carrying three descriptors.
const CONTROL_LEN: usize = 64;

fn send_fds(stream: &UnixStream, payload: &[u8], fds: &[RawFd; 3]) -> io::Result<()> {
    let mut control = [0u8; CONTROL_LEN];
    let fd_bytes = mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE/CMSG_LEN are pure arithmetic.
    let (space, cmsg_len) = unsafe { (libc::CMSG_SPACE(fd_bytes as u32), libc::CMSG_LEN(fd_bytes as u32)) };
    let mut iov = libc::iovec { iov_base: payload.as_ptr().cast_mut().cast(), iov_len: payload.len() };
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as usize;
    // SAFETY: the control buffer is large enough for one header and three descriptors
    // (`space` <= CONTROL_LEN), so CMSG_FIRSTHDR is non-null and its data area in bounds.
    unsafe {
        let header = libc::CMSG_FIRSTHDR(&msg);
        if header.is_null() || space as usize > CONTROL_LEN {
            return Err(io::Error::other("control buffer too small"));
        }
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = cmsg_len as usize;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(header), fd_bytes);
    }
    // SAFETY: msg points at live buffers for the duration of the call.
    let sent = unsafe { libc::sendmsg(stream.as_raw_fd(), &msg, libc::MSG_NOSIGNAL) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if sent as usize != payload.len() {
        return Err(io::Error::other("short handover message"));
    }
    Ok(())
}

fn receive_fds(stream: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut payload = [0u8; 128];
    let mut control = [0u8; CONTROL_LEN];
    let mut iov = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
    // SAFETY: an all-zero msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = CONTROL_LEN;
    // SAFETY: msg points at live buffers; MSG_CMSG_CLOEXEC keeps the descriptors from leaking
    // into children.
    let received = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled `control` up to msg_controllen; CMSG_* walk within it.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&msg);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(header);
                let bytes = (*header).cmsg_len as usize - (data as usize - header as usize);
                for i in 0..bytes / mem::size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            header = libc::CMSG_NXTHDR(&msg, header);
        }
    }
    if msg.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other("the listening sockets did not all arrive (control message truncated)"));
    }
    Ok((payload[..received as usize].to_vec(), fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    // OPS-3: the listening sockets themselves cross over: a connection queued before the
    // handover is accepted by the new owner.
    #[test]
    fn listeners_cross_over_with_their_queues() {
        let dir = std::env::temp_dir().join(format!("strait-handover-{}", std::process::id()));
        let path = dir.join("node.sock");
        let listeners: Vec<StdTcpListener> =
            (0..3).map(|_| StdTcpListener::bind("127.0.0.1:0").expect("bind")).collect();
        let addr = listeners[2].local_addr().expect("addr");
        let queued = std::net::TcpStream::connect(addr).expect("connect before the handover");
        let fds = [listeners[0].as_raw_fd(), listeners[1].as_raw_fd(), listeners[2].as_raw_fd()];
        let (tx, rx) = std::sync::mpsc::channel();
        serve(path.clone(), fds, move || {
            let _ = tx.send(());
        })
        .expect("serve");
        let (taken, predecessor) = take_over(&path).expect("take over").expect("a running process");
        assert!(rx.try_recv().is_err(), "the old process stops only after `took`");
        predecessor.confirm();
        rx.recv_timeout(Duration::from_secs(5)).expect("the old process heard `took`");
        // The name is free again for the new process's own handover socket.
        serve(path.clone(), fds, || {}).expect("the new process serves the handover socket");
        drop(listeners);
        taken.hbone.set_nonblocking(false).expect("blocking");
        let (accepted, peer) = taken.hbone.accept().expect("the queued connection");
        assert_eq!(peer, queued.local_addr().expect("local"));
        drop(accepted);
        assert!(take_over(&dir.join("absent.sock")).expect("no process").is_none());
        let abstract_name = PathBuf::from(format!("@strait-handover-test-{}", std::process::id()));
        assert!(take_over(&abstract_name).expect("no process").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
