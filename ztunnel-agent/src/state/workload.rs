//! Workloads as upstream's local config (and, later, xDS) describe them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize};

use crate::identity::{Identity, DEFAULT_TRUST_DOMAIN};

/// How a workload is reached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum Protocol {
    /// Plain TCP (not in the mesh, or not captured).
    #[default]
    TCP,
    /// HBONE: mTLS HTTP/2 CONNECT on port 15008.
    HBONE,
}

/// Health of a workload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum HealthStatus {
    /// Receives traffic.
    #[default]
    Healthy,
    /// Skipped by load balancing.
    Unhealthy,
}

/// An address on a network: `network/ip` (the network may be empty: `/10.96.0.1`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetworkAddress {
    /// Network name ("" for the default network).
    pub network: String,
    /// Address.
    pub address: IpAddr,
}

impl fmt::Display for NetworkAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.address)
    }
}

impl FromStr for NetworkAddress {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (network, ip) = s
            .rsplit_once('/')
            .ok_or_else(|| format!("{s:?} is not of the form network/ip (e.g. /10.96.0.1)"))?;
        let address = ip
            .parse()
            .map_err(|_| format!("{s:?}: {ip:?} is not an IP address"))?;
        Ok(Self {
            network: network.to_string(),
            address,
        })
    }
}

impl<'de> Deserialize<'de> for NetworkAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for NetworkAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Where a waypoint or network gateway is: an address or a `namespace/hostname`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct GatewayAddress {
    /// `network/ip` or `namespace/hostname`.
    pub destination: String,
    /// Its HBONE port.
    #[serde(default = "default_hbone_port")]
    pub hbone_mtls_port: u16,
}

fn default_hbone_port() -> u16 {
    ztunnel_common::HBONE_PORT
}

/// The locality of a workload.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Locality {
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
    /// Subzone.
    pub subzone: String,
}

/// Application tunnel settings (accepted for compatibility).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ApplicationTunnel {
    /// `NONE` or `PROXY`.
    #[serde(default)]
    pub protocol: Option<String>,
    /// Port.
    #[serde(default)]
    pub port: Option<u16>,
}

/// A workload (pod). Field names and defaults follow upstream's local config.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Workload {
    /// Unique id, upstream's `<cluster>//v1/Pod/<ns>/<name>`.
    #[serde(default)]
    pub uid: String,
    /// Pod name.
    #[serde(default)]
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Addresses.
    pub workload_ips: Vec<IpAddr>,
    /// HBONE or TCP.
    #[serde(default)]
    pub protocol: Protocol,
    /// `Standard` or `HostNetwork`.
    #[serde(default)]
    pub network_mode: Option<String>,
    /// Trust domain ("" means cluster.local).
    #[serde(default)]
    pub trust_domain: String,
    /// Service account ("" means default).
    #[serde(default)]
    pub service_account: String,
    /// Network.
    #[serde(default)]
    pub network: String,
    /// Owning workload (Deployment) name.
    #[serde(default)]
    pub workload_name: String,
    /// Owning workload type.
    #[serde(default)]
    pub workload_type: String,
    /// Canonical service name.
    #[serde(default)]
    pub canonical_name: String,
    /// Canonical revision.
    #[serde(default)]
    pub canonical_revision: String,
    /// Hostname (for workloads without IPs).
    #[serde(default)]
    pub hostname: String,
    /// Node.
    #[serde(default)]
    pub node: String,
    /// Native tunnel support.
    #[serde(default)]
    pub native_tunnel: bool,
    /// Application tunnel.
    #[serde(default)]
    pub application_tunnel: Option<ApplicationTunnel>,
    /// Waypoint serving this workload.
    #[serde(default)]
    pub waypoint: Option<GatewayAddress>,
    /// Network gateway.
    #[serde(default)]
    pub network_gateway: Option<GatewayAddress>,
    /// Policies selecting this workload (`ns/name`).
    #[serde(default)]
    pub authorization_policies: Vec<String>,
    /// Health.
    #[serde(default)]
    pub status: HealthStatus,
    /// Cluster id.
    #[serde(default)]
    pub cluster_id: String,
    /// Locality.
    #[serde(default)]
    pub locality: Option<Locality>,
    /// Relative capacity.
    #[serde(default)]
    pub capacity: Option<u32>,
    /// Services this workload backs: `ns/hostname` -> service port -> target port.
    #[serde(default)]
    pub services: BTreeMap<String, BTreeMap<u16, u16>>,
    /// Extension: the pod's network namespace, to enroll it without istio-cni.
    #[serde(default)]
    pub netns: Option<PathBuf>,
}

impl Workload {
    /// The SPIFFE identity its certificate carries.
    pub fn identity(&self) -> Identity {
        Identity {
            trust_domain: or_default(&self.trust_domain, DEFAULT_TRUST_DOMAIN),
            namespace: self.namespace.clone(),
            service_account: or_default(&self.service_account, "default"),
        }
    }

    /// The uid, or `<namespace>/<name>` when none was given.
    pub fn key(&self) -> String {
        if self.uid.is_empty() {
            format!("{}/{}", self.namespace, self.name)
        } else {
            self.uid.clone()
        }
    }
}

fn or_default(value: &str, default: &str) -> String {
    if value.is_empty() {
        default.to_string()
    } else {
        value.to_string()
    }
}

/// The address among `ips` of the same family as `like`, else the first.
pub fn address_like(ips: &[IpAddr], like: IpAddr) -> Option<IpAddr> {
    ips.iter()
        .find(|ip| ip.is_ipv4() == like.is_ipv4())
        .or_else(|| ips.first())
        .copied()
}
