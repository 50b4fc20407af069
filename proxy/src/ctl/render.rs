//! The tables of `strait ctl proxy-config`, rendered from the JSON a proxy's admin API answers,
//! with istioctl's column names where istioctl has the same view (`ztunnel-config workloads`,
//! `services`, `policies`, `certificates`; `proxy-config routes`, `clusters`, `endpoints`).
//!
//! Pure functions of the JSON, so every table is tested without a proxy; a field a proxy did
//! not send shows as `-`.

use serde_json::Value;

use super::table::Table;

/// The cell for a JSON string, number or boolean; `-` when absent or null.
fn cell(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    }
}

fn items(data: &Value) -> &[Value] {
    data.as_array().map_or(&[], Vec::as_slice)
}

/// `shop/waypoint` as istioctl names a waypoint: its name when it is in `namespace`, `None`
/// when there is none.
fn waypoint_cell(waypoint: &Value, namespace: &str) -> String {
    match waypoint.as_str() {
        None => "None".to_owned(),
        Some(w) => match w.split_once('/') {
            Some((ns, name)) if ns == namespace => name.to_owned(),
            _ => w.to_owned(),
        },
    }
}

/// `namespace/name` as istioctl writes a resource in a table: `name.namespace`.
fn resource_cell(key: &Value) -> String {
    match key.as_str().and_then(|k| k.split_once('/')) {
        Some((ns, name)) => format!("{name}.{ns}"),
        None => cell(key),
    }
}

/// A service FQDN without the cluster suffix: `reviews.shop`.
fn short_host(host: &str) -> &str {
    host.strip_suffix(".svc.cluster.local").unwrap_or(host)
}

/// At most three names, then how many more.
fn some_of(list: &Value) -> String {
    let names: Vec<&str> = items(list).iter().filter_map(Value::as_str).collect();
    match names.len() {
        0 => "None".to_owned(),
        n if n <= 3 => names.join(","),
        n => format!("{} +{} more", names[..3].join(","), n - 3),
    }
}

/// `NAMESPACE POD NAME ADDRESS NODE WAYPOINT PROTOCOL`, as `istioctl ztunnel-config workloads`.
pub fn workloads(data: &Value) -> String {
    let mut list: Vec<&Value> = items(data).iter().collect();
    list.sort_by_key(|w| (cell(&w["namespace"]), cell(&w["name"])));
    let mut table = Table::new(&["NAMESPACE", "POD NAME", "ADDRESS", "NODE", "WAYPOINT", "PROTOCOL"]);
    for w in list {
        let namespace = cell(&w["namespace"]);
        table.row(vec![
            namespace.clone(),
            cell(&w["name"]),
            cell(&w["ip"]),
            cell(&w["node"]),
            waypoint_cell(&w["waypoint"], &namespace),
            cell(&w["protocol"]),
        ]);
    }
    table.render()
}

/// `NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS PORTS`, as `istioctl ztunnel-config
/// services` (ENDPOINTS counts the pods behind the service; PORTS is strait's).
pub fn services(data: &Value) -> String {
    let mut table = Table::new(&["NAMESPACE", "SERVICE NAME", "SERVICE VIP", "WAYPOINT", "ENDPOINTS", "PORTS"]);
    for s in items(data) {
        let namespace = cell(&s["namespace"]);
        let ports: Vec<String> =
            items(&s["ports"]).iter().map(|p| format!("{}/{}", cell(&p["port"]), cell(&p["protocol"]))).collect();
        table.row(vec![
            namespace.clone(),
            cell(&s["name"]),
            s["vip"].as_str().unwrap_or("None").to_owned(),
            waypoint_cell(&s["waypoint"], &namespace),
            cell(&s["endpoints"]),
            ports.join(","),
        ]);
    }
    table.render()
}

