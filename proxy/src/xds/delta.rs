//! The delta xDS rules of one subscriber and one type URL (CFG-3), without I/O: what it asked
//! for, what it holds, and so what the next response must carry.
//!
//! The rules are Envoy's incremental xDS as istiod applies them: a first request that names
//! nothing is a wildcard subscription (legacy wildcard), `*` subscribes to everything and
//! unsubscribing `*` ends that, names are subscribed and unsubscribed one by one, and
//! `initial_resource_versions` on a reconnected stream tell what the subscriber already holds,
//! so an unchanged resource (same version) is not sent again and one that is gone is listed in
//! `removed_resources`. A NACK changes nothing here: like istiod, the server keeps believing the
//! subscriber holds what it was sent, so nothing is resent until that resource changes again.

use std::{
    borrow::Borrow,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    hash::{Hash, Hasher},
    sync::Arc,
};

use strait_proto::prost_types::Any;

use super::XdsResource;

/// A resource a subscriber holds: the one it was sent, or the name and version it said it had.
/// Equal, and hashed, by name.
#[derive(Debug, Clone)]
struct Held(Arc<XdsResource>);

impl Held {
    /// What a subscriber said it holds (`initial_resource_versions`): a name and a version.
    fn reported(name: &str, version: &str) -> Self {
        Self(Arc::new(XdsResource {
            name: name.to_owned(),
            version: version.to_owned(),
            aliases: Vec::new(),
            body: Any::default(),
        }))
    }

    fn is(&self, resource: &Arc<XdsResource>) -> bool {
        Arc::ptr_eq(&self.0, resource) || self.0.version == resource.version
    }
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.0.name == other.0.name
    }
}

impl Eq for Held {}

impl Hash for Held {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.name.as_str().hash(state);
    }
}

impl Borrow<str> for Held {
    fn borrow(&self) -> &str {
        &self.0.name
    }
}

/// The resources of one type URL, by name.
pub type TypeResources = BTreeMap<String, Arc<XdsResource>>;

/// One subscriber's subscription to one type URL.
#[derive(Debug, Default)]
pub struct Subscription {
    /// Subscribed to every resource of the type (that it may see).
    wildcard: bool,
    /// Names subscribed to explicitly: resource names or aliases (`network/ip`).
    explicit: BTreeSet<String>,
    /// What the subscriber holds, as far as the server knows, by name. The entries share the
    /// snapshot's resources rather than copy their names and versions: with 100 subscribers of
    /// a 10,000-pod mesh, copies would be a million strings.
    held: HashSet<Held>,
    /// Whether the first request was seen (it decides the legacy wildcard).
    started: bool,
}

/// Which resources a push must look at.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Examine {
    /// Every resource of the type and everything held.
    pub all: bool,
    /// These resource names (on top of `all`).
    pub names: BTreeSet<String>,
    /// Names subscribed to that match no resource: reported as removed, as the protocol asks.
    pub not_found: Vec<String>,
}

impl Examine {
    pub fn names<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        Self { all: false, names: names.into_iter().map(Into::into).collect(), not_found: Vec::new() }
    }
}

/// What one response must carry.
#[derive(Debug, Default)]
pub struct Delta {
    pub resources: Vec<Arc<XdsResource>>,
    pub removed: Vec<String>,
}

impl Delta {
    pub fn is_empty(&self) -> bool {
        self.resources.is_empty() && self.removed.is_empty()
    }
}

/// The subscription part of a request.
#[derive(Debug, Default, Clone, Copy)]
pub struct RequestNames<'a> {
    pub subscribe: &'a [String],
    pub unsubscribe: &'a [String],
    pub initial_versions: Option<&'a std::collections::HashMap<String, String>>,
}

impl Subscription {
    pub fn is_wildcard(&self) -> bool {
        self.wildcard
    }

