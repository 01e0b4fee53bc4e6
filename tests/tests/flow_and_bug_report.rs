//! `ztunnel-agent diagnose flow` (a connection explained before it is sent, then sent to
//! check the explanation) and `ztunnel-agent bug-report` (the archive, with the agent up and
//! stopped, and no secret in it).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use ztunnel_e2e::agent::Agent;
use ztunnel_e2e::mesh::{self, guide, Workload};
use ztunnel_e2e::require_root;
use ztunnel_e2e::topology::Topology;
use ztunnel_e2e::traffic::{exchange, Server};

/// `diagnose flow` as text and as JSON, each answering within the promised 2 seconds.
fn flow(agent: &Agent, pod: &str, dst: &str) -> (i32, String, Value) {
    let started = Instant::now();
    let (code, out, err) = agent.cli_status(&["diagnose", "flow", pod, dst]);
    let took = started.elapsed();
    println!("$ ztunnel-agent diagnose flow {pod} {dst} ({took:?})\n{out}{err}");
    assert!(took < Duration::from_secs(2), "diagnose flow took {took:?}");
    let (json_code, json, err) = agent.cli_status(&["diagnose", "flow", pod, dst, "--json"]);
    assert_eq!(json_code, code, "same exit with --json: {err}");
    let json: Value = serde_json::from_str(&json).expect("--json prints JSON");
    (code, format!("{out}{err}"), json)
}

/// The step `name`'s line.
fn step<'a>(report: &'a str, name: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no {name} step in:\n{report}"))
}

