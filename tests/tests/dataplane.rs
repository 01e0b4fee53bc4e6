//! The data plane on the troubleshooting guide's own walkthrough: HBONE between the guide's
//! pods, the access log in the guide's format, round robin behind a VIP, metrics that agree
//! with the log.

use std::io::{ErrorKind, Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use ztunnel_e2e::agent::Agent;
use ztunnel_e2e::mesh::{self, guide, Workload};
use ztunnel_e2e::one_hop::OneHop;
use ztunnel_e2e::topology::{Pod, Topology};
use ztunnel_e2e::traffic::{
    answer_count_and_hash, drain_hash, exchange, fnv1a, in_netns, pattern, read_count_and_hash,
    send_pattern, serve_one, Server, FNV1A_START,
};
use ztunnel_e2e::{metric_sum, require_root};

const PRODUCTPAGE_VIP: &str = "10.96.0.10";
const REVIEWS_VIP: &str = "10.96.0.14";

#[test]
fn guide_walkthrough_hbone_access_log_round_robin_and_metrics() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::for_test();
    let pods: Vec<Pod> = guide::add_pods(&mut topo);
    let servers: Vec<Option<Server>> = pods
        .iter()
        .map(|p| {
            (p.name != "curl").then(|| Server::start(p.netns_path(), SocketAddr::new(p.ip4, 9080)))
        })
        .collect();
    let yaml = guide::mesh_yaml(&pods, "node-1", false);
    let (mut agent, _) = Agent::start_local(&topo, "node-1", &yaml, &[]);
    let curl = &pods[2];

    // 10 requests from curl to productpage:9080.
    let vip: SocketAddr = format!("{PRODUCTPAGE_VIP}:9080").parse().expect("vip");
    for i in 0..10 {
        let got = exchange(&curl.netns_path(), vip, "ping").expect("request through HBONE");
        assert_eq!(got.response, "hello ping", "request {i}");
        assert_eq!(got.peer, vip, "curl sees the VIP it dialled");
    }
    let outbound = wait_lines(&mut agent, "direction=\"outbound\"", 10);
    let inbound = wait_lines(&mut agent, "direction=\"inbound\"", 10);
    assert_eq!(outbound.len(), 10, "{outbound:#?}");
    assert_eq!(inbound.len(), 10, "{inbound:#?}");
    let id = |sa: &str| format!("\"spiffe://cluster.local/ns/default/sa/{sa}\"");
    for line in &outbound {
        assert!(
            line.contains("\tinfo\taccess\tconnection complete src.addr=10.244.1.12:"),
            "{line}"
        );
        assert_fields_in_order(
            line,
            &[
                "src.addr=10.244.1.12:".to_string(),
                "src.workload=\"curl\"".into(),
                "src.namespace=\"default\"".into(),
                format!("src.identity={}", id("curl")),
                "dst.addr=10.244.1.10:15008".into(),
                "dst.hbone_addr=\"10.244.1.10:9080\"".into(),
                "dst.service=\"productpage.default.svc.cluster.local\"".into(),
                "dst.workload=\"productpage-v1\"".into(),
                "dst.namespace=\"default\"".into(),
                format!("dst.identity={}", id("bookinfo-productpage")),
                "direction=\"outbound\"".into(),
                "bytes_sent=4".into(),
                "bytes_recv=10".into(),
                "duration=\"".into(),
            ],
        );
    }
    for line in &inbound {
        assert_fields_in_order(
            line,
            &[
                "src.addr=10.244.1.12:".to_string(),
                "src.workload=\"curl\"".into(),
                "src.namespace=\"default\"".into(),
                format!("src.identity={}", id("curl")),
                "dst.addr=10.244.1.10:9080".into(),
                "dst.hbone_addr=\"10.244.1.10:9080\"".into(),
                "dst.service=\"productpage.default.svc.cluster.local\"".into(),
                "dst.workload=\"productpage-v1\"".into(),
                "dst.namespace=\"default\"".into(),
                format!("dst.identity={}", id("bookinfo-productpage")),
                "direction=\"inbound\"".into(),
                "bytes_sent=10".into(),
                "bytes_recv=4".into(),
                "duration=\"".into(),
            ],
        );
        assert!(!line.contains("error="), "{line}");
    }

    // 9 connections to the reviews VIP land exactly 3 times on each replica.
    let reviews: SocketAddr = format!("{REVIEWS_VIP}:9080").parse().expect("vip");
    for _ in 0..9 {
        exchange(&curl.netns_path(), reviews, "r").expect("request to reviews");
    }
    for (pod, server) in pods.iter().zip(&servers) {
        if pod.name.starts_with("reviews-") {
            let server = server.as_ref().expect("server");
            assert_eq!(server.accepted().len(), 3, "{} got its share", pod.name);
        }
    }

    // The counters agree with the log: 10 connections of 4 bytes out and 10 back (Istio
    // counts the request's bytes as received and the response's as sent, for the source
    // reporter too).
    let metrics = agent.scrape_metrics();
    let to_productpage = [
        "reporter=\"source\"",
        "destination_workload=\"productpage-v1\"",
        "connection_security_policy=\"mutual_tls\"",
    ];
    assert_eq!(
        metric_sum(
            &metrics,
            "istio_tcp_connections_opened_total",
            &to_productpage
        ),
        10,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "istio_tcp_connections_closed_total",
            &to_productpage
        ),
        10
    );
    assert_eq!(
        metric_sum(&metrics, "istio_tcp_sent_bytes_total", &to_productpage),
        100
    );
    assert_eq!(
        metric_sum(&metrics, "istio_tcp_received_bytes_total", &to_productpage),
        40
    );
    let line = metrics
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .expect("a sample");
    let order = [
        "reporter=",
        "source_workload=",
        "source_canonical_service=",
        "source_canonical_revision=",
        "source_workload_namespace=",
        "source_principal=",
        "source_app=",
        "source_version=",
        "source_cluster=",
        "destination_service=",
        "destination_service_namespace=",
        "destination_service_name=",
        "destination_workload=",
        "destination_canonical_service=",
        "destination_canonical_revision=",
        "destination_workload_namespace=",
        "destination_principal=",
        "destination_app=",
        "destination_version=",
        "destination_cluster=",
        "request_protocol=",
        "response_flags=",
        "connection_security_policy=",
    ];
    let owned: Vec<String> = order.iter().map(|s| s.to_string()).collect();
    assert_fields_in_order(line, &owned);

    // /config_dump in upstream's shape (what istioctl ztunnel-config reads).
    let dump: serde_json::Value =
        serde_json::from_str(&agent.http_get(15000, "/config_dump")).expect("config_dump is JSON");
    let keys: Vec<&str> = dump
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    for key in [
        "workloads",
        "services",
        "policies",
        "certificates",
        "workloadState",
        "staticConfig",
        "config",
        "version",
    ] {
        assert!(keys.contains(&key), "{key} missing: {keys:?}");
    }
    let workloads = dump["workloads"].as_array().expect("workloads");
    let uids: Vec<&str> = workloads.iter().filter_map(|w| w["uid"].as_str()).collect();
    assert!(
        uids.windows(2).all(|w| w[0] <= w[1]) && uids.len() == 7,
        "sorted by uid: {uids:?}"
    );
    let productpage = workloads
        .iter()
        .find(|w| w["name"] == "productpage-v1")
        .expect("productpage workload");
    for field in [
        "workloadIps",
        "protocol",
        "uid",
        "name",
        "namespace",
        "trustDomain",
        "serviceAccount",
        "network",
        "workloadName",
        "canonicalName",
        "node",
        "status",
        "services",
        "authorizationPolicies",
    ] {
        assert!(
            productpage.get(field).is_some(),
            "workload field {field}: {productpage}"
        );
    }
    assert_eq!(productpage["protocol"], "HBONE");
    assert_eq!(productpage["trustDomain"], "cluster.local");
    assert_eq!(
        productpage["services"],
        serde_json::json!(["default/productpage.default.svc.cluster.local"])
    );
    let services = dump["services"].as_array().expect("services");
    let hosts: Vec<&str> = services
        .iter()
        .filter_map(|s| s["hostname"].as_str())
        .collect();
    assert!(
        hosts.windows(2).all(|w| w[0] <= w[1]),
        "sorted by hostname: {hosts:?}"
    );
    let reviews = services
        .iter()
        .find(|s| s["name"] == "reviews")
        .expect("reviews service");
    assert_eq!(reviews["vips"], serde_json::json!(["/10.96.0.14"]));
    let endpoints = reviews["endpoints"].as_object().expect("endpoints");
    assert_eq!(endpoints.len(), 3);
    for (uid, ep) in endpoints {
        assert_eq!(ep["workloadUid"], uid.as_str());
        assert_eq!(ep["status"], "Healthy");
    }
    let certs = dump["certificates"].as_array().expect("certificates");
    let curl_cert = certs
        .iter()
        .find(|c| c["identity"] == "spiffe://cluster.local/ns/default/sa/curl")
        .expect("curl's certificate");
    assert_eq!(curl_cert["state"], "Available");
    let leaf = &curl_cert["certChain"][0];
    let serial = leaf["serialNumber"].as_str().expect("serial");
    assert!(
        !serial.is_empty() && serial.bytes().all(|b| b.is_ascii_digit()),
        "decimal: {serial}"
    );
    use base64::Engine as _;
    let pem = base64::engine::general_purpose::STANDARD
        .decode(leaf["pem"].as_str().expect("pem"))
        .expect("base64");
    assert!(pem.starts_with(b"-----BEGIN CERTIFICATE-----"));
    for t in ["validFrom", "expirationTime"] {
        let v = leaf[t].as_str().expect("time");
        assert!(v.len() == 20 && v.ends_with('Z'), "{t}: {v}");
    }
    assert!(!curl_cert["rootCerts"].as_array().expect("roots").is_empty());
    // The guide's `istioctl ztunnel-config workloads` and `certificates`, from the agent.
    let table = agent.cli(&["config", "workloads"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0], "NAMESPACE POD NAME       IP          NODE   WAYPOINT PROTOCOL",
        "{table}"
    );
    assert_eq!(lines.len(), 8, "{table}");
    assert_eq!(
        lines[1],
        "default   curl           10.244.1.12 node-1 None     HBONE"
    );
    assert!(
        lines[2].starts_with("default   details-v1     10.244.1.11 node-1"),
        "{table}"
    );
    let filtered = agent.cli(&["config", "workloads", "--workload-name", "ratings-v1"]);
    assert_eq!(filtered.lines().count(), 2, "{filtered}");
    let table = agent.cli(&["config", "certificates", "--namespace", "default"]);
    let header = table.lines().next().unwrap_or_default();
    for col in [
        "CERTIFICATE NAME",
        "TYPE",
        "STATUS",
        "VALID CERT",
        "SERIAL NUMBER",
        "NOT AFTER",
        "NOT BEFORE",
    ] {
        assert!(header.contains(col), "{header}");
    }
    let curl_rows: Vec<&str> = table
        .lines()
        .filter(|l| l.starts_with("spiffe://cluster.local/ns/default/sa/curl "))
        .collect();
    assert_eq!(curl_rows.len(), 2, "a Leaf and a Root row: {table}");
    assert!(
        curl_rows[0].contains(" Leaf ")
            && curl_rows[0].contains(" Available ")
            && curl_rows[0].contains(" true ")
    );
    assert!(curl_rows[1].contains(" Root "));
    let serial_hex = curl_rows[0].split_whitespace().nth(4).unwrap_or_default();
    assert!(
        serial_hex
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
        "{serial_hex}"
    );
    // A saved dump gives the same tables, and `all -o json` holds every section.
    let saved = std::env::temp_dir().join("zt-guide-dump.json");
    std::fs::write(&saved, serde_json::to_string(&dump).expect("json")).expect("save dump");
    let saved_arg = saved.display().to_string();
    let from_file = agent.cli(&["config", "workloads", "--file", &saved_arg]);
    assert_eq!(from_file, agent.cli(&["config", "workloads"]));
    let all: serde_json::Value =
        serde_json::from_str(&agent.cli(&["config", "all", "-o", "json", "--file", &saved_arg]))
            .expect("all -o json is JSON");
    assert!(all.get("workloads").is_some() && all.get("certificates").is_some());
    let state = dump["workloadState"].as_object().expect("workloadState");
    let pp = &state["cluster1//v1/Pod/default/productpage-v1"];
    assert_eq!(pp["info"]["serviceAccount"], "bookinfo-productpage");
    assert!(pp["connections"]["inbound"].is_array());
}

