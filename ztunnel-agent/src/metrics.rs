//! Prometheus metrics on 15020: Istio's `istio_tcp_*` connection metrics with Istio's labels
//! in Istio's order. A connection's labels come from its access-log record; its byte counters
//! move as bytes move (see `proxy::connection`), and when the connection ends the log's totals
//! equal what the counters gained.

mod process;
mod runtime;
pub mod series;

use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabel, EncodeLabelSet, EncodeMetric, LabelSetEncoder,
};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};
use ztunnel_common::PodCounters;

use crate::accesslog::{ConnectionRecord, Direction, Peer};
use series::{Admitted, Eviction, Purpose, Series};

/// Istio's TCP metric labels, in Istio's order.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    reporter: &'static str,
    source_workload: String,
    source_canonical_service: String,
    source_canonical_revision: String,
    source_workload_namespace: String,
    source_principal: String,
    source_app: String,
    source_version: String,
    source_cluster: String,
    destination_service: String,
    destination_service_namespace: String,
    destination_service_name: String,
    destination_workload: String,
    destination_canonical_service: String,
    destination_canonical_revision: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_app: String,
    destination_version: String,
    destination_cluster: String,
    request_protocol: &'static str,
    response_flags: &'static str,
    connection_security_policy: &'static str,
    #[prometheus(flatten)]
    locality: LocalityLabels,
}

/// `source_region`, `source_zone`, `destination_region`, `destination_zone`: present (with
/// `unknown` for an unknown side) when either side's workload is known, absent otherwise,
/// as upstream writes them.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
struct LocalityLabels(Option<Box<[String; 4]>>);

impl LocalityLabels {
    fn of(src: &Peer, dst: &Peer) -> Self {
        if src.detail.is_none() && dst.detail.is_none() {
            return Self(None);
        }
        let part = |p: &Peer, zone: bool| {
            or_unknown(
                p.detail
                    .as_deref()
                    .and_then(|w| w.locality.as_ref())
                    .map(|l| {
                        if zone {
                            l.zone.as_str()
                        } else {
                            l.region.as_str()
                        }
                    }),
            )
        };
        Self(Some(Box::new([
            part(src, false),
            part(src, true),
            part(dst, false),
            part(dst, true),
        ])))
    }
}

impl EncodeLabelSet for LocalityLabels {
    fn encode(&self, mut encoder: LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let Some(values) = &self.0 else {
            return Ok(());
        };
        let keys = [
            "source_region",
            "source_zone",
            "destination_region",
            "destination_zone",
        ];
        for (key, value) in keys.iter().zip(values.iter()) {
            (*key, value.as_str()).encode(encoder.encode_label())?;
        }
        Ok(())
    }
}

/// Istio's response flag for a connection: `-` when it succeeded, else why it failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ResponseFlag {
    /// No failure.
    None,
    /// Denied by authorization policy.
    Deny,
    /// The upstream connection failed (or anything not named below).
    Connect,
    /// The TLS handshake failed.
    TlsFailure,
    /// HTTP/2 failed.
    H2HandshakeFailure,
    /// The peer's identity was unusable.
    IdentityError,
}

impl ResponseFlag {
    /// As Istio's `response_flags` label writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::None => "-",
            ResponseFlag::Deny => "DENY",
            ResponseFlag::Connect => "CONNECT",
            ResponseFlag::TlsFailure => "TLS_FAILURE",
            ResponseFlag::H2HandshakeFailure => "H2_HANDSHAKE_FAILURE",
            ResponseFlag::IdentityError => "IDENTITY_ERROR",
        }
    }
}

/// The labels an established connection was counted opened with, and whether its label set
/// was admitted (at the series limit a new set is not counted; see [`series`]).
#[derive(Debug)]
pub struct Opened {
    labels: Arc<TcpLabels>,
    counted: bool,
}

/// An established connection's metric handles: its labels (as counted opened) and the two
/// byte counters it increments as bytes move.
#[derive(Debug)]
pub struct OpenedConnection {
    /// How it was counted opened (for [`Metrics::closed`]).
    pub opened: Opened,
    /// `istio_tcp_sent_bytes_total` for this connection's labels.
    pub sent: Counter,
    /// `istio_tcp_received_bytes_total` for this connection's labels.
    pub received: Counter,
}

/// Build information labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    tag: String,
}

/// Why an xDS stream ended (upstream's reasons).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TerminationLabels {
    reason: &'static str,
}

/// An xDS type URL.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UrlLabels {
    url: String,
}

/// Why a DNS question was refused.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DnsRejectedLabels {
    reason: &'static str,
}

/// Labels of the `istio_dns_*` families (upstream's).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    /// `a`, `aaaa`, ... (`other` for types outside the usual set, `unknown` without one).
    pub request_query_type: &'static str,
    /// `udp` or `tcp`.
    pub request_protocol: &'static str,
    /// The asking workload's canonical service (`unknown` when not known).
    pub source_canonical_service: String,
    /// Its canonical revision.
    pub source_canonical_revision: String,
}

/// The `istio_dns_*` families.
#[derive(Debug)]
struct DnsMetrics {
    requests: Family<DnsLabels, Counter>,
    upstream_requests: Family<DnsLabels, Counter>,
    upstream_failures: Family<DnsLabels, Counter>,
    upstream_duration: Family<DnsLabels, Histogram, fn() -> Histogram>,
    rejected: Family<DnsRejectedLabels, Counter>,
}

/// Why an accept failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AcceptErrorLabels {
    error: &'static str,
}

/// The limits of `proxy::Limits` that refuse work visibly: the `limit` label of
/// `ztunnel_limit_refusals_total`, each exported from the start.
pub const LIMIT_NAMES: [&str; 4] = [
    "connections_per_pod",
    "handshakes_per_peer",
    "streams_per_peer",
    "pending_connects_per_peer",
];

