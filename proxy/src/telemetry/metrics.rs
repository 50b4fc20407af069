//! Prometheus metrics of the node proxy (OBS-1): Istio's four TCP families, and counters that
//! live elsewhere (the eBPF programs' maps) read when Prometheus scrapes.
//!
//! Cost on the connection path: `opened` builds one label set (a dozen short strings) and looks
//! up four counters in their families (a hash of the label set under a read lock each, ~0.3 µs);
//! `closed` is three atomic adds, plus one lookup when a response flag is set. Byte counters are
//! added when the connection closes, so a long-lived connection shows its bytes at the end.
//!
//! Cost of a scrape: every label set of every family is encoded (one line per distinct
//! source/destination/flags combination, under each family's read lock, which connections only
//! contend on when they create a new label set), and each scrape-time source runs once (for the
//! capture counters: the capture lock and one map read per counter). The Prometheus text format
//! costs one more pass over the text.

use std::{borrow::Cow, fmt};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, counter::Counter, family::Family, gauge::ConstGauge},
    registry::Registry,
};

use super::labels::TrafficLabels;

/// The text formats `/metrics` speaks, chosen by the scraper's `Accept` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exposition {
    /// OpenMetrics 1.0, which Prometheus asks for first.
    OpenMetrics,
    /// Prometheus text 0.0.4, for everything else (older scrapers, curl, parsers of the classic
    /// format): counters are typed under their `_total` name there, as Istio's proxies write them.
    Prometheus,
}