    /// How many resources the subscriber holds.
    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    /// Applies a request's subscription fields. Returns what to examine when the request asks
    /// for an answer (the first one, or one that changes the subscription), `None` for a plain
    /// ACK or NACK. `aliases` maps aliases of the current resources to their names.
    pub fn on_request(
        &mut self,
        request: RequestNames<'_>,
        resources: &TypeResources,
        aliases: &HashMap<String, String>,
    ) -> Option<Examine> {
        let first = !self.started;
        let mut examine = Examine { all: first, ..Examine::default() };
        let mut changed = first;
        if first {
            self.started = true;
            // "A client that has never named a resource is a wildcard subscriber" (Envoy's
            // legacy wildcard); Istio's on-demand clients subscribe and unsubscribe `*` at once
            // to start with nothing.
            self.wildcard = request.subscribe.is_empty();
            if let Some(versions) = request.initial_versions {
                for (name, version) in versions {
                    self.held.insert(Held::reported(name, version));
                    if !self.wildcard && name != "*" {
                        self.explicit.insert(name.clone());
                    }
                }
            }
        }
        for name in request.subscribe {
            if name == "*" {
                changed |= !self.wildcard;
                examine.all |= !self.wildcard;
                self.wildcard = true;
                continue;
            }
            if !self.explicit.insert(name.clone()) && !first {
                continue;
            }
            changed = true;
            match resolve(name, resources, aliases) {
                Some(resolved) => {
                    examine.names.insert(resolved.to_owned());
                }
                None => examine.not_found.push(name.clone()),
            }
        }
        for name in request.unsubscribe {
            if name == "*" {
                changed |= self.wildcard;
                self.wildcard = false;
                continue;
            }
            if self.explicit.remove(name) {
                changed = true;
                // The subscriber drops what it unsubscribed from; a wildcard one keeps it.
                if !self.wildcard {
                    let resolved = resolve(name, resources, aliases).unwrap_or(name);
                    self.held.remove(resolved);
                }
            }
        }
        // Names held but no longer subscribed to would otherwise linger in `held`.
        if first && !self.wildcard {
            examine.all = true;
        }
        changed.then_some(examine)
    }

    /// Works out what the subscriber must be sent among `examine`d resources and records it as
    /// held. `visible` says what this subscriber may see; with `on_demand_overrides`, an explicit
    /// subscription gets a resource even if `visible` would not push it (Istio's on-demand
    /// address lookups).
    pub fn delta(
        &mut self,
        resources: &TypeResources,
        examine: &Examine,
        visible: &dyn Fn(&XdsResource) -> bool,
        on_demand_overrides: bool,
    ) -> Delta {
        let mut delta = Delta::default();
        let held_only: Vec<String> = if examine.all {
            self.held.iter().map(|h| &h.0.name).filter(|n| !resources.contains_key(*n)).cloned().collect()
        } else {
            Vec::new()
        };
        let mut decide = |name: &str, delta: &mut Delta| {
            let wanted = resources.get(name).filter(|r| {
                let asked = self.asked_for(r);
                (asked && on_demand_overrides) || ((self.wildcard || asked) && visible(r))
            });
            match wanted {
                Some(resource) => {
                    if !self.held.get(name).is_some_and(|held| held.is(resource)) {
                        self.held.replace(Held(resource.clone()));
                        delta.resources.push(resource.clone());
                    }
                }
                None => {
                    if self.held.remove(name) {
                        delta.removed.push(name.to_owned());
                    }
                }
            }
        };
        if examine.all {
            for name in resources.keys().map(String::as_str).chain(held_only.iter().map(String::as_str)) {
                decide(name, &mut delta);
            }
        }
        for name in &examine.names {
            if !examine.all || !resources.contains_key(name) {
                decide(name, &mut delta);
            }
        }
        for name in &examine.not_found {
            if !delta.removed.contains(name) && !delta.resources.iter().any(|r| &r.name == name) {
                delta.removed.push(name.clone());
            }
        }
        delta
    }

    fn asked_for(&self, resource: &XdsResource) -> bool {
        self.explicit.contains(&resource.name) || resource.aliases.iter().any(|a| self.explicit.contains(a))
    }
}

/// The resource a subscribed name stands for: itself, or the resource it is an alias of.
fn resolve<'a>(name: &'a str, resources: &'a TypeResources, aliases: &'a HashMap<String, String>) -> Option<&'a str> {
    if resources.contains_key(name) { Some(name) } else { aliases.get(name).map(String::as_str) }
}

/// Alias -> name for the resources of one type.
pub fn alias_index(resources: &TypeResources) -> HashMap<String, String> {
    resources.values().flat_map(|r| r.aliases.iter().map(|a| (a.clone(), r.name.clone()))).collect()
}

