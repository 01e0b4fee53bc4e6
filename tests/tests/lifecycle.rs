//! Enrollment over ZDS, agent restarts, and refusals at start-up.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use ztunnel_agent::zds_proto::Version;
use ztunnel_e2e::agent::{agent_binary, Agent};
use ztunnel_e2e::mesh::{self, Workload};
use ztunnel_e2e::topology::Topology;
use ztunnel_e2e::traffic::{exchange, in_netns, Server};
use ztunnel_e2e::{require_root, sh};

#[test]
fn zds_add_del_and_malformed_messages() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::for_test();
    let client = topo.add_pod("client", 10);
    let server_pod = topo.add_pod("server", 11);
    let server = Server::start(
        server_pod.netns_path(),
        SocketAddr::new(server_pod.ip4, 9080),
    );
    let (cni, mut agent, hello) = ztunnel_e2e::cni::start_with_agent(&topo, &[]);
    assert_eq!(hello.version, Version::V1 as i32);
    assert_eq!(cni.add("uid-client", "client", &client.netns_path()), "");
    assert_eq!(cni.snapshot_sent(), "");
    agent.wait_ready();

    let dst = SocketAddr::new(server_pod.ip4, 9080);
    let got = exchange(&client.netns_path(), dst, "zds").expect("captured connection");
    assert_eq!(got.response, "hello zds");
    assert_eq!(got.peer, dst);
    agent.wait_log(&["captured connection", &format!("original_dst={dst}")]);
    // The pod's addresses were read from its interfaces (ZDS does not carry them).
    let dump = agent.dump();
    assert!(
        dump.contains(&client.ip4.to_string()) && dump.contains(&client.ip6.to_string()),
        "{dump}"
    );

    // Malformed input is refused with a reason and the session carries on.
    let nack = cni.send_raw(&[0xff, 0xff, 0xff], None);
    assert!(nack.contains("malformed WorkloadRequest"), "{nack}");
    // Tag 4 is the oneof member upstream removed (NoSnapshotPresent): decodes, no payload.
    let nack = cni.send_raw(&[0x22, 0x00], None);
    assert!(nack.contains("without payload"), "{nack}");
    let nack = cni.send(
        ztunnel_agent::zds_proto::workload_request::Payload::Add(
            ztunnel_agent::zds_proto::AddWorkload {
                uid: "uid-nofd".into(),
                workload_info: None,
            },
        ),
        None,
    );
    assert!(nack.contains("no network namespace fd"), "{nack}");
    let netns = std::fs::File::open(client.netns_path()).expect("netns");
    let nack = cni.send(
        ztunnel_agent::zds_proto::workload_request::Payload::Del(
            ztunnel_agent::zds_proto::DelWorkload {
                uid: "uid-other".into(),
            },
        ),
        Some(&netns),
    );
    assert!(nack.contains("unexpected file descriptor"), "{nack}");
    assert!(agent.is_running());

    // del releases the pod: no capture, listeners closed.
    assert_eq!(cni.del("uid-client"), "");
    agent.wait_log(&["pod removed", "uid=uid-client"]);
    let got = exchange(&client.netns_path(), dst, "gone").expect("direct connection");
    assert_eq!(server.accepted().last().expect("accepted").peer, got.local);
    let open = in_netns(&client.netns_path(), || {
        std::net::TcpStream::connect(("127.0.0.1", 15001)).is_ok()
    });
    assert!(!open, "15001 still open after del");
    assert_eq!(
        cni.del("uid-unknown"),
        "",
        "del of an unknown pod is not an error"
    );
}

/// The capture programs attached at `cgroup`, as bpftool reports them.
fn attached(cgroup: &str) -> Vec<String> {
    sh("bpftool", &["cgroup", "show", cgroup])
        .lines()
        .filter(|l| l.contains("ztunnel_"))
        .map(str::to_string)
        .collect()
}