impl Exposition {
    /// The format a scraper sending `accept` wants.
    pub fn negotiate(accept: Option<&str>) -> Self {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Exposition::OpenMetrics,
            _ => Exposition::Prometheus,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Exposition::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Exposition::Prometheus => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

/// Istio's TCP metric families (`istio_tcp_*_total`).
#[derive(Debug, Default)]
pub struct TrafficMetrics {
    opened: Family<TrafficLabels, Counter>,
    closed: Family<TrafficLabels, Counter>,
    /// Bytes from client to server (Istio's "received during request").
    received_bytes: Family<TrafficLabels, Counter>,
    /// Bytes from server to client (Istio's "sent during response").
    sent_bytes: Family<TrafficLabels, Counter>,
}

/// The counters of one connection's label set, resolved when it opened. The label set itself
/// is not kept: it is a score of strings, and an open connection holding its own copy was a
/// good part of the proxy's memory per idle connection; the rare close with response flags
/// builds it again.
#[derive(Debug, Clone)]
pub struct ConnectionCounters {
    closed: Counter,
    received_bytes: Counter,
    sent_bytes: Counter,
}

impl TrafficMetrics {
    /// Counts a connection as opened and resolves the counters it will update on close.
    pub fn open(&self, labels: &TrafficLabels) -> ConnectionCounters {
        self.opened.get_or_create(labels).inc();
        ConnectionCounters {
            closed: self.closed.get_or_create_owned(labels),
            received_bytes: self.received_bytes.get_or_create_owned(labels),
            sent_bytes: self.sent_bytes.get_or_create_owned(labels),
        }
    }

    /// Counts a connection as closed. As ztunnel does, the closed counter carries the final
    /// response flags while the byte counters keep the labels the connection opened with (whose
    /// flags are always `-`); `labels` gives the label set again when the flags differ.
    pub fn close(
        &self,
        counters: &ConnectionCounters,
        response_flags: &'static str,
        labels: impl FnOnce() -> TrafficLabels,
        client_bytes: u64,
        server_bytes: u64,
    ) {
        if response_flags == super::labels::NO_FLAGS {
            counters.closed.inc();
        } else {
            let flagged = TrafficLabels { response_flags, ..labels() };
            self.closed.get_or_create(&flagged).inc();
        }
        counters.received_bytes.inc_by(client_bytes);
        counters.sent_bytes.inc_by(server_bytes);
    }
}

/// Counters owned by another part of the proxy and read at scrape time, so the metrics module
/// needs to know nothing about where they live (eBPF maps, for the capture and XDP programs).
pub struct ScrapedCounters {
    name: String,
    help: String,
    shape: Shape,
    read: ReadCounters,
}

/// Calls its argument once per counter: (name or label value, value).
type ReadCounters = Box<dyn Fn(&mut dyn FnMut(&str, u64)) + Send + Sync>;

enum Shape {
    /// One metric per counter: `<name>_<counter>_total`.
    Each,
    /// One family, the counter's name in a label: `<name>_total{<label>="<counter>"}`.
    ByLabel(&'static str),
}

impl ScrapedCounters {
    /// One metric per counter `read` returns, named `<prefix>_<counter>_total`
    /// (e.g. `strait_capture_steered_total`).
    pub fn each<F, I, N>(prefix: &str, help: &str, read: F) -> Self
    where
        F: Fn() -> I + Send + Sync + 'static,
        I: IntoIterator<Item = (N, u64)>,
        N: AsRef<str>,
    {
        Self::new(prefix, help, Shape::Each, read)
    }

    /// One counter family `<name>_total` with the counters `read` returns as values of `label`
    /// (e.g. `strait_xdp_drops_total{reason="strict_plaintext"}`).
    pub fn by_label<F, I, N>(name: &str, help: &str, label: &'static str, read: F) -> Self
    where
        F: Fn() -> I + Send + Sync + 'static,
        I: IntoIterator<Item = (N, u64)>,
        N: AsRef<str>,
    {
        Self::new(name, help, Shape::ByLabel(label), read)
    }

    fn new<F, I, N>(name: &str, help: &str, shape: Shape, read: F) -> Self
    where
        F: Fn() -> I + Send + Sync + 'static,
        I: IntoIterator<Item = (N, u64)>,
        N: AsRef<str>,
    {
        let read = move |emit: &mut dyn FnMut(&str, u64)| {
            for (name, value) in read() {
                emit(name.as_ref(), value);
            }
        };
        Self { name: name.to_owned(), help: help.to_owned(), shape, read: Box::new(read) }
    }
}

impl fmt::Debug for ScrapedCounters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScrapedCounters").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Collector for ScrapedCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut result = Ok(());
        match self.shape {
            Shape::Each => (self.read)(&mut |counter, value| {
                if result.is_err() {
                    return;
                }
                let name = format!("{}_{}", self.name, metric_name(counter));
                let help = format!("{} ({counter})", self.help);
                result = encoder
                    .encode_descriptor(&name, &help, None, MetricType::Counter)
                    .and_then(|metric| ConstCounter::new(value).encode(metric));
            }),
            Shape::ByLabel(label) => {
                let mut metric = encoder.encode_descriptor(&self.name, &self.help, None, MetricType::Counter)?;
                (self.read)(&mut |counter, value| {
                    if result.is_err() {
                        return;
                    }
                    let labels = [(label, counter)];
                    result = metric.encode_family(&labels).and_then(|m| ConstCounter::new(value).encode(m));
                });
            }
        }
        result
    }
}

/// A gauge read when Prometheus scrapes, from state that lives elsewhere (a pool's size).
pub struct ScrapedGauge {
    name: String,
    help: String,
    read: Box<dyn Fn() -> i64 + Send + Sync>,
}

impl ScrapedGauge {
    pub fn new(name: &str, help: &str, read: impl Fn() -> i64 + Send + Sync + 'static) -> Self {
        Self { name: name.to_owned(), help: help.to_owned(), read: Box::new(read) }
    }
}

impl fmt::Debug for ScrapedGauge {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScrapedGauge").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Collector for ScrapedGauge {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let metric = encoder.encode_descriptor(&self.name, &self.help, None, MetricType::Gauge)?;
        ConstGauge::new((self.read)()).encode(metric)
    }
}

/// A gauge family read when Prometheus scrapes, one sample per value of its label, from state
/// that lives elsewhere (`strait_certificate_expiry_timestamp_seconds{identity="..."}`).
pub struct ScrapedGauges {
    name: String,
    help: String,
    label: &'static str,
    read: Box<dyn Fn() -> Vec<(String, i64)> + Send + Sync>,
}

impl ScrapedGauges {
    pub fn by_label(
        name: &str,
        help: &str,
        label: &'static str,
        read: impl Fn() -> Vec<(String, i64)> + Send + Sync + 'static,
    ) -> Self {
        Self { name: name.to_owned(), help: help.to_owned(), label, read: Box::new(read) }
    }
}

impl fmt::Debug for ScrapedGauges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ScrapedGauges").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Collector for ScrapedGauges {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let mut metric = encoder.encode_descriptor(&self.name, &self.help, None, MetricType::Gauge)?;
        for (value_of_label, value) in (self.read)() {
            let labels = [(self.label, value_of_label.as_str())];
            metric.encode_family(&labels).and_then(|m| ConstGauge::new(value).encode(m))?;
        }
        Ok(())
    }
}

