//! `deploy/` against a real kube-apiserver and etcd (OPS-2): `kubectl apply -k` installs it
//! (server-side apply, the API server's schemas and RBAC), the rendered objects pass
//! `kubernetes-validate`, each component can do its job with exactly its RBAC rules and is
//! refused one step beyond them, the control plane's replicas elect one leader and fail over,
//! and the node proxy runs with exactly the capabilities the DaemonSet gives it. The CRDs of
//! `deploy/crds` have their own file, `kube_crds.rs`.
//!
//! The API server is 1.20 (`cargo xtask setup` builds it), which serves PodDisruptionBudget only
//! as policy/v1beta1 and has no DaemonSet surge: it gets `deploy/k8s-1.20/`, which swaps exactly
//! those two in; `deploy/` itself is checked by `kubernetes-validate` for current releases.

mod common;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use strait_testbed::kube::{self, KubeApi, KubeControl, workspace_dir};
use strait_testbed::{EchoKind, Node, Process};

const CONTROL_SA: &str = "system:serviceaccount:strait-system:strait-control";
const NODE_SA: &str = "system:serviceaccount:strait-system:strait-node";
/// client-go's lease timings, as `control/leader.rs` uses them: a dead leader is replaced within
/// the 15 s lease plus one 2 s retry; the margin is for a loaded machine.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);
const READY_TIMEOUT: Duration = Duration::from_secs(60);

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

