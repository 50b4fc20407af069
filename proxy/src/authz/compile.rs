//! AuthorizationPolicy resource → `Policy`, with Istio's validation rules (its admission webhook
//! rejects the same things) and warnings where strait accepts a policy it cannot enforce.

use crate::config::{
    AuthorizationAction, AuthorizationPolicy, Cidr, Condition, Diagnostic, Operation, Origin, Source, parse_port,
};

use super::{
    DRY_RUN_ANNOTATION,
    policy::{Action, Attribute, Layer, Policy, Predicate, Rule, Scope, StringMatch, Value},
};

/// Compiles one policy. Problems go to `diagnostics`; `None` when any of them is an error.
pub fn compile_policy(
    origin: &Origin,
    policy: &AuthorizationPolicy,
    root_namespace: &str,
    diagnostics: &mut Vec<Diagnostic>,
) -> Option<Policy> {
    let mut cx = Context { origin, policy, diagnostics, errors: 0, http: Vec::new() };
    let spec = &policy.spec;
    let namespace = policy.metadata.namespace_or_default().to_owned();

    let action = match spec.action {
        AuthorizationAction::Allow => Action::Allow,
        AuthorizationAction::Deny => Action::Deny,
        AuthorizationAction::Audit => Action::Audit,
        AuthorizationAction::Custom => Action::Custom,
    };
    check_action(&mut cx, action);

    let scope = scope(&mut cx, &namespace, root_namespace);
    let dry_run = match policy.metadata.annotations.get(DRY_RUN_ANNOTATION).map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            cx.error(
                &format!("metadata.annotations.{DRY_RUN_ANNOTATION}"),
                format!("`{other}` is not a boolean; write \"true\" or \"false\""),
            );
            false
        }
    };
    let rules: Vec<Rule> =
        spec.rules.iter().enumerate().map(|(i, r)| compile_rule(&mut cx, &namespace, i, r)).collect();
    if !matches!(scope, Scope::TargetRefs(_)) {
        warn_http_at_node(&mut cx, action, &rules);
    }
    (cx.errors == 0).then(|| Policy {
        name: policy.metadata.name.clone(),
        namespace,
        action,
        scope,
        rules,
        dry_run,
        origin: origin.clone(),
    })
}

struct Context<'a> {
    origin: &'a Origin,
    policy: &'a AuthorizationPolicy,
    diagnostics: &'a mut Vec<Diagnostic>,
    errors: usize,
    /// The HTTP attributes the rules use, as `(field, name)`, in the order written.
    http: Vec<(String, String)>,
}

impl Context<'_> {
    fn error(&mut self, field: &str, message: impl Into<String>) {
        self.errors += 1;
        self.diagnostics.push(Diagnostic::error(self.origin.clone(), Some(field), message));
    }

    fn warning(&mut self, field: &str, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic::warning(self.origin.clone(), Some(field), message));
    }
}

fn check_action(cx: &mut Context, action: Action) {
    let spec = &cx.policy.spec;
    let provider = spec.provider.as_ref().map(|p| p.name.as_str());
    let never = "without `rules` is meaningless as it never matches; add an empty rule `{}` to match everything";
    match action {
        Action::Deny if spec.rules.is_empty() => cx.error("spec.rules", format!("a DENY policy {never}")),
        Action::Custom if spec.rules.is_empty() => cx.error("spec.rules", format!("a CUSTOM policy {never}")),
        Action::Custom if provider.is_none_or(str::is_empty) => {
            cx.error("spec.provider.name", "a CUSTOM policy needs the name of its external authorizer")
        }
        Action::Custom => cx.warning(
            "spec.action",
            format!(
                "CUSTOM (external authorization by `{}`) is not supported by strait: the traffic its rules match \
                 is denied (fail closed)",
                provider.unwrap_or_default()
            ),
        ),
        Action::Audit => cx.warning("spec.action", "AUDIT policies are accepted but strait has no audit sink; ignored"),
        _ => {}
    }
    if provider.is_some() && action != Action::Custom {
        cx.error("spec.provider", "`provider` is only for CUSTOM policies");
    }
}

