//! Resources written by hand the way istiod sends them (no strait extensions) decode to a
//! sensible model; bad resources are refused with their name and field.

use strait_proto::{
    istio::{
        security::{self as sec, Authorization, Group, Match, Rules, StringMatch, string_match::MatchType},
        workload::{
            self as api, Address, GatewayAddress, NamespacedHostname, NetworkAddress, PortList, TunnelProtocol,
            address, gateway_address,
        },
    },
    strait::L7Resource,
};

use super::*;
use crate::{
    authz::peer_authn::mode_for,
    identity::Identity,
    model::{AppProtocol, WaypointName, WorkloadProtocol},
    node::policy::{authorize, plaintext_allowed},
    xds::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, L7_TYPE_URL},
};

fn any(type_url: &str, message: &impl Message) -> Any {
    Any { type_url: type_url.to_owned(), value: message.encode_to_vec() }
}

fn waypoint_address() -> GatewayAddress {
    GatewayAddress {
        destination: Some(gateway_address::Destination::Hostname(NamespacedHostname {
            namespace: "shop".into(),
            hostname: "waypoint.shop.svc.cluster.local".into(),
        })),
        hbone_mtls_port: 15008,
    }
}

fn pod(name: &str, ip: [u8; 4], protocol: TunnelProtocol, node: &str) -> api::Workload {
    api::Workload {
        uid: format!("Kubernetes//Pod/shop/{name}"),
        name: name.into(),
        namespace: "shop".into(),
        addresses: vec![ip.to_vec()],
        tunnel_protocol: protocol as i32,
        service_account: name.split('-').next().unwrap_or(name).into(),
        node: node.into(),
        canonical_name: name.split('-').next().unwrap_or(name).into(),
        canonical_revision: "v1".into(),
        workload_type: api::WorkloadType::Pod as i32,
        workload_name: name.into(),
        cluster_id: "Kubernetes".into(),
        ..Default::default()
    }
}

fn ports(pairs: &[(u32, u32)]) -> PortList {
    PortList { ports: pairs.iter().map(|(s, t)| api::Port { service_port: *s, target_port: *t }).collect() }
}

fn plaintext_on(port: u32) -> Match {
    Match {
        not_principals: vec![StringMatch { match_type: Some(MatchType::Presence(())) }],
        destination_ports: if port == 0 { vec![] } else { vec![port] },
        ..Match::default()
    }
}

fn policy(namespace: &str, name: &str, scope: sec::Scope, action: sec::Action, groups: Vec<Group>) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: namespace.into(),
        scope: scope as i32,
        action: action as i32,
        groups,
        dry_run: false,
    }
}

