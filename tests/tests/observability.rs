//! What operators watch, the way they watch it: a real Prometheus (Debian's) scrapes the agent
//! while traffic flows, and the PromQL of Istio's own "Istio Ztunnel Dashboard"
//! (istio/istio manifests/addons/dashboards/ztunnel-dashboard.gen.json at 86c9f01fd735,
//! `$__rate_interval` as Grafana fills it for a 1 s scrape) returns the series its panels
//! draw. The `pod` and `app` labels are the ones Kubernetes service discovery gives the
//! agent's pod. Also: the profiling endpoints and the two metrics paths.

use std::net::SocketAddr;
use std::time::Duration;

use ztunnel_e2e::prometheus::{Prometheus, Sample, Target};
use ztunnel_e2e::traffic::{ConnectionStream, Download, StreamingServer};
use ztunnel_e2e::xds_mesh::{settings, start_cp, start_mesh, XDS_PORT};
use ztunnel_e2e::{require_root, sh, wait_for};

const WAIT: Duration = Duration::from_secs(30);
/// The agent pod's name in the xDS mesh harness.
const POD: &str = "ztunnel-abc";

/// Waits until a dashboard panel's `expr` has a sample `accept` takes, and checks the result
/// is one series, the agent pod's (the panels sum by pod); returns it.
fn pod_panel(prometheus: &Prometheus, expr: &str, accept: impl Fn(&Sample) -> bool) -> Sample {
    let samples = prometheus.wait_query(expr, WAIT, accept);
    assert_eq!(
        samples.len(),
        1,
        "one series, for the agent's pod: {samples:?}"
    );
    assert_eq!(samples[0].label("pod"), POD, "{samples:?}");
    samples[0].clone()
}

