//! Istio Gateways in the model (GW-1, GW-2): each `networking.istio.io` Gateway compiled on
//! its own (hosts with their namespace, TLS settings with where the certificate comes from),
//! with the warnings Istio's validation would give; and `GatewayView`, what one `strait
//! gateway` serves: the Gateways whose `selector` its labels satisfy (from any namespace, as
//! Istio does by default), grouped by port, each server with the VirtualServices bound to it.
//!
//! A VirtualService binds to a server when its `gateways` names the Gateway (`ns/name`, or a
//! bare name in the VirtualService's namespace), one of its hosts intersects one of the
//! server's, and the server's host admits the VirtualService's namespace (`ns/host`; `*/host`
//! and `host` admit all). A pod that carries [`GATEWAY_POD_LABEL`] runs a strait gateway and
//! terminates HBONE itself (see `model::compile`).

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use serde::Serialize;

use super::{
    Model,
    routes::{MESH_GATEWAY, TcpRoute, TlsRoute, VirtualService, host_covers, host_matches, host_specificity},
};
use crate::{
    config::{Diagnostic, Located, Origin, Resource, ServerProtocol, ServerTlsMode, TlsVersion},
    identity::credentials::CredentialSource,
};

/// Label of a pod that runs `strait gateway`: node proxies reach it over HBONE (it terminates
/// HBONE on 15008 itself) and never capture it, as for a waypoint.
pub const GATEWAY_POD_LABEL: &str = "strait.io/gateway";

/// One Gateway, compiled.
#[derive(Debug, Serialize)]
pub struct Gateway {
    pub name: String,
    pub namespace: String,
    pub selector: BTreeMap<String, String>,
    pub servers: Vec<Server>,
    #[serde(skip)]
    pub origin: Origin,
}

impl Gateway {
    /// `namespace/name`, as VirtualServices' `gateways` are kept in the model.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether a gateway with `labels` serves this Gateway: every selector label matches.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

#[derive(Debug, Serialize)]
pub struct Server {
    /// `port.number`: what VirtualServices' `match.port` name.
    pub port: u16,
    pub target_port: Option<u16>,
    pub protocol: ServerProtocol,
    pub port_name: String,
    pub hosts: Vec<Host>,
    pub tls: Option<ServerTls>,
}

/// A server host: the namespace it admits VirtualServices from (`None`: any) and the host, lower
/// case, maybe a wildcard.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Host {
    pub namespace: Option<String>,
    pub host: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerTls {
    pub mode: ServerTlsMode,
    pub https_redirect: bool,
    /// Where the certificate (and for MUTUAL the CA) comes from; `None` for PASSTHROUGH.
    #[serde(skip)]
    pub credential: Option<CredentialSource>,
    pub subject_alt_names: Vec<String>,
    pub min_version: Option<TlsVersion>,
    pub max_version: Option<TlsVersion>,
}

impl ServerTls {
    /// The gateway terminates TLS (SIMPLE, MUTUAL, OPTIONAL_MUTUAL).
    pub fn terminates(&self) -> bool {
        matches!(self.mode, ServerTlsMode::Simple | ServerTlsMode::Mutual | ServerTlsMode::OptionalMutual)
    }
}

/// Compiles the Gateways of `resources`, warning where Istio would reject or ignore something:
/// a VirtualService bound to a Gateway that does not exist or whose hosts no server covers,
/// two servers of gateways with the same selector on the same port and host, HTTP and TLS on
/// one port.
pub fn compile_gateways(
    resources: &[Located<Resource>],
    virtual_services: &[Arc<VirtualService>],
    diagnostics: &mut Vec<Diagnostic>,
) -> Vec<Arc<Gateway>> {
    let mut gateways = Vec::new();
    for located in resources {
        let Resource::IstioGateway(gw) = &located.resource else { continue };
        let namespace = gw.metadata.namespace_or_default().to_owned();
        let servers = gw
            .spec
            .servers
            .iter()
            .map(|s| Server {
                port: s.port.number,
                target_port: s.port.target_port,
                protocol: s.port.protocol,
                port_name: s.port.name.clone(),
                hosts: s
                    .hosts
                    .iter()
                    .map(|h| Host {
                        namespace: h
                            .namespace
                            .as_ref()
                            .map(|ns| if ns == "." { namespace.clone() } else { ns.clone() }),
                        host: h.host.clone(),
                    })
                    .collect(),
                tls: s.tls.as_ref().map(|t| ServerTls {
                    mode: t.mode.unwrap_or(ServerTlsMode::Simple),
                    https_redirect: t.https_redirect,
                    credential: credential(t),
                    subject_alt_names: t.subject_alt_names.clone(),
                    min_version: t.min_protocol_version,
                    max_version: t.max_protocol_version,
                }),
            })
            .collect();
        gateways.push(Arc::new(Gateway {
            name: gw.metadata.name.clone(),
            namespace,
            selector: gw.spec.selector.clone(),
            servers,
            origin: located.origin.clone(),
        }));
    }
    check_unsupported(&gateways, diagnostics);
    check_conflicts(&gateways, diagnostics);
    check_bindings(&gateways, virtual_services, diagnostics);
    gateways
}

/// Settings strait reads but does not act on as Istio would: said once, where they are written.
fn check_unsupported(gateways: &[Arc<Gateway>], diagnostics: &mut Vec<Diagnostic>) {
    for gw in gateways {
        for (i, server) in gw.servers.iter().enumerate() {
            if server.tls.as_ref().is_some_and(|t| t.mode == ServerTlsMode::AutoPassthrough) {
                diagnostics.push(Diagnostic::warning(
                    gw.origin.clone(),
                    Some(&format!("spec.servers[{i}].tls.mode")),
                    "AUTO_PASSTHROUGH (east-west routing by an `outbound_.PORT_.SUBSET_.HOST` SNI) is not \
                     supported; the server passes TLS through by its VirtualServices' tls[] routes only"
                        .to_owned(),
                ));
            }
        }
    }
}

fn credential(tls: &crate::config::ServerTls) -> Option<CredentialSource> {
    if let Some(name) = &tls.credential_name {
        return Some(CredentialSource::Named(name.clone()));
    }
    let (cert, key, ca) = (&tls.server_certificate, &tls.private_key, &tls.ca_certificates);
    (cert.is_some() || key.is_some() || ca.is_some()).then(|| CredentialSource::Files {
        cert: cert.as_ref().map(Into::into),
        key: key.as_ref().map(Into::into),
        ca: ca.as_ref().map(Into::into),
    })
}

/// What a listener on one port speaks, from its servers' protocols.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum PortKind {
    /// Plain HTTP (HTTP, HTTP2, GRPC servers).
    Http,
    /// TLS: terminated (HTTPS, or TLS with SIMPLE/MUTUAL) or passed through, by SNI.
    Tls,
    Tcp,
}