/// `NAMESPACE POLICY NAME KIND ACTION SCOPE APPLIES TO`: istioctl's `ztunnel-config policies`
/// columns, with the kind (PeerAuthentication and RequestAuthentication too) and where each
/// policy takes effect at this proxy.
pub fn policies(data: &Value) -> String {
    let mut table = Table::new(&["NAMESPACE", "POLICY NAME", "KIND", "ACTION", "SCOPE", "APPLIES TO"]);
    for p in items(data) {
        let mut action = cell(&p["action"]);
        if p["dry_run"] == true {
            action.push_str(" (dry-run)");
        }
        if p["kind"] == "PeerAuthentication" {
            let ports: Vec<&str> = items(&p["details"]).iter().filter_map(Value::as_str).collect();
            if !ports.is_empty() {
                action = format!("{action} ({})", ports.join(","));
            }
        }
        table.row(vec![
            cell(&p["namespace"]),
            cell(&p["name"]),
            cell(&p["kind"]),
            action,
            cell(&p["scope"]),
            some_of(&p["applies_to"]),
        ]);
    }
    table.render()
}

/// `CERTIFICATE NAME TYPE STATUS VALID CERT SERIAL NUMBER NOT AFTER NOT BEFORE`, as `istioctl
/// ztunnel-config certificates`: a row per certificate of each identity's chain, then its roots;
/// identities still waiting for one show `Initializing` or `Unavailable`. `now` is an RFC 3339
/// time in the format the proxy writes, so validity is a string comparison.
pub fn certs(data: &Value, now: &str) -> String {
    let mut table =
        Table::new(&["CERTIFICATE NAME", "TYPE", "STATUS", "VALID CERT", "SERIAL NUMBER", "NOT AFTER", "NOT BEFORE"]);
    for c in items(data) {
        let identity = cell(&c["identity"]);
        if let Some(state @ ("initializing" | "unavailable")) = c["state"].as_str() {
            let status = if state == "initializing" { "Initializing" } else { "Unavailable" };
            let na = || "NA".to_owned();
            table.row(vec![identity, na(), status.to_owned(), "false".to_owned(), na(), na(), na()]);
            continue;
        }
        let mut certs: Vec<&Value> = items(&c["chain"]).iter().chain(items(&c["roots"])).collect();
        if certs.is_empty() {
            // A proxy that lists the leaf only.
            certs.push(c);
        }
        for cert in certs {
            let (not_before, not_after) = (cell(&cert["not_before"]), cell(&cert["not_after"]));
            let valid = not_before.as_str() <= now && now < not_after.as_str();
            table.row(vec![
                identity.clone(),
                cert["kind"].as_str().unwrap_or("Leaf").to_owned(),
                "Available".to_owned(),
                valid.to_string(),
                cell(&cert["serial"]),
                not_after,
                not_before,
            ]);
        }
    }
    table.render()
}

/// `ADDRESSES PORT NAME PURPOSE`, after `istioctl proxy-config listeners`.
pub fn listeners(data: &Value) -> String {
    let mut table = Table::new(&["ADDRESSES", "PORT", "NAME", "PURPOSE"]);
    for l in items(data) {
        let address = cell(&l["address"]);
        let (host, port) = address.rsplit_once(':').unwrap_or((&address, "-"));
        table.row(vec![host.to_owned(), port.to_owned(), cell(&l["name"]), cell(&l["purpose"])]);
    }
    table.render()
}

/// `NAME SERVICE MATCH DESTINATION VIRTUAL SERVICE OPTIONS`, after `istioctl proxy-config
/// routes`: a row per route of each service port, in the order they are tried.
pub fn routes(data: &Value) -> String {
    let mut table = Table::new(&["NAME", "SERVICE", "MATCH", "DESTINATION", "VIRTUAL SERVICE", "OPTIONS"]);
    for t in items(data) {
        let (name, service) = (cell(&t["name"]), short_host(t["service"].as_str().unwrap_or("-")).to_owned());
        let vs = resource_cell(&t["virtual_service"]);
        for r in items(&t["http"]) {
            let matches: Vec<&str> = items(&r["match"]).iter().filter_map(Value::as_str).collect();
            let destination = match r["answer"].as_str() {
                Some(answer) => answer.to_owned(),
                None => destinations(&r["destinations"]),
            };
            let options: Vec<&str> = items(&r["options"]).iter().filter_map(Value::as_str).collect();
            table.row(vec![
                name.clone(),
                service.clone(),
                if matches.is_empty() { "/*".to_owned() } else { matches.join(" | ") },
                destination,
                vs.clone(),
                if options.is_empty() { "-".to_owned() } else { options.join("; ") },
            ]);
        }
        for r in items(&t["tcp"]) {
            let matches: Vec<&str> = items(&r["match"]).iter().filter_map(Value::as_str).collect();
            table.row(vec![
                name.clone(),
                service.clone(),
                format!("tcp {}", if matches.is_empty() { "*".to_owned() } else { matches.join(" | ") }),
                destinations(&r["destinations"]),
                vs.clone(),
                "-".to_owned(),
            ]);
        }
    }
    table.render()
}

