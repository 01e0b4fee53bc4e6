//! Prometheus metrics on 15020: Istio's `istio_tcp_*` connection metrics with Istio's labels
//! in Istio's order. A connection's labels come from its access-log record; its byte counters
//! move as bytes move (see `proxy::connection`), and when the connection ends the log's totals
//! equal what the counters gained.

use std::sync::{Arc, OnceLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use ztunnel_common::PodCounters;

use crate::accesslog::{ConnectionRecord, Direction, Peer};

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

/// An established connection's metric handles: its labels (as counted opened) and the two
/// byte counters it increments as bytes move.
#[derive(Debug)]
pub struct OpenedConnection {
    /// The labels it was counted opened with (for [`Metrics::closed`]).
    pub labels: TcpLabels,
    /// `istio_tcp_sent_bytes_total` for this connection's labels.
    pub sent: Counter,
    /// `istio_tcp_received_bytes_total` for this connection's labels.
    pub received: Counter,
}

/// Build information labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    tag: &'static str,
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

/// Why an accept failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AcceptErrorLabels {
    error: &'static str,
}

/// The process's descriptor figures, read at scrape time under the names Prometheus'
/// process collectors (and upstream ztunnel) use: fd exhaustion is visible before it bites.
#[derive(Debug, Default)]
struct ProcessCollector;

impl ProcessCollector {
    fn open_fds() -> Option<i64> {
        let entries = std::fs::read_dir("/proc/self/fd").ok()?;
        // Minus the descriptor read_dir itself holds.
        Some(entries.count() as i64 - 1)
    }

