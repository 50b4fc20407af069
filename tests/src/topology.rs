//! A Kubernetes-like node/pod topology built from network namespaces, and its teardown.
//!
//! The wiring copies a routed CNI (Calico): nodes share an underlay bridge; each pod has a /32
//! address, a default route to the link-local gateway 169.254.1.1 that its node's veth answers by
//! proxy ARP, and its node holds a `<pod IP>/32 dev <host veth>` route. The strait node proxy
//! relies on that last route to find a pod's interface, as it would on a real Calico node.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::cleanup::{self, create_netns, delete_netns, keep_requested};
use crate::command::{self, context};
use crate::names::{self, netns_name, topology_prefix};
use crate::netns::{Netns, Shared};
use crate::process::{Process, tail};

/// The fabric bridge's own address. Nodes use it as their default gateway: without a default
/// route a node will not proxy-ARP for 169.254.1.1, and pods could not reach their gateway.
pub const FABRIC_GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 254);
/// Node indexes run from 1 to this, since node i is 10.255.0.i and 254 is the gateway.
const MAX_NODES: u32 = 253;
/// Host part of a node's first pod address; lower ones stay free for tests that need them.
const FIRST_POD_HOST: u8 = 10;
/// Lines of each log printed when a test panics with the topology alive.
const PANIC_LOG_LINES: usize = 15;

/// Topologies created by this process, so that prefixes are unique within it.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A set of namespaces forming nodes and pods; dropping it kills their processes and deletes
/// them (also while a test panics).
#[derive(Debug)]
pub struct Topology {
    prefix: String,
    shared: Arc<Shared>,
    fabric: Netns,
    /// Behind a lock so that tests may add pods from several threads through `&Topology`.
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    /// Next pod host part per node index.
    next_pod_host: HashMap<u32, u8>,
    /// Namespace names in use, for duplicate detection (cutting long names may merge them).
    used: HashSet<String>,
    /// Namespaces that exist, per kind, deleted pods first, then nodes, then the fabric.
    pod_netns: Vec<String>,
    node_netns: Vec<String>,
    fabric_created: bool,
}

/// A node: a namespace attached to the underlay, routing for its pods.
#[derive(Clone, Debug)]
pub struct Node {
    name: String,
    index: u32,
    netns: Netns,
    /// Pods hang off a bridge `cni0` holding 10.<i>.0.1/24, as bridge CNIs (flannel, the
    /// reference `bridge` plugin) connect them, instead of Calico-like /32 routes.
    bridge: bool,
}

/// A pod: its own namespace behind a veth to its node, or the node's namespace (hostNetwork).
#[derive(Clone, Debug)]
pub struct Pod {
    name: String,
    ip: Ipv4Addr,
    node_name: String,
    node_ip: Ipv4Addr,
    host_veth: Option<String>,
    netns: Netns,
}

