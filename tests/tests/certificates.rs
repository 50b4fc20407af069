//! End to end: workload certificate renewal (SPEC ID-1, ID-2). Certificates are renewed once,
//! at about half of their real lifetime, never in a loop; a CA that fails is asked again with
//! growing intervals, and connections arriving meanwhile do not add requests of their own.
//! Needs root.

mod common;

use std::{io, thread, time::Duration};

use common::{TIMEOUT, TwoNodes, ca_dir, start_node};
use strait_testbed::{EchoKind, Process, bin_path};

const CLIENT_ID: &str = "spiffe://cluster.local/ns/mesh/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/mesh/sa/server";

/// Seconds since midnight (UTC) of a log line, from the timestamp it starts with
/// (`2026-01-01T12:34:56.789012Z`).
fn timestamp(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split_once('T')?.1.strip_suffix('Z')?;
    let mut parts = time.split(':');
    let (h, m, s) = (parts.next()?.parse::<f64>().ok()?, parts.next()?.parse::<f64>().ok()?, parts.next()?);
    Some(h * 3600.0 + m * 60.0 + s.parse::<f64>().ok()?)
}

/// When `proxy` logged lines containing `needle`, in seconds, and the gaps between them.
fn times(proxy: &Process, needle: &str) -> (Vec<f64>, Vec<f64>) {
    let times: Vec<f64> = proxy.log().lines().filter(|l| l.contains(needle)).filter_map(timestamp).collect();
    // A gap across midnight comes out negative: add the day back.
    let gaps = times.windows(2).map(|w| (w[1] - w[0]).rem_euclid(86_400.0)).collect();
    (times, gaps)
}

// ID-1: with `--cert-ttl 1m` a certificate is issued once at start and renewed once, about 30 s
// later (half of its life, ±5 % jitter), not ten times a second as when renewal counted from the
// back-dated notBefore; with a 6 s lifetime it is renewed every ~3 s, each renewal spaced from
// the previous one by about half the lifetime. Traffic still flows on the renewed certificates.
#[test]
fn certificates_are_renewed_at_half_their_real_life_never_in_a_storm() -> io::Result<()> {
    let t = TwoNodes::new("certs::renewal")?;
    t.topo.write_config("c.yaml", &t.config("server", &[]))?;
    let _http = t.server.start_echo_server(EchoKind::Http, 8080)?;
    let ca = ca_dir(&t.topo, "ca");
    let p1 = start_node(&t.topo, &t.n1, &ca, &["--cert-ttl", "1m"])?;
    let p2 = start_node(&t.topo, &t.n2, &ca, &["--cert-ttl", "6s"])?;
    thread::sleep(Duration::from_secs(40));
    let reply = t.client.curl(&format!("http://{}:8080/", t.server.ip()), TIMEOUT)?;
    assert!(reply.ok(), "a connection on the renewed certificates: {reply:?}");

    let (issued, gaps) = times(&p1, &format!("certificate issued identity={CLIENT_ID}"));
    eprintln!("1m certificates issued at {issued:?}, gaps {gaps:?}");
    assert_eq!(issued.len(), 2, "issued once, renewed once in 40 s:\n{}", p1.log_tail());
    assert!((26.5..=33.5).contains(&gaps[0]), "renewed {:.1} s after issue", gaps[0]);

    let (issued, gaps) = times(&p2, &format!("certificate issued identity={SERVER_ID}"));
    eprintln!("6s certificates: {} issued, gaps {gaps:?}", issued.len());
    assert!((11..=16).contains(&issued.len()), "{} certificates in 40 s:\n{}", issued.len(), p2.log_tail());
    assert!(gaps.iter().all(|g| (2.5..=3.7).contains(g)), "renewed every ~3 s: {gaps:?}");
    Ok(())
}

// ID-2: a remote CA that accepts connections but never answers properly (here an echo server:
// the TLS handshake fails) is asked again after ~1, 2, 4, 8 s..., each wait longer than the one
// before, and the client pod's connections meanwhile (they fail: no certificate) make no request
// of their own: the CA sees exactly the attempts the proxy logs.
#[test]
fn a_failing_ca_is_retried_with_growing_intervals() -> io::Result<()> {
    let t = TwoNodes::new("certs::backoff")?;
    t.topo.write_config("c.yaml", &t.config("server", &[]))?;
    let _http = t.server.start_echo_server(EchoKind::Http, 8080)?;
    let ca = ca_dir(&t.topo, "ca");
    // Node 2 makes the CA directory whose root node 1 is told to trust.
    let _p2 = start_node(&t.topo, &t.n2, &ca, &[])?;
    let fake_ca = t.n1.spawn("fake-ca", bin_path("strait-echo"), &["tcp", "15012"], &[])?;
    fake_ca.wait_for_log("listening on", TIMEOUT)?;
    let root = ca.join("root-cert.pem").to_string_lossy().into_owned();
    let remote = ["--ca-address", "https://127.0.0.1:15012", "--ca-root", &root, "--ca-server-name", "strait-ca"];
    let p1 = start_node(&t.topo, &t.n1, &ca_dir(&t.topo, "unused"), &remote)?;

    let url = format!("http://{}:8080/", t.server.ip());
    let mut refused = 0;
    for _ in 0..40 {
        if !t.client.curl(&url, Duration::from_secs(5))?.ok() {
            refused += 1;
        }
        thread::sleep(Duration::from_millis(500));
    }
    let needle = "cannot obtain a certificate, next attempt in";
    let (attempts, gaps) = times(&p1, needle);
    let requests = fake_ca.count_log_lines("accepted peer=");
    eprintln!("{} attempts in ~22 s, gaps {gaps:?}; the CA saw {requests} connections", attempts.len());
    assert_eq!(refused, 40, "no certificate, no mesh connection");
    assert!((4..=6).contains(&attempts.len()), "{} attempts:\n{}", attempts.len(), p1.log_tail());
    assert!(requests.abs_diff(attempts.len()) <= 1, "{requests} connections to the CA for {} attempts", attempts.len());
    assert!((0.9..=1.5).contains(&gaps[0]), "first retry after {:.2} s", gaps[0]);
    for pair in gaps.windows(2) {
        assert!(pair[1] >= 1.4 * pair[0], "each wait longer than the last: {gaps:?}");
    }
    let line = p1.log().lines().find(|l| l.contains(needle)).map(str::to_owned).unwrap_or_default();
    assert!(line.contains(CLIENT_ID) && line.contains("TLS handshake failed"), "{line}");
    Ok(())
}
