//! End to end: spans over OTLP (SPEC OBS-7, OBS-4). Both node proxies and the waypoint export
//! to an OTLP/HTTP receiver written here (a plain HTTP server decoding OTLP's JSON encoding),
//! listening on a node of its own. One request from a client pod through node 1 → waypoint →
//! node 2 gives three spans chained by their parent ids, in the client's trace when it sent a
//! `traceparent`, in one trace of the node proxy's making when it sent none; an unsampled
//! `traceparent` is honoured. Needs root.

mod common;

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use common::{APP_NS, TIMEOUT, WaypointMesh, start_node, start_waypoint_with};
use serde_json::Value;
use strait_testbed::{EchoKind, k8s};

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// One span as the receiver decoded it, with the proxy that sent it.
#[derive(Debug, Clone)]
struct Received {
    /// `service.instance.id` of the resource: the node, or the waypoint `ns/name`.
    instance: String,
    service: String,
    trace: String,
    span: String,
    parent: String,
    kind: u64,
    attributes: BTreeMap<String, String>,
    links: Vec<(String, String)>,
}

/// An OTLP/HTTP receiver: POST /v1/traces with a JSON `ExportTraceServiceRequest`.
struct Receiver {
    spans: Arc<Mutex<Vec<Received>>>,
    bodies: Arc<Mutex<Vec<String>>>,
}

impl Receiver {
    fn start(listener: TcpListener) -> Receiver {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let (s, b) = (spans.clone(), bodies.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { return };
                if let Some(body) = read_request(stream) {
                    s.lock().expect("spans").extend(decode(&body));
                    b.lock().expect("bodies").push(body);
                }
            }
        });
        Receiver { spans, bodies }
    }

    fn spans(&self) -> Vec<Received> {
        self.spans.lock().expect("spans").clone()
    }

    /// Waits until `ready` holds for the spans received so far.
    fn wait(&self, what: &str, ready: impl Fn(&[Received]) -> bool) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let spans = self.spans();
            if ready(&spans) {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "no {what} within 15 s; received: {spans:#?}\nbodies: {:?}",
                self.bodies.lock().expect("bodies")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Reads one HTTP/1.1 request, answers 200 `{}`, and returns the body of a POST to /v1/traces.
fn read_request(stream: TcpStream) -> Option<String> {
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut reader = BufReader::new(stream.try_clone().ok()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).ok()?;
    let mut length = 0;
    let mut json = false;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).ok()?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        match name.to_ascii_lowercase().as_str() {
            "content-length" => length = value.trim().parse().ok()?,
            "content-type" => json = value.trim().starts_with("application/json"),
            _ => {}
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    let ok = request_line.starts_with("POST /v1/traces ") && json;
    let answer: &[u8] = if ok {
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"
    } else {
        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    };
    let mut stream = stream;
    stream.write_all(answer).ok()?;
    ok.then(|| String::from_utf8_lossy(&body).into_owned())
}

fn string_attributes(attributes: &Value) -> BTreeMap<String, String> {
    attributes
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let value = &a["value"];
            let text = value["stringValue"]
                .as_str()
                .map(str::to_owned)
                .or_else(|| value["intValue"].as_str().map(str::to_owned))?;
            Some((a["key"].as_str()?.to_owned(), text))
        })
        .collect()
}

fn decode(body: &str) -> Vec<Received> {
    let Ok(request) = serde_json::from_str::<Value>(body) else { return Vec::new() };
    let mut out = Vec::new();
    for resource in request["resourceSpans"].as_array().into_iter().flatten() {
        let own = string_attributes(&resource["resource"]["attributes"]);
        for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
            for span in scope["spans"].as_array().into_iter().flatten() {
                let text = |k: &str| span[k].as_str().unwrap_or_default().to_owned();
                out.push(Received {
                    instance: own.get("service.instance.id").cloned().unwrap_or_default(),
                    service: own.get("service.name").cloned().unwrap_or_default(),
                    trace: text("traceId"),
                    span: text("spanId"),
                    parent: text("parentSpanId"),
                    kind: span["kind"].as_u64().unwrap_or(0),
                    attributes: string_attributes(&span["attributes"]),
                    links: span["links"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|l| {
                            let text = |k: &str| l[k].as_str().unwrap_or_default().to_owned();
                            (text("traceId"), text("spanId"))
                        })
                        .collect(),
                });
            }
        }
    }
    out
}

fn attr<'a>(span: &'a Received, key: &str) -> Option<&'a str> {
    span.attributes.get(key).map(String::as_str)
}

fn waypoint_span<'a>(spans: &'a [Received], path: &str) -> Option<&'a Received> {
    spans.iter().find(|s| s.instance == "shop/waypoint" && attr(s, "url.path") == Some(path))
}

