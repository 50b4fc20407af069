//! TCP through the waypoint (L7-8): `tcp[]` routes of the service's VirtualService, weighted
//! by destination, per connection; L4 policy; bytes copied between the client's stream and
//! the endpoint's.

use std::{sync::Arc, time::Instant};

use bytes::Bytes;
use h2::{RecvStream, server::SendResponse};
use http::{Request, Response, StatusCode};

use super::{WaypointContext, inbound::authorize_tcp};
use crate::{
    hbone::{H2Stream, server::refuse},
    l7::{
        Downstream, Target, choose_weighted,
        outlier::TryOutcome,
        upstream::{Cluster, ClusterKey, Limits, UpstreamIo},
    },
    model::{
        Model,
        routes::{L4Match, MESH_GATEWAY, TcpRoute},
    },
    telemetry::{ConnectionRecord, Outcome},
};

/// A CONNECT stream to a port declared TCP: decided before the tunnel is accepted, so a
/// refusal is an HTTP status the client's node proxy sees (401 denied, 503 unreachable).
pub async fn serve(
    ctx: Arc<WaypointContext>,
    model: Arc<Model>,
    down: Downstream,
    request: Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
) {
    let clock = Instant::now();
    let mut record = record_for(&down);
    let decided = decide(&ctx, &model, &down);
    drop(model);
    let cluster = match decided {
        Ok(cluster) => cluster,
        Err((status, reason)) => {
            refuse(respond, status);
            record.outcome = Outcome::Refused(format!("{} {reason}", status.as_u16()));
            ctx.telemetry.closed(&record);
            return;
        }
    };
    ctx.telemetry.opened(&mut record);
    let upstream = match connect(&ctx, &cluster, &down, &mut record).await {
        Ok(upstream) => upstream,
        Err(reason) => {
            refuse(respond, StatusCode::SERVICE_UNAVAILABLE);
            record.outcome = Outcome::UpstreamConnectFailed(reason);
            record.duration = clock.elapsed();
            ctx.telemetry.closed(&record);
            return;
        }
    };
    let send = match respond.send_response(Response::new(()), false) {
        Ok(send) => send,
        Err(e) => {
            tracing::debug!("HBONE stream reset before it was answered: {e}");
            return;
        }
    };
    copy(H2Stream::new(send, request.into_body()), upstream, &mut record).await;
    record.duration = clock.elapsed();
    ctx.telemetry.closed(&record);
}

/// A stream to an undeclared port whose client did not speak HTTP: already accepted, so a
/// refusal resets it.
pub async fn serve_detected(ctx: Arc<WaypointContext>, down: Downstream, mut io: H2Stream) {
    let clock = Instant::now();
    let mut record = record_for(&down);
    let decided = decide(&ctx, &ctx.model.current(), &down);
    let cluster = match decided {
        Ok(cluster) => cluster,
        Err((status, reason)) => {
            io.reset();
            record.outcome = Outcome::Refused(format!("{} {reason}", status.as_u16()));
            ctx.telemetry.closed(&record);
            return;
        }
    };
    ctx.telemetry.opened(&mut record);
    match connect(&ctx, &cluster, &down, &mut record).await {
        Ok(upstream) => copy(io, upstream, &mut record).await,
        Err(reason) => {
            io.reset();
            record.outcome = Outcome::UpstreamConnectFailed(reason);
        }
    }
    record.duration = clock.elapsed();
    ctx.telemetry.closed(&record);
}

fn record_for(down: &Downstream) -> ConnectionRecord {
    let mut record = ConnectionRecord::start("waypoint", down.client_addr, down.target.addr());
    record.security = "mutual_tls";
    record.source_workload = down.source_workload.clone();
    record.source_identity = down.identity.as_ref().map(ToString::to_string);
    record.destination_service = down.target.service().cloned();
    record
}

