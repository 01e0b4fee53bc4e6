//! `ztunnel-agent diagnose`: healthy on a healthy pod, and the first broken link named when a
//! pod is not enrolled or its listener is gone (the certificate case is in control_plane.rs,
//! where a CA can be down).

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use ztunnel_e2e::agent::Agent;
use ztunnel_e2e::mesh::{self, Workload};
use ztunnel_e2e::require_root;
use ztunnel_e2e::topology::Topology;
use ztunnel_e2e::traffic::{exchange, in_netns, Server};

/// Runs `diagnose` and checks it answered within the promised 5 seconds.
fn diagnose(agent: &Agent, args: &[&str]) -> (i32, String) {
    let mut full = vec!["diagnose"];
    full.extend_from_slice(args);
    let started = Instant::now();
    let (code, out, err) = agent.cli_status(&full);
    let took = started.elapsed();
    println!("$ ztunnel-agent {} ({took:?})\n{out}{err}", full.join(" "));
    assert!(took < Duration::from_secs(5), "diagnose took {took:?}");
    (code, format!("{out}{err}"))
}

/// The line of check `name` in a report.
fn line<'a>(report: &'a str, name: &str) -> &'a str {
    report
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(name))
        .unwrap_or_else(|| panic!("no {name} line in:\n{report}"))
}

/// Inode of the socket listening on `port` in the namespace at `netns` (its socket table).
fn listening_inode(netns: &Path, port: u16) -> u64 {
    let table = in_netns(netns, || {
        std::fs::read_to_string("/proc/thread-self/net/tcp").expect("socket table")
    });
    let local = format!(":{port:04X}");
    table
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(1).is_some_and(|a| a.ends_with(&local)) && f.get(3) == Some(&"0A"))
        .and_then(|f| f.get(9).and_then(|i| i.parse().ok()))
        .unwrap_or_else(|| panic!("nothing listens on {port}:\n{table}"))
}

/// Shuts down, from outside, the agent's socket with inode `inode` (as a kernel or operator
/// accident would): duplicates it out of the agent with pidfd_getfd and calls shutdown(2).
fn shut_down_agent_socket(pid: u32, inode: u64) {
    let wanted = format!("socket:[{inode}]");
    let fd: i32 = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("agent fds")
        .flatten()
        .find(|e| {
            std::fs::read_link(e.path()).is_ok_and(|t| t.to_string_lossy() == wanted.as_str())
        })
        .and_then(|e| e.file_name().to_str().and_then(|n| n.parse().ok()))
        .expect("the agent holds the listener");
    let pid = libc::pid_t::try_from(pid).expect("pid");
    // SAFETY: pidfd_open takes a pid and flags; it returns a new fd or -1.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: pidfd_open returned a new fd that nothing else owns.
    let pidfd = unsafe { OwnedFd::from_raw_fd(i32::try_from(pidfd).expect("fd")) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&pidfd);
    // SAFETY: pidfd_getfd takes a pidfd, the target's fd number and flags; it returns a new
    // fd or -1.
    let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, raw, fd, 0) };
    assert!(dup >= 0, "pidfd_getfd: {}", std::io::Error::last_os_error());
    // SAFETY: pidfd_getfd returned a new fd that nothing else owns.
    let dup = unsafe { OwnedFd::from_raw_fd(i32::try_from(dup).expect("fd")) };
    // SAFETY: shutdown on a valid socket fd.
    let rc = unsafe { libc::shutdown(std::os::fd::AsRawFd::as_raw_fd(&dup), libc::SHUT_RDWR) };
    assert_eq!(rc, 0, "shutdown: {}", std::io::Error::last_os_error());
}