fn scope(cx: &mut Context, namespace: &str, root_namespace: &str) -> Scope {
    let spec = &cx.policy.spec;
    let labels = spec.selector.as_ref().map(|s| s.match_labels.clone()).unwrap_or_default();
    for (k, v) in &labels {
        if k.is_empty() || k.contains('*') || v.contains('*') {
            cx.error(
                "spec.selector.matchLabels",
                format!("`{k}: {v}`: label selectors take no empty keys and no wildcards"),
            );
        }
    }
    let mut target_refs = spec.target_refs.clone();
    if let Some(target) = &spec.target_ref {
        if !target_refs.is_empty() {
            cx.error("spec.targetRef", "set `targetRef` or `targetRefs`, not both");
        }
        target_refs.push(target.clone());
    }
    if !target_refs.is_empty() {
        if spec.selector.is_some() {
            cx.error("spec.selector", "set `selector` or `targetRefs`, not both");
        }
        return Scope::TargetRefs(target_refs);
    }
    match (labels.is_empty(), namespace == root_namespace) {
        (true, true) => Scope::Mesh,
        (true, false) => Scope::Namespace,
        (false, all_namespaces) => Scope::Selector { labels, all_namespaces },
    }
}

fn compile_rule(cx: &mut Context, namespace: &str, index: usize, rule: &crate::config::Rule) -> Rule {
    let at = format!("spec.rules[{index}]");
    let mut compiled = Rule::default();
    if let Some(from) = &rule.from {
        if from.is_empty() {
            cx.error(&format!("{at}.from"), "must not be empty; leave `from` out to match any source");
        }
        for (i, entry) in from.iter().enumerate() {
            let field = format!("{at}.from[{i}].source");
            match &entry.source {
                None => cx.error(&field, "missing; each `from` entry needs a `source`"),
                Some(source) => compiled.from.push(compile_source(cx, namespace, &field, source)),
            }
        }
    }
    if let Some(to) = &rule.to {
        if to.is_empty() {
            cx.error(&format!("{at}.to"), "must not be empty; leave `to` out to match any operation");
        }
        for (i, entry) in to.iter().enumerate() {
            let field = format!("{at}.to[{i}].operation");
            match &entry.operation {
                None => cx.error(&field, "missing; each `to` entry needs an `operation`"),
                Some(op) => compiled.to.push(compile_operation(cx, &field, op)),
            }
        }
    }
    for alternative in compiled.from.iter().chain(&compiled.to) {
        for p in alternative.iter().filter(|p| p.layer == Layer::L7) {
            let name = p.field.rsplit('.').next().unwrap_or(&p.field).to_owned();
            cx.http.push((p.field.clone(), name));
        }
    }
    for (i, condition) in rule.when.iter().enumerate() {
        let field = format!("{at}.when[{i}]");
        let predicates = compile_condition(cx, namespace, &field, condition);
        if predicates.iter().any(|p| p.layer == Layer::L7) {
            cx.http.push((format!("{field}.key"), condition.key.clone()));
        }
        compiled.when.extend(predicates);
    }
    compiled
}

/// A policy the node proxy enforces (bound by namespace or selector, not to a waypoint) whose
/// rules use HTTP attributes: Istio ambient warns that its node proxy cannot see them (AUTHZ-3),
/// and says which way that errs. strait says it in its own words, with what its own evaluation
/// does.
fn warn_http_at_node(cx: &mut Context, action: Action, rules: &[Rule]) {
    let Some((field, _)) = cx.http.first().cloned() else { return };
    let mut names: Vec<&str> = Vec::new();
    for (_, name) in &cx.http {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    let effect = match action {
        Action::Allow => {
            "In this ALLOW policy the rules using them never match at the node proxy: it allows less than \
             written"
                .to_owned()
        }
        Action::Deny | Action::Custom => {
            let broad: Vec<String> =
                rules.iter().enumerate().filter(|(_, r)| r.only_http()).map(|(i, _)| format!("rules[{i}]")).collect();
            let mut effect = "Its rules are enforced at the node proxy without those conditions: it denies more \
                              than written"
                .to_owned();
            match broad.as_slice() {
                [] => {}
                [one] => effect.push_str(&format!(" ({one} has no other condition, so it denies every connection)")),
                many => effect.push_str(&format!(
                    " ({} have no other condition, so they deny every connection)",
                    many.join(", ")
                )),
            }
            effect
        }
        Action::Audit => return,
    };
    let message = format!(
        "the node proxy does not parse HTTP, so it cannot check {}; to enforce them, bind the policy to a \
         waypoint with `targetRefs` (a Service, or the waypoint's Gateway). {effect}",
        names.join(", ")
    );
    cx.warning(&field, message);
}

/// Collects one clause's predicates, skipping empty fields.
struct Clause<'a> {
    at: &'a str,
    predicates: Vec<Predicate>,
}

