//! L4 AuthorizationPolicies and PeerAuthentications as `istio.security.Authorization`, the way
//! istiod converts them for ztunnel (`pilot/.../ambient/authorization.go`, `policies.go`), and
//! back into `authz::Policy`.
//!
//! A policy's rule is `from` AND `to` AND `when`; an Authorization group is a conjunction of
//! `Rules`, each a disjunction of `Match`es. So `to` becomes one `Rules`, `from` another, and
//! each `when` condition one more. What the node proxy cannot see (HTTP attributes) follows
//! AUTHZ-3: an ALLOW rule needing it is left out (it never matches at L4), a DENY rule loses the
//! condition (it matches more).
//!
//! PeerAuthentication becomes DENY policies on connections without a peer identity: istiod's
//! static `istio_converted_static_strict` for workloads whose mode is STRICT on every port, and
//! `converted_peer_authentication_<name>` for a workload policy whose ports differ from its
//! default. Coming back, a workload's mode per port is read off those policies by asking them
//! about plaintext connections, so any equivalent shape decodes to the same modes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
};

use strait_proto::istio::security::{
    self as api, Authorization, Group, Match, Rules, ServiceAccountMatch, string_match::MatchType,
};

use super::{CONVERTED_PEER_AUTHN_PREFIX, STATIC_STRICT_POLICY, address::authorization_served, resource, xds_origin};
use crate::{
    authz::{
        Action, Attribute, Connection, Layer, Policy, Predicate, Rule, Scope, StringMatch, Value,
        peer_authn::{self, MtlsMode, PeerAuthn, PeerAuthnScope},
    },
    config::Cidr,
    model::{Model, Workload},
    xds::{AUTHORIZATION_TYPE_URL, XdsResource},
};

/// Beyond this many alternatives a hand-written Authorization is refused rather than expanded.
const MAX_EXPANDED_RULES: usize = 256;

/// Every L4 policy of `model` and the converted PeerAuthentications, by xDS name.
pub(super) fn encode(model: &Model, peer_authn: PeerAuthnPlan) -> BTreeMap<String, Arc<XdsResource>> {
    let mut out = BTreeMap::new();
    for policy in &model.security.authorization_policies {
        if let Some(authorization) = to_authorization(policy) {
            out.extend([resource(policy.key(), Vec::new(), AUTHORIZATION_TYPE_URL, &authorization)]);
        }
    }
    let converted = peer_authn.static_strict.into_iter().chain(peer_authn.converted.into_values());
    for authorization in converted {
        let key = format!("{}/{}", authorization.namespace, authorization.name);
        out.extend([resource(key, Vec::new(), AUTHORIZATION_TYPE_URL, &authorization)]);
    }
    out
}

/// A policy the node proxy enforces, as istiod would serve it; `None` for policies bound to
/// waypoints (`targetRefs`) and AUDIT policies, which ztunnel never sees. CUSTOM has no
/// external authorizer in strait and fails closed: it is served as a DENY of its rules.
pub(super) fn to_authorization(policy: &Policy) -> Option<Authorization> {
    if !authorization_served(policy) {
        return None;
    }
    let scope = match &policy.scope {
        Scope::Mesh => api::Scope::Global,
        Scope::Namespace => api::Scope::Namespace,
        Scope::Selector { .. } => api::Scope::WorkloadSelector,
        Scope::TargetRefs(_) => return None,
    };
    let action = match policy.action {
        Action::Allow => api::Action::Allow,
        Action::Deny | Action::Custom | Action::Audit => api::Action::Deny,
    };
    let groups = policy.rules.iter().filter_map(|rule| group_of(action, rule)).collect();
    Some(Authorization {
        name: policy.name.clone(),
        namespace: policy.namespace.clone(),
        scope: scope as i32,
        action: action as i32,
        groups,
        dry_run: policy.dry_run,
    })
}

/// One rule as a group; `None` when it can never match at L4: an ALLOW rule with a condition
/// the node proxy cannot evaluate (HTTP attributes, or anything the workload API cannot say).
fn group_of(action: api::Action, rule: &Rule) -> Option<Group> {
    let all = || rule.from.iter().flatten().chain(rule.to.iter().flatten()).chain(&rule.when);
    if action == api::Action::Allow && (rule.needs_http() || !all().all(representable)) {
        return None;
    }
    let mut rules = Vec::new();
    rules.extend(clause(&rule.to));
    rules.extend(clause(&rule.from));
    for predicate in &rule.when {
        // A DENY condition the node proxy cannot see is dropped: the rule matches more.
        if let Some(m) = match_of(std::slice::from_ref(predicate)) {
            rules.push(Rules { matches: vec![m] });
        }
    }
    Some(Group { rules })
}

