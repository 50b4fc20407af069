//! Finds each pod's host-side interface. Routed CNIs (Calico, Cilium in routing mode, kindnet,
//! the AWS VPC CNI...) install a `/32` route to every pod through its veth, so that route names
//! the interface to attach to; bridge CNIs put the veths in a bridge instead (see `bridge`).

use std::{
    collections::{BTreeSet, HashMap},
    fs, io,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use super::{Interface, bridge};

/// A pod not found yet is probed at most this often (one datagram, see `bridge::probe`).
const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Pods' host-side interfaces, with what bridges taught about them kept while their ports
/// exist.
#[derive(Debug, Default)]
pub struct PodInterfaces {
    bridged: HashMap<Ipv4Addr, Interface>,
    probed: HashMap<Ipv4Addr, Instant>,
}

impl PodInterfaces {
    /// The host-side interface of each of `pods` that has one now: its `/32` route's, else its
    /// bridge port. The netlink dumps are made only when some pod has no route, so routed CNIs
    /// pay nothing for bridge support.
    pub fn find(&mut self, pods: &BTreeSet<Ipv4Addr>) -> io::Result<HashMap<Ipv4Addr, Interface>> {
        let mut out = pod_interfaces()?;
        let missing: Vec<Ipv4Addr> = pods.iter().filter(|ip| !out.contains_key(ip)).copied().collect();
        self.bridged.retain(|ip, _| missing.contains(ip));
        self.probed.retain(|ip, _| missing.contains(ip));
        if missing.is_empty() {
            return Ok(out);
        }
        let links = bridge::links()?;
        if !links.values().any(|l| l.is_bridge) {
            return Ok(out);
        }
        let fresh = bridge::bridged_pods(&links)?;
        let now = Instant::now();
        for ip in missing {
            if let Some(interface) = fresh.get(&ip) {
                self.bridged.insert(ip, interface.clone());
            } else {
                // Forgotten by the tables (a quiet pod) but the same port still there: keep it.
                let port_remains = self.bridged.get(&ip).is_some_and(|known| {
                    links.get(&known.index).is_some_and(|l| l.name == known.name && l.master.is_some())
                });
                if !port_remains {
                    self.bridged.remove(&ip);
                    if self.probed.get(&ip).is_none_or(|at| now.duration_since(*at) >= PROBE_EVERY) {
                        self.probed.insert(ip, now);
                        bridge::probe(ip);
                    }
                }
            }
            if let Some(interface) = self.bridged.get(&ip) {
                out.insert(ip, interface.clone());
            }
        }
        Ok(out)
    }
}

/// Pod IP → host-side interface, from `/proc/net/route` of the current network namespace.
fn pod_interfaces() -> io::Result<HashMap<Ipv4Addr, Interface>> {
    let table = fs::read_to_string("/proc/net/route")?;
    let mut out = HashMap::new();
    for (ip, name) in parse_host_routes(&table) {
        if let Some(index) = interface_index(&name) {
            out.insert(ip, Interface { name, index, bridge_mac: None });
        }
    }
    Ok(out)
}

/// The interface's index in the current network namespace. (Not from /sys: sysfs shows the
/// namespace it was mounted in, which need not be ours.)
pub(crate) fn interface_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated name; the call only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The node's uplink: the interface of its default route, or else of the first route through a
/// gateway (the underlay towards other nodes).
pub fn uplink_interface() -> io::Result<Option<String>> {
    let table = fs::read_to_string("/proc/net/route")?;
    let routes: Vec<Vec<&str>> = table.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    let default = routes.iter().find(|f| f.get(1) == Some(&"00000000") && f.get(7) == Some(&"00000000"));
    let gatewayed = routes.iter().find(|f| f.get(2).is_some_and(|g| *g != "00000000"));
    Ok(default.or(gatewayed).and_then(|f| f.first()).map(|s| (*s).to_owned()))
}

/// `/32` routes of the main table that go straight out of an interface (no gateway).
/// The file has hex fields in host byte order: Iface Destination Gateway Flags ... Mask ...
fn parse_host_routes(table: &str) -> Vec<(Ipv4Addr, String)> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (iface, dest, gateway, mask) = (f.first()?, f.get(1)?, f.get(2)?, f.get(7)?);
            let dest = u32::from_str_radix(dest, 16).ok()?;
            let gateway = u32::from_str_radix(gateway, 16).ok()?;
            let mask = u32::from_str_radix(mask, 16).ok()?;
            (mask == u32::MAX && gateway == 0 && *iface != "lo")
                .then(|| (Ipv4Addr::from(dest.to_ne_bytes()), (*iface).to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_direct_host_routes_name_pod_interfaces() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
            eth0\t0000FF0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            eth0\t0000020A\t0200FF0A\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
            vp10\t0A00010A\t00000000\t0005\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
            eth0\t0B00020A\t0200FF0A\t0007\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n";
        let routes = parse_host_routes(table);
        assert_eq!(routes, vec![(Ipv4Addr::new(10, 1, 0, 10), "vp10".to_owned())]);
    }
}
