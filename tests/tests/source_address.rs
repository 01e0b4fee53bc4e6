//! Source-address preservation end to end: the application in an enrolled pod sees its
//! clients' addresses (HBONE: the client pod's address and port, as its agent forwarded them;
//! plaintext: the peer's address), over IPv4 and IPv6, with replies flowing for long transfers
//! both ways; and with the setting off, the pod's own address as before.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ztunnel_e2e::agent::Agent;
use ztunnel_e2e::mesh::{self, Workload};
use ztunnel_e2e::topology::{Pod, Topology};
use ztunnel_e2e::traffic::{exchange, Download, HashServer, Server, StreamingServer, Transfer};
use ztunnel_e2e::{metric_sum, require_root, wait_for};

const NODE: &str = "node-1";
/// Bytes each long transfer moves each way.
const LONG: u64 = 32 << 20;

/// A node with an enrolled HBONE client (both families), an enrolled HBONE server (both
/// families) running the test server on 9080, and an unenrolled pod.
struct Node {
    agent: Agent,
    client: Pod,
    server: Pod,
    plain: Pod,
    app4: Server,
    app6: Server,
    _topo: Topology,
}

fn start(extra: &[&str]) -> Node {
    let mut topo = Topology::for_test();
    let client = topo.add_pod("client", 10);
    let server = topo.add_pod("server", 11);
    let plain = topo.add_pod("plain", 12);
    let app4 = Server::start(
        server.netns_path(),
        addr("0.0.0.0".parse().expect("ip"), 9080),
    );
    let app6 = Server::start(server.netns_path(), addr(server.ip6, 9080));
    let workloads = [
        Workload {
            ipv6: true,
            ..Workload::hbone(&client, "client", NODE)
        },
        Workload {
            ipv6: true,
            ..Workload::hbone(&server, "server", NODE)
        },
    ];
    let (agent, _) = Agent::start_local(&topo, NODE, &mesh::yaml(&workloads, &[]), extra);
    Node {
        agent,
        client,
        server,
        plain,
        app4,
        app6,
        _topo: topo,
    }
}

