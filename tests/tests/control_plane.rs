//! Control-plane mode against the development control plane (real delta xDS and CA over TLS,
//! in the node's network namespace): state and enrollment follow xDS, the agent survives the
//! control plane going away, invalid resources are NACKed, certificates come over gRPC and are
//! renewed under live traffic, a CA that is down or answers wrongly keeps the node unready,
//! and root rotation does not break traffic.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ztunnel_e2e::agent::Agent;
use ztunnel_e2e::control_plane::ControlPlane;
use ztunnel_e2e::traffic::in_netns;
use ztunnel_e2e::xds_mesh::{
    hbone_exchange, mesh_yaml, settings, start_cp, start_mesh, Mesh, DEBUG_PORT, XDS_PORT,
};
use ztunnel_e2e::{metric_sum, require_root, wait_for};

fn ready(agent: &Agent) -> bool {
    agent.http("GET", 15021, "/healthz/ready").0 == 200
}

#[test]
fn xds_drives_state_traffic_and_enrollment() {
    if !require_root() {
        return;
    }
    let addr = format!("127.0.0.1:{XDS_PORT}");
    let mut m = start_mesh("cp-xds", &addr);
    let cp = start_cp(
        &m.topo,
        settings(&m.dir, &m.mesh_path, Duration::from_secs(3600)),
    );
    m.agent.wait_ready();

    // The node id and metadata upstream sends, and the wildcard subscriptions in order.
    let subs = cp.subscriptions();
    assert_eq!(
        subs.iter().map(|s| s.type_url.as_str()).collect::<Vec<_>>(),
        [
            "type.googleapis.com/istio.workload.Address",
            "type.googleapis.com/istio.security.Authorization"
        ]
    );
    assert!(
        subs[0].node.starts_with("ztunnel~")
            && subs[0]
                .node
                .ends_with("~ztunnel-abc.istio-system~istio-system.svc.cluster.local"),
        "{}",
        subs[0].node
    );
    // One answer per initial response, every one an ACK.
    let replies = wait_for("the ACKs", Duration::from_secs(5), || {
        let r = cp.replies();
        (r.len() >= 2).then_some(r)
    });
    assert!(replies.iter().all(|r| r.error.is_none()), "{replies:?}");

    // Traffic follows the xDS state: HBONE with identities, certificates from the CA.
    assert_eq!(hbone_exchange(&m, "xds"), "hello xds");
    let line = m
        .agent
        .wait_log(&["direction=\"outbound\"", "dst.workload=\"server\""]);
    assert!(
        line.contains(&format!("dst.addr={}:15008", m.server.ip4)),
        "{line}"
    );
    assert!(
        line.contains("src.identity=\"spiffe://cluster.local/ns/default/sa/client\""),
        "{line}"
    );
    // The server pod was enrolled by istio-cni as "uid-server", xDS names it
    // cluster1//v1/Pod/default/server: the inbound side still finds its workload, so the
    // service it backs is named.
    let inbound = m.agent.wait_log(&[
        "direction=\"inbound\"",
        "dst.workload=\"server\"",
        "bytes_recv=3",
    ]);
    assert!(
        inbound.contains("dst.service=\"server.default.svc.cluster.local\""),
        "{inbound}"
    );
    assert_eq!(cp.issued("spiffe://cluster.local/ns/default/sa/server"), 1);
    let dump = config_dump(&m.agent);
    assert!(dump.contains("\"state\": \"Available\""), "{dump}");
    assert!(
        dump.contains("default/server.default.svc.cluster.local"),
        "{dump}"
    );

    // istiod's debug view of what it holds for this proxy.
    let debug = in_netns(&m.topo.node_path(), || {
        let mut s = TcpStream::connect(("127.0.0.1", DEBUG_PORT)).expect("debug port");
        s.write_all(b"GET /debug/config_dump?proxyID=ztunnel-abc HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .expect("write");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    });
    assert!(debug.starts_with("HTTP/1.1 200"), "{debug}");
    assert!(
        debug.contains("\"@type\": \"type.googleapis.com/istio.workload.Address\""),
        "{debug}"
    );
    assert!(debug.contains("\"name\": \"server\""), "{debug}");

    // The server's workload is removed from xDS: the pod is unenrolled, and a new connection
    // to it is plain passthrough (no identities, no workload).
    std::fs::write(&m.mesh_path, mesh_yaml(&m.client, &m.server, false, false)).expect("mesh");
    m.agent.wait_log(&[
        "pod unenrolled: its workload was removed from xDS",
        "pod=server",
    ]);
    wait_for(
        "server gone from workloadState",
        Duration::from_secs(10),
        || (!config_dump(&m.agent).contains("uid-server")).then_some(()),
    );
    assert_eq!(hbone_exchange(&m, "after"), "hello after");
    let line = m.agent.wait_log(&[
        "direction=\"outbound\"",
        &format!("dst.addr={}:9080", m.server.ip4),
    ]);
    assert!(
        !line.contains("dst.identity") && !line.contains("dst.workload"),
        "{line}"
    );
    // diagnose says why the pod is out of the mesh.
    let (code, out, _) = m.agent.cli_status(&["diagnose", "default/server"]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("first broken link: enrolled: not enrolled: its workload was removed from the mesh state"),
        "{out}"
    );

    // The workload comes back: the pod is enrolled again (istio-cni does not re-add it) and
    // traffic to it is HBONE with identities again.
    std::fs::write(&m.mesh_path, mesh_yaml(&m.client, &m.server, true, false)).expect("mesh");
    m.agent.wait_log(&[
        "pod enrolled again: its workload is back in xDS",
        "pod=server",
    ]);
    assert_eq!(hbone_exchange(&m, "back"), "hello back");
    let line = m.agent.wait_log(&[
        "direction=\"inbound\"",
        "dst.identity=\"spiffe://cluster.local/ns/default/sa/server\"",
        "bytes_recv=4",
    ]);
    assert!(
        line.contains("src.identity=\"spiffe://cluster.local/ns/default/sa/client\""),
        "{line}"
    );
}

#[test]
fn control_plane_restart_keeps_traffic_and_resyncs() {
    if !require_root() {
        return;
    }
    let addr = format!("127.0.0.1:{XDS_PORT}");
    let mut m = start_mesh("cp-restart", &addr);
    let s = settings(&m.dir, &m.mesh_path, Duration::from_secs(3600));
    let cp = start_cp(&m.topo, s.clone());
    m.agent.wait_ready();
    assert_eq!(hbone_exchange(&m, "one"), "hello one");

    // The control plane dies: traffic keeps flowing on the last state. (The agent started
    // before the control plane, so the same warning is already in the log once.)
    let mark = m.agent.log_mark();
    let terminations = |agent: &Agent| {
        metric_sum(
            &agent.scrape_metrics(),
            "istio_xds_connection_terminations_total",
            &[],
        )
    };
    let terminated_before = terminations(&m.agent);
    drop(cp);
    m.agent.wait_log_after(
        mark,
        &["xDS stream failed; serving the last state and reconnecting"],
    );
    for i in 0..3 {
        assert_eq!(
            hbone_exchange(&m, &format!("down{i}")),
            format!("hello down{i}")
        );
    }
    // Meanwhile the mesh changes; the restarted control plane must deliver it.
    std::fs::write(&m.mesh_path, mesh_yaml(&m.client, &m.server, true, true)).expect("mesh");
    let started = Instant::now();
    let cp = start_cp(&m.topo, s);
    wait_for("the new service over xDS", Duration::from_secs(20), || {
        config_dump(&m.agent)
            .contains("\"extra.default.svc.cluster.local\"")
            .then_some(())
    });
    // Backoff is capped at 15 s; reconnecting took at most that plus the push.
    assert!(
        started.elapsed() < Duration::from_secs(17),
        "{:?}",
        started.elapsed()
    );
    // The reconnect announced what the agent held.
    let subs = cp.subscriptions();
    let address = subs
        .iter()
        .find(|s| s.type_url.ends_with("istio.workload.Address"))
        .expect("address subscription");
    assert!(
        address.held.contains_key("cluster1//v1/Pod/default/server")
            && address.held.values().all(|v| !v.is_empty()),
        "initial_resource_versions: {:?}",
        address.held
    );
    assert_eq!(hbone_exchange(&m, "two"), "hello two");
    let metrics = m.agent.scrape_metrics();
    assert!(
        terminations(&m.agent) > terminated_before,
        "the lost stream was counted: {metrics}"
    );
    assert!(
        metric_sum(
            &metrics,
            "istio_xds_message_total",
            &["istio.workload.Address"]
        ) >= 2
    );
}

#[test]
fn invalid_resource_is_nacked_and_the_rest_applies() {
    if !require_root() {
        return;
    }
    let addr = format!("127.0.0.1:{XDS_PORT}");
    let mut m = start_mesh("cp-nack", &addr);
    let cp = start_cp(
        &m.topo,
        settings(&m.dir, &m.mesh_path, Duration::from_secs(3600)),
    );
    m.agent.wait_ready();

    // One push carries a malformed workload (a 5-byte address) and a valid new service.
    use prost::Message;
    use ztunnel_agent::proto::workload::{address, Address, Workload as PbWorkload};
    let bad = Address {
        r#type: Some(address::Type::Workload(PbWorkload {
            uid: "cluster1//v1/Pod/default/broken".into(),
            name: "broken".into(),
            namespace: "default".into(),
            addresses: vec![vec![10, 244, 1, 99, 1]],
            ..Default::default()
        })),
    };
    cp.inject(
        "type.googleapis.com/istio.workload.Address",
        "cluster1//v1/Pod/default/broken",
        bad.encode_to_vec(),
    );
    std::fs::write(&m.mesh_path, mesh_yaml(&m.client, &m.server, true, true)).expect("mesh");
    let nack = wait_for("a NACK", Duration::from_secs(10), || {
        cp.replies().into_iter().find_map(|r| r.error)
    });
    assert!(
        nack.contains("cluster1//v1/Pod/default/broken")
            && nack.contains("addresses[0] has 5 bytes"),
        "{nack}"
    );
    m.agent
        .wait_log(&["xDS resources rejected (NACK)", "broken"]);
    wait_for("the valid service applied", Duration::from_secs(10), || {
        config_dump(&m.agent)
            .contains("\"extra.default.svc.cluster.local\"")
            .then_some(())
    });
    assert!(!config_dump(&m.agent).contains("\"broken\""));
    assert_eq!(hbone_exchange(&m, "still"), "hello still");
}

