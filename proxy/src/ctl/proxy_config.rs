//! `strait ctl proxy-config VIEW` (CFG-4): what a running `strait node` or `strait waypoint`
//! holds, read from its admin API (OBS-3), as `istioctl ztunnel-config` and `istioctl
//! proxy-config` show it for Istio's proxies: tables by default, the admin API's JSON with
//! `-o json`.

use std::io::Write as _;

use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value;

use super::{
    admin_client::{AdminClient, AdminError, Role, ServerInfo},
    render,
};

#[derive(Debug, Args)]
pub struct ProxyConfigArgs {
    #[command(subcommand)]
    pub view: ViewCommand,
    /// The proxy's admin address (its --admin-addr), as HOST:PORT.
    #[arg(long, global = true, default_value = "127.0.0.1:15000")]
    pub addr: String,
    /// Output format: a table, or the admin API's JSON (filtered).
    #[arg(short = 'o', long = "output", global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Only this namespace's workloads, services, policies, certificates (by identity), routes
    /// and clusters (by service); listeners are the proxy's own.
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ViewCommand {
    /// Workloads the proxy knows: address, node, waypoint, protocol (istioctl ztunnel-config workloads).
    #[command(alias = "workload")]
    Workloads {
        /// Only pods scheduled on this node.
        #[arg(long)]
        node: Option<String>,
    },
    /// Services: VIP, waypoint, endpoints, ports (istioctl ztunnel-config services).
    #[command(alias = "service", alias = "svc")]
    Services,
    /// AuthorizationPolicies, PeerAuthentications and RequestAuthentications, and what each
    /// applies to at this proxy (istioctl ztunnel-config policies).
    #[command(alias = "policy")]
    Policies,
    /// Certificates held, with their chain, roots and validity, and identities still waiting
    /// for one (istioctl ztunnel-config certificates).
    #[command(alias = "cert", alias = "certificates", alias = "secret")]
    Certs,
    /// The proxy's listening sockets: data path and operator endpoints (istioctl proxy-config
    /// listeners).
    #[command(alias = "listener")]
    Listeners,
    /// A waypoint's HTTP and TCP routes, by service port (istioctl proxy-config routes).
    #[command(alias = "route")]
    Routes,
    /// A waypoint's destinations with healthy endpoints (istioctl proxy-config clusters).
    #[command(alias = "cluster")]
    Clusters,
    /// A waypoint's endpoints with health and outlier status (istioctl proxy-config endpoints).
    #[command(alias = "endpoint", alias = "ep")]
    Endpoints,
}

impl ViewCommand {
    /// The admin endpoint the view reads.
    fn path(&self) -> &'static str {
        match self {
            ViewCommand::Workloads { .. } => "/workloads",
            ViewCommand::Services => "/services",
            ViewCommand::Policies => "/policies",
            ViewCommand::Certs => "/certs?all",
            ViewCommand::Listeners => "/server_info",
            ViewCommand::Routes => "/routes",
            ViewCommand::Clusters | ViewCommand::Endpoints => "/clusters",
        }
    }

    /// For views only a waypoint has: what the view shows.
    fn waypoint_only(&self) -> Option<&'static str> {
        match self {
            ViewCommand::Routes => Some("routes"),
            ViewCommand::Clusters => Some("clusters"),
            ViewCommand::Endpoints => Some("endpoints"),
            _ => None,
        }
    }
}

