//! Kernel capture end to end: real eBPF programs, real namespaces, a real agent.

use std::net::{IpAddr, SocketAddr};

use ztunnel_e2e::agent::Agent;
use ztunnel_e2e::mesh::{self, Workload};
use ztunnel_e2e::topology::{Pod, Topology};
use ztunnel_e2e::traffic::{exchange, in_netns, Server};
use ztunnel_e2e::{require_root, wait_for};

const NODE: &str = "node-1";

/// A local config enrolling `pods` (TCP protocol, both address families) on this node.
fn mesh_yaml(pods: &[&Pod]) -> String {
    let workloads: Vec<Workload<'_>> = pods
        .iter()
        .map(|p| Workload {
            protocol: "TCP",
            ipv6: true,
            ..Workload::hbone(p, &p.name, NODE)
        })
        .collect();
    mesh::yaml(&workloads, &[])
}

fn start_agent(topo: &Topology, enrolled: &[&Pod]) -> (Agent, std::path::PathBuf) {
    start_agent_with(topo, enrolled, &[])
}

fn start_agent_with(
    topo: &Topology,
    enrolled: &[&Pod],
    extra: &[&str],
) -> (Agent, std::path::PathBuf) {
    Agent::start_local(topo, NODE, &mesh_yaml(enrolled), extra)
}

/// Test servers on 9080 in `pod`: every IPv4 address, and its IPv6 address.
fn servers_on_9080(pod: &Pod) -> (Server, Server) {
    let v4 = Server::start(pod.netns_path(), addr("0.0.0.0".parse().expect("ip"), 9080));
    let v6 = Server::start(pod.netns_path(), addr(pod.ip6, 9080));
    (v4, v6)
}

fn addr(ip: IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip, port)
}

/// Asserts one captured outbound connection from `client` to `dst` end to end.
fn assert_outbound_captured(agent: &mut Agent, client: &Pod, server: &Server, dst: SocketAddr) {
    let before = server.accepted().len();
    let got = exchange(&client.netns_path(), dst, "ping").expect("connection through the agent");
    assert_eq!(got.response, "hello ping", "bytes arrive both ways");
    assert_eq!(
        got.peer, dst,
        "getpeername() shows the dialled address, not 15001"
    );
    let line = agent.wait_log(&[
        "captured connection",
        "direction=\"outbound\"",
        &format!("src.addr={}", got.local),
    ]);
    assert!(
        line.contains(&format!("original_dst={dst}")),
        "agent reports the original destination: {line}"
    );
    assert_eq!(
        server.accepted().len(),
        before + 1,
        "exactly one connection reaches the server"
    );
}

#[test]
fn outbound_capture_ipv4_and_ipv6() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::for_test();
    let client = topo.add_pod("client", 10);
    let server_pod = topo.add_pod("server", 11);
    // Kernel debug records (aya-log) are drained into the agent's log at debug level.
    let (mut agent, _) = start_agent_with(
        &topo,
        &[&client],
        &["--log", "info,ztunnel=debug,ztunnel_agent::proxy=debug"],
    );
    let v4 = Server::start(
        server_pod.netns_path(),
        addr("0.0.0.0".parse().expect("ip"), 9080),
    );
    let v6 = Server::start(server_pod.netns_path(), addr(server_pod.ip6, 9080));

    assert_outbound_captured(&mut agent, &client, &v4, addr(server_pod.ip4, 9080));
    assert_outbound_captured(&mut agent, &client, &v6, addr(server_pod.ip6, 9080));

    // The agent's own upstream connection (also made inside the client pod) was not
    // captured again: one captured line per client connection, and the kernel counted the
    // agent's marked socket as skipped.
    assert_eq!(
        agent
            .lines_with(&["captured connection", "direction=\"outbound\""])
            .len(),
        2
    );
    agent.wait_log(&["\tdebug\t", "outbound captured: netns", "dst port 9080"]);
    let dump = agent.dump();
    assert!(dump.contains("outbound_captured=2"), "{dump}");
    assert!(dump.contains("skipped_agent_socket=2"), "{dump}");
    // The same kernel counters, as metrics.
    let metrics = agent.scrape_metrics();
    let pod = ["pod=\"client\"", "namespace=\"default\""];
    for (event, n) in [("outbound_captured", 2), ("skipped_agent_socket", 2)] {
        let labels = [pod[0], pod[1], &format!("event=\"{event}\"")];
        assert_eq!(
            ztunnel_e2e::metric_sum(&metrics, "ztunnel_redirect_events_total", &labels),
            n,
            "{metrics}"
        );
    }
}