impl Topology {
    /// Creates the fabric (underlay bridge) and temp dir of a new topology, after sweeping up
    /// what crashed runs left behind. Needs root.
    pub fn new(test_name: &str) -> io::Result<Topology> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "strait-testbed needs root to create network namespaces",
            ));
        }
        if let Err(err) = cleanup::cleanup_stale() {
            eprintln!("strait-testbed: sweeping stale namespaces failed: {err}");
        }
        cleanup::register_owner()?;

        let counter = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = topology_prefix(std::process::id(), counter, test_name);
        let dir = std::env::temp_dir().join(format!("strait-{prefix}"));
        // Only a dead run that had our pid can have left this dir: start from a clean one.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(context(format!("creating {}", dir.display())))?;

        let shared = Arc::new(Shared { dir, spawned: Mutex::default() });
        let fabric = Netns::new(netns_name(&prefix, "fab"), Arc::clone(&shared));
        let topology = Topology { prefix, shared, fabric, state: Mutex::default() };
        // From here on an error drops `topology`, whose Drop removes whatever was created.
        topology.create_fabric().map_err(context(format!("creating fabric {}", topology.fabric)))?;
        Ok(topology)
    }

    fn create_fabric(&self) -> io::Result<()> {
        let ns = self.fabric.name();
        let mut state = self.lock();
        state.used.insert(ns.to_string());
        create_netns(ns)?;
        state.fabric_created = true;
        let gateway = format!("{FABRIC_GATEWAY}/24");
        command::ip(&["-n", ns, "link", "set", "lo", "up"])?;
        command::ip(&["-n", ns, "link", "add", "br0", "type", "bridge"])?;
        command::ip(&["-n", ns, "addr", "add", &gateway, "dev", "br0"])?;
        command::ip(&["-n", ns, "link", "set", "br0", "up"])?;
        Ok(())
    }

    /// Adds node `name` (index 1, 2, ...): underlay address 10.255.0.<i>/24 on `eth0`, pod CIDR
    /// 10.<i>.0.0/24, and routes between its pod CIDR and every other node's.
    pub fn add_node(&self, name: &str) -> io::Result<Node> {
        self.add_node_wired(name, false)
    }

    /// Like `add_node`, but the node connects its pods the way bridge CNIs do: every pod's veth
    /// is a port of the bridge `cni0`, which holds the gateway 10.<i>.0.1/24 of the pod subnet,
    /// and the node has no route per pod.
    pub fn add_bridge_node(&self, name: &str) -> io::Result<Node> {
        self.add_node_wired(name, true)
    }

    fn add_node_wired(&self, name: &str, bridge: bool) -> io::Result<Node> {
        let mut state = self.lock();
        // Counting created namespaces, not working nodes: a node that failed half-way still
        // holds its underlay address until the topology is dropped.
        let index = u32::try_from(state.node_netns.len() + 1).unwrap_or(u32::MAX);
        if index > MAX_NODES {
            return Err(io::Error::other(format!("cannot add node {name}: at most {MAX_NODES} nodes")));
        }
        let ns = self.claim_netns_name(&mut state, name)?;
        let node = Node { name: name.to_string(), index, netns: Netns::new(ns, Arc::clone(&self.shared)), bridge };
        let others = state.nodes.clone();
        create_netns(node.netns.name()).map_err(context(format!("adding node {name}")))?;
        state.node_netns.push(node.netns.name().to_string());
        self.wire_node(&node, &others).map_err(context(format!("adding node {name}")))?;
        state.nodes.push(node.clone());
        Ok(node)
    }

    fn wire_node(&self, node: &Node, others: &[Node]) -> io::Result<()> {
        let ns = node.netns.name();
        let fab = self.fabric.name();
        let fabric_port = format!("n{}", node.index);
        let underlay = format!("{}/24", node.ip());
        let gateway = FABRIC_GATEWAY.to_string();
        // Before any interface exists, so that new interfaces inherit rp_filter=0 too.
        node.run_ok(
            "sysctl",
            &["-qw", "net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"],
        )?;
        command::ip(&["-n", ns, "link", "set", "lo", "up"])?;
        // Both ends are created inside their namespaces: names never meet in the root namespace.
        command::ip(&["link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &fabric_port, "netns", fab])?;
        command::ip(&["-n", fab, "link", "set", &fabric_port, "master", "br0", "up"])?;
        command::ip(&["-n", ns, "addr", "add", &underlay, "dev", "eth0"])?;
        command::ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        command::ip(&["-n", ns, "route", "add", "default", "via", &gateway, "dev", "eth0"])?;
        if node.bridge {
            command::ip(&["-n", ns, "link", "add", "cni0", "type", "bridge"])?;
            command::ip(&["-n", ns, "addr", "add", &format!("{}/24", node.bridge_gateway()), "dev", "cni0"])?;
            command::ip(&["-n", ns, "link", "set", "cni0", "up"])?;
        }
        for other in others {
            let (their_cidr, their_ip) = (other.pod_cidr(), other.ip().to_string());
            let (our_cidr, our_ip) = (node.pod_cidr(), node.ip().to_string());
            command::ip(&["-n", ns, "route", "add", &their_cidr, "via", &their_ip, "dev", "eth0"])?;
            command::ip(&["-n", other.netns.name(), "route", "add", &our_cidr, "via", &our_ip, "dev", "eth0"])?;
        }
        Ok(())
    }

    /// Adds pod `name` on `node` with the node's next pod address (10.<i>.0.10, .11, ...).
    pub fn add_pod(&self, node: &Node, name: &str) -> io::Result<Pod> {
        let mut state = self.lock();
        Self::check_node(&state, node)?;
        let host = *state.next_pod_host.get(&node.index).unwrap_or(&FIRST_POD_HOST);
        if host == u8::MAX {
            return Err(io::Error::other(format!("cannot add pod {name}: node {} is full", node.name)));
        }
        let ns = self.claim_netns_name(&mut state, name)?;
        let pod = Pod {
            name: name.to_string(),
            ip: Ipv4Addr::new(10, node_octet(node.index), 0, host),
            node_name: node.name.clone(),
            node_ip: node.ip(),
            host_veth: Some(format!("vp{host}")),
            netns: Netns::new(ns, Arc::clone(&self.shared)),
        };
        state.next_pod_host.insert(node.index, host + 1);
        create_netns(pod.netns.name()).map_err(context(format!("adding pod {name}")))?;
        state.pod_netns.push(pod.netns.name().to_string());
        wire_pod(node, &pod).map_err(context(format!("adding pod {name} on node {}", node.name)))?;
        state.pods.push(pod.clone());
        Ok(pod)
    }

    /// A hostNetwork pod on `node`: it shares the node's namespace and underlay address.
    pub fn add_host_network_pod(&self, node: &Node, name: &str) -> io::Result<Pod> {
        let mut state = self.lock();
        Self::check_node(&state, node)?;
        let pod = Pod {
            name: name.to_string(),
            ip: node.ip(),
            node_name: node.name.clone(),
            node_ip: node.ip(),
            host_veth: None,
            netns: node.netns.clone(),
        };
        state.pods.push(pod.clone());
        Ok(pod)
    }

    fn check_node(state: &State, node: &Node) -> io::Result<()> {
        if state.nodes.iter().any(|n| n.netns.name() == node.netns.name()) {
            Ok(())
        } else {
            Err(io::Error::other(format!("node {} is not part of this topology", node.name)))
        }
    }

    fn claim_netns_name(&self, state: &mut State, name: &str) -> io::Result<String> {
        let ns = netns_name(&self.prefix, name);
        if !state.used.insert(ns.clone()) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("name {name:?} maps to namespace {ns}, which this topology already uses"),
            ));
        }
        Ok(ns)
    }

    /// The prefix of all of this topology's namespace names.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The temp dir for logs and config: `/tmp/strait-<prefix>/`.
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Where [`Topology::write_config`] puts files; give it to `strait --config-dir`.
    pub fn config_dir(&self) -> PathBuf {
        self.dir().join("config")
    }

    /// The underlay namespace holding bridge `br0`.
    pub fn fabric(&self) -> &Netns {
        &self.fabric
    }

    pub fn nodes(&self) -> Vec<Node> {
        self.lock().nodes.clone()
    }

    pub fn pods(&self) -> Vec<Pod> {
        self.lock().pods.clone()
    }

    /// Names of all namespaces this topology created and has not deleted.
    pub fn namespaces(&self) -> Vec<String> {
        let state = self.lock();
        let fabric = state.fabric_created.then(|| self.fabric.name().to_string());
        state.pod_netns.iter().chain(&state.node_netns).cloned().chain(fabric).collect()
    }

    /// Writes `<config dir>/<file_name>` atomically: a watcher never sees a half-written file.
    /// The temp file lives outside the config dir, so a watcher does not see it at all.
    pub fn write_config(&self, file_name: &str, yaml: &str) -> io::Result<PathBuf> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let config_dir = self.config_dir();
        fs::create_dir_all(&config_dir).map_err(context(format!("creating {}", config_dir.display())))?;
        let target = config_dir.join(file_name);
        let temp = self.dir().join(format!(".config-{}.tmp", SEQ.fetch_add(1, Ordering::Relaxed)));
        fs::write(&temp, yaml).map_err(context(format!("writing {}", temp.display())))?;
        fs::rename(&temp, &target).map_err(context(format!("renaming into {}", target.display())))?;
        Ok(target)
    }

    /// Removes `<config dir>/<file_name>`, as deleting resources from a cluster would.
    /// Writes a configuration file like `write_config`, then waits until every proxy in
    /// `proxies` logged that it applied a new configuration (strait node logs "configuration
    /// applied" on each reload).
    pub fn apply_config(&self, file_name: &str, yaml: &str, proxies: &[&Process]) -> io::Result<()> {
        const APPLIED: &str = "configuration applied";
        let before: Vec<usize> = proxies.iter().map(|p| p.count_log_lines(APPLIED)).collect();
        self.write_config(file_name, yaml)?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        for (proxy, before) in proxies.iter().zip(before) {
            while proxy.count_log_lines(APPLIED) <= before {
                if std::time::Instant::now() > deadline {
                    return Err(io::Error::other(format!("{file_name} was not applied:\n{}", proxy.log_tail())));
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
        Ok(())
    }

    pub fn remove_config(&self, file_name: &str) -> io::Result<()> {
        let path = self.config_dir().join(file_name);
        fs::remove_file(&path).map_err(context(format!("removing {}", path.display())))
    }

    /// Deletes leftovers of crashed runs (see the `cleanup` module); returns how many namespaces
    /// it deleted. [`Topology::new`] does this first anyway.
    pub fn cleanup_stale() -> io::Result<usize> {
        cleanup::cleanup_stale()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Prints the tail of every log, so a failing test's output shows what its processes said.
    fn print_logs(&self) {
        for name in cleanup::list_dir(self.dir()).iter().filter(|n| n.ends_with(".log")) {
            let text = fs::read(self.dir().join(name)).unwrap_or_default();
            let text = String::from_utf8_lossy(&text);
            eprintln!("--- {name} (last {PANIC_LOG_LINES} lines) ---\n{}", tail(&text, PANIC_LOG_LINES));
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        for pid in self.shared.spawned_pids() {
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                cleanup::kill(pid, libc::SIGKILL);
            }
        }
        for ns in self.namespaces() {
            if let Err(err) = delete_netns(&ns) {
                eprintln!("strait-testbed: cannot delete namespace {ns}: {err}");
            }
            cleanup::remove_bpf_pins(&ns);
        }
        if keep_requested() {
            eprintln!("strait-testbed: STRAIT_KEEP=1, keeping {}", self.dir().display());
        } else {
            let _ = fs::remove_dir_all(self.dir());
        }
    }
}

/// Connects a pod to its node the way Calico does, or as bridge CNIs do on a bridge node.
fn wire_pod(node: &Node, pod: &Pod) -> io::Result<()> {
    if node.bridge {
        return wire_bridged_pod(node, pod);
    }
    let (node_ns, pod_ns) = (node.netns.name(), pod.netns.name());
    let veth = pod.host_veth.as_deref().unwrap_or_default();
    let pod_addr = format!("{}/32", pod.ip);
    command::ip(&["link", "add", veth, "netns", node_ns, "type", "veth", "peer", "name", "eth0", "netns", pod_ns])?;
    // proxy_delay=0: proxy ARP otherwise waits up to 0.8 s at random before answering.
    node.run_ok(
        "sysctl",
        &["-qw", &format!("net.ipv4.conf.{veth}.proxy_arp=1"), &format!("net.ipv4.neigh.{veth}.proxy_delay=0")],
    )?;
    command::ip(&["-n", node_ns, "link", "set", veth, "up"])?;
    command::ip(&["-n", pod_ns, "link", "set", "lo", "up"])?;
    command::ip(&["-n", pod_ns, "addr", "add", &pod_addr, "dev", "eth0"])?;
    command::ip(&["-n", pod_ns, "link", "set", "eth0", "up"])?;
    command::ip(&["-n", pod_ns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"])?;
    command::ip(&["-n", pod_ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"])?;
    command::ip(&["-n", node_ns, "route", "add", &pod_addr, "dev", veth])?;
    Ok(())
}

/// Connects a pod to its node's bridge `cni0`: a /24 address and a default route through the
/// bridge's address, nothing on the node but the port.
fn wire_bridged_pod(node: &Node, pod: &Pod) -> io::Result<()> {
    let (node_ns, pod_ns) = (node.netns.name(), pod.netns.name());
    let veth = pod.host_veth.as_deref().unwrap_or_default();
    command::ip(&["link", "add", veth, "netns", node_ns, "type", "veth", "peer", "name", "eth0", "netns", pod_ns])?;
    command::ip(&["-n", node_ns, "link", "set", veth, "master", "cni0", "up"])?;
    command::ip(&["-n", pod_ns, "link", "set", "lo", "up"])?;
    command::ip(&["-n", pod_ns, "addr", "add", &format!("{}/24", pod.ip), "dev", "eth0"])?;
    command::ip(&["-n", pod_ns, "link", "set", "eth0", "up"])?;
    command::ip(&["-n", pod_ns, "route", "add", "default", "via", &node.bridge_gateway().to_string(), "dev", "eth0"])?;
    Ok(())
}

/// The second octet of node `index`'s pod CIDR; indexes are capped at [`MAX_NODES`].
fn node_octet(index: u32) -> u8 {
    u8::try_from(index).unwrap_or(u8::MAX)
}

impl Node {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    /// The underlay address, 10.255.0.<index>.
    pub fn ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 255, 0, node_octet(self.index))
    }

    /// The pod CIDR, `10.<index>.0.0/24`.
    /// Where a node proxy on this node should pin its eBPF objects (`strait node --bpf-pin-dir`);
    /// removed with the topology.
    pub fn bpf_pin_dir(&self) -> std::path::PathBuf {
        Path::new(cleanup::BPF_PIN_ROOT).join(self.netns.name())
    }

    /// The bridge's address on a bridge node: 10.<i>.0.1.
    pub fn bridge_gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, node_octet(self.index), 0, 1)
    }

    pub fn pod_cidr(&self) -> String {
        format!("10.{}.0.0/24", self.index)
    }

    /// 1 for the first node added, 2 for the next, ...
    pub fn index(&self) -> u32 {
        self.index
    }

    /// See [`Netns::run`].
    pub fn run(&self, program: impl AsRef<OsStr>, args: &[&str]) -> io::Result<Output> {
        self.netns.run(program, args)
    }

    /// See [`Netns::run_ok`].
    pub fn run_ok(&self, program: impl AsRef<OsStr>, args: &[&str]) -> io::Result<String> {
        self.netns.run_ok(program, args)
    }

    /// See [`Netns::spawn`].
    pub fn spawn(
        &self,
        name_for_logs: &str,
        program: impl AsRef<OsStr>,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> io::Result<Process> {
        self.netns.spawn(name_for_logs, program, args, envs)
    }
}

impl Pod {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The pod's namespace; its node's namespace for a hostNetwork pod.
    pub fn netns(&self) -> &Netns {
        &self.netns
    }

    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The underlay address of the pod's node.
    pub fn node_ip(&self) -> Ipv4Addr {
        self.node_ip
    }

    /// The node-side veth (`vp<k>`), `None` for a hostNetwork pod.
    pub fn host_veth(&self) -> Option<&str> {
        self.host_veth.as_deref()
    }

    pub fn host_network(&self) -> bool {
        self.host_veth.is_none()
    }

    /// See [`Netns::run`].
    pub fn run(&self, program: impl AsRef<OsStr>, args: &[&str]) -> io::Result<Output> {
        self.netns.run(program, args)
    }

    /// See [`Netns::run_ok`].
    pub fn run_ok(&self, program: impl AsRef<OsStr>, args: &[&str]) -> io::Result<String> {
        self.netns.run_ok(program, args)
    }

    /// See [`Netns::spawn`].
    pub fn spawn(
        &self,
        name_for_logs: &str,
        program: impl AsRef<OsStr>,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> io::Result<Process> {
        self.netns.spawn(name_for_logs, program, args, envs)
    }
}

/// A log-file-friendly form of a pod or node name.
pub(crate) fn log_name(parts: &[&str]) -> String {
    names::sanitize(&parts.join("-"))
}

#[cfg(test)]
impl Pod {
    /// A pod handle without namespaces, for testing pure code that only reads its fields.
    pub(crate) fn detached(name: &str, ip: Ipv4Addr, node_name: &str, host_network: bool) -> Pod {
        let shared = Arc::new(Shared { dir: PathBuf::from("/nonexistent"), spawned: Mutex::default() });
        Pod {
            name: name.to_string(),
            ip,
            node_name: node_name.to_string(),
            node_ip: Ipv4Addr::new(10, 255, 0, 1),
            host_veth: (!host_network).then(|| "vp10".to_string()),
            netns: Netns::new(format!("test-{name}"), shared),
        }
    }
}
