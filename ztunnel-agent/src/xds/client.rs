//! The delta ADS client: `envoy.service.discovery.v3.AggregatedDiscoveryService/
//! DeltaAggregatedResources` to istiod (or the development control plane), subscribed by
//! wildcard to `istio.workload.Address` and `istio.security.Authorization`.
//!
//! Each response is applied as a whole to a copy of the held resources: resources that do not
//! decode or convert are NACKed by name (`<name>: <problem>`, joined by `; `) while the others
//! apply; if the result contradicts itself (two workloads on one address) the whole response
//! is NACKed and the previous state stays. Every response is answered with its nonce. On
//! reconnect the held names and versions go out as `initial_resource_versions`, so the server
//! sends only what changed and names what was removed meanwhile. Reconnects back off from
//! 10 ms to 15 s. The stream never stops the agent: it keeps serving on its last state.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::convert;
use crate::proto::core::Node;
use crate::proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use crate::proto::rpc::Status;
use crate::state::policy::Authorization;
use crate::state::service::Service;
use crate::state::workload::Workload;
use crate::state::MeshState;
use crate::tls::grpc::Target;

/// Type URL of workloads and services.
pub const ADDRESS_TYPE: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of authorization policies.
pub const AUTHORIZATION_TYPE: &str = "type.googleapis.com/istio.security.Authorization";
/// The types subscribed to, in the order upstream sends the initial requests.
pub const TYPES: [&str; 2] = [ADDRESS_TYPE, AUTHORIZATION_TYPE];

const INITIAL_BACKOFF: Duration = Duration::from_millis(10);
const MAX_BACKOFF: Duration = Duration::from_secs(15);
/// gRPC status code INVALID_ARGUMENT, carried in NACKs.
const INVALID_ARGUMENT: i32 = 3;

/// Stream failures (the client retries them all).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The channel could not be built.
    #[error(transparent)]
    Channel(#[from] crate::tls::grpc::Error),
    /// The server ended or refused the stream.
    #[error("xDS stream to {address} failed: {status}")]
    Stream {
        /// Where.
        address: String,
        /// gRPC status.
        status: Box<tonic::Status>,
    },
}

/// The node identity sent to the control plane.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    /// `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`.
    pub id: String,
    /// Metadata: NAME, NAMESPACE, INSTANCE_IPS, NODE_NAME, CLUSTER_ID.
    pub metadata: BTreeMap<String, String>,
    /// Sent as the `clusterid` header, as upstream does.
    pub cluster_id: String,
}

impl NodeInfo {
    /// Upstream's node id and metadata from the agent's own pod facts.
    pub fn new(
        pod: Option<&str>,
        namespace: Option<&str>,
        ip: Option<std::net::IpAddr>,
        node: Option<&str>,
        cluster_id: &str,
    ) -> Self {
        let pod = pod.unwrap_or("ztunnel");
        let ns = namespace.unwrap_or("istio-system");
        // Upstream uses 1.1.1.1 when INSTANCE_IP is not set.
        let ip = ip.map_or_else(|| "1.1.1.1".to_string(), |i| i.to_string());
        let mut metadata = BTreeMap::from([
            ("NAME".to_string(), pod.to_string()),
            ("NAMESPACE".to_string(), ns.to_string()),
            ("INSTANCE_IPS".to_string(), ip.clone()),
            ("CLUSTER_ID".to_string(), cluster_id.to_string()),
        ]);
        if let Some(node) = node {
            metadata.insert("NODE_NAME".to_string(), node.to_string());
        }
        Self {
            id: format!("ztunnel~{ip}~{pod}.{ns}~{ns}.svc.cluster.local"),
            metadata,
            cluster_id: cluster_id.to_string(),
        }
    }

    fn to_proto(&self) -> Node {
        let fields = self
            .metadata
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StringValue(v.clone())),
                    },
                )
            })
            .collect();
        Node {
            id: self.id.clone(),
            metadata: Some(prost_types::Struct { fields }),
            ..Default::default()
        }
    }
}

/// Resources held, by type and name, with their versions.
#[derive(Clone, Debug, Default)]
struct Store {
    workloads: BTreeMap<String, Workload>,
    services: BTreeMap<String, Service>,
    policies: BTreeMap<String, Authorization>,
    versions: HashMap<String, BTreeMap<String, String>>,
}

enum Item {
    Workload(Box<Workload>),
    Service(Box<Service>),
    Policy(Box<Authorization>),
}

