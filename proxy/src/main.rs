//! The `strait` command line: one binary, one subcommand per role.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand, ValueEnum};
use strait::{
    admin::OperatorEndpoints,
    admission::LimitSettings,
    node::{CaSource, ConfigSource, ControlPlane},
    telemetry::{AccessLogFormat, logging::LogControl},
};

#[derive(Parser)]
#[command(name = "strait", version, about = "An ambient (sidecarless) service-mesh data plane")]
struct Cli {
    /// Log filter, as RUST_LOG takes it (`info`, `strait=debug`, ...).
    #[arg(long, global = true, default_value = "info", env = "STRAIT_LOG")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the per-node proxy: capture enrolled pods' traffic with eBPF and proxy it.
    Node(Box<NodeArgs>),
    /// Run a namespace's waypoint: the L7 proxy for services labelled istio.io/use-waypoint.
    Waypoint(Box<WaypointArgs>),
    /// Run an ingress or egress gateway: the listeners of the Istio Gateways selecting --labels.
    #[command(long_about = GATEWAY_HELP)]
    Gateway(Box<GatewayArgs>),
    /// Run the mesh's control plane: compile a configuration directory once and serve every
    /// proxy over Istio's delta xDS and CA API (one TLS port, like istiod's 15012).
    Control(Box<ControlArgs>),
    /// Build a two-node mesh out of network namespaces on this machine and show it working.
    Demo,
    /// Operator tools: check a configuration directory, show what a running proxy holds.
    #[command(subcommand)]
    Ctl(strait::ctl::CtlCommand),
}

/// Where a proxy's configuration comes from: a directory, or a control plane.
#[derive(Args)]
struct SourceArgs {
    /// Directory of Kubernetes and Istio YAML resources, watched for changes.
    #[arg(long, required_unless_present = "xds_address", conflicts_with = "xds_address")]
    config: Option<PathBuf>,
    /// Follow a control plane's delta xDS instead (`strait control`, or istiod), e.g.
    /// https://10.255.0.9:15012; its certificate must chain to --ca-root. The proxy presents its
    /// own certificate once it has one, and --ca-token-file's token until then. Certificates
    /// come from the same address unless --ca-address says otherwise.
    #[arg(long, requires = "ca_root")]
    xds_address: Option<String>,
    /// How long a configuration that captures no workload because the captured ones are missing
    /// from it must stay so before it replaces the one in force (a directory being rewritten
    /// must not turn the mesh off); 0s applies it at once.
    // A rewrite by hand or by script takes seconds: 30 s lets a botched one be finished or
    // undone, while a deliberate teardown of the mesh still happens within a minute.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    empty_config_hold: Duration,
}

impl SourceArgs {
    fn source(&self, identity: &IdentityArgs) -> anyhow::Result<ConfigSource> {
        Ok(match (&self.config, &self.xds_address) {
            (_, Some(address)) => ConfigSource::ControlPlane(ControlPlane {
                address: address.clone(),
                root: identity.ca_root.clone().ok_or_else(|| anyhow::anyhow!("--xds-address needs --ca-root"))?,
                server_name: identity.ca_server_name.clone(),
                token: client_token(identity.ca_token_file.as_deref())?,
            }),
            (Some(dir), None) => {
                ConfigSource::Directory { dir: dir.clone(), empty_config_hold: self.empty_config_hold }
            }
            (None, None) => anyhow::bail!("give --config DIR or --xds-address URL"),
        })
    }
}