/// Runs the command, printing the view on stdout.
pub fn run(args: ProxyConfigArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let text = runtime.block_on(query(&args))?;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        // `| head`: the reader has what it wanted.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// Asks the proxy and renders its answer.
pub async fn query(args: &ProxyConfigArgs) -> anyhow::Result<String> {
    let client = AdminClient::new(&args.addr)?;
    let info = client.server_info().await?;
    if let (Some(what), Role::Node(_)) = (args.view.waypoint_only(), &info.role) {
        anyhow::bail!(
            "{what} are a waypoint's (its L7 engine's); {} answers on {}, and a node proxy forwards connections \
             without HTTP routing (see `services` for its load balancing). Pass --addr with a waypoint's admin \
             address.",
            info.role,
            client.addr()
        );
    }
    let data = match args.view {
        ViewCommand::Listeners => info.raw["listeners"].clone(),
        _ => fetch(&client, &info, args.view.path()).await?,
    };
    let filter = Filter {
        namespace: args.namespace.clone(),
        node: match &args.view {
            ViewCommand::Workloads { node } => node.clone(),
            _ => None,
        },
    };
    let data = filter.apply(&args.view, data);
    Ok(match args.output {
        Output::Json => format!("{}\n", serde_json::to_string_pretty(&data)?),
        Output::Table => match &args.view {
            ViewCommand::Workloads { .. } => render::workloads(&data),
            ViewCommand::Services => render::services(&data),
            ViewCommand::Policies => render::policies(&data),
            ViewCommand::Certs => render::certs(&data, &crate::telemetry::rfc3339(std::time::SystemTime::now())),
            ViewCommand::Listeners => render::listeners(&data),
            ViewCommand::Routes => render::routes(&data),
            ViewCommand::Clusters => render::clusters(&data),
            ViewCommand::Endpoints => render::endpoints(&data),
        },
    })
}

/// GET `path` as JSON; a 404 means a proxy older than this tool.
async fn fetch(client: &AdminClient, info: &ServerInfo, path: &str) -> anyhow::Result<Value> {
    client.get_json(path).await.map_err(|e| match e {
        AdminError::Status { status, .. } if status == http::StatusCode::NOT_FOUND => anyhow::anyhow!(
            "{e}\n(strait {} at {} has no {path} endpoint: it is older than this strait ctl)",
            info.version,
            client.addr(),
        ),
        e => e.into(),
    })
}

/// What the user narrowed the view to.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub namespace: Option<String>,
    pub node: Option<String>,
}

impl Filter {
    /// Keeps the entries of `data` (a JSON array) that pass.
    pub fn apply(&self, view: &ViewCommand, data: Value) -> Value {
        let Value::Array(items) = data else { return data };
        Value::Array(items.into_iter().filter(|item| self.keeps(view, item)).collect())
    }

    fn keeps(&self, view: &ViewCommand, item: &Value) -> bool {
        if matches!(view, ViewCommand::Listeners) {
            return true;
        }
        let node_ok = self.node.as_ref().is_none_or(|node| item["node"].as_str() == Some(node));
        let namespace_ok = self.namespace.as_ref().is_none_or(|ns| namespace_of(view, item).as_deref() == Some(ns));
        node_ok && namespace_ok
    }
}

/// The namespace an entry of `view` belongs to.
fn namespace_of(view: &ViewCommand, item: &Value) -> Option<String> {
    match view {
        ViewCommand::Certs => {
            let identity = item["identity"].as_str()?;
            let rest = identity.split_once("/ns/")?.1;
            Some(rest.split_once('/').map_or(rest, |(ns, _)| ns).to_owned())
        }
        _ => item["namespace"].as_str().map(str::to_owned),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use serde_json::json;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        command: Top,
    }

    #[derive(Subcommand)]
    enum Top {
        ProxyConfig(ProxyConfigArgs),
    }

    fn parse(args: &[&str]) -> ProxyConfigArgs {
        let Top::ProxyConfig(args) = Cli::try_parse_from(["strait"].iter().chain(args)).expect("valid").command;
        args
    }

    #[test]
    fn flags_go_before_or_after_the_view() {
        let args = parse(&["proxy-config", "workloads", "--node", "node1", "-n", "shop", "-o", "json"]);
        assert!(matches!(&args.view, ViewCommand::Workloads { node: Some(n) } if n == "node1"));
        assert_eq!((args.namespace.as_deref(), args.output), (Some("shop"), Output::Json));
        assert_eq!(args.addr, "127.0.0.1:15000");
        let args = parse(&["proxy-config", "--addr", "10.0.0.1:15000", "ep"]);
        assert!(matches!(args.view, ViewCommand::Endpoints));
        assert_eq!(args.addr, "10.0.0.1:15000");
    }

    #[test]
    fn filters_keep_a_namespace_and_a_node() {
        let workloads = json!([
            {"name": "a", "namespace": "shop", "node": "node1"},
            {"name": "b", "namespace": "shop", "node": "node2"},
            {"name": "c", "namespace": "data", "node": "node1"}
        ]);
        let view = ViewCommand::Workloads { node: Some("node1".into()) };
        let filter = Filter { namespace: Some("shop".into()), node: Some("node1".into()) };
        assert_eq!(filter.apply(&view, workloads), json!([{"name": "a", "namespace": "shop", "node": "node1"}]));
        let certs = json!([{"identity": "spiffe://cluster.local/ns/shop/sa/web"}, {"identity": "spiffe://cluster.local/ns/data/sa/db"}]);
        let filter = Filter { namespace: Some("data".into()), node: None };
        assert_eq!(
            filter.apply(&ViewCommand::Certs, certs),
            json!([{"identity": "spiffe://cluster.local/ns/data/sa/db"}])
        );
    }
}
