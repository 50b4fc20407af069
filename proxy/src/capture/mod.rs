//! Traffic capture: loads the eBPF programs into the kernel and keeps their maps in step with
//! the model (CAP-1 to CAP-6).
//!
//! Restarts (CAP-6): the maps are pinned in bpffs, and the classifiers are attached as netlink
//! `clsact` filters at a fixed priority and handle, which the kernel keeps after the process
//! exits. A new run swaps its programs into those filters in place (netlink replace), so capture
//! never has a gap; while no proxy listens, a STRICT pod's traffic is dropped, others pass.
//! (TCX links would be the modern hook, but pinning them is refused in this environment, and an
//! unpinned link dies with the process.) The XDP guard is a link and is re-created by each run;
//! STRICT pods stay protected meanwhile by the classifiers, which fail closed.
//!
//! The pod-ingress program is attached to the host-side veth of every pod of this node, found
//! from the node's `/32` pod routes as routed CNIs install them, or from the bridge port a
//! bridge CNI put the pod's veth in (see `routes` and `bridge`); the uplink gets the inbound
//! classifier and the XDP guard. Which pods are captured, which are STRICT and which sources are
//! denied is decided by maps alone, so enrolling, un-enrolling or a policy change is a map
//! write. A pod being un-enrolled keeps its open connections: it moves to "draining", where only
//! packets of connections the proxy already holds are steered.

mod bridge;
mod netlink;
mod pin;
mod routes;
mod routing;
mod timewait;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, SockMap, lpm_trie::Key, lpm_trie::LpmTrie},
    programs::{
        SchedClassifier, SkLookup, TcAttachType, Xdp, XdpMode,
        sk_lookup::SkLookupLink,
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
        xdp::XdpLink,
    },
};
use strait_ebpf_common::{
    DENY_KEY_FIXED_BITS, DenyKeyData, MTLS_DISABLE, MTLS_PERMISSIVE, MTLS_STRICT, POD_CAPTURED, POD_DRAINING,
    POD_STRICT, PortKey, stat,
};
use thiserror::Error;
use tracing::{debug, info, warn};

pub use routes::{PodInterfaces, uplink_interface};
pub use routing::SteerRouting;

use crate::model::Model;

/// The eBPF object built by `build.rs` from `ebpf/`.
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/strait-ebpf"));

const POD_INGRESS: &str = "pod_ingress";
const UPLINK_INGRESS: &str = "uplink_ingress";
const UPLINK_GUARD: &str = "uplink_guard";
const STEER_LOOKUP: &str = "steer_lookup";

#[derive(Debug, Error)]
pub enum CaptureError {
    #[error(
        "the kernel refused strait's eBPF programs ({0}); strait node needs Linux >= 6.6 with BPF and TCX, \
         and the bpf() system call allowed (run as root on the host, not in a user namespace or a seccomp sandbox)"
    )]
    Load(String),
    #[error("the eBPF object has no {0}; the binary was built from mismatched sources")]
    Missing(&'static str),
    #[error("cannot attach {program} to interface {interface}: {reason}")]
    Attach { program: &'static str, interface: String, reason: String },
    #[error("cannot update the eBPF map {map}: {reason}")]
    Map { map: &'static str, reason: String },
    #[error(
        "cannot pin eBPF objects under {dir}: {reason}; strait node needs the kernel's BPF file system (bpffs) and root on the host"
    )]
    Pin { dir: String, reason: String },
}

/// PeerAuthentication and DENY policy as the kernel applies them, per pod of this node.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KernelPolicy {
    /// Pods whose default mTLS mode is STRICT.
    pub strict: BTreeSet<Ipv4Addr>,
    /// Port-level modes overriding the pod's: (pod, target port) → mode.
    pub port_modes: BTreeMap<(Ipv4Addr, u16), PortMode>,
    /// Sources denied by address: (pod, port or 0 for any, source network, prefix length).
    pub deny_sources: BTreeSet<(Ipv4Addr, u16, Ipv4Addr, u8)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortMode {
    Strict,
    Permissive,
    Disable,
}

impl PortMode {
    fn value(self) -> u8 {
        match self {
            PortMode::Strict => MTLS_STRICT,
            PortMode::Permissive => MTLS_PERMISSIVE,
            PortMode::Disable => MTLS_DISABLE,
        }
    }
}

