//! Live inbound connections, kept so that a policy change can be applied to them too (L4-7,
//! late rejection): when the configuration changes, every open connection is decided again
//! and the ones now denied are closed, with the reason in their access line.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio::sync::oneshot;
use tracing::info;

use super::policy;
use crate::{identity::Identity, model::Model};

/// What a connection was decided on.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// Verified identity of the client; `None` for plaintext.
    pub source: Option<Identity>,
    pub source_ip: IpAddr,
    /// The pod and port it reaches.
    pub destination: SocketAddr,
}

struct Entry {
    admitted: Admitted,
    reject: oneshot::Sender<String>,
}

#[derive(Default)]
pub struct LiveConnections {
    next: AtomicU64,
    entries: Mutex<HashMap<u64, Entry>>,
}

/// A registered connection; dropping it unregisters. `rejected` resolves with the reason if a
/// policy change denies the connection.
pub struct Registration {
    id: u64,
    live: Arc<LiveConnections>,
    pub rejected: oneshot::Receiver<String>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.live.entries.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

impl LiveConnections {
    pub fn register(self: &Arc<Self>, admitted: Admitted) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (reject, rejected) = oneshot::channel();
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).insert(id, Entry { admitted, reject });
        Registration { id, live: self.clone(), rejected }
    }

    /// Decides every live connection again under `model`; closes those now denied.
    pub fn recheck(&self, model: &Model) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let denied: Vec<(u64, String)> = entries
            .iter()
            .filter_map(|(id, entry)| verdict(model, &entry.admitted).map(|reason| (*id, reason)))
            .collect();
        for (id, reason) in denied {
            if let Some(entry) = entries.remove(&id) {
                info!(destination = %entry.admitted.destination, "closing an open connection: {reason}");
                let _ = entry.reject.send(format!("late rejection: {reason}"));
            }
        }
    }
}

/// Why `admitted` would now be refused, if it would.
fn verdict(model: &Model, admitted: &Admitted) -> Option<String> {
    // A pod that left the mesh or the configuration keeps its connections: nothing applies.
    let workload = model.workload_by_ip(admitted.destination.ip()).filter(|w| w.captured)?;
    if admitted.source.is_none() && !policy::plaintext_allowed(model, workload, admitted.destination.port()) {
        return Some("plaintext to a STRICT workload (PeerAuthentication)".into());
    }
    let decision =
        policy::authorize(model, workload, admitted.source.as_ref(), admitted.source_ip, admitted.destination);
    (!decision.allowed).then(|| decision.denial_reason())
}
