//! Outbound: a connection an enrolled pod opened, handed to the proxy by the capture program.
//! The socket's local address is the pod's original destination. For now the proxy forwards it
//! as plain TCP (mTLS over HBONE replaces this for mesh destinations).

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Instant, SystemTime},
};

use strait_ebpf_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use tokio::net::TcpStream;
use tracing::debug;

use super::{NodeContext, copy};
use crate::{
    sys,
    telemetry::{ConnectionRecord, Outcome},
};

/// Ports of the proxy's own listeners; a connection to them would loop through the proxy.
const PROXY_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT];

pub async fn handle(ctx: Arc<NodeContext>, downstream: TcpStream, peer: SocketAddr) {
    let started = SystemTime::now();
    let clock = Instant::now();
    let destination = match downstream.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            debug!("outbound connection from {peer} closed before it could be read: {e}");
            return;
        }
    };
    let model = ctx.model.current();
    let mut record = ConnectionRecord {
        direction: "outbound",
        source_addr: peer,
        source_workload: model.workload_by_ip(peer.ip()).map(|w| w.display_name()),
        destination_addr: destination,
        destination_workload: model
            .workload_by_ip(destination.ip())
            .map(|w| w.display_name()),
        bytes_sent: 0,
        bytes_received: 0,
        started,
        duration: Default::default(),
        outcome: Outcome::Completed,
    };
    drop(model);

    if PROXY_PORTS.contains(&destination.port()) {
        record.outcome = Outcome::Refused(format!(
            "port {} is reserved for the mesh proxy",
            destination.port()
        ));
        record.duration = clock.elapsed();
        ctx.access_log.record(&record);
        return;
    }
    let _ = downstream.set_nodelay(true);

    let upstream = match sys::connect_marked(destination).await {
        Ok(stream) => stream,
        Err(e) => {
            record.outcome = Outcome::UpstreamConnectFailed(e.to_string());
            record.duration = clock.elapsed();
            ctx.access_log.record(&record);
            return;
        }
    };
    let (copied, error) = copy::bidirectional(&downstream, &upstream).await;
    record.bytes_sent = copied.a_to_b;
    record.bytes_received = copied.b_to_a;
    record.duration = clock.elapsed();
    if let Some(e) = error {
        record.outcome = Outcome::Broken(e.to_string());
    }
    ctx.access_log.record(&record);
}