/// Waits until the log has `n` `connection complete` lines containing `part`.
fn wait_lines(agent: &mut Agent, part: &str, n: usize) -> Vec<String> {
    ztunnel_e2e::wait_for(
        &format!("{n} lines with {part}"),
        std::time::Duration::from_secs(10),
        || {
            let lines = agent.lines_with(&["connection complete", part]);
            (lines.len() >= n).then_some(lines)
        },
    )
}

/// Every expected field is present, in this order.
fn assert_fields_in_order(line: &str, fields: &[String]) {
    let mut at = 0;
    for f in fields {
        match line[at..].find(f.as_str()) {
            Some(i) => at += i + f.len(),
            None => panic!("{f:?} missing or out of order in:\n{line}"),
        }
    }
}

#[test]
fn large_transfers_arrive_intact_both_ways_with_half_close() {
    if !require_root() {
        return;
    }
    const LEN: u64 = 200 * 1024 * 1024;
    let (topo, client, server, yaml) = mesh::client_and_server();
    let (mut agent, _) = Agent::start_local(&topo, "node-1", &yaml, &[]);

    // The server reads until the client's half-close arrives (proving it propagated), then
    // answers with the hash of what it got and LEN bytes of its own.
    let server_addr = SocketAddr::new(server.ip4, 9080);
    let server_thread = serve_one(server.netns_path(), server_addr, |mut conn| {
        answer_count_and_hash(&mut conn);
        send_pattern(&mut conn, 2, LEN)
    });

    let (up_hash, echoed_len, echoed_hash, down) = in_netns(&client.netns_path(), move || {
        let mut s = std::net::TcpStream::connect(server_addr).expect("connect");
        let up = send_pattern(&mut s, 1, LEN);
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
        let (len, hash) = read_count_and_hash(&mut s);
        (up, len, hash, drain_hash(&mut s))
    });
    let down_hash = server_thread.join().expect("server thread");
    assert_eq!(echoed_len, LEN, "every byte arrived upstream");
    assert_eq!(echoed_hash, up_hash, "upstream bytes intact");
    assert_eq!(down, (LEN, down_hash), "downstream bytes intact");
    let line = agent.wait_log(&["connection complete", "direction=\"outbound\""]);
    assert!(line.contains(&format!("bytes_sent={LEN}")), "{line}");
    assert!(line.contains(&format!("bytes_recv={}", LEN + 16)), "{line}");
}

