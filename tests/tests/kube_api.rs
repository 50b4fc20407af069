//! Self-test of the Kubernetes harness (`strait_testbed::kube`): a real kube-apiserver on a real
//! etcd serves the objects strait reads, watches see changes, TokenReview verifies
//! service-account tokens, instances run side by side, and nothing is left after drop or panic.
//! Needs `cargo xtask setup` (builds kube-apiserver once per machine) and etcd.

use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::{Duration, Instant};

use serde_json::Value;
use strait_testbed::kube::KubeApi;
use strait_testbed::{FABRIC_GATEWAY, Topology};

const TIMEOUT: Duration = Duration::from_secs(20);

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn pid_alive(pid: u32) -> bool {
    // A zombie (killed, not yet reaped) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(false)
}

const OBJECTS: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: demo, labels: {app: web}}
spec:
  serviceAccountName: web
  containers: [{name: web, image: example.invalid/web:1, ports: [{containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: demo}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
";

const POLICY: &str = "\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: demo}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]
    to: [{operation: {methods: [GET], paths: [/api/*]}}]
";

#[test]
fn objects_watches_crds_and_token_review() -> io::Result<()> {
    let started = Instant::now();
    let api = KubeApi::start()?;
    eprintln!(
        "kube_api: API server ready in {:.2}s, with CRDs installed {:.2}s after start",
        api.apiserver_start_time().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    api.add_node("node-a", "10.0.0.1")?;

    // Watch all pods from the start, through the raw API as a client library does, and through
    // `kubectl get -w` as a person does.
    api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n")?;
    let list = json(&api.kubectl(&["get", "--raw", "/api/v1/namespaces/demo/pods"])?);
    let rv = list["metadata"]["resourceVersion"].as_str().expect("list has a resourceVersion").to_string();
    let mut raw_watch =
        api.watch(&["get", "--raw", &format!("/api/v1/namespaces/demo/pods?watch=1&resourceVersion={rv}")])?;
    let mut kubectl_watch =
        api.watch(&["get", "pods", "-n", "demo", "--watch", "--output-watch-events", "-o", "json"])?;

    api.apply(OBJECTS)?;
    api.bind_pod("demo", "web-0", "node-a")?;
    api.set_pod_status("demo", "web-0", "10.244.0.5", "10.0.0.1")?;
    api.kubectl(&["label", "pod", "-n", "demo", "web-0", "version=v2"])?;

    let seen = raw_watch.wait_for(
        &["\"type\":\"ADDED\"", "\"nodeName\":\"node-a\"", "\"podIP\":\"10.244.0.5\"", "\"version\":\"v2\""],
        TIMEOUT,
    )?;
    // The raw watch is one JSON event per line; the last one carries everything.
    let last = json(seen.lines().rfind(|l| l.starts_with('{')).expect("a watch event"));
    assert_eq!(last["type"], "MODIFIED");
    assert_eq!(last["object"]["status"]["phase"], "Running");
    assert_eq!(last["object"]["status"]["hostIP"], "10.0.0.1");
    kubectl_watch.wait_for(&["\"10.244.0.5\"", "\"v2\"", "MODIFIED"], TIMEOUT)?;

    let ns = json(&api.kubectl(&["get", "namespace", "demo", "-o", "json"])?);
    assert_eq!(ns["metadata"]["labels"]["istio.io/dataplane-mode"], "ambient");
    let svc = json(&api.kubectl(&["get", "service", "-n", "demo", "web", "-o", "json"])?);
    let cluster_ip = svc["spec"]["clusterIP"].as_str().expect("a cluster IP was allocated");
    assert!(cluster_ip.starts_with("10.96."), "cluster IP {cluster_ip} outside the service range");
    let node = json(&api.kubectl(&["get", "node", "node-a", "-o", "json"])?);
    assert_eq!(node["status"]["addresses"][0]["address"], "10.0.0.1");

    // A CRD kind: watched, stored, validated against its schema, served in every version.
    let mut policy_watch =
        api.watch(&["get", "authorizationpolicies.security.istio.io", "-A", "--watch", "-o", "json"])?;
    api.apply(POLICY)?;
    policy_watch.wait_for(&["\"allow-web\"", "cluster.local/ns/demo/sa/client"], TIMEOUT)?;
    let v1beta1 = json(&api.kubectl(&[
        "get",
        "authorizationpolicies.v1beta1.security.istio.io",
        "-n",
        "demo",
        "allow-web",
        "-o",
        "json",
    ])?);
    assert_eq!(v1beta1["apiVersion"], "security.istio.io/v1beta1");
    assert_eq!(v1beta1["spec"]["action"], "ALLOW");
    let rejected = api
        .apply_fails("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: bad, namespace: demo}\nspec: {action: BOGUS}\n")?;
    assert!(rejected.contains("spec.action"), "rejection does not name the field: {rejected}");
    api.apply(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: demo}\n\
         spec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n",
    )?;
    api.kubectl(&["get", "gateways.gateway.networking.k8s.io", "-n", "demo", "waypoint"])?;

    // TokenReview of a pod-bound service-account token with the CA's audience (ID-2): it names
    // the service account and the pod, as the CA API needs to authorize a certificate.
    let token = api.service_account_token("demo", "web", "istio-ca", Some("web-0"), 600)?;
    let review = json(&api.create_json(&format!(
        "apiVersion: authentication.k8s.io/v1\nkind: TokenReview\nspec:\n  token: {token}\n  audiences: [istio-ca]\n"
    ))?);
    assert_eq!(review["status"]["authenticated"], true, "{review}");
    assert_eq!(review["status"]["user"]["username"], "system:serviceaccount:demo:web");
    assert_eq!(review["status"]["user"]["extra"]["authentication.kubernetes.io/pod-name"][0], "web-0");
    assert_eq!(review["status"]["audiences"][0], "istio-ca");
    // The same token for another audience is refused.
    let wrong = json(&api.create_json(&format!(
        "apiVersion: authentication.k8s.io/v1\nkind: TokenReview\nspec:\n  token: {token}\n  audiences: [someone-else]\n"
    ))?);
    assert_ne!(wrong["status"]["authenticated"], true, "{wrong}");

    let rss = |pid: Option<u32>| {
        let status = std::fs::read_to_string(format!("/proc/{}/status", pid.unwrap_or(0))).unwrap_or_default();
        status.lines().find(|l| l.starts_with("VmRSS:")).map(|l| l[6..].trim().to_string()).unwrap_or_default()
    };
    let (etcd, apiserver) = api.pids();
    eprintln!("kube_api: RSS after the test's objects: kube-apiserver {}, etcd {}", rss(apiserver), rss(etcd));

    // RBAC is on: the service account may do nothing it was not granted.
    let sa = ["--as=system:serviceaccount:demo:web"];
    let denied = api.kubectl_fails(&[sa[0], "get", "pods", "-n", "demo"])?;
    assert!(denied.contains("forbidden"), "{denied}");
    Ok(())
}

#[test]
fn two_instances_run_side_by_side_and_leave_nothing() -> io::Result<()> {
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(KubeApi::start_without_crds);
        let b = s.spawn(KubeApi::start_without_crds);
        (a.join().expect("start a"), b.join().expect("start b"))
    });
    let (a, b) = (a?, b?);
    assert_ne!(a.port(), b.port());
    a.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: only-in-a}\n")?;
    b.kubectl_fails(&["get", "namespace", "only-in-a"])?;

    let (dir, pids) = (a.dir().to_path_buf(), a.pids());
    drop(a);
    assert!(!dir.exists(), "{} left behind", dir.display());
    for pid in [pids.0, pids.1].into_iter().flatten() {
        assert!(!pid_alive(pid), "process {pid} still running after drop");
    }
    b.kubectl(&["get", "namespaces"])?;

    // A panicking test still stops its API server.
    let (dir, pids) = (b.dir().to_path_buf(), b.pids());
    let outcome = catch_unwind(AssertUnwindSafe(move || {
        let _b = b;
        panic!("test failure");
    }));
    assert!(outcome.is_err());
    assert!(!dir.exists(), "{} left behind after a panic", dir.display());
    for pid in [pids.0, pids.1].into_iter().flatten() {
        assert!(!pid_alive(pid), "process {pid} still running after a panic");
    }
    Ok(())
}

#[test]
fn apiserver_restart_keeps_etcd_data_and_watches_resume() -> io::Result<()> {
    let mut api = KubeApi::start_without_crds()?;
    api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: kept}\n")?;
    let before = json(&api.kubectl(&["get", "--raw", "/api/v1/namespaces"])?);
    let rv = before["metadata"]["resourceVersion"].as_str().expect("resourceVersion").to_string();
    let (etcd_pid, apiserver_pid) = api.pids();

    api.restart_apiserver()?;
    eprintln!("kube_api: API server restarted in {:.2}s", api.apiserver_start_time().as_secs_f64());
    assert_eq!(api.pids().0, etcd_pid, "etcd was restarted");
    assert_ne!(api.pids().1, apiserver_pid, "the API server was not restarted");
    api.kubectl(&["get", "namespace", "kept"])?;
    // A watch from the resourceVersion seen before the restart resumes there: it sees a change
    // made after the restart and nothing is missed.
    api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: after-restart}\n")?;
    let mut watch = api.watch(&["get", "--raw", &format!("/api/v1/namespaces?watch=1&resourceVersion={rv}")])?;
    let seen = watch.wait_for(&["\"name\":\"after-restart\""], TIMEOUT)?;
    assert!(!seen.contains("\"name\":\"kept\""), "resumed watch replayed an older object: {seen}");
    Ok(())
}

#[test]
fn nodes_of_a_topology_reach_an_apiserver_on_its_fabric() -> io::Result<()> {
    let topo = Topology::new("kube_api::fabric")?;
    let node = topo.add_node("node1")?;
    let api = KubeApi::start_in_netns(topo.fabric().name(), FABRIC_GATEWAY)?;
    assert_eq!(api.server_url(), format!("https://{FABRIC_GATEWAY}:6443"));
    api.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: from-the-test}\n")?;
    // A process in a node (where `strait control` and the node proxies run) uses the kubeconfig.
    let kubeconfig = api.kubeconfig().to_string_lossy().into_owned();
    let seen =
        node.run_ok("kubectl", &["--kubeconfig", &kubeconfig, "get", "namespace", "from-the-test", "-o", "name"])?;
    assert_eq!(seen.trim(), "namespace/from-the-test");
    node.run_ok("kubectl", &["--kubeconfig", &kubeconfig, "get", "crd", "gateways.gateway.networking.k8s.io"])?;
    Ok(())
}

/// Run by `a_crashed_test_run_is_cleaned_up_by_the_next_start` in a child process, which it kills.
#[test]
#[ignore = "helper: started and killed by another test"]
fn crash_helper_starts_and_waits_to_be_killed() -> io::Result<()> {
    if std::env::var_os("KUBE_API_CRASH_HELPER").is_none() {
        return Ok(());
    }
    let api = KubeApi::start_without_crds()?;
    let (etcd, apiserver) = api.pids();
    println!("STARTED {} {} {}", api.dir().display(), etcd.unwrap_or(0), apiserver.unwrap_or(0));
    std::thread::sleep(Duration::from_secs(120));
    Ok(())
}

#[test]
fn a_crashed_test_run_is_cleaned_up_by_the_next_start() -> io::Result<()> {
    use std::io::BufRead;
    let mut helper = std::process::Command::new(std::env::current_exe()?)
        .args(["--exact", "--ignored", "--nocapture", "crash_helper_starts_and_waits_to_be_killed"])
        .env("KUBE_API_CRASH_HELPER", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = helper.stdout.take().expect("piped stdout");
    let line = io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.starts_with("STARTED "))
        .expect("the helper started an API server");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (dir, etcd, apiserver) =
        (std::path::PathBuf::from(fields[1]), fields[2].parse::<u32>(), fields[3].parse::<u32>());
    let (etcd, apiserver) = (etcd.expect("etcd pid"), apiserver.expect("apiserver pid"));
    helper.kill()?; // SIGKILL: no destructor runs
    helper.wait()?;
    assert!(pid_alive(etcd) && pid_alive(apiserver) && dir.exists(), "the crash should leave them behind");

    let _next = KubeApi::start_without_crds()?;
    assert!(!pid_alive(etcd), "etcd {etcd} of the crashed run still running");
    assert!(!pid_alive(apiserver), "kube-apiserver {apiserver} of the crashed run still running");
    assert!(!dir.exists(), "{} left behind", dir.display());
    Ok(())
}