/// Sends slowly for `secs` seconds over one connection; returns the echo.
fn slow_transfer(m: &Mesh, secs: u64) -> (String, String) {
    let dst = SocketAddr::new(m.server.ip4, 9080);
    in_netns(&m.client.netns_path(), move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut sent = String::new();
        let end = Instant::now() + Duration::from_secs(secs);
        let mut i = 0u32;
        while Instant::now() < end {
            let chunk = format!("{i:06},");
            s.write_all(chunk.as_bytes()).expect("write during renewal");
            sent.push_str(&chunk);
            i += 1;
            std::thread::sleep(Duration::from_millis(50));
        }
        s.shutdown(std::net::Shutdown::Write).expect("half-close");
        let mut got = String::new();
        s.read_to_string(&mut got).expect("read");
        (format!("hello {sent}"), got)
    })
}

#[test]
fn certificates_renew_under_a_live_transfer_and_roots_rotate() {
    if !require_root() {
        return;
    }
    let addr = format!("127.0.0.1:{XDS_PORT}");
    let mut m = start_mesh("cp-renew", &addr);
    // Four-second certificates: renewed about every two seconds.
    let cp = start_cp(
        &m.topo,
        settings(&m.dir, &m.mesh_path, Duration::from_secs(4)),
    );
    m.agent.wait_ready();
    let server_id = "spiffe://cluster.local/ns/default/sa/server";
    let (expected, got) = slow_transfer(&m, 7);
    assert_eq!(
        got, expected,
        "the tunnel carried every byte across renewals"
    );
    assert!(
        cp.issued(server_id) >= 3,
        "renewed: {}",
        cp.issued(server_id)
    );

    // Root rotation: the new root joins the bundle first, then signs; traffic keeps
    // flowing throughout, old and new leaves both accepted during the overlap.
    let new_root = cp.add_root(&m.dir.join("cp-ca-2"));
    m.agent
        .wait_log(&["mesh root certificates updated", "roots=2"]);
    cp.sign_with(new_root.clone());
    let until = Instant::now() + Duration::from_secs(6);
    let mut n = 0;
    while Instant::now() < until {
        assert_eq!(hbone_exchange(&m, &format!("r{n}")), format!("hello r{n}"));
        n += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let dump = config_dump(&m.agent);
    let v: serde_json::Value = serde_json::from_str(&dump).expect("json");
    let cert = v["certificates"]
        .as_array()
        .expect("certificates")
        .iter()
        .find(|c| c["identity"] == server_id)
        .expect("server certificate");
    assert_eq!(cert["state"], "Available");
    assert_eq!(
        cert["rootCerts"].as_array().map(Vec::len),
        Some(2),
        "{cert}"
    );
    // Every leaf is from the new root by now: the old root leaves the bundle and stops
    // being trusted; traffic carries on.
    cp.retire_roots_but(&new_root);
    m.agent
        .wait_log(&["mesh root certificates updated", "roots=1"]);
    assert_eq!(hbone_exchange(&m, "retired"), "hello retired");
    let v: serde_json::Value = serde_json::from_str(&config_dump(&m.agent)).expect("json");
    let roots = v["certificates"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["identity"] == server_id))
        .and_then(|c| c["rootCerts"].as_array())
        .map(Vec::len);
    assert_eq!(roots, Some(1), "{v}");
    assert_eq!(
        m.agent.lines_with(&["\terror\taccess"]).len(),
        0,
        "no failed connection"
    );
}

