//! The load generator and test server behind `cargo xtask bench` (the `strait-load` binary).
//!
//! The benchmark compares traffic through the mesh with direct traffic on a 2-core machine where
//! the client, the server and both proxies share the cores, so the tool itself must cost little:
//! a current-thread runtime by default, a hand-written HTTP/1.1 subset on plain sockets, buffers
//! reused per connection, static zero bytes for every body and stream. Each client mode lives in
//! its own module and returns a serializable report; [`server`] answers all of them on the same
//! ports. See `shared/BENCHMARKS.md` for the figures these modes produce.
#![deny(unsafe_code)]

pub mod connections;
pub mod hold;
pub mod http;
pub mod latency;
pub mod limits;
pub mod net;
pub mod rate;
pub mod schedule;
pub mod server;
pub mod sink;
pub mod stream;
pub mod tls;

use std::io;

/// The runtime a mode runs on: `threads` ≤ 1 gives a current-thread runtime, which costs one
/// thread and no work stealing; more gives a multi-thread runtime with that many workers.
pub fn runtime(threads: usize) -> io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_all().build()
}