#[derive(Args)]
struct NodeArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// This node's name, as pods' `spec.nodeName` gives it.
    #[arg(long)]
    node: String,
    #[command(flatten)]
    operator: OperatorArgs,
    #[command(flatten)]
    tracing: TracingArgs,
    #[command(flatten)]
    identity: IdentityArgs,
    /// Also serve the built-in CA over Istio's CA API on this address (e.g. 0.0.0.0:15012).
    #[arg(long, conflicts_with_all = ["ca_address", "xds_address"])]
    ca_listen: Option<SocketAddr>,
    /// The node's uplink interface (default: from the routing table).
    #[arg(long)]
    uplink: Option<String>,
    /// Directory on bpffs where the eBPF maps and links are pinned, so a restart keeps capture.
    #[arg(long, default_value = "/sys/fs/bpf/strait")]
    bpf_pin_dir: PathBuf,
    /// On exit, detach the eBPF programs and delete the pins (default: leave them for the next
    /// run; STRICT pods' traffic is then dropped until the proxy is back).
    #[arg(long)]
    detach_on_exit: bool,
    /// On SIGTERM, how long open connections may take to finish; the proxy serves on (none is
    /// refused) until a successor takes its listeners over, and stops once none is open.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Unix socket a newly started strait node takes this one's listening sockets over from,
    /// so that a restart or an upgrade refuses no connection (start the new one first).
    /// `@NAME` is in the abstract namespace of the node's network namespace.
    #[arg(long, default_value = "@strait-node-handover")]
    handover_socket: PathBuf,
    /// Outbound connections (15001) one captured pod may have open (default: 16384).
    #[arg(long)]
    outbound_connections_per_pod: Option<usize>,
    /// Outbound connections open in all (default: a quarter of the open-file limit, at most 65536).
    #[arg(long)]
    outbound_connections: Option<usize>,
    /// Plaintext connections (15006) to captured pods from one address (default: 1024).
    #[arg(long)]
    plaintext_connections_per_source: Option<usize>,
    /// Plaintext connections to captured pods in all (default: a quarter of the open-file
    /// limit, at most 65536).
    #[arg(long)]
    plaintext_connections: Option<usize>,
    #[command(flatten)]
    limits: ListenerArgs,
    /// Data-plane worker threads (default: half the CPUs, at least one).
    #[arg(long)]
    workers: Option<usize>,
    /// Source address of outbound HBONE connections: `pod` (the client pod's own address, as
    /// Istio ambient; replies are steered back by the capture programs) or `node` (the node's
    /// address, for platforms that drop or SNAT host-sent packets with pod sources). IPv6
    /// connections always leave from the node.
    #[arg(long, value_enum, default_value = "pod")]
    hbone_source: strait::node::HboneSource,
    /// Move admitted plain TCP connections (same-node pod to pod, PERMISSIVE plaintext,
    /// passthrough) in the kernel with splice(2): `on`, or `off` to copy in user space.
    #[arg(long, value_enum, default_value = "on")]
    fast_path: strait::node::FastPath,
}

/// Limits every HBONE listener has (OPS-4).
#[derive(Args)]
struct ListenerArgs {
    /// TLS handshakes in progress on the HBONE port from one address; more are reset at once
    /// (default: 256).
    #[arg(long)]
    hbone_handshakes_per_source: Option<usize>,
    /// TLS handshakes in progress in all (default: an eighth of the open-file limit, at most 4096).
    #[arg(long)]
    hbone_handshakes: Option<usize>,
    /// Open-file limit to run with (default: as high as the system allows); the connection
    /// limits' defaults follow it.
    #[arg(long)]
    max_open_files: Option<u64>,
}

#[derive(Args)]
struct WaypointArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// The waypoint's name: what `istio.io/use-waypoint` labels name, and the value of its
    /// pods' `gateway.networking.k8s.io/gateway-name` label.
    #[arg(long)]
    name: String,
    /// The waypoint's namespace.
    #[arg(long)]
    namespace: String,
    /// Service account whose identity the waypoint holds (default: the waypoint's name, as
    /// Istio deploys it).
    #[arg(long)]
    service_account: Option<String>,
    #[command(flatten)]
    operator: OperatorArgs,
    #[command(flatten)]
    tracing: TracingArgs,
    #[command(flatten)]
    identity: IdentityArgs,
    /// `server` header set on responses that carry none; an empty value sets none.
    #[arg(long, default_value = "istio-envoy")]
    server_header: String,
    /// On SIGTERM, how long requests and streams in flight may take to finish.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain_timeout: Duration,
    #[command(flatten)]
    limits: ListenerArgs,
    /// Data-plane worker threads (default: half the CPUs, at least one).
    #[arg(long)]
    workers: Option<usize>,
    #[command(flatten)]
    http_limits: HttpLimitArgs,
}

const GATEWAY_HELP: &str = "\
Run an ingress or egress gateway (GW-1, GW-2): the waypoint's L7 engine behind the listeners
of every networking.istio.io Gateway whose `selector` matches --labels, from any namespace,
routing by the VirtualServices bound to them (`gateways: [name]` or `[ns/name]`,
`match[].gateways` honoured).

