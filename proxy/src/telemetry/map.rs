//! The live mesh map's data (OBS-6): every proxy keeps a table of the traffic it reported, one
//! edge per reporter, source workload, destination and protocol, with a one-minute window of
//! counts and latencies and the last few connections or requests; `/map.json` serves it merged,
//! and `strait control` merges the tables of every proxy it serves.
//!
//! Cost per connection or request: one hash of the two ends' names (no allocation), one short
//! lock, a few additions, and the move of the finished record's method, path and reason into the
//! edge's ring of recent events (strings the record already owned; the oldest event is dropped).
//! Memory is bounded: `MAX_EDGES` edges of `RECENT` events each, paths cut at `MAX_PATH` bytes.
//!
//! Recent events carry no query string, request id nor identity: the table is also served on
//! the metrics port, for the control plane, and holds nothing a metric label would not show
//! beyond the request path.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, VecDeque},
    hash::{DefaultHasher, Hash, Hasher},
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::{labels::workload_name, rfc3339};
use crate::model::{Service, Workload};

/// Edges kept; a new edge beyond them replaces the one seen longest ago.
const MAX_EDGES: usize = 512;
/// Recent events kept per edge.
pub const RECENT: usize = 16;
/// Longest path kept in an event, in bytes.
const MAX_PATH: usize = 200;
/// The window rates, success and p99 are computed over: `SLOTS` slots of `SLOT_SECONDS`.
const SLOT_SECONDS: u64 = 10;
const SLOTS: usize = 6;
pub const WINDOW_SECONDS: u64 = SLOT_SECONDS * SLOTS as u64;
/// Upper bounds of the latency buckets, milliseconds; a last bucket takes the rest. Finer than
/// Istio's metric buckets below 100 ms, where a mesh's latencies are.
const BUCKETS_MS: [u64; 14] = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000];

/// What a node of the map is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeKind {
    Workload,
    Waypoint,
    Service,
    Unknown,
}

/// One end of an edge, as the record names it; borrowed from the record.
#[derive(Debug, Clone, Copy)]
pub struct End<'a> {
    kind: NodeKind,
    namespace: &'a str,
    name: &'a str,
}

impl<'a> End<'a> {
    /// A workload by its Istio workload name (the controller's, not the pod's), unknown when
    /// the mesh does not know the address.
    pub fn workload(workload: Option<&'a Workload>) -> Self {
        match workload {
            Some(w) => Self {
                kind: if w.waypoint_role.is_some() { NodeKind::Waypoint } else { NodeKind::Workload },
                namespace: &w.namespace,
                name: workload_name(w),
            },
            None => Self::UNKNOWN,
        }
    }

    /// The destination: the workload reached, else the service addressed, else unknown.
    pub fn destination(workload: Option<&'a Workload>, service: Option<&'a Service>) -> Self {
        match (workload, service) {
            (Some(_), _) => Self::workload(workload),
            (None, Some(s)) => Self { kind: NodeKind::Service, namespace: &s.namespace, name: &s.hostname },
            (None, None) => Self::UNKNOWN,
        }
    }

    const UNKNOWN: Self = Self { kind: NodeKind::Unknown, namespace: "", name: "unknown" };

    fn id(&self) -> String {
        if self.namespace.is_empty() { self.name.to_owned() } else { format!("{}/{}", self.namespace, self.name) }
    }

    fn owned(&self) -> MapNode {
        MapNode { id: self.id(), namespace: self.namespace.to_owned(), name: self.name.to_owned(), kind: self.kind }
    }
}

/// How a connection or request ended, for the edge's counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// Failed upstream or broken (5xx, connect failure, reset).
    Error,
    /// Refused by the mesh: an authorization policy, a missing or bad token, STRICT mTLS.
    Denied,
}

