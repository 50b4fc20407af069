//! Request rewrites and redirects (L7-3): where a route sends a request's path and authority,
//! and the Location of a redirect, as pure functions of the request and the matched route.

use http::{HeaderValue, StatusCode, Uri, header, request::Parts};

use super::router::{Local, authority};
use crate::model::routes::{Redirect, RouteMatch, StringMatcher};

/// `rewrite` (L7-3): with a prefix match the matched prefix is replaced, otherwise the whole
/// path; the query string stays. `authority` replaces Host.
pub(super) fn rewrite_request(
    parts: &mut Parts,
    uri: Option<&str>,
    new_authority: Option<&str>,
    matched: Option<&RouteMatch>,
) {
    if let Some(new_path) = uri {
        let path = parts.uri.path();
        let rewritten = match matched.and_then(|m| m.uri.as_ref()) {
            Some(StringMatcher::Prefix(prefix)) if path.starts_with(prefix.as_str()) => {
                let rest = &path[prefix.len()..];
                // `/simple/httpserver` → `/hello` style rewrites must not leave `//` behind.
                if new_path.ends_with('/') && rest.starts_with('/') {
                    format!("{new_path}{}", &rest[1..])
                } else {
                    format!("{new_path}{rest}")
                }
            }
            _ => new_path.to_owned(),
        };
        let rewritten = if rewritten.is_empty() { "/".to_owned() } else { rewritten };
        let target = match parts.uri.query() {
            Some(q) => format!("{rewritten}?{q}"),
            None => rewritten,
        };
        let mut uri_parts = parts.uri.clone().into_parts();
        uri_parts.path_and_query = target.parse().ok();
        if let Ok(uri) = Uri::from_parts(uri_parts) {
            parts.uri = uri;
        }
    }
    if let Some(new_authority) = new_authority
        && let Ok(value) = HeaderValue::from_str(new_authority)
    {
        parts.headers.insert(header::HOST, value);
        let mut uri_parts = parts.uri.clone().into_parts();
        if uri_parts.authority.is_some() {
            uri_parts.authority = new_authority.parse().ok();
            if let Ok(uri) = Uri::from_parts(uri_parts) {
                parts.uri = uri;
            }
        }
    }
}

/// `redirect` (L7-3): answers with the redirect status and a Location built from the request
/// with the redirect's parts replaced.
pub(super) fn redirect_to(redirect: &Redirect, parts: &Parts, matched: Option<&RouteMatch>) -> Local {
    let scheme = redirect.scheme.as_deref().unwrap_or("http");
    let host = redirect.authority.as_deref().unwrap_or_else(|| authority(parts));
    let host = match redirect.port {
        Some(port) => format!("{}:{port}", host.rsplit_once(':').map_or(host, |(h, _)| h)),
        None => host.to_owned(),
    };
    let path = match (&redirect.uri, matched.and_then(|m| m.uri.as_ref())) {
        (Some(uri), Some(StringMatcher::Prefix(prefix))) if parts.uri.path().starts_with(prefix.as_str()) => {
            format!("{uri}{}", &parts.uri.path()[prefix.len()..])
        }
        (Some(uri), _) => uri.clone(),
        (None, _) => parts.uri.path().to_owned(),
    };
    let location = match parts.uri.query() {
        Some(q) => format!("{scheme}://{host}{path}?{q}"),
        None => format!("{scheme}://{host}{path}"),
    };
    let status = StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    let mut local = Local::new(status, "");
    if let Ok(value) = HeaderValue::from_str(&location) {
        local.headers.push((header::LOCATION, value));
    }
    local
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str) -> Parts {
        let (parts, ()) = http::Request::builder()
            .uri(uri)
            .header(header::HOST, "reviews:9080")
            .body(())
            .map_or_else(|e| panic!("request: {e}"), |r| r.into_parts());
        parts
    }

    fn prefix(p: &str) -> RouteMatch {
        RouteMatch { uri: Some(StringMatcher::Prefix(p.into())), ..Default::default() }
    }

    // L7-3: a prefix match's prefix is replaced (the seed's `/simple/httpserver` → `/hello`),
    // any other match replaces the whole path; the query string stays.
    #[test]
    fn rewrites_replace_the_matched_prefix() {
        let cases = [
            ("/simple/httpserver", Some(prefix("/simple/httpserver")), "/hello", "/hello"),
            ("/simple/httpserver/a?x=1", Some(prefix("/simple/httpserver")), "/hello", "/hello/a?x=1"),
            ("/simple/nginx/page", Some(prefix("/simple/nginx/")), "/", "/page"),
            ("/simple/nginx", Some(prefix("/simple/nginx")), "", "/"),
            (
                "/exact?q=2",
                Some(RouteMatch { uri: Some(StringMatcher::Exact("/exact".into())), ..Default::default() }),
                "/new",
                "/new?q=2",
            ),
            ("/any", None, "/new", "/new"),
        ];
        for (uri, matched, rewrite, expected) in cases {
            let mut p = parts(uri);
            rewrite_request(&mut p, Some(rewrite), None, matched.as_ref());
            assert_eq!(p.uri.path_and_query().map(|pq| pq.as_str()), Some(expected), "{uri} → {rewrite}");
        }
        let mut p = parts("/x");
        rewrite_request(&mut p, None, Some("ratings:9080"), None);
        assert_eq!(p.headers.get(header::HOST).and_then(|v| v.to_str().ok()), Some("ratings:9080"));
    }

    #[test]
    fn redirects_build_the_location() {
        let redirect = |uri: Option<&str>, authority: Option<&str>, port, scheme: Option<&str>, status| Redirect {
            uri: uri.map(str::to_owned),
            authority: authority.map(str::to_owned),
            port,
            scheme: scheme.map(str::to_owned),
            status,
        };
        let cases = [
            (
                redirect(Some("/new"), None, None, None, 301),
                Some(prefix("/old")),
                "/old/a?b=1",
                "http://reviews:9080/new/a?b=1",
            ),
            (redirect(None, Some("other"), Some(8080), Some("https"), 302), None, "/p", "https://other:8080/p"),
            (redirect(Some("/x"), None, None, None, 308), None, "/y", "http://reviews:9080/x"),
        ];
        for (r, matched, uri, location) in cases {
            let local = redirect_to(&r, &parts(uri), matched.as_ref());
            assert_eq!(local.status.as_u16(), r.status);
            let got = local.headers.iter().find(|(n, _)| n == header::LOCATION).and_then(|(_, v)| v.to_str().ok());
            assert_eq!(got, Some(location), "{uri}");
        }
    }
}