/// Policy, then the route and its destination.
fn decide(ctx: &WaypointContext, model: &Model, down: &Downstream) -> Result<Arc<Cluster>, (StatusCode, String)> {
    let decision = authorize_tcp(ctx, model, down);
    if !decision.allowed {
        return Err((StatusCode::UNAUTHORIZED, decision.denial_reason()));
    }
    let upstreams = &ctx.l7.upstreams;
    let service = match &down.target {
        Target::Workload { workload, port } => return Ok(upstreams.workload_cluster(model, workload, *port)),
        Target::Service { service, .. } => service,
        Target::Gateway { .. } => return Err((StatusCode::BAD_REQUEST, "not a waypoint target".into())),
    };
    let port = down.target.port();
    let routes = model.routing.mesh_routes_for(&service.hostname).map(|vs| vs.tcp.as_slice()).unwrap_or_default();
    let key = match routes.iter().find(|r| route_matches(r, down)) {
        Some(route) => {
            let chosen = choose_weighted(&route.destinations)
                .ok_or((StatusCode::SERVICE_UNAVAILABLE, "no destination".into()))?;
            let d = &chosen.destination;
            ClusterKey { host: d.host.clone(), subset: d.subset.clone(), port: d.port.unwrap_or(port) }
        }
        None => ClusterKey { host: service.hostname.clone(), subset: None, port },
    };
    upstreams.cluster(model, &key).map_err(|e| (StatusCode::SERVICE_UNAVAILABLE, e.to_string()))
}

fn route_matches(route: &TcpRoute, down: &Downstream) -> bool {
    route.matches.is_empty() || route.matches.iter().any(|m| l4_matches(m, down))
}

fn l4_matches(m: &L4Match, down: &Downstream) -> bool {
    let target = down.target.addr();
    m.port.is_none_or(|p| p == target.port())
        && (m.gateways.is_empty() || m.gateways.iter().any(|g| g == MESH_GATEWAY))
        && (m.destination_subnets.is_empty() || m.destination_subnets.iter().any(|c| c.contains(target.ip())))
        && (m.source_labels.is_empty()
            || down
                .source_workload
                .as_ref()
                .is_some_and(|w| m.source_labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))))
        && m.source_namespace.as_ref().is_none_or(|ns| down.identity.as_ref().is_some_and(|i| &i.namespace == ns))
}

/// Holds one of the destination's `maxConnections` while a TCP connection lasts.
struct Held(Arc<Limits>);

impl Drop for Held {
    fn drop(&mut self) {
        Limits::give_back(&self.0.connections);
    }
}

async fn connect(
    ctx: &WaypointContext,
    cluster: &Cluster,
    down: &Downstream,
    record: &mut ConnectionRecord,
) -> Result<(UpstreamIo, Held), String> {
    let endpoint = cluster
        .pick(None, Instant::now())
        .cloned()
        .ok_or_else(|| format!("no healthy endpoint of {}", cluster.key.name()))?;
    record.destination_addr = endpoint.addr;
    record.destination_workload = Some(endpoint.workload.clone());
    record.destination_identity = Some(endpoint.workload.identity(&ctx.trust_domain).to_string());
    let max = cluster.policy.connection_pool.as_ref().and_then(|p| p.max_connections);
    if !Limits::try_take(&cluster.limits.connections, max) {
        return Err(format!("circuit breaker: maxConnections of {} reached", cluster.key.name()));
    }
    let held = Held(cluster.limits.clone());
    match ctx.l7.upstreams.connector.open(&endpoint, down.client_addr.ip(), None, None).await {
        Ok(io) => {
            cluster.record(&endpoint, TryOutcome::Status(200));
            Ok((io, held))
        }
        Err(e) => {
            cluster.record(&endpoint, TryOutcome::ConnectFailure);
            Err(format!("cannot connect to {}: {e}", endpoint.addr))
        }
    }
}

async fn copy(mut client: H2Stream, (mut upstream, _held): (UpstreamIo, Held), record: &mut ConnectionRecord) {
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => {
            record.bytes_sent = sent;
            record.bytes_received = received;
        }
        Err(e) => {
            if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) {
                return;
            }
            record.outcome = Outcome::Broken(e.to_string());
        }
    }
}
