//! What a proxy received → a `Model` giving the same decisions as the one it was served from.
//!
//! Workloads come from Address resources: captured when their protocol is HBONE and nobody but
//! the node proxy terminates it (not a waypoint, not `native_tunnel`); a waypoint's pods are the
//! endpoints of the service a `GatewayAddress` names (or carry its Gateway's label). Services get
//! their endpoints from the workloads' `services` maps. Authorizations are bound to workloads by
//! scope and by the workloads' `authorization_policies` lists; istiod's converted
//! PeerAuthentications become each workload's mTLS modes. A waypoint's L7 resources are parsed
//! and compiled with the same code as a directory's.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use strait_proto::{
    istio::{
        security::Authorization,
        workload::{self as api, Address, GatewayAddress, NetworkMode, TunnelProtocol, address, gateway_address},
    },
    prost::Message,
    prost_types::Any,
    strait::config::v1::{ServiceExtension, WorkloadExtension},
};

use super::{
    DEFAULT_TRUST_DOMAIN, SERVICE_EXTENSION, WORKLOAD_EXTENSION,
    address::service_key,
    authorization::{from_authorization, ip_of, peer_authn_of},
    is_peer_authn_policy, l7, xds_origin,
};
use crate::{
    authz::{Policy, Scope},
    config::{Cidr, Location, Resolution},
    model::{
        CompileOptions, DnsEndpoint, Endpoint, Model, Security, SecurityParts, Service, ServiceEntryInfo, ServicePort,
        WaypointName, Workload, WorkloadProtocol, compile_security, routes::compile_routing, waypoints,
    },
    xds::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, L7_TYPE_URL, Received},
};

/// A service as received, before its endpoints are known.
struct ServiceIn {
    /// Its xDS name, for messages.
    name: String,
    /// `namespace/hostname`, its key in the workloads' `services` maps.
    key: String,
    service: api::Service,
    vip: Option<IpAddr>,
}

/// A workload as received, before waypoints are resolved.
struct WorkloadIn {
    name: String,
    workload: api::Workload,
    ip: IpAddr,
}