Listeners, one per server port (`port.number`, moved by --port-map), opened and closed as
Gateways come and go; client connections share the open-file budget (no limit per source: an
ingress sees many clients behind one load balancer), TLS handshakes must finish in 10 s:
  HTTP, HTTP2, GRPC   HTTP/1.1 and h2c; Host matched against the servers' hosts and the
                      VirtualServices' hosts (wildcards allowed); no match -> 404;
                      `tls.httpsRedirect: true` -> 301 to the same URL in https
  HTTPS / TLS         the ClientHello's SNI picks the server (most specific host wins):
    SIMPLE              terminate with its certificate, ALPN h2 and http/1.1, then route
                        among that server's VirtualServices only (scheme https)
    MUTUAL              the same, and the client must present a certificate signed by the
                        server's CA (caCertificates, or the credential's ca.crt)
    PASSTHROUGH         no termination: the bytes go to the `tls[]` route whose
                        `match[].sniHosts` names the SNI
  TCP                 spliced to the `tcp[]` route
  15008 (HBONE)       with --hbone: mutual TLS from mesh proxies; a CONNECT to a server port
                      (or its mapped port) is served as a connection on that listener. Node
                      proxies use it for pods labelled strait.io/gateway.

Certificates: `serverCertificate`, `privateKey`, `caCertificates` are file paths (PEM);
`credentialName: NAME` is read from --credentials DIR laid out like Istio's secrets:
  DIR/NAME/tls.crt, DIR/NAME/tls.key, DIR/NAME/ca.crt (optional),
  DIR/NAME-cacert/ca.crt (Istio's separate CA secret; preferred when present).
Files changed on disk are used for new handshakes within a second; open connections keep
theirs; a broken file keeps the last good certificate.

Backends: mesh endpoints over HBONE as the gateway's own identity (--service-account in
--namespace), other pods in plain TCP.

Example (Istio's default ingress maps 80 to 8080 and 443 to 8443):
  strait gateway --config ./cluster --labels istio=ingressgateway --namespace istio-system \\
    --port-map 80=8080,443=8443 --credentials ./credentials --ca-dir ./ca";

#[derive(Args)]
struct GatewayArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Labels of this gateway's pods, `k=v,k2=v2`: Gateways whose selector they satisfy are
    /// served.
    #[arg(long, value_parser = parse_labels)]
    labels: std::collections::BTreeMap<String, String>,
    /// The gateway's namespace (its identity's).
    #[arg(long, default_value = "istio-system")]
    namespace: String,
    /// The gateway's name, in logs (default: the first label's value, e.g. ingressgateway).
    #[arg(long)]
    name: Option<String>,
    /// Service account whose identity the gateway holds (default: istio-<name>).
    #[arg(long)]
    service_account: Option<String>,
    /// Server port to listening port, `80=8080,443=8443`.
    #[arg(long, value_parser = parse_port_map, default_value = "")]
    port_map: std::collections::BTreeMap<u16, u16>,
    /// Directory of named credentials (`credentialName`), see above.
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// Also listen for HBONE on 15008.
    #[arg(long)]
    hbone: bool,
    #[command(flatten)]
    operator: OperatorArgs,
    #[command(flatten)]
    tracing: TracingArgs,
    #[command(flatten)]
    identity: IdentityArgs,
    /// `server` header set on responses that carry none; an empty value sets none.
    #[arg(long, default_value = "istio-envoy")]
    server_header: String,
    /// On SIGTERM, how long requests in flight may take to finish.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    drain_timeout: Duration,
    #[command(flatten)]
    limits: ListenerArgs,
    /// Data-plane worker threads (default: half the CPUs, at least one).
    #[arg(long)]
    workers: Option<usize>,
    #[command(flatten)]
    http_limits: HttpLimitArgs,
}

fn parse_labels(text: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| match pair.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.trim().to_owned())),
            _ => Err(format!("`{pair}` is not key=value")),
        })
        .collect()
}

fn parse_port_map(text: &str) -> Result<std::collections::BTreeMap<u16, u16>, String> {
    text.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (from, to) = pair.split_once('=').ok_or_else(|| format!("`{pair}` is not PORT=PORT"))?;
            let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p > 0).ok_or(format!("`{p}` is not a port"));
            Ok((port(from)?, port(to)?))
        })
        .collect()
}