/// A counter name as a metric name: Prometheus allows `[a-zA-Z0-9_]` only.
fn metric_name(counter: &str) -> Cow<'_, str> {
    if counter.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        Cow::Borrowed(counter)
    } else {
        Cow::Owned(counter.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect())
    }
}

/// Everything `/metrics` shows. Sources are registered while the proxy starts, before serving.
#[derive(Debug)]
pub struct MetricsRegistry {
    registry: Registry,
    traffic: std::sync::Arc<TrafficMetrics>,
}

impl Default for MetricsRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsRegistry {
    pub fn new() -> Self {
        let traffic = std::sync::Arc::new(TrafficMetrics::default());
        let mut registry = Registry::default();
        // Istio's names and help texts.
        registry.register(
            "istio_tcp_connections_opened",
            "The total number of TCP connections opened",
            traffic.opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed",
            traffic.closed.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            traffic.received_bytes.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            traffic.sent_bytes.clone(),
        );
        Self { registry, traffic }
    }

    /// The TCP families, for the connection path.
    pub fn traffic(&self) -> std::sync::Arc<TrafficMetrics> {
        self.traffic.clone()
    }

    /// Registers Istio's request families (waypoints and gateways report requests).
    pub fn register_requests(&mut self) -> std::sync::Arc<super::requests::RequestMetrics> {
        super::requests::RequestMetrics::register(&mut self.registry)
    }

    /// Adds counters read at every scrape (see `ScrapedCounters`).
    pub fn register(&mut self, counters: ScrapedCounters) {
        self.registry.register_collector(Box::new(counters));
    }

    /// Adds a gauge read at every scrape (see `ScrapedGauge`).
    pub fn register_gauge(&mut self, gauge: ScrapedGauge) {
        self.registry.register_collector(Box::new(gauge));
    }

    /// Adds a labelled gauge family read at every scrape (see `ScrapedGauges`).
    pub fn register_gauges(&mut self, gauges: ScrapedGauges) {
        self.registry.register_collector(Box::new(gauges));
    }

    /// Every metric, in `format`.
    pub fn encode(&self, format: Exposition) -> String {
        let mut text = String::with_capacity(4096);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            // Only a collector can fail; show what was encoded and say so.
            text.push_str(&format!("# encoding failed: {e}\n# EOF\n"));
        }
        match format {
            Exposition::OpenMetrics => text,
            Exposition::Prometheus => openmetrics_to_prometheus(&text),
        }
    }
}