#[test]
fn istios_ztunnel_dashboard_reads_the_agent_through_a_real_prometheus() {
    if !require_root() {
        return;
    }
    let addr = format!("127.0.0.1:{XDS_PORT}");
    let mut m = start_mesh("obs-dashboard", &addr);
    let s = settings(&m.dir, &m.mesh_path, Duration::from_secs(3600));
    let cp = start_cp(&m.topo, s.clone());
    m.agent.wait_ready();
    let prometheus = Prometheus::start(
        &m.topo.node,
        &[Target {
            addr: "127.0.0.1:15020",
            pod: POD,
        }],
        Duration::from_secs(1),
    );
    let streaming =
        StreamingServer::start(&m.server.netns_path(), SocketAddr::new(m.server.ip4, 9091));
    // A short connection through the mesh every 100 ms.
    let trickle = ConnectionStream::paced(
        &m.client.netns_path(),
        SocketAddr::new(m.server.ip4, 9080),
        Duration::from_millis(100),
    );
    let download = Download::start(&m.client.netns_path(), streaming.addr);
    wait_for("the download to flow", WAIT, || {
        (download.received() > 1 << 20).then_some(())
    });

    // Row "Process": Ztunnel Versions.
    let versions = prometheus.wait_query(
        r#"sum by (tag) (istio_build{component="ztunnel"})"#,
        WAIT,
        |s| s.value == 1.0,
    );
    assert_eq!(versions.len(), 1, "{versions:?}");
    assert_eq!(versions[0].label("tag"), env!("CARGO_PKG_VERSION"));

    // Row "Network": Connections (opened positive, closed drawn negative).
    pod_panel(
        &prometheus,
        r#"sum by (pod) (rate(istio_tcp_connections_opened_total{pod=~"ztunnel-.*"}[5s]))"#,
        |s| s.value > 0.0,
    );
    pod_panel(
        &prometheus,
        r#"-sum by (pod) (rate(istio_tcp_connections_closed_total{pod=~"ztunnel-.*"}[5s]))"#,
        |s| s.value < 0.0,
    );
    // Bytes Transmitted: the download is response bytes (sent), the requests received.
    pod_panel(
        &prometheus,
        r#"sum by (pod) (rate(istio_tcp_sent_bytes_total{pod=~"ztunnel-.*"}[5s]))"#,
        |s| s.value > 1_000_000.0,
    );
    // Istio's meaning holds for the client's side too: the download is response bytes, so
    // `sent` (not `received`) moves under reporter="source".
    prometheus.wait_query(
        r#"sum by (reporter) (rate(istio_tcp_sent_bytes_total{reporter="source"}[5s]))"#,
        WAIT,
        |s| s.value > 1_000_000.0,
    );
    pod_panel(
        &prometheus,
        r#"sum by (pod) (rate(istio_tcp_received_bytes_total{pod=~"ztunnel-.*"}[5s]))"#,
        |s| s.value > 0.0,
    );
    // DNS Request: valid PromQL; its series come with the DNS proxy.
    prometheus.query(r#"sum by (pod) (rate(istio_dns_requests_total{pod=~"ztunnel-.*"}[5s]))"#);

    // Row "Operations": XDS Connections, XDS Pushes, Workload Manager. The control plane
    // restarts, as istiod does on upgrade: both XDS panels see it.
    drop(cp);
    let _cp = start_cp(&m.topo, s);
    pod_panel(
        &prometheus,
        r#"sum by (pod) (rate(istio_xds_connection_terminations_total{pod=~"ztunnel-.*"}[5s]))"#,
        |s| s.value > 0.0,
    );
    let pushes = prometheus.wait_query(
        r#"sum by (url) (irate(istio_xds_message_total{pod=~"ztunnel-.*"}[5s]))"#,
        WAIT,
        |s| s.label("url") == "type.googleapis.com/istio.security.Authorization",
    );
    let mut urls: Vec<&str> = pushes.iter().map(|s| s.label("url")).collect();
    urls.sort_unstable();
    assert_eq!(
        urls,
        [
            "type.googleapis.com/istio.security.Authorization",
            "type.googleapis.com/istio.workload.Address"
        ],
        "{pushes:?}"
    );
    pod_panel(
        &prometheus,
        r#"sum by (pod) (workload_manager_active_proxy_count{pod=~"ztunnel-.*"})"#,
        |s| s.value == 2.0,
    );
    let pending = pod_panel(
        &prometheus,
        r#"sum by (pod) (workload_manager_pending_proxy_count{pod=~"ztunnel-.*"})"#,
        |_| true,
    );
    assert_eq!(pending.value, 0.0, "both pods are served");

    // Row "Network Resources": the download is open on both sides of the node's agent.
    pod_panel(
        &prometheus,
        r#"sum by (pod) (istio_tcp_connections_opened_total{app="ztunnel"}) - sum by (pod) (istio_tcp_connections_closed_total{app="ztunnel"})"#,
        |s| s.value >= 2.0,
    );
    pod_panel(
        &prometheus,
        r#"sum by (pod) (process_open_fds{app="ztunnel"})"#,
        |s| s.value > 10.0,
    );
    pod_panel(
        &prometheus,
        r#"sum by (pod) (istio_tcp_sockets_open{app="ztunnel"})"#,
        |s| s.value >= 2.0,
    );

    let tally = trickle.stop();
    assert!(tally.ok > 0, "the trickle got answers: {tally:?}");
    let total = download.finish().expect("the download ran to its end");
    assert!(total > 1 << 20, "{total}");
    // Once the download is closed, its client's socket is no longer open (the pooled HBONE
    // connection's socket on the server side stays open until it idles out, as upstream's).
    prometheus.wait_query(
        r#"sum by (reporter) (istio_tcp_sockets_open{app="ztunnel",reporter="source"})"#,
        WAIT,
        |s| s.value == 0.0,
    );
    assert!(
        !prometheus.log().contains("level=error"),
        "{}",
        prometheus.log()
    );
}

#[test]
fn profiles_and_both_metrics_paths_on_the_admin_and_metrics_ports() {
    if !require_root() {
        return;
    }
    let addr = format!("127.0.0.1:{XDS_PORT}");
    let mut m = start_mesh("obs-pprof", &addr);
    let _cp = start_cp(
        &m.topo,
        settings(&m.dir, &m.mesh_path, Duration::from_secs(3600)),
    );
    m.agent.wait_ready();
    let body = m.dir.join("cpu.pb");
    let code = sh(
        "ip",
        &[
            "netns",
            "exec",
            &m.topo.node,
            "curl",
            "-sS",
            "-o",
            &body.display().to_string(),
            "-w",
            "%{http_code}",
            "http://127.0.0.1:15000/debug/pprof/profile?seconds=1",
        ],
    );
    assert_eq!(code, "200");
    let profile = std::fs::read(&body).expect("profile");
    // A pprof Profile starts with its sample_type (field 1, length-delimited), and its string
    // table names the period type (cpu, nanoseconds). (An idle agent gives few samples; the
    // unit test checks a busy profile's contents.)
    let has = |s: &[u8]| profile.windows(s.len()).any(|w| w == s);
    assert!(
        profile.first() == Some(&0x0a) && has(b"cpu") && has(b"nanoseconds"),
        "not a pprof profile: {profile:?}"
    );
    let (status, text) = m
        .agent
        .http("GET", 15000, "/debug/pprof/profile?seconds=301");
    assert_eq!(
        (status, text.as_str()),
        (400, "invalid seconds value `301`; expected 1-300\n")
    );
    let (status, text) = m.agent.http("GET", 15000, "/debug/pprof/heap");
    assert_eq!(status, 501, "{text}");
    assert!(text.contains("without its heap profiler"), "{text}");

    // /metrics and /stats/prometheus serve the same families.
    let families = |path: &str| -> Vec<String> {
        m.agent
            .http_get(15020, path)
            .lines()
            .filter(|l| l.starts_with("# TYPE "))
            .map(str::to_string)
            .collect()
    };
    let metrics = families("/metrics");
    assert!(metrics.len() > 20, "{metrics:?}");
    assert_eq!(metrics, families("/stats/prometheus"));
}