#[derive(Args)]
struct ControlArgs {
    /// Directory of Kubernetes and Istio YAML resources, watched for changes.
    #[arg(long, required_unless_present = "kubernetes", conflicts_with = "kubernetes")]
    config: Option<PathBuf>,
    /// Read the configuration from the Kubernetes API server instead: the in-cluster service
    /// account, else KUBECONFIG (or ~/.kube/config).
    #[arg(long)]
    kubernetes: bool,
    /// How long a configuration that captures no workload because the captured ones are missing
    /// from it must stay so before it replaces the one in force; 0s applies it at once.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    empty_config_hold: Duration,
    /// Where delta ADS and the CA API are served (TLS; client certificates optional).
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// Prometheus metrics (`strait_xds_*`), on istiod's monitoring port, and the mesh-wide map
    /// (`/map`, `/map.json`) merged from the proxies that follow this control plane.
    #[arg(long, default_value = "0.0.0.0:15014")]
    metrics_addr: SocketAddr,
    /// The proxies' metrics port, where the mesh map reads each one's `/map.json`.
    #[arg(long, default_value_t = 15020)]
    map_proxy_port: u16,
    /// Directory of the mesh CA (Istio's plug-in CA layout); created if empty. Proxies verify
    /// the control plane against its root-cert.pem (--ca-root).
    #[arg(long, default_value = "/var/lib/strait/ca")]
    ca_dir: PathBuf,
    /// Trust domain of workload identities.
    #[arg(long, default_value = strait::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Lifetime of certificates when a request names none.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_ttl: Duration,
    /// Directory of bootstrap tokens, one file per caller: `nodes/<node-name>` for a node
    /// proxy, `serviceaccounts/<namespace>/<service-account>` for a workload such as a waypoint.
    /// Read again at most once a second.
    #[arg(long)]
    bootstrap_tokens: Option<PathBuf>,
    /// With --kubernetes: a service account node proxies run as (`<namespace>/<name>`,
    /// repeatable); its pod-bound token may get certificates for the pods of its pod's node.
    /// Istio's istio-system/ztunnel always is one.
    #[arg(long = "node-service-account", default_value = "strait-system/strait-node",
          value_parser = strait::identity::NodeAccounts::parse_account)]
    node_service_accounts: Vec<(String, String)>,
    /// With --kubernetes: the cluster whose service-account tokens are verified; a caller
    /// sending another `ClusterID` is refused (Istio's default name).
    #[arg(long, default_value = strait::identity::kube_tokens::DEFAULT_CLUSTER_ID)]
    cluster_id: String,
    /// With --kubernetes: the image of the waypoints reconciled from Gateways of class
    /// istio-waypoint or strait-waypoint.
    #[arg(long, default_value = concat!("ghcr.io/strait-mesh/strait:", env!("CARGO_PKG_VERSION")))]
    waypoint_image: String,
    /// With --kubernetes: where those waypoints follow the control plane (its Service).
    #[arg(long, default_value = "https://strait-control.strait-system.svc:15012")]
    waypoint_xds_address: String,
    /// Worker threads (default: half the CPUs, at least one).
    #[arg(long)]
    workers: Option<usize>,
    /// With --kubernetes: the Lease (in --leader-election-namespace) whose holder is the one
    /// replica writing to the API server (Events, waypoints, Gateway status).
    #[arg(long, default_value = "strait-control")]
    leader_election_lease: String,
    /// Namespace of the Lease: the pod's own (the downward API's POD_NAMESPACE).
    #[arg(long, env = "POD_NAMESPACE", default_value = "strait-system")]
    leader_election_namespace: String,
    /// This replica's name in the Lease (default: the pod's name, POD_NAME, else host and pid).
    #[arg(long, env = "POD_NAME")]
    leader_election_identity: Option<String>,
}

/// Client-side limits of an HTTP listener (defaults and their reasons: `strait::l7::limits`).
#[derive(Args)]
struct HttpLimitArgs {
    /// A request head must be complete this long after its first byte, or the connection closes.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration)]
    header_timeout: Duration,
    /// A client connection with no request in flight is closed after this long.
    #[arg(long, default_value = "60s", value_parser = parse_positive_duration)]
    idle_timeout: Duration,
    /// A request body that sends nothing for this long fails with 408 (0s: no limit).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    body_idle_timeout: Duration,
    /// Request-body bytes all requests together may hold for retries and mirrors (Ki, Mi, Gi);
    /// a request that finds no room is streamed without them.
    #[arg(long, default_value = "64Mi", value_parser = strait::l7::limits::parse_size)]
    body_buffer_budget: usize,
}