/// A limit that refused work.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: &'static str,
}

/// How a plain passthrough connection's bytes moved: the `relay` label of
/// `ztunnel_passthrough_connections_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassthroughRelay {
    /// Both directions handed to the kernel relay.
    Kernel,
    /// One direction: the kernel refused the other socket.
    KernelOneWay,
    /// Spliced by the agent from start to end.
    Splice,
}

impl PassthroughRelay {
    /// Every value, each exported from the start.
    pub const ALL: [Self; 3] = [Self::Kernel, Self::KernelOneWay, Self::Splice];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::KernelOneWay => "kernel_one_way",
            Self::Splice => "splice",
        }
    }
}

/// How one passthrough connection's bytes moved.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RelayLabels {
    relay: &'static str,
}

/// The pod whose application saw its own address instead of a client's.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    pod: String,
    namespace: String,
}

/// `istio_tcp_sockets_open`'s one label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SocketLabels {
    reporter: &'static str,
}

/// Istio's `reporter` label for a connection's direction.
fn reporter(direction: Direction) -> &'static str {
    match direction {
        Direction::Outbound => "source",
        Direction::Inbound => "destination",
    }
}

/// An accepted socket, counted in `istio_tcp_sockets_open` until dropped (upstream counts
/// the sockets its listeners accepted: outbound connections as `source`, HBONE and plaintext
/// inbound ones as `destination`).
#[derive(Debug)]
pub struct OpenSocket(Gauge);

impl Drop for OpenSocket {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Reads every enrolled pod's kernel counters: (pod, namespace, counters).
pub type PodCountersSource = Arc<dyn Fn() -> Vec<(String, String, PodCounters)> + Send + Sync>;

/// Labels of the per-pod capture counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RedirectLabels {
    pod: String,
    namespace: String,
    event: &'static str,
}

/// Exposes the eBPF per-pod counters, read from the kernel at scrape time, as
/// `ztunnel_redirect_events_total{pod,namespace,event}`: "traffic redirection may not be
/// working" is visible without logs (captured vs skipped, and why).
#[derive(Clone, Default)]
struct RedirectCollector(Arc<OnceLock<PodCountersSource>>);

impl std::fmt::Debug for RedirectCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedirectCollector")
    }
}