/// One connection or request as the map keeps it. The short texts are static strings of the
/// proxy (or the record's own), so keeping an event allocates nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapEvent {
    /// When it started, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// `source`, `destination` or `waypoint`.
    pub reporter: Cow<'static, str>,
    /// The HTTP status; 0 for a TCP connection.
    pub status: u16,
    /// `ok`, `refused`, `broken`...; for a request, `ok`, `error` or `denied`.
    pub result: Cow<'static, str>,
    /// Envoy's response flags, `-` for none.
    pub flags: Cow<'static, str>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub method: String,
    /// The path without its query.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub path: String,
    pub duration_ms: u64,
    pub sent: u64,
    pub received: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl MapEvent {
    /// An event of `reporter` that started at `started`; the caller fills in the rest.
    pub fn new(reporter: &'static str, started: SystemTime, duration: Duration) -> Self {
        Self {
            time_ms: started.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
            reporter: Cow::Borrowed(reporter),
            status: 0,
            result: Cow::Borrowed("ok"),
            flags: Cow::Borrowed("-"),
            method: String::new(),
            path: String::new(),
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            sent: 0,
            received: 0,
            reason: None,
        }
    }
}

/// What a reporter saw of an edge within the window, plus its totals.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub reporter: String,
    /// The proxy that reported it (`node node1`, `waypoint shop/waypoint`).
    pub proxy: String,
    /// Connections or requests since the proxy started.
    pub total: u64,
    pub denied_total: u64,
    /// Within the window.
    pub count: u64,
    pub errors: u64,
    pub denied: u64,
    /// Per second over the window.
    pub rate: f64,
    /// The share neither failed nor denied, within the window; `None` without traffic.
    pub success: Option<f64>,
    /// Milliseconds, from the window's histogram (a bucket's upper bound, or the slowest seen).
    pub p99_ms: Option<f64>,
    /// `mutual_tls`, `none`, or `mixed` when both were seen.
    pub security: String,
}

/// A node of the map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MapNode {
    pub id: String,
    pub namespace: String,
    pub name: String,
    pub kind: NodeKind,
}

/// An edge of the map: what its preferred reporter saw, every report, the recent events.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MapEdge {
    /// `source->destination`, the ids of its nodes.
    pub id: String,
    pub source: String,
    pub destination: String,
    /// `tcp` (connections) or `http` (requests, at a waypoint or gateway).
    pub protocol: String,
    /// The figures below are this reporter's: the destination's when it reported, as it sees
    /// denials and the mTLS that really arrived.
    pub reporter: String,
    pub rate: f64,
    pub success: Option<f64>,
    pub p99_ms: Option<f64>,
    pub security: String,
    /// Denied within the window, by any reporter.
    pub denied: u64,
    pub denied_total: u64,
    pub reports: Vec<Report>,
    /// Newest first.
    pub recent: Vec<MapEvent>,
}

/// The map: what `/map.json` serves.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MeshMap {
    pub generated: String,
    pub window_seconds: u64,
    /// The proxies whose tables are in it.
    pub proxies: Vec<String>,
    /// Proxies whose table could not be read, with the reason (the control plane's map).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<String>,
    pub nodes: Vec<MapNode>,
    pub edges: Vec<MapEdge>,
}

impl MeshMap {
    /// Merges maps of several proxies: the reports of an edge are put together and its figures
    /// taken from the preferred reporter again; recent events are interleaved, newest first.
    pub fn merge(maps: Vec<MeshMap>) -> MeshMap {
        let mut nodes = BTreeMap::new();
        let mut edges: BTreeMap<EdgeId, Gathered> = BTreeMap::new();
        let mut merged =
            MeshMap { window_seconds: WINDOW_SECONDS, generated: rfc3339(SystemTime::now()), ..Default::default() };
        for map in maps {
            merged.proxies.extend(map.proxies);
            merged.unreachable.extend(map.unreachable);
            for node in map.nodes {
                nodes.entry(node.id.clone()).or_insert(node);
            }
            for edge in map.edges {
                let entry = edges.entry((edge.source, edge.destination, edge.protocol)).or_default();
                entry.reports.extend(edge.reports);
                entry.recent.extend(edge.recent);
            }
        }
        merged.nodes = nodes.into_values().collect();
        merged.edges = edges.into_iter().map(|(id, gathered)| build_edge(id, gathered)).collect();
        merged
    }
}

/// The reporter whose figures an edge shows: the destination's, then the waypoint's.
fn preference(reporter: &str) -> u8 {
    match reporter {
        "destination" => 0,
        "waypoint" => 1,
        _ => 2,
    }
}

/// Source, destination and protocol: what makes an edge of the map.
type EdgeId = (String, String, String);

