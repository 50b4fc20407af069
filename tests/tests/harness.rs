//! Self-test of the topology harness: wiring, traffic, and cleanup after success, panic and
//! crash. Needs root; run with `cargo test -p strait-testbed`.

use std::collections::HashSet;
use std::io;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use strait_testbed::{EchoKind, Topology, bin_path, k8s};

const TIMEOUT: Duration = Duration::from_secs(10);

fn netns_list() -> HashSet<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list runs");
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.split_whitespace().next().map(String::from)).collect()
}

fn assert_all_gone(names: &[String]) {
    let left = netns_list();
    let remaining: Vec<&String> = names.iter().filter(|n| left.contains(*n)).collect();
    assert!(remaining.is_empty(), "namespaces left behind: {remaining:?}");
}

fn pid_alive(pid: u32) -> bool {
    // A zombie (killed, not yet reaped) counts as gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
        .unwrap_or(false)
}

fn echo() -> String {
    bin_path("strait-echo").to_string_lossy().into_owned()
}

#[test]
fn pods_talk_across_nodes_and_everything_is_deleted() -> io::Result<()> {
    let topo = Topology::new("harness::pods_talk")?;
    let n1 = topo.add_node("node1")?;
    let n2 = topo.add_node("node2")?;
    let a = topo.add_pod(&n1, "client-a")?;
    let b = topo.add_pod(&n1, "client-b")?;
    let server = topo.add_pod(&n2, "server")?;
    let host = topo.add_host_network_pod(&n1, "node-agent")?;
    assert_eq!((a.ip().to_string(), b.ip().to_string()), ("10.1.0.10".into(), "10.1.0.11".into()));
    assert_eq!((server.ip().to_string(), n2.pod_cidr()), ("10.2.0.10".into(), "10.2.0.0/24".into()));
    assert_eq!((host.ip(), host.host_veth(), host.host_network()), (n1.ip(), None, true));
    assert_eq!(server.host_veth(), Some("vp10"));

    // The node route the proxy uses to find a pod's interface.
    let route = n2.run_ok("ip", &["route", "show", "10.2.0.10/32"])?;
    assert!(route.contains("dev vp10"), "{route}");

    let http = server.start_echo_server(EchoKind::Http, 8080)?;
    let url = format!("http://{}:8080/", server.ip());
    for client in [&a, &b, &host] {
        let reply = client.curl(&url, TIMEOUT)?;
        assert!(reply.ok(), "from {}: {reply:?}", client.name());
        let expected = format!("hello from server peer={}:", client.ip());
        assert!(reply.body.starts_with(&expected), "from {}: {:?}", client.name(), reply.body);
    }
    http.wait_for_log(&format!("request peer={}:", host.ip()), TIMEOUT)?;
    assert_eq!(http.count_log_lines("request peer="), 3);

    let tcp = server.start_echo_server(EchoKind::Tcp, 9000)?;
    let target = format!("{}:9000", server.ip());
    let sent = a.run_ok(echo(), &["send", &target, "--bytes", "10485760"])?;
    assert!(sent.starts_with("sent=10485760 received=10485760 fnv1a64="), "{sent}");
    tcp.wait_for_log(&format!("accepted peer={}:", a.ip()), TIMEOUT)?;

    let names = topo.namespaces();
    assert_eq!(names.len(), 6, "{names:?}");
    assert!(names.iter().all(|n| n.starts_with(topo.prefix()) && n.len() <= 40), "{names:?}");
    assert!(netns_list().is_superset(&names.iter().cloned().collect()));
    let dir = topo.dir().to_path_buf();

    // Dropping the topology first: it must kill the servers itself.
    drop(topo);
    assert!(http.wait_exit(TIMEOUT).is_some() && tcp.wait_exit(TIMEOUT).is_some());
    assert_all_gone(&names);
    assert!(!dir.exists() || std::env::var("STRAIT_KEEP").is_ok_and(|v| v == "1"));
    Ok(())
}

#[test]
fn echo_server_routes_and_digests() -> io::Result<()> {
    let topo = Topology::new("harness::echo_routes")?;
    let node = topo.add_node("node1")?;
    let client = topo.add_pod(&node, "client")?;
    let server = topo.add_pod(&node, "server")?;
    let _http = server.start_echo_server(EchoKind::Http, 80)?;
    let base = format!("http://{}", server.ip());

    let reply = client.curl(&format!("{base}/bytes/300000"), TIMEOUT)?;
    assert_eq!((reply.status, reply.body_bytes.len()), (200, 300_000));
    let reply = client.curl(&format!("{base}/status/503"), TIMEOUT)?;
    assert_eq!(reply.status, 503);
    let reply = client.curl_args(&["-H", "x-test: yes", &format!("{base}/headers")])?;
    assert!(reply.body.contains("x-test: yes\n"), "{reply:?}");
    let reply = client.curl(&format!("{base}/delay/1500"), Duration::from_millis(300))?;
    assert_eq!((reply.status, reply.exit_code), (0, Some(28)), "{reply:?}");

    // A 2 MB chunked upload: curl sends `Expect: 100-continue`, which the server must answer.
    let upload = topo.dir().join("upload.bin");
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&upload, &data)?;
    let mut digest = strait_testbed::echo::Fnv1a64::default();
    digest.update(&data);
    let file_arg = format!("@{}", upload.display());
    let reply =
        client.curl_args(&["-H", "transfer-encoding: chunked", "--data-binary", &file_arg, &format!("{base}/up")])?;
    assert_eq!(reply.body, format!("received 2000000 bytes fnv1a64={}\n", digest.hex()));

    // Malformed requests get a 400 and do not take the server down.
    let bad = client.run(echo(), &["probe", &format!("{}:80", server.ip())])?;
    assert!(bad.status.success());
    let raw = client.run("curl", &["-sS", "--max-time", "5", "-X", "BAD METHOD", &format!("{base}/")])?;
    assert!(String::from_utf8_lossy(&raw.stdout).contains("bad request"), "{raw:?}");
    assert!(client.curl(&format!("{base}/"), TIMEOUT)?.ok());
    Ok(())
}