    fn max_fds() -> Option<i64> {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit with a valid pointer to a local rlimit.
        let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        (rc == 0).then(|| i64::try_from(limit.rlim_cur).unwrap_or(i64::MAX))
    }
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for (name, help, value) in [
            (
                "process_open_fds",
                "Number of open file descriptors",
                Self::open_fds(),
            ),
            (
                "process_max_fds",
                "Maximum number of file descriptors",
                Self::max_fds(),
            ),
        ] {
            if let Some(value) = value {
                let gauge = prometheus_client::metrics::gauge::ConstGauge::new(value);
                let metric = encoder.encode_descriptor(name, help, None, gauge.metric_type())?;
                gauge.encode(metric)?;
            }
        }
        Ok(())
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
        let Some(source) = self.0.get() else {
            return Ok(());
        };
        let pods = source();
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

/// The agent's metrics.
pub struct Metrics {
    pod_counters: Arc<OnceLock<PodCountersSource>>,
    registry: Registry,
    opened: Family<TcpLabels, Counter>,
    closed: Family<TcpLabels, Counter>,
    failed: Family<TcpLabels, Counter>,
    sent: Family<TcpLabels, Counter>,
    received: Family<TcpLabels, Counter>,
    xds_terminations: Family<TerminationLabels, Counter>,
    xds_messages: Family<UrlLabels, Counter>,
    xds_bytes: Family<UrlLabels, Counter>,
    accept_errors: Family<AcceptErrorLabels, Counter>,
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

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let opened = Family::<TcpLabels, Counter>::default();
        let closed = Family::<TcpLabels, Counter>::default();
        let failed = Family::<TcpLabels, Counter>::default();
        let sent = Family::<TcpLabels, Counter>::default();
        let received = Family::<TcpLabels, Counter>::default();
        // prometheus-client appends `_total` to counters.
        registry.register(
            "istio_tcp_connections_opened",
            "The total number of TCP connections opened",
            opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed",
            closed.clone(),
        );
        registry.register(
            "istio_tcp_connections_failed",
            "The total number of TCP connections that failed to establish",
            failed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            received.clone(),
        );
        let build = Family::<BuildLabels, Gauge>::default();
        build
            .get_or_create(&BuildLabels {
                component: "ztunnel",
                tag: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("istio_build", "Istio component build info", build);
        // xDS, under upstream ztunnel's names (the bytes counter also carries the type URL).
        let xds_terminations = Family::<TerminationLabels, Counter>::default();
        registry.register(
            "istio_xds_connection_terminations",
            "The total number of xDS stream terminations, by reason",
            xds_terminations.clone(),
        );
        let xds_messages = Family::<UrlLabels, Counter>::default();
        registry.register(
            "istio_message_types",
            "The total number of xDS messages received, by type URL",
            xds_messages.clone(),
        );
        let xds_bytes = Family::<UrlLabels, Counter>::default();
        registry.register(
            "istio_total_messages_size",
            "The total size in bytes of xDS messages received, by type URL",
            xds_bytes.clone(),
        );
        let redirect = RedirectCollector::default();
        let pod_counters = redirect.0.clone();
        registry.register_collector(Box::new(redirect));
        registry.register_collector(Box::new(ProcessCollector));
        let accept_errors = Family::<AcceptErrorLabels, Counter>::default();
        registry.register(
            "ztunnel_accept_errors",
            "Failed accepts on the pods' listeners, by errno (EMFILE: the agent is out of file descriptors)",
            accept_errors.clone(),
        );
        Self {
            pod_counters,
            registry,
            opened,
            closed,
            failed,
            sent,
            received,
            xds_terminations,
            xds_messages,
            xds_bytes,
            accept_errors,
        }
    }

    /// Counts a failed accept (`EMFILE`, `ENFILE`, `ENOMEM`, `other`).
    pub fn accept_failed(&self, error: &'static str) {
        self.accept_errors
            .get_or_create(&AcceptErrorLabels { error })
            .inc();
    }

    /// Counts an xDS stream that ended (`ConnectionError`, `Error`, `Reconnect`, `Complete`).
    pub fn xds_terminated(&self, reason: &'static str) {
        self.xds_terminations
            .get_or_create(&TerminationLabels { reason })
            .inc();
    }

    /// Counts one received xDS resource of `url` and its size.
    pub fn xds_received(&self, url: &str, bytes: usize) {
        let labels = UrlLabels {
            url: url.to_string(),
        };
        self.xds_messages.get_or_create(&labels).inc();
        self.xds_bytes
            .get_or_create(&labels)
            .inc_by(u64::try_from(bytes).unwrap_or(u64::MAX));
    }

    fn labels(record: &ConnectionRecord, flag: ResponseFlag) -> TcpLabels {
        let (src, dst) = (side(&record.src), side(&record.dst));
        let service = record.dst_service.as_deref();
        // A service hostname is name.namespace.svc.<domain>.
        let mut parts = service.unwrap_or_default().split('.');
        let service_name = parts.next().filter(|s| !s.is_empty());
        let service_namespace = parts.next();
        TcpLabels {
            reporter: match record.direction {
                Direction::Outbound => "source",
                Direction::Inbound => "destination",
            },
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
        }
    }

    /// Counts an established connection; returns its labels and byte counters, which the
    /// connection increments as bytes move (upstream counts the same way: a long transfer is
    /// visible while it runs).
    pub fn opened(&self, record: &ConnectionRecord) -> OpenedConnection {
        let labels = Self::labels(record, ResponseFlag::None);
        self.opened.get_or_create(&labels).inc();
        OpenedConnection {
            sent: self.sent.get_or_create(&labels).clone(),
            received: self.received.get_or_create(&labels).clone(),
            labels,
        }
    }

    /// Counts an established connection that ended, with `flag` saying how. A clean close is
    /// counted under the labels it was opened with (the same set, not rebuilt).
    pub fn closed(&self, opened: &TcpLabels, flag: ResponseFlag) {
        if flag == ResponseFlag::None {
            self.closed.get_or_create(opened).inc();
        } else {
            let mut labels = opened.clone();
            labels.response_flags = flag.as_str();
            self.closed.get_or_create(&labels).inc();
        }
    }

    /// Counts a connection that failed before it was established.
    pub fn failed(&self, record: &ConnectionRecord, flag: ResponseFlag) {
        self.failed.get_or_create(&Self::labels(record, flag)).inc();
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
        metrics.closed(&opened.labels, ResponseFlag::Deny);
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
}