impl Clause<'_> {
    fn add(&mut self, name: &str, attribute: Attribute, layer: Layer, negated: bool, values: Vec<Value>) {
        if values.is_empty() {
            return;
        }
        let field = format!("{}.{name}", self.at);
        self.predicates.push(Predicate { field, attribute, values, negated, layer });
    }
}

fn compile_source(cx: &mut Context, namespace: &str, at: &str, s: &Source) -> Vec<Predicate> {
    // Bad values already explain themselves; "empty" would only add noise.
    let errors_before = cx.errors;
    let mut c = Clause { at, predicates: Vec::new() };
    let text = |cx: &mut Context, name: &str, values: &[String]| texts(cx, &format!("{at}.{name}"), values);
    let accounts = |cx: &mut Context, name: &str, values: &[String]| {
        let mut out = Vec::new();
        for (i, v) in values.iter().enumerate() {
            let field = format!("{at}.{name}[{i}]");
            if v.is_empty() {
                cx.error(&field, "empty values are not allowed");
            } else {
                out.extend(service_account(cx, &field, namespace, Value::Text(StringMatch::parse(v))));
            }
        }
        out
    };
    use Attribute as A;
    use Layer::{L4, L7};
    c.add("principals", A::SourcePrincipal, L4, false, text(cx, "principals", &s.principals));
    c.add("notPrincipals", A::SourcePrincipal, L4, true, text(cx, "notPrincipals", &s.not_principals));
    c.add("requestPrincipals", A::RequestPrincipal, L7, false, text(cx, "requestPrincipals", &s.request_principals));
    let not_request = text(cx, "notRequestPrincipals", &s.not_request_principals);
    c.add("notRequestPrincipals", A::RequestPrincipal, L7, true, not_request);
    c.add("namespaces", A::SourceNamespace, L4, false, text(cx, "namespaces", &s.namespaces));
    c.add("notNamespaces", A::SourceNamespace, L4, true, text(cx, "notNamespaces", &s.not_namespaces));
    c.add("trustDomains", A::SourceTrustDomain, L4, false, text(cx, "trustDomains", &s.trust_domains));
    let not_domains = text(cx, "notTrustDomains", &s.not_trust_domains);
    c.add("notTrustDomains", A::SourceTrustDomain, L4, true, not_domains);
    c.add("serviceAccounts", A::SourceServiceAccount, L4, false, accounts(cx, "serviceAccounts", &s.service_accounts));
    let not_accounts = accounts(cx, "notServiceAccounts", &s.not_service_accounts);
    c.add("notServiceAccounts", A::SourceServiceAccount, L4, true, not_accounts);
    c.add("ipBlocks", A::SourceIp, L4, false, cidrs(&s.ip_blocks));
    c.add("notIpBlocks", A::SourceIp, L4, true, cidrs(&s.not_ip_blocks));
    c.add("remoteIpBlocks", A::RemoteIp, L7, false, cidrs(&s.remote_ip_blocks));
    c.add("notRemoteIpBlocks", A::RemoteIp, L7, true, cidrs(&s.not_remote_ip_blocks));
    if c.predicates.is_empty() && cx.errors == errors_before {
        cx.error(at, "must not be empty; leave the `from` entry out to match any source");
    }
    c.predicates
}

fn compile_operation(cx: &mut Context, at: &str, op: &Operation) -> Vec<Predicate> {
    let mut c = Clause { at, predicates: Vec::new() };
    let text = |cx: &mut Context, name: &str, values: &[String]| texts(cx, &format!("{at}.{name}"), values);
    let hosts = |cx: &mut Context, name: &str, values: &[String]| {
        let values = text(cx, name, values);
        values.into_iter().map(|v| match v {
            Value::Text(m) => Value::Text(m.lowercase()),
            other => other,
        })
    };
    use Attribute as A;
    use Layer::{L4, L7};
    c.add("hosts", A::Host, L7, false, hosts(cx, "hosts", &op.hosts).collect());
    c.add("notHosts", A::Host, L7, true, hosts(cx, "notHosts", &op.not_hosts).collect());
    c.add("ports", A::DestinationPort, L4, false, op.ports.iter().map(|p| Value::Port(*p)).collect());
    c.add("notPorts", A::DestinationPort, L4, true, op.not_ports.iter().map(|p| Value::Port(*p)).collect());
    c.add("methods", A::Method, L7, false, text(cx, "methods", &op.methods));
    c.add("notMethods", A::Method, L7, true, text(cx, "notMethods", &op.not_methods));
    c.add("paths", A::Path, L7, false, text(cx, "paths", &op.paths));
    c.add("notPaths", A::Path, L7, true, text(cx, "notPaths", &op.not_paths));
    if c.predicates.is_empty() {
        cx.error(at, "must not be empty; leave the `to` entry out to match any operation");
    }
    c.predicates
}