/// Names added, changed or removed between two versions of one type's resources.
pub fn changed_names(before: Option<&TypeResources>, after: Option<&TypeResources>) -> BTreeSet<String> {
    let empty = TypeResources::new();
    let (before, after) = (before.unwrap_or(&empty), after.unwrap_or(&empty));
    let mut changed: BTreeSet<String> = after
        .iter()
        .filter(|(name, r)| before.get(*name).is_none_or(|b| b.version != r.version))
        .map(|(n, _)| n.clone())
        .collect();
    changed.extend(before.keys().filter(|n| !after.contains_key(*n)).cloned());
    changed
}

#[cfg(test)]
mod tests {
    use strait_proto::prost_types::Any;

    use super::*;

    fn resource(name: &str, version: &str, aliases: &[&str]) -> Arc<XdsResource> {
        Arc::new(XdsResource {
            name: name.to_owned(),
            version: version.to_owned(),
            aliases: aliases.iter().map(|a| (*a).to_owned()).collect(),
            body: Any { type_url: "t".into(), value: version.as_bytes().to_vec() },
        })
    }

    fn resources(list: &[(&str, &str, &[&str])]) -> TypeResources {
        list.iter().map(|(n, v, a)| ((*n).to_owned(), resource(n, v, a))).collect()
    }

    fn names(delta: &Delta) -> (Vec<String>, Vec<String>) {
        let mut sent: Vec<String> = delta.resources.iter().map(|r| format!("{}@{}", r.name, r.version)).collect();
        sent.sort();
        let mut removed = delta.removed.clone();
        removed.sort();
        (sent, removed)
    }