#[test]
fn interactive_passthrough_moves_to_the_kernel_relay_intact() {
    if !require_root() {
        return;
    }
    const LEN: u64 = 8 * 1024 * 1024;
    const ROUNDS: usize = 20;
    let mut topo = Topology::for_test();
    let client = topo.add_pod("client", 10);
    let server = topo.add_pod("server", 11);
    // The server is outside the mesh: the client's connection to it is plain passthrough.
    let yaml = mesh::yaml(
        &[
            Workload::hbone(&client, "client", "node-1"),
            Workload {
                protocol: "TCP",
                enrolled: false,
                ..Workload::hbone(&server, "server", "node-1")
            },
        ],
        &[],
    );
    let (mut agent, _) = Agent::start_local(&topo, "node-1", &yaml, &["--kernel-relay", "true"]);

    // Small exchanges (so the agent hands the connection to the kernel), then a bulk upload
    // and a half-close, answered with the count and hash of what arrived.
    let server_addr = SocketAddr::new(server.ip4, 9080);
    let server_thread = serve_one(server.netns_path(), server_addr, |mut conn| {
        pongs(&mut conn, ROUNDS);
        answer_count_and_hash(&mut conn);
    });
    let (up_hash, echoed_len, echoed_hash) = in_netns(&client.netns_path(), move || {
        let mut s = std::net::TcpStream::connect(server_addr).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        pings(&mut s, ROUNDS);
        let up = send_pattern(&mut s, 3, LEN);
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
        let (len, hash) = read_count_and_hash(&mut s);
        let mut rest = Vec::new();
        s.read_to_end(&mut rest).expect("the server's close");
        assert!(rest.is_empty(), "nothing after the answer");
        (up, len, hash)
    });
    server_thread.join().expect("server thread");
    assert_eq!(echoed_len, LEN, "every byte arrived upstream");
    assert_eq!(echoed_hash, up_hash, "upstream bytes intact and in order");
    let line = agent.wait_log(&["connection complete", "direction=\"outbound\""]);
    let small = 4 * ROUNDS as u64;
    assert!(
        line.contains(&format!("bytes_sent={}", small + LEN)),
        "{line}"
    );
    assert!(
        line.contains(&format!("bytes_recv={}", small + 16)),
        "{line}"
    );
    let metrics = agent.scrape_metrics();
    assert_eq!(
        metric_sum(
            &metrics,
            "ztunnel_passthrough_connections_total",
            &["relay=\"kernel\""]
        ),
        1,
        "the kernel relayed the connection: {metrics}"
    );
}