#[test]
fn rendered_manifests_pass_kubernetes_validate() -> io::Result<()> {
    let dir = std::env::temp_dir().join(format!("strait-kube-deploy-validate-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let current = kube::kustomize(&workspace_dir().join("deploy"))?;
    let kinds = current.lines().filter(|l| l.starts_with("kind: ")).count();
    assert_eq!(kinds, 18, "deploy/ renders 7 CRDs and 11 other objects:\n{current}");
    // The newest release kubernetes-validate knows, and the oldest (1.25: it has none older;
    // 1.20 is checked by the real 1.20 API server in `apply_k_installs_and_rbac_is_least_privilege`).
    for version in ["1.37.0", "1.25.0"] {
        let (ok, report) = kube::kubernetes_validate(&current, version, &dir)?;
        assert!(ok, "deploy/ fails kubernetes-validate {version}:\n{report}");
    }
    // The validator does refuse what a cluster would: a misspelt field of the DaemonSet.
    let broken = current.replacen("hostNetwork: true", "hostNetwrok: true", 1);
    assert_ne!(broken, current);
    let (ok, report) = kube::kubernetes_validate(&broken, "1.37.0", &dir)?;
    assert!(!ok && report.contains("hostNetwrok"), "a misspelt field passed kubernetes-validate:\n{report}");

    // What the node proxy gets: no API token at all, the istio-ca token, host network, and
    // only the capabilities named in node.yaml.
    for needle in [
        "automountServiceAccountToken: false",
        "audience: istio-ca",
        "hostNetwork: true",
        "fieldPath: spec.nodeName",
        "terminationGracePeriodSeconds: 35",
        "maxSurge: 1",
        "maxUnavailable: 0",
        "- BPF\n",
        "image: ghcr.io/strait-mesh/strait:0.1.0",
    ] {
        assert!(current.contains(needle), "deploy/ renders without `{needle}`");
    }
    assert!(!current.contains("privileged: true"), "the node proxy runs privileged");
    fs::remove_dir_all(&dir)?;
    Ok(())
}

/// A token of `service_account` in strait-system from the TokenRequest API.
fn token(api: &KubeApi, service_account: &str, audience: &str) -> io::Result<String> {
    api.service_account_token("strait-system", service_account, audience, None, 3600)
}

fn assert_forbidden((ok, text): (bool, String), what: &str) {
    assert!(!ok && text.contains("forbidden"), "{what} was not forbidden: {text}");
}

#[test]
fn apply_k_installs_and_rbac_is_least_privilege() -> io::Result<()> {
    let api = KubeApi::start_without_crds()?;
    api.install_deploy()?;
    // Applying again changes nothing and conflicts with nothing (an upgrade is the same command);
    // plain (client-side) `kubectl apply -k` is accepted as well.
    api.install_deploy()?;
    let overlay = workspace_dir().join("deploy/k8s-1.20");
    api.kubectl(&["apply", "--dry-run=server", "-k", &overlay.to_string_lossy()])?;
    // deploy/ itself asks 1.20 for what it does not serve, which is why deploy/k8s-1.20 exists.
    let deploy = workspace_dir().join("deploy");
    let refused =
        api.kubectl_fails(&["apply", "--server-side", "--dry-run=server", "-k", &deploy.to_string_lossy()])?;
    assert!(refused.contains("policy/v1"), "deploy/ on 1.20: {refused}");
    // The install guide's CA step: `strait ctl ca init`, then the `cacerts` Secret from its files.
    let ca = api.dir().join("guide-cacerts");
    let init =
        Command::new(strait_testbed::bin_path("strait")).args(["ctl", "ca", "init", "--dir"]).arg(&ca).output()?;
    assert!(init.status.success(), "ca init: {}", String::from_utf8_lossy(&init.stderr));
    assert!(String::from_utf8_lossy(&init.stdout).contains("now holds a new mesh CA"));
    api.kubectl(&[
        "create",
        "secret",
        "generic",
        "cacerts",
        "-n",
        "strait-system",
        "--from-file",
        &ca.to_string_lossy(),
    ])?;
    let keys = json(&api.kubectl(&["get", "secret", "cacerts", "-n", "strait-system", "-o", "json"])?);
    let mut names: Vec<&str> =
        keys["data"].as_object().map(|d| d.keys().map(String::as_str).collect()).unwrap_or_default();
    names.sort_unstable();
    assert_eq!(names, ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem"]);
    for (kind, name) in [
        ("daemonset", "strait-node"),
        ("deployment", "strait-control"),
        ("service", "strait-control"),
        ("poddisruptionbudget", "strait-control"),
        ("serviceaccount", "strait-control"),
        ("serviceaccount", "strait-node"),
        ("role", "strait-control-leader"),
        ("rolebinding", "strait-control-leader"),
    ] {
        api.kubectl(&["get", "-n", "strait-system", kind, name])?;
    }
    for crd in ["virtualservices.networking.istio.io", "authorizationpolicies.security.istio.io"] {
        let got = json(&api.kubectl(&["get", "crd", crd, "-o", "json"])?);
        let versions = got["spec"]["versions"].as_array().cloned().unwrap_or_default();
        let storage: Vec<&str> =
            versions.iter().filter(|v| v["storage"] == true).filter_map(|v| v["name"].as_str()).collect();
        let expected = if crd.contains("networking") { "v1alpha3" } else { "v1beta1" };
        assert_eq!(storage, [expected], "{crd}: storage version as Istio's");
    }

    // The Gateway API is the cluster's, not strait's (kubectl resolves resource names by
    // discovery, so it must be served for `auth can-i` to ask about it).
    let gateway_api = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/kube/gateway-api-crds.yaml");
    api.kubectl(&["apply", "-f", &gateway_api.to_string_lossy()])?;
    api.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd",
        "-l",
        "app.kubernetes.io/part-of=strait-tests",
    ])?;

    // The control plane: what it reads and writes, and one step beyond each.
    let cluster = [
        ("list", "pods", true),
        ("watch", "namespaces", true),
        ("watch", "services", true),
        ("watch", "endpointslices.discovery.k8s.io", true),
        ("watch", "virtualservices.networking.istio.io", true),
        ("watch", "authorizationpolicies.security.istio.io", true),
        ("watch", "gateways.gateway.networking.k8s.io", true),
        ("patch", "gateways.gateway.networking.k8s.io#status", true),
        ("create", "tokenreviews.authentication.k8s.io", true),
        ("create", "events", true),
        ("create", "deployments.apps", true),
        ("patch", "configmaps", true),
        ("get", "secrets", false),
        ("list", "configmaps", false),
        ("delete", "pods", false),
        ("delete", "deployments.apps", false),
        ("update", "services", false),
        ("update", "pods", false),
        ("create", "virtualservices.networking.istio.io", false),
        ("update", "gateways.gateway.networking.k8s.io", false),
        ("create", "networkpolicies.networking.k8s.io", false),
        ("create", "clusterroles.rbac.authorization.k8s.io", false),
        ("create", "pods#exec", false),
        ("create", "serviceaccounts#token", false),
        ("update", "gateways.gateway.networking.k8s.io#finalizers", false),
    ];
    for (verb, resource, allowed) in cluster {
        assert_eq!(api.can_i(CONTROL_SA, verb, resource, "default")?, allowed, "control: {verb} {resource}");
    }
    assert!(api.can_i(CONTROL_SA, "create", "leases.coordination.k8s.io", "strait-system")?);
    assert!(api.can_i(CONTROL_SA, "update", "leases.coordination.k8s.io/strait-control", "strait-system")?);
    assert!(!api.can_i(CONTROL_SA, "update", "leases.coordination.k8s.io/kube-scheduler", "strait-system")?);
    assert!(!api.can_i(CONTROL_SA, "create", "leases.coordination.k8s.io", "kube-system")?);
    // The node proxy: nothing at all.
    for (verb, resource) in
        [("list", "pods"), ("get", "configmaps"), ("create", "tokenreviews.authentication.k8s.io"), ("get", "secrets")]
    {
        assert!(!api.can_i(NODE_SA, verb, resource, "default")?, "node: {verb} {resource}");
    }

    // Real calls with the components' own tokens.
    api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n")?;
    api.apply(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\nspec:\n  containers: [{name: web, image: \
         example.invalid/web:1}]\n",
    )?;
    let control = api.control_plane_token()?;
    let node = token(&api, "strait-node", "istio-ca")?;
    let (ok, text) = api.kubectl_as(&control, &["get", "pods", "-A"], None)?;
    assert!(ok && text.contains("web"), "control cannot list pods: {text}");
    let review = format!(
        "apiVersion: authentication.k8s.io/v1\nkind: TokenReview\nspec:\n  token: {node}\n  audiences: [istio-ca]\n"
    );
    let (ok, text) = api.kubectl_as(&control, &["create", "-f", "-", "-o", "json"], Some(&review))?;
    assert!(ok, "control cannot review tokens: {text}");
    let reviewed = json(&text);
    assert_eq!(reviewed["status"]["authenticated"], true, "{text}");
    assert_eq!(reviewed["status"]["user"]["username"], NODE_SA, "{text}");
    let event = "apiVersion: v1\nkind: Event\nmetadata: {name: web.strait-test, namespace: shop}\ninvolvedObject: \
                 {kind: Pod, name: web, namespace: shop}\nreason: Test\nmessage: from the control plane's \
                 account\ntype: Warning\nsource: {component: strait-control}\n";
    let (ok, text) = api.kubectl_as(&control, &["create", "-f", "-"], Some(event))?;
    assert!(ok, "control cannot create events: {text}");
    assert_forbidden(
        api.kubectl_as(&control, &["get", "secrets", "-n", "strait-system"], None)?,
        "control reading secrets",
    );
    assert_forbidden(
        api.kubectl_as(&control, &["delete", "pod", "web", "-n", "shop"], None)?,
        "control deleting a pod",
    );
    let policy = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: shop}\n\
                  spec: {podSelector: {}}\n";
    assert_forbidden(
        api.kubectl_as(&control, &["create", "-f", "-"], Some(policy))?,
        "control writing NetworkPolicies",
    );
    assert_forbidden(api.kubectl_as(&node, &["get", "pods", "-n", "shop"], None)?, "node listing pods");
    assert_forbidden(api.kubectl_as(&node, &["get", "secrets", "-n", "strait-system"], None)?, "node reading secrets");
    api.kubectl(&["get", "pod", "web", "-n", "shop"])?;

    // `strait control --kubernetes` with only the control plane's token: it lists and watches
    // everything it reads (it is ready only then) and takes the Lease.
    let kubeconfig = api.token_kubeconfig(&control, "control")?;
    let a = KubeControl::start(&api, &kubeconfig, "replica-a")?;
    a.wait_for("strait control ready", READY_TIMEOUT)?;
    a.wait_for("leader election: leading", READY_TIMEOUT)?;
    assert_eq!(lease_holder(&api)?, "replica-a");
    let log = a.log();
    // An API refusal reads "... is forbidden ..." / `code: 403`; a bare "403" may be part of a
    // resourceVersion or a port.
    let refused = log.to_lowercase().contains("forbidden") || log.contains("code: 403");
    assert!(!refused, "strait control was refused something:\n{log}");
    Ok(())
}

