//! Admission of connections from the network (OPS-4): per-source and total limits, checked right
//! after `accept` and before any handshake or byte is read, so that no pod can use up the
//! proxy's descriptors or memory; and accept loops that outlive `EMFILE`.
//!
//! A refused connection is reset at once (no TIME_WAIT, no task, no access line) and counted in
//! `strait_connections_refused_total{reason}`: under a flood the refusals are the flood, and a
//! line each would fill the disk instead of telling anyone anything.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

/// How many connections a gate lets through: from one source address, and in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub per_source: usize,
    pub total: usize,
}

/// Limits as configured; `None` takes a default sized from the open-file limit.
#[derive(Debug, Clone, Copy, Default)]
pub struct LimitSettings {
    /// TLS handshakes in progress on 15008, from one address and in all.
    pub handshakes_per_source: Option<usize>,
    pub handshakes: Option<usize>,
    /// Plaintext connections to captured pods (15006), from one address and in all.
    pub plaintext_per_source: Option<usize>,
    pub plaintext: Option<usize>,
    /// Outbound connections of captured pods (15001), from one pod and in all.
    pub outbound_per_pod: Option<usize>,
    pub outbound: Option<usize>,
}

/// The limits in force on a proxy's listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    pub handshakes: Limits,
    pub plaintext: Limits,
    pub outbound: Limits,
}

/// Descriptors kept out of every limit: certificates, the CA, admin, logs, pools' spare room.
const RESERVED_DESCRIPTORS: u64 = 1024;

impl LimitSettings {
    /// Fills the unset limits from the open-file limit. A proxied connection holds two
    /// descriptors (client and upstream side), so outbound and plaintext connections may take
    /// half of what is left each at most, and handshakes (one descriptor, short-lived) an
    /// eighth; with the usual limit of 2^20 the fixed caps apply instead. Per-source defaults:
    /// a node proxy opens few HBONE connections (they are pooled), so 256 handshakes at once
    /// from one address is far above any honest peer; 1,024 plaintext connections per client
    /// and 16,384 outbound connections per pod leave busy applications room.
    pub fn resolve(&self, open_files: u64) -> ListenerLimits {
        let budget = usize::try_from(open_files.saturating_sub(RESERVED_DESCRIPTORS).max(64)).unwrap_or(usize::MAX);
        let limits =
            |per_source: Option<usize>, default_per_source: usize, total: Option<usize>, cap: usize, share: usize| {
                let total = total.unwrap_or_else(|| (budget / share).clamp(1, cap));
                Limits { per_source: per_source.unwrap_or(default_per_source).min(total), total }
            };
        ListenerLimits {
            handshakes: limits(self.handshakes_per_source, 256, self.handshakes, 4096, 8),
            plaintext: limits(self.plaintext_per_source, 1024, self.plaintext, 65_536, 4),
            outbound: limits(self.outbound_per_pod, 16_384, self.outbound, 65_536, 4),
        }
    }
}

/// Why a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    PerSource,
    Total,
}

/// One listener's admission state: how many admitted connections each source holds.
#[derive(Debug)]
pub struct Gate {
    /// Names the listener in metrics and logs (`hbone`, `inbound_plaintext`, `outbound`).
    name: &'static str,
    limits: Limits,
    by_source: Mutex<HashMap<IpAddr, usize>>,
    total: AtomicUsize,
    refused_per_source: AtomicU64,
    refused_total: AtomicU64,
    /// When a refusal was last logged: one warning per `LOG_EVERY`, not one per connection.
    last_warning: Mutex<Option<Instant>>,
}

/// An admitted connection's place in its gate; dropping it gives the place back.
#[derive(Debug)]
pub struct Pass {
    gate: Arc<Gate>,
    source: IpAddr,
}

impl Drop for Pass {
    fn drop(&mut self) {
        let mut by_source = self.gate.by_source.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = by_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                by_source.remove(&self.source);
            }
        }
        self.gate.total.fetch_sub(1, Ordering::AcqRel);
    }
}

const LOG_EVERY: Duration = Duration::from_secs(10);

impl Gate {
    pub fn new(name: &'static str, limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            name,
            limits,
            by_source: Mutex::new(HashMap::new()),
            total: AtomicUsize::new(0),
            refused_per_source: AtomicU64::new(0),
            refused_total: AtomicU64::new(0),
            last_warning: Mutex::new(None),
        })
    }

    /// Admits a connection from `source`, or says why not.
    pub fn admit(self: &Arc<Self>, source: IpAddr) -> Result<Pass, Refusal> {
        let mut by_source = self.by_source.lock().unwrap_or_else(|p| p.into_inner());
        let held = by_source.get(&source).copied().unwrap_or(0);
        let refusal = if held >= self.limits.per_source {
            Some(Refusal::PerSource)
        } else if self.total.load(Ordering::Acquire) >= self.limits.total {
            Some(Refusal::Total)
        } else {
            None
        };
        if let Some(refusal) = refusal {
            drop(by_source);
            self.count_refusal(refusal, source);
            return Err(refusal);
        }
        by_source.insert(source, held + 1);
        self.total.fetch_add(1, Ordering::AcqRel);
        Ok(Pass { gate: self.clone(), source })
    }

    fn count_refusal(&self, refusal: Refusal, source: IpAddr) {
        let (counter, limit, what) = match refusal {
            Refusal::PerSource => (&self.refused_per_source, self.limits.per_source, "from one source"),
            Refusal::Total => (&self.refused_total, self.limits.total, "in all"),
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            *last = Some(Instant::now());
            warn!(
                listener = self.name,
                %source,
                "refusing connections: {limit} already open {what} (counted in strait_connections_refused_total; \
                 further refusals are not logged for {}s)",
                LOG_EVERY.as_secs()
            );
        }
    }

    /// Connections admitted and not yet given back.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Refusals so far, as `(reason, count)` pairs for `strait_connections_refused_total`.
    pub fn refusals(&self) -> [(String, u64); 2] {
        [
            (format!("{}_source_limit", self.name), self.refused_per_source.load(Ordering::Relaxed)),
            (format!("{}_total_limit", self.name), self.refused_total.load(Ordering::Relaxed)),
        ]
    }
}