/// Whether the workload API can carry a condition: the L4 attributes ztunnel evaluates.
fn representable(p: &Predicate) -> bool {
    p.layer == Layer::L4
        && matches!(
            p.attribute,
            Attribute::SourcePrincipal
                | Attribute::SourceNamespace
                | Attribute::SourceServiceAccount
                | Attribute::SourceIp
                | Attribute::DestinationIp
                | Attribute::DestinationPort
        )
}

/// `from` or `to` alternatives as one `Rules`; `None` when any alternative matches everything
/// at L4 (no alternatives, or one whose conditions were all dropped from a DENY).
fn clause(alternatives: &[Vec<Predicate>]) -> Option<Rules> {
    let mut matches = Vec::with_capacity(alternatives.len());
    for alternative in alternatives {
        matches.push(match_of(alternative)?);
    }
    (!matches.is_empty()).then_some(Rules { matches })
}

/// The conjunction of the representable predicates of `all` as one Match (compile writes each
/// field of a source or operation once, so fields never merge); `None` when none is left.
fn match_of(all: &[Predicate]) -> Option<Match> {
    fn pick<'a, T>(positive: &'a mut Vec<T>, negative: &'a mut Vec<T>, negated: bool) -> &'a mut Vec<T> {
        if negated { negative } else { positive }
    }
    let mut m = Match::default();
    for p in all.iter().filter(|p| representable(p)) {
        let n = p.negated;
        for value in &p.values {
            match (&p.attribute, value) {
                (Attribute::SourcePrincipal, Value::Text(s)) => {
                    pick(&mut m.principals, &mut m.not_principals, n).push(string_match(s))
                }
                (Attribute::SourceNamespace, Value::Text(s)) => {
                    pick(&mut m.namespaces, &mut m.not_namespaces, n).push(string_match(s))
                }
                (Attribute::SourceServiceAccount, Value::ServiceAccount { namespace, name }) => {
                    let account = ServiceAccountMatch { namespace: namespace.clone(), service_account: name.clone() };
                    pick(&mut m.service_accounts, &mut m.not_service_accounts, n).push(account)
                }
                (Attribute::SourceIp, Value::Cidr(c)) => {
                    pick(&mut m.source_ips, &mut m.not_source_ips, n).push(address(c))
                }
                (Attribute::DestinationIp, Value::Cidr(c)) => {
                    pick(&mut m.destination_ips, &mut m.not_destination_ips, n).push(address(c))
                }
                (Attribute::DestinationPort, Value::Port(port)) => {
                    pick(&mut m.destination_ports, &mut m.not_destination_ports, n).push(u32::from(*port))
                }
                _ => {}
            }
        }
    }
    (m != Match::default()).then_some(m)
}

fn address(c: &Cidr) -> api::Address {
    api::Address { address: super::address::ip_bytes(c.addr()), length: c.prefix().into() }
}

fn string_match(s: &StringMatch) -> api::StringMatch {
    let kind = match s {
        StringMatch::Exact(v) => MatchType::Exact(v.clone()),
        StringMatch::Prefix(v) => MatchType::Prefix(v.clone()),
        StringMatch::Suffix(v) => MatchType::Suffix(v.clone()),
        StringMatch::Presence => MatchType::Presence(()),
    };
    api::StringMatch { match_type: Some(kind) }
}

/// The PeerAuthentication part of a snapshot: converted policies and which workloads list them.
#[derive(Debug, Default)]
pub(super) struct PeerAuthnPlan {
    /// istiod's static STRICT policy, served whenever any PeerAuthentication exists.
    pub static_strict: Option<Authorization>,
    /// Converted workload PeerAuthentications, by xDS name.
    pub converted: BTreeMap<String, Authorization>,
    /// The converted policies each workload lists, by (namespace, pod name).
    refs: HashMap<(String, String), Vec<String>>,
}

impl PeerAuthnPlan {
    pub fn refs_of(&self, w: &Workload) -> &[String] {
        self.refs.get(&(w.namespace.clone(), w.name.clone())).map_or(&[], Vec::as_slice)
    }
}