#[test]
fn held_connection_keeps_working() -> io::Result<()> {
    let topo = Topology::new("harness::hold")?;
    let (n1, n2) = (topo.add_node("node1")?, topo.add_node("node2")?);
    let client = topo.add_pod(&n1, "client")?;
    let server = topo.add_pod(&n2, "server")?;
    let _tcp = server.start_echo_server(EchoKind::Tcp, 7000)?;
    let hold = client.spawn("hold", echo(), &["hold", &format!("{}:7000", server.ip()), "--secs", "1"], &[])?;
    let status = hold.wait_exit(TIMEOUT).expect("hold exits after about a second");
    assert!(status.success(), "{}", hold.log());
    assert!(hold.count_log_lines("ok ") >= 4, "{}", hold.log());
    assert!(hold.log_path().starts_with(topo.dir()));
    Ok(())
}

#[test]
fn panic_inside_a_test_still_cleans_up() {
    let mut names = Vec::new();
    let mut pids = Vec::new();
    let mut strays = Vec::new();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let topo = Topology::new("harness::panics").expect("topology");
        let node = topo.add_node("node1").expect("node");
        let pod = topo.add_pod(&node, "pod").expect("pod");
        let sleeper = pod.spawn("sleeper", "sleep", &["300"], &[]).expect("spawn");
        pids.push(sleeper.pid());
        // Leaked on purpose: the topology must kill it anyway.
        std::mem::forget(sleeper);
        // Not tracked by the topology at all: found through `ip netns pids`.
        let stray = Command::new("ip")
            .args(["netns", "exec", pod.netns().name(), "sleep", "300"])
            .spawn()
            .expect("spawn stray");
        strays.push(stray);
        names = topo.namespaces();
        panic!("deliberate panic with the topology alive");
    }));
    assert!(result.is_err());
    assert_eq!(names.len(), 3);
    assert_all_gone(&names);
    std::thread::sleep(Duration::from_millis(100));
    for pid in pids {
        assert!(!pid_alive(pid), "process {pid} survived the topology");
    }
    for mut stray in strays {
        let deadline = std::time::Instant::now() + TIMEOUT;
        while stray.try_wait().expect("try_wait").is_none() {
            assert!(std::time::Instant::now() < deadline, "stray process {} survived", stray.id());
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn leftovers_of_a_dead_run_are_swept() -> io::Result<()> {
    // A pid that certainly belongs to no running process: a child that has exited.
    let mut child = Command::new("true").spawn()?;
    let dead = child.id();
    child.wait()?;
    let name = format!("st{dead}x0-fake-fab");
    let dir = std::env::temp_dir().join(format!("strait-st{dead}x0-fake"));
    std::fs::create_dir_all(&dir)?;
    // The squatter enters an anonymous namespace first, which is then given the stale name:
    // a parallel test's sweep may delete the name at any moment, and must find the squatter in it.
    let mut squatter = Command::new("unshare").args(["--net", "sleep", "300"]).spawn()?;
    let our_netns = std::fs::read_link("/proc/self/ns/net")?;
    let squatter_netns = format!("/proc/{}/ns/net", squatter.id());
    while std::fs::read_link(&squatter_netns)? == our_netns {
        std::thread::sleep(Duration::from_millis(5));
    }
    let attach = ["netns", "attach", name.as_str(), &squatter.id().to_string()];
    assert!(Command::new("ip").args(attach).status()?.success());

    // Any topology created meanwhile in a parallel test sweeps these too; either way they go.
    Topology::cleanup_stale()?;
    assert_all_gone(std::slice::from_ref(&name));
    let deadline = std::time::Instant::now() + TIMEOUT;
    while squatter.try_wait()?.is_none() {
        assert!(std::time::Instant::now() < deadline, "the process inside the namespace survived");
        std::thread::sleep(Duration::from_millis(20));
    }
    if std::env::var("STRAIT_KEEP").map_or(true, |v| v != "1") {
        assert!(!Path::new(&dir).exists());
    }
    Ok(())
}

#[test]
fn k8s_yaml_matches_the_topology() -> io::Result<()> {
    let topo = Topology::new("harness::yaml")?;
    let node = topo.add_node("node1")?;
    let pod = topo.add_pod(&node, "web")?;
    let yaml = k8s::pod_yaml(&pod, "demo", "web", &[("app", "web")]) + &k8s::namespace_yaml("demo", &[]);
    let path = topo.write_config("demo.yaml", &yaml)?;
    assert_eq!(path, topo.config_dir().join("demo.yaml"));
    let written = std::fs::read_to_string(&path)?;
    assert!(written.contains("podIP: \"10.1.0.10\"") && written.contains("nodeName: \"node1\""), "{written}");
    assert_eq!(std::fs::read_dir(topo.config_dir())?.count(), 1, "no temp files in the config dir");
    Ok(())
}