/// `strait_connections_refused_total{reason}` over `gates`, read at every scrape.
pub fn refusal_counters(gates: Vec<Arc<Gate>>) -> crate::telemetry::ScrapedCounters {
    crate::telemetry::ScrapedCounters::by_label(
        "strait_connections_refused",
        "Connections reset right after accept because a per-source or total limit was reached (OPS-4)",
        "reason",
        move || gates.iter().flat_map(|g| g.refusals()).collect::<Vec<_>>(),
    )
}

/// Makes the socket's close a reset: a refused connection costs the peer one RST, and this
/// side no TIME_WAIT.
pub fn reset_on_close(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Accepts connections until `stop` turns true, admitting each through `gate` (when given)
/// and handing it to `handle`. Running out of descriptors or memory slows the loop down
/// instead of ending it or spinning; the listener itself stays open (it belongs to the caller).
pub async fn accept_loop<F>(
    name: &'static str,
    listener: &TcpListener,
    gate: Option<&Arc<Gate>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr, Option<Pass>),
{
    let mut backoff = Backoff::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                backoff.reset();
                let pass = match gate.map(|g| g.admit(peer.ip())) {
                    None => None,
                    Some(Ok(pass)) => Some(pass),
                    Some(Err(_)) => {
                        reset_on_close(&stream);
                        continue;
                    }
                };
                handle(stream, peer, pass);
            }
            Err(e) if is_resource_exhaustion(&e) => {
                let wait = backoff.next();
                if backoff.should_log() {
                    warn!(
                        listener = name,
                        "accept failed: {e}; retrying every {wait:?} until resources free up (raise the open-file \
                         limit, or lower the connection limits)"
                    );
                }
                tokio::time::sleep(wait).await;
            }
            // A connection the peer reset while it waited in the backlog, and the like: that
            // connection is gone, the listener is fine.
            Err(e) => debug!(listener = name, "accept failed: {e}"),
        }
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

/// Waits between accepts while resources are exhausted: from 5 ms doubling to 160 ms, so a
/// short spike costs little latency and a long one little CPU.
#[derive(Debug, Default)]
struct Backoff {
    failures: u32,
    last_log: Option<Instant>,
}

impl Backoff {
    fn next(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        Duration::from_millis(5u64 << (self.failures.min(6) - 1))
    }

    fn reset(&mut self) {
        self.failures = 0;
    }

    fn should_log(&mut self) -> bool {
        let due = self.last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY);
        if due {
            self.last_log = Some(Instant::now());
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // OPS-4: one source cannot take more than its share, and the total holds for all sources;
    // places come back when connections end.
    #[test]
    fn limits_per_source_and_in_all() {
        let gate = Gate::new("test", Limits { per_source: 2, total: 3 });
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let a1 = gate.admit(a).expect("first");
        let _a2 = gate.admit(a).expect("second");
        assert_eq!(gate.admit(a).err(), Some(Refusal::PerSource));
        let _b1 = gate.admit(b).expect("other source");
        assert_eq!(gate.admit(b).err(), Some(Refusal::Total));
        drop(a1);
        assert_eq!(gate.open(), 2);
        let _b2 = gate.admit(b).expect("room again");
        let refused: Vec<u64> = gate.refusals().iter().map(|(_, n)| *n).collect();
        assert_eq!(refused, [1, 1]);
        assert_eq!(gate.refusals()[0].0, "test_source_limit");
    }

    #[test]
    fn defaults_follow_the_open_file_limit() {
        let small = LimitSettings::default().resolve(4096);
        assert_eq!(small.handshakes, Limits { per_source: 256, total: 384 });
        assert_eq!(small.plaintext, Limits { per_source: 768, total: 768 });
        assert_eq!(small.outbound, Limits { per_source: 768, total: 768 });
        let large = LimitSettings::default().resolve(1 << 20);
        assert_eq!(large.handshakes, Limits { per_source: 256, total: 4096 });
        assert_eq!(large.outbound, Limits { per_source: 16_384, total: 65_536 });
        let set = LimitSettings { handshakes_per_source: Some(8), plaintext: Some(100), ..Default::default() };
        let set = set.resolve(1 << 20);
        assert_eq!(set.handshakes.per_source, 8);
        assert_eq!(set.plaintext, Limits { per_source: 100, total: 100 });
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let mut b = Backoff::default();
        let waits: Vec<u64> = (0..8).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(waits, [5, 10, 20, 40, 80, 160, 160, 160]);
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(5));
    }
}