/// Priority and handle of strait's `clsact` ingress filters: fixed, so that a new run finds and
/// replaces the filter an earlier run left.
const FILTER_PRIORITY: u16 = 0x5e;
const FILTER_HANDLE: TcHandle = TcHandle::new(0, 0x5e);

enum Link {
    Tc(SchedClassifierLink),
    Xdp(XdpLink),
}

struct AttachedLink {
    /// Interface index when attached: a re-created device with the same name needs a new link.
    index: u32,
    link: Link,
}

/// The loaded programs, their maps, and what is attached where.
pub struct Capture {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    pod_state: BpfHashMap<MapData, u32, u8>,
    port_mtls: BpfHashMap<MapData, PortKey, u8>,
    deny_sources: LpmTrie<MapData, DenyKeyData, u8>,
    listeners: SockMap<MapData>,
    bridge_ports: BpfHashMap<MapData, u32, [u8; 6]>,
    stats: PerCpuArray<MapData, u64>,
    /// Finds pods' host-side interfaces.
    finder: PodInterfaces,
    /// Pod interfaces with the pod-ingress program, by name.
    pod_links: BTreeMap<String, AttachedLink>,
    uplink_links: Vec<AttachedLink>,
    /// The uplink's name and index, once attached.
    uplink: Option<(String, u32)>,
    /// The XDP guard, while attached.
    guard: Option<AttachedLink>,
    /// The listener lookup program, attached to the node's network namespace for this run's
    /// life (a restart's successor attaches its own first; several may be attached at once).
    _lookup: SkLookupLink,
    /// Attaching the guard failed and was reported.
    guard_refused: bool,
    /// Mirrors of the policy maps, to write only differences.
    states: HashMap<Ipv4Addr, u8>,
    policy: KernelPolicy,
    /// Pods whose route was missing at the last reconcile, to warn once per pod.
    missing_route: BTreeSet<Ipv4Addr>,
    /// Pods that stopped being captured since TIME_WAIT sockets were last reaped.
    left_capture: HashSet<Ipv4Addr>,
    /// When TIME_WAIT sockets of draining pods were last reaped.
    last_reap: Instant,
    /// `release` ended this run: a reconcile still under way must not attach anything again.
    released: bool,
}

/// How often the TIME_WAIT sockets of draining pods are reaped: their proxied connections keep
/// closing (and leaving TIME_WAITs) after the pod left the mesh. One netlink dump each time.
const REAP_DRAINING_EVERY: Duration = Duration::from_secs(5);