impl PortKind {
    fn of(server: &Server) -> PortKind {
        match server.protocol {
            ServerProtocol::Http | ServerProtocol::Http2 | ServerProtocol::Grpc => PortKind::Http,
            ServerProtocol::Https | ServerProtocol::Tls => PortKind::Tls,
            ServerProtocol::Tcp => PortKind::Tcp,
        }
    }
}

fn check_conflicts(gateways: &[Arc<Gateway>], diagnostics: &mut Vec<Diagnostic>) {
    // (selector, port) -> kind and (host -> where first served).
    type Seen<'a> = HashMap<(&'a BTreeMap<String, String>, u16), (PortKind, HashMap<&'a str, String>)>;
    let mut seen: Seen = HashMap::new();
    for gw in gateways {
        for (i, server) in gw.servers.iter().enumerate() {
            let field = format!("spec.servers[{i}]");
            let kind = PortKind::of(server);
            let (first_kind, hosts) = seen.entry((&gw.selector, server.port)).or_insert_with(|| (kind, HashMap::new()));
            if *first_kind != kind {
                diagnostics.push(Diagnostic::warning(
                    gw.origin.clone(),
                    Some(&field),
                    format!(
                        "port {} is already served as {first_kind:?} by the same gateway pods; this {} server is \
                         ignored",
                        server.port,
                        server.protocol.name()
                    ),
                ));
                continue;
            }
            for host in &server.hosts {
                if let Some(first) = hosts.get(host.host.as_str()) {
                    diagnostics.push(Diagnostic::warning(
                        gw.origin.clone(),
                        Some(&field),
                        format!(
                            "host `{}` on port {} is already served by {first}; Istio rejects the duplicate, the \
                             first server wins",
                            host.host, server.port
                        ),
                    ));
                } else {
                    hosts.insert(&host.host, format!("{} ({})", gw.key(), gw.origin));
                }
            }
        }
    }
}