pub(super) fn decode(received: &Received, trust_domain: &str, options: &CompileOptions) -> Result<Model, Vec<String>> {
    let root = options.root_namespace.as_str();
    let mut errors = Vec::new();
    let empty = BTreeMap::new();
    let (workloads_in, services_in) =
        addresses(received.get(ADDRESS_TYPE_URL).unwrap_or(&empty), trust_domain, &mut errors);
    let policies = authorizations(received.get(AUTHORIZATION_TYPE_URL).unwrap_or(&empty), root, &mut errors);

    // Waypoints are named by the services their GatewayAddresses point at.
    let by_host: HashMap<&str, &ServiceIn> = services_in.iter().map(|s| (s.service.hostname.as_str(), s)).collect();
    let by_vip: HashMap<IpAddr, &ServiceIn> = services_in.iter().filter_map(|s| Some((s.vip?, s))).collect();
    let waypoint_of =
        |address: &GatewayAddress| -> (WaypointName, Option<String>) { resolve_waypoint(address, &by_host, &by_vip) };
    let mut waypoint_services: HashMap<String, WaypointName> = HashMap::new();
    let gateway_addresses = workloads_in
        .iter()
        .filter_map(|w| w.workload.waypoint.as_ref())
        .chain(services_in.iter().filter_map(|s| s.service.waypoint.as_ref()));
    for address in gateway_addresses {
        if let (name, Some(key)) = waypoint_of(address) {
            waypoint_services.insert(key, name);
        }
    }

    let mut workloads = Vec::with_capacity(workloads_in.len());
    let mut received_as = Vec::with_capacity(workloads_in.len());
    let mut owners: HashMap<IpAddr, &str> = HashMap::new();
    for w in &workloads_in {
        let host_network = w.workload.network_mode == NetworkMode::HostNetwork as i32;
        let taken = if host_network { None } else { owners.insert(w.ip, &w.name) };
        if let Some(first) = taken {
            errors.push(format!(
                "Address {}: field `workload.addresses[0]`: {} is already the address of {first}",
                w.name, w.ip
            ));
            continue;
        }
        workloads.push(Arc::new(workload(w, host_network, &waypoint_services, &waypoint_of)));
        received_as.push(&w.workload);
    }

    let backing = backing(&workloads, &received_as);
    let mut services = Vec::with_capacity(services_in.len());
    let mut vips: HashMap<IpAddr, &str> = HashMap::new();
    for s in &services_in {
        if let Some((vip, first)) = s.vip.and_then(|vip| Some((vip, vips.insert(vip, &s.name)?))) {
            errors.push(format!(
                "Address {}: field `service.addresses[0]`: {vip} is already the address of {first}",
                s.name
            ));
            continue;
        }
        let fronts_waypoint = waypoint_services.contains_key(&s.key);
        let waypoint = s.service.waypoint.as_ref().filter(|_| !fronts_waypoint).map(|a| waypoint_of(a).0);
        services.push(Arc::new(service(s, &backing, waypoint)));
    }

    let security = security(&workloads, &received_as, policies, root);
    let l7_in = received.get(L7_TYPE_URL).unwrap_or(&empty);
    let (mut l7_resources, names) = l7::decode(l7_in, &mut errors);
    let outbound_mode = crate::model::mesh_outbound_mode(&l7_resources);
    let (routing, security) = if l7_resources.is_empty() {
        (Default::default(), Security::from_parts(security))
    } else {
        let known = workloads.iter().map(|w| w.namespace.clone()).chain(services.iter().map(|s| s.namespace.clone()));
        l7_resources.extend(l7::namespaces(known));
        let mut diagnostics = Vec::new();
        let routing = compile_routing(&l7_resources, &services, &mut diagnostics);
        let compiled = compile_security(&l7_resources, &workloads, root, &mut diagnostics);
        for d in diagnostics.iter().filter(|d| d.is_error()) {
            let name = names.get(&(d.origin.file.clone(), d.origin.line)).map_or("(unknown)", String::as_str);
            errors.push(format!("L7Resource {name}: {d}"));
        }
        let mut security = security;
        security.authorization_policies.extend(compiled.authorization_policies);
        security.request_authentications = compiled.request_authentications;
        (routing, Security::from_parts(security))
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    let mut model = Model::from_parts(workloads, services, security, routing);
    model.outbound_mode = outbound_mode;
    Ok(model)
}

/// Address resources, checked, split into workloads (with an address) and services.
fn addresses(
    resources: &BTreeMap<String, Any>,
    trust_domain: &str,
    errors: &mut Vec<String>,
) -> (Vec<WorkloadIn>, Vec<ServiceIn>) {
    let mut workloads = Vec::new();
    let mut services = Vec::new();
    for (name, any) in resources {
        let what = format!("Address {name}");
        if any.type_url != ADDRESS_TYPE_URL {
            errors.push(format!("{what}: field `type_url`: `{}` is not {ADDRESS_TYPE_URL}", any.type_url));
            continue;
        }
        let kind = match Address::decode(any.value.as_slice()) {
            Ok(Address { r#type: Some(kind) }) => kind,
            Ok(Address { r#type: None }) => {
                errors.push(format!("{what}: field `type`: neither a workload nor a service"));
                continue;
            }
            Err(e) => {
                errors.push(format!("{what}: cannot decode: {e}"));
                continue;
            }
        };
        match kind {
            address::Type::Workload(workload) => match check_workload(&workload, trust_domain) {
                Ok(Some(ip)) => workloads.push(WorkloadIn { name: name.clone(), workload, ip }),
                // Known by hostname only (a DNS ServiceEntry endpoint): nothing strait can use.
                Ok(None) => {}
                Err(problem) => errors.push(format!("{what}: {problem}")),
            },
            address::Type::Service(service) => match check_service(&service) {
                Ok(vip) => {
                    let key = service_key(&service.namespace, &service.hostname);
                    services.push(ServiceIn { name: name.clone(), key, service, vip });
                }
                Err(problem) => errors.push(format!("{what}: {problem}")),
            },
        }
    }
    (workloads, services)
}

fn check_workload(w: &api::Workload, trust_domain: &str) -> Result<Option<IpAddr>, String> {
    if w.name.is_empty() || w.namespace.is_empty() {
        return Err("field `workload.name`/`workload.namespace`: must both be set".to_owned());
    }
    let td = if w.trust_domain.is_empty() { DEFAULT_TRUST_DOMAIN } else { w.trust_domain.as_str() };
    if td != trust_domain {
        return Err(format!(
            "field `workload.trust_domain`: `{td}` is not this proxy's trust domain `{trust_domain}`; its identity \
             could not be verified"
        ));
    }
    if TunnelProtocol::try_from(w.tunnel_protocol).is_err() {
        return Err(format!("field `workload.tunnel_protocol`: unknown value {}", w.tunnel_protocol));
    }
    for key in w.services.keys() {
        if !key.contains('/') {
            return Err(format!("field `workload.services`: key `{key}` is not `namespace/hostname`"));
        }
    }
    check_ports(w.services.values().flat_map(|l| &l.ports), "workload.services")?;
    let mut ips = Vec::with_capacity(w.addresses.len());
    for (i, bytes) in w.addresses.iter().enumerate() {
        let ip = ip_of(bytes).ok_or_else(|| {
            format!("field `workload.addresses[{i}]`: {} bytes is not an IPv4 or IPv6 address", bytes.len())
        })?;
        ips.push(ip);
    }
    // The model has one address per pod; a dual-stack pod is reached on its first.
    Ok(ips.first().copied())
}

fn check_service(s: &api::Service) -> Result<Option<IpAddr>, String> {
    if s.name.is_empty() || s.namespace.is_empty() || s.hostname.is_empty() {
        return Err("field `service.name`/`namespace`/`hostname`: must all be set".to_owned());
    }
    check_ports(&s.ports, "service.ports")?;
    let mut vips = Vec::with_capacity(s.addresses.len());
    for (i, a) in s.addresses.iter().enumerate() {
        let ip = ip_of(&a.address).ok_or_else(|| {
            format!("field `service.addresses[{i}].address`: {} bytes is not an IPv4 or IPv6 address", a.address.len())
        })?;
        vips.push(ip);
    }
    Ok(vips.first().copied())
}

fn check_ports<'a>(ports: impl IntoIterator<Item = &'a api::Port>, field: &str) -> Result<(), String> {
    for p in ports {
        for value in [p.service_port, p.target_port] {
            if value > u32::from(u16::MAX) || p.service_port == 0 {
                return Err(format!("field `{field}`: {value} is not a port number"));
            }
        }
    }
    Ok(())
}

/// Authorizations as policies, with their xDS names.
fn authorizations(resources: &BTreeMap<String, Any>, root: &str, errors: &mut Vec<String>) -> Vec<Arc<Policy>> {
    let mut out = Vec::with_capacity(resources.len());
    for (name, any) in resources {
        let what = format!("Authorization {name}");
        if any.type_url != AUTHORIZATION_TYPE_URL {
            errors.push(format!("{what}: field `type_url`: `{}` is not {AUTHORIZATION_TYPE_URL}", any.type_url));
            continue;
        }
        let decoded = Authorization::decode(any.value.as_slice()).map_err(|e| format!("cannot decode: {e}"));
        match decoded.and_then(|a| from_authorization(&a, root)) {
            Ok(policy) => out.push(Arc::new(policy)),
            Err(problem) => errors.push(format!("{what}: {problem}")),
        }
    }
    out
}

/// The waypoint a GatewayAddress names, and the key of the service it names when known. A
/// hostname no service has still names a waypoint (istiod's are `<name>.<ns>.svc...`), which
/// then has no pod, so traffic for it fails closed.
fn resolve_waypoint(
    address: &GatewayAddress,
    by_host: &HashMap<&str, &ServiceIn>,
    by_vip: &HashMap<IpAddr, &ServiceIn>,
) -> (WaypointName, Option<String>) {
    let named = |s: &ServiceIn| {
        (WaypointName { namespace: s.service.namespace.clone(), name: s.service.name.clone() }, Some(s.key.clone()))
    };
    match &address.destination {
        Some(gateway_address::Destination::Hostname(h)) => match by_host.get(h.hostname.as_str()) {
            Some(s) => named(s),
            None => {
                let name = h.hostname.split('.').next().unwrap_or_default().to_owned();
                (WaypointName { namespace: h.namespace.clone(), name }, None)
            }
        },
        Some(gateway_address::Destination::Address(a)) => match ip_of(&a.address).and_then(|ip| by_vip.get(&ip)) {
            Some(s) => named(s),
            None => (WaypointName { namespace: String::new(), name: format!("{:?}", a.address) }, None),
        },
        None => (WaypointName { namespace: String::new(), name: String::new() }, None),
    }
}

fn workload(
    w: &WorkloadIn,
    host_network: bool,
    waypoint_services: &HashMap<String, WaypointName>,
    waypoint_of: &impl Fn(&GatewayAddress) -> (WaypointName, Option<String>),
) -> Workload {
    let p = &w.workload;
    let labels = match extension::<WorkloadExtension>(&p.extensions, WORKLOAD_EXTENSION) {
        Some(ext) => ext.labels,
        // From istiod: the canonical name and revision are what telemetry reads off labels.
        None => [
            ("service.istio.io/canonical-name", &p.canonical_name),
            ("service.istio.io/canonical-revision", &p.canonical_revision),
        ]
        .into_iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(k, v)| (k.to_owned(), v.clone()))
        .collect(),
    };
    let waypoint_role = waypoints::waypoint_of_pod(&p.namespace, &labels)
        .or_else(|| p.services.keys().find_map(|key| waypoint_services.get(key).cloned()));
    let hbone = p.tunnel_protocol == TunnelProtocol::Hbone as i32;
    let captured = hbone && !p.native_tunnel && !host_network && waypoint_role.is_none();
    Workload {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        service_account: if p.service_account.is_empty() { "default".to_owned() } else { p.service_account.clone() },
        node: (!p.node.is_empty()).then(|| p.node.clone()),
        ip: w.ip,
        labels,
        host_network,
        captured,
        waypoint: p.waypoint.as_ref().filter(|_| waypoint_role.is_none()).map(|a| waypoint_of(a).0),
        waypoint_role,
        protocol: if hbone { WorkloadProtocol::Hbone } else { WorkloadProtocol::Tcp },
    }
}

/// The workloads backing each service (by `namespace/hostname`), with their port lists: one
/// pass over the workloads instead of one per service port.
type Backing<'a> = HashMap<&'a str, Vec<(&'a Arc<Workload>, &'a api::PortList)>>;

fn backing<'a>(workloads: &'a [Arc<Workload>], received_as: &[&'a api::Workload]) -> Backing<'a> {
    let mut backing: Backing = HashMap::new();
    for (w, p) in workloads.iter().zip(received_as) {
        for (key, list) in &p.services {
            backing.entry(key.as_str()).or_default().push((w, list));
        }
    }
    backing
}

fn service(s: &ServiceIn, backing: &Backing, waypoint: Option<WaypointName>) -> Service {
    let p = &s.service;
    let info = extension::<ServiceExtension>(&p.extensions, SERVICE_EXTENSION).unwrap_or_default();
    let backends = backing.get(s.key.as_str()).map_or(&[][..], Vec::as_slice);
    let labels = info.labels.clone();
    let ports = p
        .ports
        .iter()
        .map(|port| {
            let known = info.ports.iter().find(|i| i.port == port.service_port);
            let text = |v: &str| (!v.is_empty()).then(|| v.to_owned());
            ServicePort::new(
                u16::try_from(port.service_port).unwrap_or_default(),
                known.and_then(|i| text(&i.name)),
                known.and_then(|i| text(&i.app_protocol)),
                endpoints(port, backends),
            )
        })
        .collect();
    Service {
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        hostname: p.hostname.clone(),
        vip: s.vip,
        labels,
        ports,
        waypoint,
        origin: xds_origin("Address", &s.name),
        entry: info.entry.as_ref().map(entry_from),
    }
}

/// The workloads backing one service port, at the port each listens on: its own entry in the
/// workload's `services` map, else the service's target port, else the service port. (Ports
/// were checked to fit in 16 bits when received.)
fn endpoints(port: &api::Port, backends: &[(&Arc<Workload>, &api::PortList)]) -> Vec<Endpoint> {
    backends
        .iter()
        .filter_map(|(w, list)| {
            let own = list.ports.iter().find(|p| p.service_port == port.service_port);
            if own.is_none() && !list.ports.is_empty() {
                return None;
            }
            let target = own.map(|p| p.target_port).filter(|t| *t != 0);
            let target = target.or(Some(port.target_port).filter(|t| *t != 0)).unwrap_or(port.service_port);
            Some(Endpoint { workload: (*w).clone(), port: u16::try_from(target).unwrap_or_default() })
        })
        .collect()
}

/// The strait extension `name` of a workload or service, when present and well formed.
fn extension<T: Message + Default>(extensions: &[api::Extension], name: &str) -> Option<T> {
    let config = extensions.iter().find(|e| e.name == name)?.config.as_ref()?;
    T::decode(config.value.as_slice()).ok()
}

/// Binds the policies to workloads as ztunnel does: GLOBAL to all, NAMESPACE to the namespace,
/// WORKLOAD_SELECTOR through the workload's list; converted PeerAuthentications become modes.
/// Each workload's policies keep the order of their xDS names (deterministic, like the
/// directory's file order).
fn security(
    workloads: &[Arc<Workload>],
    received_as: &[&api::Workload],
    policies: Vec<Arc<Policy>>,
    root: &str,
) -> SecurityParts {
    let mut parts = SecurityParts { root_namespace: root.to_owned(), ..SecurityParts::default() };
    // Indexed once: 10,000 workloads × 500 policies must not test every pair.
    let keyed: Vec<(String, &Arc<Policy>)> = policies.iter().map(|p| (p.key(), p)).collect();
    let global: Vec<&(String, &Arc<Policy>)> = keyed.iter().filter(|(_, p)| p.scope == Scope::Mesh).collect();
    let mut by_namespace: HashMap<&str, Vec<&(String, &Arc<Policy>)>> = HashMap::new();
    let mut by_key: HashMap<&str, &(String, &Arc<Policy>)> = HashMap::new();
    for entry in &keyed {
        match entry.1.scope {
            Scope::Mesh => {}
            Scope::Namespace => by_namespace.entry(entry.1.namespace.as_str()).or_default().push(entry),
            _ => {
                by_key.insert(entry.0.as_str(), entry);
            }
        }
    }
    for (w, p) in workloads.iter().zip(received_as) {
        let mut applying: Vec<&(String, &Arc<Policy>)> = global.clone();
        applying.extend(by_namespace.get(w.namespace.as_str()).into_iter().flatten());
        applying.extend(p.authorization_policies.iter().filter_map(|name| by_key.get(name.as_str())));
        applying.sort_by(|a, b| a.0.cmp(&b.0));
        applying.dedup_by(|a, b| a.0 == b.0);
        let (mtls, authz): (Vec<Arc<Policy>>, Vec<Arc<Policy>>) =
            applying.into_iter().map(|(_, p)| Arc::clone(p)).partition(|p| is_peer_authn_policy(&p.name));
        let key = (w.namespace.clone(), w.name.clone());
        if let Some(pa) = peer_authn_of(w, &mtls) {
            parts.peer_authn_by_workload.insert(key.clone(), Arc::new(pa));
        }
        if !authz.is_empty() {
            parts.authorization_by_workload.insert(key, authz);
        }
    }
    parts.authorization_policies = policies.into_iter().filter(|p| !is_peer_authn_policy(&p.name)).collect();
    parts
}

/// The ServiceEntry part of a service from `strait.io/service`. What does not read (an unknown
/// resolution, a bad address) is left out rather than failing the service: the entry's VIPs are
/// its `addresses`, already checked.
fn entry_from(info: &strait_proto::strait::config::v1::ServiceEntryInfo) -> ServiceEntryInfo {
    let resolution = match info.resolution.as_str() {
        "STATIC" => Resolution::Static,
        "DNS" => Resolution::Dns,
        "DNS_ROUND_ROBIN" => Resolution::DnsRoundRobin,
        _ => Resolution::None,
    };
    ServiceEntryInfo {
        entry: info.entry.clone(),
        location: if info.mesh_internal { Location::MeshInternal } else { Location::MeshExternal },
        resolution,
        addresses: info.addresses.iter().filter_map(|a| a.parse::<Cidr>().ok()).collect(),
        dns: info
            .dns
            .iter()
            .map(|d| DnsEndpoint {
                name: d.name.clone(),
                ports: d
                    .ports
                    .iter()
                    .filter_map(|(k, v)| Some((u16::try_from(*k).ok()?, u16::try_from(*v).ok()?)))
                    .collect(),
            })
            .collect(),
    }
}
