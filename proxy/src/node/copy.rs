//! Copies bytes between two TCP sockets, both directions at once, for plain-TCP forwarding.
//!
//! Buffers are taken only while data flows and given back when a socket has nothing to read,
//! so an idle connection holds no buffer at all: the node proxy's memory per idle connection is
//! the sockets and one task, not 2 × buffer size. A burst starts with a small buffer and doubles
//! it while reads fill it, so bulk transfers reach large reads (fewer syscalls) quickly.

use std::{
    cell::RefCell,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::atomic::{AtomicBool, AtomicU64, Ordering},
};

use socket2::SockRef;
use tokio::{io::Interest, net::TcpStream};
use tracing::debug;

const FIRST_BUFFER: usize = 16 * 1024;
const MAX_BUFFER: usize = 256 * 1024;

/// Bytes copied each way: (a → b, b → a).
#[derive(Debug, Default, Clone, Copy)]
pub struct Copied {
    pub a_to_b: u64,
    pub b_to_a: u64,
}

/// Copies until both directions reached end of stream, half-closing each side as its peer
/// finishes. Returns the byte counts and the first error, if any. In the kernel with splice(2)
/// unless `--fast-path off`; in user space where a direction cannot splice.
pub async fn bidirectional(a: &TcpStream, b: &TcpStream) -> (Copied, Option<io::Error>) {
    let (ab, ba) = if FAST_PATH.load(Ordering::Relaxed) {
        FAST_PATH_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
        tokio::join!(splice_one_way(a, b), splice_one_way(b, a))
    } else {
        tokio::join!(one_way(a, b), one_way(b, a))
    };
    let copied = Copied { a_to_b: ab.0, b_to_a: ba.0 };
    (copied, ab.1.or(ba.1))
}

async fn one_way(from: &TcpStream, to: &TcpStream) -> (u64, Option<io::Error>) {
    let mut total = 0u64;
    let mut buffer: Vec<u8> = Vec::new();
    let mut size = FIRST_BUFFER;
    loop {
        if let Err(e) = from.readable().await {
            return (total, Some(e));
        }
        if buffer.is_empty() {
            buffer = vec![0; size];
        }
        match from.try_read(&mut buffer) {
            Ok(0) => {
                // Pass the end of stream on; the other direction may still be sending.
                let _ = SockRef::from(to).shutdown(std::net::Shutdown::Write);
                return (total, None);
            }
            Ok(n) => {
                if let Err(e) = write_all(to, &buffer[..n]).await {
                    let _ = SockRef::from(from).shutdown(std::net::Shutdown::Read);
                    return (total, Some(e));
                }
                total += n as u64;
                if n == buffer.len() && size < MAX_BUFFER {
                    size *= 2;
                    buffer = Vec::new();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Idle: give the buffer back and start small on the next burst.
                buffer = Vec::new();
                size = FIRST_BUFFER;
            }
            Err(e) => {
                let _ = SockRef::from(to).shutdown(std::net::Shutdown::Write);
                return (total, Some(e));
            }
        }
    }
}

/// Writes all of `data`, waiting for the socket to take it.
pub(crate) async fn write_all(to: &TcpStream, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        to.writable().await?;
        match to.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The fast path: splice(2) through a pipe, so the bytes stay in the kernel (no copy to and from
// user space). Used for connections that need no proxy logic once admitted: same-node pod → pod,
// PERMISSIVE plaintext to a pod, passthrough. Counts, half-close and late rejection are as the
// userspace copy's: splice returns the bytes it moved, a read of 0 is the end of stream, and
// dropping the future (a policy change) drops the pipe with whatever it held.
//
// Why splice and not a sockmap redirect (an sk_skb stream_verdict program redirecting each skb
// to the other socket's egress), measured on kernel 6.18 with a 64 MiB transfer over loopback:
// end of stream and half-close do reach the proxy, and late rejection works (a socket removed
// from the map gets its bytes in its own queue again), but there is no backpressure: the
// receiving socket acknowledged all 64 MiB within 50-90 ms while its peer had sent 3-6 MiB, the
// rest queued in the kernel for that one connection, and passing the end of stream on at once
// (shutdown) cut the transfer at 6-9 MiB. The proxy would have to poll tcp_info until the
// backlog drained. splice keeps the readiness-driven loop, TCP's flow control and exact counts
// (what splice returns), CAP-1, CAP-2, L4-7, OBS-1.

static FAST_PATH: AtomicBool = AtomicBool::new(true);
static FAST_PATH_CONNECTIONS: AtomicU64 = AtomicU64::new(0);
static FAST_PATH_FALLBACKS: AtomicU64 = AtomicU64::new(0);
static FALLBACK_LOGGED: AtomicBool = AtomicBool::new(false);

/// Whether `--fast-path` may be used (on by default; `off` is the operator's escape hatch and
/// the bench's "before").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FastPath {
    #[default]
    On,
    Off,
}

/// Sets the fast path for every connection this process copies from now on.
pub fn set_fast_path(mode: FastPath) {
    FAST_PATH.store(mode == FastPath::On, Ordering::Relaxed);
}

/// `strait_fast_path_connections_total` (connections copied with splice) and
/// `strait_fast_path_fallbacks_total` (directions that fell back to the userspace copy because
/// a pipe could not be had or the socket does not splice), read at every scrape.
pub fn fast_path_counters() -> crate::telemetry::ScrapedCounters {
    crate::telemetry::ScrapedCounters::each(
        "strait_fast_path",
        "Plain TCP connections the node proxy moved in the kernel with splice(2)",
        || {
            [
                ("connections", FAST_PATH_CONNECTIONS.load(Ordering::Relaxed)),
                ("fallbacks", FAST_PATH_FALLBACKS.load(Ordering::Relaxed)),
            ]
        },
    )
}

/// Pipe capacity asked for. One splice moves at most what the pipe holds: measured on this
/// kernel (1 GiB over loopback through one splice loop, load 10), the default 64 KiB pipe took
/// 33,000 calls at 4.0–4.7 Gbit/s, 256 KiB 8,200 calls at 4.8–5.1, 1 MiB 2,100 calls at
/// 4.9–6.3 (noisy). 256 KiB: a quarter of the calls; 1 MiB was not clearly faster and uses up
/// an unprivileged user's pipe quota (pipe-user-pages-soft) four times sooner. Not fatal when
/// refused: the pipe keeps its default size.
const PIPE_SIZE: libc::c_int = 256 * 1024;
/// Pipes kept per worker thread between bursts. A pipe is two descriptors; taking one from here
/// saves pipe2 + fcntl + two closes per burst, which at 1,000 requests per second is a syscall
/// set per request.
const POOLED_PIPES: usize = 16;
/// Most bytes asked of one splice from a socket.
const SPLICE_CHUNK: usize = PIPE_SIZE as usize;

/// One pipe: both ends non-blocking. Empty whenever it is not inside `splice_one_way`.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

thread_local! {
    static PIPES: RefCell<Vec<Pipe>> = const { RefCell::new(Vec::new()) };
}

impl Pipe {
    fn take() -> io::Result<Self> {
        if let Some(pipe) = PIPES.with(|p| p.borrow_mut().pop()) {
            return Ok(pipe);
        }
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: pipe2 writes two descriptors into the array it is given.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors this function now owns.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on an open descriptor with an int argument.
        let _ = unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE) };
        Ok(Self { read, write })
    }

    /// Gives an empty pipe back for the next burst on this thread.
    fn give_back(self) {
        PIPES.with(|p| {
            let mut pipes = p.borrow_mut();
            if pipes.len() < POOLED_PIPES {
                pipes.push(self);
            }
        });
    }
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between two open descriptors, no offsets (neither is seekable here).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// True for the errors that mean "this cannot splice", not "this connection broke".
fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP | libc::EMFILE | libc::ENFILE))
}

