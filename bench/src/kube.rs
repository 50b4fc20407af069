//! `strait-bench kube` (CFG-3): `strait control --kubernetes` against a real kube-apiserver and
//! etcd (`strait_testbed::KubeApi`) holding a generated cluster: 10,000 running pods on 100
//! nodes in 20 ambient namespaces, 1,000 Services and 100 AuthorizationPolicies (a tenth with
//! `--quick`). The objects are written through the API as a kubelet and kubectl would (pods
//! created, then their status patched), over HTTP/2 with curl's parallel transfers.
//!
//! Measured: the control plane's start to ready (list every kind, compile, snapshot) and its
//! memory then and after a quiet minute; `kubectl apply` of a policy change to the new snapshot;
//! and the requests strait makes to the API server at steady state, counted from the API
//! server's audit log (one line per request as it arrives, a watch when it starts), so polling
//! would show.

use std::{
    fmt::Write as _,
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde::Serialize;
use strait_testbed::kube::KubeApi;

use crate::{control::Control, scenarios::procfs};

const LISTEN: &str = "127.0.0.1:25112";
const METRICS: &str = "127.0.0.1:25114";
const NAMESPACES: usize = 20;
/// Transfers curl keeps in flight at once on its HTTP/2 connections.
const PARALLEL: &str = "32";

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Sizes {
    pub pods: usize,
    pub nodes: usize,
    pub namespaces: usize,
    pub services: usize,
    pub policies: usize,
    pub apply_rounds: usize,
    pub steady_s: u64,
}

#[derive(Debug, Serialize)]
pub struct KubeReport {
    pub sizes: Sizes,
    pub write_cluster_s: f64,
    pub startup_ms: u64,
    pub requests_to_ready: usize,
    pub rss_ready_mib: f64,
    pub rss_steady_mib: f64,
    pub apply_to_snapshot_ms: Vec<u64>,
    /// Requests of the configuration source (lists and watches) at steady state.
    pub steady_requests: usize,
    pub steady_requests_per_min: f64,
    pub steady_verbs: Vec<String>,
    /// Requests of leader election (the Lease) at steady state, counted apart.
    pub lease_requests: usize,
    pub lease_requests_per_min: f64,
}

pub fn run(out: &Path, quick: bool) -> anyhow::Result<KubeReport> {
    let sizes = if quick {
        Sizes {
            pods: 1_000,
            nodes: 10,
            namespaces: NAMESPACES,
            services: 100,
            policies: 20,
            apply_rounds: 3,
            steady_s: 30,
        }
    } else {
        Sizes {
            pods: 10_000,
            nodes: 100,
            namespaces: NAMESPACES,
            services: 1_000,
            policies: 100,
            apply_rounds: 5,
            steady_s: 300,
        }
    };
    let api = KubeApi::start().context("starting kube-apiserver and etcd")?;
    let dir = out.join("kube");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;

    eprintln!(
        "strait-bench kube: writing {} pods, {} services, {} policies",
        sizes.pods, sizes.services, sizes.policies
    );
    let started = Instant::now();
    write_cluster(&api, &dir, &sizes)?;
    let write_cluster_s = started.elapsed().as_secs_f64();

    let audit_before = api.audit_events()?.len();
    let started = Instant::now();
    let kubeconfig = api.kubeconfig().as_os_str();
    let mut control = Control::spawn(
        &dir,
        // The Lease in a namespace that exists, so this replica leads as one in a cluster.
        &["--kubernetes", "--listen", LISTEN, "--metrics-addr", METRICS, "--leader-election-namespace", "default"],
        &[("KUBECONFIG", kubeconfig)],
    )?;
    control.wait_for("strait control ready", 1)?;
    let startup_ms = started.elapsed().as_millis() as u64;
    let rss_ready_mib = procfs::rss_bytes(control.pid()) as f64 / 1048576.0;
    let requests_to_ready = strait_requests(&api, audit_before)?.len();

    let mut apply_to_snapshot_ms = Vec::new();
    for round in 0..sizes.apply_rounds {
        let snapshots = control.count("xDS snapshot built");
        let started = Instant::now();
        api.apply(&policy_yaml("ns-0", "bench-apply", round))?;
        control.wait_for("xDS snapshot built", snapshots + 1)?;
        apply_to_snapshot_ms.push(started.elapsed().as_millis() as u64);
        std::thread::sleep(Duration::from_millis(500));
    }

    eprintln!("strait-bench kube: counting requests at steady state for {} s", sizes.steady_s);
    let before = api.audit_events()?.len();
    std::thread::sleep(Duration::from_secs(sizes.steady_s));
    let (lease, steady): (Vec<_>, Vec<_>) = strait_requests(&api, before)?
        .into_iter()
        .partition(|e| e["requestURI"].as_str().unwrap_or_default().contains("/leases"));
    let rss_steady_mib = procfs::rss_bytes(control.pid()) as f64 / 1048576.0;
    control.stop();
    let steady_verbs = steady
        .iter()
        .map(|e| format!("{} {}", e["verb"].as_str().unwrap_or("?"), e["requestURI"].as_str().unwrap_or("?")))
        .collect();
    Ok(KubeReport {
        sizes,
        write_cluster_s,
        startup_ms,
        requests_to_ready,
        rss_ready_mib,
        rss_steady_mib,
        apply_to_snapshot_ms,
        steady_requests: steady.len(),
        steady_requests_per_min: steady.len() as f64 * 60.0 / sizes.steady_s as f64,
        steady_verbs,
        lease_requests: lease.len(),
        lease_requests_per_min: lease.len() as f64 * 60.0 / sizes.steady_s as f64,
    })
}

/// Audit events after the first `skip` whose client is strait (kube-rs), not kubectl or curl.
fn strait_requests(api: &KubeApi, skip: usize) -> anyhow::Result<Vec<serde_json::Value>> {
    Ok(api
        .audit_events()?
        .into_iter()
        .skip(skip)
        .filter(|e| {
            let agent = e["userAgent"].as_str().unwrap_or_default();
            !agent.starts_with("kubectl") && !agent.starts_with("curl") && !agent.starts_with("kube-apiserver")
        })
        .collect())
}

/// Writes the cluster through the API: namespaces with kubectl, then pods, their status,
/// services and policies with parallel curl transfers.
fn write_cluster(api: &KubeApi, dir: &Path, s: &Sizes) -> anyhow::Result<()> {
    let mut namespaces = String::new();
    for ns in 0..s.namespaces {
        let _ = write!(
            namespaces,
            "---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns-{ns}\n  labels:\n    istio.io/dataplane-mode: ambient\n"
        );
    }
    api.apply(&namespaces)?;
    let per_ns = s.pods.div_ceil(s.namespaces);
    let pod = |i: usize| (format!("ns-{}", i / per_ns), format!("pod-{i}"), i % 50);
    let ip = |i: usize| format!("10.{}.{}.{}", 1 + i / 65536, (i / 256) % 256, i % 256);
    let host = |i: usize| format!("10.255.{}.{}", (i % s.nodes) / 256, (i % s.nodes) % 256 + 1);

    let mut creates = Vec::new();
    for i in 0..s.pods {
        let (ns, name, app) = pod(i);
        let body = format!(
            r#"{{"apiVersion":"v1","kind":"Pod","metadata":{{"name":"{name}","namespace":"{ns}","labels":{{"app":"app-{app}"}}}},"spec":{{"nodeName":"node-{}","serviceAccountName":"sa-{app}","containers":[{{"name":"app","image":"example.invalid/app:1"}}]}}}}"#,
            i % s.nodes
        );
        creates.push(("POST", format!("/api/v1/namespaces/{ns}/pods"), body, "application/json"));
    }
    curl_all(api, dir, "pods", &creates, 201)?;

    let mut statuses = Vec::new();
    for i in 0..s.pods {
        let (ns, name, _) = pod(i);
        let body = format!(
            r#"{{"status":{{"phase":"Running","hostIP":"{}","podIP":"{ip}","podIPs":[{{"ip":"{ip}"}}],"conditions":[{{"type":"Ready","status":"True"}}]}}}}"#,
            host(i),
            ip = ip(i)
        );
        statuses.push((
            "PATCH",
            format!("/api/v1/namespaces/{ns}/pods/{name}/status"),
            body,
            "application/merge-patch+json",
        ));
    }
    curl_all(api, dir, "status", &statuses, 200)?;

    let mut services = Vec::new();
    for k in 0..s.services {
        let ns = format!("ns-{}", k % s.namespaces);
        let body = format!(
            r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"svc-{k}","namespace":"{ns}"}},"spec":{{"selector":{{"app":"app-{}"}},"ports":[{{"name":"http","port":80,"targetPort":8080}}]}}}}"#,
            k % 50
        );
        services.push(("POST", format!("/api/v1/namespaces/{ns}/services"), body, "application/json"));
    }
    curl_all(api, dir, "services", &services, 201)?;

    let mut policies = Vec::new();
    for k in 0..s.policies {
        let ns = format!("ns-{}", k % s.namespaces);
        let body = format!(
            r#"{{"apiVersion":"security.istio.io/v1beta1","kind":"AuthorizationPolicy","metadata":{{"name":"allow-{k}","namespace":"{ns}"}},"spec":{{"selector":{{"matchLabels":{{"app":"app-{}"}}}},"action":"ALLOW","rules":[{{"from":[{{"source":{{"principals":["cluster.local/ns/{ns}/sa/sa-{}"]}}}}],"to":[{{"operation":{{"ports":["8080"]}}}}]}}]}}}}"#,
            k % 50,
            (k + 1) % 50
        );
        policies.push((
            "POST",
            format!("/apis/security.istio.io/v1beta1/namespaces/{ns}/authorizationpolicies"),
            body,
            "application/json",
        ));
    }
    curl_all(api, dir, "policies", &policies, 201)
}

