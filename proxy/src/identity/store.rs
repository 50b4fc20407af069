//! The certificates a node proxy holds for its workloads: issued on first use (or ahead of it,
//! for local workloads), shared by every connection of that identity, and renewed at half life
//! in the background so no connection ever waits on, or is dropped by, a rotation (ID-1).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use tokio::sync::Mutex as AsyncMutex;
use tracing::{info, warn};

use super::{CertificateProvider, Identity, IdentityError, TlsSettings};

/// How long to wait before retrying a failed renewal.
const RETRY_AFTER: Duration = Duration::from_secs(1);

type Slot = Arc<AsyncMutex<Option<Arc<TlsSettings>>>>;

/// Per-identity TLS settings backed by a certificate provider.
pub struct CertStore {
    provider: Arc<dyn CertificateProvider>,
    ttl: Duration,
    /// One slot per identity; its async lock makes concurrent first requests issue once.
    slots: Mutex<HashMap<Identity, Slot>>,
}

impl CertStore {
    pub fn new(provider: Arc<dyn CertificateProvider>, ttl: Duration) -> Arc<Self> {
        let store = Arc::new(Self { provider, ttl, slots: Mutex::new(HashMap::new()) });
        tokio::spawn(renew_forever(Arc::downgrade(&store)));
        store
    }

    fn slot(&self, identity: &Identity) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        slots.entry(identity.clone()).or_default().clone()
    }

    /// TLS settings for `identity`, issuing a certificate if none is held yet.
    pub async fn get(&self, identity: &Identity) -> Result<Arc<TlsSettings>, IdentityError> {
        let slot = self.slot(identity);
        let mut held = slot.lock().await;
        if let Some(settings) = held.as_ref()
            && settings.cert.not_after > SystemTime::now()
        {
            return Ok(settings.clone());
        }
        let settings = self.issue(identity).await?;
        *held = Some(settings.clone());
        Ok(settings)
    }

    /// Issues certificates for identities ahead of their first connection.
    pub fn prefetch(self: &Arc<Self>, identities: impl IntoIterator<Item = Identity>) {
        for identity in identities {
            let store = self.clone();
            tokio::spawn(async move {
                if let Err(e) = store.get(&identity).await {
                    warn!(%identity, "cannot obtain a certificate: {e}");
                }
            });
        }
    }

    /// The certificates held now (for the admin API and tests).
    pub fn held(&self) -> Vec<Arc<TlsSettings>> {
        let slots: Vec<Slot> = self.slots.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        slots.iter().filter_map(|s| s.try_lock().ok().and_then(|g| g.clone())).collect()
    }

    async fn issue(&self, identity: &Identity) -> Result<Arc<TlsSettings>, IdentityError> {
        let cert = self.provider.issue(identity, self.ttl).await?;
        info!(%identity, serial = %cert.serial, expires = %crate::telemetry::rfc3339(cert.not_after), "certificate issued");
        Ok(Arc::new(TlsSettings::new(Arc::new(cert))?))
    }

    /// Renews every certificate past half life; returns when the next one will be due.
    async fn renew_due(&self) -> SystemTime {
        let now = SystemTime::now();
        let mut next = now + self.ttl / 2;
        let slots: Vec<(Identity, Slot)> =
            self.slots.lock().unwrap_or_else(|p| p.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        for (identity, slot) in slots {
            let due = match slot.lock().await.as_ref() {
                Some(s) => s.cert.refresh_at(),
                None => continue,
            };
            if due > now {
                next = next.min(due);
                continue;
            }
            // Issue before taking the lock: connections keep using the old certificate
            // until the new one is in place.
            match self.issue(&identity).await {
                Ok(fresh) => {
                    next = next.min(fresh.cert.refresh_at());
                    *slot.lock().await = Some(fresh);
                }
                Err(e) => {
                    warn!(%identity, "certificate renewal failed, retrying: {e}");
                    next = next.min(now + RETRY_AFTER);
                }
            }
        }
        next
    }
}

async fn renew_forever(store: std::sync::Weak<CertStore>) {
    let mut wait = Duration::from_millis(100);
    loop {
        tokio::time::sleep(wait).await;
        let Some(store) = store.upgrade() else { return };
        let next = store.renew_due().await;
        // Never sleep long: new identities may be added with short lifetimes.
        wait = next
            .duration_since(SystemTime::now())
            .unwrap_or_default()
            .clamp(Duration::from_millis(100), Duration::from_secs(30));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::LocalCa;

    // ID-1: a 2 s certificate is replaced at half life by the background renewal.
    #[tokio::test]
    async fn renews_at_half_life() {
        let dir = std::env::temp_dir().join(format!("strait-store-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = Arc::new(LocalCa::load_or_create(&dir, "cluster.local").expect("ca"));
        let store = CertStore::new(ca, Duration::from_secs(2));
        let id = Identity::new("cluster.local", "ns", "sa");
        let first = store.get(&id).await.expect("issue");
        let again = store.get(&id).await.expect("cached");
        assert_eq!(first.cert.serial, again.cert.serial);
        tokio::time::sleep(Duration::from_millis(1600)).await;
        let renewed = store.get(&id).await.expect("renewed");
        assert_ne!(first.cert.serial, renewed.cert.serial, "renewed after half life");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