impl Store {
    /// Resources held, by type URL.
    fn counts(&self) -> BTreeMap<String, usize> {
        TYPES
            .iter()
            .map(|t| {
                let n = self.versions.get(*t).map_or(0, BTreeMap::len);
                ((*t).to_string(), n)
            })
            .collect()
    }

    fn insert(&mut self, type_url: &str, name: &str, version: &str, item: Item) {
        self.remove(type_url, name);
        match item {
            Item::Workload(w) => {
                self.workloads.insert(name.to_string(), *w);
            }
            Item::Service(s) => {
                self.services.insert(name.to_string(), *s);
            }
            Item::Policy(p) => {
                self.policies.insert(name.to_string(), *p);
            }
        }
        self.versions
            .entry(type_url.to_string())
            .or_default()
            .insert(name.to_string(), version.to_string());
    }

    fn remove(&mut self, type_url: &str, name: &str) {
        if type_url == ADDRESS_TYPE {
            self.workloads.remove(name);
            self.services.remove(name);
        } else {
            self.policies.remove(name);
        }
        if let Some(v) = self.versions.get_mut(type_url) {
            v.remove(name);
        }
    }

    fn build(&self) -> Result<MeshState, crate::state::Error> {
        MeshState::build(
            self.workloads.values().cloned().collect(),
            self.services.values().cloned().collect(),
            self.policies.values().cloned().collect(),
        )
    }
}

/// Longest resource name quoted whole in a NACK or a log line: a control plane (or whoever
/// speaks for it) may send names of any length.
const NAME_SHOWN: usize = 200;
/// Problems listed one by one in a NACK; the rest are counted.
const PROBLEMS_LISTED: usize = 20;

/// `name`, cut to [`NAME_SHOWN`] characters (saying how long it was) when longer.
pub fn shown_name(name: &str) -> String {
    crate::telemetry::cut(name, NAME_SHOWN)
}

/// Longest problem quoted whole in a NACK (the rest of it is cut and counted).
const PROBLEM_SHOWN: usize = 1000;

/// The first [`PROBLEMS_LISTED`] of `problems`, each cut to [`PROBLEM_SHOWN`] characters, then
/// how many more there were: whatever the control plane sent, a NACK (and its log line) stays
/// under about 20 KB.
fn listed(problems: &[String]) -> String {
    let mut message = problems
        .iter()
        .take(PROBLEMS_LISTED)
        .map(|p| crate::telemetry::cut(p, PROBLEM_SHOWN))
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > PROBLEMS_LISTED {
        message.push_str(&format!("; and {} more", problems.len() - PROBLEMS_LISTED));
    }
    message
}

/// Decodes and converts one resource body of `type_url` as a subscription response would (the
/// fuzz targets' entry): `Err` says what is wrong, as the NACK would.
pub fn check_resource(type_url: &str, body: &[u8]) -> Result<(), String> {
    let resource = Resource {
        resource: Some(prost_types::Any {
            type_url: type_url.to_string(),
            value: body.to_vec(),
        }),
        ..Default::default()
    };
    decode(type_url, &resource).map(|_| ())
}

fn decode(type_url: &str, resource: &Resource) -> Result<Item, String> {
    let any = resource
        .resource
        .as_ref()
        .ok_or("the resource has no body (only removals may be empty)")?;
    if any.type_url != type_url {
        return Err(format!(
            "body is a {}, not the subscribed {type_url}",
            any.type_url
        ));
    }
    if type_url == ADDRESS_TYPE {
        let address = crate::proto::workload::Address::decode(any.value.as_slice())
            .map_err(|e| format!("does not decode as istio.workload.Address: {e}"))?;
        match address.r#type {
            Some(crate::proto::workload::address::Type::Workload(w)) => convert::workload(&w)
                .map(|w| Item::Workload(Box::new(w)))
                .map_err(|e| e.to_string()),
            Some(crate::proto::workload::address::Type::Service(s)) => convert::service(&s)
                .map(|s| Item::Service(Box::new(s)))
                .map_err(|e| e.to_string()),
            None => Err("Address holds neither a workload nor a service".into()),
        }
    } else {
        let policy = crate::proto::security::Authorization::decode(any.value.as_slice())
            .map_err(|e| format!("does not decode as istio.security.Authorization: {e}"))?;
        convert::authorization(&policy)
            .map(|p| Item::Policy(Box::new(p)))
            .map_err(|e| e.to_string())
    }
}

