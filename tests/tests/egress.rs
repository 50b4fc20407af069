//! End to end: traffic from the mesh to hosts outside it (SPEC GW-3, L4-3, L4-5): ServiceEntries
//! resolved through DNS (a resolver of ours, `strait-echo dns`, that the node proxy and the
//! client pod reach through resolv.conf files of their own), STATIC endpoints, NONE with
//! addresses, wildcard hosts, and `outboundTrafficPolicy.mode: REGISTRY_ONLY` from Istio's mesh
//! ConfigMap, switched on reload. The "external" servers are pods of the topology that no
//! configuration names, on a node without a proxy: nothing of the mesh runs for them. Needs root.

mod common;

use std::{io, time::Duration};

use common::{MESH, TIMEOUT, TwoNodes, apply, ca_dir, registry_only_refusals, start_node, wait_access_line};
use strait_testbed::{CurlResult, EchoKind, Pod, bin_path, k8s};

/// The mesh namespace and its client pod.
fn mesh(t: &TwoNodes) -> String {
    [
        k8s::namespace_yaml(MESH, &[("istio.io/dataplane-mode", "ambient")]),
        k8s::pod_yaml(&t.client, MESH, "client", &[]),
    ]
    .concat()
}

fn get(client: &Pod, url: &str) -> io::Result<CurlResult> {
    client.curl(url, Duration::from_secs(5))
}

/// Sends bytes through a TCP echo server at `target` from `pod` and checks they come back.
fn tcp_round_trip(pod: &Pod, target: &str) -> io::Result<bool> {
    let out = pod.run(bin_path("strait-echo"), &["send", target, "--bytes", "10000", "--timeout-secs", "5"])?;
    Ok(out.status.success())
}

// GW-3, L4-5: a DNS ServiceEntry host resolves (for the app and for the node proxy) to an
// external server; the connection is known as that service and leaves in plain TCP. Under
// REGISTRY_ONLY a host without an entry is refused (reset, counted, access line with the reason);
// switching the mesh config to ALLOW_ANY on reload admits it, and back to REGISTRY_ONLY refuses it
// again.
#[test]
fn dns_service_entry_and_registry_only_switched_on_reload() -> io::Result<()> {
    let t = TwoNodes::new("egress::dns")?;
    let other = t.topo.add_pod(&t.n2, "other")?;
    let resolver = t.topo.add_pod(&t.n2, "resolver")?;
    let _cnn = t.server.echo_server(EchoKind::Http, 80).name("cnn-stand-in").start()?;
    let _other = other.echo_server(EchoKind::Http, 80).name("unlisted-server").start()?;
    let _dns = resolver
        .start_dns(&[format!("edition.cnn.com={}", t.server.ip()), format!("unlisted.example.com={}", other.ip())])?;
    for netns in [t.n1.netns(), t.client.netns()] {
        netns.use_resolver(resolver.ip())?;
    }
    // The seed's ServiceEntry, verbatim (seed 002).
    let entry = "apiVersion: networking.istio.io/v1alpha3\nkind: ServiceEntry\nmetadata:\n  name: cnn\n  namespace: mesh\n\
                 spec:\n  hosts:\n  - edition.cnn.com\n  ports:\n  - number: 80\n    name: http-port\n    protocol: HTTP\n  \
                 - number: 443\n    name: https\n    protocol: HTTPS\n  resolution: DNS\n";
    t.topo.write_config("mesh.yaml", &mesh(&t))?;
    t.topo.write_config("entry.yaml", entry)?;
    t.topo.write_config("meshconfig.yaml", &k8s::mesh_config_yaml("REGISTRY_ONLY"))?;
    let p1 = start_node(&t.topo, &t.n1, &ca_dir(&t.topo, "ca"), &[])?;
    p1.wait_for_log("ServiceEntry host resolved", TIMEOUT)?;

    let reply = get(&t.client, "http://edition.cnn.com/politics")?;
    assert!(reply.ok() && reply.body.contains("hello from cnn-stand-in"), "{reply:?}");
    let line = wait_access_line(&p1, &["outbound", "dst.service=edition.cnn.com"], TIMEOUT)?;
    assert!(line.contains("result=ok") && line.contains("security=none"), "plain TCP, never HBONE: {line}");

    let refused = get(&t.client, "http://unlisted.example.com/")?;
    assert_eq!(refused.status, 0, "refused: {refused:?}");
    let other_addr = format!("dst.addr={}:80", other.ip());
    let line = wait_access_line(&p1, &["outbound", &other_addr, "result=refused"], TIMEOUT)?;
    assert!(line.contains("REGISTRY_ONLY"), "{line}");
    assert_eq!(registry_only_refusals(&t.n1)?, 1);

    apply(&t.topo, &[&p1], "meshconfig.yaml", &k8s::mesh_config_yaml("ALLOW_ANY"))?;
    let reply = get(&t.client, "http://unlisted.example.com/")?;
    assert!(reply.ok() && reply.body.contains("hello from unlisted-server"), "ALLOW_ANY: {reply:?}");
    assert!(get(&t.client, "http://edition.cnn.com/")?.ok(), "the entry's host still works");

    apply(&t.topo, &[&p1], "meshconfig.yaml", &k8s::mesh_config_yaml("REGISTRY_ONLY"))?;
    assert_eq!(get(&t.client, "http://unlisted.example.com/")?.status, 0, "REGISTRY_ONLY again");
    assert!(get(&t.client, "http://edition.cnn.com/")?.ok());
    assert_eq!(registry_only_refusals(&t.n1)?, 2);
    // The resolver was asked by the node proxy, not only by the app (it knows the host's address).
    assert!(_dns.log().lines().any(|l| l.contains("edition.cnn.com type 1") && l.contains(&t.n1.ip().to_string())));
    Ok(())
}

