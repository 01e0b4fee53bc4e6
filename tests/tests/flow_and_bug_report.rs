//! `ztunnel-agent diagnose flow` (a connection explained before it is sent, then sent to
//! check the explanation) and `ztunnel-agent bug-report` (the archive, with the agent up and
//! stopped, and no secret in it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use ztunnel_e2e::agent::Agent;
use ztunnel_e2e::mesh::{self, guide, Workload};
use ztunnel_e2e::require_root;
use ztunnel_e2e::topology::Topology;
use ztunnel_e2e::traffic::{exchange, Server};
use ztunnel_e2e::xds_mesh::{hbone_exchange, settings, start_cp, start_mesh, TOKEN, XDS_PORT};

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
            .contains("spiffe://cluster.local/ns/default/sa/bookinfo-productpage: valid until"),
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
        step(&report, "pool").contains("1 pooled connection(s)")
            && step(&report, "pool").contains("the connection reuses one"),
        "{report}"
    );
    assert!(
        step(&report, "certificate").contains("not needed now"),
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
        report.contains("verdict: the connection is not captured"),
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
    // ... by that policy, as the destination's recent failures say.
    ztunnel_e2e::wait_for("the denial recorded", Duration::from_secs(5), || {
        agent
            .http_get(15000, "/debug/connections")
            .contains("connection closed due to policy rejection: default/deny-curl-to-ratings")
            .then_some(())
    });
    // The same destination from another pod is allowed, and the call goes through.
    let (code, report, _) = flow(&agent, "default/reviews-v1", "ratings:9080");
    assert_eq!(code, 0, "{report}");
    let got = exchange(
        &pod("reviews-v1").netns_path(),
        "10.96.0.13:9080".parse().expect("vip"),
        "allowed",
    )
    .expect("the allowed call");
    assert_eq!(got.response, "hello allowed");

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

/// Extracts a bug-report archive; its root directory and the files under it (relative).
fn extract(archive: &Path, into: &Path) -> (PathBuf, Vec<String>) {
    let _ = std::fs::remove_dir_all(into);
    std::fs::create_dir_all(into).expect("extract dir");
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(archive)
        .arg("-C")
        .arg(into)
        .status()
        .expect("run tar");
    assert!(status.success(), "the archive is a valid .tar.gz");
    let roots: Vec<PathBuf> = std::fs::read_dir(into)
        .expect("extracted")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(roots.len(), 1, "one root directory: {roots:?}");
    let root = roots[0].clone();
    assert!(
        root.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("ztunnel-bug-report-")),
        "{root:?}"
    );
    let mut files = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else {
                files.push(
                    path.strip_prefix(&root)
                        .expect("under root")
                        .display()
                        .to_string(),
                );
            }
        }
    }
    files.sort();
    (root, files)
}

/// Runs `bug-report` in the agent's node; (exit code, stderr).
fn bug_report(agent: &Agent, out: &Path) -> (i32, String) {
    let started = Instant::now();
    let out = out.display().to_string();
    let pin_dir = agent.pin_dir().display().to_string();
    let (code, stdout, stderr) =
        agent.cli_status(&["bug-report", "-o", &out, "--pin-dir", &pin_dir]);
    let took = started.elapsed();
    println!("$ ztunnel-agent bug-report -o {out} ({took:?})\n{stdout}{stderr}");
    assert!(took < Duration::from_secs(2), "bug-report took {took:?}");
    (code, stderr)
}

