//! End to end: egress settings through `strait control` (L4-5, GW-3, CFG-2): a node proxy that
//! follows the control plane instead of a directory gets Istio's mesh config over xDS and refuses
//! destinations outside the registry under REGISTRY_ONLY, admits a ServiceEntry's address, and
//! follows a switch back to ALLOW_ANY. Needs root.

mod common;

use std::{
    io,
    time::{Duration, Instant},
};

use common::{Control, MESH, TwoNodes, wait_access_line};
use strait_testbed::{EchoKind, Pod, k8s};

/// Whether `client` gets an answer from `url` within a second or two.
fn answered(client: &Pod, url: &str) -> io::Result<bool> {
    Ok(client.curl(url, Duration::from_secs(2))?.ok())
}

#[test]
fn registry_only_reaches_node_proxies_over_xds() -> io::Result<()> {
    let t = TwoNodes::new("egressxds::registry")?;
    let control = Control::new(&t.topo, t.topo.add_node("control")?);
    let (partner, elsewhere) = (t.topo.add_pod(&t.n2, "partner")?, t.topo.add_pod(&t.n2, "elsewhere")?);
    let _partner = partner.echo_server(EchoKind::Http, 80).name("partner").start()?;
    let _elsewhere = elsewhere.echo_server(EchoKind::Http, 80).name("elsewhere").start()?;
    let entry = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: partner, namespace: {MESH}}}\n\
         spec:\n  hosts: [api.partner.example]\n  addresses: [{}/32]\n  ports: [{{number: 80, name: http}}]\n  \
         resolution: NONE\n",
        partner.ip()
    );
    let base = [
        k8s::namespace_yaml(MESH, &[("istio.io/dataplane-mode", "ambient")]),
        k8s::pod_yaml(&t.client, MESH, "client", &[("app", "client")]),
        "---\n".to_owned(),
        entry,
    ]
    .concat();
    t.topo.write_config("mesh.yaml", &base)?;
    t.topo.write_config("meshconfig.yaml", &k8s::mesh_config_yaml("REGISTRY_ONLY"))?;
    let _ctl = control.start(&t.topo, &[])?;
    let p1 = control.start_node(&t.topo, &t.n1)?;

    let (partner_url, elsewhere_url) = (format!("http://{}/", partner.ip()), format!("http://{}/", elsewhere.ip()));
    // The mesh config is optional for the first configuration: wait until it is in force.
    let deadline = Instant::now() + Duration::from_secs(10);
    while answered(&t.client, &elsewhere_url)? {
        assert!(Instant::now() < deadline, "REGISTRY_ONLY never reached the node proxy:\n{}", p1.log_tail());
        std::thread::sleep(Duration::from_millis(200));
    }
    let line = wait_access_line(&p1, &[&format!("dst.addr={}:80", elsewhere.ip()), "result=refused"], common::TIMEOUT)?;
    assert!(line.contains("REGISTRY_ONLY"), "{line}");
    assert!(answered(&t.client, &partner_url)?, "the ServiceEntry's address is admitted");
    wait_access_line(&p1, &["dst.service=api.partner.example", "result=ok"], common::TIMEOUT)?;

    // ALLOW_ANY written to the control plane's directory reaches the node proxy.
    t.topo.write_config("meshconfig.yaml", &k8s::mesh_config_yaml("ALLOW_ANY"))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !answered(&t.client, &elsewhere_url)? {
        assert!(Instant::now() < deadline, "ALLOW_ANY never reached the node proxy:\n{}", p1.log_tail());
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
