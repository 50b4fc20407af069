//! Which route a request takes (L7-2): the first `http[]` entry with a matching `match` block,
//! where the conditions of one block all hold (AND) and any block will do (OR). Pure, so every
//! rule of Istio's matching is a table test.

use std::collections::BTreeMap;

use http::HeaderMap;

use crate::model::routes::{HttpRoute, RouteMatch, StringMatcher, VirtualService};

/// What a route match looks at in a request.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    /// The path, without the query string.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub method: &'a str,
    /// Host / `:authority`.
    pub authority: &'a str,
    pub scheme: &'a str,
    pub headers: &'a HeaderMap,
    /// The service port the request was sent to.
    pub port: u16,
    /// Labels of the calling workload, when the mesh knows it.
    pub source_labels: Option<&'a BTreeMap<String, String>>,
    /// Namespace of the caller's verified identity.
    pub source_namespace: Option<&'a str>,
    /// The gateway the request came through: `mesh` at a waypoint.
    pub gateway: &'a str,
}

impl StringMatcher {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatcher::Exact(s) => value == s,
            StringMatcher::Prefix(p) => value.starts_with(p.as_str()),
            StringMatcher::Regex(r) => r.is_match(value),
            StringMatcher::Presence => true,
        }
    }

    fn matches_ignoring_case(&self, value: &str) -> bool {
        match self {
            StringMatcher::Exact(s) => value.eq_ignore_ascii_case(s),
            StringMatcher::Prefix(p) => {
                value.len() >= p.len() && value.is_char_boundary(p.len()) && value[..p.len()].eq_ignore_ascii_case(p)
            }
            StringMatcher::Regex(r) => r.is_match(&value.to_ascii_lowercase()) || r.is_match(value),
            StringMatcher::Presence => true,
        }
    }
}

/// The first route of `vs` matching the request, with the match block that matched (`None`
/// for a route without conditions): a prefix rewrite needs to know which prefix matched.
pub fn select_route<'r>(
    vs: &'r VirtualService,
    view: &RequestView<'_>,
) -> Option<(&'r HttpRoute, Option<&'r RouteMatch>)> {
    for route in &vs.http {
        if route.matches.is_empty() {
            return Some((route, None));
        }
        if let Some(m) = route.matches.iter().find(|m| matches(m, view)) {
            return Some((route, Some(m)));
        }
    }
    None
}

/// Whether every condition of one match block holds.
pub fn matches(m: &RouteMatch, view: &RequestView<'_>) -> bool {
    if !m.gateways.is_empty() && !m.gateways.iter().any(|g| g == view.gateway) {
        return false;
    }
    if let Some(uri) = &m.uri {
        let ok = if m.ignore_uri_case { uri.matches_ignoring_case(view.path) } else { uri.matches(view.path) };
        if !ok {
            return false;
        }
    }
    let simple = [(&m.scheme, view.scheme), (&m.method, view.method), (&m.authority, view.authority)];
    if simple.iter().any(|(matcher, value)| matcher.as_ref().is_some_and(|s| !s.matches(value))) {
        return false;
    }
    if m.port.is_some_and(|p| p != view.port) {
        return false;
    }
    if !m.headers.iter().all(|(name, matcher)| header_matches(view.headers, name, matcher)) {
        return false;
    }
    if m.without_headers.iter().any(|(name, matcher)| header_matches(view.headers, name, matcher)) {
        return false;
    }
    if !m.query_params.iter().all(|(name, matcher)| query_param(view.query, name).is_some_and(|v| matcher.matches(v))) {
        return false;
    }
    if !m.source_labels.is_empty() {
        let Some(labels) = view.source_labels else { return false };
        if !m.source_labels.iter().all(|(k, v)| labels.get(k) == Some(v)) {
            return false;
        }
    }
    if let Some(ns) = &m.source_namespace
        && view.source_namespace != Some(ns.as_str())
    {
        return false;
    }
    true
}

/// A header matches when present and its value (repeated headers joined with `,`, as Envoy
/// sees them) satisfies the matcher.
fn header_matches(headers: &HeaderMap, name: &str, matcher: &StringMatcher) -> bool {
    let mut values = headers.get_all(name).iter().filter_map(|v| v.to_str().ok());
    let Some(first) = values.next() else { return false };
    match values.next() {
        None => matcher.matches(first),
        Some(second) => {
            let mut joined = format!("{first},{second}");
            for v in values {
                joined.push(',');
                joined.push_str(v);
            }
            matcher.matches(&joined)
        }
    }
}