// GW-3, L4-3, L4-5: STATIC endpoints behind a VIP (with targetPort), NONE with an address, and a
// wildcard host of resolution NONE (any address on its port), all admitted under REGISTRY_ONLY
// and known as their service; the same server on an undeclared port is refused.
#[test]
fn static_none_and_wildcard_entries() -> io::Result<()> {
    let t = TwoNodes::new("egress::static")?;
    let legacy = t.topo.add_pod(&t.n2, "legacy")?;
    let far = t.topo.add_pod(&t.n2, "far")?;
    let _db = t.server.echo_server(EchoKind::Http, 8080).name("static-endpoint").start()?;
    let _legacy = legacy.echo_server(EchoKind::Http, 80).name("legacy-host").start()?;
    let _far_tcp = far.start_echo_server(EchoKind::Tcp, 9000)?;
    let _far_http = far.echo_server(EchoKind::Http, 80).name("far").start()?;
    let entries = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: db, namespace: mesh}}\nspec:\n  \
         hosts: [db.internal.example]\n  addresses: [240.240.0.10]\n  ports: [{{number: 80, name: http, protocol: HTTP, \
         targetPort: 8080}}]\n  location: MESH_EXTERNAL\n  resolution: STATIC\n  endpoints: [{{address: {}}}]\n---\n\
         apiVersion: networking.istio.io/v1beta1\nkind: ServiceEntry\nmetadata: {{name: legacy, namespace: mesh}}\n\
         spec:\n  hosts: [legacy.example.com]\n  addresses: [{}/32]\n  ports: [{{number: 80, name: http}}]\n  \
         resolution: NONE\n---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: wild, \
         namespace: mesh}}\nspec:\n  hosts: [\"*.example.org\"]\n  ports: [{{number: 9000, name: tcp, protocol: TCP}}]\n",
        t.server.ip(),
        legacy.ip()
    );
    t.topo.write_config("mesh.yaml", &mesh(&t))?;
    t.topo.write_config("entries.yaml", &entries)?;
    t.topo.write_config("meshconfig.yaml", &k8s::mesh_config_yaml("REGISTRY_ONLY"))?;
    let p1 = start_node(&t.topo, &t.n1, &ca_dir(&t.topo, "ca"), &[])?;

    let reply = get(&t.client, "http://240.240.0.10/")?;
    assert!(reply.ok() && reply.body.contains("hello from static-endpoint"), "VIP to the endpoint: {reply:?}");
    let line = wait_access_line(&p1, &["dst.service=db.internal.example"], TIMEOUT)?;
    assert!(line.contains(&format!("dst.addr={}:8080", t.server.ip())) && line.contains("result=ok"), "{line}");
    let direct = get(&t.client, &format!("http://{}:8080/", t.server.ip()))?;
    assert!(direct.ok(), "the endpoint's own address is the entry's too: {direct:?}");

    let reply = get(&t.client, &format!("http://{}/", legacy.ip()))?;
    assert!(reply.ok() && reply.body.contains("hello from legacy-host"), "{reply:?}");
    wait_access_line(&p1, &["dst.service=legacy.example.com", "result=ok"], TIMEOUT)?;

    assert!(tcp_round_trip(&t.client, &format!("{}:9000", far.ip()))?, "the wildcard entry's port");
    wait_access_line(&p1, &["dst.service=*.example.org", "result=ok"], TIMEOUT)?;
    let refused = get(&t.client, &format!("http://{}/", far.ip()))?;
    assert_eq!(refused.status, 0, "port 80 of that host is in no entry: {refused:?}");
    wait_access_line(&p1, &[&format!("dst.addr={}:80", far.ip()), "result=refused"], TIMEOUT)?;
    Ok(())
}