/// Rewrites OpenMetrics text as Prometheus text 0.0.4: a counter family is described under
/// the name of its `_total` sample, and there is no `# EOF` nor `# UNIT`. Samples are the same.
fn openmetrics_to_prometheus(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // OpenMetrics puts HELP before TYPE; the name to use is known only at TYPE.
    let mut help: Option<(&str, &str)> = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            help = rest.split_once(' ').or(Some((rest, "")));
            continue;
        }
        if let Some((name, kind)) = line.strip_prefix("# TYPE ").and_then(|rest| rest.split_once(' ')) {
            let name = if kind == "counter" { format!("{name}_total") } else { name.to_owned() };
            if let Some((_, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {text}\n"));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            continue;
        }
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::ConnectionRecord;

    fn labels() -> TrafficLabels {
        let r = ConnectionRecord::start(
            "inbound",
            "10.1.0.10:40000".parse().expect("addr"),
            "10.2.0.10:80".parse().expect("addr"),
        );
        TrafficLabels::of(&r)
    }

    fn sample<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines().filter(|l| l.starts_with(prefix)).collect()
    }

    #[test]
    fn counts_connections_and_bytes_by_label_set() {
        let registry = MetricsRegistry::new();
        let traffic = registry.traffic();
        let first = traffic.open(&labels());
        traffic.close(&first, "-", labels, 100, 2000);
        let second = traffic.open(&labels());
        traffic.close(&second, "DENY", labels, 0, 0);
        let text = registry.encode(Exposition::OpenMetrics);

        let opened = sample(&text, "istio_tcp_connections_opened_total{");
        assert_eq!(opened.len(), 1, "{text}");
        assert!(opened[0].ends_with(" 2") && opened[0].contains("reporter=\"destination\""), "{text}");
        let closed = sample(&text, "istio_tcp_connections_closed_total{");
        assert_eq!(closed.len(), 2, "one per response flag: {text}");
        assert!(closed.iter().any(|l| l.contains("response_flags=\"DENY\"") && l.ends_with(" 1")), "{text}");
        assert!(closed.iter().any(|l| l.contains("response_flags=\"-\"") && l.ends_with(" 1")), "{text}");
        assert!(sample(&text, "istio_tcp_received_bytes_total{")[0].ends_with(" 100"), "{text}");
        assert!(sample(&text, "istio_tcp_sent_bytes_total{")[0].ends_with(" 2000"), "{text}");
        assert!(text.contains("# TYPE istio_tcp_sent_bytes counter"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn prometheus_text_types_counters_under_their_total_name() {
        let registry = MetricsRegistry::new();
        let traffic = registry.traffic();
        traffic.close(&traffic.open(&labels()), "-", labels, 1, 2);
        let text = registry.encode(Exposition::Prometheus);
        assert!(text.contains("# HELP istio_tcp_sent_bytes_total The size of total bytes sent"), "{text}");
        assert!(text.contains("\n# TYPE istio_tcp_sent_bytes_total counter\nistio_tcp_sent_bytes_total{"), "{text}");
        assert!(!text.contains("# EOF") && !text.contains("# TYPE istio_tcp_sent_bytes counter"), "{text}");
        assert_eq!(
            text.lines().filter(|l| !l.starts_with('#')).count(),
            registry.encode(Exposition::OpenMetrics).lines().filter(|l| !l.starts_with('#')).count(),
            "the same samples"
        );
        assert_eq!(Exposition::negotiate(None), Exposition::Prometheus);
        assert_eq!(Exposition::negotiate(Some("text/plain;version=0.0.4")), Exposition::Prometheus);
        let prometheus = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(Exposition::negotiate(Some(prometheus)), Exposition::OpenMetrics);
    }

    #[test]
    fn scraped_gauges_carry_their_label() {
        let mut registry = MetricsRegistry::new();
        registry.register_gauges(ScrapedGauges::by_label(
            "strait_certificate_expiry_timestamp_seconds",
            "Expiry",
            "identity",
            || vec![("spiffe://cluster.local/ns/a/sa/b".to_owned(), 1_795_321_845)],
        ));
        let text = registry.encode(Exposition::Prometheus);
        assert!(text.contains("# TYPE strait_certificate_expiry_timestamp_seconds gauge\n"), "{text}");
        assert!(
            text.contains(
                "\nstrait_certificate_expiry_timestamp_seconds{identity=\"spiffe://cluster.local/ns/a/sa/b\"} 1795321845\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn scraped_counters_are_read_at_every_scrape() {
        use std::sync::{
            Arc,
            atomic::{AtomicU64, Ordering},
        };
        let drops = Arc::new(AtomicU64::new(3));
        let mut registry = MetricsRegistry::new();
        registry.register(ScrapedCounters::each("strait_capture", "Capture program counter", || {
            [("steered", 7u64), ("odd-name", 1)]
        }));
        let reader = drops.clone();
        registry.register(ScrapedCounters::by_label(
            "strait_xdp_drops",
            "Packets dropped by XDP",
            "reason",
            move || {
                vec![("strict_plaintext".to_owned(), reader.load(Ordering::Relaxed)), ("deny_source".to_owned(), 0)]
            },
        ));
        let text = registry.encode(Exposition::OpenMetrics);
        assert!(text.contains("# TYPE strait_capture_steered counter\n"), "{text}");
        assert!(text.contains("\nstrait_capture_steered_total 7\n"), "{text}");
        assert!(text.contains("\nstrait_capture_odd_name_total 1\n"), "{text}");
        assert!(text.contains("\nstrait_xdp_drops_total{reason=\"strict_plaintext\"} 3\n"), "{text}");
        assert!(text.contains("\nstrait_xdp_drops_total{reason=\"deny_source\"} 0\n"), "{text}");
        drops.store(5, Ordering::Relaxed);
        assert!(
            registry
                .encode(Exposition::OpenMetrics)
                .contains("strait_xdp_drops_total{reason=\"strict_plaintext\"} 5\n")
        );
    }
}