/// Runs every request with one curl process (a config file, parallel transfers on HTTP/2) and
/// fails unless each answered `expect`.
fn curl_all(
    api: &KubeApi,
    dir: &Path,
    what: &str,
    requests: &[(&str, String, String, &str)],
    expect: u16,
) -> anyhow::Result<()> {
    let mut config = String::new();
    let (server, ca, token) = (api.server_url(), api.ca_cert(), api.admin_token().to_owned());
    for (i, (method, path, body, content_type)) in requests.iter().enumerate() {
        let body_file = dir.join(format!("{what}-{i}.json"));
        fs::write(&body_file, body)?;
        let _ = write!(
            config,
            "{}url = \"{server}{path}\"\nrequest = \"{method}\"\ncacert = \"{}\"\nheader = \"Authorization: Bearer {token}\"\n\
             header = \"Content-Type: {content_type}\"\ndata-binary = \"@{}\"\noutput = \"/dev/null\"\n\
             write-out = \"%{{http_code}}\\n\"\nsilent\nshow-error\n",
            if i == 0 { "" } else { "next\n" },
            ca.display(),
            body_file.display()
        );
    }
    let config_file = dir.join(format!("{what}.curl"));
    fs::write(&config_file, config)?;
    let output = Command::new("curl")
        .args(["--parallel", "--parallel-max", PARALLEL, "--http2", "-K"])
        .arg(&config_file)
        .output()
        .context("running curl")?;
    let codes = String::from_utf8_lossy(&output.stdout);
    let good = codes.lines().filter(|c| c.trim() == expect.to_string()).count();
    if good != requests.len() {
        let bad: Vec<&str> = codes.lines().filter(|c| c.trim() != expect.to_string()).take(5).collect();
        bail!(
            "{what}: {good} of {} requests answered {expect} (others: {bad:?}); curl said: {}",
            requests.len(),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    for i in 0..requests.len() {
        let _ = fs::remove_file(dir.join(format!("{what}-{i}.json")));
    }
    Ok(())
}

fn policy_yaml(namespace: &str, name: &str, round: usize) -> String {
    format!(
        "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {namespace}\n\
         spec:\n  selector:\n    matchLabels:\n      app: app-1\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        ports: [\"{}\"]\n",
        9000 + round
    )
}

pub fn markdown(r: &KubeReport) -> String {
    let s = &r.sizes;
    let mut md = format!(
        "# strait control --kubernetes\n\nA real kube-apiserver 1.20 and etcd holding {} running pods on {} nodes in {} \
         ambient namespaces, {} Services and {} AuthorizationPolicies (written through the API in {:.0} s).\n\n",
        s.pods, s.nodes, s.namespaces, s.services, s.policies, r.write_cluster_s
    );
    let mut apply = r.apply_to_snapshot_ms.clone();
    apply.sort_unstable();
    let median = apply.get(apply.len() / 2).copied().unwrap_or_default();
    md.push_str("| Figure | Value |\n|---|---:|\n");
    let rows = [
        ("Start to ready (list every kind, compile, snapshot)", format!("{} ms", r.startup_ms)),
        ("API requests to get there", r.requests_to_ready.to_string()),
        ("RSS when ready", format!("{:.1} MiB", r.rss_ready_mib)),
        (&*format!("RSS after {} s at steady state", s.steady_s), format!("{:.1} MiB", r.rss_steady_mib)),
        (
            "`kubectl apply` of a policy to the new snapshot, median (all)",
            format!("{median} ms ({:?})", r.apply_to_snapshot_ms),
        ),
        (
            &*format!("API requests of the configuration source at steady state, {} s", s.steady_s),
            format!("{} ({:.2}/min)", r.steady_requests, r.steady_requests_per_min),
        ),
        (
            &*format!("API requests of leader election (Lease renewals), {} s", s.steady_s),
            format!("{} ({:.2}/min)", r.lease_requests, r.lease_requests_per_min),
        ),
    ];
    for (what, value) in rows {
        let _ = writeln!(md, "| {what} | {value} |");
    }
    if !r.steady_verbs.is_empty() {
        md.push_str(
            "\nRequests of the configuration source at steady state (watches renewed as the API server ends them):\n\n",
        );
        for v in &r.steady_verbs {
            let _ = writeln!(md, "- `{v}`");
        }
    }
    md
}

pub fn write(out: &Path, report: &KubeReport) -> anyhow::Result<()> {
    fs::write(out.join("kube.md"), markdown(report))?;
    fs::write(out.join("kube.json"), serde_json::to_string_pretty(report)?)?;
    Ok(())
}