/// What each workload's PeerAuthentications amount to in ztunnel's terms: STRICT on every port
/// is the static policy; a default with port exceptions is the converted workload policy.
/// (istiod derives the same from the resources; computing it from the resolved modes keeps it
/// exactly what strait enforces, DISABLE being PERMISSIVE in ambient.)
pub(super) fn plan_peer_authn(model: &Model) -> PeerAuthnPlan {
    let root = &model.security.root_namespace;
    let mut plan = PeerAuthnPlan::default();
    if !model.security.peer_authentications.is_empty() {
        plan.static_strict = Some(Authorization {
            name: STATIC_STRICT_POLICY.to_owned(),
            namespace: root.clone(),
            scope: api::Scope::WorkloadSelector as i32,
            action: api::Action::Deny as i32,
            groups: vec![Group { rules: vec![Rules { matches: vec![plaintext()] }] }],
            dry_run: false,
        });
    }
    for w in &model.workloads {
        let chain = model.peer_authn_for(w);
        // Port 0 is never a port-level key, so this is the mode of every other port.
        let strict_default = peer_authn::resolve(chain, 0) == MtlsMode::Strict;
        let exceptions: Vec<u16> = chain
            .workload
            .iter()
            .flat_map(|pa| &pa.port_level)
            .filter(|(_, mode)| (**mode == MtlsMode::Strict) != strict_default)
            .map(|(port, _)| *port)
            .collect();
        let key = (w.namespace.clone(), w.name.clone());
        match (chain.workload, exceptions.is_empty()) {
            (Some(pa), false) => {
                let name = format!("{CONVERTED_PEER_AUTHN_PREFIX}{}", pa.name);
                let xds_name = format!("{}/{name}", pa.namespace);
                plan.converted
                    .entry(xds_name.clone())
                    .or_insert_with(|| converted(&name, &pa.namespace, strict_default, &exceptions));
                plan.refs.insert(key, vec![xds_name]);
            }
            _ if strict_default => {
                plan.refs.insert(key, vec![format!("{root}/{STATIC_STRICT_POLICY}")]);
            }
            _ => {}
        }
    }
    plan
}

/// A connection without a peer identity.
fn plaintext() -> Match {
    Match { not_principals: vec![api::StringMatch { match_type: Some(MatchType::Presence(())) }], ..Match::default() }
}

/// istiod's shape: a STRICT default with exempt ports is one group "plaintext AND not port A AND
/// not port B"; a permissive default with STRICT ports is one group per port "plaintext to P".
fn converted(name: &str, namespace: &str, strict_default: bool, ports: &[u16]) -> Authorization {
    let groups = if strict_default {
        let mut rules = vec![Rules { matches: vec![plaintext()] }];
        rules.extend(ports.iter().map(|p| Rules {
            matches: vec![Match { not_destination_ports: vec![u32::from(*p)], ..Match::default() }],
        }));
        vec![Group { rules }]
    } else {
        ports
            .iter()
            .map(|p| Group {
                rules: vec![Rules { matches: vec![Match { destination_ports: vec![u32::from(*p)], ..plaintext() }] }],
            })
            .collect()
    };
    Authorization {
        name: name.to_owned(),
        namespace: namespace.to_owned(),
        scope: api::Scope::WorkloadSelector as i32,
        action: api::Action::Deny as i32,
        groups,
        dry_run: false,
    }
}

/// An Authorization as a policy the node proxy evaluates. Selector-scoped policies carry no
/// labels: the control plane binds them through the workloads' `authorization_policies`.
pub(super) fn from_authorization(a: &Authorization, root_namespace: &str) -> Result<Policy, String> {
    if a.name.is_empty() || a.namespace.is_empty() {
        return Err("field `name`/`namespace`: must both be set".to_owned());
    }
    let action = match api::Action::try_from(a.action) {
        Ok(api::Action::Allow) => Action::Allow,
        Ok(api::Action::Deny) => Action::Deny,
        Err(_) => return Err(format!("field `action`: unknown value {}", a.action)),
    };
    let scope = match api::Scope::try_from(a.scope) {
        Ok(api::Scope::Global) => Scope::Mesh,
        Ok(api::Scope::Namespace) => Scope::Namespace,
        Ok(api::Scope::WorkloadSelector) => {
            Scope::Selector { labels: BTreeMap::new(), all_namespaces: a.namespace == root_namespace }
        }
        Err(_) => return Err(format!("field `scope`: unknown value {}", a.scope)),
    };
    let mut rules = Vec::new();
    for (i, group) in a.groups.iter().enumerate() {
        rules.extend(rules_of(group, &format!("groups[{i}]"))?);
        if rules.len() > MAX_EXPANDED_RULES {
            return Err(format!("field `groups`: more than {MAX_EXPANDED_RULES} alternatives once expanded"));
        }
    }
    Ok(Policy {
        name: a.name.clone(),
        namespace: a.namespace.clone(),
        action,
        scope,
        rules,
        dry_run: a.dry_run,
        origin: xds_origin("Authorization", &format!("{}/{}", a.namespace, a.name)),
    })
}

