//! End to end: configuration changes are applied whole or not at all (SPEC OPS-5, CFG-1). A
//! configuration directory rewritten file by file, with traffic flowing between two meshed
//! pods, never turns the mesh off: no empty or partial model is applied and no byte crosses the
//! underlay in plaintext. Needs root.

mod common;

use std::{
    fs, io,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use common::{MESH, PLAIN, TIMEOUT, TwoNodes, access_lines};
use serde_json::Value;
use strait_testbed::{EchoKind, Node, Pod, Process, UnderlayCapture, k8s, pcap};

const APPLIED: &str = "configuration applied";
const HOLD_WARNING: &str = "the new configuration captures no workload";
/// The hold these tests give the proxies (`--empty-config-hold`), short to keep them quick.
const HOLD: Duration = Duration::from_secs(4);
const HBONE_PORT: u16 = 15008;

/// The configuration as three files, in the order they are written back.
fn files(t: &TwoNodes, server_labels: &[(&str, &str)]) -> [(&'static str, String); 3] {
    let mut labels = vec![("app", "server")];
    labels.extend_from_slice(server_labels);
    [
        (
            "namespaces.yaml",
            [k8s::namespace_yaml(MESH, &[("istio.io/dataplane-mode", "ambient")]), k8s::namespace_yaml(PLAIN, &[])]
                .concat(),
        ),
        ("client.yaml", k8s::pod_yaml(&t.client, MESH, "client", &[("app", "client")])),
        ("server.yaml", k8s::pod_yaml(&t.server, MESH, "server", &labels)),
    ]
}

fn remove_all(t: &TwoNodes) -> io::Result<()> {
    for (name, _) in files(t, &[]) {
        t.topo.remove_config(name)?;
    }
    Ok(())
}

/// The proxy's "configuration applied" lines after the first `skip`.
fn applied_since(proxy: &Process, skip: usize) -> Vec<String> {
    proxy.log().lines().filter(|l| l.contains(APPLIED)).skip(skip).map(str::to_owned).collect()
}

fn wait_applied(proxies: &[&Process], skip: &[usize]) -> io::Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    for (proxy, skip) in proxies.iter().zip(skip) {
        while applied_since(proxy, *skip).is_empty() {
            if Instant::now() > deadline {
                return Err(io::Error::other(format!("no configuration applied:\n{}", proxy.log_tail())));
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

/// What the node proxy's admin API says it captures: the captured workloads' names, sorted.
fn captured(node: &Node) -> io::Result<Vec<String>> {
    let body = node.run_ok("curl", &["-sS", "--max-time", "5", "http://127.0.0.1:15000/workloads"])?;
    let workloads: Value = serde_json::from_str(&body).map_err(|e| io::Error::other(format!("{e}: {body}")))?;
    let list = workloads.as_array().ok_or_else(|| io::Error::other(format!("not a list: {body}")))?;
    let mut names: Vec<String> = list
        .iter()
        .filter(|w| w["capture"] == "captured")
        .filter_map(|w| Some(w["name"].as_str()?.to_owned()))
        .collect();
    names.sort();
    Ok(names)
}

fn both_pods() -> Vec<String> {
    vec!["client".to_owned(), "server".to_owned()]
}

/// Requests from the client pod to the server pod, one every 100 ms until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<io::Result<(usize, Vec<String>)>>,
}

impl Traffic {
    fn start(client: &Pod, server: &Pod) -> Traffic {
        let (client, url) = (client.clone(), format!("http://{}:8080/", server.ip()));
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stopping.load(Ordering::Relaxed) {
                let reply = client.curl(&url, Duration::from_secs(5))?;
                if reply.ok() {
                    ok += 1
                } else {
                    failed.push(format!("{reply:?}"))
                }
                thread::sleep(Duration::from_millis(100));
            }
            Ok((ok, failed))
        });
        Traffic { stop, thread }
    }

    /// Stops and returns how many requests succeeded; fails if any did not.
    fn finish(self) -> io::Result<usize> {
        self.stop.store(true, Ordering::Relaxed);
        let (ok, failed) = self.thread.join().map_err(|_| io::Error::other("the traffic thread panicked"))??;
        assert!(failed.is_empty(), "{} of {} requests failed; first: {}", failed.len(), ok + failed.len(), failed[0]);
        Ok(ok)
    }
}

/// Segments that carried payload in the clear between the pods (anything but HBONE).
fn plaintext(segments: &[pcap::Segment]) -> Vec<&pcap::Segment> {
    segments
        .iter()
        .filter(|s| !s.payload.is_empty() && s.src.port() != HBONE_PORT && s.dst.port() != HBONE_PORT)
        .collect()
}

// OPS-5, CFG-1: with traffic flowing in the mesh, every file is removed (an empty directory is
// held for the hold period, not applied), then written back one at a time (the partial states,
// the client without its server, never last the settle period and are never applied). Every
// request succeeds over mTLS and nothing crosses the underlay in plaintext. A directory that
// stays empty for longer than the hold is then applied, and only then does traffic leave the
// mesh: proof that the hold was what kept it in.
#[test]
fn a_directory_rewritten_file_by_file_never_turns_the_mesh_off() -> io::Result<()> {
    let t = TwoNodes::new("config::rewrite")?;
    for (name, yaml) in files(&t, &[]) {
        t.topo.write_config(name, &yaml)?;
    }
    let _http = t.server.start_echo_server(EchoKind::Http, 8080)?;
    let hold = format!("{}s", HOLD.as_secs());
    let (p1, p2) = t.start_proxies(&["--empty-config-hold", &hold])?;
    assert!(t.client.curl(&format!("http://{}:8080/", t.server.ip()), TIMEOUT)?.ok());

    // CFG-1 still holds with the settle period: a change applies within a second.
    let skip = [applied_since(&p1, 0).len(), applied_since(&p2, 0).len()];
    let written = Instant::now();
    t.topo.write_config("server.yaml", &files(&t, &[("version", "v1")])[2].1)?;
    wait_applied(&[&p1, &p2], &skip)?;
    let latency = written.elapsed();
    assert!(latency < Duration::from_secs(1), "applied {latency:?} after the change");
    eprintln!("a change applied on both proxies {} ms after it was written", latency.as_millis());

    let skip = [applied_since(&p1, 0).len(), applied_since(&p2, 0).len()];
    let outbound_before = access_lines(&p1, &["outbound", "security=mutual_tls", "result=ok"]).len();
    let capture = UnderlayCapture::start(&t.topo)?;
    let traffic = Traffic::start(&t.client, &t.server);
    thread::sleep(Duration::from_millis(500));

    remove_all(&t)?;
    thread::sleep(Duration::from_secs(2));
    for (proxy, node) in [(&p1, &t.n1), (&p2, &t.n2)] {
        assert_eq!(proxy.count_log_lines(HOLD_WARNING), 1, "the empty directory is held:\n{}", proxy.log_tail());
        assert_eq!(captured(node)?, both_pods(), "the previous configuration stays in force");
    }
    for (name, yaml) in files(&t, &[]) {
        t.topo.write_config(name, &yaml)?;
        thread::sleep(Duration::from_millis(200));
    }
    wait_applied(&[&p1, &p2], &skip)?;
    thread::sleep(Duration::from_secs(1));
    let served = traffic.finish()?;
    let segments = capture.finish()?;

    for ((proxy, node), skip) in [(&p1, &t.n1), (&p2, &t.n2)].into_iter().zip(skip) {
        let applied = applied_since(proxy, skip);
        let partial: Vec<&String> = applied.iter().filter(|l| !l.contains("workloads=2 captured=2")).collect();
        assert!(partial.is_empty(), "an empty or partial configuration was applied: {partial:?}");
        assert_eq!(captured(node)?, both_pods());
    }
    let outbound = access_lines(&p1, &["outbound", "security=mutual_tls", "result=ok"]).len() - outbound_before;
    assert!(served >= 25 && outbound >= served, "{served} requests served, {outbound} mTLS access lines");
    let clear = plaintext(&segments);
    assert!(clear.is_empty(), "{} segments in plaintext, first: {:?}", clear.len(), clear[0]);

    // Emptied for good: applied once the hold has passed (plus the settle period), not before.
    let skip = [applied_since(&p1, 0).len(), applied_since(&p2, 0).len()];
    let removed = Instant::now();
    remove_all(&t)?;
    wait_applied(&[&p1, &p2], &skip)?;
    let after = removed.elapsed();
    assert!(after >= HOLD && after < HOLD + Duration::from_secs(2), "the empty directory applied after {after:?}");
    for (proxy, skip) in [&p1, &p2].into_iter().zip(skip) {
        let applied = applied_since(proxy, skip);
        assert!(applied.iter().all(|l| l.contains("workloads=0 captured=0")), "{applied:?}");
        proxy.wait_for_log("applying it; capture is off", TIMEOUT)?;
    }
    thread::sleep(Duration::from_millis(500));
    let capture = UnderlayCapture::start(&t.topo)?;
    let reply = t.client.curl_args(&["-H", "x-marker: out-of-the-mesh", &format!("http://{}:8080/", t.server.ip())])?;
    let segments = capture.finish()?;
    assert!(reply.ok(), "{reply:?}");
    assert!(
        plaintext(&segments).iter().any(|s| pcap::contains(&s.payload, b"out-of-the-mesh")),
        "without the configuration the request crosses in plaintext"
    );
    Ok(())
}

// OPS-5: with a generation marker, a rewrite that pauses longer than the settle period between
// files is not applied at all until the marker changes, and then applied once, whole.
#[test]
fn a_generation_marker_applies_a_slow_rewrite_only_when_declared_whole() -> io::Result<()> {
    let t = TwoNodes::new("config::generation")?;
    for (name, yaml) in files(&t, &[]) {
        t.topo.write_config(name, &yaml)?;
    }
    let marker = t.topo.config_dir().join(".strait-generation");
    fs::write(&marker, "1\n")?;
    let _http = t.server.start_echo_server(EchoKind::Http, 8080)?;
    let (p1, p2) = t.start_proxies(&[])?;
    let skip = [applied_since(&p1, 0).len(), applied_since(&p2, 0).len()];
    let capture = UnderlayCapture::start(&t.topo)?;
    let traffic = Traffic::start(&t.client, &t.server);

    remove_all(&t)?;
    thread::sleep(Duration::from_secs(1));
    for (name, yaml) in files(&t, &[("version", "v2")]) {
        t.topo.write_config(name, &yaml)?;
        thread::sleep(Duration::from_secs(1));
    }
    for ((proxy, node), skip) in [(&p1, &t.n1), (&p2, &t.n2)].into_iter().zip(skip) {
        assert_eq!(applied_since(proxy, skip), Vec::<String>::new(), "nothing applied without a new generation");
        proxy.wait_for_log("the change applies when a new generation is written", TIMEOUT)?;
        assert_eq!(proxy.count_log_lines(HOLD_WARNING), 0, "the empty directory was never even read");
        assert_eq!(captured(node)?, both_pods());
    }

    fs::write(&marker, "2\n")?;
    wait_applied(&[&p1, &p2], &skip)?;
    thread::sleep(Duration::from_secs(1));
    traffic.finish()?;
    let segments = capture.finish()?;
    for ((proxy, node), skip) in [(&p1, &t.n1), (&p2, &t.n2)].into_iter().zip(skip) {
        let applied = applied_since(proxy, skip);
        assert_eq!(applied.len(), 1, "{applied:?}");
        assert!(applied[0].contains("workloads=2 captured=2"), "{}", applied[0]);
        let body = node.run_ok("curl", &["-sS", "--max-time", "5", "http://127.0.0.1:15000/workloads"])?;
        assert!(body.contains("\"version\": \"v2\""), "the new generation is in force: {body}");
    }
    let clear = plaintext(&segments);
    assert!(clear.is_empty(), "{} segments in plaintext, first: {:?}", clear.len(), clear[0]);
    Ok(())
}