// GW-3: the `mesh` route of a VirtualService for a ServiceEntry host, decidable per connection
// (port and gateways, a DestinationRule subset), is applied by the node proxy: the pod's
// connection to the external host goes over HBONE to the route's destination, a mesh service
// standing in for the egress gateway; a port the route does not match still goes out directly.
#[test]
fn mesh_route_of_an_external_host_redirects_to_a_mesh_service() -> io::Result<()> {
    let t = TwoNodes::new("egress::redirect")?;
    let external = t.topo.add_pod(&t.n2, "external")?;
    let resolver = t.topo.add_pod(&t.n2, "resolver")?;
    let _relay = t.server.echo_server(EchoKind::Http, 8080).name("relay-v1").start()?;
    let _ext80 = external.echo_server(EchoKind::Http, 80).name("external-80").start()?;
    let _ext81 = external.echo_server(EchoKind::Http, 81).name("external-81").start()?;
    let _dns = resolver.start_dns(&[format!("edition.cnn.com={}", external.ip())])?;
    for netns in [t.n1.netns(), t.client.netns()] {
        netns.use_resolver(resolver.ip())?;
    }
    let routing = "apiVersion: v1\nkind: Service\nmetadata: {name: relay, namespace: mesh}\nspec:\n  clusterIP: \
                   10.96.7.7\n  selector: {app: server}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n---\n\
                   apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: cnn, namespace: mesh}\n\
                   spec:\n  hosts: [edition.cnn.com]\n  ports: [{number: 80, name: http, protocol: HTTP}, {number: 81, \
                   name: http-alt, protocol: HTTP}]\n  resolution: DNS\n---\napiVersion: networking.istio.io/v1\nkind: \
                   DestinationRule\nmetadata: {name: relay, namespace: mesh}\nspec:\n  host: relay.mesh.svc.cluster.local\n  \
                   subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]\n---\napiVersion: \
                   networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: cnn, namespace: mesh}\nspec:\n  hosts: \
                   [edition.cnn.com]\n  gateways: [mesh]\n  http:\n  - match: [{gateways: [mesh], port: 80}]\n    route:\n    \
                   - destination: {host: relay.mesh.svc.cluster.local, subset: v1, port: {number: 80}}\n      weight: 100\n";
    t.topo.write_config("c.yaml", &t.config("server", &[("version", "v1")]))?;
    t.topo.write_config("routing.yaml", routing)?;
    t.topo.write_config("meshconfig.yaml", &k8s::mesh_config_yaml("REGISTRY_ONLY"))?;
    let (p1, p2) = t.start_proxies(&[])?;
    p1.wait_for_log("ServiceEntry host resolved", TIMEOUT)?;

    let reply = get(&t.client, "http://edition.cnn.com/politics")?;
    assert!(reply.ok() && reply.body.contains("hello from relay-v1"), "redirected to the mesh service: {reply:?}");
    let line = wait_access_line(&p1, &["outbound", "dst.service=relay.mesh.svc.cluster.local"], TIMEOUT)?;
    assert!(line.contains("security=mutual_tls") && line.contains("dst.workload=mesh/server"), "{line}");
    wait_access_line(&p2, &["inbound", "src.identity=spiffe://cluster.local/ns/mesh/sa/client"], TIMEOUT)?;

    let direct = get(&t.client, "http://edition.cnn.com:81/")?;
    assert!(direct.ok() && direct.body.contains("hello from external-81"), "no route for port 81: {direct:?}");
    wait_access_line(&p1, &["outbound", "dst.service=edition.cnn.com", "security=none"], TIMEOUT)?;
    Ok(())
}
