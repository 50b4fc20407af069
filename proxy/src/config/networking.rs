//! Istio's traffic resources (`networking.istio.io/v1alpha3|v1beta1|v1`) as users write them:
//! VirtualService and DestinationRule (L7-2 to L7-8).
//!
//! Placeholder: the full schema is being written.

use serde::Deserialize;

use super::ObjectMeta;

/// `networking.istio.io` VirtualService.
#[derive(Debug, Clone, Deserialize)]
pub struct VirtualService {
    pub metadata: ObjectMeta,
}

/// `networking.istio.io` DestinationRule.
#[derive(Debug, Clone, Deserialize)]
pub struct DestinationRule {
    pub metadata: ObjectMeta,
}
