//! Workloads and services as `istio.workload.Address` resources, the way istiod builds them for
//! pods and Kubernetes Services (`pilot/.../ambient/workloads.go`, `services.go`).
//!
//! Names are istiod's: a workload's uid (`Kubernetes//Pod/<ns>/<name>`), a service's
//! `<ns>/<hostname>`; aliases are `<network>/<ip>` for on-demand lookups by address. A waypoint is
//! reached as istiod expresses it, through the Service of its Gateway: a `GatewayAddress` naming
//! that service's hostname and HBONE port 15008. strait's directory has no such Service (its
//! waypoints are pods labelled `gateway.networking.k8s.io/gateway-name`), so one is synthesized
//! per waypoint, without an address, with the waypoint's pods as its endpoints.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::Arc,
};

use strait_ebpf_common::HBONE_PORT;
use strait_proto::{
    istio::workload::{
        self as api, Address, Extension, GatewayAddress, NamespacedHostname, NetworkAddress, NetworkMode, PortList,
        TunnelProtocol, WorkloadStatus, WorkloadType, address, gateway_address,
    },
    prost::Message,
    prost_types::Any,
    strait::config::v1::{self as api_entry, ServiceExtension, ServicePortInfo, WorkloadExtension},
};

use super::{
    CLUSTER_ID, DEFAULT_TRUST_DOMAIN, SERVICE_EXTENSION, SERVICE_EXTENSION_TYPE_URL, WORKLOAD_EXTENSION,
    WORKLOAD_EXTENSION_TYPE_URL, authorization::PeerAuthnPlan, resource,
};
use crate::{
    authz::Scope,
    config::{Location, Resolution},
    model::{Model, Service, ServiceEntryInfo, WaypointName, Workload, WorkloadProtocol},
    telemetry::{canonical_revision, canonical_service, workload_name},
    xds::{ADDRESS_TYPE_URL, XdsResource},
};

/// The network every address of a single-network mesh is on (istiod's default, empty).
pub(super) const NETWORK: &str = "";

/// A workload's xDS name, as istiod gives it to a pod.
pub fn workload_uid(workload: &Workload) -> String {
    format!("{CLUSTER_ID}//Pod/{}/{}", workload.namespace, workload.name)
}

/// `namespace/hostname`: a service's xDS name and its key in `Workload.services`.
pub fn service_key(namespace: &str, hostname: &str) -> String {
    format!("{namespace}/{hostname}")
}

/// The hostname of the Service istiod reaches a waypoint through (its Gateway's Service).
pub fn waypoint_hostname(waypoint: &WaypointName) -> String {
    format!("{}.{}.svc.cluster.local", waypoint.name, waypoint.namespace)
}

/// The address of a waypoint, as istiod writes it in `Workload.waypoint` and `Service.waypoint`.
fn gateway_address(waypoint: &WaypointName) -> GatewayAddress {
    GatewayAddress {
        destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
            namespace: waypoint.namespace.clone(),
            hostname: waypoint_hostname(waypoint),
        })),
        hbone_mtls_port: u32::from(HBONE_PORT),
    }
}

pub(super) fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn alias(ip: IpAddr) -> String {
    format!("{NETWORK}/{ip}")
}