/// An edge's reports and recent events from every reporter, before they are merged.
#[derive(Default)]
struct Gathered {
    reports: Vec<Report>,
    recent: Vec<MapEvent>,
}

fn build_edge((source, destination, protocol): EdgeId, gathered: Gathered) -> MapEdge {
    let Gathered { mut reports, mut recent } = gathered;
    reports.sort_by(|a, b| preference(&a.reporter).cmp(&preference(&b.reporter)).then(a.proxy.cmp(&b.proxy)));
    // Several proxies of one kind (two waypoint replicas) each saw part of the traffic: add
    // their counts up; success and p99 stay the busiest one's.
    let reporter = reports.first().map(|b| b.reporter.clone()).unwrap_or_default();
    let same: Vec<&Report> = reports.iter().filter(|r| r.reporter == reporter).collect();
    let rate = same.iter().map(|r| r.rate).sum();
    let busiest = same.iter().max_by_key(|r| r.count);
    let (success, p99_ms) = (busiest.and_then(|r| r.success), busiest.and_then(|r| r.p99_ms));
    let security = busiest.map(|r| r.security.clone()).unwrap_or_default();
    let denied = reports.iter().map(|r| r.denied).max().unwrap_or(0);
    let denied_total = reports.iter().map(|r| r.denied_total).max().unwrap_or(0);
    recent.sort_by_key(|e| std::cmp::Reverse(e.time_ms));
    recent.truncate(RECENT);
    MapEdge {
        id: format!("{source}->{destination}"),
        reporter,
        rate,
        success,
        p99_ms,
        security,
        denied,
        denied_total,
        source,
        destination,
        protocol,
        reports,
        recent,
    }
}

/// One slot of the window.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    /// `seconds since start / SLOT_SECONDS` of the counts held; older counts are cleared.
    epoch: u64,
    count: u32,
    errors: u32,
    denied: u32,
    max_ms: u64,
    latency: [u32; BUCKETS_MS.len() + 1],
}

/// What one reporter saw of one edge.
#[derive(Debug)]
struct Edge {
    reporter: &'static str,
    protocol: &'static str,
    source: MapNode,
    destination: MapNode,
    total: u64,
    denied_total: u64,
    mutual_tls: u64,
    plaintext: u64,
    slots: [Slot; SLOTS],
    recent: VecDeque<MapEvent>,
    last_seen: Instant,
}

impl Edge {
    /// One more connection or request, in slot `i`.
    fn count(&mut self, i: usize, security: &str) {
        self.total += 1;
        // `unknown` (a gateway's clients) counts as neither.
        match security {
            "mutual_tls" => self.mutual_tls += 1,
            "none" => self.plaintext += 1,
            _ => {}
        }
        self.slots[i].count = self.slots[i].count.saturating_add(1);
    }

    fn matches(&self, reporter: &str, protocol: &str, source: &End<'_>, destination: &End<'_>) -> bool {
        let same = |node: &MapNode, end: &End<'_>| {
            node.kind == end.kind && node.namespace == end.namespace && node.name == end.name
        };
        self.reporter == reporter
            && self.protocol == protocol
            && same(&self.source, source)
            && same(&self.destination, destination)
    }

    fn report(&self, proxy: &str, now_epoch: u64, covered: f64) -> Report {
        let live = self.slots.iter().filter(|s| s.epoch + SLOTS as u64 > now_epoch && s.count > 0);
        let (mut count, mut errors, mut denied, mut max_ms) = (0u64, 0u64, 0u64, 0u64);
        let mut latency = [0u64; BUCKETS_MS.len() + 1];
        for slot in live {
            count += u64::from(slot.count);
            errors += u64::from(slot.errors);
            denied += u64::from(slot.denied);
            max_ms = max_ms.max(slot.max_ms);
            for (sum, n) in latency.iter_mut().zip(slot.latency) {
                *sum += u64::from(n);
            }
        }
        let security = match (self.mutual_tls, self.plaintext) {
            (0, 0) => "unknown",
            (_, 0) => "mutual_tls",
            (0, _) => "none",
            _ => "mixed",
        };
        Report {
            reporter: self.reporter.to_owned(),
            proxy: proxy.to_owned(),
            total: self.total,
            denied_total: self.denied_total,
            count,
            errors,
            denied,
            rate: count as f64 / covered,
            success: (count > 0).then(|| (count - errors - denied) as f64 / count as f64),
            // Connections still open are counted but have no duration yet.
            p99_ms: p99(&latency, latency.iter().sum(), max_ms),
            security: security.to_owned(),
        }
    }
}