/// What an operator needs to know about the stream (served to `diagnose`).
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct XdsStatus {
    /// The control plane's address.
    pub address: String,
    /// Whether a stream is established now.
    pub connected: bool,
    /// When the current stream was established, or the last one ended.
    pub since: Option<SystemTime>,
    /// Types whose first response has been applied.
    pub synced_types: Vec<String>,
    /// Responses received since start.
    pub responses: u64,
    /// Why the last stream ended (kept after a reconnect).
    pub last_error: Option<String>,
    /// The last NACK sent: `<type URL>: <message>`.
    pub last_nack: Option<String>,
    /// When it was sent.
    pub last_nack_at: Option<SystemTime>,
    /// Resources held, by type URL.
    pub resources: BTreeMap<String, usize>,
}

/// A shared, readable view of an [`XdsClient`]'s status.
#[derive(Clone, Debug, Default)]
pub struct XdsStatusHandle(Arc<Mutex<XdsStatus>>);

impl XdsStatusHandle {
    /// A copy of the current status.
    pub fn get(&self) -> XdsStatus {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, XdsStatus> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The delta ADS client.
pub struct XdsClient {
    target: Target,
    node: NodeInfo,
    store: Store,
    /// Types whose first response has been applied.
    synced_types: BTreeSet<String>,
    /// What `diagnose` reads.
    status: XdsStatusHandle,
    /// Receives each new state.
    on_state: Box<dyn Fn(MeshState) + Send + Sync>,
    /// Signalled once every type has had its first response applied.
    synced: Option<tokio::sync::oneshot::Sender<()>>,
}

impl XdsClient {
    /// A client for `target`; `on_state` receives every new state.
    pub fn new(
        target: Target,
        node: NodeInfo,
        on_state: Box<dyn Fn(MeshState) + Send + Sync>,
        synced: tokio::sync::oneshot::Sender<()>,
    ) -> Self {
        let status = XdsStatusHandle::default();
        status.lock().address = target.authority.clone();
        Self {
            target,
            node,
            store: Store::default(),
            synced_types: BTreeSet::new(),
            status,
            on_state,
            synced: Some(synced),
        }
    }

    /// The status handle (it stays readable after the client moves into its task).
    pub fn status(&self) -> XdsStatusHandle {
        self.status.clone()
    }

    /// Runs until cancelled, reconnecting with backoff.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let mut progressed = false;
            let result = tokio::select! {
                r = self.stream_once(&mut progressed) => r,
                _ = cancel.cancelled() => return,
            };
            let reason = match &result {
                Ok(()) => "Complete",
                Err(Error::Stream { status, .. })
                    if status.code() == tonic::Code::Unavailable && !progressed =>
                {
                    "ConnectionError"
                }
                Err(_) => "Error",
            };
            crate::metrics::global().xds_terminated(reason);
            {
                let mut status = self.status.lock();
                status.connected = false;
                status.since = Some(SystemTime::now());
                status.last_error = Some(match &result {
                    Ok(()) => "stream closed by the server".to_string(),
                    Err(e) => crate::telemetry::ErrorChain(e).to_string(),
                });
            }
            match result {
                Ok(()) => {
                    tracing::warn!(address = %self.target.authority, "xDS stream closed by the server; reconnecting")
                }
                Err(e) => {
                    tracing::warn!(error = %crate::telemetry::ErrorChain(&e), retry_in = ?backoff, "xDS stream failed; serving the last state and reconnecting");
                }
            }
            if progressed {
                backoff = INITIAL_BACKOFF;
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = cancel.cancelled() => return,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    async fn stream_once(&mut self, progressed: &mut bool) -> Result<(), Error> {
        let address = self.target.authority.clone();
        let stream_err = |status| Error::Stream {
            address: address.clone(),
            status: Box::new(status),
        };
        let mut client = AggregatedDiscoveryServiceClient::new(self.target.channel()?)
            .max_decoding_message_size(200 * 1024 * 1024);
        let (tx, rx) = mpsc::unbounded_channel();
        let node = self.node.to_proto();
        for type_url in TYPES {
            let versions = self
                .store
                .versions
                .get(type_url)
                .cloned()
                .unwrap_or_default();
            let request = DeltaDiscoveryRequest {
                node: Some(node.clone()),
                type_url: type_url.to_string(),
                initial_resource_versions: versions.into_iter().collect(),
                ..Default::default()
            };
            // The receiver lives until the end of this function.
            let _ = tx.send(request);
        }
        let requests = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        let mut request = tonic::Request::new(requests);
        self.target.authorize(&mut request);
        if let Ok(v) = self.node.cluster_id.parse() {
            request.metadata_mut().insert("clusterid", v);
        }
        let mut responses = client
            .delta_aggregated_resources(request)
            .await
            .map_err(stream_err)?
            .into_inner();
        tracing::info!(address = %self.target.authority, node = %self.node.id, "xDS stream established");
        {
            let mut status = self.status.lock();
            status.connected = true;
            status.since = Some(SystemTime::now());
        }
        while let Some(response) = responses.message().await.map_err(stream_err)? {
            *progressed = true;
            let ack = self.handle(response);
            if tx.send(ack).is_err() {
                break;
            }
        }
        Ok(())
    }

    /// Applies one response; returns its ACK or NACK.
    fn handle(&mut self, response: DeltaDiscoveryResponse) -> DeltaDiscoveryRequest {
        let type_url = response.type_url.clone();
        // What the control plane sent, as logged: cut (it may be of any length).
        let (shown_type, shown_nonce) = (shown_name(&type_url), shown_name(&response.nonce));
        // Upstream counts the resources' payload bytes (not the envelope) per response.
        let payload: usize = response
            .resources
            .iter()
            .filter_map(|r| r.resource.as_ref())
            .map(|any| any.value.len())
            .sum();
        crate::metrics::global().xds_received(&type_url, payload);
        let mut errors = Vec::new();
        if !TYPES.contains(&type_url.as_str()) {
            errors.push(format!("type {shown_type} was not subscribed to"));
        } else {
            let mut next = self.store.clone();
            for resource in &response.resources {
                match decode(&type_url, resource) {
                    Ok(item) => next.insert(&type_url, &resource.name, &resource.version, item),
                    Err(problem) => {
                        errors.push(format!("{}: {problem}", shown_name(&resource.name)))
                    }
                }
            }
            for name in &response.removed_resources {
                next.remove(&type_url, name);
            }
            match next.build() {
                Ok(state) => {
                    self.store = next;
                    tracing::info!(
                        type_url = %type_url,
                        updated = response.resources.len() - errors.len(),
                        removed = response.removed_resources.len(),
                        rejected = errors.len(),
                        "xDS update applied"
                    );
                    (self.on_state)(state);
                    self.mark_synced(&type_url);
                }
                Err(e) => {
                    errors.clear();
                    errors.push(format!(
                        "response refused as a whole, previous state kept: {e}"
                    ));
                }
            }
        }
        {
            let mut status = self.status.lock();
            status.responses += 1;
            status.synced_types = self.synced_types.iter().cloned().collect();
            status.resources = self.store.counts();
            if !errors.is_empty() {
                status.last_nack = Some(format!("{shown_type}: {}", listed(&errors)));
                status.last_nack_at = Some(SystemTime::now());
            }
        }
        let error_detail = (!errors.is_empty()).then(|| {
            let message = listed(&errors);
            tracing::error!(type_url = %shown_type, nonce = %shown_nonce, error = %message, "xDS resources rejected (NACK)");
            Status {
                code: INVALID_ARGUMENT,
                message,
                details: Vec::new(),
            }
        });
        DeltaDiscoveryRequest {
            type_url,
            response_nonce: response.nonce,
            error_detail,
            ..Default::default()
        }
    }

    fn mark_synced(&mut self, type_url: &str) {
        self.synced_types.insert(type_url.to_string());
        if TYPES.iter().all(|t| self.synced_types.contains(*t)) {
            if let Some(tx) = self.synced.take() {
                tracing::info!("xDS initial sync complete");
                let _ = tx.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_and_many_problems_are_cut() {
        assert_eq!(shown_name("default/reviews"), "default/reviews");
        let long = "é".repeat(1000);
        let shown = shown_name(&long);
        assert!(shown.starts_with(&"é".repeat(NAME_SHOWN)), "{shown}");
        assert!(shown.ends_with("... (2000 bytes)"), "{shown}");
        let problems: Vec<String> = (0..25).map(|i| format!("r{i}: bad")).collect();
        let message = listed(&problems);
        assert!(message.starts_with("r0: bad; r1: bad"), "{message}");
        assert!(message.contains("r19: bad; and 5 more"), "{message}");
        assert!(!message.contains("r20"), "{message}");
        assert_eq!(listed(&problems[..2]), "r0: bad; r1: bad");
        let huge = vec!["x".repeat(1 << 20); 30];
        let message = listed(&huge);
        assert!(message.len() < 25_000, "{} bytes", message.len());
        assert!(
            message.ends_with("... (1048576 bytes); and 10 more"),
            "{}",
            &message[message.len() - 60..]
        );
    }
}