/// A group as rules: the first source-like `Rules` becomes `from`, the first destination-only
/// one `to`, single matches join `when`, and any further disjunction is expanded into several
/// rules (a policy matches when any rule does). Empty matches never match (ztunnel skips them);
/// an empty `Rules` matches everything.
fn rules_of(group: &Group, at: &str) -> Result<Vec<Rule>, String> {
    let mut rule = Rule::default();
    let (mut from_set, mut to_set) = (false, false);
    let mut extra: Vec<Vec<Vec<Predicate>>> = Vec::new();
    for (r, rules) in group.rules.iter().enumerate() {
        if rules.matches.is_empty() {
            continue;
        }
        let mut alternatives = Vec::new();
        for (m, one) in rules.matches.iter().enumerate() {
            let predicates = predicates_of(one, &format!("{at}.rules[{r}].matches[{m}]"))?;
            if !predicates.is_empty() {
                alternatives.push(predicates);
            }
        }
        if alternatives.is_empty() {
            return Ok(Vec::new());
        }
        let destination_only = alternatives
            .iter()
            .flatten()
            .all(|p| matches!(p.attribute, Attribute::DestinationIp | Attribute::DestinationPort));
        if destination_only && !to_set {
            (rule.to, to_set) = (alternatives, true);
        } else if !destination_only && !from_set {
            (rule.from, from_set) = (alternatives, true);
        } else if let [only] = alternatives.as_slice() {
            rule.when.extend(only.iter().cloned());
        } else {
            extra.push(alternatives);
        }
    }
    let mut expanded = vec![rule];
    for alternatives in extra {
        if expanded.len() * alternatives.len() > MAX_EXPANDED_RULES {
            return Err(format!("field `{at}`: more than {MAX_EXPANDED_RULES} alternatives once expanded"));
        }
        expanded = expanded
            .iter()
            .flat_map(|base| {
                alternatives.iter().map(move |alt| {
                    let mut r = base.clone();
                    r.when.extend(alt.iter().cloned());
                    r
                })
            })
            .collect();
    }
    Ok(expanded)
}

/// A Match as the conjunction of one predicate per field it sets.
fn predicates_of(m: &Match, at: &str) -> Result<Vec<Predicate>, String> {
    let mut out = Vec::new();
    let mut add = |name: &str, attribute: Attribute, negated: bool, values: Vec<Value>| {
        if !values.is_empty() {
            let field = format!("{at}.{name}");
            out.push(Predicate { field, attribute, values, negated, layer: Layer::L4 });
        }
    };
    let texts = |list: &[api::StringMatch]| list.iter().filter_map(text).collect::<Vec<_>>();
    add("principals", Attribute::SourcePrincipal, false, texts(&m.principals));
    add("not_principals", Attribute::SourcePrincipal, true, texts(&m.not_principals));
    add("namespaces", Attribute::SourceNamespace, false, texts(&m.namespaces));
    add("not_namespaces", Attribute::SourceNamespace, true, texts(&m.not_namespaces));
    add("service_accounts", Attribute::SourceServiceAccount, false, accounts(&m.service_accounts));
    add("not_service_accounts", Attribute::SourceServiceAccount, true, accounts(&m.not_service_accounts));
    add("source_ips", Attribute::SourceIp, false, cidrs(&m.source_ips, &format!("{at}.source_ips"))?);
    add("not_source_ips", Attribute::SourceIp, true, cidrs(&m.not_source_ips, &format!("{at}.not_source_ips"))?);
    add(
        "destination_ips",
        Attribute::DestinationIp,
        false,
        cidrs(&m.destination_ips, &format!("{at}.destination_ips"))?,
    );
    let not_ips = cidrs(&m.not_destination_ips, &format!("{at}.not_destination_ips"))?;
    add("not_destination_ips", Attribute::DestinationIp, true, not_ips);
    add(
        "destination_ports",
        Attribute::DestinationPort,
        false,
        ports(&m.destination_ports, &format!("{at}.destination_ports"))?,
    );
    let not_ports = ports(&m.not_destination_ports, &format!("{at}.not_destination_ports"))?;
    add("not_destination_ports", Attribute::DestinationPort, true, not_ports);
    Ok(out)
}