/// The 99th percentile of a histogram: the upper bound of the bucket it falls in, or the
/// slowest observation when that is lower (or the bucket has no bound).
fn p99(latency: &[u64], count: u64, max_ms: u64) -> Option<f64> {
    if count == 0 {
        return None;
    }
    let rank = count.saturating_mul(99).div_ceil(100);
    let mut seen = 0;
    for (i, n) in latency.iter().enumerate() {
        seen += n;
        if seen >= rank {
            let bound = BUCKETS_MS.get(i).copied().unwrap_or(u64::MAX);
            return Some(bound.min(max_ms.max(1)) as f64);
        }
    }
    Some(max_ms as f64)
}

/// A proxy's edge table.
#[derive(Debug)]
pub struct TrafficMap {
    /// `node node1`, `waypoint shop/waypoint`: who reports, in merged maps.
    proxy: String,
    started: Instant,
    edges: Mutex<HashMap<u64, Edge>>,
}

/// One observation for the table.
pub struct Observation<'a> {
    pub reporter: &'static str,
    pub protocol: &'static str,
    pub source: End<'a>,
    pub destination: End<'a>,
    /// `mutual_tls` or `none`.
    pub security: &'static str,
    pub verdict: Verdict,
    pub duration: Duration,
    /// Already counted by `opened`.
    pub counted: bool,
    pub event: MapEvent,
}

impl TrafficMap {
    pub fn new(proxy: impl Into<String>) -> Self {
        Self { proxy: proxy.into(), started: Instant::now(), edges: Mutex::new(HashMap::new()) }
    }

    /// Counts a connection as it opens, so that a long-lived one shows while it lasts;
    /// `observe` with `counted` set then adds only how it ended.
    pub fn opened(&self, reporter: &'static str, source: End<'_>, destination: End<'_>, security: &'static str) {
        self.update(reporter, "tcp", &source, &destination, |edge, slot| edge.count(slot, security));
    }

    /// Counts one finished connection or request.
    pub fn observe(&self, o: Observation<'_>) {
        let Observation { reporter, protocol, source, destination, security, verdict, duration, counted, event } = o;
        self.update(reporter, protocol, &source, &destination, |edge, i| {
            if !counted {
                edge.count(i, security);
            }
            let slot = &mut edge.slots[i];
            match verdict {
                Verdict::Ok => {}
                Verdict::Error => slot.errors = slot.errors.saturating_add(1),
                Verdict::Denied => {
                    slot.denied = slot.denied.saturating_add(1);
                    edge.denied_total += 1;
                }
            }
            let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
            slot.max_ms = slot.max_ms.max(ms);
            let bucket = BUCKETS_MS.iter().position(|bound| ms < *bound).unwrap_or(BUCKETS_MS.len());
            slot.latency[bucket] = slot.latency[bucket].saturating_add(1);
            if edge.recent.len() == RECENT {
                edge.recent.pop_back();
            }
            edge.recent.push_front(event);
        });
    }