/// `reviews.shop|v1 90%, reviews.shop|v2 10%`: short host, `|subset`, `:port` when the route
/// names one, and the share when there are several.
fn destinations(list: &Value) -> String {
    let list = items(list);
    let total: u64 = list.iter().filter_map(|d| d["weight"].as_u64()).sum();
    let parts: Vec<String> = list
        .iter()
        .map(|d| {
            let mut text = short_host(d["host"].as_str().unwrap_or("-")).to_owned();
            if let Some(subset) = d["subset"].as_str() {
                text.push_str(&format!("|{subset}"));
            }
            if let Some(port) = d["port"].as_u64() {
                text.push_str(&format!(":{port}"));
            }
            let weight = d["weight"].as_u64().unwrap_or(0);
            match (list.len(), total) {
                (1, _) => {}
                (_, 100) => text.push_str(&format!(" {weight}%")),
                _ => text.push_str(&format!(" weight {weight}")),
            }
            text
        })
        .collect();
    if parts.is_empty() { "-".to_owned() } else { parts.join(", ") }
}

/// `SERVICE FQDN PORT SUBSET DESTINATION RULE LOAD BALANCER HEALTHY`, after `istioctl
/// proxy-config clusters`, with healthy/total endpoints; a destination that cannot be used
/// shows why instead.
pub fn clusters(data: &Value) -> String {
    let mut table = Table::new(&["SERVICE FQDN", "PORT", "SUBSET", "DESTINATION RULE", "LOAD BALANCER", "HEALTHY"]);
    for c in items(data) {
        let endpoints = items(&c["endpoints"]);
        let healthy = endpoints.iter().filter(|e| e["health"] == "HEALTHY").count();
        let health = match c["error"].as_str() {
            Some(error) => format!("- ({error})"),
            None => format!("{healthy}/{}", endpoints.len()),
        };
        table.row(vec![
            cell(&c["host"]),
            cell(&c["port"]),
            cell(&c["subset"]),
            resource_cell(&c["destination_rule"]),
            cell(&c["load_balancer"]),
            health,
        ]);
    }
    table.render()
}