/// A string match; one without a kind is skipped, as ztunnel does.
fn text(m: &api::StringMatch) -> Option<Value> {
    let kind = match m.match_type.as_ref()? {
        MatchType::Exact(v) => StringMatch::Exact(v.clone()),
        MatchType::Prefix(v) => StringMatch::Prefix(v.clone()),
        MatchType::Suffix(v) => StringMatch::Suffix(v.clone()),
        MatchType::Presence(()) => StringMatch::Presence,
    };
    Some(Value::Text(kind))
}

fn accounts(list: &[ServiceAccountMatch]) -> Vec<Value> {
    list.iter()
        .map(|a| Value::ServiceAccount { namespace: a.namespace.clone(), name: a.service_account.clone() })
        .collect()
}

fn cidrs(list: &[api::Address], at: &str) -> Result<Vec<Value>, String> {
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            let ip = ip_of(&a.address).ok_or_else(|| {
                format!("field `{at}[{i}].address`: {} bytes is not an IPv4 or IPv6 address", a.address.len())
            })?;
            let prefix = u8::try_from(a.length).ok().and_then(|len| Cidr::new(ip, len));
            prefix
                .map(Value::Cidr)
                .ok_or_else(|| format!("field `{at}[{i}].length`: {} is too long for {ip}", a.length))
        })
        .collect()
}

fn ports(list: &[u32], at: &str) -> Result<Vec<Value>, String> {
    list.iter()
        .enumerate()
        .map(|(i, p)| match u16::try_from(*p) {
            Ok(port) if port > 0 => Ok(Value::Port(port)),
            _ => Err(format!("field `{at}[{i}]`: {p} is not a port number")),
        })
        .collect()
}

/// Raw address bytes as an address: 4 for IPv4, 16 for IPv6.
pub(super) fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(|b| IpAddr::V4(Ipv4Addr::from(b))),
        16 => <[u8; 16]>::try_from(bytes).ok().map(|b| IpAddr::V6(Ipv6Addr::from(b))),
        _ => None,
    }
}

/// A workload's mTLS modes read off the converted PeerAuthentication policies that apply to
/// it, as one workload-level PeerAuthentication: the mode of a port is STRICT when they deny a
/// plaintext connection to it. `None` when nothing is STRICT.
pub(super) fn peer_authn_of(workload: &Workload, policies: &[Arc<Policy>]) -> Option<PeerAuthn> {
    if policies.is_empty() {
        return None;
    }
    let mentioned: BTreeSet<u16> = policies
        .iter()
        .flat_map(|p| &p.rules)
        .flat_map(|r| r.from.iter().flatten().chain(r.to.iter().flatten()).chain(&r.when))
        .filter(|p| p.attribute == Attribute::DestinationPort)
        .flat_map(|p| &p.values)
        .filter_map(|v| match v {
            Value::Port(port) => Some(*port),
            _ => None,
        })
        .collect();
    let strict = |port: u16| {
        let connection = Connection {
            source: None,
            source_ip: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            destination_ip: workload.ip,
            destination_port: port,
            http: None,
        };
        policies.iter().any(|p| p.action == Action::Deny && !p.dry_run && p.matches(&connection))
    };
    // Port 0 carries no traffic, so no policy names it: it stands for every port not mentioned.
    let mode_of = |port| if strict(port) { MtlsMode::Strict } else { MtlsMode::Permissive };
    let default = mode_of(0);
    let port_level: BTreeMap<u16, MtlsMode> =
        mentioned.into_iter().map(|port| (port, mode_of(port))).filter(|(_, mode)| *mode != default).collect();
    if default == MtlsMode::Permissive && port_level.is_empty() {
        return None;
    }
    let names: Vec<String> = policies.iter().map(|p| p.key()).collect();
    Some(PeerAuthn {
        name: names.join(","),
        namespace: workload.namespace.clone(),
        scope: PeerAuthnScope::Selector(BTreeMap::new()),
        mode: Some(default),
        port_level,
        origin: xds_origin("Authorization", &names.join(",")),
    })
}
