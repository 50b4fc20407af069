//! Leader election among `strait control` replicas (CFG-3, OPS-2): every replica serves xDS and
//! the CA API, but only the holder of one `coordination.k8s.io/v1` Lease writes to the API
//! server (Events, waypoint objects, Gateway status), so two replicas never fight over an
//! object. Writers ask [`Leadership::is_leader`] right before each write.
//!
//! The protocol is client-go's: the holder renews the Lease every `retry_period`; another
//! replica takes it over once it has seen the same record unchanged for `lease_duration` (by its
//! own clock, so clocks need not agree); a holder that cannot renew within `renew_deadline`
//! stops writing before anyone may take over; every update carries the `resourceVersion` read,
//! so of two replicas racing for the Lease exactly one wins. A replica that stops releases the
//! Lease, so the next one takes over at once instead of after `lease_duration`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{Api, Client, api::PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

/// client-go's defaults (kube-controller-manager's too): a dead leader is replaced within
/// 15 s plus one retry; a live one renews 7 times per lease.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
pub const RENEW_DEADLINE: Duration = Duration::from_secs(10);
pub const RETRY_PERIOD: Duration = Duration::from_secs(2);

/// Which Lease, and who we are.
#[derive(Debug, Clone)]
pub struct LeaderOptions {
    pub namespace: String,
    pub name: String,
    /// This replica's name in `holderIdentity`: unique among replicas (the pod's name).
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl LeaderOptions {
    pub fn new(namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            identity: identity.to_owned(),
            lease_duration: LEASE_DURATION,
            renew_deadline: RENEW_DEADLINE,
            retry_period: RETRY_PERIOD,
        }
    }
}

/// Whether this replica holds the Lease, for the writers; cheap to clone.
#[derive(Debug, Clone)]
pub struct Leadership {
    leading: watch::Receiver<bool>,
}

impl Leadership {
    /// True while this replica holds the Lease and renewed it within the renew deadline.
    pub fn is_leader(&self) -> bool {
        *self.leading.borrow()
    }

    /// Waits until leadership changes; `false` when the election has stopped.
    pub async fn changed(&mut self) -> bool {
        self.leading.changed().await.is_ok()
    }
}

/// Handle of a running election: dropping it does nothing, [`Election::release`] steps down.
pub struct Election {
    api: Api<Lease>,
    options: Arc<LeaderOptions>,
    leading: Arc<watch::Sender<bool>>,
    task: tokio::task::JoinHandle<()>,
}

/// Starts campaigning for the Lease in the background.
pub fn start(client: Client, options: LeaderOptions) -> (Election, Leadership) {
    let api: Api<Lease> = Api::namespaced(client, &options.namespace);
    let (tx, leading) = watch::channel(false);
    let leading_tx = Arc::new(tx);
    let options = Arc::new(options);
    let task = tokio::spawn(campaign(api.clone(), options.clone(), leading_tx.clone()));
    (Election { api, options, leading: leading_tx, task }, Leadership { leading })
}

impl Election {
    /// Stops campaigning and, if leading, hands the Lease back (empty holder, 1 s duration),
    /// as client-go's `ReleaseOnCancel`: the next replica need not wait out the lease.
    pub async fn release(self) {
        self.task.abort();
        let was_leading = self.leading.send_replace(false);
        if !was_leading {
            return;
        }
        let identity = self.options.identity.clone();
        let result = async {
            let mut lease = self.api.get(&self.options.name).await?;
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(identity.as_str()) {
                return Ok(());
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            self.api.replace(&self.options.name, &PostParams::default(), &lease).await.map(drop)
        }
        .await;
        match result {
            Ok(()) => info!(lease = %self.options.name, "leader election: released the lease"),
            Err(e) => warn!(lease = %self.options.name, "leader election: cannot release the lease ({e})"),
        }
    }
}

/// The Lease record as last seen, and when (by our clock) it last changed.
struct Observed {
    holder: Option<String>,
    renew_time: Option<Timestamp>,
    duration: Duration,
    since: Instant,
}

async fn campaign(api: Api<Lease>, options: Arc<LeaderOptions>, leading: Arc<watch::Sender<bool>>) {
    let mut observed: Option<Observed> = None;
    // When this replica last renewed successfully.
    let mut renewed: Option<Instant> = None;
    // The last error logged: one that repeats every retry (no such namespace, forbidden) is
    // logged once, not every 2 s.
    let mut last_error = String::new();
    loop {
        match try_acquire_or_renew(&api, &options, &mut observed).await {
            Ok(held) => {
                renewed = if held { Some(Instant::now()) } else { None };
                last_error.clear();
            }
            Err(e) => {
                let error = e.to_string();
                if error != last_error {
                    warn!(
                        lease = %options.name,
                        namespace = %options.namespace,
                        "leader election: {error} (retrying every {:?}; until this replica leads, it writes nothing: \
                         no waypoints reconciled, no Gateway status)",
                        options.retry_period
                    );
                    last_error = error;
                }
            }
        }
        // Held only while renewed within the deadline: a replica cut off from the API server
        // stops writing before another may take the Lease (renew_deadline < lease_duration).
        let now_leading = renewed.is_some_and(|at| at.elapsed() < options.renew_deadline);
        let was = leading.send_replace(now_leading);
        if was != now_leading {
            if now_leading {
                info!(lease = %options.name, identity = %options.identity, "leader election: leading");
            } else {
                warn!(lease = %options.name, identity = %options.identity, "leader election: not leading any more");
            }
        }
        tokio::time::sleep(options.retry_period).await;
    }
}

/// One round: `Ok(true)` if we hold the Lease after it, `Ok(false)` if another replica does.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    options: &LeaderOptions,
    observed: &mut Option<Observed>,
) -> Result<bool, kube::Error> {
    let now = Timestamp::now();
    let lease_seconds = i32::try_from(options.lease_duration.as_secs()).unwrap_or(i32::MAX);
    let mine = |transitions: i32, acquire: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(options.identity.clone()),
        lease_duration_seconds: Some(lease_seconds),
        acquire_time: acquire.or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..LeaseSpec::default()
    };
    let Some(mut lease) = api.get_opt(&options.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta { name: Some(options.name.clone()), ..ObjectMeta::default() },
            spec: Some(mine(0, None)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            // Another replica created it first: it leads.
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    let renew_time = spec.renew_time.as_ref().map(|t| t.0);
    let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0));
    let changed = observed.as_ref().is_none_or(|o| o.holder != holder || o.renew_time != renew_time);
    if changed {
        *observed = Some(Observed { holder: holder.clone(), renew_time, duration, since: Instant::now() });
    }
    let held_by_me = holder.as_deref() == Some(options.identity.as_str());
    let expired = holder.is_none() || observed.as_ref().is_some_and(|o| o.since.elapsed() >= o.duration);
    if !held_by_me && !expired {
        return Ok(false);
    }
    let transitions = spec.lease_transitions.unwrap_or(0);
    lease.spec = Some(if held_by_me {
        mine(transitions, spec.acquire_time.clone())
    } else {
        mine(transitions.saturating_add(1), None)
    });
    // `replace` sends the resourceVersion read: a concurrent writer makes it fail with 409.
    match api.replace(&options.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