/// The value of the first `name` parameter of a query string (`a=1&b=2`); a parameter without
/// `=` has the empty value.
pub fn query_param<'q>(query: Option<&'q str>, name: &str) -> Option<&'q str> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;
    use crate::model::routes::{HeaderOps, RouteAction};

    fn route(name: &str, matches: Vec<RouteMatch>) -> HttpRoute {
        HttpRoute {
            name: Some(name.into()),
            matches,
            action: RouteAction::DirectResponse { status: 200, body: None },
            headers: HeaderOps::default(),
            rewrite: None,
            timeout: None,
            retries: None,
            fault: None,
            mirrors: Vec::new(),
        }
    }

    fn vs(http: Vec<HttpRoute>) -> VirtualService {
        VirtualService {
            name: "r".into(),
            namespace: "default".into(),
            hosts: vec!["reviews.default.svc.cluster.local".into()],
            gateways: vec!["mesh".into()],
            http,
            tcp: Vec::new(),
            tls: Vec::new(),
            origin: crate::config::Origin::new(std::path::Path::new("t.yaml"), 1),
        }
    }

    fn view<'a>(path: &'a str, headers: &'a HeaderMap) -> RequestView<'a> {
        RequestView {
            path,
            query: Some("a=1&flag&b=two"),
            method: "GET",
            authority: "reviews:9080",
            scheme: "http",
            headers,
            port: 9080,
            source_labels: None,
            source_namespace: Some("default"),
            gateway: "mesh",
        }
    }

    fn regex(r: &str) -> StringMatcher {
        StringMatcher::Regex(regex::Regex::new(&format!("^(?:{r})$")).expect("regex"))
    }

    // L7-2: first match wins; AND within a block, OR across blocks; the seed's `end-user: jason`.
    #[test]
    fn first_matching_route_wins() {
        let jason = RouteMatch {
            headers: vec![("end-user".into(), StringMatcher::Exact("jason".into()))],
            ..Default::default()
        };
        let table = vs(vec![route("jason", vec![jason]), route("default", vec![])]);
        let mut headers = HeaderMap::new();
        let pick = |h: &HeaderMap| select_route(&table, &view("/", h)).map(|(r, _)| r.name.clone().unwrap_or_default());
        assert_eq!(pick(&headers).as_deref(), Some("default"));
        headers.insert("end-user", HeaderValue::from_static("jason"));
        assert_eq!(pick(&headers).as_deref(), Some("jason"));
        headers.insert("end-user", HeaderValue::from_static("Jason"));
        assert_eq!(pick(&headers).as_deref(), Some("default"), "header values are case sensitive");
    }

    #[test]
    fn conditions_of_one_block_all_hold() {
        let headers = HeaderMap::new();
        let cases: Vec<(RouteMatch, bool)> = vec![
            (RouteMatch { uri: Some(StringMatcher::Prefix("/api".into())), ..Default::default() }, true),
            (RouteMatch { uri: Some(StringMatcher::Prefix("/API".into())), ..Default::default() }, false),
            (
                RouteMatch {
                    uri: Some(StringMatcher::Prefix("/API".into())),
                    ignore_uri_case: true,
                    ..Default::default()
                },
                true,
            ),
            (RouteMatch { uri: Some(StringMatcher::Exact("/api/v1/x".into())), ..Default::default() }, true),
            (RouteMatch { uri: Some(regex("/api/v[0-9]+/.*")), ..Default::default() }, true),
            (RouteMatch { uri: Some(regex("/api")), ..Default::default() }, false),
            (
                RouteMatch {
                    uri: Some(StringMatcher::Prefix("/api".into())),
                    method: Some(StringMatcher::Exact("POST".into())),
                    ..Default::default()
                },
                false,
            ),
            (RouteMatch { port: Some(9080), ..Default::default() }, true),
            (RouteMatch { port: Some(80), ..Default::default() }, false),
            (RouteMatch { authority: Some(StringMatcher::Prefix("reviews".into())), ..Default::default() }, true),
            (
                RouteMatch {
                    query_params: vec![("b".into(), StringMatcher::Exact("two".into()))],
                    ..Default::default()
                },
                true,
            ),
            (
                RouteMatch {
                    query_params: vec![("flag".into(), StringMatcher::Exact(String::new()))],
                    ..Default::default()
                },
                true,
            ),
            (RouteMatch { query_params: vec![("c".into(), StringMatcher::Presence)], ..Default::default() }, false),
            (RouteMatch { headers: vec![("x-missing".into(), StringMatcher::Presence)], ..Default::default() }, false),
            (
                RouteMatch {
                    without_headers: vec![("x-missing".into(), StringMatcher::Presence)],
                    ..Default::default()
                },
                true,
            ),
            (RouteMatch { gateways: vec!["istio-system/ingress".into()], ..Default::default() }, false),
            (RouteMatch { gateways: vec!["mesh".into()], ..Default::default() }, true),
            (RouteMatch { source_namespace: Some("default".into()), ..Default::default() }, true),
            (RouteMatch { source_namespace: Some("other".into()), ..Default::default() }, false),
            (
                RouteMatch {
                    source_labels: [("app".to_owned(), "productpage".to_owned())].into(),
                    ..Default::default()
                },
                false,
            ),
        ];
        for (i, (m, expected)) in cases.iter().enumerate() {
            assert_eq!(matches(m, &view("/api/v1/x", &headers)), *expected, "case {i}: {m:?}");
        }
        let labels = [("app".to_owned(), "productpage".to_owned()), ("version".to_owned(), "v1".to_owned())].into();
        let with_source = RequestView { source_labels: Some(&labels), ..view("/", &headers) };
        let m =
            RouteMatch { source_labels: [("app".to_owned(), "productpage".to_owned())].into(), ..Default::default() };
        assert!(matches(&m, &with_source));
    }

    #[test]
    fn repeated_headers_are_joined() {
        let mut headers = HeaderMap::new();
        headers.append("x-v", HeaderValue::from_static("a"));
        headers.append("x-v", HeaderValue::from_static("b"));
        let m = RouteMatch { headers: vec![("x-v".into(), StringMatcher::Exact("a,b".into()))], ..Default::default() };
        assert!(matches(&m, &view("/", &headers)));
    }

    #[test]
    fn no_match_means_no_route() {
        let headers = HeaderMap::new();
        let only = RouteMatch { uri: Some(StringMatcher::Exact("/only".into())), ..Default::default() };
        let table = vs(vec![route("only", vec![only])]);
        assert!(select_route(&table, &view("/other", &headers)).is_none());
        let (_, matched) = select_route(&table, &view("/only", &headers)).expect("route");
        assert!(matched.is_some());
    }
}
