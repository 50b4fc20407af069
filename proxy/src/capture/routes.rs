//! Finds each pod's host-side interface from the node's routing table: routed CNIs install a
//! `/32` route to every pod through its veth, so that route names the interface to attach to.

use std::{collections::HashMap, fs, io, net::Ipv4Addr};

use super::Interface;

/// Pod IP → host-side interface, from `/proc/net/route` of the current network namespace.
pub fn pod_interfaces() -> io::Result<HashMap<Ipv4Addr, Interface>> {
    let table = fs::read_to_string("/proc/net/route")?;
    let mut out = HashMap::new();
    for (ip, name) in parse_host_routes(&table) {
        if let Some(index) = interface_index(&name) {
            out.insert(ip, Interface { name, index });
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
