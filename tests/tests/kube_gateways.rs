//! `deploy/gateways/` against a real kube-apiserver and etcd (GW-1, GW-2, OPS-2): Istio's
//! `istio-ingressgateway` and `istio-egressgateway` in `istio-system`, run by `strait gateway`.
//! The manifests apply (server-side, the API server 1.20 that `cargo xtask setup` builds) and
//! pass `kubernetes-validate` for current releases; the gateways' service accounts hold no API
//! rights at all; `strait control --kubernetes`, with only its own RBAC, writes the mesh's root
//! certificate (`istio-ca-root-cert`) where gateways run and writes it again when it goes; and a
//! `strait gateway` started with the Deployment's own arguments and volumes (materialized as a
//! kubelet would: the ConfigMap, the projected `istio-ca` token, the credential Secret through
//! the patch ingress.yaml documents) follows the control plane and serves an Istio Gateway and
//! VirtualService applied with kubectl, over HTTP and HTTPS, to a mesh pod over HBONE.
//! The e2e test needs root.

mod common;

use std::{
    fs, io,
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use strait_testbed::kube::{self, KubeApi, KubeControl, workspace_dir};
use strait_testbed::{EchoKind, FABRIC_GATEWAY, Pod, Process, Topology, bin_path};

const CONTROL_SA: &str = "system:serviceaccount:strait-system:strait-control";
const GATEWAY_SAS: [&str; 2] = ["istio-ingressgateway", "istio-egressgateway"];
const ROOT_CONFIG_MAP: &str = "istio-ca-root-cert";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn gateways_dir() -> PathBuf {
    workspace_dir().join("deploy/gateways")
}

/// The root certificate of the ConfigMap `istio-ca-root-cert` in `namespace`, once it is `root`.
fn wait_root(api: &KubeApi, namespace: &str, root: &str) -> io::Result<Value> {
    let get = ["get", "configmap", ROOT_CONFIG_MAP, "-n", namespace, "-o", "json"];
    api.wait_json(&get, &format!("{namespace}/{ROOT_CONFIG_MAP}"), common::TIMEOUT, |cm| {
        cm["data"]["root-cert.pem"] == root
    })
}

// GW-1, GW-2, OPS-2: deploy/gateways renders Istio's two gateways, passes kubernetes-validate,
// applies to a real API server (1.20, server-side and client-side, again without change), and the
// gateways' service accounts can do nothing with the API: they need only their istio-ca token,
// which the control plane's TokenReview accepts.
#[test]
fn gateways_apply_validate_and_hold_no_api_rights() -> io::Result<()> {
    let dir = std::env::temp_dir().join(format!("strait-kube-gateways-validate-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let rendered = kube::kustomize(&gateways_dir())?;
    let kinds: Vec<&str> = rendered.lines().filter_map(|l| l.strip_prefix("kind: ")).collect();
    assert_eq!(
        kinds,
        ["Namespace", "ServiceAccount", "ServiceAccount", "Service", "Service", "Deployment", "Deployment"],
        "{rendered}"
    );
    for version in ["1.37.0", "1.25.0"] {
        let (ok, report) = kube::kubernetes_validate(&rendered, version, &dir)?;
        assert!(ok, "deploy/gateways fails kubernetes-validate {version}:\n{report}");
    }
    let broken = rendered.replacen("readOnlyRootFilesystem: true", "readOnlyRootFilesytem: true", 1);
    assert_ne!(broken, rendered);
    let (ok, report) = kube::kubernetes_validate(&broken, "1.37.0", &dir)?;
    assert!(!ok && report.contains("readOnlyRootFilesytem"), "a misspelt field passed:\n{report}");
    fs::remove_dir_all(&dir)?;

    let api = KubeApi::start_without_crds()?;
    api.install_deploy()?;
    let gateways = gateways_dir().to_string_lossy().into_owned();
    api.kubectl(&["apply", "--server-side", "-k", &gateways])?;
    // Again (an upgrade is the same command), and client-side apply is accepted too.
    api.kubectl(&["apply", "--server-side", "-k", &gateways])?;
    api.kubectl(&["apply", "--dry-run=server", "-k", &gateways])?;

    // What each gateway is: Istio's names and labels, the pod never captured, no API token.
    for (name, istio, service_type, ports) in [
        (
            "istio-ingressgateway",
            "ingressgateway",
            "LoadBalancer",
            vec![(15021, 15021, "status-port"), (80, 8080, "http2"), (443, 8443, "https"), (15008, 15008, "mesh")],
        ),
        (
            "istio-egressgateway",
            "egressgateway",
            "ClusterIP",
            vec![(80, 8080, "http2"), (443, 8443, "https"), (15008, 15008, "mesh")],
        ),
    ] {
        let service = json(&api.kubectl(&["get", "service", name, "-n", "istio-system", "-o", "json"])?);
        assert_eq!(service["spec"]["type"], service_type, "{name}");
        assert_eq!(service["spec"]["selector"]["istio"], istio, "{name}");
        let got: Vec<(u64, u64, String)> = service["spec"]["ports"]
            .as_array()
            .expect("ports")
            .iter()
            .map(|p| {
                let n = |f: &str| p[f].as_u64().unwrap_or_default();
                (n("port"), n("targetPort"), p["name"].as_str().unwrap_or_default().to_owned())
            })
            .collect();
        let want: Vec<(u64, u64, String)> = ports.iter().map(|(p, t, n)| (*p, *t, (*n).to_owned())).collect();
        assert_eq!(got, want, "{name}");
        let deployment = json(&api.kubectl(&["get", "deployment", name, "-n", "istio-system", "-o", "json"])?);
        let pod = &deployment["spec"]["template"];
        assert_eq!(pod["metadata"]["labels"]["istio"], istio, "{name}");
        assert_eq!(pod["metadata"]["labels"]["strait.io/gateway"], "true", "{name}");
        assert_eq!(pod["spec"]["serviceAccountName"], name);
        assert_eq!(pod["spec"]["automountServiceAccountToken"], false, "{name}");
        assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true, "{name}");
        let container = &pod["spec"]["containers"][0];
        assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(container["readinessProbe"]["httpGet"]["port"], 15021, "{name}");
        let args: Vec<&str> = container["args"].as_array().expect("args").iter().filter_map(Value::as_str).collect();
        for arg in [
            "gateway",
            &format!("--service-account={name}"),
            "--port-map=80=8080,443=8443",
            "--hbone",
            "--xds-address=https://strait-control.strait-system.svc:15012",
        ] {
            assert!(args.contains(&arg), "{name} runs without {arg}: {args:?}");
        }
        let sa = json(&api.kubectl(&["get", "serviceaccount", name, "-n", "istio-system", "-o", "json"])?);
        assert_eq!(sa["automountServiceAccountToken"], false, "{name}");
    }

    // The Istio kinds are served (install_deploy's CRDs): `auth can-i` resolves them.
    for sa in GATEWAY_SAS {
        let user = format!("system:serviceaccount:istio-system:{sa}");
        for (verb, resource, namespace) in [
            ("get", "configmaps", "istio-system"),
            ("get", "configmaps/istio-ca-root-cert", "istio-system"),
            ("get", "secrets", "istio-system"),
            ("list", "secrets", "istio-system"),
            ("list", "pods", "istio-system"),
            ("list", "services", "default"),
            ("watch", "gateways.networking.istio.io", "default"),
            ("list", "virtualservices.networking.istio.io", "default"),
            ("create", "tokenreviews.authentication.k8s.io", "default"),
            ("create", "serviceaccounts#token", "istio-system"),
            ("create", "events", "istio-system"),
        ] {
            assert!(!api.can_i(&user, verb, resource, namespace)?, "{sa}: may {verb} {resource} in {namespace}");
        }
    }
    // The control plane writes the root certificate and watches it by name, nothing more.
    for (verb, resource, allowed) in [
        ("patch", "configmaps/istio-ca-root-cert", true),
        ("create", "configmaps", true),
        ("watch", "configmaps/istio-ca-root-cert", true),
        ("list", "configmaps/istio-ca-root-cert", true),
        ("list", "configmaps", false),
        ("get", "configmaps/kube-root-ca.crt", false),
        ("delete", "configmaps/istio-ca-root-cert", false),
        ("get", "secrets", false),
    ] {
        assert_eq!(
            api.can_i(CONTROL_SA, verb, resource, "istio-system")?,
            allowed,
            "control: {verb} {resource} in istio-system"
        );
    }

    // Real calls: a gateway's API token is refused everything; its istio-ca token (what the
    // Deployment projects) is reviewed by the control plane's account as the gateway.
    let control = api.control_plane_token()?;
    for sa in GATEWAY_SAS {
        let api_token =
            api.service_account_token("istio-system", sa, "https://kubernetes.default.svc.cluster.local", None, 3600)?;
        for args in [
            ["get", "configmaps", "-n", "istio-system"],
            ["get", "secrets", "-n", "istio-system"],
            ["get", "pods", "-n", "istio-system"],
        ] {
            let (ok, text) = api.kubectl_as(&api_token, &args, None)?;
            assert!(!ok && text.contains("forbidden"), "{sa}: {args:?} was not forbidden: {text}");
        }
        let ca_token = api.service_account_token("istio-system", sa, "istio-ca", None, 3600)?;
        let review = format!(
            "apiVersion: authentication.k8s.io/v1\nkind: TokenReview\nspec:\n  token: {ca_token}\n  audiences: [istio-ca]\n"
        );
        let (ok, text) = api.kubectl_as(&control, &["create", "-f", "-", "-o", "json"], Some(&review))?;
        assert!(ok, "{text}");
        let reviewed = json(&text);
        assert_eq!(reviewed["status"]["authenticated"], true, "{text}");
        assert_eq!(reviewed["status"]["user"]["username"], format!("system:serviceaccount:istio-system:{sa}"));
    }
    Ok(())
}

// GW-1, CFG-3: `strait control --kubernetes`, with exactly its RBAC, writes Istio's
// `istio-ca-root-cert` into istio-system once that namespace exists, and into any namespace
// where a pod labelled strait.io/gateway runs (none elsewhere); a deleted or edited one is
// written again.
#[test]
fn control_writes_the_root_certificate_where_gateways_run() -> io::Result<()> {
    let api = KubeApi::start_without_crds()?;
    api.install_deploy()?;
    let token = api.control_plane_token()?;
    let kubeconfig = api.token_kubeconfig(&token, "control")?;
    // Before istio-system exists: nothing to write there yet, and no retrying meanwhile.
    let control = KubeControl::start(&api, &kubeconfig, "replica-a")?;
    control.wait_for("strait control ready", READY_TIMEOUT)?;
    control.wait_for("namespace istio-system does not exist (yet)", READY_TIMEOUT)?;
    let root = control.root()?;
    assert!(root.starts_with("-----BEGIN CERTIFICATE-----"), "{root}");

    let applied = Instant::now();
    api.kubectl(&["apply", "--server-side", "-k", &gateways_dir().to_string_lossy()])?;
    let cm = wait_root(&api, "istio-system", &root)?;
    eprintln!("kube_gateways: istio-system created -> istio-ca-root-cert written after {:?}", applied.elapsed());
    assert_eq!(cm["metadata"]["labels"]["app.kubernetes.io/managed-by"], "strait", "{cm}");
    let keys: Vec<&String> = cm["data"].as_object().expect("data").keys().collect();
    assert_eq!(keys, ["root-cert.pem"]);

    // Deleted, or edited: written again.
    api.kubectl(&["delete", "configmap", ROOT_CONFIG_MAP, "-n", "istio-system"])?;
    wait_root(&api, "istio-system", &root)?;
    api.kubectl(&[
        "patch",
        "configmap",
        ROOT_CONFIG_MAP,
        "-n",
        "istio-system",
        "--type=merge",
        "-p",
        r#"{"data":{"root-cert.pem":"not a certificate"}}"#,
    ])?;
    wait_root(&api, "istio-system", &root)?;

    // A gateway installed in another namespace gets it there; a namespace whose pods are no
    // gateways (an empty label value is none, as for the model) gets nothing.
    api.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n---\napiVersion: v1\nkind: Namespace\nmetadata: \
         {name: edge}\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: shop\n  labels: \
         {strait.io/gateway: \"\"}\nspec:\n  containers: [{name: web, image: example.invalid/web:1}]\n",
    )?;
    // Pods are watched in order: once edge's ConfigMap is there, shop's pod has been seen.
    api.apply(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: ingress\n  namespace: edge\n  labels: {istio: ingressgateway, \
         strait.io/gateway: \"true\"}\nspec:\n  containers: [{name: gateway, image: example.invalid/strait:1}]\n",
    )?;
    wait_root(&api, "edge", &root)?;
    let shop = api.kubectl(&["get", "configmaps", "-n", "shop", "-o", "name"])?;
    assert!(!shop.contains(ROOT_CONFIG_MAP), "written where no gateway runs: {shop}");
    let log = control.log();
    // An API refusal reads "... is forbidden ..." / `code: 403`; a bare "403" may be part of a
    // resourceVersion or a port.
    let refused = log.to_lowercase().contains("forbidden") || log.contains("code: 403");
    assert!(!refused, "strait control was refused something:\n{log}");
    assert_eq!(log.matches("wrote ConfigMap istio-system/istio-ca-root-cert").count(), 3, "{log}");
    Ok(())
}

/// The kustomize patch ingress.yaml's comment documents for credentialName, as written there.
fn documented_credentials_patch() -> io::Result<String> {
    let ingress = fs::read_to_string(gateways_dir().join("ingress.yaml"))?;
    let mut lines = ingress.lines().skip_while(|l| *l != "#   patches:");
    let mut patch = String::new();
    for line in lines.by_ref() {
        let Some(text) = line.strip_prefix("#   ") else { break };
        patch.push_str(text);
        patch.push('\n');
    }
    if patch.is_empty() {
        return Err(io::Error::other("ingress.yaml documents no `patches:` for credentials"));
    }
    Ok(patch)
}

/// A kustomization in `dir` of deploy/gateways plus the documented credentials patch, with the
/// documented Secret name replaced by `secret` (kustomize wants bases by relative paths).
fn credentials_overlay(dir: &Path, secret: &str) -> io::Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let depth = dir.components().count().saturating_sub(1);
    let base = format!("{}{}", "../".repeat(depth), gateways_dir().to_string_lossy().trim_start_matches('/'));
    let patch = documented_credentials_patch()?.replace("httpbin-credential", secret);
    fs::write(
        dir.join("kustomization.yaml"),
        format!("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n- {base}\n{patch}"),
    )?;
    Ok(dir.to_path_buf())
}

/// The pod labels and service account of the Deployment `name` in istio-system: what its
/// ReplicaSet's pods get.
fn pod_template(api: &KubeApi, name: &str) -> io::Result<(Vec<(String, String)>, String)> {
    let deployment = json(&api.kubectl(&["get", "deployment", name, "-n", "istio-system", "-o", "json"])?);
    let template = &deployment["spec"]["template"];
    let labels = template["metadata"]["labels"]
        .as_object()
        .expect("labels")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect();
    Ok((labels, template["spec"]["serviceAccountName"].as_str().expect("a service account").to_owned()))
}

/// A Secret's key, decoded.
fn secret_key(api: &KubeApi, namespace: &str, name: &str, key: &str) -> io::Result<String> {
    let template = format!("go-template={{{{index .data \"{key}\" | base64decode}}}}");
    api.kubectl(&["get", "secret", name, "-n", namespace, "-o", &template])
}

/// Writes the files of the pod's volume `volume` into `dir` as the kubelet would mount them:
/// a ConfigMap's keys, a projected volume's service-account token (a TokenRequest for the pod,
/// with the volume's audience) and Secret items.
fn materialize(api: &KubeApi, volume: &Value, namespace: &str, sa: &str, pod: &str, dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    if let Some(name) = volume["configMap"]["name"].as_str() {
        let cm = json(&api.kubectl(&["get", "configmap", name, "-n", namespace, "-o", "json"])?);
        for (key, value) in cm["data"].as_object().expect("data") {
            fs::write(dir.join(key), value.as_str().expect("a string"))?;
        }
        return Ok(());
    }
    let sources = volume["projected"]["sources"].as_array().expect("a configMap or projected volume");
    for source in sources {
        let write = |path: &str, text: &str| -> io::Result<()> {
            let file = dir.join(path);
            fs::create_dir_all(file.parent().expect("in dir"))?;
            fs::write(file, text)
        };
        if let Some(token) = source.get("serviceAccountToken") {
            let audience = token["audience"].as_str().expect("an audience");
            let seconds = token["expirationSeconds"].as_u64().map_or(3600, |s| s.min(86400)) as u32;
            let jwt = api.service_account_token(namespace, sa, audience, Some(pod), seconds)?;
            write(token["path"].as_str().expect("a path"), &jwt)?;
        } else if let Some(secret) = source.get("secret") {
            let name = secret["name"].as_str().expect("a Secret name");
            for item in secret["items"].as_array().expect("items") {
                let (key, path) = (item["key"].as_str().expect("key"), item["path"].as_str().expect("path"));
                write(path, &secret_key(api, namespace, name, key)?)?;
            }
        } else {
            panic!("a projected source this test does not know: {source}");
        }
    }
    Ok(())
}

/// `strait gateway` in `pod` exactly as the Deployment `name` runs it, its volumes materialized
/// in the topology's directory and their mount paths replaced by those directories; the one
/// address only a cluster's DNS resolves (the control plane's Service) replaced by `xds`.
fn start_gateway_as_deployed(
    topo: &Topology,
    api: &KubeApi,
    name: &str,
    pod: &Pod,
    pod_name: &str,
    xds: &str,
) -> io::Result<Process> {
    let deployment = json(&api.kubectl(&["get", "deployment", name, "-n", "istio-system", "-o", "json"])?);
    let spec = &deployment["spec"]["template"]["spec"];
    let sa = spec["serviceAccountName"].as_str().expect("a service account");
    let container = &spec["containers"][0];
    let volumes = spec["volumes"].as_array().expect("volumes");
    let mut mounts = Vec::new();
    for mount in container["volumeMounts"].as_array().expect("mounts") {
        let (volume, path) = (mount["name"].as_str().expect("name"), mount["mountPath"].as_str().expect("path"));
        let local = topo.dir().join(format!("{pod_name}-volumes")).join(volume);
        let source = volumes.iter().find(|v| v["name"] == volume).expect("the mount's volume");
        materialize(api, source, "istio-system", sa, pod_name, &local)?;
        mounts.push((path.to_owned(), local.to_string_lossy().into_owned()));
    }
    // $(VAR) of the container's env, as the kubelet expands it (fieldRef: the pod's namespace).
    let mut env = Vec::new();
    for var in container["env"].as_array().into_iter().flatten() {
        let field = var["valueFrom"]["fieldRef"]["fieldPath"].as_str();
        assert_eq!(field, Some("metadata.namespace"), "an env var this test does not know: {var}");
        env.push((format!("$({})", var["name"].as_str().expect("name")), "istio-system".to_owned()));
    }
    let mut used = vec![0; mounts.len() + env.len()];
    let mut xds_replaced = false;
    let args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| {
            let mut arg = a.as_str().expect("a string").to_owned();
            if arg == "--xds-address=https://strait-control.strait-system.svc:15012" {
                arg = format!("--xds-address={xds}");
                xds_replaced = true;
            }
            for (i, (from, to)) in mounts.iter().chain(&env).enumerate() {
                if arg.contains(from.as_str()) {
                    arg = arg.replace(from.as_str(), to);
                    used[i] += 1;
                }
            }
            arg
        })
        .collect();
    // Every volume and variable is used by an argument (the root, the token, the credentials,
    // the namespace), and the control plane's address is the Service's.
    assert!(xds_replaced && used.iter().all(|n| *n == 1), "{used:?} {mounts:?} {args:?}");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let gateway = pod.spawn(name, bin_path("strait"), &args, &[("STRAIT_LOG", "info")])?;
    gateway
        .wait_for_log("strait gateway ready", common::TIMEOUT)
        .map_err(|e| io::Error::other(format!("{e}: {}", gateway.log_tail())))?;
    Ok(gateway)
}

const ROUTES: &str = "apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {name: web-gateway, namespace: web}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [web.example.com]
  - port: {number: 443, name: https, protocol: HTTPS}
    tls: {mode: SIMPLE, credentialName: web-credential}
    hosts: [web.example.com]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: web, namespace: web}