fn lease_holder(api: &KubeApi) -> io::Result<String> {
    let lease = json(&api.kubectl(&["get", "lease", "strait-control", "-n", "strait-system", "-o", "json"])?);
    Ok(lease["spec"]["holderIdentity"].as_str().unwrap_or_default().to_string())
}

/// Waits until the Lease names `holder`; how long it took.
fn wait_for_holder(api: &KubeApi, holder: &str, timeout: Duration) -> io::Result<Duration> {
    let started = Instant::now();
    loop {
        let now = lease_holder(api)?;
        if now == holder {
            return Ok(started.elapsed());
        }
        if started.elapsed() > timeout {
            return Err(io::Error::other(format!("the lease is held by `{now}`, not `{holder}`, after {timeout:?}")));
        }
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn control_replicas_elect_one_leader_and_fail_over() -> io::Result<()> {
    let api = KubeApi::start_without_crds()?;
    api.install_deploy()?;
    let control = api.control_plane_token()?;
    let kubeconfig = api.token_kubeconfig(&control, "control")?;
    let mut a = KubeControl::start(&api, &kubeconfig, "replica-a")?;
    a.wait_for("leader election: leading", READY_TIMEOUT)?;
    let mut b = KubeControl::start(&api, &kubeconfig, "replica-b")?;
    b.wait_for("strait control ready", READY_TIMEOUT)?;
    // Several renewals later, still one leader: a keeps the Lease, b never leads.
    thread::sleep(Duration::from_secs(6));
    assert_eq!(lease_holder(&api)?, "replica-a");
    assert!(!b.log().contains("leader election: leading"), "two leaders:\n{}", b.log());

    // A stopping leader releases the Lease: b takes over at its next try, not a lease later.
    a.signal(libc::SIGTERM);
    a.wait();
    assert!(a.log().contains("released the lease"), "{}", a.log());
    let took = wait_for_holder(&api, "replica-b", Duration::from_secs(10))?;
    b.wait_for("leader election: leading", Duration::from_secs(5))?;
    eprintln!("kube_deploy: failover after a released lease: {:.1}s", took.as_secs_f64());

    // A leader that dies without a word: c takes over once the lease has run out. c reads the
    // mesh CA from a read-only directory, as the control Deployment mounts the `cacerts` Secret.
    let read_only_ca = ReadOnlyMount::new(&api.dir().join("ca-replica-a"), &api.dir().join("ca-replica-c"))?;
    let c = KubeControl::start(&api, &kubeconfig, "replica-c")?;
    c.wait_for("strait control ready", READY_TIMEOUT)?;
    assert_eq!(lease_holder(&api)?, "replica-b");
    b.signal(libc::SIGKILL);
    b.wait();
    let took = wait_for_holder(&api, "replica-c", FAILOVER_TIMEOUT)?;
    c.wait_for("leader election: leading", Duration::from_secs(5))?;
    assert!(took >= Duration::from_secs(5), "c took the lease of a live-looking leader after {took:?}");
    eprintln!("kube_deploy: failover after a killed leader: {:.1}s", took.as_secs_f64());
    let lease = json(&api.kubectl(&["get", "lease", "strait-control", "-n", "strait-system", "-o", "json"])?);
    assert_eq!(lease["spec"]["leaseTransitions"], 2, "{lease}");
    drop(c);
    drop(read_only_ca);
    Ok(())
}

/// A read-only bind mount of `source` on `target` (created), unmounted on drop.
struct ReadOnlyMount {
    target: PathBuf,
}

impl ReadOnlyMount {
    fn new(source: &Path, target: &Path) -> io::Result<ReadOnlyMount> {
        fs::create_dir_all(target)?;
        let run = |args: &[&std::ffi::OsStr]| -> io::Result<()> {
            let out = Command::new("mount").args(args).output()?;
            if out.status.success() {
                Ok(())
            } else {
                Err(io::Error::other(format!("mount {args:?}: {}", String::from_utf8_lossy(&out.stderr))))
            }
        };
        run(&["--bind".as_ref(), source.as_os_str(), target.as_os_str()])?;
        let mount = ReadOnlyMount { target: target.to_path_buf() };
        run(&["-o".as_ref(), "remount,bind,ro".as_ref(), target.as_os_str()])?;
        Ok(mount)
    }
}

impl Drop for ReadOnlyMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.target).status();
    }
}