#[test]
fn restart_reuses_pinned_state() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::for_test();
    let client = topo.add_pod("client", 10);
    let server_pod = topo.add_pod("server", 11);
    // A cgroup of its own, so bpftool's view holds only this agent's programs.
    let root = ztunnel_agent::redirect::kernel::cgroup2_root().expect("cgroup2 mounted");
    let cgroup = root.join(&topo.prefix);
    let _ = std::fs::create_dir(&cgroup);
    let cgroup_arg = cgroup.display().to_string();
    let yaml = mesh::yaml(&[Workload::hbone(&client, "client", "node-1")], &[]);
    let config_arg = Agent::write_local_config(&topo, &yaml)
        .display()
        .to_string();
    let mut agent = Agent::start(
        &topo,
        &[
            "--node-name",
            "node-1",
            "--local-xds-path",
            &config_arg,
            "--cgroup-path",
            &cgroup_arg,
        ],
    );
    agent.wait_ready();
    let first = attached(&cgroup_arg);
    // Capture (connect4|6), original destination (sockops, sock_release, getpeername4|6)
    // and DNS (sendmsg4|6, recvmsg4|6).
    assert_eq!(first.len(), 10, "ten programs at the cgroup: {first:?}");
    let _server = Server::start(
        server_pod.netns_path(),
        SocketAddr::new(server_pod.ip4, 9080),
    );

    // A client process inside the cgroup and the pod (bash's /dev/tcp: a plain connect()).
    let client_in_cgroup = |payload: &str| -> String {
        let script = format!(
            "echo $$ > {cg}/cgroup.procs && exec 3<>/dev/tcp/{ip}/9080 && printf {payload} >&3 && exec 3>&- ; cat <&3",
            cg = cgroup_arg,
            ip = server_pod.ip4,
        );
        let out = Command::new("nsenter")
            .arg(format!("--net={}", client.netns_path().display()))
            .args(["bash", "-c", &script])
            .output()
            .expect("run client");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let _ = client_in_cgroup("one");
    agent.wait_log(&["captured connection", "original_dst=10.244.1.11:9080"]);

    // Stopped: links stay pinned and attached, so the pod stays captured (fail closed).
    assert!(agent.stop().success(), "SIGTERM exits 0");
    assert_eq!(
        attached(&cgroup_arg),
        first,
        "pinned links outlive the agent"
    );

    agent.restart(1);
    agent.wait_ready();
    for line in agent.lines_with(&["eBPF program"]) {
        assert!(line.contains("state=Reused"), "{line}");
    }
    assert_eq!(agent.lines_with(&["state=Reused"]).len(), 10);
    assert_eq!(
        attached(&cgroup_arg),
        first,
        "no duplicate attachments after restart"
    );
    let links = sh("bpftool", &["link", "show"]);
    let inbound_links = agent
        .dump()
        .lines()
        .filter(|l| l.contains("inbound-"))
        .count();
    assert_eq!(
        inbound_links, 1,
        "one sk_lookup link for the one pod:\n{links}"
    );
    let _ = client_in_cgroup("two");
    agent.wait_log(&["captured connection", "original_dst=10.244.1.11:9080"]);
    drop(agent);
    let _ = std::fs::remove_dir(&cgroup);
}