fn addr(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

impl Node {
    /// One exchange from `from` to the server's application at `ip`: the client's local
    /// address and the peer address the application saw.
    fn seen(&self, from: &Pod, ip: IpAddr) -> (SocketAddr, SocketAddr) {
        let app = if ip.is_ipv6() { &self.app6 } else { &self.app4 };
        let before = app.accepted().len();
        let got = exchange(&from.netns_path(), addr(ip, 9080), "who").expect("exchange");
        assert_eq!(got.response, "hello who");
        let seen = app.accepted();
        assert_eq!(
            seen.len(),
            before + 1,
            "one connection reached the application"
        );
        (got.local, seen[before].peer)
    }

    /// What the config dump says about the server pod's source addresses.
    fn source_address(&self) -> String {
        node_source_address(&self.agent)
    }
}

#[test]
fn the_application_sees_its_clients_over_hbone_and_plaintext() {
    if !require_root() {
        return;
    }
    let mut node = start(&[]);
    node.agent
        .wait_log(&["pod enrolled", "pod=server", "source_address=preserved"]);

    for ip in [node.server.ip4, node.server.ip6] {
        // HBONE: the client pod's exact address and port, forwarded by its agent.
        let (client, seen) = node.seen(&node.client, ip);
        assert_eq!(seen, client, "over HBONE to {ip}");
        node.agent.wait_log(&[
            "connection complete",
            "direction=\"inbound\"",
            &format!("dst.addr={}", addr(ip, 9080)),
        ]);
        // Plaintext from an unenrolled pod: the peer's address; the port is the agent's (the
        // peer's own stays with the agent's accepted socket on 15006).
        let (client, seen) = node.seen(&node.plain, ip);
        assert_eq!(seen.ip(), client.ip(), "plaintext to {ip}");
        assert_ne!(seen.port(), client.port(), "plaintext to {ip}");
    }

    // Long transfers both ways keep flowing: the application's replies (data and ACKs) to
    // the client's address come back to the agent, for HBONE and plaintext alike.
    let hash = HashServer::start(&node.server.netns_path(), addr(node.server.ip4, 9090));
    let stream = StreamingServer::start(&node.server.netns_path(), addr(node.server.ip4, 9091));
    for (from, seed) in [(&node.client, 1u8), (&node.plain, 2u8)] {
        let up = Transfer::start(&from.netns_path(), hash.addr, seed);
        let down = Download::start(&from.netns_path(), stream.addr);
        wait_for("both long transfers", Duration::from_secs(60), || {
            (up.sent() >= LONG && down.received() >= LONG).then_some(())
        });
        let sent = up.finish().expect("upload");
        assert_eq!(
            sent.sent, sent.echoed,
            "upload from {} arrived whole",
            from.name
        );
        let received = down.finish().expect("download");
        assert!(received >= LONG, "download to {}: {received}", from.name);
    }

    // Nothing fell back; the dump says what each pod has.
    let metrics = node.agent.scrape_metrics();
    assert!(
        metrics.contains("# TYPE ztunnel_source_address_fallbacks counter"),
        "{metrics}"
    );
    assert_eq!(
        metric_sum(&metrics, "ztunnel_source_address_fallbacks_total", &[]),
        0,
        "{metrics}"
    );
    assert_eq!(node.source_address(), "preserved");
    // And the pod's namespace holds upstream's rule and table.
    let rules = ztunnel_e2e::sh(
        "ip",
        &[
            "-n",
            &node.server.netns,
            "rule",
            "show",
            "priority",
            "32764",
        ],
    );
    assert!(rules.contains("fwmark 0x111/0xfff lookup 100"), "{rules}");
}

#[test]
fn turned_off_the_application_sees_the_pods_own_address() {
    if !require_root() {
        return;
    }
    let mut node = start(&["--preserve-source-address", "false"]);
    node.agent
        .wait_log(&["pod enrolled", "pod=server", "source_address=off"]);
    for from in [&node.client, &node.plain] {
        let (_, seen) = node.seen(from, node.server.ip4);
        assert_eq!(seen.ip(), node.server.ip4, "from {}", from.name);
    }
    assert_eq!(node.source_address(), "off");
}

#[test]
fn where_the_kernel_refuses_the_pod_keeps_its_own_address_counted_and_said_once() {
    if !require_root() {
        return;
    }
    // Something else owns table 100 in the server pod: marked replies would be dropped, so
    // the agent must not preserve addresses there (and must say so), while the client pod is
    // unaffected.
    let mut topo = Topology::for_test();
    let client = topo.add_pod("client", 10);
    let server = topo.add_pod("server", 11);
    let plain = topo.add_pod("plain", 12);
    ztunnel_e2e::sh(
        "ip",
        &[
            "-n",
            &server.netns,
            "route",
            "add",
            "unreachable",
            "default",
            "table",
            "100",
        ],
    );
    let app = Server::start(server.netns_path(), addr(server.ip4, 9080));
    let workloads = [
        Workload::hbone(&client, "client", NODE),
        Workload::hbone(&server, "server", NODE),
    ];
    let (mut agent, _) = Agent::start_local(&topo, NODE, &mesh::yaml(&workloads, &[]), &[]);
    let line = agent.wait_log(&["pod enrolled", "pod=server", "source_address=unavailable"]);
    assert!(line.contains("unreachable"), "{line}");
    agent.wait_log(&["pod enrolled", "pod=client", "source_address=preserved"]);

    for from in [&client, &plain, &client] {
        let got = exchange(&from.netns_path(), addr(server.ip4, 9080), "x").expect("exchange");
        assert_eq!(got.response, "hello x", "the connection still works");
        let seen = app.accepted();
        assert_eq!(
            seen.last().map(|a| a.peer.ip()),
            Some(server.ip4),
            "from {}",
            from.name
        );
    }
    let metrics = agent.scrape_metrics();
    assert_eq!(
        metric_sum(
            &metrics,
            "ztunnel_source_address_fallbacks_total",
            &["pod=\"server\""]
        ),
        3,
        "{metrics}"
    );
    let said: Vec<_> = agent
        .log()
        .lines()
        .filter(|l| l.contains("source-address preservation unavailable"))
        .map(str::to_string)
        .collect();
    assert_eq!(said.len(), 1, "said once: {said:?}");
    assert!(
        said[0].contains("pod=server") && said[0].contains("table 100"),
        "{said:?}"
    );
    assert!(node_source_address(&agent).starts_with("unavailable: "));
}

/// The server pod's `sourceAddress` in the config dump.
fn node_source_address(agent: &Agent) -> String {
    let dump: serde_json::Value =
        serde_json::from_str(&agent.http_get(15000, "/config_dump")).expect("JSON");
    dump["workloadState"]["cluster1//v1/Pod/default/server"]["sourceAddress"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}