/// The attribute a `when` key names, how values of it parse, and who can evaluate it. The L4
/// set is Istio ambient's: what ztunnel evaluates (AUTHZ-2).
fn when_attribute(key: &str) -> Result<(Attribute, Kind, Layer), String> {
    use Attribute as A;
    use Layer::{L4, L7};
    let bracketed = |prefix: &str| key.strip_prefix(prefix).filter(|rest| rest.starts_with('[') && rest.ends_with(']'));
    Ok(match key {
        "source.ip" => (A::SourceIp, Kind::Cidr, L4),
        "source.namespace" => (A::SourceNamespace, Kind::Text, L4),
        "source.principal" => (A::SourcePrincipal, Kind::Text, L4),
        "source.trustDomain" => (A::SourceTrustDomain, Kind::Text, L4),
        "destination.ip" => (A::DestinationIp, Kind::Cidr, L4),
        "destination.port" => (A::DestinationPort, Kind::Port, L4),
        "source.serviceAccount" => (A::SourceServiceAccount, Kind::ServiceAccount, L7),
        "remote.ip" => (A::RemoteIp, Kind::Cidr, L7),
        "request.auth.principal" => (A::RequestPrincipal, Kind::Text, L7),
        "request.auth.audiences" => (A::RequestAudience, Kind::Text, L7),
        "request.auth.presenter" => (A::RequestPresenter, Kind::Text, L7),
        "connection.sni" => (A::Sni, Kind::Text, L7),
        "destination.namespace" | "destination.name" | "destination.user" => {
            return Err(format!(
                "`{key}` is not supported; the policy's namespace and selector choose the destination"
            ));
        }
        _ if key.starts_with("destination.labels") => {
            return Err(format!("`{key}` is not supported; use `spec.selector` to choose the destination"));
        }
        _ => {
            if let Some(name) = bracketed("request.headers") {
                let name = name[1..name.len() - 1].to_ascii_lowercase();
                (A::RequestHeader(name), Kind::Text, L7)
            } else if let Some(path) = bracketed("request.auth.claims") {
                let path = path[1..path.len() - 1].split("][").collect::<Vec<_>>().join(".");
                (A::RequestClaim(path), Kind::Text, L7)
            } else if key.starts_with("experimental.") {
                (A::Unsupported(key.to_owned()), Kind::Text, Layer::Unsupported)
            } else {
                return Err(format!("unknown attribute `{key}`"));
            }
        }
    })
}

/// How the values of a `when` key parse.
#[derive(Clone, Copy)]
enum Kind {
    Text,
    Cidr,
    Port,
    ServiceAccount,
}

fn compile_condition(cx: &mut Context, namespace: &str, at: &str, condition: &Condition) -> Vec<Predicate> {
    let key_field = format!("{at}.key");
    if condition.key.is_empty() {
        cx.error(&key_field, "must not be empty");
        return Vec::new();
    }
    let (attribute, kind, layer) = match when_attribute(&condition.key) {
        Ok(found) => found,
        Err(message) => {
            cx.error(&key_field, message);
            return Vec::new();
        }
    };
    if layer == Layer::Unsupported {
        cx.warning(
            &key_field,
            format!(
                "`{}` is not evaluated by strait: ALLOW rules using it never match, DENY rules ignore it",
                condition.key
            ),
        );
    }
    if condition.values.is_empty() && condition.not_values.is_empty() {
        cx.error(at, format!("set `values` or `notValues` for key `{}`", condition.key));
    }
    let mut c = Clause { at, predicates: Vec::new() };
    for (name, list, negated) in [("values", &condition.values, false), ("notValues", &condition.not_values, true)] {
        let field = format!("{at}.{name}");
        let mut values = Vec::new();
        for (i, text) in list.iter().enumerate() {
            let field = format!("{field}[{i}]");
            let parsed = match kind {
                _ if text.is_empty() => Err("empty values are not allowed".to_owned()),
                Kind::Text => Ok(Some(Value::Text(StringMatch::parse(text)))),
                Kind::Cidr => text.parse::<Cidr>().map(|c| Some(Value::Cidr(c))),
                Kind::Port => parse_port(text).map(|p| Some(Value::Port(p))),
                Kind::ServiceAccount => {
                    Ok(service_account(cx, &field, namespace, Value::Text(StringMatch::parse(text))))
                }
            };
            match parsed {
                Ok(value) => values.extend(value),
                Err(message) => cx.error(&field, message),
            }
        }
        c.add(name, attribute.clone(), layer, negated, values);
    }
    c.predicates
}