impl Collector for RedirectCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let pods = self.0.get().map(|source| source()).unwrap_or_default();
        let mut family = encoder.encode_descriptor(
            "ztunnel_redirect_events",
            "Kernel capture decisions per enrolled pod (eBPF counters)",
            None,
            MetricType::Counter,
        )?;
        for (pod, namespace, counters) in pods {
            for (event, value) in counters.fields() {
                let labels = RedirectLabels {
                    pod: pod.clone(),
                    namespace: namespace.clone(),
                    event,
                };
                ConstCounter::new(value).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The `istio_tcp_*` label sets in use, shared with the collector that reports them, each
/// with its counters.
type TcpSeries = Arc<Mutex<Series<TcpLabels, Arc<TcpCounters>>>>;

/// One label set's counter in each `istio_tcp_*` family, taken from the family the first
/// time the set counts there (a family shows a set only once it counted in it): a known
/// set's connections count without hashing its 27 labels again for every family.
#[derive(Debug, Default)]
struct TcpCounters {
    opened: OnceLock<Counter>,
    closed: OnceLock<Counter>,
    failed: OnceLock<Counter>,
    sent: OnceLock<Counter>,
    received: OnceLock<Counter>,
}

/// The counter of `labels` in `family`, kept in `slot`.
fn counter<'c>(
    slot: &'c OnceLock<Counter>,
    family: &Family<TcpLabels, Counter>,
    labels: &TcpLabels,
) -> &'c Counter {
    slot.get_or_init(|| family.get_or_create(labels).clone())
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EvictionLabels {
    reason: &'static str,
}

/// `ztunnel_metric_series*`: how many `istio_tcp_*` label sets are live, the bound, and what
/// eviction and the bound did.
#[derive(Debug)]
struct SeriesCollector(TcpSeries);

impl Collector for SeriesCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (live, limit, idle, limit_evicted, refused) = {
            let s = self.0.lock().unwrap_or_else(|p| p.into_inner());
            (
                s.len(),
                s.limit(),
                s.evicted(Eviction::Idle),
                s.evicted(Eviction::Limit),
                s.refused(),
            )
        };
        let live_family = encoder.encode_descriptor(
            "ztunnel_metric_series",
            "Label sets of the istio_tcp_* families currently held (a set is one series in each family that counted under it)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(live as i64).encode(live_family)?;
        let limit_family = encoder.encode_descriptor(
            "ztunnel_metric_series_limit",
            "The bound on istio_tcp_* label sets (METRICS_MAX_SERIES)",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(limit as i64).encode(limit_family)?;
        let mut evicted = encoder.encode_descriptor(
            "ztunnel_metric_series_evicted",
            "istio_tcp_* label sets removed: idle (no connection for METRICS_SERIES_IDLE_TIMEOUT and its workloads deleted) or limit (the oldest idle set made room)",
            None,
            MetricType::Counter,
        )?;
        for (reason, value) in [(Eviction::Idle, idle), (Eviction::Limit, limit_evicted)] {
            let labels = EvictionLabels {
                reason: reason.as_str(),
            };
            ConstCounter::new(value).encode(evicted.encode_family(&labels)?)?;
        }
        let refused_family = encoder.encode_descriptor(
            "ztunnel_metric_series_refused",
            "Connections (opened or failed) not counted in istio_tcp_* because every label set was in use at the limit (the connections themselves are unaffected)",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(refused).encode(refused_family)?;
        Ok(())
    }
}

/// The label-set bound when not configured (see `METRICS_MAX_SERIES`).
pub const DEFAULT_MAX_SERIES: usize = 10_000;
/// How long a label set of deleted workloads stays after its last connection (see
/// `METRICS_SERIES_IDLE_TIMEOUT`): longer than Prometheus' staleness window, so the final
/// values are scraped.
pub const DEFAULT_SERIES_IDLE: Duration = Duration::from_secs(600);

/// `workload_manager_*` (upstream's in-pod proxy counts, no `istio_` prefix).
#[derive(Debug, Default)]
struct WorkloadManager {
    active: Gauge,
    pending: Gauge,
    started: Counter,
    stopped: Counter,
}

/// The agent's metrics.
pub struct Metrics {
    pod_counters: Arc<OnceLock<PodCountersSource>>,
    runtime: Arc<OnceLock<tokio::runtime::Handle>>,
    build: Family<BuildLabels, Gauge>,
    registry: Registry,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    failed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    series: TcpSeries,
    sockets: Family<SocketLabels, Gauge>,
    xds_terminations: Family<TerminationLabels, Counter>,
    xds_messages: Family<UrlLabels, Counter>,
    xds_bytes: Family<UrlLabels, Counter>,
    workload_manager: WorkloadManager,
    accept_errors: Family<AcceptErrorLabels, Counter>,
    source_fallbacks: Family<PodLabels, Counter>,
    limit_refusals: Family<LimitLabels, Counter>,
    passthrough_relays: Family<RelayLabels, Counter>,
    relay_handbacks: Counter,
    dns: DnsMetrics,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

static METRICS: OnceLock<Metrics> = OnceLock::new();

/// The process-wide metrics (one registry, as one /metrics endpoint serves them).
pub fn global() -> &'static Metrics {
    METRICS.get_or_init(Metrics::new)
}

fn or_unknown(s: Option<&str>) -> String {
    match s {
        Some(v) if !v.is_empty() => v.to_string(),
        _ => "unknown".to_string(),
    }
}

struct Side {
    workload: String,
    canonical_service: String,
    canonical_revision: String,
    namespace: String,
    principal: String,
    cluster: String,
}

fn side(peer: &Peer) -> Side {
    let detail = peer.detail.as_deref();
    let workload = detail
        .map(|w| w.workload_name.as_str())
        .filter(|n| !n.is_empty())
        .or(peer.workload.as_deref());
    Side {
        workload: or_unknown(workload),
        canonical_service: or_unknown(detail.map(|w| w.canonical_name.as_str())),
        canonical_revision: or_unknown(detail.map(|w| w.canonical_revision.as_str())),
        namespace: or_unknown(peer.namespace.as_deref()),
        principal: or_unknown(peer.identity.as_ref().map(|i| i.to_string()).as_deref()),
        cluster: or_unknown(detail.map(|w| w.cluster_id.as_str())),
    }
}

/// The workload uids (source, destination) a connection's label set stands for.
fn workload_uids(record: &ConnectionRecord) -> [Option<std::borrow::Cow<'_, str>>; 2] {
    [&record.src, &record.dst].map(|p| {
        p.detail.as_deref().map(|w| match w.uid.as_str() {
            // The mesh state's key for a workload without a uid.
            "" => std::borrow::Cow::Owned(w.key()),
            uid => std::borrow::Cow::Borrowed(uid),
        })
    })
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(process::ProcessCollector));
        let runtime = runtime::RuntimeCollector::default();
        registry.register_collector(Box::new(runtime.clone()));

        // istio_*: upstream's names, types, help and labels (prometheus-client appends
        // `_total` to counter samples and a period to help texts).
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                component: "ztunnel",
                tag: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        registry.register("istio_build", "Istio component build info", build.clone());
        let xds_terminations = Family::<TerminationLabels, Counter>::default();
        // Every reason starts at zero, so the first termination of a kind moves rate() (a
        // series born at 1 shows no increase to Prometheus).
        for reason in ["ConnectionError", "Error", "Reconnect", "Complete"] {
            drop(xds_terminations.get_or_create(&TerminationLabels { reason }));
        }
        registry.register(
            "istio_xds_connection_terminations",
            "The total number of completed connections to xds server (unstable)",
            xds_terminations.clone(),
        );
        let xds_messages = Family::<UrlLabels, Counter>::default();
        registry.register(
            "istio_xds_message",
            "Total number of messages received (unstable)",
            xds_messages.clone(),
        );
        let xds_bytes = Family::<UrlLabels, Counter>::default();
        registry.register_with_unit(
            "istio_xds_message",
            "Total number of bytes received (unstable)",
            Unit::Bytes,
            xds_bytes.clone(),
        );
        let tcp = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<TcpLabels, Counter>::default();
            registry.register(name, help, family.clone());
            family
        };
        let opened = tcp(
            &mut registry,
            "istio_tcp_connections_opened",
            "The total number of TCP connections opened",
        );
        let closed = tcp(
            &mut registry,
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed",
        );
        let received = tcp(
            &mut registry,
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
        );
        let sent = tcp(
            &mut registry,
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
        );
        let failed = tcp(
            &mut registry,
            "istio_tcp_connections_failed",
            "The total number of TCP connections that failed to establish (unstable)",
        );
        let sockets = Family::<SocketLabels, Gauge>::default();
        registry.register(
            "istio_tcp_sockets_open",
            "The current number of open TCP sockets (unstable)",
            sockets.clone(),
        );

        let workload_manager = WorkloadManager::default();
        registry.register(
            "workload_manager_active_proxy_count",
            "The total number current workloads with active proxies (unstable)",
            workload_manager.active.clone(),
        );
        registry.register(
            "workload_manager_pending_proxy_count",
            "The total number current workloads with pending proxies (unstable)",
            workload_manager.pending.clone(),
        );
        registry.register(
            "workload_manager_proxies_started",
            "The total number of proxies that were started (unstable)",
            workload_manager.started.clone(),
        );
        registry.register(
            "workload_manager_proxies_stopped",
            "The total number of proxies that were stopped (unstable)",
            workload_manager.stopped.clone(),
        );

        // ztunnel_*: this agent's own.
        let redirect = RedirectCollector::default();
        let pod_counters = redirect.0.clone();
        registry.register_collector(Box::new(redirect));
        let accept_errors = Family::<AcceptErrorLabels, Counter>::default();
        registry.register(
            "ztunnel_accept_errors",
            "Failed accepts on the pods' listeners, by errno (EMFILE: the agent is out of file descriptors)",
            accept_errors.clone(),
        );
        let limit_refusals = Family::<LimitLabels, Counter>::default();
        for limit in LIMIT_NAMES {
            drop(limit_refusals.get_or_create(&LimitLabels { limit }));
        }
        registry.register(
            "ztunnel_limit_refusals",
            "Connections and HBONE streams refused because a pod reached a limit, by limit (connections_per_pod, handshakes_per_peer, streams_per_peer, pending_connects_per_peer); the access log names the pod",
            limit_refusals.clone(),
        );
        let passthrough_relays = Family::<RelayLabels, Counter>::default();
        for relay in PassthroughRelay::ALL {
            drop(passthrough_relays.get_or_create(&RelayLabels {
                relay: relay.as_str(),
            }));
        }
        registry.register(
            "ztunnel_passthrough_connections",
            "Plain passthrough connections (outbound outside the mesh, inbound plaintext) by how their bytes moved: kernel (spliced at first, then, once interactive, both directions relayed by the kernel), kernel_one_way (the kernel refused one socket, the agent spliced that direction), splice (spliced to the end: bulk or short from the start, ZTUNNEL_KERNEL_RELAY off, the kernel refused, or the relay failed to load and the agent's log said why at start)",
            passthrough_relays.clone(),
        );
        let relay_handbacks = Counter::default();
        registry.register(
            "ztunnel_passthrough_relay_handbacks",
            format!("Directions of kernel-relayed passthrough connections handed back to the agent because their destination did not keep up (more than {} MiB waiting for it): the agent copies the rest, under TCP's flow control", ztunnel_common::RELAY_BOUND >> 20),
            relay_handbacks.clone(),
        );
        let source_fallbacks = Family::<PodLabels, Counter>::default();
        registry.register(
            "ztunnel_source_address_fallbacks",
            "Connections to a pod's application that carry the pod's own address instead of the client's, because the kernel refused (the agent's log says why, once per pod)",
            source_fallbacks.clone(),
        );
        let dns_counter = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<DnsLabels, Counter>::default();
            registry.register(name, help, family.clone());
            family
        };
        let upstream_duration: Family<DnsLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(|| Histogram::new([0.0005, 0.001, 0.01, 0.1, 1.0, 5.0]));
        let dns = DnsMetrics {
            requests: dns_counter(
                &mut registry,
                "istio_dns_requests",
                "Total number of DNS requests (unstable)",
            ),
            upstream_requests: dns_counter(
                &mut registry,
                "istio_dns_upstream_requests",
                "Total number of DNS requests forwarded to upstream (unstable)",
            ),
            upstream_failures: dns_counter(
                &mut registry,
                "istio_dns_upstream_failures",
                "Total number of DNS requests that failed to forward upstream (unstable)",
            ),
            upstream_duration: upstream_duration.clone(),
            rejected: Family::default(),
        };
        registry.register_with_unit(
            "istio_dns_upstream_request_duration",
            "Total time in seconds Istio takes to get DNS response from upstream (unstable)",
            Unit::Seconds,
            upstream_duration,
        );
        registry.register(
            "ztunnel_dns_rejected",
            "DNS questions the proxy refused, by reason (malformed, not_a_query, truncated, too_many_in_flight, too_many_tcp_connections)",
            dns.rejected.clone(),
        );
        let series: TcpSeries = Arc::new(Mutex::new(Series::new(
            DEFAULT_MAX_SERIES,
            DEFAULT_SERIES_IDLE,
        )));
        registry.register_collector(Box::new(SeriesCollector(series.clone())));
        Self {
            pod_counters,
            runtime: runtime.0,
            build,
            registry,
            opened,
            closed,
            failed,
            sent,
            received,
            series,
            sockets,
            xds_terminations,
            xds_messages,
            xds_bytes,
            workload_manager,
            accept_errors,
            source_fallbacks,
            limit_refusals,
            passthrough_relays,
            relay_handbacks,
            dns,
        }
    }

    /// Counts a DNS question (`istio_dns_requests_total`).
    pub fn dns_request(&self, labels: &DnsLabels) {
        self.dns.requests.get_or_create(labels).inc();
    }

    /// Counts a DNS question forwarded to a resolver.
    pub fn dns_upstream_request(&self, labels: &DnsLabels) {
        self.dns.upstream_requests.get_or_create(labels).inc();
    }

    /// Counts a DNS question that could not be forwarded.
    pub fn dns_upstream_failure(&self, labels: &DnsLabels) {
        self.dns.upstream_failures.get_or_create(labels).inc();
    }

    /// Records how long a forwarded question took.
    pub fn dns_upstream_duration(&self, labels: &DnsLabels, took: Duration) {
        self.dns
            .upstream_duration
            .get_or_create(labels)
            .observe(took.as_secs_f64());
    }

    /// Counts a refused DNS question.
    pub fn dns_rejected(&self, reason: &'static str) {
        self.dns
            .rejected
            .get_or_create(&DnsRejectedLabels { reason })
            .inc();
    }

    /// Counts a failed accept (`EMFILE`, `ENFILE`, `ENOMEM`, `other`).
    pub fn accept_failed(&self, error: &'static str) {
        self.accept_errors
            .get_or_create(&AcceptErrorLabels { error })
            .inc();
    }

    /// Counts a connection to `pod`'s application that could not carry its client's address.
    pub fn source_address_fallback(&self, pod: &str, namespace: &str) {
        self.source_fallbacks
            .get_or_create(&PodLabels {
                pod: pod.to_string(),
                namespace: namespace.to_string(),
            })
            .inc();
    }

    /// Counts a connection a limit refused.
    pub fn limit_refusal(&self, limit: &'static str) {
        self.limit_refusals
            .get_or_create(&LimitLabels { limit })
            .inc();
    }

    /// Counts a passthrough connection by how its bytes moved.
    pub fn passthrough_relay(&self, relay: PassthroughRelay) {
        self.passthrough_relays
            .get_or_create(&RelayLabels {
                relay: relay.as_str(),
            })
            .inc();
    }

    /// Counts a kernel-relayed direction handed back to the agent.
    pub fn relay_handback(&self) {
        self.relay_handbacks.inc();
    }

    /// Kernel-relayed directions handed back so far.
    #[cfg(test)]
    pub fn relay_handbacks(&self) -> u64 {
        self.relay_handbacks.get()
    }

    /// Passthrough connections counted so far under `relay`.
    #[cfg(test)]
    pub fn passthrough_relays(&self, relay: PassthroughRelay) -> u64 {
        self.passthrough_relays
            .get_or_create(&RelayLabels {
                relay: relay.as_str(),
            })
            .get()
    }

    /// Forgets a pod's fallback count (the pod left this agent).
    pub fn forget_source_address_fallbacks(&self, pod: &str, namespace: &str) {
        self.source_fallbacks.remove(&PodLabels {
            pod: pod.to_string(),
            namespace: namespace.to_string(),
        });
    }

    /// Counts a socket a pod's listener accepted, until the returned guard is dropped.
    pub fn socket_opened(&self, direction: Direction) -> OpenSocket {
        let gauge = self
            .sockets
            .get_or_create(&SocketLabels {
                reporter: reporter(direction),
            })
            .clone();
        gauge.inc();
        OpenSocket(gauge)
    }

    /// Counts an xDS stream that ended (`ConnectionError`, `Error`, `Reconnect`, `Complete`).
    pub fn xds_terminated(&self, reason: &'static str) {
        self.xds_terminations
            .get_or_create(&TerminationLabels { reason })
            .inc();
    }

    /// Counts one received xDS response of `url` and its resources' payload bytes.
    pub fn xds_received(&self, url: &str, bytes: usize) {
        let labels = UrlLabels {
            url: url.to_string(),
        };
        self.xds_messages.get_or_create(&labels).inc();
        self.xds_bytes
            .get_or_create(&labels)
            .inc_by(u64::try_from(bytes).unwrap_or(u64::MAX));
    }

    /// The pods this agent serves (`active`) and those handed over but not (yet) served
    /// (`pending`; expected to converge to zero).
    pub fn set_proxies(&self, active: usize, pending: usize) {
        let wm = &self.workload_manager;
        wm.active.set(i64::try_from(active).unwrap_or(i64::MAX));
        wm.pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
    }

    /// Counts a pod's proxy started (its listeners up and its capture in place).
    pub fn proxy_started(&self) {
        self.workload_manager.started.inc();
    }

    /// Counts a pod's proxy stopped.
    pub fn proxy_stopped(&self) {
        self.workload_manager.stopped.inc();
    }

    /// Bounds the `istio_tcp_*` label sets to `limit`; those of deleted workloads go after
    /// `idle` without a connection.
    pub fn configure_series(&self, limit: usize, idle: Duration) {
        self.series().configure(limit, idle);
    }

    /// Evicts the label sets idle past the interval whose workloads (by uid) no longer
    /// `exist`; returns how many.
    pub fn evict_idle_series(&self, exists: impl Fn(&str) -> bool) -> usize {
        let mut series = self.series();
        let gone = series.evict_idle(Instant::now(), exists);
        for labels in &gone {
            self.remove_series(labels);
        }
        gone.len()
    }

    /// The configured idle interval.
    pub fn series_idle(&self) -> Duration {
        self.series().idle()
    }

    fn series(&self) -> MutexGuard<'_, Series<TcpLabels, Arc<TcpCounters>>> {
        self.series.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn remove_series(&self, labels: &TcpLabels) {
        for family in [
            &self.opened,
            &self.closed,
            &self.failed,
            &self.sent,
            &self.received,
        ] {
            family.remove(labels);
        }
    }

    /// Admits `labels` into the tracked sets (evicting an idle set at the limit): the set's
    /// shared copy and counters, None when refused. The caller counts under `labels` while
    /// still holding `series`, so an eviction never races a new sample into an untracked
    /// series.
    fn admit(
        &self,
        series: &mut Series<TcpLabels, Arc<TcpCounters>>,
        labels: &TcpLabels,
        record: &ConnectionRecord,
        purpose: Purpose,
    ) -> Option<Admitted<TcpLabels, Arc<TcpCounters>>> {
        let [src, dst] = workload_uids(record);
        let admitted = series.admit_with(
            labels,
            [src.as_deref(), dst.as_deref()],
            purpose,
            Instant::now(),
            Default::default,
        )?;
        if let Some(old) = &admitted.evicted {
            self.remove_series(old);
        }
        Some(admitted)
    }

    fn labels(record: &ConnectionRecord, flag: ResponseFlag) -> TcpLabels {
        let (src, dst) = (side(&record.src), side(&record.dst));
        let service = record.dst_service.as_deref();
        // A service hostname is name.namespace.svc.<domain>.
        let mut parts = service.unwrap_or_default().split('.');
        let service_name = parts.next().filter(|s| !s.is_empty());
        let service_namespace = parts.next();
        TcpLabels {
            reporter: reporter(record.direction),
            source_app: src.canonical_service.clone(),
            source_version: src.canonical_revision.clone(),
            source_workload: src.workload,
            source_canonical_service: src.canonical_service,
            source_canonical_revision: src.canonical_revision,
            source_workload_namespace: src.namespace,
            source_principal: src.principal,
            source_cluster: src.cluster,
            destination_service: or_unknown(service),
            destination_service_namespace: or_unknown(service_namespace),
            destination_service_name: or_unknown(service_name),
            destination_app: dst.canonical_service.clone(),
            destination_version: dst.canonical_revision.clone(),
            destination_workload: dst.workload,
            destination_canonical_service: dst.canonical_service,
            destination_canonical_revision: dst.canonical_revision,
            destination_workload_namespace: dst.namespace,
            destination_principal: dst.principal,
            destination_cluster: dst.cluster,
            request_protocol: "tcp",
            response_flags: flag.as_str(),
            connection_security_policy: if record.src.identity.is_some() {
                "mutual_tls"
            } else {
                "unknown"
            },
            locality: LocalityLabels::of(&record.src, &record.dst),
        }
    }

    /// Counts an established connection; returns its labels and byte counters, which the
    /// connection increments as bytes move (upstream counts the same way: a long transfer is
    /// visible while it runs). At the series limit with every label set in use, a new set is
    /// not counted (its counters are detached; `ztunnel_metric_series_refused_total`).
    pub fn opened(&self, record: &ConnectionRecord) -> OpenedConnection {
        let labels = Self::labels(record, ResponseFlag::None);
        let mut series = self.series();
        let (labels, counted, sent, received) =
            match self.admit(&mut series, &labels, record, Purpose::Open) {
                Some(Admitted { key, value, .. }) => {
                    counter(&value.opened, &self.opened, &key).inc();
                    let sent = counter(&value.sent, &self.sent, &key).clone();
                    let received = counter(&value.received, &self.received, &key).clone();
                    (key, true, sent, received)
                }
                None => (
                    Arc::new(labels),
                    false,
                    Counter::default(),
                    Counter::default(),
                ),
            };
        drop(series);
        OpenedConnection {
            opened: Opened { labels, counted },
            sent,
            received,
        }
    }

    /// Counts an established connection that ended, with `flag` saying how. A clean close is
    /// counted under the labels it was opened with (the same set, not rebuilt).
    pub fn closed(&self, record: &ConnectionRecord, opened: &Opened, flag: ResponseFlag) {
        // A connection not counted opened is not counted closed either: opened minus closed
        // stays the number of open connections.
        if !opened.counted {
            return;
        }
        let mut series = self.series();
        let counters = series.closed(&opened.labels, Instant::now());
        if flag == ResponseFlag::None {
            match counters {
                Some(counters) => {
                    counter(&counters.closed, &self.closed, &opened.labels).inc();
                }
                // Not held (cannot be: a set with an open connection is never evicted):
                // counted anyway, as before the series kept counters.
                None => {
                    debug_assert!(false, "a set counted open is held");
                    self.closed.get_or_create(&opened.labels).inc();
                }
            }
        } else {
            let mut labels = TcpLabels::clone(&opened.labels);
            labels.response_flags = flag.as_str();
            if let Some(Admitted { key, value, .. }) =
                self.admit(&mut series, &labels, record, Purpose::CloseOfCounted)
            {
                counter(&value.closed, &self.closed, &key).inc();
            }
        }
    }

    /// Counts a connection that failed before it was established.
    pub fn failed(&self, record: &ConnectionRecord, flag: ResponseFlag) {
        let labels = Self::labels(record, flag);
        let mut series = self.series();
        if let Some(Admitted { key, value, .. }) =
            self.admit(&mut series, &labels, record, Purpose::Event)
        {
            counter(&value.failed, &self.failed, &key).inc();
        }
    }

    /// The `tag` of `istio_build` (the Istio version the agent is deployed as; this build's
    /// version until set).
    pub fn set_build_tag(&self, tag: &str) {
        self.build.clear();
        self.build
            .get_or_create(&BuildLabels {
                component: "ztunnel",
                tag: tag.to_string(),
            })
            .set(1);
    }

    /// The proxy runtime whose figures `tokio_*` report (set once, at start-up).
    pub fn set_runtime(&self, handle: tokio::runtime::Handle) {
        let _ = self.runtime.set(handle);
    }

    /// Where the per-pod kernel counters come from (set once, at start-up).
    pub fn set_pod_counters_source(&self, source: PodCountersSource) {
        let _ = self.pod_counters.set(source);
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(workload: &str) -> ConnectionRecord {
        let mut r = ConnectionRecord::new(
            Direction::Outbound,
            "10.0.0.1:1000".parse().expect("a"),
            "10.0.0.2:15008".parse().expect("a"),
        );
        r.src = Peer {
            workload: Some(workload.into()),
            namespace: Some("default".into()),
            identity: Some(
                "spiffe://cluster.local/ns/default/sa/a"
                    .parse()
                    .expect("id"),
            ),
            detail: None,
        };
        r.dst_service = Some("reviews.bookinfo.svc.cluster.local".into());
        r
    }

    /// A peer's workload as the mesh state knows it, by uid.
    fn known_workload(uid: &str) -> Option<Arc<crate::state::workload::Workload>> {
        Some(Arc::new(crate::state::workload::Workload {
            uid: uid.into(),
            ..Default::default()
        }))
    }

    fn samples(metrics: &Metrics, name: &str, workload: &str) -> Vec<String> {
        metrics
            .encode()
            .lines()
            .filter(|l| {
                l.starts_with(name) && l.contains(&format!("source_workload=\"{workload}\""))
            })
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn labels_in_istios_order_with_unknowns() {
        let metrics = Metrics::new();
        let opened = metrics.opened(&record("lbl"));
        opened.sent.inc_by(3);
        let line = &samples(&metrics, "istio_tcp_connections_opened_total{", "lbl")[0];
        assert!(line.starts_with("istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"lbl\",source_canonical_service=\"unknown\","), "{line}");
        assert!(
            line.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/a\""),
            "{line}"
        );
        assert!(line.contains("destination_service=\"reviews.bookinfo.svc.cluster.local\",destination_service_namespace=\"bookinfo\",destination_service_name=\"reviews\""), "{line}");
        assert!(line.ends_with("request_protocol=\"tcp\",response_flags=\"-\",connection_security_policy=\"mutual_tls\"} 1"), "{line}");
        assert_eq!(
            samples(&metrics, "istio_tcp_sent_bytes_total{", "lbl").len(),
            1
        );
    }

    #[test]
    fn a_failed_close_keeps_its_bytes_under_the_open_labels_and_names_the_flag() {
        let metrics = Metrics::new();
        let opened = metrics.opened(&record("flag"));
        opened.received.inc_by(7);
        metrics.closed(&record("flag"), &opened.opened, ResponseFlag::Deny);
        let closed = samples(&metrics, "istio_tcp_connections_closed_total{", "flag");
        assert_eq!(closed.len(), 1);
        assert!(
            closed[0].contains("response_flags=\"DENY\""),
            "{}",
            closed[0]
        );
        let received = samples(&metrics, "istio_tcp_received_bytes_total{", "flag");
        assert!(
            received[0].contains("response_flags=\"-\"") && received[0].ends_with(" 7"),
            "{received:?}"
        );
        metrics.failed(&record("never"), ResponseFlag::TlsFailure);
        let failed = samples(&metrics, "istio_tcp_connections_failed_total{", "never");
        assert!(
            failed[0].contains("response_flags=\"TLS_FAILURE\""),
            "{failed:?}"
        );
        assert!(samples(&metrics, "istio_tcp_connections_opened_total{", "never").is_empty());
    }

    /// The label names of a sample line, in order.
    fn label_names(line: &str) -> Vec<String> {
        let Some((_, rest)) = line.split_once('{') else {
            return Vec::new();
        };
        let labels = rest.rsplit_once('}').map_or(rest, |(l, _)| l);
        let mut names = Vec::new();
        let mut rest = labels;
        while let Some((name, after)) = rest.split_once("=\"") {
            names.push(name.trim_start_matches(',').to_string());
            // Label values here hold no escaped quotes.
            rest = after.split_once('"').map_or("", |(_, r)| r);
        }
        names
    }

    /// Upstream families this agent does not export, and why.
    const NOT_EXPORTED: &[(&str, &str)] = &[
        (
            "istio_on_demand_dns",
            "on-demand DNS for hostname-only workloads is not implemented",
        ),
        (
            "istio_crl_policy_rejections",
            "certificate revocation lists are not implemented",
        ),
        (
            "istio_crl_untracked_connections",
            "certificate revocation lists are not implemented",
        ),
    ];

    /// Families of ours upstream does not have that are not under `ztunnel_`: the rest of
    /// Prometheus' standard process collector.
    const STANDARD: &[&str] = &[
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_start_time_seconds",
        "process_threads",
    ];

    #[test]
    fn every_upstream_family_is_exported_with_its_name_type_and_labels() {
        let fixture = include_str!("../../tests/fixtures/upstream-metric-families.txt");
        let metrics = Metrics::new();
        // A sample in every labelled family.
        let mut known = record("fam");
        known.dst.detail = known_workload("uid-dst");
        let opened = metrics.opened(&known);
        metrics.closed(&known, &opened.opened, ResponseFlag::None);
        metrics.failed(&known, ResponseFlag::Connect);
        let _socket = metrics.socket_opened(Direction::Outbound);
        metrics.xds_received("type.googleapis.com/istio.workload.Address", 10);
        metrics.xds_terminated("Reconnect");
        let dns = DnsLabels {
            request_query_type: "a",
            request_protocol: "udp",
            source_canonical_service: "productpage".into(),
            source_canonical_revision: "v1".into(),
        };
        metrics.dns_request(&dns);
        metrics.dns_upstream_request(&dns);
        metrics.dns_upstream_failure(&dns);
        metrics.dns_upstream_duration(&dns, Duration::from_millis(3));
        metrics.dns_rejected("malformed");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let text = runtime.block_on(async { metrics.encode() });

        let ours: Vec<(String, String)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_once(' '))
            .map(|(n, t)| (n.to_string(), t.to_string()))
            .collect();
        let mut upstream = Vec::new();
        for line in fixture
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let mut parts = line.split_whitespace();
            let (name, kind, labels) = (
                parts.next().expect("name"),
                parts.next().expect("type"),
                parts.next().expect("labels"),
            );
            upstream.push(name);
            if let Some((_, why)) = NOT_EXPORTED.iter().find(|(n, _)| *n == name) {
                assert!(
                    !ours.iter().any(|(n, _)| n == name),
                    "{name} is exported now: take it off NOT_EXPORTED ({why})"
                );
                continue;
            }
            let ours_kind = ours
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t.as_str());
            assert_eq!(ours_kind, Some(kind), "upstream family {name} ({kind})");
            if labels == "-" {
                continue;
            }
            let sample_name = match kind {
                "counter" => format!("{name}_total{{"),
                // A histogram's labels, read from its count sample.
                "histogram" => format!("{name}_count{{"),
                _ => format!("{name}{{"),
            };
            let line = text
                .lines()
                .find(|l| l.starts_with(&sample_name))
                .unwrap_or_else(|| panic!("no sample of {name} in:\n{text}"));
            let mut want: Vec<String> = labels.split(',').map(str::to_string).collect();
            if want.last().map(String::as_str) == Some("+locality") {
                want.pop();
                // The test connection knows its destination workload: locality is present.
                want.extend(
                    [
                        "source_region",
                        "source_zone",
                        "destination_region",
                        "destination_zone",
                    ]
                    .map(String::from),
                );
            }
            assert_eq!(label_names(line), want, "labels of {name}: {line}");
        }
        for (name, _) in &ours {
            assert!(
                upstream.contains(&name.as_str())
                    || name.starts_with("ztunnel_")
                    || STANDARD.contains(&name.as_str()),
                "{name} is neither upstream's (tests/fixtures/upstream-metric-families.txt) nor under our ztunnel_ prefix"
            );
        }
        // Help texts end with a period, as upstream's registry writes them.
        assert!(
            text.contains(
                "# HELP istio_tcp_connections_opened The total number of TCP connections opened.\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("# UNIT istio_xds_message_bytes bytes\n"),
            "{text}"
        );
    }

    #[test]
    fn locality_labels_are_absent_when_no_workload_is_known() {
        let metrics = Metrics::new();
        let mut unknown = record("noloc");
        unknown.src.detail = None;
        let opened = metrics.opened(&unknown);
        let line = &samples(&metrics, "istio_tcp_connections_opened_total{", "noloc")[0];
        assert!(!line.contains("_region"), "{line}");
        let mut zoned = record("loc");
        zoned.dst.detail = Some(Arc::new(crate::state::workload::Workload {
            locality: Some(crate::state::workload::Locality {
                region: "eu-west1".into(),
                zone: "eu-west1-b".into(),
                subzone: String::new(),
            }),
            ..Default::default()
        }));
        metrics.opened(&zoned);
        let line = &samples(&metrics, "istio_tcp_connections_opened_total{", "loc")[0];
        assert!(line.ends_with(",source_region=\"unknown\",source_zone=\"unknown\",destination_region=\"eu-west1\",destination_zone=\"eu-west1-b\"} 1"), "{line}");
        drop(opened);
    }

    #[test]
    fn sockets_open_follows_the_guards() {
        let metrics = Metrics::new();
        let a = metrics.socket_opened(Direction::Inbound);
        let b = metrics.socket_opened(Direction::Inbound);
        let gauge = |m: &Metrics| {
            m.encode()
                .lines()
                .find(|l| l.starts_with("istio_tcp_sockets_open{reporter=\"destination\"}"))
                .map(str::to_string)
        };
        assert_eq!(
            gauge(&metrics).as_deref(),
            Some("istio_tcp_sockets_open{reporter=\"destination\"} 2")
        );
        drop((a, b));
        assert_eq!(
            gauge(&metrics).as_deref(),
            Some("istio_tcp_sockets_open{reporter=\"destination\"} 0")
        );
    }

    #[test]
    fn series_of_deleted_workloads_are_evicted_from_every_family_once_idle() {
        let metrics = Metrics::new();
        metrics.configure_series(100, Duration::ZERO);
        let mut gone = record("gone");
        gone.src.detail = known_workload("uid-gone");
        let opened = metrics.opened(&gone);
        opened.sent.inc_by(5);
        // Open: stays, even with its workload deleted.
        assert_eq!(metrics.evict_idle_series(|_| false), 0);
        metrics.closed(&gone, &opened.opened, ResponseFlag::Connect);
        // Idle, but its workload exists: stays.
        assert_eq!(metrics.evict_idle_series(|uid| uid == "uid-gone"), 0);
        assert_eq!(
            samples(&metrics, "istio_tcp_sent_bytes_total{", "gone").len(),
            1
        );
        // Deleted and idle: both label sets (opened and the CONNECT close) leave every family.
        assert_eq!(metrics.evict_idle_series(|_| false), 2);
        let text = metrics.encode();
        assert!(!text.contains("source_workload=\"gone\""), "{text}");
        assert!(
            text.contains("ztunnel_metric_series_evicted_total{reason=\"idle\"} 2"),
            "{text}"
        );
        assert!(text.contains("ztunnel_metric_series 0\n"), "{text}");
    }

    #[test]
    fn at_the_series_limit_new_label_sets_are_refused_and_counted_not_the_connection() {
        let metrics = Metrics::new();
        metrics.configure_series(1, Duration::from_millis(1));
        let busy = metrics.opened(&record("busy"));
        let refused = metrics.opened(&record("refused"));
        refused.sent.inc_by(9);
        metrics.closed(&record("refused"), &refused.opened, ResponseFlag::None);
        let text = metrics.encode();
        assert!(!text.contains("source_workload=\"refused\""), "{text}");
        assert!(
            text.contains("ztunnel_metric_series_refused_total 1"),
            "{text}"
        );
        assert!(text.contains("ztunnel_metric_series_limit 1\n"), "{text}");
        // Once the busy one has closed (and been idle a moment), a new set takes its place.
        metrics.closed(&record("busy"), &busy.opened, ResponseFlag::None);
        std::thread::sleep(Duration::from_millis(5));
        metrics.opened(&record("next"));
        let text = metrics.encode();
        assert!(!text.contains("source_workload=\"busy\""), "{text}");
        assert!(text.contains("source_workload=\"next\""), "{text}");
        assert!(
            text.contains("ztunnel_metric_series_evicted_total{reason=\"limit\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn a_counted_connection_closing_in_error_at_the_limit_is_still_counted_closed() {
        let metrics = Metrics::new();
        metrics.configure_series(1, Duration::from_secs(3600));
        let open = metrics.opened(&record("full"));
        // The bound is reached by its own set; its DENY close needs a second set.
        metrics.closed(&record("full"), &open.opened, ResponseFlag::Deny);
        let opened = samples(&metrics, "istio_tcp_connections_opened_total{", "full");
        let closed = samples(&metrics, "istio_tcp_connections_closed_total{", "full");
        assert_eq!((opened.len(), closed.len()), (1, 1), "{closed:?}");
        assert!(closed[0].contains("response_flags=\"DENY\""), "{closed:?}");
        // A connection that was not counted opened is not counted closed either.
        let refused = metrics.opened(&record("over"));
        metrics.closed(&record("over"), &refused.opened, ResponseFlag::Deny);
        assert!(samples(&metrics, "istio_tcp_connections_closed_total{", "over").is_empty());
    }
}