fn check_bindings(
    gateways: &[Arc<Gateway>],
    virtual_services: &[Arc<VirtualService>],
    diagnostics: &mut Vec<Diagnostic>,
) {
    let by_key: HashMap<String, &Arc<Gateway>> = gateways.iter().map(|g| (g.key(), g)).collect();
    for vs in virtual_services {
        for (i, name) in vs.gateways.iter().enumerate().filter(|(_, g)| *g != MESH_GATEWAY) {
            let field = format!("spec.gateways[{i}]");
            let Some(gw) = by_key.get(name) else {
                diagnostics.push(Diagnostic::warning(
                    vs.origin.clone(),
                    Some(&field),
                    format!("Gateway {name} does not exist; the VirtualService serves nothing through it"),
                ));
                continue;
            };
            if !gw.servers.iter().any(|s| binds(s, vs)) {
                diagnostics.push(Diagnostic::warning(
                    vs.origin.clone(),
                    Some(&field),
                    format!(
                        "no server of Gateway {name} ({}) has a host matching {} for namespace {}; the VirtualService \
                         serves nothing through it",
                        gw.origin,
                        vs.hosts.join(", "),
                        vs.namespace
                    ),
                ));
            }
        }
    }
}

/// Whether `vs` (already known to name the server's Gateway) binds to `server`.
fn binds(server: &Server, vs: &VirtualService) -> bool {
    server.hosts.iter().any(|h| {
        h.namespace.as_ref().is_none_or(|ns| *ns == vs.namespace)
            && vs.hosts.iter().any(|v| host_covers(&h.host, v) || host_covers(v, &h.host))
    })
}

/// What one `strait gateway` serves, by port (`port.number`).
#[derive(Debug, Default, Serialize)]
pub struct GatewayView {
    pub ports: BTreeMap<u16, PortServers>,
}

/// The servers of one port, in configuration order, with the kind of the first (servers of
/// another kind on the same port were warned about and are left out).
#[derive(Debug, Serialize)]
pub struct PortServers {
    pub kind: PortKind,
    pub servers: Vec<BoundServer>,
}

/// One server, with the VirtualServices bound to it.
#[derive(Debug, Serialize)]
pub struct BoundServer {
    /// `namespace/name` of its Gateway: what `gateways` and `match[].gateways` name.
    pub gateway: String,
    #[serde(skip)]
    pub resource: Arc<Gateway>,
    pub index: usize,
    #[serde(serialize_with = "vs_keys")]
    pub virtual_services: Vec<Arc<VirtualService>>,
}

fn vs_keys<S: serde::Serializer>(v: &[Arc<VirtualService>], s: S) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&v.iter().map(|vs| vs.key()).collect::<Vec<_>>(), s)
}

/// Which server of a view: its Gateway (`namespace/name`) and index in its `servers`. Kept
/// across reloads by connections, so names rather than pointers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerId {
    pub gateway: String,
    pub index: usize,
}

impl BoundServer {
    pub fn server(&self) -> &Server {
        &self.resource.servers[self.index]
    }

    pub fn id(&self) -> ServerId {
        ServerId { gateway: self.gateway.clone(), index: self.index }
    }

    fn serves(&self, host: &str) -> bool {
        self.server().hosts.iter().any(|h| host_matches(&h.host, host))
    }

    /// How specifically this server names `host` (`None`: not at all).
    fn specificity(&self, host: &str) -> Option<(bool, usize)> {
        self.server().hosts.iter().filter(|h| host_matches(&h.host, host)).map(|h| host_specificity(&h.host)).max()
    }
}

/// One HTTP candidate for a request: the VirtualService and the Gateway it is bound through.
pub struct HttpCandidate {
    pub gateway: String,
    pub virtual_service: Arc<VirtualService>,
}

impl GatewayView {
    /// The view of a gateway whose pods carry `labels`.
    pub fn build(model: &Model, labels: &BTreeMap<String, String>) -> GatewayView {
        let mut view = GatewayView::default();
        for gw in model.gateways.iter().filter(|g| g.selects(labels)) {
            let key = gw.key();
            for (index, server) in gw.servers.iter().enumerate() {
                let kind = PortKind::of(server);
                let port = view.ports.entry(server.port).or_insert_with(|| PortServers { kind, servers: Vec::new() });
                if port.kind != kind {
                    continue;
                }
                let virtual_services = model
                    .routing
                    .virtual_services
                    .iter()
                    .filter(|vs| vs.gateways.contains(&key) && binds(server, vs))
                    .cloned()
                    .collect();
                port.servers.push(BoundServer { gateway: key.clone(), resource: gw.clone(), index, virtual_services });
            }
        }
        view
    }

