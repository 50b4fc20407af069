//! The mesh-wide map (OBS-6): the control plane reads the mesh map of every proxy following it
//! (`/map.json` on the proxy's metrics port, as a proxy's admin port is its localhost only) and
//! serves them merged, with the page, on its monitoring port.
//!
//! Proxies are read only while someone looks: every `REFRESH` for `WATCHED` after the last
//! request for the map, all at once, each within `FETCH_TIMEOUT`.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{Method, StatusCode};

use crate::{
    telemetry::{http::exchange, map::MeshMap},
    xds::server::ConnectedProxies,
};

const REFRESH: Duration = Duration::from_secs(2);
const WATCHED: Duration = Duration::from_secs(60);
const FETCH_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads the proxies' maps and keeps the merged one.
pub struct MapCollector {
    connected: Arc<ConnectedProxies>,
    /// The proxies' metrics port.
    port: u16,
    started: Instant,
    /// When the map was last asked for, milliseconds after `started` (0: never).
    asked_ms: AtomicU64,
    merged: Mutex<String>,
}

impl MapCollector {
    /// Starts reading the maps of `connected` proxies on their `port`.
    pub fn start(connected: Arc<ConnectedProxies>, port: u16) -> Arc<Self> {
        let empty = MeshMap::merge(Vec::new());
        let collector = Arc::new(Self {
            connected,
            port,
            started: Instant::now(),
            asked_ms: AtomicU64::new(0),
            merged: Mutex::new(serde_json::to_string(&empty).unwrap_or_default()),
        });
        tokio::spawn(collector.clone().run());
        collector
    }

    /// `/map.json`: the latest merged map; asking keeps the proxies being read.
    pub fn json(&self) -> String {
        let first = self.asked_ms.swap(self.elapsed_ms().max(1), Ordering::Relaxed) == 0;
        if first {
            // Nobody looked before: the first answer is empty; the page asks again in 2 s.
            tracing::debug!("mesh map asked for: reading the proxies' maps");
        }
        self.merged.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn run(self: Arc<Self>) {
        loop {
            let asked = self.asked_ms.load(Ordering::Relaxed);
            if asked == 0 || self.elapsed_ms().saturating_sub(asked) > WATCHED.as_millis() as u64 {
                tokio::time::sleep(REFRESH / 4).await;
                continue;
            }
            let proxies = self.connected.list();
            let fetches = proxies.iter().map(|(id, ip)| fetch(id, *ip, self.port));
            let maps = futures::future::join_all(fetches).await;
            let merged = MeshMap::merge(maps);
            if let Ok(json) = serde_json::to_string(&merged) {
                *self.merged.lock().unwrap_or_else(|p| p.into_inner()) = json;
            }
            tokio::time::sleep(REFRESH).await;
        }
    }
}

/// One proxy's map; one naming it unreachable, with the reason, when it cannot be read.
async fn fetch(id: &str, ip: IpAddr, port: u16) -> MeshMap {
    let addr = SocketAddr::new(ip, port);
    let result = match format!("http://{addr}/map.json").parse::<http::Uri>() {
        Ok(uri) => exchange(Method::GET, &uri, None, Bytes::new(), FETCH_TIMEOUT).await,
        Err(e) => Err(format!("{addr}: {e}")),
    };
    let parsed = result.and_then(|(status, body)| match status {
        StatusCode::OK => serde_json::from_slice::<MeshMap>(&body).map_err(|e| format!("{addr}: not a mesh map: {e}")),
        other => Err(format!("{addr} answered {other}")),
    });
    match parsed {
        Ok(map) => map,
        Err(reason) => MeshMap { unreachable: vec![format!("{id}: {reason}")], ..MeshMap::default() },
    }
}
