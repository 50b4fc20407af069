//! The certificates a node proxy holds for its workloads: issued on first use (or ahead of it,
//! for local workloads), shared by every connection of that identity, and renewed at about half
//! life in the background so no connection ever waits on, or is dropped by, a rotation (ID-1).
//!
//! A CA that fails is asked again with exponential back-off, per identity, and connections
//! arriving in between get the back-off error at once instead of a request of their own: a CA
//! that is down sees a few requests a minute, never one per connection (see `renewal`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use tokio::sync::{Mutex as AsyncMutex, Notify};
use tracing::{info, warn};

use super::{
    CertificateProvider, Identity, IdentityError, TlsSettings,
    renewal::{self, MIN_USEFUL_LIFE},
};

/// The renewal task looks again at least this often even when nothing is due, so a wall-clock
/// step (suspend, NTP) delays a renewal by at most this much.
const RECHECK: Duration = Duration::from_secs(30);

/// What the store holds for one identity.
#[derive(Default)]
struct Held {
    settings: Option<Arc<TlsSettings>>,
    /// Failed requests to the CA in a row, and when the next one may go.
    failures: u32,
    retry_at: Option<Instant>,
    last_error: String,
}

impl Held {
    fn valid(&self, now: SystemTime) -> Option<&Arc<TlsSettings>> {
        self.settings.as_ref().filter(|s| s.cert.not_after > now)
    }

    /// When this identity next needs a request to the CA: the retry after a failure, else the
    /// renewal of the certificate held; `None` for nothing held and no failure (being issued).
    fn due(&self, now: Instant, wall: SystemTime) -> Option<Instant> {
        if let Some(retry_at) = self.retry_at {
            return Some(retry_at);
        }
        let refresh = self.settings.as_ref()?.cert.refresh_at();
        Some(now + refresh.duration_since(wall).unwrap_or_default())
    }

    /// Keeps a fresh certificate, or counts a failure, schedules the retry and says so (each
    /// request to the CA that fails is logged once, here).
    fn record(
        &mut self,
        identity: &Identity,
        result: Result<Arc<TlsSettings>, IdentityError>,
    ) -> Result<Arc<TlsSettings>, IdentityError> {
        match result {
            Ok(settings) => {
                self.settings = Some(settings.clone());
                (self.failures, self.retry_at) = (0, None);
                Ok(settings)
            }
            Err(e) => {
                self.failures = self.failures.saturating_add(1);
                self.retry_at = Some(Instant::now() + renewal::retry_after(self.failures, fastrand::f64()));
                self.last_error = e.to_string();
                let (failures, retry_in) = (self.failures, self.retry_in().as_secs_f64());
                if self.valid(SystemTime::now()).is_some() {
                    warn!(%identity, failures, "certificate renewal failed, next attempt in {retry_in:.1}s: {e}");
                } else {
                    warn!(%identity, failures, "cannot obtain a certificate, next attempt in {retry_in:.1}s: {e}");
                }
                Err(e)
            }
        }
    }

    fn retry_in(&self) -> Duration {
        self.retry_at.map_or(Duration::ZERO, |at| at.saturating_duration_since(Instant::now()))
    }
}

type Slot = Arc<AsyncMutex<Held>>;

/// An identity the store has no valid certificate for.
#[derive(Debug, Clone)]
pub struct PendingCert {
    pub identity: Identity,
    /// Failed requests to the CA in a row; 0 while the first one is in flight.
    pub failures: u32,
    pub last_error: Option<String>,
    /// When the CA is asked again, after a failure.
    pub retry_in: Option<Duration>,
}

/// Per-identity TLS settings backed by a certificate provider.
pub struct CertStore {
    provider: Arc<dyn CertificateProvider>,
    ttl: Duration,
    /// One slot per identity; its async lock makes concurrent first requests issue once.
    slots: Mutex<HashMap<Identity, Slot>>,
    /// Wakes the renewal task when a certificate or a failure changes what is due next.
    schedule_changed: Arc<Notify>,
}

impl CertStore {
    pub fn new(provider: Arc<dyn CertificateProvider>, ttl: Duration) -> Arc<Self> {
        let schedule_changed = Arc::new(Notify::new());
        let store = Arc::new(Self { provider, ttl, slots: Mutex::new(HashMap::new()), schedule_changed });
        tokio::spawn(renew_forever(Arc::downgrade(&store), store.schedule_changed.clone()));
        store
    }