// OBS-7: node 1 → waypoint → node 2, chained by parent ids; the client's trace is joined when
// it sent one, the node proxy's continued when it did not, an unsampled one exports nothing.
#[test]
fn spans_of_one_request_chain_through_node_waypoint_node() -> std::io::Result<()> {
    let m = WaypointMesh::new("trace::chain", &["reviews-v1", "ratings-v1"])?;
    let otel = m.topo.add_node("otel")?;
    let listener = otel.netns().run_in(|| TcpListener::bind("0.0.0.0:4318"))??;
    let receiver = Receiver::start(listener);
    let mut yaml = m.base_config();
    for (pod, app, vip) in [(&m.backends[0], "reviews", "10.96.0.30"), (&m.backends[1], "ratings", "10.96.0.31")] {
        yaml.push_str(&k8s::pod_yaml(pod, APP_NS, app, &[("app", app)]));
        yaml.push_str(&k8s::named_service_yaml(app, APP_NS, vip, &[("http", 9080, 9080)], &[("app", app)], &[]));
    }
    m.topo.write_config("c.yaml", &yaml)?;
    let _servers = [
        m.backends[0].echo_server(EchoKind::Http, 9080).name("reviews-v1").start()?,
        m.backends[1].echo_server(EchoKind::Http, 9080).name("ratings-v1").start()?,
    ];
    let endpoint = format!("http://{}:4318", otel.ip());
    let tracing = ["--otlp-endpoint", endpoint.as_str(), "--trace-sampling", "100"];
    let _p1 = start_node(&m.topo, &m.n1, &m.ca, &tracing)?;
    let _p2 = start_node(&m.topo, &m.n2, &m.ca, &tracing)?;
    let wp = start_waypoint_with(&m.topo, &m.waypoint_pod, &m.ca, "waypoint", APP_NS, &tracing)?;

    // A: no trace context from the client. B: the client's own, sampled. C: the client's own,
    // not sampled (to the first service again, whose upstream connection is pooled by now).
    assert!(m.client.curl("http://10.96.0.30:9080/a", TIMEOUT)?.ok());
    let sampled = format!("traceparent: 00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    assert!(m.client.curl_args(&["-H", &sampled, "http://10.96.0.31:9080/b"])?.ok());
    let unsampled = format!("traceparent: 00-{CLIENT_TRACE}-{CLIENT_SPAN}-00");
    assert!(m.client.curl_args(&["-H", &unsampled, "http://10.96.0.30:9080/c"])?.ok());

    receiver.wait("waypoint spans of A and B and node 1 spans of A, B, C", |s| {
        waypoint_span(s, "/a").is_some()
            && waypoint_span(s, "/b").is_some()
            && s.iter().filter(|s| s.instance == "node1").count() >= 3
    });
    // The waypoint's upstream connections close when it stops: node 2's spans come then.
    std::thread::sleep(Duration::from_secs(1));
    wp.terminate(libc::SIGTERM)?;
    let spans = receiver
        .wait("node 2 spans of both upstream connections", |s| s.iter().filter(|s| s.instance == "node2").count() >= 2);

    let node1: Vec<&Received> = spans.iter().filter(|s| s.instance == "node1").collect();
    let node2: Vec<&Received> = spans.iter().filter(|s| s.instance == "node2").collect();
    assert!(node1.iter().all(|s| s.service == "strait-node" && s.kind == 3 && s.parent.is_empty()), "{node1:#?}");
    assert!(node2.iter().all(|s| s.kind == 2), "{node2:#?}");

    // A: one trace, started by node 1.
    let a = waypoint_span(&spans, "/a").expect("waypoint span of A");
    assert_eq!((a.kind, a.service.as_str()), (2, "waypoint.shop"), "{a:#?}");
    let a_parent = node1.iter().find(|s| s.span == a.parent).unwrap_or_else(|| panic!("A's parent in {node1:#?}"));
    assert_eq!(a_parent.trace, a.trace, "one trace: {a_parent:#?} {a:#?}");
    assert_eq!(attr(a_parent, "destination.workload"), Some("shop/waypoint"), "{a_parent:#?}");
    assert_eq!(attr(a_parent, "source.workload"), Some("shop/client"), "{a_parent:#?}");
    assert_eq!(attr(a, "source.workload"), Some("shop/client"), "{a:#?}");
    assert_eq!(attr(a, "destination.workload"), Some("shop/reviews-v1"), "{a:#?}");
    assert_eq!(attr(a, "destination.service"), Some("reviews.shop.svc.cluster.local"), "{a:#?}");
    assert_eq!(attr(a, "http.response.status_code"), Some("200"), "{a:#?}");
    assert!(a.links.is_empty(), "{a:#?}");
    let a_child = node2.iter().find(|s| s.parent == a.span).unwrap_or_else(|| panic!("A's child in {node2:#?}"));
    assert_eq!(a_child.trace, a.trace, "{a_child:#?}");
    assert_eq!(attr(a_child, "source.workload"), Some("shop/waypoint"), "{a_child:#?}");
    assert_eq!(attr(a_child, "destination.workload"), Some("shop/reviews-v1"), "{a_child:#?}");

    // B: the client's trace; node 1's connection span is linked, not the parent.
    let b = waypoint_span(&spans, "/b").expect("waypoint span of B");
    assert_eq!((b.trace.as_str(), b.parent.as_str()), (CLIENT_TRACE, CLIENT_SPAN), "{b:#?}");
    assert_eq!(attr(b, "destination.workload"), Some("shop/ratings-v1"), "{b:#?}");
    let [(link_trace, link_span)] = b.links.as_slice() else { panic!("one link: {b:#?}") };
    assert!(node1.iter().any(|s| &s.trace == link_trace && &s.span == link_span), "B links node 1's span: {b:#?}");
    let b_child = node2.iter().find(|s| s.parent == b.span).unwrap_or_else(|| panic!("B's child in {node2:#?}"));
    assert_eq!(b_child.trace, CLIENT_TRACE, "{b_child:#?}");
    assert_eq!(attr(b_child, "destination.workload"), Some("shop/ratings-v1"), "{b_child:#?}");

    // C: not sampled by the client, so not by the waypoint.
    assert!(waypoint_span(&spans, "/c").is_none(), "{spans:#?}");
    for (case, span, parent, child) in [("A", a, a_parent.span.as_str(), a_child), ("B", b, CLIENT_SPAN, b_child)] {
        println!("{case}: trace {}, parent {parent} -> waypoint {} -> node 2 {}", span.trace, span.span, child.span);
    }
    Ok(())
}
