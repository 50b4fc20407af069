//! Traffic capture: loads the eBPF programs into the kernel and keeps their maps in step with
//! the model (CAP-1, CAP-3, CAP-5).
//!
//! The pod-ingress program is attached to the host-side veth of every captured pod on this
//! node, found from the node's `/32` pod routes as routed CNIs install them. Whether a pod's new
//! connections are steered is decided by the `POD_STATE` map alone, so enrolling or
//! un-enrolling is one map write, and a pod being un-enrolled keeps its open connections: it
//! moves to "draining", where only packets of connections the proxy already holds are steered.

mod routes;
mod routing;

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, SockMap},
    programs::{SchedClassifier, TcAttachType, tc::SchedClassifierLinkId},
};
use strait_ebpf_common::{POD_CAPTURED, POD_DRAINING, stat};
use thiserror::Error;
use tracing::{debug, info, warn};

pub use routes::{pod_interfaces, uplink_interface};
pub use routing::SteerRouting;

use crate::model::Model;

/// The eBPF object built by `build.rs` from `ebpf/`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/strait-ebpf"));

const POD_INGRESS_PROGRAM: &str = "pod_ingress";
const UPLINK_INGRESS_PROGRAM: &str = "uplink_ingress";

#[derive(Debug, Error)]
pub enum CaptureError {
    #[error(
        "the kernel refused strait's eBPF programs ({0}); strait node needs Linux >= 6.6 with BPF and TCX, \
         and the bpf() system call allowed (run as root on the host, not in a user namespace or a seccomp sandbox)"
    )]
    Load(String),
    #[error("the eBPF object has no {0}; the binary was built from mismatched sources")]
    Missing(&'static str),
    #[error("cannot attach capture to interface {interface}: {reason}")]
    Attach { interface: String, reason: String },
    #[error("cannot update the eBPF map {map}: {reason}")]
    Map { map: &'static str, reason: String },
}

/// The loaded programs, their maps, and what is attached where.
pub struct Capture {
    ebpf: Ebpf,
    pod_state: BpfHashMap<MapData, u32, u8>,
    listeners: SockMap<MapData>,
    stats: PerCpuArray<MapData, u64>,
    /// Host-side interface → (ifindex it had when attached, link).
    attached: BTreeMap<String, (u32, SchedClassifierLinkId)>,
    /// The uplink the HBONE steering program is attached to.
    uplink: Option<(String, SchedClassifierLinkId)>,
    /// What `POD_STATE` holds, mirrored to avoid reading the map back.
    states: HashMap<Ipv4Addr, u8>,
    /// Pods whose route was missing at the last reconcile, to warn once per pod.
    missing_route: HashMap<Ipv4Addr, ()>,
}

/// Counters of the capture program, summed over CPUs.
pub type CaptureStats = Vec<(&'static str, u64)>;

impl Capture {
    /// Loads the eBPF object and the pod-ingress program into the kernel.
    pub fn load() -> Result<Self, CaptureError> {
        let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(|e| CaptureError::Load(e.to_string()))?;
        for name in [POD_INGRESS_PROGRAM, UPLINK_INGRESS_PROGRAM] {
            program(&mut ebpf, name)?.load().map_err(|e| CaptureError::Load(format!("{name}: {e}")))?;
        }
        let pod_state = take_map(&mut ebpf, "POD_STATE")?;
        let listeners = take_map(&mut ebpf, "LISTENERS")?;
        let stats = take_map(&mut ebpf, "STATS")?;
        Ok(Self {
            ebpf,
            pod_state,
            listeners,
            stats,
            attached: BTreeMap::new(),
            uplink: None,
            states: HashMap::new(),
            missing_route: HashMap::new(),
        })
    }

    /// Registers one of the proxy's listeners (`LISTENER_*` slot) with the programs.
    pub fn set_listener(&mut self, slot: u32, listener: &impl AsRawFd) -> Result<(), CaptureError> {
        self.listeners.set(slot, listener, 0).map_err(|e| CaptureError::Map { map: "LISTENERS", reason: e.to_string() })
    }

    /// Attaches HBONE steering to the node's uplink (CAP-2).
    pub fn attach_uplink(&mut self, interface: &str) -> Result<(), CaptureError> {
        let link = program(&mut self.ebpf, UPLINK_INGRESS_PROGRAM)?
            .attach(interface, TcAttachType::Ingress)
            .map_err(|e| CaptureError::Attach { interface: interface.to_owned(), reason: e.to_string() })?;
        info!(interface, "HBONE steering attached to the uplink (TC ingress)");
        self.uplink = Some((interface.to_owned(), link));
        Ok(())
    }

    /// Brings maps and attachments in line with the model for the pods of `node`.
    /// `interfaces` maps pod IPs to their host-side interfaces (see `pod_interfaces`).
    pub fn reconcile(&mut self, model: &Model, node: &str, interfaces: &HashMap<Ipv4Addr, Interface>) {
        let mut desired: HashMap<Ipv4Addr, u8> = HashMap::new();
        for workload in model.workloads_on(node) {
            let IpAddr::V4(ip) = workload.ip else {
                continue;
            };
            if workload.host_network {
                continue;
            }
            if workload.captured {
                desired.insert(ip, POD_CAPTURED);
            } else if self.states.contains_key(&ip) {
                // Was captured: keep steering the connections the proxy holds (CAP-5).
                desired.insert(ip, POD_DRAINING);
            }
        }

        for (&ip, &state) in &desired {
            if let Some(interface) = interfaces.get(&ip) {
                self.missing_route.remove(&ip);
                if let Err(e) = self.ensure_attached(interface) {
                    warn!(pod = %ip, "{e}");
                    continue;
                }
            } else if self.missing_route.insert(ip, ()).is_none() {
                warn!(pod = %ip, "no /32 route to this pod on the node; its traffic cannot be captured until one appears");
            }
            if self.states.get(&ip) != Some(&state) {
                let key = u32::from_ne_bytes(ip.octets());
                match self.pod_state.insert(key, state, 0) {
                    Ok(()) => {
                        info!(pod = %ip, state = state_name(state), "capture updated");
                        self.states.insert(ip, state);
                    }
                    Err(e) => warn!(pod = %ip, "cannot update POD_STATE: {e}"),
                }
            }
        }

        let gone: Vec<Ipv4Addr> = self.states.keys().filter(|ip| !desired.contains_key(ip)).copied().collect();
        for ip in gone {
            let key = u32::from_ne_bytes(ip.octets());
            if let Err(e) = self.pod_state.remove(&key) {
                debug!(pod = %ip, "removing from POD_STATE: {e}");
            }
            self.states.remove(&ip);
            info!(pod = %ip, "capture removed: pod deleted");
        }

        let wanted: HashMap<&str, ()> =
            desired.keys().filter_map(|ip| interfaces.get(ip)).map(|i| (i.name.as_str(), ())).collect();
        let stale: Vec<String> = self.attached.keys().filter(|n| !wanted.contains_key(n.as_str())).cloned().collect();
        for name in stale {
            self.detach(&name);
        }
    }

    fn ensure_attached(&mut self, interface: &Interface) -> Result<(), CaptureError> {
        if let Some((index, _)) = self.attached.get(&interface.name) {
            if *index == interface.index {
                return Ok(());
            }
            // Same name, new device: the old attachment went away with the old device.
            self.detach(&interface.name.clone());
        }
        let program = self.pod_program()?;
        let link = program
            .attach(&interface.name, TcAttachType::Ingress)
            .map_err(|e| CaptureError::Attach { interface: interface.name.clone(), reason: e.to_string() })?;
        info!(interface = %interface.name, "capture attached (TC ingress)");
        self.attached.insert(interface.name.clone(), (interface.index, link));
        Ok(())
    }

    fn detach(&mut self, name: &str) {
        let Some((_, link)) = self.attached.remove(name) else {
            return;
        };
        match self.pod_program() {
            // Fails harmlessly when the device is already gone.
            Ok(program) => {
                if let Err(e) = program.detach(link) {
                    debug!(interface = name, "detach: {e}");
                }
            }
            Err(e) => warn!("{e}"),
        }
        info!(interface = name, "capture detached");
    }

    fn pod_program(&mut self) -> Result<&mut SchedClassifier, CaptureError> {
        program(&mut self.ebpf, POD_INGRESS_PROGRAM)
    }

    /// The capture program's counters, summed over CPUs.
    pub fn stats(&self) -> CaptureStats {
        (0..stat::COUNT)
            .map(|i| {
                let total = self.stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
                (stat::NAMES[i as usize], total)
            })
            .collect()
    }

    /// Interfaces the pod-ingress program is attached to.
    pub fn attached_interfaces(&self) -> Vec<String> {
        self.attached.keys().cloned().collect()
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, CaptureError> {
    ebpf.program_mut(name)
        .ok_or(CaptureError::Missing(name))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| CaptureError::Load(e.to_string()))
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(CaptureError::Missing(name))?;
    T::try_from(map).map_err(|e| CaptureError::Map { map: name, reason: e.to_string() })
}

fn state_name(state: u8) -> &'static str {
    match state {
        POD_CAPTURED => "captured",
        POD_DRAINING => "draining",
        _ => "unknown",
    }
}

/// A network interface by name and index (the index tells a re-created device apart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
}
