//! Istio's APIs as Rust types: the workload API (`istio.workload`), ambient authorization
//! (`istio.security`), the CA API (`istio.v1.auth`) and the delta xDS envelope
//! (`envoy.service.discovery.v3`), with gRPC clients and servers for the two services; and
//! strait's own resource type for waypoints (`strait.config.v1`).
//!
//! The `.proto` files in `defs/` mirror Istio's and Envoy's public definitions (package, names
//! and field numbers), which is what makes strait a valid peer of istiod and ztunnel. The Rust
//! in `src/generated/` is produced from them by `cargo run -p strait-proto-gen` and committed,
//! so building strait needs no `protoc`. Modules nest exactly as the protobuf packages do,
//! because the generated code refers across packages by relative paths.

// Generated code: its lints are the generator's business.
#![allow(clippy::all, missing_docs)]

pub mod istio {
    pub mod workload {
        include!("generated/istio.workload.rs");
    }
    pub mod security {
        include!("generated/istio.security.rs");
    }
    pub mod v1 {
        pub mod auth {
            include!("generated/istio.v1.auth.rs");
        }
    }
}

pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                include!("generated/envoy.config.core.v3.rs");
            }
        }
    }
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                include!("generated/envoy.service.discovery.v3.rs");
            }
        }
    }
}

/// strait's own types (`strait.config.v1`): the L7 resources waypoints follow, and the
/// extensions strait attaches to workload API resources.
pub mod strait {
    pub mod config {
        pub mod v1 {
            include!("generated/strait.config.v1.rs");
        }
    }
    pub use config::v1::L7Resource;
}

pub mod google {
    pub mod rpc {
        include!("generated/google.rpc.rs");
    }
}

/// The xDS type URL of `istio.workload.Address` resources.
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// The xDS type URL of `istio.security.Authorization` resources.
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";

pub use prost;
pub use prost_types;
pub use tonic;

#[cfg(test)]
mod tests {
    use prost::Message as _;

    use super::*;

    // Wire compatibility is field numbers and types: encode by hand what Istio's field numbers
    // say and check our types read it.
    #[test]
    fn field_numbers_match_istio() {
        // IstioCertificateRequest: csr = 1 (string), validity_duration = 3 (varint).
        let bytes = [0x0a, 0x01, b'x', 0x18, 0x3c];
        let req = istio::v1::auth::IstioCertificateRequest::decode(&bytes[..]).expect("decode");
        assert_eq!((req.csr.as_str(), req.validity_duration), ("x", 60));

        // Address.workload = 1 { Workload.uid = 20 (string), service_account = 7 }.
        let workload = [0xa2, 0x01, 0x01, b'u', 0x3a, 0x02, b's', b'a'];
        let mut address = vec![0x0a, workload.len() as u8];
        address.extend_from_slice(&workload);
        let addr = istio::workload::Address::decode(&address[..]).expect("decode");
        let Some(istio::workload::address::Type::Workload(w)) = addr.r#type else {
            panic!("not a workload: {addr:?}");
        };
        assert_eq!((w.uid.as_str(), w.service_account.as_str()), ("u", "sa"));

        // DeltaDiscoveryResponse: nonce = 5, removed_resources = 6.
        let resp = [0x2a, 0x01, b'n', 0x32, 0x01, b'r'];
        let resp = envoy::service::discovery::v3::DeltaDiscoveryResponse::decode(&resp[..]).expect("decode");
        assert_eq!((resp.nonce.as_str(), resp.removed_resources.as_slice()), ("n", &["r".to_owned()][..]));
    }
}