/// Counters of the capture programs, summed over CPUs.
pub type CaptureStats = Vec<(&'static str, u64)>;

impl Capture {
    /// Loads the programs, reusing the maps (and later the links) pinned under `pin_dir`.
    pub fn load(pin_dir: &Path) -> Result<Self, CaptureError> {
        let pin_err =
            |e: std::io::Error| CaptureError::Pin { dir: pin_dir.display().to_string(), reason: e.to_string() };
        pin::prepare(pin_dir).map_err(pin_err)?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(EBPF_OBJECT)
            .map_err(|e| CaptureError::Load(e.to_string()))?;
        for name in [POD_INGRESS, UPLINK_INGRESS] {
            classifier(&mut ebpf, name)?.load().map_err(|e| CaptureError::Load(format!("{name}: {e}")))?;
        }
        xdp(&mut ebpf)?.load().map_err(|e| CaptureError::Load(format!("{UPLINK_GUARD}: {e}")))?;
        let lookup = attach_lookup(&mut ebpf)?;
        let pod_state: BpfHashMap<MapData, u32, u8> = take_map(&mut ebpf, "POD_STATE")?;
        // What an earlier run left is the starting point: only differences are written.
        let states =
            pod_state.iter().filter_map(Result::ok).map(|(k, v)| (Ipv4Addr::from(k.to_ne_bytes()), v)).collect();
        Ok(Self {
            pod_state,
            port_mtls: take_map(&mut ebpf, "PORT_MTLS")?,
            deny_sources: take_map(&mut ebpf, "DENY_SOURCES")?,
            listeners: take_map(&mut ebpf, "LISTENERS")?,
            bridge_ports: take_map(&mut ebpf, "BRIDGE_PORTS")?,
            stats: take_map(&mut ebpf, "STATS")?,
            finder: PodInterfaces::default(),
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            pod_links: BTreeMap::new(),
            uplink_links: Vec::new(),
            uplink: None,
            guard: None,
            _lookup: lookup,
            guard_refused: false,
            states,
            policy: KernelPolicy::default(),
            missing_route: BTreeSet::new(),
            left_capture: HashSet::new(),
            last_reap: Instant::now(),
            released: false,
        })
    }

    /// Registers one of the proxy's listeners (`LISTENER_*` slot) with the programs.
    pub fn set_listener(&mut self, slot: u32, listener: &impl AsRawFd) -> Result<(), CaptureError> {
        self.listeners.set(slot, listener, 0).map_err(|e| CaptureError::Map { map: "LISTENERS", reason: e.to_string() })
    }

    /// Attaches the inbound classifier (CAP-2) to the node's uplink; the XDP guard (CAP-4)
    /// follows when policy gives it something to drop (see `write_policy`).
    pub fn attach_uplink(&mut self, interface: &str) -> Result<(), CaptureError> {
        let index = routes::interface_index(interface).ok_or_else(|| CaptureError::Attach {
            program: UPLINK_INGRESS,
            interface: interface.to_owned(),
            reason: "no such interface".into(),
        })?;
        let tc = self.attach_classifier(UPLINK_INGRESS, interface, index)?;
        info!(interface, "inbound capture attached to the uplink");
        self.uplink_links.push(tc);
        self.uplink = Some((interface.to_owned(), index));
        Ok(())
    }

    /// Attaches or removes the XDP guard. It is attached only while policy gives it work:
    /// measured here, an XDP program on a veth uplink takes the veth off its fast path (no GRO),
    /// and one TCP stream across it fell from 9.7 to 2.4 Gbit/s even for traffic the guard
    /// passes. On a physical NIC with native XDP the cost is negligible.
    fn guard_uplink(&mut self, needed: bool) {
        match (needed, self.guard.is_some(), self.uplink.clone()) {
            (true, false, Some((interface, index))) => match self.attach_xdp(&interface, index) {
                Ok(link) => {
                    info!(interface, "XDP guard attached to the uplink");
                    self.guard = Some(link);
                    self.guard_refused = false;
                }
                // Retried at every reconcile: a predecessor that handed its listeners over
                // (OPS-3) holds the uplink's XDP hook until it exits. Said once.
                Err(e) if !self.guard_refused => {
                    warn!("{e}; retrying (the classifiers apply the same DENY rules meanwhile)");
                    self.guard_refused = true;
                }
                Err(e) => debug!("{e}"),
            },
            (false, true, _) => {
                self.guard = None;
                info!("XDP guard detached: no policy left for it");
            }
            _ => {}
        }
    }

    /// Brings maps and attachments in line with the model for the pods of `node`.
    /// `interfaces` maps pod IPs to their host-side interfaces (see `pod_interfaces`).
    pub fn reconcile(
        &mut self,
        model: &Model,
        node: &str,
        interfaces: &HashMap<Ipv4Addr, Interface>,
        policy: &KernelPolicy,
    ) {
        if self.released {
            return;
        }
        let mut desired: HashMap<Ipv4Addr, u8> = HashMap::new();
        let mut local_pods = BTreeSet::new();
        for workload in model.workloads_on(node) {
            let IpAddr::V4(ip) = workload.ip else { continue };
            if workload.host_network {
                continue;
            }
            local_pods.insert(ip);
            let strict = if policy.strict.contains(&ip) { POD_STRICT } else { 0 };
            if workload.captured {
                desired.insert(ip, POD_CAPTURED | strict);
            } else if self.states.contains_key(&ip) {
                // Was captured: keep steering the connections the proxy holds (CAP-5).
                desired.insert(ip, POD_DRAINING);
            }
        }

        // Every pod's interface gets the program: a pod outside the mesh calling a captured pod
        // of this node is steered to the inbound listener from there.
        for ip in &local_pods {
            match interfaces.get(ip) {
                Some(interface) => {
                    self.missing_route.remove(ip);
                    if let Err(e) = self.ensure_pod_link(interface) {
                        warn!(pod = %ip, "{e}");
                    }
                }
                None => {
                    if self.missing_route.insert(*ip) {
                        warn!(pod = %ip, "neither a /32 route nor a bridge port leads to this pod on the node; its traffic cannot be captured until one appears");
                    }
                }
            }
        }
        self.write_states(&desired);
        self.write_policy(policy);

        self.reap_left_pods();

        let wanted: BTreeSet<&str> =
            local_pods.iter().filter_map(|ip| interfaces.get(ip)).map(|i| i.name.as_str()).collect();
        let stale: Vec<String> = self.pod_links.keys().filter(|n| !wanted.contains(n.as_str())).cloned().collect();
        for name in stale {
            if let Some(link) = self.pod_links.remove(&name) {
                self.forget_bridge_port(link.index);
                drop(link);
                info!(interface = name, "capture detached: pod gone");
            }
        }
    }

    fn write_states(&mut self, desired: &HashMap<Ipv4Addr, u8>) {
        for (&ip, &state) in desired {
            if self.states.get(&ip) != Some(&state) {
                if state & POD_CAPTURED == 0 {
                    self.left_capture.insert(ip);
                }
                match self.pod_state.insert(u32::from_ne_bytes(ip.octets()), state, 0) {
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
            if let Err(e) = self.pod_state.remove(&u32::from_ne_bytes(ip.octets())) {
                debug!(pod = %ip, "removing from POD_STATE: {e}");
            }
            self.states.remove(&ip);
            self.left_capture.insert(ip);
            info!(pod = %ip, "capture removed: pod deleted");
        }
    }

    /// Pods no longer proxied send their new connections straight through the node, where the
    /// TIME_WAIT sockets of their earlier proxied connections would swallow those reusing a
    /// 4-tuple (see `timewait`): reaped when a pod leaves capture, then every few seconds while
    /// it drains.
    fn reap_left_pods(&mut self) {
        let draining: HashSet<Ipv4Addr> =
            self.states.iter().filter(|(_, s)| **s & POD_DRAINING != 0).map(|(ip, _)| *ip).collect();
        let due =
            !self.left_capture.is_empty() || (!draining.is_empty() && self.last_reap.elapsed() >= REAP_DRAINING_EVERY);
        if !due {
            return;
        }
        let mut pods = std::mem::take(&mut self.left_capture);
        pods.extend(draining);
        self.last_reap = Instant::now();
        reap_time_waits(&pods, false);
    }

    fn write_policy(&mut self, policy: &KernelPolicy) {
        let guard_needed = !policy.strict.is_empty()
            || policy.port_modes.values().any(|m| *m == PortMode::Strict)
            || !policy.deny_sources.is_empty();
        self.guard_uplink(guard_needed);
        if &self.policy == policy {
            return;
        }
        let port_key =
            |(ip, port): (Ipv4Addr, u16)| PortKey { ip: u32::from_ne_bytes(ip.octets()), port: port.to_be(), _pad: 0 };
        for (key, mode) in &policy.port_modes {
            if self.policy.port_modes.get(key) != Some(mode)
                && let Err(e) = self.port_mtls.insert(port_key(*key), mode.value(), 0)
            {
                warn!("cannot update PORT_MTLS: {e}");
            }
        }
        for key in self.policy.port_modes.keys().filter(|k| !policy.port_modes.contains_key(k)) {
            let _ = self.port_mtls.remove(&port_key(*key));
        }
        for entry in policy.deny_sources.difference(&self.policy.deny_sources) {
            if let Err(e) = self.deny_sources.insert(&deny_key(entry), 1, 0) {
                warn!("cannot update DENY_SOURCES: {e}");
            }
        }
        for entry in self.policy.deny_sources.difference(&policy.deny_sources) {
            let _ = self.deny_sources.remove(&deny_key(entry));
        }
        info!(
            strict = policy.strict.len(),
            port_modes = policy.port_modes.len(),
            denied_sources = policy.deny_sources.len(),
            "kernel policy updated"
        );
        self.policy = policy.clone();
    }

    fn ensure_pod_link(&mut self, interface: &Interface) -> Result<(), CaptureError> {
        if self.pod_links.get(&interface.name).is_some_and(|link| link.index == interface.index) {
            return Ok(());
        }
        if let Some(old) = self.pod_links.remove(&interface.name) {
            // Same name, new device: the old filter went away with the old device.
            self.forget_bridge_port(old.index);
            drop(old);
        }
        // Before the program sees the port's first packet (CAP-1).
        if let Some(mac) = interface.bridge_mac {
            self.bridge_ports
                .insert(interface.index, mac, 0)
                .map_err(|e| CaptureError::Map { map: "BRIDGE_PORTS", reason: e.to_string() })?;
        }
        let link = self.attach_classifier(POD_INGRESS, &interface.name, interface.index)?;
        info!(interface = %interface.name, "capture attached (TC ingress)");
        self.pod_links.insert(interface.name.clone(), link);
        Ok(())
    }

    fn forget_bridge_port(&mut self, index: u32) {
        if let Err(e) = self.bridge_ports.remove(&index) {
            debug!(index, "removing from BRIDGE_PORTS: {e}");
        }
    }

    /// The host-side interfaces of this node's pods in `model` (see `PodInterfaces`).
    pub fn pod_interfaces(&mut self, model: &Model, node: &str) -> std::io::Result<HashMap<Ipv4Addr, Interface>> {
        let pods: BTreeSet<Ipv4Addr> = model
            .workloads_on(node)
            .filter(|w| !w.host_network)
            .filter_map(|w| match w.ip {
                IpAddr::V4(ip) => Some(ip),
                IpAddr::V6(_) => None,
            })
            .collect();
        self.finder.find(&pods)
    }

    /// Attaches a classifier as strait's `clsact` ingress filter on `interface`, replacing in
    /// place the program of the filter an earlier run left there, if any.
    fn attach_classifier(
        &mut self,
        name: &'static str,
        interface: &str,
        index: u32,
    ) -> Result<AttachedLink, CaptureError> {
        let err = |reason: String| CaptureError::Attach { program: name, interface: interface.to_owned(), reason };
        // Fails harmlessly when the qdisc is already there.
        let _ = tc::qdisc_add_clsact(interface);
        let program = classifier(&mut self.ebpf, name)?;
        let existing =
            SchedClassifierLink::attached(interface, TcAttachType::Ingress, FILTER_PRIORITY, FILTER_HANDLE, None)
                .map_err(|e| err(e.to_string()))?;
        let id = match program.attach_to_link(existing) {
            Ok(id) => {
                debug!(interface, program = name, "took over the filter of an earlier run");
                id
            }
            Err(_) => {
                let options = NlOptions { priority: FILTER_PRIORITY, handle: FILTER_HANDLE, ..Default::default() };
                program
                    .attach_with_options(interface, TcAttachType::Ingress, TcAttachOptions::Netlink(options))
                    .map_err(|e| err(e.to_string()))?
            }
        };
        let link = program.take_link(id).map_err(|e| err(e.to_string()))?;
        Ok(AttachedLink { index, link: Link::Tc(link) })
    }

    fn attach_xdp(&mut self, interface: &str, index: u32) -> Result<AttachedLink, CaptureError> {
        let err =
            |reason: String| CaptureError::Attach { program: UPLINK_GUARD, interface: interface.to_owned(), reason };
        let program = xdp(&mut self.ebpf)?;
        let id = match program.attach(interface, XdpMode::Default) {
            Ok(id) => id,
            Err(e) => {
                // Native XDP needs driver support; the generic hook works everywhere.
                debug!(interface, "native XDP refused ({e}); using generic XDP");
                program.attach(interface, XdpMode::Skb).map_err(|e| err(e.to_string()))?
            }
        };
        let link = program.take_link(id).map_err(|e| err(e.to_string()))?;
        Ok(AttachedLink { index, link: Link::Xdp(link) })
    }

    /// The capture programs' counters, summed over CPUs.
    pub fn stats(&self) -> CaptureStats {
        (0..stat::COUNT)
            .filter(|&i| !stat::NAMES[i as usize].starts_with("reserved"))
            .map(|i| {
                let total = self.stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0);
                (stat::NAMES[i as usize], total)
            })
            .collect()
    }

    /// Interfaces the pod-ingress program is attached to.
    pub fn attached_interfaces(&self) -> Vec<String> {
        self.pod_links.keys().cloned().collect()
    }

    /// Ends this run. By default the classifiers stay attached and the maps pinned, so traffic
    /// keeps its treatment until the next run takes over (CAP-6); with `detach`, all of it is
    /// removed and the node's traffic flows as without a mesh. With `reap`, the TIME_WAIT
    /// sockets of the pods' proxied connections go too, since no proxy holds the pods' flows
    /// any more (not after a handover: the successor does), and so do the proxy's sockets with
    /// pods' addresses still open (pooled HBONE connections from pods' addresses, whatever the
    /// drain left), which would otherwise linger closing after the exit.
    pub fn release(&mut self, detach: bool, reap: bool) {
        self.released = true;
        if reap {
            reap_time_waits(&self.states.keys().copied().collect(), true);
        }
        let links = std::mem::take(&mut self.pod_links)
            .into_values()
            .chain(std::mem::take(&mut self.uplink_links))
            .chain(self.guard.take());
        if detach {
            // Dropping a link detaches it.
            drop(links.collect::<Vec<_>>());
            pin::remove_all(&self.pin_dir);
            info!(dir = %self.pin_dir.display(), "capture removed: programs detached and pins deleted");
        } else {
            for link in links {
                match link.link {
                    // The filter stays; forgetting the handle keeps it from being detached.
                    Link::Tc(tc) => std::mem::forget(tc),
                    Link::Xdp(xdp) => drop(xdp),
                }
            }
            info!(dir = %self.pin_dir.display(), "capture stays in place for the next run (--detach-on-exit removes it)");
        }
    }
}

fn reap_time_waits(pods: &HashSet<Ipv4Addr>, stopping: bool) {
    match timewait::reap(pods, stopping) {
        Ok(0) => {}
        Ok(n) => info!(sockets = n, "reaped TIME_WAIT sockets of pods no longer proxied"),
        Err(e) => warn!("cannot reap TIME_WAIT sockets of pods no longer proxied: {e}"),
    }
}

fn deny_key(&(pod, port, source, prefix): &(Ipv4Addr, u16, Ipv4Addr, u8)) -> Key<DenyKeyData> {
    let mut data: DenyKeyData = [0; 10];
    data[..4].copy_from_slice(&pod.octets());
    data[4..6].copy_from_slice(&port.to_be_bytes());
    data[6..].copy_from_slice(&source.octets());
    Key::new(DENY_KEY_FIXED_BITS + u32::from(prefix.min(32)), data)
}

fn classifier<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, CaptureError> {
    ebpf.program_mut(name)
        .ok_or(CaptureError::Missing(name))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| CaptureError::Load(e.to_string()))
}

/// Loads the listener lookup program and attaches it to this process's network namespace.
fn attach_lookup(ebpf: &mut Ebpf) -> Result<SkLookupLink, CaptureError> {
    let program: &mut SkLookup = ebpf
        .program_mut(STEER_LOOKUP)
        .ok_or(CaptureError::Missing(STEER_LOOKUP))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| CaptureError::Load(e.to_string()))?;
    program.load().map_err(|e| CaptureError::Load(format!("{STEER_LOOKUP}: {e}")))?;
    let err = |reason: String| CaptureError::Attach {
        program: STEER_LOOKUP,
        interface: "the network namespace".into(),
        reason,
    };
    let netns = std::fs::File::open("/proc/self/ns/net").map_err(|e| err(e.to_string()))?;
    let id = program.attach(netns).map_err(|e| err(e.to_string()))?;
    program.take_link(id).map_err(|e| err(e.to_string()))
}

fn xdp(ebpf: &mut Ebpf) -> Result<&mut Xdp, CaptureError> {
    ebpf.program_mut(UPLINK_GUARD)
        .ok_or(CaptureError::Missing(UPLINK_GUARD))?
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
    match (state & POD_CAPTURED != 0, state & POD_STRICT != 0) {
        (true, true) => "captured (strict)",
        (true, false) => "captured",
        _ if state & POD_DRAINING != 0 => "draining",
        _ => "unknown",
    }
}

/// A network interface by name and index (the index tells a re-created device apart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interface {
    pub name: String,
    pub index: u32,
    /// The MAC of the bridge the interface is a port of (bridge CNIs).
    pub bridge_mac: Option<[u8; 6]>,
}
