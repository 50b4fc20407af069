//! The addresses of ServiceEntry hosts of resolution DNS (GW-3), as the node's own resolver gives
//! them: `getaddrinfo` through `tokio::net::lookup_host`, so `/etc/resolv.conf`, `/etc/hosts` and
//! nsswitch apply as they do for the pods' applications, with no DNS client of our own.
//!
//! The node proxy uses the answers twice: a connection to an address one of these names resolves
//! to is known as that service (telemetry, REGISTRY_ONLY, L4-5), and a connection to the VIP of
//! such an entry is sent to one of the addresses.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc, RwLock,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::model::ModelHandle;

/// How often every name is resolved again. getaddrinfo does not tell the records' TTL, so the
/// interval stands in for it: 5 s is Envoy's default `dns_refresh_rate` for the same clusters, and
/// one query per name per node every 5 s is nothing next to the traffic it serves.
pub const REFRESH: Duration = Duration::from_secs(5);
/// A lookup that takes longer is abandoned until the next round; the previous answer is kept.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(3);

/// What the names resolved to, replaced whole on each round.
#[derive(Debug, Default)]
struct Answers {
    by_name: HashMap<String, Vec<IpAddr>>,
    /// The first name (in sorted order) resolving to each address.
    by_ip: HashMap<IpAddr, String>,
}

/// The latest answers, shared by every connection. Reads take a read lock for a map lookup only.
#[derive(Debug, Default)]
pub struct DnsCache {
    answers: RwLock<Arc<Answers>>,
    /// Spreads connections over a name's addresses.
    next: AtomicUsize,
    /// Counts refresh rounds that changed an answer, for state derived from the answers (the
    /// waypoint's destinations, SPEC GW-3) to know when to rebuild.
    generation: AtomicU64,
}

impl DnsCache {
    fn current(&self) -> Arc<Answers> {
        self.answers.read().map(|a| a.clone()).unwrap_or_default()
    }

    /// The addresses `name` resolved to in the last round (none when it never resolved).
    pub fn addresses(&self, name: &str) -> Vec<IpAddr> {
        self.current().by_name.get(name).cloned().unwrap_or_default()
    }

    /// Changes whenever an answer changes.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The ServiceEntry host (or endpoint name) that resolved to `ip`, if any.
    pub fn name_of(&self, ip: IpAddr) -> Option<String> {
        self.current().by_ip.get(&ip).cloned()
    }

    /// One address of `name`, taking them in turn: the cached answer, else a lookup now (a
    /// connection arriving before the first round, or for a name that failed).
    pub async fn pick(&self, name: &str) -> Result<IpAddr, String> {
        let cached = self.current().by_name.get(name).cloned().unwrap_or_default();
        let addresses = if cached.is_empty() { lookup(name).await? } else { cached };
        let i = self.next.fetch_add(1, Ordering::Relaxed) % addresses.len().max(1);
        addresses.get(i).copied().ok_or_else(|| format!("{name} resolves to no address"))
    }

    /// Resolves every name (in parallel) and replaces the answers. A name whose lookup fails
    /// keeps its previous answer: a resolver hiccup must not turn a known host into an unknown
    /// one under REGISTRY_ONLY.
    pub async fn refresh(&self, names: &[String]) {
        let previous = self.current();
        let mut lookups = JoinSet::new();
        for name in names {
            let name = name.clone();
            lookups.spawn(async move {
                let result = lookup(&name).await;
                (name, result)
            });
        }
        let mut by_name = HashMap::new();
        while let Some(joined) = lookups.join_next().await {
            let Ok((name, result)) = joined else { continue };
            match result {
                Ok(mut addresses) => {
                    addresses.sort();
                    addresses.dedup();
                    if previous.by_name.get(&name) != Some(&addresses) {
                        info!(%name, ?addresses, "ServiceEntry host resolved");
                    }
                    by_name.insert(name, addresses);
                }
                Err(e) => {
                    if let Some(old) = previous.by_name.get(&name) {
                        warn!(%name, "cannot resolve ServiceEntry host: {e}; keeping its previous addresses");
                        by_name.insert(name, old.clone());
                    } else {
                        warn!(%name, "cannot resolve ServiceEntry host: {e}");
                    }
                }
            }
        }
        let mut sorted: Vec<(&String, &Vec<IpAddr>)> = by_name.iter().collect();
        sorted.sort();
        let mut by_ip = HashMap::new();
        for (name, addresses) in sorted {
            for ip in addresses {
                by_ip.entry(*ip).or_insert_with(|| name.clone());
            }
        }
        let changed = previous.by_name != by_name;
        let answers = Arc::new(Answers { by_name, by_ip });
        if let Ok(mut slot) = self.answers.write() {
            *slot = answers;
        }
        if changed {
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
    }
}

async fn lookup(name: &str) -> Result<Vec<IpAddr>, String> {
    match tokio::time::timeout(LOOKUP_TIMEOUT, tokio::net::lookup_host((name, 0))).await {
        Ok(Ok(addresses)) => {
            let addresses: Vec<IpAddr> = addresses.map(|a| a.ip()).collect();
            if addresses.is_empty() { Err(format!("{name} resolves to no address")) } else { Ok(addresses) }
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {LOOKUP_TIMEOUT:?}")),
    }
}

/// Keeps `cache` resolving the model's names: at once, on every new model, and every `REFRESH`.
pub async fn keep_resolved(cache: Arc<DnsCache>, mut model: ModelHandle) {
    loop {
        let names = model.current().dns_names();
        cache.refresh(&names).await;
        tokio::select! {
            changed = model.changed() => if !changed { return },
            () = tokio::time::sleep(REFRESH) => {}
        }
    }
}

/// Tests elsewhere: a cache holding given answers.
#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    pub fn answers(entries: &[(&str, &str)]) -> DnsCache {
        let mut answers = Answers::default();
        for (name, ip) in entries {
            let ip: IpAddr = ip.parse().expect("ip");
            answers.by_name.entry((*name).to_owned()).or_insert_with(Vec::new).push(ip);
            answers.by_ip.insert(ip, (*name).to_owned());
        }
        DnsCache { answers: RwLock::new(Arc::new(answers)), next: AtomicUsize::new(0), generation: AtomicU64::new(0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // GW-3: names resolve through the system resolver (here /etc/hosts' localhost); a failed
    // name keeps its previous answer; addresses map back to their name.
    #[tokio::test]
    async fn resolves_and_keeps_answers() {
        let cache = DnsCache::default();
        cache.refresh(&["localhost".to_owned(), "no-such-host.invalid".to_owned()]).await;
        let ip = cache.pick("localhost").await.expect("localhost resolves");
        assert!(ip.is_loopback(), "{ip}");
        assert_eq!(cache.name_of(ip).as_deref(), Some("localhost"));
        assert!(cache.pick("no-such-host.invalid").await.is_err());
        // Stale beats nothing: a name that stops resolving keeps what it had.
        let mut answers = Answers::default();
        answers.by_name.insert("gone.invalid".into(), vec![ip]);
        *cache.answers.write().expect("lock") = Arc::new(answers);
        cache.refresh(&["gone.invalid".to_owned()]).await;
        assert_eq!(cache.pick("gone.invalid").await, Ok(ip));
    }
}