    fn strings(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    const ALL: &dyn Fn(&XdsResource) -> bool = &|_| true;

    fn request<'a>(sub: &'a [String], unsub: &'a [String]) -> RequestNames<'a> {
        RequestNames { subscribe: sub, unsubscribe: unsub, initial_versions: None }
    }

    // A first request naming nothing subscribes to everything; later snapshots push only what
    // changed, and deletions as removed_resources.
    #[test]
    fn wildcard_gets_everything_then_only_changes() {
        let v1 = resources(&[("a", "1", &[]), ("b", "1", &[]), ("c", "1", &[])]);
        let mut sub = Subscription::default();
        let examine = sub.on_request(request(&[], &[]), &v1, &alias_index(&v1)).expect("first request answered");
        assert!(sub.is_wildcard());
        let delta = sub.delta(&v1, &examine, ALL, false);
        assert_eq!(names(&delta), (strings(&["a@1", "b@1", "c@1"]), vec![]));

        // An ACK asks for nothing.
        assert_eq!(sub.on_request(request(&[], &[]), &v1, &HashMap::new()), None);

        let v2 = resources(&[("a", "1", &[]), ("b", "2", &[]), ("d", "1", &[])]);
        let examine = Examine::names(changed_names(Some(&v1), Some(&v2)));
        assert_eq!(examine.names, ["b", "c", "d"].map(String::from).into());
        let delta = sub.delta(&v2, &examine, ALL, false);
        assert_eq!(names(&delta), (strings(&["b@2", "d@1"]), strings(&["c"])));
        // Examining everything again finds nothing to send: the bookkeeping matches.
        let again = sub.delta(&v2, &Examine { all: true, ..Examine::default() }, ALL, false);
        assert!(again.is_empty(), "{again:?}");
    }

    // Reconnecting with initial_resource_versions: unchanged resources are not resent, changed
    // ones are, and those the server no longer has are removed.
    #[test]
    fn initial_versions_spare_unchanged_resources() {
        let now = resources(&[("a", "1", &[]), ("b", "2", &[]), ("new", "1", &[])]);
        let held: std::collections::HashMap<String, String> =
            [("a", "1"), ("b", "1"), ("gone", "1")].iter().map(|(n, v)| ((*n).to_owned(), (*v).to_owned())).collect();
        let mut sub = Subscription::default();
        let req = RequestNames { subscribe: &[], unsubscribe: &[], initial_versions: Some(&held) };
        let examine = sub.on_request(req, &now, &HashMap::new()).expect("answered");
        let delta = sub.delta(&now, &examine, ALL, false);
        assert_eq!(names(&delta), (strings(&["b@2", "new@1"]), strings(&["gone"])));
        // A version the client cannot know (ztunnel sends ""): resent.
        let mut sub = Subscription::default();
        let blank: std::collections::HashMap<String, String> = [("a".to_owned(), String::new())].into();
        let req = RequestNames { subscribe: &[], unsubscribe: &[], initial_versions: Some(&blank) };
        let examine = sub.on_request(req, &now, &HashMap::new()).expect("answered");
        assert_eq!(names(&sub.delta(&now, &examine, ALL, false)).0, strings(&["a@1", "b@2", "new@1"]));
    }

    // Istio's on-demand mode: subscribe and unsubscribe `*` at once to hold nothing, then ask by
    // alias (`network/ip`); the answer carries the resource under its own name, later changes
    // follow it, names that match nothing are reported removed, unsubscribing drops it.
    #[test]
    fn on_demand_by_alias() {
        let v1 = resources(&[("pod-a", "1", &["/10.0.0.1"]), ("pod-b", "1", &["/10.0.0.2"])]);
        let aliases = alias_index(&v1);
        let mut sub = Subscription::default();
        let star = strings(&["*"]);
        let examine = sub.on_request(request(&star, &star), &v1, &aliases).expect("first request answered");
        assert!(!sub.is_wildcard());
        assert!(sub.delta(&v1, &examine, ALL, true).is_empty());

        let ask = strings(&["/10.0.0.2", "/10.9.9.9"]);
        let examine = sub.on_request(request(&ask, &[]), &v1, &aliases).expect("subscription change");
        let delta = sub.delta(&v1, &examine, &|_| false, true);
        assert_eq!(names(&delta), (strings(&["pod-b@1"]), strings(&["/10.9.9.9"])));

        let v2 = resources(&[("pod-a", "2", &["/10.0.0.1"]), ("pod-b", "2", &["/10.0.0.2"])]);
        let delta = sub.delta(&v2, &Examine::names(changed_names(Some(&v1), Some(&v2))), ALL, true);
        assert_eq!(names(&delta), (strings(&["pod-b@2"]), vec![]));

        let drop = strings(&["/10.0.0.2"]);
        sub.on_request(request(&[], &drop), &v2, &alias_index(&v2)).expect("subscription change");
        assert_eq!(sub.held_count(), 0);
        let v3 = resources(&[("pod-a", "3", &["/10.0.0.1"]), ("pod-b", "3", &["/10.0.0.2"])]);
        assert!(sub.delta(&v3, &Examine::names(changed_names(Some(&v2), Some(&v3))), ALL, true).is_empty());
    }

    // What a subscriber may not see is never sent, and is removed when it stops being visible.
    #[test]
    fn visibility_filters_and_removes() {
        let v1 = resources(&[("mine", "1", &[]), ("theirs", "1", &[])]);
        let only_mine = |r: &XdsResource| r.name == "mine";
        let mut sub = Subscription::default();
        let examine = sub.on_request(request(&[], &[]), &v1, &HashMap::new()).expect("answered");
        assert_eq!(names(&sub.delta(&v1, &examine, &only_mine, false)).0, strings(&["mine@1"]));
        let none = |_: &XdsResource| false;
        let delta = sub.delta(&v1, &Examine::names(["mine", "theirs"]), &none, false);
        assert_eq!(names(&delta), (vec![], strings(&["mine"])));
    }

    // Subscribing to the same name twice is not a change; explicit names plus a later `*`.
    #[test]
    fn subscription_changes_are_detected() {
        let v1 = resources(&[("a", "1", &[]), ("b", "1", &[])]);
        let mut sub = Subscription::default();
        let a = strings(&["a"]);
        let examine = sub.on_request(request(&a, &[]), &v1, &HashMap::new()).expect("first");
        assert_eq!(names(&sub.delta(&v1, &examine, ALL, false)).0, strings(&["a@1"]));
        assert_eq!(sub.on_request(request(&a, &[]), &v1, &HashMap::new()), None);
        let star = strings(&["*"]);
        let examine = sub.on_request(request(&star, &[]), &v1, &HashMap::new()).expect("now wildcard");
        assert_eq!(names(&sub.delta(&v1, &examine, ALL, false)).0, strings(&["b@1"]));
    }
}
