//! strait-testbed: Kubernetes-like test topologies built from Linux network namespaces.
//!
//! strait's end-to-end tests and `strait demo` need nodes and pods wired the way a routed CNI
//! wires them, real processes inside them, and a guarantee that nothing is left behind when a
//! test fails or crashes — tests run in parallel threads and processes on one machine. A
//! [`Topology`] owns a set of namespaces (a fabric bridge, nodes, pods) and deletes them, with
//! every process inside, when dropped; leftovers of crashed runs are swept on the next start.
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! use std::time::Duration;
//! use strait_testbed::{EchoKind, Topology};
//! let topo = Topology::new("my_test")?;
//! let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
//! let (client, server) = (topo.add_pod(&n1, "client")?, topo.add_pod(&n2, "server")?);
//! let _echo = server.start_echo_server(EchoKind::Http, 8080)?;
//! let reply = client.curl(&format!("http://{}:8080/", server.ip()), Duration::from_secs(5))?;
//! assert!(reply.ok() && reply.body.contains(&client.ip().to_string()));
//! # Ok(()) }
//! ```
//!
//! Needs root, `ip` (iproute2), `sysctl` and `curl`.

mod bins;
mod cleanup;
mod command;
pub mod echo;
#[cfg(feature = "grpc")]
pub mod grpc;
pub mod k8s;
pub mod kube;
mod names;
mod netns;
pub mod pcap;
mod process;
mod topology;
mod traffic;
mod underlay;

pub use bins::{bin_path, require_bin};
pub use echo::client::GetSummary;
pub use echo::grpc::GrpcReply;
pub use echo::websocket::WsReport;
pub use netns::Netns;
pub use process::Process;
pub use topology::{FABRIC_GATEWAY, Node, Pod, Topology};
pub use traffic::{CurlResult, EchoKind, EchoServer};
pub use underlay::UnderlayCapture;
