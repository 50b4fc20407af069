//! Load balancing over a destination's endpoints (L7-4): ROUND_ROBIN (the default), RANDOM,
//! LEAST_REQUEST (Envoy's power of two choices) and `consistentHash` (a hash ring), each
//! skipping endpoints that outlier detection ejected.

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

use crate::model::routes::LoadBalancer;

/// Points per endpoint on the hash ring: enough for an even spread over a few dozen
/// endpoints (Envoy's minimum ring is 1,024 entries), cheap to build on every config change.
const RING_POINTS_PER_ENDPOINT: usize = 128;

/// How one destination picks its endpoint.
#[derive(Debug)]
pub enum Balancer {
    RoundRobin {
        next: AtomicUsize,
    },
    Random,
    LeastRequest,
    /// Sorted (point, endpoint index) pairs.
    Ring(Vec<(u64, usize)>),
}

impl Balancer {
    /// The balancer for `policy` over endpoints at `addrs` (in endpoint order).
    pub fn new(policy: Option<&LoadBalancer>, addrs: &[SocketAddr]) -> Self {
        match policy {
            None | Some(LoadBalancer::RoundRobin) => {
                // Start at a random place, so that many waypoints do not all begin with the
                // same endpoint after a configuration change.
                let start = if addrs.is_empty() { 0 } else { fastrand::usize(..addrs.len()) };
                Balancer::RoundRobin { next: AtomicUsize::new(start) }
            }
            Some(LoadBalancer::Random) => Balancer::Random,
            Some(LoadBalancer::LeastRequest) => Balancer::LeastRequest,
            Some(LoadBalancer::ConsistentHash(_)) => {
                let mut ring = Vec::with_capacity(addrs.len() * RING_POINTS_PER_ENDPOINT);
                for (i, addr) in addrs.iter().enumerate() {
                    let key = addr.to_string();
                    for point in 0..RING_POINTS_PER_ENDPOINT {
                        ring.push((hash_parts(&[key.as_bytes(), &point.to_le_bytes()]), i));
                    }
                }
                ring.sort_unstable();
                Balancer::Ring(ring)
            }
        }
    }

    /// Picks one of `count` endpoints. `available(i)` says whether endpoint `i` may be used,
    /// `load(i)` how many requests it has in flight; `hash` is the request's consistent-hash
    /// key, when the policy hashes and the request has the key (without it, the pick is
    /// random, as Envoy's).
    pub fn pick(
        &self,
        count: usize,
        hash: Option<u64>,
        available: impl Fn(usize) -> bool,
        load: impl Fn(usize) -> u32,
    ) -> Option<usize> {
        if count == 0 {
            return None;
        }
        match self {
            Balancer::RoundRobin { next } => {
                let start = next.fetch_add(1, Ordering::Relaxed);
                (0..count).map(|k| (start + k) % count).find(|&i| available(i))
            }
            Balancer::Random => random_available(count, &available),
            Balancer::LeastRequest => {
                let a = random_available(count, &available)?;
                let b = random_available(count, &available)?;
                Some(if load(b) < load(a) { b } else { a })
            }
            Balancer::Ring(ring) => {
                let Some(hash) = hash else { return random_available(count, &available) };
                let start = ring.partition_point(|(point, _)| *point < hash);
                (0..ring.len()).map(|k| ring[(start + k) % ring.len()].1).find(|&i| i < count && available(i))
            }
        }
    }
}

/// A random available endpoint: a random start, then the next available one.
fn random_available(count: usize, available: &impl Fn(usize) -> bool) -> Option<usize> {
    let start = fastrand::usize(..count);
    (0..count).map(|k| (start + k) % count).find(|&i| available(i))
}

/// FNV-1a over the parts, then a 64-bit finalizer (murmur3's) so nearby keys spread over the
/// ring. Stable across processes and builds: every waypoint replica maps a key the same way.
pub fn hash_parts(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::model::routes::HashKey;

    fn addrs(n: usize) -> Vec<SocketAddr> {
        (0..n).map(|i| SocketAddr::from(([10, 2, 0, 10 + i as u8], 8080))).collect()
    }

    #[test]
    fn round_robin_cycles_and_skips_ejected() {
        let b = Balancer::new(None, &addrs(3));
        let picks: Vec<usize> = (0..6).filter_map(|_| b.pick(3, None, |_| true, |_| 0)).collect();
        let mut counts = HashMap::new();
        for p in &picks {
            *counts.entry(*p).or_insert(0) += 1;
        }
        assert_eq!(counts.values().copied().collect::<Vec<_>>(), vec![2, 2, 2], "{picks:?}");
        for _ in 0..10 {
            assert_eq!(b.pick(3, None, |i| i == 1, |_| 0), Some(1));
        }
        assert_eq!(b.pick(3, None, |_| false, |_| 0), None, "all ejected: no healthy upstream");
        assert_eq!(b.pick(0, None, |_| true, |_| 0), None);
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let b = Balancer::new(Some(&LoadBalancer::LeastRequest), &addrs(2));
        let busy_zero =
            (0..200).filter(|_| b.pick(2, None, |_| true, |i| if i == 0 { 50 } else { 0 }) == Some(0)).count();
        // Endpoint 0 wins only when both choices land on it: about a quarter of the time.
        assert!(busy_zero < 90, "{busy_zero}");
    }

    #[test]
    fn consistent_hash_is_stable_and_spreads() {
        let policy = LoadBalancer::ConsistentHash(HashKey::Header("x-user".into()));
        let b = Balancer::new(Some(&policy), &addrs(4));
        let key = hash_parts(&[b"alice"]);
        let first = b.pick(4, Some(key), |_| true, |_| 0);
        for _ in 0..20 {
            assert_eq!(b.pick(4, Some(key), |_| true, |_| 0), first);
        }
        let again = Balancer::new(Some(&policy), &addrs(4));
        assert_eq!(again.pick(4, Some(key), |_| true, |_| 0), first, "same ring in another process");
        let mut seen = HashMap::new();
        for user in 0..400 {
            let k = hash_parts(&[format!("user-{user}").as_bytes()]);
            *seen.entry(b.pick(4, Some(k), |_| true, |_| 0)).or_insert(0) += 1;
        }
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert!(seen.values().all(|&n| n > 50), "{seen:?}");
        let Some(chosen) = first else { panic!("a pick") };
        let moved = b.pick(4, Some(key), |i| i != chosen, |_| 0);
        assert!(moved.is_some() && moved != first, "an ejected endpoint's keys move to the next one");
    }
}