/// Every workload and service of `model` as Address resources, by xDS name.
pub(super) fn encode(
    model: &Model,
    trust_domain: &str,
    peer_authn: &PeerAuthnPlan,
) -> BTreeMap<String, Arc<XdsResource>> {
    let mut ports_of: HashMap<(&str, &str), BTreeMap<String, PortList>> = HashMap::new();
    let mut out = BTreeMap::new();
    for service in &model.services {
        let key = service_key(&service.namespace, &service.hostname);
        for port in &service.ports {
            for endpoint in &port.endpoints {
                let w = &endpoint.workload;
                let list = ports_of.entry((&w.namespace, &w.name)).or_default().entry(key.clone()).or_default();
                list.ports.push(api::Port { service_port: port.port.into(), target_port: endpoint.port.into() });
            }
        }
        out.extend([encode_service(service)]);
    }
    for waypoint in model.waypoints.values() {
        let hostname = waypoint_hostname(&waypoint.name);
        if model.service_by_host(&hostname).is_some() {
            continue;
        }
        let key = service_key(&waypoint.name.namespace, &hostname);
        let hbone = api::Port { service_port: HBONE_PORT.into(), target_port: HBONE_PORT.into() };
        for pod in &waypoint.pods {
            let lists = ports_of.entry((&pod.namespace, &pod.name)).or_default();
            lists.insert(key.clone(), PortList { ports: vec![hbone] });
        }
        let service = api::Service {
            name: waypoint.name.name.clone(),
            namespace: waypoint.name.namespace.clone(),
            hostname,
            ports: vec![hbone],
            ..Default::default()
        };
        out.extend([resource(key, Vec::new(), ADDRESS_TYPE_URL, &as_address(address::Type::Service(service)))]);
    }
    for w in &model.workloads {
        let services = ports_of.remove(&(w.namespace.as_str(), w.name.as_str())).unwrap_or_default();
        out.extend([encode_workload(model, w, trust_domain, services, peer_authn)]);
    }
    out
}

fn as_address(kind: address::Type) -> Address {
    Address { r#type: Some(kind) }
}

fn extension(name: &str, type_url: &str, message: &impl Message) -> Extension {
    Extension {
        name: name.to_owned(),
        config: Some(Any { type_url: type_url.to_owned(), value: message.encode_to_vec() }),
    }
}

fn encode_workload(
    model: &Model,
    w: &Workload,
    trust_domain: &str,
    services: BTreeMap<String, PortList>,
    peer_authn: &PeerAuthnPlan,
) -> (String, Arc<XdsResource>) {
    let uid = workload_uid(w);
    // Selector-scoped policies only: global and namespace ones apply by their own scope.
    let mut policies: Vec<String> = model
        .authorization_for(w)
        .filter(|p| matches!(p.scope, Scope::Selector { .. }) && authorization_served(p))
        .map(|p| p.key())
        .collect();
    policies.sort();
    policies.dedup();
    policies.extend(peer_authn.refs_of(w).iter().cloned());
    let labels = WorkloadExtension { labels: w.labels.clone() };
    let workload = api::Workload {
        uid: uid.clone(),
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        addresses: vec![ip_bytes(w.ip)],
        network: NETWORK.to_owned(),
        tunnel_protocol: match w.protocol {
            WorkloadProtocol::Hbone => TunnelProtocol::Hbone,
            WorkloadProtocol::Tcp => TunnelProtocol::None,
        } as i32,
        // istiod leaves the default trust domain out.
        trust_domain: if trust_domain == DEFAULT_TRUST_DOMAIN { String::new() } else { trust_domain.to_owned() },
        service_account: w.service_account.clone(),
        waypoint: w.waypoint.as_ref().map(gateway_address),
        node: w.node.clone().unwrap_or_default(),
        canonical_name: canonical_service(w).to_owned(),
        canonical_revision: canonical_revision(w).to_owned(),
        workload_type: WorkloadType::Pod as i32,
        workload_name: workload_name(w).to_owned(),
        // A waypoint, or a strait gateway pod (GW-3), terminates HBONE itself; no node proxy
        // does it on its behalf, nor captures it.
        native_tunnel: w.waypoint_role.is_some()
            || w.labels.get(crate::model::gateways::GATEWAY_POD_LABEL).is_some_and(|v| !v.is_empty()),
        services,
        authorization_policies: policies,
        status: WorkloadStatus::Healthy as i32,
        cluster_id: CLUSTER_ID.to_owned(),
        network_mode: if w.host_network { NetworkMode::HostNetwork } else { NetworkMode::Standard } as i32,
        extensions: vec![extension(WORKLOAD_EXTENSION, WORKLOAD_EXTENSION_TYPE_URL, &labels)],
        ..Default::default()
    };
    // A hostNetwork pod shares its node's address: nobody may look it up by IP.
    let aliases = if w.host_network { Vec::new() } else { vec![alias(w.ip)] };
    resource(uid, aliases, ADDRESS_TYPE_URL, &as_address(address::Type::Workload(workload)))
}

/// Whether a policy bound to workloads is served as an Authorization (istiod drops AUDIT, and
/// CUSTOM fails closed as a DENY, see `authorization::to_authorization`).
pub(super) fn authorization_served(policy: &crate::authz::Policy) -> bool {
    policy.action != crate::authz::Action::Audit
}

fn encode_service(s: &Service) -> (String, Arc<XdsResource>) {
    let key = service_key(&s.namespace, &s.hostname);
    let ports = s
        .ports
        .iter()
        .map(|p| {
            // The model keeps each endpoint's port, not the Service's `targetPort`: a number when
            // every endpoint agrees, 0 (a named port, resolved per workload) otherwise.
            let mut targets = p.endpoints.iter().map(|e| e.port);
            let first = targets.next();
            let target = match first {
                None => p.port,
                Some(t) if targets.all(|o| o == t) => t,
                Some(_) => 0,
            };
            api::Port { service_port: p.port.into(), target_port: target.into() }
        })
        .collect();
    let info = ServiceExtension {
        labels: s.labels.clone(),
        ports: s
            .ports
            .iter()
            .map(|p| ServicePortInfo {
                port: p.port.into(),
                name: p.name.clone().unwrap_or_default(),
                app_protocol: p.app_protocol.clone().unwrap_or_default(),
            })
            .collect(),
        entry: s.entry.as_ref().map(entry_info),
    };
    let addresses = service_addresses(s);
    let service = api::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
        hostname: s.hostname.clone(),
        addresses: addresses
            .iter()
            .map(|ip| NetworkAddress { network: NETWORK.to_owned(), address: ip_bytes(*ip) })
            .collect(),
        ports,
        waypoint: s.waypoint.as_ref().map(gateway_address),
        extensions: vec![extension(SERVICE_EXTENSION, SERVICE_EXTENSION_TYPE_URL, &info)],
        ..Default::default()
    };
    let aliases = addresses.iter().map(|ip| alias(*ip)).collect();
    resource(key, aliases, ADDRESS_TYPE_URL, &as_address(address::Type::Service(service)))
}