/// A destination that stops reading holds a fast client back through the agent, as TCP
/// between them would: the agent never queues without bound on a client's behalf. Nothing
/// is lost when the destination reads again.
#[test]
fn a_destination_that_stops_reading_holds_back_a_passthrough_client() {
    if !require_root() {
        return;
    }
    destination_that_stops_reading_holds_back_the_client(Path::Passthrough);
}

/// The same after the small exchanges that hand a connection to the kernel relay (on
/// here), which has no flow control of its own: the direction is handed back to the agent,
/// and counted.
#[test]
fn a_destination_that_stops_reading_holds_back_a_kernel_relayed_client() {
    if !require_root() {
        return;
    }
    destination_that_stops_reading_holds_back_the_client(Path::KernelRelay);
}

/// The same through HBONE: HTTP/2's flow control windows and the agents' bounded buffers
/// hold the client back.
#[test]
fn a_destination_that_stops_reading_holds_back_an_hbone_client() {
    if !require_root() {
        return;
    }
    destination_that_stops_reading_holds_back_the_client(Path::Hbone);
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Path {
    Passthrough,
    KernelRelay,
    Hbone,
}

fn destination_that_stops_reading_holds_back_the_client(path: Path) {
    const ROUNDS: usize = 20;
    /// What TCP buffers on the way may hold: the client's send buffer, the agent's two
    /// sockets and pipe, the server's receive buffer (a few MiB each at most here).
    const BOUND: u64 = 64 * 1024 * 1024;
    /// Where the client stops pushing if nothing holds it back.
    const CAP: u64 = 512 * 1024 * 1024;
    let mut topo = Topology::for_test();
    let client = topo.add_pod("client", 10);
    let server = topo.add_pod("server", 11);
    let server_workload = if path == Path::Hbone {
        Workload::hbone(&server, "server", "node-1")
    } else {
        Workload {
            protocol: "TCP",
            enrolled: false,
            ..Workload::hbone(&server, "server", "node-1")
        }
    };
    let yaml = mesh::yaml(
        &[
            Workload::hbone(&client, "client", "node-1"),
            server_workload,
        ],
        &[],
    );
    let relay: &[&str] = if path == Path::KernelRelay {
        &["--kernel-relay", "true"]
    } else {
        &[]
    };
    let (mut agent, _) = Agent::start_local(&topo, "node-1", &yaml, relay);

    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let server_addr = SocketAddr::new(server.ip4, 9080);
    let server_thread = serve_one(server.netns_path(), server_addr, move |mut conn| {
        pongs(&mut conn, ROUNDS);
        // Stops reading until the client has pushed all it could.
        go_rx.recv().expect("go");
        answer_count_and_hash(&mut conn);
    });
    let (pushed, up_hash, echoed_len, echoed_hash) = in_netns(&client.netns_path(), move || {
        let mut s = std::net::TcpStream::connect(server_addr).expect("connect");
        s.set_nodelay(true).expect("nodelay");
        pings(&mut s, ROUNDS);
        // Push until a write finds no room for 300 ms (or the cap).
        s.set_write_timeout(Some(Duration::from_millis(300)))
            .expect("write timeout");
        let mut buf = vec![0u8; 256 * 1024];
        let (mut sent, mut hash) = (0u64, FNV1A_START);
        while sent < CAP {
            pattern(5, sent, &mut buf);
            match s.write(&buf) {
                Ok(n) => {
                    hash = fnv1a(hash, &buf[..n]);
                    sent += n as u64;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
                Err(e) => panic!("write: {e}"),
            }
        }
        s.set_write_timeout(None).expect("no write timeout");
        go_tx.send(()).expect("go");
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
        let (len, echoed) = read_count_and_hash(&mut s);
        (sent, hash, len, echoed)
    });
    server_thread.join().expect("server thread");
    eprintln!("the client pushed {pushed} bytes before its writes stalled");
    assert!(
        pushed < BOUND,
        "a destination that reads nothing let the client push {pushed} bytes (TCP holds it to a few MiB): something queues without flow control"
    );
    assert!(
        pushed >= 1 << 20,
        "the path carried data before it stalled: {pushed} bytes"
    );
    assert_eq!(
        echoed_len, pushed,
        "every byte arrived once the server read"
    );
    assert_eq!(echoed_hash, up_hash, "in order and intact");
    let line = agent.wait_log(&["connection complete", "direction=\"outbound\""]);
    assert!(
        line.contains(&format!("bytes_sent={}", 4 * ROUNDS as u64 + pushed)),
        "{line}"
    );
    if path != Path::Hbone {
        let metrics = agent.scrape_metrics();
        let relayed =
            |relay| metric_sum(&metrics, "ztunnel_passthrough_connections_total", &[relay]);
        let handbacks = metric_sum(&metrics, "ztunnel_passthrough_relay_handbacks_total", &[]);
        if path == Path::KernelRelay {
            assert_eq!(
                relayed("relay=\"kernel\""),
                1,
                "relayed by the kernel: {metrics}"
            );
            assert_eq!(
                handbacks, 1,
                "the client's direction handed back to the agent: {metrics}"
            );
        } else {
            assert_eq!(
                relayed("relay=\"splice\""),
                1,
                "moved by the agent: {metrics}"
            );
            assert_eq!(handbacks, 0, "{metrics}");
        }
    }
}

/// The client's side of `rounds` small exchanges (enough for the agent to take a
/// passthrough connection for interactive).
fn pings(s: &mut std::net::TcpStream, rounds: usize) {
    for _ in 0..rounds {
        s.write_all(b"ping").expect("ping");
        let mut pong = [0u8; 4];
        s.read_exact(&mut pong).expect("pong");
        assert_eq!(&pong, b"pong");
    }
}

/// The server's side of [`pings`].
fn pongs(conn: &mut std::net::TcpStream, rounds: usize) {
    for _ in 0..rounds {
        let mut ping = [0u8; 4];
        conn.read_exact(&mut ping).expect("ping");
        assert_eq!(&ping, b"ping");
        conn.write_all(b"pong").expect("pong");
    }
}

#[test]
fn json_log_format_has_the_contract_keys() {
    if !require_root() {
        return;
    }
    let mut hop = OneHop::start(false, &["--log-format", "json"]);
    let dst = hop.dst();
    exchange(&hop.client.netns_path(), dst, "j").expect("connection");
    let line = hop
        .agent
        .wait_log(&["connection complete", "\"direction\":\"outbound\""]);
    let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON object per line");
    assert_eq!(v["level"], "info");
    assert_eq!(v["scope"], "access");
    assert_eq!(v["message"], "connection complete");
    assert!(
        v["time"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z') && t.len() == 27),
        "{v}"
    );
    assert_eq!(v["dst.addr"], dst.to_string());
    assert_eq!(v["bytes_sent"], 1);
    assert!(
        v.get("src.identity").is_none(),
        "passthrough has no identity: {v}"
    );
}

#[test]
fn access_off_silences_the_access_log_only() {
    if !require_root() {
        return;
    }
    let hop = OneHop::start(false, &["--log", "info,access=off"]);
    let (agent, dst) = (&hop.agent, hop.dst());
    let got = exchange(&hop.client.netns_path(), dst, "quiet").expect("traffic still flows");
    assert_eq!(got.response, "hello quiet");
    assert_eq!(hop.app.accepted().len(), 1);
    // The metrics are updated from the same record at the same moment the access line would
    // be written: once they count the connection, the line would be there.
    ztunnel_e2e::wait_for(
        "the connection counted",
        std::time::Duration::from_secs(10),
        || {
            let metrics = agent.scrape_metrics();
            let closed = metric_sum(
                &metrics,
                "istio_tcp_connections_closed_total",
                &["reporter=\"source\""],
            );
            (closed == 1).then_some(())
        },
    );
    assert!(
        agent.lines_with(&["connection complete"]).is_empty(),
        "{}",
        agent.log()
    );
}

#[test]
fn authorization_on_hbone_and_plaintext() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::for_test();
    let client = topo.add_pod("client", 10);
    let server = topo.add_pod("server", 11);
    let outsider = topo.add_pod("outsider", 12);
    let app = Server::start(server.netns_path(), SocketAddr::new(server.ip4, 9080));
    let _other = Server::start(server.netns_path(), SocketAddr::new(server.ip4, 9999));
    let mut yaml = mesh::yaml(
        &[
            Workload::hbone(&client, "curl", "node-1"),
            Workload::hbone(&server, "server", "node-1"),
        ],
        &[],
    );
    yaml.push_str(
        "policies:\n\
         - name: deny-9999\n  namespace: default\n  scope: Namespace\n  action: Deny\n  rules:\n  - - - destinationPorts: [9999]\n\
         - name: allow-curl\n  namespace: default\n  scope: Namespace\n  action: Allow\n  rules:\n  - - - principals: [{Exact: cluster.local/ns/default/sa/curl}]\n",
    );
    let (mut agent, _) = Agent::start_local(&topo, "node-1", &yaml, &[]);

    // Allowed: the principal the ALLOW policy names, over HBONE.
    let ok = exchange(&client.netns_path(), SocketAddr::new(server.ip4, 9080), "a")
        .expect("allowed connection");
    assert_eq!(ok.response, "hello a");

    // Denied by port: the server refuses the CONNECT and says which policy.
    let denied = exchange(&client.netns_path(), SocketAddr::new(server.ip4, 9999), "b");
    assert!(
        denied.map(|e| e.response).unwrap_or_default().is_empty(),
        "no bytes through"
    );
    let line = agent.wait_log(&[
        "connection complete",
        "direction=\"inbound\"",
        "dst.addr=10.244.1.11:9999",
    ]);
    assert!(
        line.contains("\terror\t")
            && line
                .contains("error=\"connection closed due to policy rejection: default/deny-9999\""),
        "{line}"
    );

    // Plaintext has no principal: the ALLOW policy cannot match, so it is denied.
    let plain = exchange(
        &outsider.netns_path(),
        SocketAddr::new(server.ip4, 9080),
        "c",
    );
    assert!(
        plain.map(|e| e.response).unwrap_or_default().is_empty(),
        "no bytes through"
    );
    let line = agent.wait_log(&[
        "connection complete",
        "direction=\"inbound\"",
        "src.addr=10.244.1.12:",
    ]);
    assert!(
        line.contains("allow policies exist, but none allowed"),
        "{line}"
    );
    assert_eq!(
        app.accepted().len(),
        1,
        "only the allowed connection reached the application"
    );

    // Denials are counted with response_flags DENY.
    let metrics = agent.scrape_metrics();
    assert_eq!(
        metric_sum(
            &metrics,
            "istio_tcp_connections_failed_total",
            &["response_flags=\"DENY\""]
        ),
        2,
        "{metrics}"
    );
}

#[test]
fn late_rejection_closes_live_connections_when_policy_changes() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::for_test();
    let client = topo.add_pod("client", 10);
    let server = topo.add_pod("server", 11);
    let outsider = topo.add_pod("outsider", 12);
    let app = Server::start(server.netns_path(), SocketAddr::new(server.ip4, 9080));
    let workloads = [
        Workload::hbone(&client, "curl", "node-1"),
        Workload::hbone(&server, "server", "node-1"),
    ];
    let yaml = mesh::yaml(&workloads, &[]);
    let (agent, config) = Agent::start_local(&topo, "node-1", &yaml, &[]);

    // Two live connections (the test server answers only after EOF, so they stay open).
    let dst = SocketAddr::new(server.ip4, 9080);
    let open = |pod: &Pod| {
        in_netns(&pod.netns_path(), move || {
            let mut s = std::net::TcpStream::connect(dst).expect("connect");
            s.write_all(b"hold").expect("write");
            s.set_read_timeout(Some(std::time::Duration::from_secs(15)))
                .expect("timeout");
            s
        })
    };
    let mut hbone = open(&client);
    let mut plain = open(&outsider);
    // Both reached the application: authorized, relayed, and registered as live.
    ztunnel_e2e::wait_for(
        "both connections live",
        std::time::Duration::from_secs(10),
        || (app.accepted().len() == 2).then_some(()),
    );

    // Counted as opened while live, not only when they end.
    let metrics = agent.scrape_metrics();
    let inbound = ["reporter=\"destination\""];
    assert_eq!(
        metric_sum(&metrics, "istio_tcp_connections_opened_total", &inbound),
        2,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "istio_tcp_connections_closed_total", &inbound),
        0
    );

    // A policy now denies port 9080: both are closed, with the reason logged.
    let mut yaml = mesh::yaml(&workloads, &[]);
    yaml.push_str("policies:\n- name: deny-late\n  namespace: default\n  scope: Namespace\n  action: Deny\n  rules:\n  - - - destinationPorts: [9080]\n");
    std::fs::write(&config, yaml).expect("config with policy");
    for (what, s) in [("hbone", &mut hbone), ("plaintext", &mut plain)] {
        let mut buf = [0u8; 64];
        match s.read(&mut buf) {
            Ok(0) => {}
            Ok(n) => panic!("{what}: got {n} bytes instead of a close"),
            Err(e) => assert!(
                !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ),
                "{what}: still open: {e}"
            ),
        }
    }
    ztunnel_e2e::wait_for(
        "both rejections logged",
        std::time::Duration::from_secs(10),
        || {
            let rejected = agent.lines_with(&[
                "connection complete",
                "direction=\"inbound\"",
                "error=\"connection closed due to policy rejection: default/deny-late\"",
            ]);
            (rejected.len() == 2).then_some(())
        },
    );
}