#[test]
fn inbound_plaintext_lands_on_15006_with_original_destination() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::for_test();
    let client = topo.add_pod("client", 10);
    let server_pod = topo.add_pod("server", 11);
    let (mut agent, _) = start_agent(&topo, &[&server_pod]);
    let (server, server6) = servers_on_9080(&server_pod);

    let mut clients = Vec::new();
    for ip in [server_pod.ip4, server_pod.ip6] {
        let dst = addr(ip, 9080);
        let got = exchange(&client.netns_path(), dst, "in").expect("inbound connection");
        assert_eq!(got.response, "hello in");
        let line = agent.wait_log(&[
            "captured connection",
            "direction=\"inbound\"",
            &format!("src.addr={}", got.local),
        ]);
        assert!(line.contains(&format!("original_dst={dst}")), "{line}");
        clients.push(got.local);
    }
    // The client's connection ended on 15006; the application saw the agent's connection,
    // from the client's address (source-address preservation) with a port of the agent's
    // choosing below the ephemeral range (the client's own stays with the 15006 socket).
    let accepted: Vec<_> = server
        .accepted()
        .into_iter()
        .chain(server6.accepted())
        .collect();
    assert_eq!(accepted.len(), 2);
    for (seen, client) in accepted.iter().zip(&clients) {
        assert_eq!(seen.peer.ip(), client.ip(), "{accepted:?}");
        assert!(
            seen.peer.port() != client.port() && seen.peer.port() < 32768,
            "{accepted:?}"
        );
    }

    // Steering does not depend on the application listening: a port nobody serves is still
    // accepted by 15006 (whose local address is the original destination), and the agent
    // reports the refused upstream.
    let dst = addr(server_pod.ip4, 9999);
    let _ = exchange(&client.netns_path(), dst, "x");
    let line = agent.wait_log(&["connection complete", &format!("dst.addr={dst}")]);
    assert!(
        line.contains("\terror\taccess\t") && line.contains("Connection refused"),
        "{line}"
    );
}

#[test]
fn unenrolled_pods_are_untouched() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::for_test();
    let enrolled = topo.add_pod("enrolled", 10);
    let plain_client = topo.add_pod("plain", 12);
    let plain_server = topo.add_pod("plainsrv", 13);
    let (agent, _) = start_agent(&topo, &[&enrolled]);
    let server = Server::start(
        plain_server.netns_path(),
        addr("0.0.0.0".parse().expect("ip"), 9080),
    );

    let dst = addr(plain_server.ip4, 9080);
    let got = exchange(&plain_client.netns_path(), dst, "direct").expect("direct connection");
    assert_eq!(got.response, "hello direct");
    assert_eq!(got.peer, dst);
    // The server saw the client itself: nothing in between.
    let seen = server.accepted();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].peer, got.local);
    assert!(
        agent.lines_with(&["captured connection"]).is_empty(),
        "{}",
        agent.log()
    );
    // And the kernel recorded nothing for pods it does not know.
    let dump = agent.dump();
    assert!(!dump.contains(&plain_client.ip4.to_string()), "{dump}");
}

#[test]
fn pod_dropped_from_config_is_released() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::for_test();
    let client = topo.add_pod("client", 10);
    let server_pod = topo.add_pod("server", 11);
    let (mut agent, config) = start_agent(&topo, &[&client]);
    let server = Server::start(
        server_pod.netns_path(),
        addr("0.0.0.0".parse().expect("ip"), 9080),
    );
    let dst = addr(server_pod.ip4, 9080);
    assert_outbound_captured(&mut agent, &client, &server, dst);

    std::fs::write(&config, mesh_yaml(&[])).expect("rewrite config");
    agent.wait_log(&["pod removed", "pod=client"]);

    let got = exchange(&client.netns_path(), dst, "after").expect("direct connection");
    assert_eq!(got.response, "hello after");
    let seen = server.accepted();
    assert_eq!(
        seen.last().expect("accepted").peer,
        got.local,
        "no proxy in between any more"
    );
    assert_eq!(agent.lines_with(&["captured connection"]).len(), 1);
    // Its listeners are gone.
    for port in [15001u16, 15006, 15008] {
        let listening = in_netns(&client.netns_path(), move || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        assert!(!listening, "port {port} still open in the released pod");
    }
    assert!(!agent.dump().contains(&client.ip4.to_string()));
}