/// A service's addresses: its VIP, or for a ServiceEntry host every single-IP address of the
/// entry (CIDR blocks travel in the extension only).
fn service_addresses(s: &Service) -> Vec<IpAddr> {
    match &s.entry {
        None => s.vip.into_iter().collect(),
        Some(entry) => entry
            .addresses
            .iter()
            .filter(|c| c.prefix() == if c.addr().is_ipv4() { 32 } else { 128 })
            .map(|c| c.addr())
            .collect(),
    }
}

/// The ServiceEntry part of a service, for `strait.io/service`.
fn entry_info(entry: &ServiceEntryInfo) -> api_entry::ServiceEntryInfo {
    api_entry::ServiceEntryInfo {
        entry: entry.entry.clone(),
        mesh_internal: entry.location == Location::MeshInternal,
        resolution: resolution_name(entry.resolution).to_owned(),
        addresses: entry.addresses.iter().map(ToString::to_string).collect(),
        dns: entry
            .dns
            .iter()
            .map(|d| api_entry::DnsEndpoint {
                name: d.name.clone(),
                ports: d.ports.iter().map(|(k, v)| (u32::from(*k), u32::from(*v))).collect(),
            })
            .collect(),
    }
}

/// Istio's name of a resolution, as `ServiceEntryInfo.resolution` carries it.
pub(super) fn resolution_name(resolution: Resolution) -> &'static str {
    match resolution {
        Resolution::None => "NONE",
        Resolution::Static => "STATIC",
        Resolution::Dns => "DNS",
        Resolution::DnsRoundRobin => "DNS_ROUND_ROBIN",
    }
}