/// A small mesh as istiod serves it: a pod on a node run by ztunnel behind a waypoint, the
/// waypoint (TCP, known only as the endpoint of its Gateway's Service), a client whose workload
/// PeerAuthentication makes one port STRICT, a pod outside the mesh, and policies at three scopes.
fn istiod_state() -> Received {
    let mut web = pod("web-7d4b9-x2x9z", [10, 1, 0, 11], TunnelProtocol::Hbone, "ztunnel-node");
    web.waypoint = Some(waypoint_address());
    web.services = [("shop/web.shop.svc.cluster.local".to_owned(), ports(&[(80, 8080)]))].into();
    web.authorization_policies = vec!["istio-system/istio_converted_static_strict".into(), "shop/allow-client".into()];
    let mut waypoint = pod("waypoint-5c7f-abcde", [10, 1, 0, 20], TunnelProtocol::None, "n1");
    waypoint.services =
        [("shop/waypoint.shop.svc.cluster.local".to_owned(), ports(&[(15021, 15021), (15008, 15008)]))].into();
    let mut client = pod("client-6f9b-qwert", [10, 1, 0, 12], TunnelProtocol::Hbone, "n1");
    client.authorization_policies = vec!["shop/converted_peer_authentication_client-pa".into()];
    let mut plain = pod("plain", [10, 2, 0, 30], TunnelProtocol::None, "n2");
    plain.namespace = "legacy".into();
    plain.uid = "Kubernetes//Pod/legacy/plain".into();
    let service = |name: &str, vip: [u8; 4], ports: &[(u32, u32)], waypoint: Option<GatewayAddress>| api::Service {
        name: name.into(),
        namespace: "shop".into(),
        hostname: format!("{name}.shop.svc.cluster.local"),
        addresses: vec![NetworkAddress { network: String::new(), address: vip.to_vec() }],
        ports: ports.iter().map(|(s, t)| api::Port { service_port: *s, target_port: *t }).collect(),
        waypoint,
        ..Default::default()
    };
    let addresses = [
        ("Kubernetes//Pod/shop/web-7d4b9-x2x9z", address::Type::Workload(web)),
        ("Kubernetes//Pod/shop/waypoint-5c7f-abcde", address::Type::Workload(waypoint)),
        ("Kubernetes//Pod/shop/client-6f9b-qwert", address::Type::Workload(client)),
        ("Kubernetes//Pod/legacy/plain", address::Type::Workload(plain)),
        (
            "shop/web.shop.svc.cluster.local",
            address::Type::Service(service("web", [10, 96, 0, 10], &[(80, 8080)], Some(waypoint_address()))),
        ),
        (
            "shop/waypoint.shop.svc.cluster.local",
            address::Type::Service(service("waypoint", [10, 96, 0, 99], &[(15021, 15021), (15008, 15008)], None)),
        ),
    ];
    let strict = policy(
        "istio-system",
        "istio_converted_static_strict",
        sec::Scope::WorkloadSelector,
        sec::Action::Deny,
        vec![Group { rules: vec![Rules { matches: vec![plaintext_on(0)] }] }],
    );
    let client_pa = policy(
        "shop",
        "converted_peer_authentication_client-pa",
        sec::Scope::WorkloadSelector,
        sec::Action::Deny,
        vec![Group { rules: vec![Rules { matches: vec![plaintext_on(9090)] }] }],
    );
    let principal = |p: &str| StringMatch { match_type: Some(MatchType::Exact(p.into())) };
    let allow_client = policy(
        "shop",
        "allow-client",
        sec::Scope::WorkloadSelector,
        sec::Action::Allow,
        vec![Group {
            rules: vec![
                Rules { matches: vec![Match { destination_ports: vec![8080], ..Match::default() }] },
                Rules {
                    matches: vec![Match {
                        principals: vec![principal("cluster.local/ns/shop/sa/client")],
                        ..Match::default()
                    }],
                },
            ],
        }],
    );
    let deny_legacy = policy(
        "shop",
        "deny-legacy",
        sec::Scope::Namespace,
        sec::Action::Deny,
        vec![Group {
            rules: vec![Rules {
                matches: vec![Match {
                    namespaces: vec![StringMatch { match_type: Some(MatchType::Prefix("leg".into())) }],
                    ..Match::default()
                }],
            }],
        }],
    );
    let mut received = Received::new();
    received.insert(
        ADDRESS_TYPE_URL.into(),
        addresses
            .into_iter()
            .map(|(name, kind)| (name.to_owned(), any(ADDRESS_TYPE_URL, &Address { r#type: Some(kind) })))
            .collect(),
    );
    received.insert(
        AUTHORIZATION_TYPE_URL.into(),
        [strict, client_pa, allow_client, deny_legacy]
            .iter()
            .map(|a| (format!("{}/{}", a.namespace, a.name), any(AUTHORIZATION_TYPE_URL, a)))
            .collect(),
    );
    received
}

#[test]
fn istiod_resources_decode_to_a_sensible_model() {
    let model = model_from_xds(&istiod_state(), "cluster.local").expect("decodes");
    let find = |name: &str| model.workloads.iter().find(|w| w.name == name).expect("workload");
    let waypoint_name = WaypointName { namespace: "shop".into(), name: "waypoint".into() };

    // L4-1: a pod on a node run by ztunnel is reached over HBONE all the same.
    let web = find("web-7d4b9-x2x9z");
    assert_eq!(
        (web.protocol, web.captured, web.node.as_deref()),
        (WorkloadProtocol::Hbone, true, Some("ztunnel-node"))
    );
    assert!(web.reached_over_hbone());
    assert_eq!(web.waypoint.as_ref(), Some(&waypoint_name));
    assert_eq!(web.labels.get("service.istio.io/canonical-name").map(String::as_str), Some("web"));
    assert_eq!(crate::telemetry::canonical_service(web), "web");

    let waypoint = find("waypoint-5c7f-abcde");
    assert_eq!((waypoint.waypoint_role.as_ref(), waypoint.captured), (Some(&waypoint_name), false));
    let pods: Vec<&str> =
        model.waypoint(&waypoint_name).expect("waypoint").pods.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(pods, ["waypoint-5c7f-abcde"]);
    assert!(!find("plain").captured && !find("plain").reached_over_hbone());

    let service = model.service_by_vip("10.96.0.10".parse().expect("ip")).expect("web service");
    assert_eq!(service.waypoint.as_ref(), Some(&waypoint_name));
    assert_eq!(service.ports[0].protocol, AppProtocol::Unknown, "no port names from istiod: detected");
    let endpoints: Vec<String> = service.ports[0].endpoints.iter().map(|e| e.addr().to_string()).collect();
    assert_eq!(endpoints, ["10.1.0.11:8080"]);
    let fronting = model.service_by_host("waypoint.shop.svc.cluster.local").expect("waypoint service");
    assert_eq!(fronting.waypoint, None, "a waypoint's own service never goes through a waypoint");

    // L4-4: the static STRICT policy and a converted workload PeerAuthentication.
    assert!(!plaintext_allowed(&model, web, 8080));
    let client = find("client-6f9b-qwert");
    assert!(plaintext_allowed(&model, client, 80) && !plaintext_allowed(&model, client, 9090));
    assert_eq!(mode_for(&model, client, 9090), crate::authz::peer_authn::MtlsMode::Strict);

    // AUTHZ-1: selector ALLOW bound by the workload's list, namespace DENY by scope.
    let id = |ns: &str, sa: &str| Identity::new("cluster.local", ns, sa);
    let at = |port| std::net::SocketAddr::new(web.ip, port);
    let ip = "10.1.0.12".parse().expect("ip");
    assert!(authorize(&model, web, Some(&id("shop", "client")), ip, at(8080)).allowed);
    assert!(!authorize(&model, web, Some(&id("shop", "client")), ip, at(9999)).allowed);
    assert!(!authorize(&model, web, Some(&id("shop", "web")), ip, at(8080)).allowed);
    let denied = authorize(&model, client, Some(&id("legacy", "plain")), ip, std::net::SocketAddr::new(client.ip, 80));
    assert_eq!((denied.allowed, denied.policy.as_deref()), (false, Some("shop/deny-legacy")));
    assert!(model.authorization_for(client).all(|p| p.name != "converted_peer_authentication_client-pa"));
}

#[test]
fn bad_resources_are_named_with_their_field() {
    let mut received = istiod_state();
    let addresses = received.get_mut(ADDRESS_TYPE_URL).expect("addresses");
    let mut bad = pod("bad", [10, 1, 0, 50], TunnelProtocol::Hbone, "n1");
    bad.addresses = vec![vec![10, 1, 0, 50, 7]];
    let body = Address { r#type: Some(address::Type::Workload(bad)) };
    addresses.insert("Kubernetes//Pod/shop/bad".into(), any(ADDRESS_TYPE_URL, &body));
    addresses.insert("garbage".into(), Any { type_url: ADDRESS_TYPE_URL.into(), value: vec![0xff, 0xff] });
    let mut weird = policy("shop", "weird", sec::Scope::Namespace, sec::Action::Allow, vec![]);
    weird.action = 7;
    received
        .get_mut(AUTHORIZATION_TYPE_URL)
        .expect("authz")
        .insert("shop/weird".into(), any(AUTHORIZATION_TYPE_URL, &weird));
    let broken = L7Resource {
        origin: "shop/routes.yaml:7".into(),
        document: r#"{"apiVersion":"networking.istio.io/v1","kind":"VirtualService","metadata":{"name":"broken","namespace":"shop"},"spec":{"hosts":["web"],"http":[{"route":[{"destination":{"hots":"web"}}]}]}}"#.into(),
        waypoints: vec!["shop/waypoint".into()],
    };
    received.insert(L7_TYPE_URL.into(), [("VirtualService/shop/broken".to_owned(), any(L7_TYPE_URL, &broken))].into());

    let errors = model_from_xds(&received, "cluster.local").expect_err("refused");
    assert_eq!(errors.len(), 4, "{errors:#?}");
    let has = |parts: &[&str]| errors.iter().any(|e| parts.iter().all(|p| e.contains(p)));
    assert!(has(&["Address Kubernetes//Pod/shop/bad", "workload.addresses[0]", "5 bytes"]), "{errors:#?}");
    assert!(has(&["Address garbage", "cannot decode"]), "{errors:#?}");
    assert!(has(&["Authorization shop/weird", "field `action`", "7"]), "{errors:#?}");
    assert!(has(&["L7Resource VirtualService/shop/broken", "shop/routes.yaml:7", "hots"]), "{errors:#?}");

    let mut other_domain = istiod_state();
    let errors = {
        let addresses = other_domain.get_mut(ADDRESS_TYPE_URL).expect("addresses");
        let mut w = pod("elsewhere", [10, 1, 0, 60], TunnelProtocol::Hbone, "n1");
        w.trust_domain = "example.org".into();
        addresses.insert(
            "Kubernetes//Pod/shop/elsewhere".into(),
            any(ADDRESS_TYPE_URL, &Address { r#type: Some(address::Type::Workload(w)) }),
        );
        model_from_xds(&other_domain, "cluster.local").expect_err("refused")
    };
    assert!(errors[0].contains("trust_domain") && errors[0].contains("example.org"), "{errors:?}");
}