#[test]
fn diagnose_healthy_then_not_enrolled_then_listener_gone() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::for_test();
    let client = topo.add_pod("client", 10);
    let server = topo.add_pod("server", 11);
    let ghost = topo.add_pod("ghost", 12);
    let _app = Server::start(server.netns_path(), SocketAddr::new(server.ip4, 9080));
    let workloads = [
        Workload::hbone(&client, "client", "node"),
        Workload::hbone(&server, "server", "node"),
        // In the mesh, on this node, but never handed to the agent.
        Workload {
            enrolled: false,
            ..Workload::hbone(&ghost, "ghost", "node")
        },
    ];
    let (mut agent, _) = Agent::start_local(&topo, "node", &mesh::yaml(&workloads, &[]), &[]);

    // Healthy: traffic flows, every link holds, with its evidence.
    for i in 0..3 {
        let got = exchange(
            &client.netns_path(),
            SocketAddr::new(server.ip4, 9080),
            &format!("diag{i}"),
        )
        .expect("mesh traffic");
        assert_eq!(got.response, format!("hello diag{i}"));
    }
    ztunnel_e2e::wait_for("three inbound lines", Duration::from_secs(10), || {
        let lines = agent.lines_with(&["connection complete", "direction=\"inbound\""]);
        (lines.len() >= 3).then_some(())
    });
    let (code, report) = diagnose(&agent, &["default/server"]);
    assert_eq!(code, 0, "{report}");
    assert!(report.contains("verdict: healthy"), "{report}");
    assert!(
        line(&report, "programs").contains("cgroup programs attached to"),
        "{report}"
    );
    assert!(
        report.contains("ztunnel_connect4: link ") && report.contains(" program "),
        "link and program ids shown: {report}"
    );
    assert!(
        line(&report, "enrolled").contains("netns cookie"),
        "{report}"
    );
    assert!(
        line(&report, "kernel").contains("in ENROLLED_PODS"),
        "{report}"
    );
    let listeners = line(&report, "listeners");
    for port in [15001, 15006, 15008] {
        assert!(listeners.contains(&format!(":{port}")), "{report}");
    }
    assert!(
        line(&report, "certificate")
            .contains("spiffe://cluster.local/ns/default/sa/server Available"),
        "{report}"
    );
    // The server's recent connections: three inbound, each from the client's identity.
    let conns = line(&report, "connections");
    assert!(conns.contains("last 3 completed without error"), "{report}");
    assert!(
        report.contains("peer spiffe://cluster.local/ns/default/sa/client"),
        "{report}"
    );

    // The client's outbound capture shows in its counters.
    let (code, report) = diagnose(&agent, &["default/client"]);
    assert_eq!(code, 0, "{report}");
    assert!(report.contains("outbound_captured=3"), "{report}");

    // The node view: one row per pod, all healthy.
    let (code, node) = diagnose(&agent, &[]);
    assert_eq!(code, 0, "{node}");
    assert!(node.contains("2 enrolled, all healthy"), "{node}");
    assert!(
        node.contains("NAMESPACE") && node.contains("CAPTURED OUT/IN"),
        "{node}"
    );

    // Not enrolled: the mesh knows the pod, the agent never got its namespace.
    let (code, report) = diagnose(&agent, &["default/ghost"]);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains("first broken link: enrolled: not enrolled: the mesh knows the workload"),
        "{report}"
    );
    // A name nobody knows.
    let (code, report) = diagnose(&agent, &["default/nobody"]);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains("has no workload default/nobody"),
        "{report}"
    );
    // A malformed argument is a usage error.
    let (code, report) = diagnose(&agent, &["server"]);
    assert_eq!(code, 2, "{report}");
    assert!(report.contains("<namespace>/<pod>"), "{report}");

    // The server's inbound plaintext listener is shut down behind the agent's back.
    let inode = listening_inode(&server.netns_path(), 15006);
    shut_down_agent_socket(agent.pid().expect("agent pid"), inode);
    agent.wait_log(&["listener closed", "pod=server"]);
    let (code, report) = diagnose(&agent, &["default/server"]);
    assert_eq!(code, 1, "{report}");
    let verdict = report.lines().last().unwrap_or_default();
    assert!(
        verdict.contains("first broken link: listeners: 0.0.0.0:15006 is not listening"),
        "{report}"
    );
    assert!(
        verdict.contains("no ipv4 15006 listener in INBOUND_LISTENERS"),
        "the kernel map lost it too: {report}"
    );
    // The node view names the broken pod; the client is unaffected.
    let (code, node) = diagnose(&agent, &[]);
    assert_eq!(code, 1, "{node}");
    assert!(node.contains("default/server: listeners"), "{node}");
    let (code, report) = diagnose(&agent, &["default/client"]);
    assert_eq!(code, 0, "{report}");
    // HBONE to the server (15008) still works.
    let got = exchange(
        &client.netns_path(),
        SocketAddr::new(server.ip4, 9080),
        "after",
    )
    .expect("mesh traffic after the 15006 listener died");
    assert_eq!(got.response, "hello after");
}

#[test]
fn detached_links_are_named_and_a_restart_attaches_them_again() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::for_test();
    let client = topo.add_pod("client", 10);
    let server = topo.add_pod("server", 11);
    let _app = Server::start(server.netns_path(), SocketAddr::new(server.ip4, 9080));
    let workloads = [
        Workload::hbone(&client, "client", "node"),
        Workload::hbone(&server, "server", "node"),
    ];
    let (mut agent, _) = Agent::start_local(&topo, "node", &mesh::yaml(&workloads, &[]), &[]);
    let dst = SocketAddr::new(server.ip4, 9080);
    assert_eq!(
        exchange(&client.netns_path(), dst, "one")
            .expect("mesh traffic")
            .response,
        "hello one"
    );
    let (code, report) = diagnose(&agent, &[]);
    assert_eq!(code, 0, "{report}");

    // Someone detaches the outbound capture program's link (`bpftool link detach`): the
    // client's traffic would bypass the mesh without a word; diagnose names it.
    let links = agent.pin_dir().join("links");
    let detach = |name: &str| {
        let out = std::process::Command::new("bpftool")
            .args(["link", "detach", "pinned"])
            .arg(links.join(name))
            .output()
            .expect("bpftool");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    detach("ztunnel_connect4");
    let (code, report) = diagnose(&agent, &["default/client"]);
    assert_eq!(code, 1, "{report}");
    assert!(
        report.contains("first broken link: programs: ztunnel_connect4 link ")
            && report.contains("is detached from its cgroup"),
        "{report}"
    );
    // The server's inbound steering link too.
    // (--json prints the evidence; the exit status still says the node is broken.)
    let (code, json, _) =
        agent.cli_status(&["diagnose", "default/server", "--json", "--window-ms", "0"]);
    assert_eq!(code, 1);
    let evidence: serde_json::Value = serde_json::from_str(&json).expect("evidence JSON");
    let cookie = evidence["pods"][0]["netnsCookie"].as_u64().expect("cookie");
    detach(&format!("inbound-{cookie}"));
    let (code, report) = diagnose(&agent, &["default/server"]);
    assert_eq!(code, 1, "{report}");
    assert!(
        line(&report, "kernel").contains("is detached from the pod's netns"),
        "{report}"
    );

    // A restart replaces the detached links instead of keeping their pins.
    agent.restart(1);
    agent.wait_ready();
    let (code, report) = diagnose(&agent, &[]);
    assert_eq!(code, 0, "{report}");
    assert!(agent.log().contains("state=Replaced"), "{}", agent.log());
    assert_eq!(
        exchange(&client.netns_path(), dst, "two")
            .expect("mesh traffic after the restart")
            .response,
        "hello two"
    );
    agent.wait_log(&[
        "connection complete",
        "direction=\"outbound\"",
        "bytes_sent=3",
    ]);
}
