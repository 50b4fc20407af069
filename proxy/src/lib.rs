//! strait: an ambient (sidecarless) service-mesh data plane.
//!
//! Data flows one way: `config` parses the resources users write, `model` compiles them into an
//! immutable snapshot, and the consumers (`capture` keeping the eBPF maps in step, `node`
//! proxying connections, `admin` reporting) read the snapshot in force.

pub mod admin;
pub mod admission;
pub mod authz;
pub mod capture;
pub mod config;
pub mod control;
pub mod ctl;
pub mod demo;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod gateway;
pub mod grpc;
pub mod hbone;
pub mod identity;
pub mod l7;
pub mod model;
pub mod node;
pub mod sys;
pub mod telemetry;
pub mod waypoint;
pub mod xds;