/// `ENDPOINT STATUS OUTLIER CHECK CLUSTER WORKLOAD`, as `istioctl proxy-config endpoints`
/// (plus the pod): outlier detection's verdict, how long an ejection still lasts, and errors
/// counted towards the next one.
pub fn endpoints(data: &Value) -> String {
    let mut table = Table::new(&["ENDPOINT", "STATUS", "OUTLIER CHECK", "CLUSTER", "WORKLOAD"]);
    for c in items(data) {
        for e in items(&c["endpoints"]) {
            let outlier = &e["outlier"];
            let check = match outlier["ejected_for_ms"].as_u64() {
                Some(ms) => {
                    format!("FAILED (ejected {}×, back in {:.1}s)", cell(&outlier["ejections"]), ms as f64 / 1000.0)
                }
                None => {
                    let errors = outlier["consecutive_5xx"].as_u64().unwrap_or(0);
                    if errors > 0 { format!("OK ({errors} error(s) in a row)") } else { "OK".to_owned() }
                }
            };
            table.row(vec![cell(&e["address"]), cell(&e["health"]), check, cell(&c["name"]), cell(&e["workload"])]);
        }
    }
    table.render()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn workloads_table_is_istioctls() {
        let data = json!([
            {"name": "web-1", "namespace": "shop", "ip": "10.1.0.10", "node": "node1", "waypoint": "shop/waypoint", "protocol": "HBONE"},
            {"name": "db", "namespace": "data", "ip": "10.2.0.10", "node": null, "waypoint": "infra/shared", "protocol": "TCP"},
            {"name": "wp", "namespace": "shop", "ip": "10.1.0.20", "node": "node1", "waypoint": null, "protocol": "TCP"}
        ]);
        assert_eq!(
            workloads(&data),
            "NAMESPACE POD NAME ADDRESS   NODE  WAYPOINT     PROTOCOL\n\
             data      db       10.2.0.10 -     infra/shared TCP\n\
             shop      web-1    10.1.0.10 node1 waypoint     HBONE\n\
             shop      wp       10.1.0.20 node1 None         TCP\n"
        );
    }

    #[test]
    fn services_table_counts_endpoints_and_lists_ports() {
        let data = json!([
            {"name": "reviews", "namespace": "shop", "vip": "10.96.0.30", "waypoint": "shop/waypoint", "endpoints": 3,
             "ports": [{"port": 9080, "protocol": "HTTP"}, {"port": 9000, "protocol": "TCP"}]},
            {"name": "headless", "namespace": "shop", "vip": null, "waypoint": null, "endpoints": 0, "ports": []}
        ]);
        assert_eq!(
            services(&data),
            "NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS PORTS\n\
             shop      reviews      10.96.0.30  waypoint 3         9080/HTTP,9000/TCP\n\
             shop      headless     None        None     0\n"
        );
    }

    #[test]
    fn policies_table_shows_kind_action_scope_and_where_they_apply() {
        let data = json!([
            {"kind": "AuthorizationPolicy", "namespace": "shop", "name": "allow-web", "action": "Allow", "dry_run": false,
             "scope": "WorkloadSelector", "applies_to": ["shop/a", "shop/b", "shop/c", "shop/d"]},
            {"kind": "AuthorizationPolicy", "namespace": "shop", "name": "try", "action": "Deny", "dry_run": true,
             "scope": "Namespace", "applies_to": []},
            {"kind": "PeerAuthentication", "namespace": "istio-system", "name": "mesh", "action": "STRICT",
             "scope": "Global", "details": ["8080=PERMISSIVE"], "applies_to": ["shop/a"]}
        ]);
        assert_eq!(
            policies(&data),
            "NAMESPACE    POLICY NAME KIND                ACTION                   SCOPE            APPLIES TO\n\
             shop         allow-web   AuthorizationPolicy Allow                    WorkloadSelector shop/a,shop/b,shop/c +1 more\n\
             shop         try         AuthorizationPolicy Deny (dry-run)           Namespace        None\n\
             istio-system mesh        PeerAuthentication  STRICT (8080=PERMISSIVE) Global           shop/a\n"
        );
    }

    #[test]
    fn certs_table_has_a_row_per_certificate_and_pending_identities() {
        let data = json!([
            {"identity": "spiffe://cluster.local/ns/shop/sa/web", "state": "valid", "serial": "0a",
             "chain": [{"kind": "Leaf", "serial": "0a", "not_before": "2026-01-01T00:00:00.000Z", "not_after": "2026-01-02T00:00:00.000Z"}],
             "roots": [{"kind": "Root", "serial": "01", "not_before": "2025-01-01T00:00:00.000Z", "not_after": "2035-01-01T00:00:00.000Z"}]},
            {"identity": "spiffe://cluster.local/ns/shop/sa/db", "state": "unavailable", "serial": null, "chain": [], "roots": []}
        ]);
        let text = certs(&data, "2026-01-03T00:00:00.000Z");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "CERTIFICATE NAME                      TYPE STATUS      VALID CERT SERIAL NUMBER NOT AFTER                NOT BEFORE"
        );
        assert_eq!(
            lines[1],
            "spiffe://cluster.local/ns/shop/sa/web Leaf Available   false      0a            2026-01-02T00:00:00.000Z 2026-01-01T00:00:00.000Z",
            "expired on the 2nd"
        );
        assert!(
            lines[2].starts_with("spiffe://cluster.local/ns/shop/sa/web Root Available   true       01 "),
            "{text}"
        );
        assert_eq!(
            lines[3],
            "spiffe://cluster.local/ns/shop/sa/db  NA   Unavailable false      NA            NA                       NA"
        );
    }

    #[test]
    fn routes_table_lists_each_route_in_order() {
        let data = json!([{
            "name": "9080", "service": "reviews.shop.svc.cluster.local", "port": 9080, "virtual_service": "shop/reviews",
            "http": [
                {"match": ["/reviews* header end-user=jason"], "destinations": [{"host": "reviews.shop.svc.cluster.local", "subset": "v2", "port": null, "weight": 100}],
                 "answer": null, "options": ["fault delay 7s to 100%"]},
                {"match": [], "destinations": [
                    {"host": "reviews.shop.svc.cluster.local", "subset": "v1", "port": null, "weight": 90},
                    {"host": "reviews.shop.svc.cluster.local", "subset": "v2", "port": null, "weight": 10}], "answer": null, "options": []},
                {"match": ["/old"], "destinations": [], "answer": "redirect 301 uri=/new", "options": []}
            ],
            "tcp": [{"match": [], "destinations": [{"host": "db.data.svc.cluster.local", "subset": null, "port": 5432, "weight": 100}]}]
        }]);
        assert_eq!(
            routes(&data),
            "NAME SERVICE      MATCH                           DESTINATION                              VIRTUAL SERVICE OPTIONS\n\
             9080 reviews.shop /reviews* header end-user=jason reviews.shop|v2                          reviews.shop    fault delay 7s to 100%\n\
             9080 reviews.shop /*                              reviews.shop|v1 90%, reviews.shop|v2 10% reviews.shop    -\n\
             9080 reviews.shop /old                            redirect 301 uri=/new                    reviews.shop    -\n\
             9080 reviews.shop tcp *                           db.data:5432                             reviews.shop    -\n"
        );
    }

    #[test]
    fn listeners_table_splits_address_and_port() {
        let data = json!([
            {"name": "hbone", "address": "0.0.0.0:15008", "purpose": "HBONE"},
            {"name": "admin", "address": "[::1]:15000", "purpose": "this admin API"}
        ]);
        assert_eq!(
            listeners(&data),
            "ADDRESSES PORT  NAME  PURPOSE\n\
             0.0.0.0   15008 hbone HBONE\n\
             [::1]     15000 admin this admin API\n"
        );
    }

    fn cluster_data() -> Value {
        json!([
            {"name": "outbound|9080|v1|reviews.shop.svc.cluster.local", "host": "reviews.shop.svc.cluster.local", "port": 9080,
             "subset": "v1", "destination_rule": "shop/reviews", "load_balancer": "ROUND_ROBIN", "endpoints": [
                {"address": "10.2.0.10:9080", "workload": "shop/reviews-v1", "health": "EJECTED",
                 "outlier": {"ejected_for_ms": 1500, "ejections": 1, "consecutive_5xx": 0}},
                {"address": "10.2.0.11:9080", "workload": "shop/reviews-v1b", "health": "HEALTHY",
                 "outlier": {"ejected_for_ms": null, "ejections": 0, "consecutive_5xx": 2}}]},
            {"name": "outbound|9080|v3|reviews.shop.svc.cluster.local", "host": "reviews.shop.svc.cluster.local", "port": 9080,
             "subset": "v3", "destination_rule": "shop/reviews", "load_balancer": "-", "endpoints": [],
             "error": "no DestinationRule defines subset `v3`"}
        ])
    }

    #[test]
    fn clusters_table_counts_healthy_endpoints_and_says_why_one_is_unusable() {
        assert_eq!(
            clusters(&cluster_data()),
            "SERVICE FQDN                   PORT SUBSET DESTINATION RULE LOAD BALANCER HEALTHY\n\
             reviews.shop.svc.cluster.local 9080 v1     reviews.shop     ROUND_ROBIN   1/2\n\
             reviews.shop.svc.cluster.local 9080 v3     reviews.shop     -             - (no DestinationRule defines subset `v3`)\n"
        );
    }

    #[test]
    fn endpoints_table_shows_outlier_status() {
        assert_eq!(
            endpoints(&cluster_data()),
            "ENDPOINT       STATUS  OUTLIER CHECK                     CLUSTER                                         WORKLOAD\n\
             10.2.0.10:9080 EJECTED FAILED (ejected 1×, back in 1.5s) outbound|9080|v1|reviews.shop.svc.cluster.local shop/reviews-v1\n\
             10.2.0.11:9080 HEALTHY OK (2 error(s) in a row)          outbound|9080|v1|reviews.shop.svc.cluster.local shop/reviews-v1b\n"
        );
    }
}