#[test]
fn ca_down_or_wrong_keeps_the_node_unready_until_it_recovers() {
    if !require_root() {
        return;
    }
    // xDS on 15012; the CA on 15013, where nothing listens yet.
    let ca_addr = "127.0.0.1:15013";
    let mut m = start_mesh("cp-ca", ca_addr);
    let s = settings(&m.dir, &m.mesh_path, Duration::from_secs(3600));
    let _xds = start_cp(&m.topo, s.clone());
    m.agent.wait_log(&["xDS initial sync complete"]);
    m.agent.wait_log(&["certificate request failed"]);
    let (code, body) = m.agent.http("GET", 15021, "/healthz/ready");
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("certificates ready"), "{body}");
    assert!(
        config_dump(&m.agent).contains("\"state\": \"Unavailable: "),
        "state shown"
    );
    // diagnose names the certificate as the broken link, with the CA's failure.
    let (code, out, err) = m.agent.cli_status(&["diagnose", "default/server"]);
    assert_eq!(code, 1, "{out}{err}");
    let verdict = out.lines().last().unwrap_or_default();
    assert!(
        verdict.starts_with(
            "verdict: NOT HEALTHY, first broken link: certificate: spiffe://cluster.local/ns/default/sa/server Unavailable: "
        ),
        "{out}"
    );
    assert!(
        out.contains("NOT ready: waiting for certificates ready"),
        "{out}"
    );

    // A CA that answers with somebody else's identity is refused.
    let ca = ControlPlane::start(
        s,
        vec![ControlPlane::bind_in(&m.topo.node_path(), 15013)],
        vec![],
    );
    ca.answer_with_wrong_identity(true);
    m.agent.wait_log(&[
        "spiffe://cluster.local/ns/evil/sa/impostor",
        "not spiffe://cluster.local/ns/default/sa/",
    ]);
    assert!(!ready(&m.agent));

    // The CA recovers: certificates arrive, the node turns ready, traffic flows.
    ca.answer_with_wrong_identity(false);
    wait_for("ready", Duration::from_secs(40), || {
        ready(&m.agent).then_some(())
    });
    assert_eq!(hbone_exchange(&m, "ca"), "hello ca");
}

fn config_dump(agent: &Agent) -> String {
    agent.http_get(15000, "/config_dump")
}