#[test]
fn bug_report_collects_with_the_agent_up_and_stopped_and_holds_no_secret() {
    if !require_root() {
        return;
    }
    let mut m = start_mesh("cp-bugrep", &format!("127.0.0.1:{XDS_PORT}"));
    let _cp = start_cp(
        &m.topo,
        settings(&m.dir, &m.mesh_path, Duration::from_secs(3600)),
    );
    m.agent.wait_ready();
    assert_eq!(hbone_exchange(&m, "report"), "hello report");

    // With the agent up: every file, nothing missing.
    let archive = m.dir.join("up.tar.gz");
    let (code, stderr) = bug_report(&m.agent, &archive);
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.is_empty(), "nothing missing: {stderr}");
    let (root, files) = extract(&archive, &m.dir.join("up"));
    let mut want: Vec<String> = [
        "README.txt",
        "version.txt",
        "kernel-checks.txt",
        "settings.json",
        "config_dump.json",
        "diagnose.json",
        "diagnose.txt",
        "control-plane.json",
        "connections.json",
        "logs.txt",
        "metrics.txt",
        "redirect-dump.txt",
        "bpftool-links.txt",
        "bpftool-programs.txt",
    ]
    .map(String::from)
    .to_vec();
    want.extend(
        [
            "ENROLLED_PODS",
            "POD_ADDRS",
            "EXCLUDED_OUTBOUND_PORTS",
            "EXCLUDED_INBOUND_PORTS",
            "ORIG_DST_BY_SOCKET",
            "ORIG_DST",
            "INBOUND_LISTENERS",
            "POD_COUNTERS",
            "DNS_COUNTERS",
            "AGENT_DIALS",
        ]
        .map(|m| format!("maps/{m}.json")),
    );
    want.sort();
    assert_eq!(files, want);
    let read = |name: &str| std::fs::read_to_string(root.join(name)).expect(name);
    assert!(read("README.txt").contains("nothing is missing"));
    assert!(read("version.txt").contains("kernel: Linux"));
    assert!(read("kernel-checks.txt").contains("kernel version and capabilities: ok"));
    let settings_json: Value = serde_json::from_str(&read("settings.json")).expect("JSON");
    assert_eq!(settings_json["xdsAddress"], format!("127.0.0.1:{XDS_PORT}"));
    assert!(
        read("config_dump.json").contains("10.96.0.50"),
        "the service"
    );
    assert!(read("diagnose.txt").contains("2 enrolled, all healthy"));
    let control_plane: Value = serde_json::from_str(&read("control-plane.json")).expect("JSON");
    assert!(
        control_plane["certificates"]
            .as_array()
            .is_some_and(|c| c.iter().all(|c| c["state"] == "Available")),
        "{control_plane}"
    );
    assert!(read("connections.json").contains("\"dst\": \"10.244.1.11:15008\""));
    assert!(
        read("logs.txt").contains("connection complete"),
        "the access log"
    );
    assert!(read("metrics.txt").contains("istio_tcp_connections_opened_total"));
    assert!(read("redirect-dump.txt").contains("pin directory"));
    let enrolled: Value =
        serde_json::from_str(&read("maps/ENROLLED_PODS.json")).expect("bpftool JSON");
    assert_eq!(enrolled.as_array().map(Vec::len), Some(2), "{enrolled}");

    // No secret: the token, the CA's private key, any private key at all.
    let ca_key = std::fs::read_to_string(m.dir.join("cp-ca/root-key.pem")).expect("CA key");
    let key_lines: Vec<&str> = ca_key.lines().filter(|l| !l.starts_with("-----")).collect();
    assert!(!key_lines.is_empty());
    for name in &files {
        let text = read(name);
        assert!(!text.contains(TOKEN), "the token is in {name}");
        assert!(!text.contains("PRIVATE KEY"), "a private key is in {name}");
        // Nothing had to be cut either: no collector picked up key material at all.
        assert!(
            !text.contains("[private key redacted]"),
            "a private key reached {name} (cut by redaction)"
        );
        for line in &key_lines {
            assert!(!text.contains(line), "the CA key is in {name}");
        }
    }

    // With the agent stopped: what the kernel still holds, and the rest named as missing.
    m.agent.stop();
    let archive = m.dir.join("down.tar.gz");
    let (code, stderr) = bug_report(&m.agent, &archive);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stderr.contains("not collected: settings.json, config_dump.json, diagnose.json"),
        "{stderr}"
    );
    let (root, files) = extract(&archive, &m.dir.join("down"));
    let read = |name: &str| std::fs::read_to_string(root.join(name)).expect(name);
    for gone in ["config_dump.json", "logs.txt", "metrics.txt"] {
        assert!(!files.contains(&gone.to_string()), "{files:?}");
    }
    let readme = read("README.txt");
    assert!(
        readme.contains("missing (could not be collected):"),
        "{readme}"
    );
    assert!(
        readme.contains("cannot reach the agent's admin endpoint"),
        "{readme}"
    );
    // The redirect outlives the agent: the pods are still captured, and the archive says so.
    let enrolled: Value =
        serde_json::from_str(&read("maps/ENROLLED_PODS.json")).expect("bpftool JSON");
    assert_eq!(enrolled.as_array().map(Vec::len), Some(2), "{enrolled}");
    assert!(read("redirect-dump.txt").contains("pin directory"));
}
