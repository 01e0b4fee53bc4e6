//! What the agent sends `ztunnel-agent diagnose` (`GET /debug/diagnose`, JSON): plain facts
//! about the agent, its kernel links, each pod and its recent connections.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::accesslog::Outcome;
pub use crate::state::PodRef;
use crate::xds::client::XdsStatus;

/// The default counter window.
pub const DEFAULT_WINDOW: Duration = Duration::from_millis(1000);
/// Longest window the agent accepts (diagnose answers within 5 s).
pub const MAX_WINDOW: Duration = Duration::from_millis(3000);
/// Recent connections shown per pod.
pub const RECENT_SHOWN: usize = 5;

/// Everything the agent knows that bears on capture (`GET /debug/diagnose`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Evidence {
    /// Agent version.
    pub version: String,
    /// Node name.
    pub node: Option<String>,
    /// Readiness blockers left (empty: ready).
    pub not_ready: Vec<String>,
    /// Pin directory.
    pub pin_dir: String,
    /// The cgroup the capture programs should be attached to.
    pub cgroup: String,
    /// Its id (inode), as link info reports attachments.
    pub cgroup_id: Option<u64>,
    /// The cgroup programs' links.
    pub links: Vec<LinkEvidence>,
    /// Where the mesh configuration comes from (`xds <address>`, `local <path>`).
    pub config_source: String,
    /// The xDS stream, in control-plane mode.
    pub xds: Option<XdsStatus>,
    /// Certificates by identity.
    pub certificates: Vec<CertEvidence>,
    /// How long the capture counters were watched.
    pub window_ms: u64,
    /// Enrolled pods (all, or the one asked about).
    pub pods: Vec<PodEvidence>,
    /// The pod asked about, as the mesh state knows it.
    pub query: Option<QueryEvidence>,
    /// Pods out of capture because their workload left xDS (`namespace/name`).
    #[serde(default)]
    pub parked: Vec<String>,
}

/// A pinned link as the kernel reports it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkEvidence {
    /// Program (or `inbound-<cookie>`).
    pub name: String,
    /// Link id.
    pub id: Option<u32>,
    /// Program id.
    pub program_id: Option<u32>,
    /// Cgroup id or netns inode it is attached to (0: detached).
    pub attached_to: Option<u64>,
    /// Why it could not be read.
    pub error: Option<String>,
}

impl LinkEvidence {
    /// From a pinned link read.
    pub fn from_read(
        name: &str,
        read: &std::io::Result<crate::redirect::linkinfo::PinnedLinkInfo>,
    ) -> Self {
        use crate::redirect::linkinfo::Target;
        match read {
            Ok(info) => Self {
                name: name.to_string(),
                id: Some(info.id),
                program_id: Some(info.program_id),
                attached_to: match info.target {
                    Target::Cgroup(id) | Target::Netns(id) => Some(id),
                    Target::Other(_) => None,
                },
                error: None,
            },
            Err(e) => Self {
                name: name.to_string(),
                error: Some(e.to_string()),
                ..Default::default()
            },
        }
    }
}

/// A certificate's state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertEvidence {
    /// SPIFFE identity.
    pub identity: String,
    /// `Available`, `Initializing` or `Unavailable: <why>`.
    pub state: String,
    /// Expiry of the held certificate.
    pub not_after: Option<SystemTime>,
}

/// One listener of a pod.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerEvidence {
    /// Bound address.
    pub addr: SocketAddr,
    /// Its socket is in LISTEN state in the pod's socket table.
    pub listening: bool,
}

/// An enrolled pod.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodEvidence {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Uid.
    pub uid: String,
    /// Addresses.
    pub ips: Vec<IpAddr>,
    /// Netns cookie.
    pub netns_cookie: u64,
    /// Netns inode.
    pub netns_inode: u64,
    /// `zds` or `localconfig`.
    pub source: String,
    /// SPIFFE identity it serves with.
    pub identity: String,
    /// Whether the mesh state has its workload.
    pub workload_known: bool,
    /// Its cookie is in `ENROLLED_PODS`.
    pub map_enrolled: bool,
    /// Each address and the cookie `POD_ADDRS` maps it to.
    pub map_addresses: Vec<(IpAddr, Option<u64>)>,
    /// Families with a 15006 listener in `INBOUND_LISTENERS`.
    pub map_listener_families: Vec<String>,
    /// Its `sk_lookup` link.
    pub inbound_link: LinkEvidence,
    /// Its listeners.
    pub listeners: Vec<ListenerEvidence>,
    /// Why the socket table could not be read.
    pub listener_check_error: Option<String>,
    /// Capture counters at the start of the window.
    pub counters_before: BTreeMap<String, u64>,
    /// And at its end.
    pub counters_after: BTreeMap<String, u64>,
    /// Recent connections, newest last.
    pub recent: Vec<Outcome>,
    /// Recent failed connections, newest last.
    pub recent_failed: Vec<Outcome>,
    /// Its `ENROLLED_PODS` entry has DNS capture on.
    #[serde(default)]
    pub dns_capture: bool,
    /// Its DNS capture counters (kernel).
    #[serde(default)]
    pub dns_counters: BTreeMap<String, u64>,
}

/// The pod asked about.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryEvidence {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Its workload in the mesh state.
    pub workload: Option<WorkloadEvidence>,
}

/// A workload as the mesh state holds it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEvidence {
    /// Uid.
    pub uid: String,
    /// Node.
    pub node: String,
    /// HBONE or TCP.
    pub protocol: String,
    /// Addresses.
    pub ips: Vec<IpAddr>,
}

/// Parses `<namespace>/<pod>`.
pub fn parse_pod_ref(text: &str) -> Option<PodRef> {
    PodRef::parse(text)
}

/// Counters as a name -> value map.
pub fn counter_map(c: &ztunnel_common::PodCounters) -> BTreeMap<String, u64> {
    c.fields()
        .iter()
        .map(|(k, v)| ((*k).to_string(), *v))
        .collect()
}