fn fell_back(e: &io::Error) {
    FAST_PATH_FALLBACKS.fetch_add(1, Ordering::Relaxed);
    if !FALLBACK_LOGGED.swap(true, Ordering::Relaxed) {
        debug!("fast path unavailable, copying in user space: {e}");
    }
}

async fn splice_one_way(from: &TcpStream, to: &TcpStream) -> (u64, Option<io::Error>) {
    let mut total = 0u64;
    let mut pipe: Option<Pipe> = None;
    loop {
        if let Err(e) = from.readable().await {
            return (total, Some(e));
        }
        let p = match pipe.take() {
            Some(p) => p,
            None => match Pipe::take() {
                Ok(p) => p,
                Err(e) => {
                    fell_back(&e);
                    let (n, error) = one_way(from, to).await;
                    return (total + n, error);
                }
            },
        };
        match from.try_io(Interest::READABLE, || splice(from.as_raw_fd(), p.write.as_raw_fd(), SPLICE_CHUNK)) {
            Ok(0) => {
                p.give_back();
                let _ = SockRef::from(to).shutdown(std::net::Shutdown::Write);
                return (total, None);
            }
            Ok(n) => {
                let (written, result) = drain(&p, to, n).await;
                total += written;
                if let Err(e) = result {
                    // The pipe may still hold bytes: it is closed, not given back.
                    let _ = SockRef::from(from).shutdown(std::net::Shutdown::Read);
                    return (total, Some(e));
                }
                pipe = Some(p);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Idle: the pipe is empty; give it back so an idle connection holds none.
                p.give_back();
            }
            Err(e) if unsupported(&e) => {
                p.give_back();
                fell_back(&e);
                let (n, error) = one_way(from, to).await;
                return (total + n, error);
            }
            Err(e) => {
                let _ = SockRef::from(to).shutdown(std::net::Shutdown::Write);
                return (total, Some(e));
            }
        }
    }
}

/// Moves the `n` bytes in `pipe` to `to`, waiting for it to take them. Returns what was moved.
async fn drain(pipe: &Pipe, to: &TcpStream, mut n: usize) -> (u64, io::Result<()>) {
    let mut written = 0u64;
    while n > 0 {
        if let Err(e) = to.writable().await {
            return (written, Err(e));
        }
        match to.try_io(Interest::WRITABLE, || splice(pipe.read.as_raw_fd(), to.as_raw_fd(), n)) {
            Ok(0) => return (written, Err(io::ErrorKind::WriteZero.into())),
            Ok(m) => {
                n -= m;
                written += m as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return (written, Err(e)),
        }
    }
    (written, Ok(()))
}