spec:
  hosts: [web.example.com]
  gateways: [web-gateway]
  http:
  - match: [{uri: {prefix: /status}}]
    route: [{destination: {host: httpbin, port: {number: 8000}}}]
";

// GW-1, GW-3, OPS-2: the ingress gateway of deploy/gateways (with the documented credentials
// patch), run with its Deployment's arguments and volumes, follows `strait control --kubernetes`
// (verified with the root certificate the control plane wrote into istio-system, authenticated
// with its projected istio-ca token), serves a Gateway and VirtualService applied with kubectl
// over HTTP and HTTPS (credentialName from a kubernetes.io/tls Secret), and reaches a mesh pod
// over HBONE as istio-system/istio-ingressgateway; a mesh pod reaches it through its Service over
// HBONE; the egress gateway's Deployment starts and gets its own identity the same way.
#[test]
fn ingress_gateway_as_deployed_serves_a_mesh_pod() -> io::Result<()> {
    let topo = Topology::new("kube_gateways::ingress")?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let control = common::Control::new(&topo, topo.add_node("control")?);
    let (gw_pod, client, backend) =
        (topo.add_pod(&n1, "ingress")?, topo.add_pod(&n1, "client")?, topo.add_pod(&n2, "httpbin")?);
    let (mesh_client, egress_pod) = (topo.add_pod(&n2, "sleep")?, topo.add_pod(&n2, "egress")?);
    let api = KubeApi::start_in_netns(topo.fabric().name(), FABRIC_GATEWAY)?;

    // deploy/gateways with the credentials patch of ingress.yaml, and the Secret it names.
    let overlay = credentials_overlay(&topo.dir().join("gateways-overlay"), "web-credential")?;
    api.kubectl(&["apply", "--server-side", "-k", &overlay.to_string_lossy()])?;
    let certs = topo.dir().join("certs");
    fs::create_dir_all(&certs)?;
    common::make_ca(&certs, "ca")?;
    common::make_leaf(&certs, "ca", "web.example.com", &certs.join("web"))?;
    let (crt, key) = (certs.join("web/tls.crt"), certs.join("web/tls.key"));
    api.kubectl(&[
        "create",
        "secret",
        "tls",
        "web-credential",
        "-n",
        "istio-system",
        &format!("--cert={}", crt.display()),
        &format!("--key={}", key.display()),
    ])?;

    // The mesh: httpbin in an enrolled namespace; the gateway's pod as its ReplicaSet makes it.
    api.apply(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: web, labels: {istio.io/dataplane-mode: ambient}}\n---\n\
         apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: httpbin, namespace: web}\n---\n\
         apiVersion: v1\nkind: Service\nmetadata: {name: httpbin, namespace: web}\nspec:\n  clusterIP: 10.96.0.61\n  \
         selector: {app: httpbin}\n  ports: [{name: http, port: 8000, targetPort: 8000}]\n",
    )?;
    common::create_kube_pod(&api, &backend, "httpbin", "web", "httpbin", &[("app", "httpbin")])?;
    api.apply("apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: sleep, namespace: web}\n")?;
    common::create_kube_pod(&api, &mesh_client, "sleep", "web", "sleep", &[("app", "sleep")])?;
    let gw_name = "istio-ingressgateway-6d4b8-x2k9q";
    let (labels, sa) = pod_template(&api, "istio-ingressgateway")?;
    common::create_kube_pod(&api, &gw_pod, gw_name, "istio-system", &sa, &labels)?;

    let control_process = control.start_kubernetes(&topo, &api, &[])?;
    let root = fs::read_to_string(control.ca_dir.join("root-cert.pem"))?;
    wait_root(&api, "istio-system", &root)?;
    let _p1 = control.start_node(&topo, &n1)?;
    let _p2 = control.start_node(&topo, &n2)?;
    let _server = backend.echo_server(EchoKind::Http, 8000).name("httpbin").start()?;
    let gateway = start_gateway_as_deployed(&topo, &api, "istio-ingressgateway", &gw_pod, gw_name, &control.address())?;
    let ip = gw_pod.ip().to_string();
    let ready = client.curl_args(&[&format!("http://{ip}:15021/healthz/ready")])?;
    assert_eq!(ready.status, 200, "{ready:?}");
    // The egress gateway's Deployment starts as well, as its own identity (no credentials).
    let egress_name = "istio-egressgateway-5c7d9-q8w2m";
    let (egress_labels, egress_sa) = pod_template(&api, "istio-egressgateway")?;
    common::create_kube_pod(&api, &egress_pod, egress_name, "istio-system", &egress_sa, &egress_labels)?;
    let egress =
        start_gateway_as_deployed(&topo, &api, "istio-egressgateway", &egress_pod, egress_name, &control.address())?;
    let ready = client.curl_args(&[&format!("http://{}:15021/healthz/ready", egress_pod.ip())])?;
    assert_eq!(ready.status, 200, "{ready:?}\n{}", egress.log_tail());
    control_process.wait_for_log(
        "issued spiffe://cluster.local/ns/istio-system/sa/istio-egressgateway for 86400s to \
         spiffe://cluster.local/ns/istio-system/sa/istio-egressgateway (by Kubernetes token)",
        common::TIMEOUT,
    )?;

    // The Istio resources, applied with kubectl, reach the gateway through the control plane.
    api.apply(ROUTES)?;
    let http = format!("http://{ip}:8080");
    let get = |host: &str, path: &str| client.curl_args(&["-H", &format!("Host: {host}"), &format!("{http}{path}")]);
    let deadline = Instant::now() + common::TIMEOUT;
    while get("web.example.com", "/status/418")?.status != 418 {
        assert!(Instant::now() < deadline, "the Gateway never reached the gateway:\n{}", gateway.log_tail());
        thread::sleep(Duration::from_millis(100));
    }
    let r = get("web.example.com", "/status/200")?;
    assert!(r.ok() && r.body.contains("hello from httpbin"), "{r:?}");
    assert_eq!(get("elsewhere.example.com", "/status/200")?.status, 404);
    assert_eq!(get("web.example.com", "/headers")?.status, 404);
    // The mesh pod was reached over HBONE as the gateway's identity: its node proxy counts the
    // inbound connection (the access line comes only when the gateway's pooled connection closes).
    let deadline = Instant::now() + common::TIMEOUT;
    loop {
        let metrics = n2.run_ok("curl", &["-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"])?;
        let opened = metrics.lines().find(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
        });
        if opened.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "no inbound connection from the gateway's identity:\n{metrics}");
        thread::sleep(Duration::from_millis(200));
    }

    // From inside the mesh, through the Service: the node proxy of the mesh pod dials the gateway
    // pod over HBONE (the Service's `mesh` port), as the mesh pod's identity.
    let service =
        json(&api.kubectl(&["get", "service", "istio-ingressgateway", "-n", "istio-system", "-o", "json"])?);
    let vip = service["spec"]["clusterIP"].as_str().expect("a cluster IP").to_owned();
    let r = mesh_client.curl_args(&["-H", "Host: web.example.com", &format!("http://{vip}/status/200")])?;
    assert!(r.ok() && r.body.contains("hello from httpbin"), "{r:?}\n{}", gateway.log_tail());
    let line = gateway.wait_for_log("src.identity=spiffe://cluster.local/ns/web/sa/sleep", common::TIMEOUT)?;
    assert!(line.contains("path=\"/status/200\""), "{line}");

    // HTTPS with the certificate of the kubernetes.io/tls Secret, as the kubelet mounts it.
    let resolve = format!("web.example.com:8443:{ip}");
    let cacert = certs.join("ca.crt").to_string_lossy().into_owned();
    let https =
        client.curl_args(&["--resolve", &resolve, "--cacert", &cacert, "https://web.example.com:8443/status/418"])?;
    assert_eq!(https.status, 418, "{https:?}\n{}", gateway.log_tail());
    let wrong_ca = client.curl_args(&[
        "--resolve",
        &resolve,
        "--cacert",
        &control.ca_dir.join("root-cert.pem").to_string_lossy(),
        "https://web.example.com:8443/status/418",
    ])?;
    assert_eq!(wrong_ca.status, 0, "verified against another CA: {wrong_ca:?}");
    Ok(())
}
