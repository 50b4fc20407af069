//! JSON schemas of the Istio kinds strait reads, from the very types its loader fills (CFG-1),
//! for the CustomResourceDefinitions of `deploy/crds` (OPS-2): what the API server accepts is
//! then what `strait control --kubernetes` can read.
//!
//! The types derive `schemars::JsonSchema` behind the `crd-schema` feature. Fields whose loader
//! accepts more than their Rust type says (a port as a number or a string, a duration as text)
//! name one of the stand-in types below with `schemars(with = ...)`; [`crd_schema`] then turns
//! schemars' output into a Kubernetes structural schema.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator, generate::SchemaSettings, json_schema};
use serde_json::{Map, Value};

use super::{
    Cidr, SimpleLb, TlsMode,
    networking::{DerivePort, GrpcStatus, H2UpgradePolicy},
};

/// A count, port or status the loader reads from a number or a string (`"8080"`).
pub struct IntOrString;

impl JsonSchema for IntOrString {
    fn schema_name() -> Cow<'static, str> {
        "IntOrString".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "x-kubernetes-int-or-string": true })
    }
}

/// A duration as Istio writes it (`1.5s`, `100ms`).
pub struct DurationText;

impl JsonSchema for DurationText {
    fn schema_name() -> Cow<'static, str> {
        "DurationText".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string", "description": "A duration such as 10s, 1.5s or 100ms." })
    }
}

/// Any YAML scalar, read as its text (`test: true` sets the header value `true`). A structural
/// schema cannot say "string, number or boolean", so this one field keeps what it is given.
pub struct Scalar;

impl JsonSchema for Scalar {
    fn schema_name() -> Cow<'static, str> {
        "Scalar".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "x-kubernetes-preserve-unknown-fields": true,
            "description": "A string, number or boolean, read as text (preserved as written: a structural schema \
                            has no type for \"any scalar\")."
        })
    }
}

/// A field strait accepts and ignores (`delegate`, `corsPolicy`, `localityLbSetting`): its
/// contents are Istio's business, kept as written.
pub struct Ignored;

impl JsonSchema for Ignored {
    fn schema_name() -> Cow<'static, str> {
        "Ignored".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
            "description": "Accepted and ignored by strait; kept as written (strait has no type for its contents)."
        })
    }
}

/// `port: {number: 9080}`, Istio's PortSelector.
pub struct PortSelector;

impl JsonSchema for PortSelector {
    fn schema_name() -> Cow<'static, str> {
        "PortSelector".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "object",
            "required": ["number"],
            "properties": { "number": { "x-kubernetes-int-or-string": true } }
        })
    }
}

/// A case-insensitive Istio enum name (`ROUND_ROBIN`, older docs `round_robin`): any string,
/// the loader names the valid values when one is wrong.
macro_rules! enum_name {
    ($($ty:ident => $values:literal),* $(,)?) => {$(
        impl JsonSchema for $ty {
            fn schema_name() -> Cow<'static, str> {
                stringify!($ty).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({ "type": "string", "description": concat!("One of ", $values, " (any case).") })
            }
        }
    )*};
}

enum_name!(
    SimpleLb => "UNSPECIFIED, ROUND_ROBIN, RANDOM, LEAST_REQUEST, LEAST_CONN, PASSTHROUGH",
    H2UpgradePolicy => "DEFAULT, DO_NOT_UPGRADE, UPGRADE",
    TlsMode => "DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL",
    DerivePort => "FROM_PROTOCOL_DEFAULT, FROM_REQUEST_PORT",
);

impl JsonSchema for GrpcStatus {
    fn schema_name() -> Cow<'static, str> {
        "GrpcStatus".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "x-kubernetes-int-or-string": true,
            "description": "A gRPC status name such as UNAVAILABLE, or its code from 0 to 16."
        })
    }
}

impl JsonSchema for Cidr {
    fn schema_name() -> Cow<'static, str> {
        "Cidr".into()
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({ "type": "string", "description": "An IP address or a CIDR block such as 10.0.0.0/8." })
    }
}

/// The older spellings the loader still accepts (`#[serde(alias)]`, which schemars does not
/// see), as properties of their own: the API server would prune them otherwise, and strait
/// would read the object without them.
fn alias(schema: &mut Schema, field: &str, alias: &str) {
    if let Some(Value::Object(properties)) = schema.get_mut("properties")
        && let Some(property) = properties.get(field).cloned()
    {
        properties.insert(alias.to_owned(), property);
    }
}

pub fn mirror_percent_alias(schema: &mut Schema) {
    alias(schema, "mirrorPercent", "mirror_percent");
}

pub fn sni_hosts_alias(schema: &mut Schema) {
    alias(schema, "sniHosts", "sni_hosts");
}

/// The structural OpenAPI v3 schema of `T`, as a CRD's `spec` takes it.
pub fn crd_schema<T: JsonSchema>() -> Value {
    let settings = SchemaSettings::openapi3().with(|s| {
        // Everything inline: a CRD schema has no `$ref`.
        s.inline_subschemas = true;
        s.meta_schema = None;
    });
    let schema = settings.into_generator().into_root_schema_for::<T>();
    let mut value = schema.to_value();
    structural(&mut value);
    value
}

/// Rewrites schemars' output into what the API server takes as structural (and what Istio's
/// CRDs look like): `nullable` for options, no `additionalProperties: false` beside
/// `properties` (the API server prunes unknown fields instead), no defaults (the API server
/// would write them into stored objects, and an absent field means something else to strait
/// than an empty one), no Rust integer formats, no titles.
fn structural(value: &mut Value) {
    match value {
        Value::Object(map) => {
            flatten_nullable(map);
            for key in ["$schema", "title", "default", "examples", "$defs", "definitions"] {
                map.remove(key);
            }
            if map.get("additionalProperties") == Some(&Value::Bool(false)) {
                map.remove("additionalProperties");
            }
            if let Some(Value::String(format)) = map.get("format")
                && !["int32", "int64", "float", "double", "byte", "date-time"].contains(&format.as_str())
            {
                map.remove("format");
            }
            for child in map.values_mut() {
                structural(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(structural),
        _ => {}
    }
}

/// `type: [T, "null"]` and `anyOf: [S, {type: null}]` (an `Option<T>`) become `S` with
/// `nullable: true`, the OpenAPI v3 way.
fn flatten_nullable(map: &mut Map<String, Value>) {
    if let Some(Value::Array(types)) = map.get("type") {
        let not_null: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
        if not_null.len() < types.len() {
            map.insert("nullable".into(), Value::Bool(true));
        }
        if let [single] = not_null.as_slice() {
            map.insert("type".into(), single.clone());
        }
    }
    for key in ["anyOf", "oneOf"] {
        let Some(Value::Array(variants)) = map.get(key) else { continue };
        let is_null = |v: &Value| v.get("type") == Some(&Value::String("null".into()));
        if variants.len() == 2
            && let Some(inner) = variants.iter().find(|v| !is_null(v)).cloned()
            && variants.iter().any(is_null)
        {
            map.remove(key);
            if let Value::Object(inner) = inner {
                for (k, v) in inner {
                    map.entry(k).or_insert(v);
                }
            }
            map.insert("nullable".into(), Value::Bool(true));
        }
    }
}