impl HttpLimitArgs {
    fn limits(&self) -> strait::l7::limits::HttpLimits {
        strait::l7::limits::HttpLimits {
            header_timeout: self.header_timeout,
            idle_timeout: self.idle_timeout,
            body_idle_timeout: Some(self.body_idle_timeout).filter(|t| !t.is_zero()),
            body_buffer_budget: self.body_buffer_budget,
        }
    }
}

/// Where a proxy reports: its operator endpoints and access log.
#[derive(Args)]
struct OperatorArgs {
    /// Admin API (/config_dump, /workloads, /services, /policies, /certs, /routes, /clusters,
    /// /stats, /logging, /server_info, /map, /healthz/ready); `strait ctl proxy-config` reads it.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Prometheus metrics (/metrics), with Istio's names and labels, and the mesh map's
    /// /map.json for the control plane.
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// Readiness probe (/healthz/ready answers 200 once the proxy is ready).
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: SocketAddr,
    /// Access line format: `key=value` text, one JSON object per line, Envoy's default format
    /// string, or Istio's default text format (Envoy's plus cluster and addresses).
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    access_log_format: LogFormat,
    /// Append access lines to this file instead of writing them to stdout.
    #[arg(long)]
    access_log: Option<PathBuf>,
}

impl OperatorArgs {
    fn endpoints(&self) -> OperatorEndpoints {
        OperatorEndpoints { admin: self.admin_addr, metrics: self.metrics_addr, readiness: self.readiness_addr }
    }

    fn format(&self) -> AccessLogFormat {
        match self.access_log_format {
            LogFormat::Text => AccessLogFormat::Text,
            LogFormat::Json => AccessLogFormat::Json,
            LogFormat::Envoy => AccessLogFormat::Envoy,
            LogFormat::Istio => AccessLogFormat::Istio,
        }
    }
}

/// Spans over OTLP (OBS-7).
#[derive(Args)]
struct TracingArgs {
    /// Send spans to this OTLP/HTTP collector (JSON encoding, `/v1/traces` added to a bare
    /// address), e.g. http://otel-collector.observability:4318. A node proxy makes a span per
    /// tunnelled connection, a waypoint or gateway one per request, joined to the incoming
    /// `traceparent`. Without it nothing is traced.
    #[arg(long)]
    otlp_endpoint: Option<String>,
    /// Percent of new traces sampled (Istio's default 1); a request that arrives with a
    /// `traceparent` follows its sampled flag instead.
    #[arg(long, default_value_t = 1.0, requires = "otlp_endpoint")]
    trace_sampling: f64,
}

impl TracingArgs {
    fn options(&self) -> Option<strait::telemetry::TracingOptions> {
        let endpoint = self.otlp_endpoint.clone()?;
        Some(strait::telemetry::TracingOptions { endpoint, sampling: self.trace_sampling })
    }
}

/// Where a proxy's certificates come from.
#[derive(Args)]
struct IdentityArgs {
    /// Trust domain of workload identities.
    #[arg(long, default_value = strait::identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// Directory of the built-in CA (Istio's plug-in CA layout); created if empty. Proxies
    /// given the same directory share one trust root.
    #[arg(long, default_value = "/var/lib/strait/ca")]
    ca_dir: PathBuf,
    /// File holding the bearer token callers of the CA API must present (serving), or that
    /// this proxy presents to a remote CA and control plane (--ca-address, --xds-address).
    #[arg(long)]
    ca_token_file: Option<PathBuf>,
    /// Get certificates from a CA speaking Istio's CA API instead (istiod, or a strait node
    /// started with --ca-listen), e.g. https://10.255.0.1:15012.
    #[arg(long, requires = "ca_root")]
    ca_address: Option<String>,
    /// PEM root certificate(s) the remote CA's endpoint and issued certificates chain to.
    #[arg(long)]
    ca_root: Option<PathBuf>,
    /// Name to verify in the certificate of the remote CA and control plane, when it differs
    /// from the address's host (strait presents `strait-ca` and `istiod.istio-system.svc`).
    #[arg(long)]
    ca_server_name: Option<String>,
    /// Lifetime of certificates (renewed at half life).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_ttl: Duration,
}