    /// The VirtualServices that may route an HTTP request for `host` (lower case, no port) on
    /// `port`, the most specific host first: those of servers serving the host, by their own
    /// most specific host matching it (exact before wildcard, longer wildcard before shorter).
    /// On a connection whose TLS a server terminated (`only`, chosen by SNI), that server's
    /// alone, as each server is a filter chain of its own in Istio: a Host header cannot reach
    /// another server's hosts, whose TLS mode (MUTUAL) the client never satisfied.
    pub fn http_candidates(&self, port: u16, host: &str, only: Option<&ServerId>) -> Vec<HttpCandidate> {
        let Some(servers) = self.ports.get(&port) else { return Vec::new() };
        let mut found: Vec<((bool, usize), HttpCandidate)> = Vec::new();
        let chosen = |s: &&BoundServer| only.is_none_or(|id| s.gateway == id.gateway && s.index == id.index);
        for server in servers.servers.iter().filter(chosen).filter(|s| s.serves(host)) {
            for vs in &server.virtual_services {
                let Some(rank) = vs.hosts.iter().filter(|h| host_matches(h, host)).map(|h| host_specificity(h)).max()
                else {
                    continue;
                };
                if vs.http.is_empty() || found.iter().any(|(_, c)| Arc::ptr_eq(&c.virtual_service, vs)) {
                    continue;
                }
                found.push((rank, HttpCandidate { gateway: server.gateway.clone(), virtual_service: vs.clone() }));
            }
        }
        // Stable: equally specific VirtualServices keep configuration order.
        found.sort_by_key(|(rank, _)| std::cmp::Reverse(*rank));
        found.into_iter().map(|(_, c)| c).collect()
    }

    /// Whether a plain HTTP request for `host` on `port` is answered with a redirect to HTTPS:
    /// the server naming the host most specifically sets `tls.httpsRedirect` (GW-1).
    pub fn redirects_to_https(&self, port: u16, host: &str) -> bool {
        let Some(servers) = self.ports.get(&port).filter(|p| p.kind == PortKind::Http) else { return false };
        let best = servers.servers.iter().filter_map(|s| Some((s.specificity(host)?, s))).max_by_key(|(rank, _)| *rank);
        best.is_some_and(|(_, s)| s.server().tls.as_ref().is_some_and(|t| t.https_redirect))
    }

    /// The server of a TLS port a client with `sni` reaches: the one naming it most
    /// specifically; without SNI, one serving `*`.
    pub fn tls_server(&self, port: u16, sni: Option<&str>) -> Option<&BoundServer> {
        let servers = &self.ports.get(&port)?.servers;
        let mut best: Option<(&BoundServer, (bool, usize))> = None;
        for server in servers {
            let rank = match sni {
                Some(sni) => server.specificity(sni),
                None => server.server().hosts.iter().any(|h| h.host == "*").then_some((false, 1)),
            };
            if let Some(rank) = rank
                && best.is_none_or(|(_, r)| rank > r)
            {
                best = Some((server, rank));
            }
        }
        best.map(|(s, _)| s)
    }

    /// The `tls[]` route of a PASSTHROUGH server for `sni` on `port`.
    pub fn tls_route(&self, server: &BoundServer, port: u16, sni: &str) -> Option<(Arc<VirtualService>, usize)> {
        for vs in &server.virtual_services {
            for (i, route) in vs.tls.iter().enumerate() {
                if tls_route_matches(route, &server.gateway, port, sni) {
                    return Some((vs.clone(), i));
                }
            }
        }
        None
    }

    /// The `tcp[]` route for a connection on `port` (servers in order).
    pub fn tcp_route(&self, port: u16) -> Option<(String, Arc<VirtualService>, usize)> {
        for server in &self.ports.get(&port)?.servers {
            for vs in &server.virtual_services {
                for (i, route) in vs.tcp.iter().enumerate() {
                    if tcp_route_matches(route, &server.gateway, port) {
                        return Some((server.gateway.clone(), vs.clone(), i));
                    }
                }
            }
        }
        None
    }
}

fn tls_route_matches(route: &TlsRoute, gateway: &str, port: u16, sni: &str) -> bool {
    route.matches.iter().any(|m| {
        (m.gateways.is_empty() || m.gateways.iter().any(|g| g == gateway))
            && m.port.is_none_or(|p| p == port)
            && m.sni_hosts.iter().any(|h| host_matches(h, sni))
    })
}

fn tcp_route_matches(route: &TcpRoute, gateway: &str, port: u16) -> bool {
    route.matches.is_empty()
        || route.matches.iter().any(|m| {
            (m.gateways.is_empty() || m.gateways.iter().any(|g| g == gateway)) && m.port.is_none_or(|p| p == port)
        })
}

#[cfg(test)]
mod tests;