/// Runs the agent expecting it to refuse to start; returns stderr+stdout.
fn refused(args: &[&str]) -> String {
    let out = Command::new(agent_binary())
        .arg("run")
        .args(args)
        .output()
        .expect("run agent");
    assert!(!out.status.success(), "agent started with {args:?}");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn refuses_to_start_without_what_it_needs() {
    if !require_root() {
        return;
    }
    let dir = std::env::temp_dir().join("zt-refuse");
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("mesh.yaml");
    std::fs::write(&config, "workloads: []\n").expect("config");
    let cfg = config.display().to_string();
    let base = ["--node-name", "n", "--local-xds-path", cfg.as_str()];

    let err = refused(&[&base[..], &["--pin-dir", "/tmp/zt-refuse/pins"]].concat());
    assert!(err.contains("bpffs"), "{err}");
    let err = refused(&[&base[..], &["--cgroup-path", "/tmp"]].concat());
    assert!(err.contains("is not a cgroup v2 directory"), "{err}");
    let err = refused(&[&base[..], &["--admin-addr", "0.0.0.0:15000"]].concat());
    assert!(err.contains("not a loopback address"), "{err}");
    let err = refused(&["--local-xds-path", cfg.as_str()]);
    assert!(err.contains("NODE_NAME"), "{err}");
    std::fs::write(&config, "workloads:\n- name: a\n  workloadIps: 7\n").expect("config");
    let err = refused(&[&base[..], &["--pin-dir", "/sys/fs/bpf/zt-refuse"]].concat());
    assert!(
        err.contains(&cfg) && err.contains("workloads[0].workloadIps") && err.contains("line 3"),
        "{err}"
    );
    let _ = Command::new(agent_binary())
        .args([
            "redirect",
            "uninstall",
            "--pin-dir",
            "/sys/fs/bpf/zt-refuse",
        ])
        .output();
}

#[test]
fn pinned_maps_of_another_layout_are_refused_not_reused() {
    if !require_root() {
        return;
    }
    let topo = Topology::for_test();
    let pins = format!("/sys/fs/bpf/{}", topo.prefix);
    let _ = Command::new(agent_binary())
        .args(["redirect", "uninstall", "--pin-dir", &pins])
        .output();
    std::fs::create_dir_all(&pins).expect("pin dir");
    // ENROLLED_PODS as an incompatible agent version might have left it: 4-byte values.
    let map = format!("{pins}/ENROLLED_PODS");
    sh(
        "bpftool",
        &[
            "map",
            "create",
            &map,
            "type",
            "hash",
            "key",
            "8",
            "value",
            "4",
            "entries",
            "16",
            "name",
            "ENROLLED_PODS",
        ],
    );
    let dir = std::env::temp_dir().join(&topo.prefix);
    std::fs::create_dir_all(&dir).expect("dir");
    let config = dir.join("mesh.yaml");
    std::fs::write(&config, "workloads: []\n").expect("config");
    let ca = dir.join("ca").display().to_string();
    // In the node namespace, so its admin ports are its own.
    let out = Command::new("nsenter")
        .arg(format!("--net={}", topo.node_path().display()))
        .arg(agent_binary())
        .args(["run", "--node-name", "n", "--local-xds-path"])
        .arg(&config)
        .args(["--pin-dir", &pins, "--ca-dir", &ca])
        .output()
        .expect("run agent");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "started on a foreign map: {err}");
    assert!(
        err.contains(&map) && err.contains("value 4 B") && err.contains("redirect uninstall"),
        "{err}"
    );
    // Untouched: still the foreign map, not reused or replaced.
    let shown = sh("bpftool", &["map", "show", "pinned", &map]);
    assert!(shown.contains("value 4B"), "{shown}");
    let _ = Command::new(agent_binary())
        .args(["redirect", "uninstall", "--pin-dir", &pins])
        .output();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn admin_logging_quit_and_loopback_only() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::for_test();
    let client = topo.add_pod("client", 10);
    let server = topo.add_pod("server", 11);
    let outsider = topo.add_pod("outsider", 12);
    let _app = Server::start(server.netns_path(), SocketAddr::new(server.ip4, 9080));
    let yaml = mesh::yaml(
        &[
            Workload::hbone(&client, "curl", "node-1"),
            Workload::hbone(&server, "server", "node-1"),
        ],
        &[],
    );
    let (mut agent, _) = Agent::start_local(&topo, "node-1", &yaml, &[]);
    let dst = SocketAddr::new(server.ip4, 9080);
    let closed = |agent: &Agent| {
        ztunnel_e2e::metric_sum(
            &agent.scrape_metrics(),
            "istio_tcp_connections_closed_total",
            &["reporter=\"source\""],
        )
    };

    // /logging shows the filter and changes it at run time.
    let (status, body) = agent.http("GET", 15000, "/logging");
    assert_eq!(status, 200);
    assert!(body.contains("info,ztunnel_agent::proxy=debug"), "{body}");
    let (status, _) = agent.http("POST", 15000, "/logging?level=info,access=off");
    assert_eq!(status, 200);
    exchange(&client.netns_path(), dst, "quiet").expect("traffic");
    ztunnel_e2e::wait_for("counted", Duration::from_secs(10), || {
        (closed(&agent) == 1).then_some(())
    });
    assert!(
        agent.lines_with(&["connection complete"]).is_empty(),
        "access=off took effect"
    );
    let (status, _) = agent.http("POST", 15000, "/logging?level=info");
    assert_eq!(status, 200);
    exchange(&client.netns_path(), dst, "loud").expect("traffic");
    agent.wait_log(&["connection complete", "direction=\"outbound\""]);
    let (status, body) = agent.http("POST", 15000, "/logging?level=info,=[");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid log filter"), "{body}");

    // The admin port answers on loopback only: from the pod network the node's readiness
    // port is reachable, its admin port is not.
    let node_ip = std::net::Ipv4Addr::new(10, 244, 1, 1);
    let reach = |port: u16| {
        in_netns(&outsider.netns_path(), move || {
            std::net::TcpStream::connect_timeout(
                &SocketAddr::from((node_ip, port)),
                Duration::from_secs(2),
            )
            .is_ok()
        })
    };
    assert!(reach(15021), "readiness reachable from the pod network");
    assert!(
        !reach(15000),
        "admin must not be reachable from the pod network"
    );

    // /quitquitquit stops the agent cleanly.
    let (status, _) = agent.http("POST", 15000, "/quitquitquit");
    assert_eq!(status, 200);
    assert!(
        agent.wait_exit(Duration::from_secs(10)).success(),
        "exits 0"
    );
}