    fn slot(&self, identity: &Identity) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(identity.clone()).or_default().clone()
    }

    /// TLS settings for `identity`, issuing a certificate if none is held yet, unless the CA
    /// failed recently for it (then the back-off error, without asking the CA).
    pub async fn get(&self, identity: &Identity) -> Result<Arc<TlsSettings>, IdentityError> {
        let slot = self.slot(identity);
        let mut held = slot.lock().await;
        if let Some(settings) = held.valid(SystemTime::now()) {
            return Ok(settings.clone());
        }
        if held.retry_at.is_some_and(|at| at > Instant::now()) {
            return Err(IdentityError::BackingOff {
                identity: identity.to_string(),
                failures: held.failures,
                retry_in: held.retry_in(),
                last: held.last_error.clone(),
            });
        }
        let result = held.record(identity, self.issue(identity).await);
        self.schedule_changed.notify_one();
        result
    }

    /// Issues certificates for identities ahead of their first connection.
    pub fn prefetch(self: &Arc<Self>, identities: impl IntoIterator<Item = Identity>) {
        for identity in identities {
            let store = self.clone();
            tokio::spawn(async move {
                // A failure is logged where it happens, with its retry.
                let _ = store.get(&identity).await;
            });
        }
    }

    /// The certificates held now (for the admin API and tests).
    pub fn held(&self) -> Vec<Arc<TlsSettings>> {
        let slots: Vec<Slot> = self.slots.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        slots.iter().filter_map(|s| s.try_lock().ok().and_then(|held| held.settings.clone())).collect()
    }

    /// When each certificate held expires, as a gauge family read at every scrape
    /// (`strait_certificate_expiry_timestamp_seconds{identity}`, Unix seconds): a renewal that
    /// keeps failing shows as an expiry coming closer instead of moving on at half life.
    pub fn expiry_gauges(self: &Arc<Self>) -> crate::telemetry::ScrapedGauges {
        let store = Arc::downgrade(self);
        crate::telemetry::ScrapedGauges::by_label(
            "strait_certificate_expiry_timestamp_seconds",
            "When the workload certificate held for an identity expires (Unix time, seconds)",
            "identity",
            move || {
                let Some(store) = store.upgrade() else { return Vec::new() };
                let mut expiries: Vec<(String, i64)> = store
                    .held()
                    .iter()
                    .map(|s| {
                        let at = s.cert.not_after.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
                        (s.cert.identity.to_string(), i64::try_from(at.as_secs()).unwrap_or(i64::MAX))
                    })
                    .collect();
                expiries.sort();
                expiries
            },
        )
    }

    /// Identities asked for that have no valid certificate now: being issued, or failing (for
    /// the admin API, as istioctl shows `Initializing` and `Unavailable` certificates).
    pub fn pending(&self) -> Vec<PendingCert> {
        let slots: Vec<(Identity, Slot)> =
            self.slots.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let now = SystemTime::now();
        slots
            .into_iter()
            .filter_map(|(identity, slot)| match slot.try_lock() {
                // Locked: a request to the CA for it is in flight.
                Err(_) => Some(PendingCert { identity, failures: 0, last_error: None, retry_in: None }),
                Ok(held) if held.valid(now).is_none() => Some(PendingCert {
                    identity,
                    failures: held.failures,
                    last_error: (held.failures > 0).then(|| held.last_error.clone()),
                    retry_in: held.retry_at.map(|_| held.retry_in()),
                }),
                Ok(_) => None,
            })
            .collect()
    }

    async fn issue(&self, identity: &Identity) -> Result<Arc<TlsSettings>, IdentityError> {
        let cert = self.provider.issue(identity, self.ttl).await?;
        let life = cert.not_after.duration_since(cert.received.max(cert.not_before)).unwrap_or_default();
        if life < MIN_USEFUL_LIFE {
            return Err(IdentityError::Issue {
                identity: identity.to_string(),
                reason: format!(
                    "the CA's certificate expires {} (valid {:.1}s from now): check the clocks of this node and \
                     of the CA",
                    crate::telemetry::rfc3339(cert.not_after),
                    life.as_secs_f64()
                ),
            });
        }
        info!(%identity, serial = %cert.serial, expires = %crate::telemetry::rfc3339(cert.not_after), "certificate issued");
        Ok(Arc::new(TlsSettings::new(Arc::new(cert))?))
    }

    /// Renews the certificates due and retries the failed requests due; returns when the next
    /// one will be due.
    async fn renew_due(&self) -> Instant {
        let mut next = Instant::now() + RECHECK;
        let slots: Vec<(Identity, Slot)> =
            self.slots.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (identity, slot) in slots {
            // A slot in use is being issued by a connection right now.
            let Ok(mut held) = slot.try_lock() else { continue };
            let Some(due) = held.due(Instant::now(), SystemTime::now()) else { continue };
            if due > Instant::now() {
                next = next.min(due);
                continue;
            }
            if held.valid(SystemTime::now()).is_some() {
                // Issue without the lock: connections keep using the certificate held until
                // the new one is in place.
                drop(held);
                let result = self.issue(&identity).await;
                held = slot.lock().await;
                let _ = held.record(&identity, result);
            } else {
                let result = self.issue(&identity).await;
                let _ = held.record(&identity, result);
            }
            if let Some(due) = held.due(Instant::now(), SystemTime::now()) {
                next = next.min(due);
            }
        }
        next
    }
}

