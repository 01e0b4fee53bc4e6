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
    /// Locality-aware endpoint selection, as istiod derives it from the Service's
    /// `trafficDistribution` or `networking.istio.io/traffic-distribution`.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
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

/// How a service's endpoints are chosen (upstream's `LoadBalancing`). Within the endpoints
/// left, the pick is the guide's strict round robin.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    /// Locality dimensions to keep traffic within, most important first.
    #[serde(default)]
    pub routing_preferences: Vec<Scope>,
    /// How the preferences apply.
    #[serde(default)]
    pub mode: LoadBalancerMode,
    /// Whether unhealthy endpoints may be picked.
    #[serde(default)]
    pub health_policy: HealthPolicy,
}

/// How routing preferences apply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum LoadBalancerMode {
    /// Preferences are ignored: every endpoint takes its turn.
    #[default]
    Standard,
    /// Only endpoints matching every preference; none left refuses the connection.
    Strict,
    /// Endpoints matching the most preferences (in order) first; the next level when a
    /// level empties.
    Failover,
    /// No endpoint selection: the connection goes to the address dialled.
    Passthrough,
}

/// A locality dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub enum Scope {
    /// Same region.
    Region,
    /// Same zone.
    Zone,
    /// Same subzone.
    Subzone,
    /// Same node.
    Node,
    /// Same cluster.
    Cluster,
    /// Same network.
    Network,
}

/// Which endpoints may be picked by health.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum HealthPolicy {
    /// Healthy endpoints only.
    #[default]
    OnlyHealthy,
    /// Unhealthy endpoints too.
    AllowAll,
}