/// String values with Istio's `*` forms; empty strings are rejected.
fn texts(cx: &mut Context, field: &str, values: &[String]) -> Vec<Value> {
    let mut out = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        if v.is_empty() {
            cx.error(&format!("{field}[{i}]"), "empty values are not allowed");
        } else {
            out.push(Value::Text(StringMatch::parse(v)));
        }
    }
    out
}

fn cidrs(blocks: &[Cidr]) -> Vec<Value> {
    blocks.iter().map(|c| Value::Cidr(*c)).collect()
}

/// `namespace/name`, or `name` in the policy's namespace; no wildcards (matched exactly).
fn service_account(cx: &mut Context, field: &str, namespace: &str, value: Value) -> Option<Value> {
    let Value::Text(StringMatch::Exact(text)) = value else {
        cx.error(field, "service accounts are matched exactly; wildcards are not allowed");
        return None;
    };
    let (ns, name) = text.split_once('/').unwrap_or((namespace, &text));
    if ns.is_empty() || name.is_empty() || name.contains('/') {
        cx.error(field, format!("`{text}` is not a service account (`name` or `namespace/name`)"));
        return None;
    }
    Some(Value::ServiceAccount { namespace: ns.to_owned(), name: name.to_owned() })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Resource, Severity, parse_file};

    /// Parse diagnostics if any, else compile diagnostics (at their field's line, as `strait ctl
    /// validate` and the node report them), of a policy in `default` whose spec starts on line 7.
    fn diagnostics(annotations: &str, spec: &str) -> Vec<Diagnostic> {
        let yaml = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: p\n  namespace: default{annotations}\nspec:\n  {spec}\n"
        );
        let (resources, d) = parse_file(Path::new("p.yaml"), &yaml);
        if !d.is_empty() {
            return d;
        }
        let Resource::AuthorizationPolicy(policy) = &resources[0].resource else { panic!("not a policy: {yaml}") };
        let mut d = Vec::new();
        let compiled = compile_policy(&resources[0].origin, policy, "istio-system", &mut d);
        assert_eq!(compiled.is_none(), d.iter().any(Diagnostic::is_error), "{d:?}");
        crate::config::locate(&mut d, Path::new("p.yaml"), &yaml);
        d
    }

    #[test]
    fn invalid_policies_name_line_and_field() {
        use Severity::{Error, Warning};
        let when = |key: &str, values: &str| format!("rules:\n  - when:\n    - key: {key}\n      {values}");
        let cases: Vec<(String, Severity, usize, &str, &str)> = vec![
            ("action: DENIED".into(), Error, 7, "spec.action", "unknown variant `DENIED`"),
            (
                "rules:\n  - from:\n    - source:\n        ipBlocks:\n        - 10.0.0.0/8\n        - 300.1.1.1".into(),
                Error,
                12,
                "spec.rules[0].from[0].source.ipBlocks[1]",
                "`300.1.1.1` is not an IP address",
            ),
            (
                "rules:\n  - to:\n    - operation:\n        notPorts: [80, \"0\"]".into(),
                Error,
                10,
                "spec.rules[0].to[0].operation.notPorts[1]",
                "not a port",
            ),
            (
                "rules:\n  - from:\n    - source:\n        principal: [a]".into(),
                Error,
                10,
                "spec.rules[0].from[0].source",
                "unknown field `principal`",
            ),
            (
                when("source.ip", "values: [\"10.0.0.0/8\", \"x\"]"),
                Error,
                10,
                "spec.rules[0].when[0].values[1]",
                "not an IP",
            ),
            (
                when("destination.port", "notValues: [\"99999\"]"),
                Error,
                10,
                "spec.rules[0].when[0].notValues[0]",
                "not a port",
            ),
            (when("request.weird", "values: [a]"), Error, 9, "spec.rules[0].when[0].key", "unknown attribute"),
            (when("destination.namespace", "values: [a]"), Error, 9, "spec.rules[0].when[0].key", "not supported"),
            (when("source.ip", "values: []"), Error, 9, "spec.rules[0].when[0]", "set `values` or `notValues`"),
            (
                when("experimental.envoy.filters.a[b]", "values: [a]"),
                Warning,
                9,
                "spec.rules[0].when[0].key",
                "not evaluated",
            ),
            ("action: DENY".into(), Error, 6, "spec.rules", "never matches"),
            ("rules:\n  - from: []".into(), Error, 8, "spec.rules[0].from", "must not be empty"),
            ("rules:\n  - from:\n    - {}".into(), Error, 9, "spec.rules[0].from[0].source", "missing"),
            (
                "rules:\n  - from:\n    - source: {}".into(),
                Error,
                9,
                "spec.rules[0].from[0].source",
                "must not be empty",
            ),
            (
                "rules:\n  - to:\n    - operation: {}".into(),
                Error,
                9,
                "spec.rules[0].to[0].operation",
                "must not be empty",
            ),
            (
                "rules:\n  - from:\n    - source: {principals: [\"\"]}".into(),
                Error,
                9,
                "spec.rules[0].from[0].source.principals[0]",
                "empty",
            ),
            (
                "rules:\n  - from:\n    - source: {serviceAccounts: [\"a/b/c\"]}".into(),
                Error,
                9,
                "spec.rules[0].from[0].source.serviceAccounts[0]",
                "not a service account",
            ),
            ("selector:\n    matchLabels: {app: \"web*\"}".into(), Error, 8, "spec.selector.matchLabels", "wildcards"),
            (
                "selector: {matchLabels: {app: web}}\n  targetRefs: [{kind: Service, name: web}]".into(),
                Error,
                7,
                "spec.selector",
                "not both",
            ),
            ("action: CUSTOM\n  rules: [{}]".into(), Error, 6, "spec.provider.name", "external authorizer"),
            (
                "action: CUSTOM\n  provider: {name: ext}\n  rules: [{}]".into(),
                Warning,
                7,
                "spec.action",
                "denied (fail closed)",
            ),
            ("action: AUDIT\n  rules: [{}]".into(), Warning, 7, "spec.action", "no audit sink"),
            ("provider: {name: ext}".into(), Error, 7, "spec.provider", "only for CUSTOM"),
            (
                "rules:\n  - from:\n    - source: {trustDomains: [\"\"]}".into(),
                Error,
                9,
                "spec.rules[0].from[0].source.trustDomains[0]",
                "empty",
            ),
            (
                "selector: {matchLabels: {app: web}}\n  rules:\n  - to:\n    - operation:\n        methods: [GET]".into(),
                Warning,
                11,
                "spec.rules[0].to[0].operation.methods",
                "cannot check methods; to enforce them, bind the policy to a waypoint",
            ),
            (
                "action: DENY\n  rules:\n  - from:\n    - source: {notRequestPrincipals: [\"*\"]}\n  - when:\n    - key: request.headers[x-user]\n      values: [a]".into(),
                Warning,
                10,
                "spec.rules[0].from[0].source.notRequestPrincipals",
                "cannot check notRequestPrincipals, request.headers[x-user]; to enforce them, bind the policy to a waypoint with `targetRefs` (a Service, or the waypoint's Gateway). Its rules are enforced at the node proxy without those conditions: it denies more than written (rules[0], rules[1] have no other condition, so they deny every connection)",
            ),
        ];
        for (spec, severity, line, field, message) in cases {
            let d = diagnostics("", &spec);
            let found = d.iter().find(|d| d.field.as_deref() == Some(field));
            let Some(found) = found else { panic!("{spec}: no diagnostic on {field}: {d:?}") };
            assert_eq!(found.severity, severity, "{spec}: {found}");
            assert_eq!(found.origin.line, line, "{spec}: {found}");
            assert!(found.message.contains(message), "{spec}: {found}");
        }
    }

    #[test]
    fn dry_run_annotation_must_be_a_boolean() {
        let d = diagnostics("\n  annotations: {istio.io/dry-run: \"yes\"}", "rules: [{}]");
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].field.as_deref(), Some("metadata.annotations.istio.io/dry-run"));
        assert!(diagnostics("\n  annotations: {istio.io/dry-run: \"false\"}", "rules: [{}]").is_empty());
    }
}
