//! Services: VIPs, ports and the workloads behind them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::workload::{GatewayAddress, NetworkAddress};

/// A service as upstream's local config describes it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    /// Name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Hostname, e.g. `reviews.default.svc.cluster.local`.
    pub hostname: String,
    /// Virtual IPs, `network/ip`.
    pub vips: Vec<NetworkAddress>,
    /// Service port -> target port (0: use the endpoint's own mapping).
    pub ports: BTreeMap<u16, u16>,
    /// Endpoints given inline (most files give them through workloads' `services`).
    #[serde(default)]
    pub endpoints: BTreeMap<String, serde_yaml_ng::Value>,
    /// Identities the service's workloads may present.
    #[serde(default)]
    pub subject_alt_names: Vec<String>,
    /// Waypoint serving this service.
    #[serde(default)]
    pub waypoint: Option<GatewayAddress>,
    /// Load-balancing settings (accepted; the guide promises plain round robin).
    #[serde(default)]
    pub load_balancer: Option<serde_yaml_ng::Value>,
    /// IP families.
    #[serde(default)]
    pub ip_families: Option<String>,
}

impl Service {
    /// `namespace/hostname`, the key workloads use in their `services` map.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.hostname)
    }
}