/// Holds the store only while working on it, so dropping its last handle ends the task.
async fn renew_forever(store: std::sync::Weak<CertStore>, schedule_changed: Arc<Notify>) {
    let mut next = Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(next.saturating_duration_since(Instant::now())) => {}
            () = schedule_changed.notified() => {}
        }
        let Some(store) = store.upgrade() else { return };
        next = store.renew_due().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{BoxFuture, IssuedCert, LocalCa};

    fn temp_ca(tag: &str) -> (Arc<LocalCa>, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("strait-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (Arc::new(LocalCa::load_or_create(&dir, "cluster.local").expect("ca")), dir)
    }

    // ID-1: a 2 s certificate is replaced at about half life by the background renewal, once:
    // the back-dated notBefore does not make it due at once.
    #[tokio::test]
    async fn renews_at_half_life_and_only_then() {
        let (ca, dir) = temp_ca("renew");
        let store = CertStore::new(ca, Duration::from_secs(2));
        let id = Identity::new("cluster.local", "ns", "sa");
        let first = store.get(&id).await.expect("issue");
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(store.get(&id).await.expect("cached").cert.serial, first.cert.serial, "not renewed early");
        tokio::time::sleep(Duration::from_millis(700)).await;
        let renewed = store.get(&id).await.expect("renewed");
        assert_ne!(first.cert.serial, renewed.cert.serial, "renewed after half life");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(store.get(&id).await.expect("cached").cert.serial, renewed.cert.serial, "once, not in a loop");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A CA that always fails, counting the requests it gets.
    struct DownCa(std::sync::atomic::AtomicU32);

    impl CertificateProvider for DownCa {
        fn issue<'a>(&'a self, _: &'a Identity, _: Duration) -> BoxFuture<'a, Result<IssuedCert, IdentityError>> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Box::pin(async { Err(IdentityError::CaRequest("connection refused".into())) })
        }
    }

    // A CA that is down gets one request, then the retries of the back-off (1 s later), however
    // many connections ask meanwhile.
    #[tokio::test]
    async fn a_failing_ca_is_not_asked_by_every_connection() {
        let ca = Arc::new(DownCa(Default::default()));
        let store = CertStore::new(ca.clone(), Duration::from_secs(60));
        let id = Identity::new("cluster.local", "ns", "sa");
        for _ in 0..50 {
            let _ = store.get(&id).await;
        }
        let backing_off = store.get(&id).await.expect_err("no certificate");
        assert!(matches!(backing_off, IdentityError::BackingOff { failures: 1, .. }), "{backing_off}");
        assert_eq!(ca.0.load(std::sync::atomic::Ordering::Relaxed), 1);
        tokio::time::sleep(Duration::from_millis(1400)).await;
        assert_eq!(ca.0.load(std::sync::atomic::Ordering::Relaxed), 2, "the renewal task retried once");
    }
}
