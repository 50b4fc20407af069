//! One access line per proxied connection (OBS-2), written to stdout.
//!
//! The format follows the spirit of Envoy's default: a timestamp, then `key=value` fields an
//! operator can grep. Workloads are named `namespace/name`; `-` stands for unknown.

use std::{
    io::Write as _,
    net::SocketAddr,
    time::{Duration, SystemTime},
};

use super::rfc3339;

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Both directions finished.
    Completed,
    /// The connection carried data and then failed.
    Broken(String),
    /// The upstream could not be reached (Envoy's `UF`).
    UpstreamConnectFailed(String),
    /// The proxy refused the connection, with the reason.
    Refused(String),
}

impl ConnectionRecord {
    /// A record for a connection that starts now; the caller fills in what it learns.
    pub fn start(direction: &'static str, source_addr: SocketAddr, destination_addr: SocketAddr) -> Self {
        Self {
            direction,
            source_addr,
            source_workload: None,
            source_identity: None,
            destination_addr,
            destination_workload: None,
            destination_identity: None,
            destination_service: None,
            security: "none",
            bytes_sent: 0,
            bytes_received: 0,
            started: SystemTime::now(),
            duration: Duration::ZERO,
            outcome: Outcome::Completed,
        }
    }
}

impl Outcome {
    fn fields(&self) -> (&'static str, Option<&str>) {
        match self {
            Outcome::Completed => ("ok", None),
            Outcome::Broken(r) => ("broken", Some(r)),
            Outcome::UpstreamConnectFailed(r) => ("upstream_connect_failed", Some(r)),
            Outcome::Refused(r) => ("refused", Some(r)),
        }
    }
}

/// Everything an access line says about one connection.
#[derive(Debug, Clone)]
pub struct ConnectionRecord {
    /// `outbound`, `inbound`, `passthrough`.
    pub direction: &'static str,
    pub source_addr: SocketAddr,
    pub source_workload: Option<String>,
    /// SPIFFE identity of the source, when known (proven by mTLS inbound).
    pub source_identity: Option<String>,
    pub destination_addr: SocketAddr,
    pub destination_workload: Option<String>,
    pub destination_identity: Option<String>,
    /// `name.namespace.svc.cluster.local` when the client addressed a service.
    pub destination_service: Option<String>,
    /// `mutual_tls` (HBONE) or `none` (plain TCP).
    pub security: &'static str,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub started: SystemTime,
    pub duration: Duration,
    pub outcome: Outcome,
}

/// Writes access lines. Cheap to clone and share.
#[derive(Debug, Clone, Copy, Default)]
pub struct AccessLog;

impl AccessLog {
    pub fn record(&self, r: &ConnectionRecord) {
        let line = format_line(r);
        // One write per line so concurrent connections never interleave within a line.
        let _ = std::io::stdout().lock().write_all(line.as_bytes());
    }
}

fn format_line(r: &ConnectionRecord) -> String {
    let (result, reason) = r.outcome.fields();
    let dash = |v: &Option<String>| v.as_deref().unwrap_or("-").to_owned();
    let mut line = format!(
        "[{}] {} tcp src.addr={} src.workload={} src.identity={} dst.addr={} dst.service={} dst.workload={} dst.identity={} security={} sent={} received={} duration_ms={} result={}",
        rfc3339(r.started),
        r.direction,
        r.source_addr,
        dash(&r.source_workload),
        dash(&r.source_identity),
        r.destination_addr,
        dash(&r.destination_service),
        dash(&r.destination_workload),
        dash(&r.destination_identity),
        r.security,
        r.bytes_sent,
        r.bytes_received,
        r.duration.as_millis(),
        result,
    );
    if let Some(reason) = reason {
        line.push_str(&format!(" reason=\"{}\"", reason.replace('"', "'")));
    }
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_names_both_ends_bytes_and_result() {
        let mut r = ConnectionRecord::start(
            "outbound",
            "10.1.0.10:40000".parse().expect("addr"),
            "10.2.0.10:80".parse().expect("addr"),
        );
        r.source_workload = Some("mesh/client".into());
        r.source_identity = Some("spiffe://cluster.local/ns/mesh/sa/client".into());
        r.bytes_sent = 78;
        r.bytes_received = 300;
        r.started = std::time::UNIX_EPOCH;
        r.duration = Duration::from_millis(12);
        r.outcome = Outcome::UpstreamConnectFailed("connection refused".into());
        assert_eq!(
            format_line(&r),
            "[1970-01-01T00:00:00.000Z] outbound tcp src.addr=10.1.0.10:40000 src.workload=mesh/client \
             src.identity=spiffe://cluster.local/ns/mesh/sa/client dst.addr=10.2.0.10:80 dst.service=- \
             dst.workload=- dst.identity=- security=none sent=78 received=300 duration_ms=12 \
             result=upstream_connect_failed reason=\"connection refused\"\n"
        );
    }
}