    /// Runs `f` on the edge (made if new) and the index of the window's current slot (cleared
    /// if it held an older slot's counts), under the table's lock.
    fn update(
        &self,
        reporter: &'static str,
        protocol: &'static str,
        source: &End<'_>,
        destination: &End<'_>,
        f: impl FnOnce(&mut Edge, usize),
    ) {
        let key = edge_key(reporter, protocol, source, destination);
        let now = Instant::now();
        let epoch = now.duration_since(self.started).as_secs() / SLOT_SECONDS;
        let mut edges = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        if !edges.contains_key(&key) && edges.len() >= MAX_EDGES {
            let oldest = edges.iter().min_by_key(|(_, e)| e.last_seen).map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                edges.remove(&oldest);
            }
        }
        let edge = edges.entry(key).or_insert_with(|| Edge {
            reporter,
            protocol,
            source: source.owned(),
            destination: destination.owned(),
            total: 0,
            denied_total: 0,
            mutual_tls: 0,
            plaintext: 0,
            slots: [Slot::default(); SLOTS],
            recent: VecDeque::with_capacity(RECENT),
            last_seen: now,
        });
        // Two ends whose names hash alike (odds of 2^-64 per pair): the later one is not counted
        // rather than counted on the wrong edge.
        if !edge.matches(reporter, protocol, source, destination) {
            return;
        }
        edge.last_seen = now;
        let i = (epoch % SLOTS as u64) as usize;
        if edge.slots[i].epoch != epoch {
            edge.slots[i] = Slot { epoch, ..Slot::default() };
        }
        f(edge, i);
    }

    /// The table as a map, reporters of one edge merged.
    pub fn snapshot(&self) -> MeshMap {
        let elapsed = self.started.elapsed();
        let epoch = elapsed.as_secs() / SLOT_SECONDS;
        // Rates are per second of the window, or of the proxy's life while it is younger.
        let covered = elapsed.as_secs_f64().clamp(1.0, WINDOW_SECONDS as f64);
        let edges = self.edges.lock().unwrap_or_else(|p| p.into_inner());
        let mut nodes = BTreeMap::new();
        let mut grouped: BTreeMap<EdgeId, Gathered> = BTreeMap::new();
        for edge in edges.values() {
            for node in [&edge.source, &edge.destination] {
                nodes.entry(node.id.clone()).or_insert_with(|| node.clone());
            }
            let entry = grouped
                .entry((edge.source.id.clone(), edge.destination.id.clone(), edge.protocol.to_owned()))
                .or_default();
            entry.reports.push(edge.report(&self.proxy, epoch, covered));
            entry.recent.extend(edge.recent.iter().cloned());
        }
        drop(edges);
        MeshMap {
            generated: rfc3339(SystemTime::now()),
            window_seconds: WINDOW_SECONDS,
            proxies: vec![self.proxy.clone()],
            unreachable: Vec::new(),
            nodes: nodes.into_values().collect(),
            edges: grouped.into_iter().map(|(id, gathered)| build_edge(id, gathered)).collect(),
        }
    }

    /// `/map.json`.
    pub fn json(&self) -> String {
        serde_json::to_string(&self.snapshot()).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

fn edge_key(reporter: &str, protocol: &str, source: &End<'_>, destination: &End<'_>) -> u64 {
    let mut h = DefaultHasher::new();
    (reporter, protocol).hash(&mut h);
    for end in [source, destination] {
        (end.kind, end.namespace, end.name).hash(&mut h);
    }
    h.finish()
}

/// A path as the map keeps it: without its query (which may hold secrets), at most `MAX_PATH`
/// bytes; in place, so a path the record owned costs nothing more.
pub fn trim_path(mut path: String) -> String {
    if let Some(q) = path.find('?') {
        path.truncate(q);
    }
    if path.len() > MAX_PATH {
        let mut cut = MAX_PATH;
        while !path.is_char_boundary(cut) {
            cut -= 1;
        }
        path.truncate(cut);
    }
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(ns: &str, name: &str) -> Workload {
        crate::telemetry::test_workload(ns, name)
    }

    fn event(reporter: &'static str) -> MapEvent {
        MapEvent::new(reporter, SystemTime::now(), Duration::from_millis(1))
    }

    fn observe(map: &TrafficMap, reporter: &'static str, src: &Workload, dst: &Workload, verdict: Verdict, ms: u64) {
        map.observe(Observation {
            reporter,
            protocol: "tcp",
            source: End::workload(Some(src)),
            destination: End::workload(Some(dst)),
            security: "mutual_tls",
            verdict,
            duration: Duration::from_millis(ms),
            counted: false,
            event: event(reporter),
        });
    }

    // OBS-6: an edge counts, keeps its recent events, and shows the destination's figures.
    #[test]
    fn edges_count_and_prefer_the_destination_reporter() {
        let (client, server) = (workload("mesh", "client"), workload("mesh", "server"));
        let map = TrafficMap::new("node node1");
        for _ in 0..98 {
            observe(&map, "destination", &client, &server, Verdict::Ok, 3);
        }
        observe(&map, "destination", &client, &server, Verdict::Denied, 0);
        observe(&map, "destination", &client, &server, Verdict::Error, 700);
        observe(&map, "source", &client, &server, Verdict::Error, 1);
        let snapshot = map.snapshot();
        assert_eq!(snapshot.edges.len(), 1, "{snapshot:?}");
        let edge = &snapshot.edges[0];
        assert_eq!(edge.id, "mesh/client->mesh/server");
        assert_eq!((edge.reporter.as_str(), edge.reports.len()), ("destination", 2));
        assert_eq!((edge.denied, edge.denied_total), (1, 1));
        assert_eq!(edge.success, Some(0.98));
        assert_eq!(edge.p99_ms, Some(5.0), "99 of 100 below 5 ms");
        assert_eq!(edge.security, "mutual_tls");
        assert_eq!(edge.recent.len(), RECENT);
        assert_eq!(snapshot.nodes.iter().map(|n| n.id.as_str()).collect::<Vec<_>>(), ["mesh/client", "mesh/server"]);
    }

    // A connection shows while it is open, and counts once when it closes.
    #[test]
    fn open_connections_count_once() {
        let (client, server) = (workload("mesh", "client"), workload("mesh", "server"));
        let map = TrafficMap::new("node node1");
        map.opened("source", End::workload(Some(&client)), End::workload(Some(&server)), "mutual_tls");
        let open = map.snapshot();
        assert_eq!((open.edges.len(), open.edges[0].reports[0].total), (1, 1), "{open:?}");
        assert_eq!(open.edges[0].p99_ms, None, "no duration while it is open");
        assert!(open.edges[0].recent.is_empty());
        map.observe(Observation {
            reporter: "source",
            protocol: "tcp",
            source: End::workload(Some(&client)),
            destination: End::workload(Some(&server)),
            security: "mutual_tls",
            verdict: Verdict::Ok,
            duration: Duration::from_millis(40),
            counted: true,
            event: event("source"),
        });
        let closed = map.snapshot();
        let report = &closed.edges[0].reports[0];
        assert_eq!((report.total, report.count, report.p99_ms), (1, 1, Some(40.0)), "{report:?}");
        assert_eq!(closed.edges[0].recent.len(), 1);
    }

    #[test]
    fn the_table_stays_bounded() {
        let map = TrafficMap::new("node node1");
        let client = workload("mesh", "client");
        for i in 0..MAX_EDGES + 10 {
            observe(&map, "source", &client, &workload("mesh", &format!("s{i}")), Verdict::Ok, 1);
        }
        assert_eq!(map.snapshot().edges.len(), MAX_EDGES);
    }

    #[test]
    fn p99_takes_the_bucket_bound_or_the_slowest() {
        let mut latency = [0u64; BUCKETS_MS.len() + 1];
        latency[0] = 100;
        assert_eq!(p99(&latency, 100, 0), Some(1.0));
        latency[3] = 2;
        assert_eq!(p99(&latency, 102, 7), Some(7.0), "the bucket below 10 ms, slowest 7 ms");
        assert_eq!(p99(&latency, 0, 0), None);
    }

    // Merging the maps of two proxies keeps one edge with both reports.
    #[test]
    fn maps_of_two_proxies_merge() {
        let (client, server) = (workload("mesh", "client"), workload("mesh", "server"));
        let (n1, n2) = (TrafficMap::new("node node1"), TrafficMap::new("node node2"));
        observe(&n1, "source", &client, &server, Verdict::Error, 1);
        observe(&n2, "destination", &client, &server, Verdict::Denied, 1);
        let json = serde_json::to_string(&n1.snapshot()).expect("json");
        let parsed: MeshMap = serde_json::from_str(&json).expect("parse");
        let merged = MeshMap::merge(vec![parsed, n2.snapshot()]);
        assert_eq!(merged.proxies, ["node node1", "node node2"]);
        assert_eq!(merged.edges.len(), 1);
        let edge = &merged.edges[0];
        assert_eq!((edge.reporter.as_str(), edge.denied, edge.success), ("destination", 1, Some(0.0)));
        assert_eq!(edge.recent.len(), 2);
    }

    #[test]
    fn paths_lose_their_query() {
        assert_eq!(trim_path("/a/b?token=secret".into()), "/a/b");
        assert_eq!(trim_path("é".repeat(150)).len(), MAX_PATH);
    }
}