impl IdentityArgs {
    /// The CA to use; `listen` serves the local one over Istio's CA API too. A proxy following
    /// a control plane gets certificates there unless told otherwise, as Istio's do.
    fn ca(self, listen: Option<SocketAddr>, xds_address: Option<&str>) -> anyhow::Result<CaSource> {
        let address = self.ca_address.or_else(|| xds_address.map(str::to_owned));
        Ok(match (address, self.ca_root) {
            (Some(address), Some(root)) => {
                let token = client_token(self.ca_token_file.as_deref())?;
                CaSource::Remote { address, root, token, server_name: self.ca_server_name }
            }
            _ => CaSource::Local { dir: self.ca_dir, listen, token: read_token(self.ca_token_file.as_deref())? },
        })
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
    Envoy,
    Istio,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logging = strait::telemetry::logging::init(&cli.log_level);

    let result = match cli.command {
        Command::Node(args) => run_node(*args, logging),
        Command::Waypoint(args) => run_waypoint(*args, logging),
        Command::Gateway(args) => run_gateway(*args, logging),
        Command::Control(args) => run_control(*args),
        Command::Demo => strait::demo::run(),
        Command::Ctl(command) => strait::ctl::run(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strait: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_node(args: NodeArgs, logging: LogControl) -> anyhow::Result<()> {
    let rt = runtime(args.workers)?;
    let (endpoints, access_log_format) = (args.operator.endpoints(), args.operator.format());
    let (trust_domain, cert_ttl) = (args.identity.trust_domain.clone(), args.identity.cert_ttl);
    let source = args.source.source(&args.identity)?;
    let ca = args.identity.ca(args.ca_listen, args.source.xds_address.as_deref())?;
    rt.block_on(strait::node::run(strait::node::NodeOptions {
        source,
        node_name: args.node,
        endpoints,
        access_log_format,
        access_log: args.operator.access_log,
        logging: Some(logging),
        trust_domain,
        ca,
        cert_ttl,
        uplink: args.uplink,
        bpf_pin_dir: args.bpf_pin_dir,
        detach_on_exit: args.detach_on_exit,
        limits: LimitSettings {
            handshakes_per_source: args.limits.hbone_handshakes_per_source,
            handshakes: args.limits.hbone_handshakes,
            plaintext_per_source: args.plaintext_connections_per_source,
            plaintext: args.plaintext_connections,
            outbound_per_pod: args.outbound_connections_per_pod,
            outbound: args.outbound_connections,
        },
        max_open_files: args.limits.max_open_files,
        drain_timeout: args.drain_timeout,
        handover_socket: args.handover_socket,
        hbone_source: args.hbone_source,
        fast_path: args.fast_path,
        tracing: args.tracing.options(),
    }))
}

fn run_waypoint(args: WaypointArgs, logging: LogControl) -> anyhow::Result<()> {
    let rt = runtime(args.workers)?;
    let (endpoints, access_log_format) = (args.operator.endpoints(), args.operator.format());
    let (trust_domain, cert_ttl) = (args.identity.trust_domain.clone(), args.identity.cert_ttl);
    let source = args.source.source(&args.identity)?;
    let ca = args.identity.ca(None, args.source.xds_address.as_deref())?;
    rt.block_on(strait::waypoint::run(strait::waypoint::WaypointOptions {
        source,
        service_account: args.service_account.unwrap_or_else(|| args.name.clone()),
        name: args.name,
        namespace: args.namespace,
        trust_domain,
        ca,
        cert_ttl,
        endpoints,
        access_log_format,
        access_log: args.operator.access_log,
        logging: Some(logging),
        server_header: Some(args.server_header).filter(|s| !s.is_empty()),
        drain_timeout: args.drain_timeout,
        limits: LimitSettings {
            handshakes_per_source: args.limits.hbone_handshakes_per_source,
            handshakes: args.limits.hbone_handshakes,
            ..Default::default()
        },
        max_open_files: args.limits.max_open_files,
        http_limits: args.http_limits.limits(),
        tracing: args.tracing.options(),
    }))
}

fn run_gateway(args: GatewayArgs, logging: LogControl) -> anyhow::Result<()> {
    let rt = runtime(args.workers)?;
    let (endpoints, access_log_format) = (args.operator.endpoints(), args.operator.format());
    let (trust_domain, cert_ttl) = (args.identity.trust_domain.clone(), args.identity.cert_ttl);
    let source = args.source.source(&args.identity)?;
    let ca = args.identity.ca(None, args.source.xds_address.as_deref())?;
    let name = args.name.or_else(|| args.labels.values().next().cloned()).unwrap_or_else(|| "gateway".into());
    let base = strait::waypoint::WaypointOptions {
        source,
        service_account: args.service_account.unwrap_or_else(|| format!("istio-{name}")),
        name,
        namespace: args.namespace,
        trust_domain,
        ca,
        cert_ttl,
        endpoints,
        access_log_format,
        access_log: args.operator.access_log,
        logging: Some(logging),
        server_header: Some(args.server_header).filter(|s| !s.is_empty()),
        drain_timeout: args.drain_timeout,
        limits: LimitSettings {
            handshakes_per_source: args.limits.hbone_handshakes_per_source,
            handshakes: args.limits.hbone_handshakes,
            ..Default::default()
        },
        max_open_files: args.limits.max_open_files,
        http_limits: args.http_limits.limits(),
        tracing: args.tracing.options(),
    };
    rt.block_on(strait::gateway::run(strait::gateway::GatewayOptions {
        base,
        labels: args.labels,
        port_map: args.port_map,
        credentials: args.credentials,
        hbone: args.hbone,
    }))
}

fn run_control(args: ControlArgs) -> anyhow::Result<()> {
    let rt = runtime(args.workers)?;
    let options = strait::control::ControlOptions {
        source: match args.config {
            Some(dir) => strait::control::ConfigSource::Directory(dir),
            None => strait::control::ConfigSource::Kubernetes,
        },
        empty_config_hold: args.empty_config_hold,
        listen: args.listen,
        metrics: args.metrics_addr,
        map_proxy_port: args.map_proxy_port,
        ca_dir: args.ca_dir,
        trust_domain: args.trust_domain,
        cert_ttl: args.cert_ttl,
        bootstrap_tokens: args.bootstrap_tokens,
        node_accounts: strait::identity::NodeAccounts::new(args.node_service_accounts),
        cluster_id: args.cluster_id,
        waypoint_image: args.waypoint_image,
        waypoint_xds_address: args.waypoint_xds_address,
        leader: Some(strait::control::leader::LeaderOptions::new(
            &args.leader_election_namespace,
            &args.leader_election_lease,
            &args.leader_election_identity.unwrap_or_else(default_identity),
        )),
    };
    rt.block_on(strait::control::run(options))
}

/// The token a proxy presents (--ca-token-file): read again for every request, as a Kubernetes
/// projected token is rotated by the kubelet; read once now so a bad file fails at startup.
fn client_token(path: Option<&std::path::Path>) -> anyhow::Result<Option<strait::identity::BearerToken>> {
    let Some(path) = path else { return Ok(None) };
    strait::identity::BearerToken::from_file(path).map(Some).map_err(|e| anyhow::anyhow!("--ca-token-file: {e}"))
}

/// A replica's name when the pod's is not given: the host's name and the process id.
fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}-{}", host.trim(), std::process::id())
}

fn read_token(path: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    let Some(path) = path else { return Ok(None) };
    let token = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read the CA token file {}: {e}", path.display()))?;
    Ok(Some(token.trim().to_owned()))
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    strait::config::parse_duration(text)
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err(format!("`{text}` must be longer than 0s")),
        d => Ok(d),
    }
}

/// The data-plane runtime. One worker per two CPUs by default: measured on the 2-core
/// benchmark machine, where the proxies share the CPUs with the applications, one worker moved
/// a single HBONE stream at 3.6 Gbit/s and eight streams at 3.9, against 2.0-2.9 and 2.3 with
/// two workers, which pay for cross-thread wake-ups and context switches on every chunk.
fn runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = workers.unwrap_or(cpus / 2).max(1);
    if workers == 1 {
        // One worker: a current-thread runtime, where the data path and the main task share one
        // thread (a multi-thread runtime with one worker runs them on two, and each thread that
        // allocates gets its own malloc arena). Measured side by side on the bench machine with
        // 1,000 idle connections held: 5.5 / 3.6 KiB per connection on the two node proxies
        // against 7.5 / 5.4 with the multi-thread runtime; latency and CPU at 1,000 req/s were
        // the same within the runs' spread.
        return Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?);
    }
    Ok(tokio::runtime::Builder::new_multi_thread().worker_threads(workers).enable_all().build()?)
}