#[test]
fn invalid_config_change_keeps_last_good_state() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::for_test();
    let client = topo.add_pod("client", 10);
    let server_pod = topo.add_pod("server", 11);
    let (mut agent, config) = start_agent(&topo, &[&client]);
    std::fs::write(
        &config,
        "workloads:\n- name: client\n  workloadIps: [\"10.244.1\"]\n",
    )
    .expect("write bad config");
    let line = agent.wait_log(&["local config refused"]);
    assert!(
        line.contains("workloadIps") && line.contains("line 3"),
        "{line}"
    );
    let server = Server::start(
        server_pod.netns_path(),
        addr("0.0.0.0".parse().expect("ip"), 9080),
    );
    assert_outbound_captured(&mut agent, &client, &server, addr(server_pod.ip4, 9080));
    wait_for("agent alive", std::time::Duration::from_secs(1), || {
        agent.is_running().then_some(())
    });
}

/// Connects from the node namespace, bound to `src`, and exchanges `payload`; returns the
/// answer.
fn exchange_from(topo: &Topology, src: IpAddr, dst: SocketAddr, payload: &str) -> String {
    use std::io::{Read, Write};
    let payload = payload.to_string();
    in_netns(&topo.node_path(), move || {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(dst),
            socket2::Type::STREAM,
            None,
        )
        .expect("socket");
        socket
            .bind(&SocketAddr::new(src, 0).into())
            .expect("bind the source");
        socket
            .connect_timeout(&dst.into(), std::time::Duration::from_secs(5))
            .expect("connect");
        let mut s: std::net::TcpStream = socket.into();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(payload.as_bytes()).expect("write");
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("read");
        answer
    })
}

#[test]
fn kubelet_probes_reach_the_application_directly() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::for_test();
    let server_pod = topo.add_pod("server", 11);
    let (mut agent, _) = start_agent(&topo, &[&server_pod]);
    let (server, server6) = servers_on_9080(&server_pod);
    // istio-cni SNATs kubelet's probes on the node to these sources.
    let probe4: IpAddr = "169.254.7.127".parse().expect("ip");
    let probe6: IpAddr = "fd16:9254:7127:1337:ffff:ffff:ffff:ffff"
        .parse()
        .expect("ip");
    topo.add_node_addr(probe4);
    topo.add_node_addr(probe6);
    // The pods route everything via the bridge, so answers to the probe source come back.
    for (src, dst, app) in [
        (probe4, addr(server_pod.ip4, 9080), &server),
        (probe6, addr(server_pod.ip6, 9080), &server6),
    ] {
        assert_eq!(exchange_from(&topo, src, dst, "probe"), "hello probe");
        let seen = app.accepted();
        assert_eq!(
            seen.last().map(|a| a.peer.ip()),
            Some(src),
            "the application saw the probe source itself, not the agent: {seen:?}"
        );
    }
    // The same node, from its ordinary address: captured, so the application sees the
    // agent's connection (from the node's address, preserved).
    let node_ip: IpAddr = "10.244.1.1".parse().expect("ip");
    let before = server.accepted().len();
    assert_eq!(
        exchange_from(&topo, node_ip, addr(server_pod.ip4, 9080), "kubelet"),
        "hello kubelet"
    );
    assert_eq!(server.accepted().len(), before + 1);
    assert_eq!(server.accepted().last().map(|a| a.peer.ip()), Some(node_ip));
    agent.wait_log(&[
        "captured connection",
        "direction=\"inbound\"",
        "src.addr=10.244.1.1:",
    ]);
    assert!(
        !agent.log().contains("src.addr=169.254.7.127"),
        "the probe never reached the agent"
    );
    let metrics = agent.scrape_metrics();
    let labels = ["pod=\"server\"", "event=\"skipped_probe\""];
    assert_eq!(
        ztunnel_e2e::metric_sum(&metrics, "ztunnel_redirect_events_total", &labels),
        2,
        "{metrics}"
    );
}
