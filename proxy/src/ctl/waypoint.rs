//! `strait ctl waypoint`: a namespace's waypoint the Istio way (L4-3), as `istioctl waypoint`
//! does it: `apply` writes a Gateway API Gateway of class `istio-waypoint` with one HBONE
//! listener on 15008 (and can enrol the namespace with `istio.io/use-waypoint`), `list` and
//! `delete` act on the Gateways of a waypoint class. `strait control --kubernetes` turns each
//! such Gateway into a running waypoint (`control::waypoints`). Talks to the API server of
//! the in-cluster service account, else `KUBECONFIG` (or `~/.kube/config`).

use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use clap::{Args, Subcommand};
use kube::{
    Api, Client,
    api::{DeleteParams, DynamicObject, ListParams, Patch, PatchParams},
};
use serde_json::{Value, json};

use crate::control::waypoints::{
    DEFAULT_CLASS, WAYPOINT_CLASSES, gateway_object, gateway_resource, gateway_version, waypoint_class,
};
use crate::model::waypoints::USE_WAYPOINT_LABEL;

/// The field manager of `strait ctl`'s server-side applies.
const FIELD_MANAGER: &str = "strait-ctl";

#[derive(Debug, Subcommand)]
pub enum WaypointCommand {
    /// Create or update a namespace's waypoint (a Gateway of class istio-waypoint).
    Apply(ApplyArgs),
    /// List the waypoints of a namespace: name, class, Programmed, address.
    List {
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
    },
    /// Delete waypoints of a namespace (their Deployment, Service and ServiceAccount go with
    /// them, through their owner references).
    Delete {
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Names of the waypoints to delete.
        #[arg(default_value = "waypoint")]
        names: Vec<String>,
    },
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// The waypoint's name: what `istio.io/use-waypoint` labels name.
    #[arg(long, default_value = "waypoint")]
    name: String,
    /// Gateway class: istio-waypoint (istioctl's) or strait-waypoint.
    #[arg(long, default_value = DEFAULT_CLASS, value_parser = clap::builder::PossibleValuesParser::new(WAYPOINT_CLASSES))]
    class: String,
    /// Also label the namespace istio.io/use-waypoint=<name>, so its services use it.
    #[arg(long)]
    enroll_namespace: bool,
    /// Wait until the waypoint is Programmed (its Deployment has a ready replica).
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "90s", value_parser = crate::config::parse_duration)]
    timeout: Duration,
}

pub fn run(command: WaypointCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start a runtime")?;
    rt.block_on(async {
        let client = Client::try_default()
            .await
            .map_err(|e| anyhow!("cannot configure the Kubernetes client (in-cluster or KUBECONFIG): {e}"))?;
        let version = gateway_version(&client).await.map_err(|e| anyhow!(e))?;
        match command {
            WaypointCommand::Apply(args) => apply(&client, &version, &args).await,
            WaypointCommand::List { namespace } => list(&client, &version, &namespace).await,
            WaypointCommand::Delete { namespace, names } => delete(&client, &version, &namespace, &names).await,
        }
    })
}

fn gateways(client: &Client, version: &str, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &gateway_resource(version))
}

async fn apply(client: &Client, version: &str, args: &ApplyArgs) -> anyhow::Result<()> {
    let (ns, name) = (&args.namespace, &args.name);
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    if namespaces.get_opt(ns).await.with_context(|| format!("cannot read namespace {ns}"))?.is_none() {
        bail!("namespace {ns} does not exist");
    }
    let gateway = gateway_object(name, ns, &args.class, version);
    gateways(client, version, ns)
        .patch(name, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&gateway))
        .await
        .with_context(|| format!("cannot apply Gateway {ns}/{name}"))?;
    println!("waypoint {ns}/{name} applied");
    if args.enroll_namespace {
        let label = json!({"metadata": {"labels": {USE_WAYPOINT_LABEL: name}}});
        namespaces
            .patch(ns, &PatchParams::default(), &Patch::Merge(&label))
            .await
            .with_context(|| format!("cannot label namespace {ns}"))?;
        println!("namespace {ns} labelled with {USE_WAYPOINT_LABEL}={name}");
    }
    if args.wait {
        wait_programmed(client, version, ns, name, args.timeout).await?;
        println!("waypoint {ns}/{name} is ready");
    }
    Ok(())
}

/// The Programmed condition of a Gateway: its status and message.
fn programmed(gateway: &DynamicObject) -> Option<(String, String)> {
    let conditions = gateway.data.pointer("/status/conditions")?.as_array()?;
    let c = conditions.iter().find(|c| c.get("type").and_then(Value::as_str) == Some("Programmed"))?;
    let field = |f: &str| c.get(f).and_then(Value::as_str).unwrap_or_default().to_owned();
    Some((field("status"), field("message")))
}

async fn wait_programmed(
    client: &Client,
    version: &str,
    ns: &str,
    name: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let api = gateways(client, version, ns);
    let deadline = Instant::now() + timeout;
    loop {
        let gateway = api.get(name).await.with_context(|| format!("cannot read Gateway {ns}/{name}"))?;
        let state = programmed(&gateway);
        if state.as_ref().is_some_and(|(status, _)| status == "True") {
            return Ok(());
        }
        if Instant::now() >= deadline {
            let why = state.map_or("no status yet: is `strait control --kubernetes` running?".into(), |(_, m)| m);
            bail!("waypoint {ns}/{name} not ready after {timeout:?}: {why}");
        }
        // A user waiting at a terminal: one read a second for as long as they wait.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn list(client: &Client, version: &str, ns: &str) -> anyhow::Result<()> {
    let all = gateways(client, version, ns)
        .list(&ListParams::default())
        .await
        .with_context(|| format!("cannot list the Gateways of {ns}"))?;
    let rows: Vec<[String; 4]> = all
        .items
        .iter()
        .filter_map(|g| {
            let class = waypoint_class(g)?.to_owned();
            let name = g.metadata.name.clone().unwrap_or_default();
            let ready = programmed(g).map_or("Unknown".into(), |(status, _)| status);
            let address = g
                .data
                .pointer("/status/addresses")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|a| a.get("value")?.as_str()).collect::<Vec<_>>().join(","))
                .unwrap_or_default();
            Some([name, class, ready, address])
        })
        .collect();
    if rows.is_empty() {
        println!("no waypoints in namespace {ns}");
        return Ok(());
    }
    let header = ["NAME", "CLASS", "PROGRAMMED", "ADDRESS"].map(str::to_owned);
    let widths: Vec<usize> =
        (0..4).map(|i| rows.iter().chain([&header]).map(|r| r[i].len()).max().unwrap_or(0)).collect();
    for row in [&header].into_iter().chain(&rows) {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", cells.join("  ").trim_end());
    }
    Ok(())
}

async fn delete(client: &Client, version: &str, ns: &str, names: &[String]) -> anyhow::Result<()> {
    let api = gateways(client, version, ns);
    for name in names {
        let Some(gateway) = api.get_opt(name).await.with_context(|| format!("cannot read Gateway {ns}/{name}"))? else {
            bail!("waypoint {ns}/{name} does not exist");
        };
        if waypoint_class(&gateway).is_none() {
            bail!("Gateway {ns}/{name} is not a waypoint (its class is not {})", WAYPOINT_CLASSES.join(" or "));
        }
        api.delete(name, &DeleteParams::default())
            .await
            .with_context(|| format!("cannot delete Gateway {ns}/{name}"))?;
        println!("waypoint {ns}/{name} deleted");
    }
    Ok(())
}