/// The workload the round robin picks next, from the JSON.
fn next_endpoint(json: &Value) -> String {
    json["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .find(|e| e["next"] == true)
        .and_then(|e| e["workload"].as_str())
        .expect("one endpoint is next")
        .to_string()
}

#[test]
fn diagnose_flow_explains_each_kind_of_destination_and_the_call_lands_as_explained() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::for_test();
    let pods = guide::add_pods(&mut topo);
    let ghost = topo.add_pod("ghost", 20);
    let pod = |name: &str| {
        pods.iter()
            .find(|p| p.name == name)
            .expect("guide pod")
            .clone()
    };
    let servers: Vec<(String, Server)> = [
        "reviews-v1",
        "reviews-v2",
        "reviews-v3",
        "details-v1",
        "ratings-v1",
    ]
    .iter()
    .map(|name| {
        let p = pod(name);
        (
            name.to_string(),
            Server::start(p.netns_path(), SocketAddr::new(p.ip4, 9080)),
        )
    })
    .collect();
    let ratings = pod("ratings-v1");
    let mut yaml = guide::mesh_yaml(&pods, "node", false);
    // In the mesh, never handed to the agent.
    let ghost_yaml = mesh::yaml(
        &[Workload {
            enrolled: false,
            ..Workload::hbone(&ghost, "ghost", "node")
        }],
        &[],
    );
    yaml = yaml.replacen(
        "workloads:\n",
        &format!(
            "workloads:\n{}",
            ghost_yaml.trim_start_matches("workloads:\n")
        ),
        1,
    );
    yaml.push_str(&format!(
        "policies:\n- name: deny-curl-to-ratings\n  namespace: default\n  scope: Namespace\n  action: Deny\n  rules:\n  - - - principals: [{{Exact: cluster.local/ns/default/sa/curl}}]\n        destinationIps: [\"{}\"]\n",
        ratings.ip4
    ));
    let (agent, _) =
        Agent::start_local(&topo, "node", &yaml, &["--exclude-outbound-ports", "2222"]);

    // A service by short name: the VIP, its endpoints, the next pick; then a real call lands
    // on that endpoint, and the next explanation has moved on.
    let (code, report, json) = flow(&agent, "default/productpage-v1", "reviews:9080");
    assert_eq!(code, 0, "{report}");
    assert!(
        step(&report, "destination")
            .contains("reviews is reviews.default.svc.cluster.local (service VIP 10.96.0.14)"),
        "{report}"
    );
    assert!(step(&report, "capture").contains("captured"), "{report}");
    assert!(
        step(&report, "endpoints").contains("3 of 3 endpoints healthy"),
        "{report}"
    );
    assert!(step(&report, "route").contains("HBONE to "), "{report}");
    assert!(
        step(&report, "certificate")
            .contains("spiffe://cluster.local/ns/default/sa/bookinfo-productpage: Available"),
        "{report}"
    );
    assert!(
        step(&report, "authorization").contains("allowed"),
        "{report}"
    );
    assert!(
        report.contains("verdict: the connection would flow"),
        "{report}"
    );
    for _ in 0..2 {
        let (_, _, json) = flow(&agent, "default/productpage-v1", "10.96.0.14:9080");
        let next = next_endpoint(&json);
        let name = next.trim_start_matches("default/");
        let server = &servers
            .iter()
            .find(|(n, _)| n == name)
            .expect("a reviews pod")
            .1;
        let before = server.accepted().len();
        let target: SocketAddr = json["authority"]
            .as_str()
            .expect("authority")
            .parse()
            .expect("addr");
        assert_eq!(
            target.ip(),
            pod(name).ip4,
            "authority is the endpoint: {json}"
        );
        let got = exchange(
            &pod("productpage-v1").netns_path(),
            "10.96.0.14:9080".parse().expect("vip"),
            "rr",
        )
        .expect("call the service");
        assert_eq!(got.response, "hello rr");
        assert_eq!(
            server.accepted().len(),
            before + 1,
            "the call landed on {name}, as explained"
        );
        let (_, _, after) = flow(&agent, "default/productpage-v1", "10.96.0.14:9080");
        assert_ne!(next_endpoint(&after), next, "the round robin moved on");
    }
    assert_eq!(json["service"], "reviews.default.svc.cluster.local");

    // A pod IP: straight to its 15008, with a pooled connection after one call.
    let details = pod("details-v1");
    let dst = format!("{}:9080", details.ip4);
    let (code, report, json) = flow(&agent, "default/productpage-v1", &dst);
    assert_eq!(code, 0, "{report}");
    assert!(
        step(&report, "route")
            .contains(&format!("HBONE to {}:15008, :authority {dst}", details.ip4)),
        "{report}"
    );
    assert!(
        step(&report, "pool").contains("no pooled connection"),
        "{report}"
    );
    assert_eq!(
        json["expectedIdentities"][0],
        "spiffe://cluster.local/ns/default/sa/bookinfo-details"
    );
    exchange(
        &pod("productpage-v1").netns_path(),
        dst.parse().expect("addr"),
        "pool",
    )
    .expect("call details");
    let (_, report, _) = flow(&agent, "default/productpage-v1", &dst);
    assert!(
        step(&report, "pool").contains("1 pooled connection(s)"),
        "{report}"
    );

    // Outside the mesh: passthrough.
    let (code, report, json) = flow(&agent, "default/productpage-v1", "192.0.2.7:443");
    assert_eq!(code, 0, "{report}");
    assert!(
        step(&report, "route").contains(
            "passthrough: plain TCP to 192.0.2.7:443 (the destination is outside the mesh)"
        ),
        "{report}"
    );
    assert_eq!(json["protocol"], "passthrough");

    // An excluded port: not captured, said so, the connection would go out directly.
    let (code, report, json) = flow(
        &agent,
        "default/productpage-v1",
        &format!("{}:2222", details.ip4),
    );
    assert_eq!(code, 0, "{report}");
    assert!(
        step(&report, "capture").contains("not captured: port 2222 is excluded"),
        "{report}"
    );
    assert!(
        report.contains("verdict: the connection would bypass the mesh"),
        "{report}"
    );
    assert_eq!(json["capture"], "ExcludedPort");

    // A denied destination: the policy and its rule named; the real call is refused.
    let (code, report, json) = flow(&agent, "default/curl", "ratings:9080");
    assert_eq!(code, 1, "{report}");
    assert!(
        step(&report, "authorization").contains("denied by DENY policy default/deny-curl-to-ratings (rules[0]) as spiffe://cluster.local/ns/default/sa/curl; enforced by this agent"),
        "{report}"
    );
    assert!(
        report.contains("verdict: the connection would FAIL at authorization"),
        "{report}"
    );
    assert_eq!(
        json["authorization"]["policy"],
        "default/deny-curl-to-ratings"
    );
    let refused = exchange(
        &pod("curl").netns_path(),
        "10.96.0.13:9080".parse().expect("vip"),
        "denied",
    );
    assert!(
        refused.is_err(),
        "the denied call fails, as explained: {refused:?}"
    );
    // The same destination from another pod is allowed.
    let (code, report, _) = flow(&agent, "default/reviews-v1", "ratings:9080");
    assert_eq!(code, 0, "{report}");

    // A pod the mesh knows that was never enrolled, and a pod nobody knows.
    let (code, report, _) = flow(&agent, "default/ghost", "reviews:9080");
    assert_eq!(code, 1, "{report}");
    assert!(
        step(&report, "source").contains("not enrolled on this node"),
        "{report}"
    );
    let (code, report, _) = flow(&agent, "default/nobody", "reviews:9080");
    assert_eq!(code, 1, "{report}");
    assert!(
        step(&report, "source").contains("unknown pod default/nobody"),
        "{report}"
    );
    // A name the mesh does not have, and usage errors.
    let (code, report, _) = flow(&agent, "default/productpage-v1", "nothere:80");
    assert_eq!(code, 1, "{report}");
    assert!(
        step(&report, "destination").contains("not a mesh name"),
        "{report}"
    );
    let (code, _, err) = agent.cli_status(&["diagnose", "flow", "default/curl", "reviews"]);
    assert_eq!(code, 2);
    assert!(err.contains("<host-or-ip>:<port>"), "{err}");
}
