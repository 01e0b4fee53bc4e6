//! Traffic through a real waypoint hop: a waypoint pod (not enrolled, its own HBONE
//! terminator with the waypoint's mesh certificate, `ztunnel_e2e::waypoint`) behind the
//! `waypoint` service, named by a service as the waypoint service's VIP and then by hostname,
//! and by a workload as the waypoint pod's address. The client's agent tunnels to the
//! waypoint with the dialled address as `:authority`; the waypoint sees the client's identity
//! and forwards as itself; the destination's agent sees the waypoint's identity. A
//! destination without a waypoint is reached directly, and a waypoint with no endpoint left
//! fails the connection with the reason in the access log.

use std::net::SocketAddr;
use std::sync::Arc;

use ztunnel_e2e::agent::Agent;
use ztunnel_e2e::require_root;
use ztunnel_e2e::topology::{Pod, Topology};
use ztunnel_e2e::traffic::{exchange, Server};
use ztunnel_e2e::waypoint::{Hop, Waypoint};

const SERVICE_VIP: &str = "10.96.0.50";
const WAYPOINT_VIP: &str = "10.96.0.99";

fn id(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

/// The mesh: `server` behind service `server` (whose waypoint is `service_waypoint`),
/// `backend` with the waypoint pod's address as its own waypoint, `plain` without one, and the
/// waypoint pod (unenrolled) behind the `waypoint` service when `waypoint_up`.
fn mesh_yaml(pods: &[Pod], service_waypoint: &str, waypoint_up: bool) -> String {
    let [client, server, backend, plain, waypoint] = pods else {
        panic!("five pods")
    };
    let pod = |p: &Pod, sa: &str, extra: &str| {
        format!(
            "- {{uid: cluster1//v1/Pod/default/{n}, name: {n}, namespace: default, serviceAccount: {sa}, protocol: HBONE, node: node-1, workloadIps: [\"{ip}\"], netns: {ns}{extra}}}\n",
            n = p.name,
            ip = p.ip4,
            ns = p.netns_path().display(),
        )
    };
    let mut y = String::from("workloads:\n");
    y.push_str(&pod(client, "client", ""));
    y.push_str(&pod(
        server,
        "server",
        ", services: {\"default/server.default.svc.cluster.local\": {9080: 9080}}",
    ));
    y.push_str(&pod(
        backend,
        "backend",
        &format!(
            ", waypoint: {{destination: \"/{}\", hboneMtlsPort: 15008}}",
            waypoint.ip4
        ),
    ));
    y.push_str(&pod(plain, "plain", ""));
    if waypoint_up {
        // Not enrolled (no netns): the waypoint terminates HBONE itself, as Envoy does.
        y.push_str(&format!(
            "- {{uid: cluster1//v1/Pod/default/waypoint, name: waypoint, namespace: default, serviceAccount: waypoint, protocol: HBONE, node: node-1, workloadIps: [\"{}\"], services: {{\"default/waypoint.default.svc.cluster.local\": {{15008: 15008}}}}}}\n",
            waypoint.ip4
        ));
    }
    y.push_str(&format!(
        "services:\n\
         - {{name: server, namespace: default, hostname: server.default.svc.cluster.local, vips: [\"/{SERVICE_VIP}\"], ports: {{9080: 9080}},\n   waypoint: {{destination: \"{service_waypoint}\", hboneMtlsPort: 15008}}}}\n\
         - {{name: waypoint, namespace: default, hostname: waypoint.default.svc.cluster.local, vips: [\"/{WAYPOINT_VIP}\"], ports: {{15008: 15008}}}}\n"
    ));
    y
}

/// Waits for the agent to apply a rewritten local config.
fn rewrite(agent: &mut Agent, config: &std::path::Path, yaml: &str) {
    let mark = agent.log_mark();
    std::fs::write(config, yaml).expect("rewrite config");
    agent.wait_log_after(mark, &["local config changed; applying"]);
}

#[test]
fn traffic_goes_through_the_waypoint_istiod_names() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::for_test();
    let pods: Vec<Pod> = [
        ("client", 10),
        ("server", 11),
        ("backend", 12),
        ("plain", 13),
        ("waypoint", 20),
    ]
    .iter()
    .map(|(n, h)| topo.add_pod(n, *h))
    .collect();
    let (client, server, backend, plain, wp) = (&pods[0], &pods[1], &pods[2], &pods[3], &pods[4]);
    let _apps: Vec<Server> = [server, backend, plain]
        .iter()
        .map(|p| Server::start(p.netns_path(), SocketAddr::new(p.ip4, 9080)))
        .collect();
    let ca = std::env::temp_dir().join(format!("{}-ca", topo.prefix));
    let _ = std::fs::remove_dir_all(&ca);
    let ca_arg = ca.display().to_string();
    let by_vip = format!("/{WAYPOINT_VIP}");
    let (mut agent, config) = Agent::start_local(
        &topo,
        "node-1",
        &mesh_yaml(&pods, &by_vip, true),
        &["--ca-dir", &ca_arg],
    );

    // The waypoint: a service-addressed CONNECT goes to the server pod, a pod-addressed one
    // to that pod, each over HBONE as the waypoint.
    let routes: Vec<(String, Hop)> = [
        (format!("{SERVICE_VIP}:9080"), server, "server"),
        (format!("{}:9080", backend.ip4), backend, "backend"),
    ]
    .into_iter()
    .map(|(authority, pod, sa)| {
        let hop = Hop {
            hbone: SocketAddr::new(pod.ip4, 15008),
            authority: SocketAddr::new(pod.ip4, 9080),
            identity: id(sa),
        };
        (authority, hop)
    })
    .collect();
    let waypoint = Waypoint::start(
        wp.netns_path(),
        SocketAddr::new(wp.ip4, 15008),
        &ca,
        &id("waypoint"),
        Arc::new(move |authority| {
            routes
                .iter()
                .find(|(a, _)| a == authority)
                .map(|(_, hop)| hop.clone())
        }),
    );
    let vip: SocketAddr = format!("{SERVICE_VIP}:9080").parse().expect("vip");
    let through = |what: &str, dst: SocketAddr| {
        exchange(&client.netns_path(), dst, what)
            .unwrap_or_else(|e| panic!("{what}: {e}"))
            .response
    };

    // 1. The service's waypoint, named by the waypoint service's VIP.
    let mark = agent.log_mark();
    assert_eq!(through("via-vip", vip), "hello via-vip");
    let seen = waypoint.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].authority, format!("{SERVICE_VIP}:9080"));
    assert_eq!(seen[0].identity, id("client"));
    let out = agent.wait_log_after(mark, &["direction=\"outbound\"", "bytes_recv=13"]);
    for field in [
        format!("dst.addr={}:15008", wp.ip4),
        format!("dst.hbone_addr=\"{SERVICE_VIP}:9080\""),
        "dst.service=\"server.default.svc.cluster.local\"".to_string(),
        "dst.workload=\"waypoint\"".into(),
        format!("dst.identity=\"{}\"", id("waypoint")),
    ] {
        assert!(out.contains(&field), "{field} in {out}");
    }
    // The server's agent sees the waypoint, not the client.
    let inbound = agent.wait_log_after(mark, &["direction=\"inbound\"", "dst.workload=\"server\""]);
    assert!(
        inbound.contains(&format!("src.identity=\"{}\"", id("waypoint"))),
        "{inbound}"
    );

    // `diagnose flow` explains the same route before any connection is made.
    let vip_arg = vip.to_string();
    let (code, flow, err) = agent.cli_status(&["diagnose", "flow", "default/client", &vip_arg]);
    assert_eq!(code, 0, "{flow}{err}");
    for part in [
        format!("the service's waypoint /{WAYPOINT_VIP} picks the endpoint"),
        format!(
            "HBONE through waypoint /{WAYPOINT_VIP} at {}:15008, :authority {vip}",
            wp.ip4
        ),
        "waypoint workload default/waypoint".to_string(),
    ] {
        assert!(flow.contains(&part), "{part} in\n{flow}");
    }

    // 2. The same waypoint named by hostname.
    rewrite(
        &mut agent,
        &config,
        &mesh_yaml(&pods, "default/waypoint.default.svc.cluster.local", true),
    );
    let mark = agent.log_mark();
    assert_eq!(through("via-name", vip), "hello via-name");
    let out = agent.wait_log_after(
        mark,
        &["direction=\"outbound\"", "dst.workload=\"waypoint\""],
    );
    assert!(out.contains(&format!("dst.addr={}:15008", wp.ip4)), "{out}");
    let seen = waypoint.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].authority, format!("{SERVICE_VIP}:9080"));
    assert_eq!(seen[1].identity, id("client"));

    // 3. Workload-addressed traffic to a pod whose waypoint is the waypoint pod's address.
    let backend_addr = SocketAddr::new(backend.ip4, 9080);
    let mark = agent.log_mark();
    assert_eq!(through("to-pod", backend_addr), "hello to-pod");
    let seen = waypoint.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert_eq!(seen[2].authority, backend_addr.to_string());
    assert_eq!(seen[2].identity, id("client"));
    let inbound =
        agent.wait_log_after(mark, &["direction=\"inbound\"", "dst.workload=\"backend\""]);
    assert!(
        inbound.contains(&format!("src.identity=\"{}\"", id("waypoint"))),
        "{inbound}"
    );

    // 4. A destination without a waypoint is reached directly, as the client.
    let mark = agent.log_mark();
    assert_eq!(
        through("direct", SocketAddr::new(plain.ip4, 9080)),
        "hello direct"
    );
    assert_eq!(waypoint.seen().len(), 3, "the waypoint saw nothing more");
    let inbound = agent.wait_log_after(mark, &["direction=\"inbound\"", "dst.workload=\"plain\""]);
    assert!(
        inbound.contains(&format!("src.identity=\"{}\"", id("client"))),
        "{inbound}"
    );

    // 5. The waypoint's endpoints are gone: the connection fails, never bypassing the
    // waypoint, and the access log says why.
    rewrite(
        &mut agent,
        &config,
        &mesh_yaml(&pods, "default/waypoint.default.svc.cluster.local", false),
    );
    let failed = exchange(&client.netns_path(), vip, "nowhere");
    assert!(
        failed.as_ref().map_or(true, |e| e.response.is_empty()),
        "no answer without the waypoint: {failed:?}"
    );
    let line =
        agent.wait_log(&["no healthy waypoint for service server.default.svc.cluster.local"]);
    assert!(line.contains("\terror\t"), "{line}");
    assert!(
        line.contains("waypoint service waypoint.default.svc.cluster.local has no healthy endpoint on port 15008"),
        "{line}"
    );
    assert_eq!(waypoint.seen().len(), 3, "nothing reached the waypoint");
    let (code, flow, _) = agent.cli_status(&["diagnose", "flow", "default/client", &vip_arg]);
    assert_eq!(code, 1, "{flow}");
    assert!(
        flow.contains("no healthy waypoint for service server.default.svc.cluster.local"),
        "{flow}"
    );
    let _ = std::fs::remove_dir_all(&ca);
}