/// The capabilities deploy/base/node.yaml adds for the node proxy (`add: [BPF, ...]`).
fn daemonset_capabilities() -> io::Result<Vec<String>> {
    let node = fs::read_to_string(workspace_dir().join("deploy/base/node.yaml"))?;
    let line = node
        .lines()
        .find_map(|l| l.trim().strip_prefix("add: ["))
        .ok_or_else(|| io::Error::other("deploy/base/node.yaml adds no capabilities"))?;
    Ok(line.trim_end_matches(']').split(',').map(|c| c.trim().to_ascii_lowercase()).collect())
}

/// `strait node` on `node` (the topology's config, CA directory `ca`) started under `setpriv`
/// with only `caps` in its bounding set, as a container given exactly those capabilities runs.
fn node_with_capabilities(t: &common::TwoNodes, node: &Node, ca: &Path, caps: &[String]) -> io::Result<Process> {
    let strait = strait_testbed::require_bin("strait")?;
    let bounding =
        format!("--bounding-set=-all,{}", caps.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(","));
    let (pins, config) = (node.bpf_pin_dir(), t.topo.config_dir());
    let (strait, pins, config, ca) =
        (strait.to_string_lossy(), pins.to_string_lossy(), config.to_string_lossy(), ca.to_string_lossy());
    let args = [
        bounding.as_str(),
        "--inh-caps=-all",
        strait.as_ref(),
        "node",
        "--node",
        node.name(),
        "--bpf-pin-dir",
        pins.as_ref(),
        "--config",
        config.as_ref(),
        "--ca-dir",
        ca.as_ref(),
        "--detach-on-exit",
    ];
    let proxy =
        node.spawn(&format!("strait-{}-{}", node.name(), caps.join("-")), "setpriv", &args, &[("STRAIT_LOG", "info")])?;
    let deadline = Instant::now() + common::TIMEOUT;
    while proxy.count_log_lines("strait node ready") == 0 {
        if Instant::now() > deadline || !proxy.is_running() {
            return Err(io::Error::other(format!(
                "strait node with {caps:?} did not become ready:\n{}",
                proxy.log_tail()
            )));
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(proxy)
}

/// The capabilities a process holds (`CapEff` of /proc/PID/status), as a bit mask.
fn effective_capabilities(pid: u32) -> io::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:")).map(str::trim).unwrap_or_default();
    u64::from_str_radix(hex, 16).map_err(|e| io::Error::other(format!("CapEff `{hex}`: {e}")))
}

/// The node proxy works with exactly the DaemonSet's capabilities (mTLS between two nodes, the
/// eBPF capture loaded and attached), and without any one of them it does not start: the set is
/// both sufficient and minimal.
#[test]
fn node_proxy_runs_with_exactly_the_daemonset_capabilities() -> io::Result<()> {
    let caps = daemonset_capabilities()?;
    assert_eq!(caps, ["bpf", "perfmon", "net_admin"], "node.yaml changed: update this test's reasons");
    let t = common::TwoNodes::new("kube-deploy::caps")?;
    t.topo.write_config("c.yaml", &t.config("server", &[]))?;
    let _http = t.server.start_echo_server(EchoKind::Http, 8080)?;
    let ca = common::ca_dir(&t.topo, "ca");
    {
        let p1 = node_with_capabilities(&t, &t.n1, &ca, &caps)?;
        let _p2 = node_with_capabilities(&t, &t.n2, &ca, &caps)?;
        // CAP_NET_ADMIN 12, CAP_PERFMON 38, CAP_BPF 39: nothing else.
        assert_eq!(effective_capabilities(p1.pid())?, (1 << 12) | (1 << 38) | (1 << 39));
        let reply = t.client.curl_args(&[&format!("http://{}:8080/", t.server.ip())])?;
        assert!(reply.ok(), "{reply:?}");
        let line = common::wait_access_line(&p1, &["outbound", "security=mutual_tls"], common::TIMEOUT)?;
        assert!(line.contains("result=ok"), "{line}");
    }
    for missing in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
        let started = node_with_capabilities(&t, &t.n1, &ca, &fewer);
        assert!(started.is_err(), "strait node started without CAP_{}", missing.to_ascii_uppercase());
    }
    Ok(())
}
