//! Upgrades and restarts that lose nothing: an overlapping handover between two agents, the
//! drain on SIGTERM, resets passed on, keepalive, and running out of file descriptors.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ztunnel_e2e::agent::Agent;
use ztunnel_e2e::cni::CniServer;
use ztunnel_e2e::mesh::{self, Workload};
use ztunnel_e2e::one_hop::OneHop;
use ztunnel_e2e::topology::Topology;
use ztunnel_e2e::traffic::{exchange, in_netns, ConnectionStream, HashServer, Server, Transfer};
use ztunnel_e2e::{metric_sum, require_root, sh, wait_for};

/// The readiness status code of `agent`.
fn readiness(agent: &Agent) -> u16 {
    agent.http("GET", 15021, "/healthz/ready").0
}

#[test]
fn overlapping_upgrade_cuts_and_refuses_nothing() {
    if !require_root() {
        return;
    }
    let (mut topo, client, server, yaml) = mesh::client_and_server();
    // Not enrolled: its connections reach the server's 15006 (inbound plaintext).
    let outsider = topo.add_pod("outsider", 12);
    let (mut old, _) = Agent::start_local(&topo, "node-1", &yaml, &[]);
    for pod in [&client, &server] {
        let migrate = sh(
            "ip",
            &[
                "netns",
                "exec",
                &pod.netns,
                "sysctl",
                "-n",
                "net.ipv4.tcp_migrate_req",
            ],
        );
        assert_eq!(
            migrate.trim(),
            "1",
            "{}: a closing listener's queue moves to the other agent's",
            pod.name
        );
    }
    let app = SocketAddr::new(server.ip4, 9080);
    let _app = Server::start(server.netns_path(), app);
    let bulk = SocketAddr::new(server.ip4, 9090);
    let _bulk = HashServer::start(&server.netns_path(), bulk);

    // Under load: a long checksummed transfer through the tunnel, and new connections
    // without pause, over HBONE (client) and plaintext (outsider).
    let transfer = Transfer::start(&client.netns_path(), bulk, 7);
    let hbone = ConnectionStream::start(&client.netns_path(), app);
    let plain = ConnectionStream::start(&outsider.netns_path(), app);
    wait_for("the transfer under way", Duration::from_secs(10), || {
        (transfer.sent() > 1 << 20).then_some(())
    });

    // The new agent starts beside the old one (a surge rollout), in its own namespace.
    let mut new = Agent::start_beside(&old, topo.add_bare_netns("new-agent"), "new-agent", None);
    new.wait_ready();
    assert_eq!(
        new.lines_with(&["removed a pod left over"]),
        Vec::<String>::new(),
        "the new agent swept none of the pods the old one serves"
    );
    assert_eq!(readiness(&old), 200);

    // Then the old one drains: not ready at once, its live transfer runs on.
    old.signal(libc::SIGTERM);
    wait_for("the old agent unready", Duration::from_secs(2), || {
        (readiness(&old) == 503).then_some(())
    });
    let sent_at_term = transfer.sent();
    wait_for("the transfer still moving", Duration::from_secs(10), || {
        (transfer.sent() > sent_at_term + (4 << 20)).then_some(())
    });
    let done = transfer.finish().expect("the transfer completes");
    assert_eq!(done.echoed, done.sent, "every byte arrived, intact");
    let status = old.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "the old agent exits 0: {status}");
    old.wait_log(&["drained; exiting"]);

    // New connections go on, now all to the new agent.
    let mark = new.log_mark();
    hbone.wait_for_more(50);
    plain.wait_for_more(50);
    let (hbone, plain) = (hbone.stop(), plain.stop());
    assert!(
        hbone.failed.is_empty() && plain.failed.is_empty(),
        "no new connection refused: hbone {:?}, plaintext {:?}",
        hbone.failed,
        plain.failed
    );
    assert!(hbone.ok > 20 && plain.ok > 20, "{hbone:?} {plain:?}");
    new.wait_log_after(mark, &["connection complete", "direction=\"outbound\""]);
    new.wait_log_after(mark, &["connection complete", "direction=\"inbound\""]);
    let (code, out, err) = new.cli_status(&["diagnose"]);
    assert_eq!(code, 0, "the new agent's diagnose is healthy:\n{out}{err}");
    assert_eq!(readiness(&new), 200);
}

#[test]
fn overlapping_upgrade_with_istio_cni_hands_over_the_zds_connection() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::for_test();
    let client = topo.add_pod("client", 10);
    let server = topo.add_pod("server", 11);
    let app = SocketAddr::new(server.ip4, 9080);
    let _app = Server::start(server.netns_path(), app);
    let (cni, mut old, _) = ztunnel_e2e::cni::start_with_agent(&topo, &[]);
    // As istio-cni does for every connection: the whole snapshot, then snapshot_sent.
    let snapshot = |cni: &CniServer| {
        assert_eq!(cni.add("uid-client", "client", &client.netns_path()), "");
        assert_eq!(cni.add("uid-server", "server", &server.netns_path()), "");
        assert_eq!(cni.snapshot_sent(), "");
    };
    snapshot(&cni);
    old.wait_ready();
    // The client's outbound (15001) and the server's inbound plaintext (15006), under way.
    let stream = ConnectionStream::start(&client.netns_path(), app);

    let mut new = Agent::start_beside(&old, topo.add_bare_netns("new-agent"), "new-agent", None);
    let (cni_new, _) = cni.accept_beside();
    snapshot(&cni_new);
    new.wait_ready();
    old.signal(libc::SIGTERM);
    assert!(
        cni.closed_by_agent(),
        "the draining agent closes its ZDS connection, so istio-cni drops it"
    );
    assert!(old.wait_exit(Duration::from_secs(10)).success());
    stream.wait_for_more(50);
    let tally = stream.stop();
    assert!(tally.failed.is_empty(), "{:?}", tally.failed);
    assert!(tally.ok > 20, "{tally:?}");

    // istio-cni talks to the new agent now: a deleted pod leaves capture.
    assert_eq!(cni_new.del("uid-server"), "");
    new.wait_log(&["pod removed", "uid=uid-server"]);
    let mark = new.log_mark();
    let got = exchange(&client.netns_path(), app, "after").expect("still served");
    assert_eq!(got.response, "hello after");
    new.wait_log_after(mark, &["connection complete", "direction=\"outbound\""]);
}

#[test]
fn a_starting_agent_leaves_the_pods_another_live_agent_serves() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::for_test();
    let client = topo.add_pod("client", 10);
    let server = topo.add_pod("server", 11);
    let outsider = topo.add_pod("outsider", 12);
    let both = [
        Workload::hbone(&client, "client", "node-1"),
        Workload::hbone(&server, "server", "node-1"),
    ];
    let (mut old, config) = Agent::start_local(&topo, "node-1", &mesh::yaml(&both, &[]), &[]);
    let app = SocketAddr::new(server.ip4, 9080);
    let _app = Server::start(server.netns_path(), app);
    // The new agent's sources do not name the server pod (here: a config without it; in a
    // cluster: a pod whose enrollment has not reached it yet).
    let only_client = config.with_file_name("only-client.yaml");
    std::fs::write(&only_client, mesh::yaml(&both[..1], &[])).expect("write config");
    let mut new = Agent::start_beside(
        &old,
        topo.add_bare_netns("new-agent"),
        "new-agent",
        Some(&only_client),
    );
    new.wait_ready();
    new.wait_log(&["served by another live agent: left as it is"]);
    assert!(new.lines_with(&["removed a pod left over"]).is_empty());
    // Still captured, and by the old agent: plaintext to the server goes through its 15006.
    let mark = old.log_mark();
    let answer = exchange(&outsider.netns_path(), app, "still").expect("connect");
    assert_eq!(answer.response, "hello still");
    old.wait_log_after(
        mark,
        &[
            "connection complete",
            "direction=\"inbound\"",
            "src.addr=10.244.1.12",
        ],
    );
}

#[test]
fn a_pod_the_agent_cannot_serve_keeps_it_unready_and_fenced_off() {
    if !require_root() {
        return;
    }
    let mut topo = Topology::for_test();
    let client = topo.add_pod("client", 10);
    let server = topo.add_pod("server", 11);
    // Something in the client pod holds 15001 without SO_REUSEPORT (a sidecar, say).
    let squatter = in_netns(&client.netns_path(), || {
        std::net::TcpListener::bind(("0.0.0.0", 15001)).expect("bind 15001")
    });
    let yaml = mesh::yaml(&[Workload::hbone(&client, "client", "node-1")], &[]);
    let config_arg = Agent::write_local_config(&topo, &yaml)
        .display()
        .to_string();
    let mut agent = Agent::start(
        &topo,
        &["--node-name", "node-1", "--local-xds-path", &config_arg],
    );
    agent.wait_log(&["not ready", "pod default/client", "not served"]);
    let (status, body) = agent.http("GET", 15021, "/healthz/ready");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("pod default/client"), "{body}");
    assert!(
        agent
            .lines_with(&["all readiness blockers cleared"])
            .is_empty(),
        "never reported ready"
    );
    // Fail closed: its connections are still steered to its 15001 (here the squatter's, as
    // iptables capture would do too), never straight to the destination around the mesh.
    let app = SocketAddr::new(server.ip4, 9080);
    let app_server = Server::start(server.netns_path(), app);
    let client_end = in_netns(&client.netns_path(), move || {
        let s = std::net::TcpStream::connect(app).expect("connect");
        s.local_addr().expect("local")
    });
    let (_, peer) = squatter.accept().expect("the captured connection");
    assert_eq!(peer, client_end, "steered to the pod's 15001");
    assert!(
        app_server.accepted().is_empty(),
        "nothing reached the destination"
    );
}

#[test]
fn drain_lets_connections_finish_until_the_deadline() {
    if !require_root() {
        return;
    }
    // A 4 s grace period: the drain deadline is 3 s (upstream's rule: 1 s less), shorter than
    // the test server's 5 s read timeout that would otherwise end the held connection.
    let mut hop = OneHop::start(true, &["--termination-grace-period-seconds", "4"]);
    let bulk = SocketAddr::new(hop.server.ip4, 9090);
    let _bulk = HashServer::start(&hop.server.netns_path(), bulk);
    // One connection that never ends (the test server answers only after EOF) ...
    let dst = hop.dst();
    let held = in_netns(&hop.client.netns_path(), move || {
        let mut s = std::net::TcpStream::connect(dst).expect("connect");
        s.write_all(b"hold").expect("write");
        s
    });
    // ... and a transfer that ends soon after SIGTERM.
    let transfer = Transfer::start(&hop.client.netns_path(), bulk, 3);
    wait_for("both connections live", Duration::from_secs(10), || {
        (hop.app.accepted().len() == 1 && transfer.sent() > 0).then_some(())
    });
    assert_eq!(readiness(&hop.agent), 200);

    let term = Instant::now();
    hop.agent.signal(libc::SIGTERM);
    wait_for("unready after SIGTERM", Duration::from_secs(1), || {
        (readiness(&hop.agent) == 503).then_some(())
    });
    // The transfer moves on during the drain.
    let at_term = transfer.sent();
    wait_for(
        "the transfer moving after SIGTERM",
        Duration::from_secs(2),
        || (transfer.sent() > at_term + (256 << 10)).then_some(()),
    );
    let done = transfer
        .finish()
        .expect("the transfer ends during the drain");
    assert_eq!(done.echoed, done.sent, "intact");
    let status = hop.agent.wait_exit(Duration::from_secs(10));
    let took = term.elapsed();
    assert!(status.success(), "exit 0 after the drain: {status}");
    assert!(
        took >= Duration::from_secs(3) && took < Duration::from_secs(4),
        "the held connection kept the agent until the 3 s deadline, not the grace period: {took:?}"
    );

    // The finished transfer has its clean line; the held connection was closed at the
    // deadline, both its sides logged with the reason.
    let transfer_line = hop
        .agent
        .lines_with(&["connection complete", "dst.addr=10.244.1.11:15008"])
        .into_iter()
        .find(|l| l.contains(&format!("bytes_sent={}", done.sent.0)))
        .unwrap_or_else(|| panic!("no line for the transfer:\n{}", hop.agent.log()));
    assert!(!transfer_line.contains("error="), "{transfer_line}");
    let cut = hop
        .agent
        .lines_with(&["connection complete", "closed at the drain deadline"]);
    assert_eq!(cut.len(), 2, "{}", hop.agent.log());
    for direction in ["direction=\"outbound\"", "direction=\"inbound\""] {
        assert!(
            cut.iter()
                .any(|l| l.contains(direction) && l.contains("bytes_sent=")),
            "no {direction} line: {cut:?}"
        );
    }
    // The cut is a reset for the client, never a clean end of the data.
    let mut held = held;
    held.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut rest = Vec::new();
    let read = held.read_to_end(&mut rest);
    assert_eq!(
        read.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionReset),
        "the held connection was reset"
    );
}

/// What the application saw on a connection whose client reset it: how it ended and when.
fn app_end(stream: &mut std::net::TcpStream) -> (std::io::ErrorKind, Instant) {
    let mut buf = [0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (std::io::ErrorKind::UnexpectedEof, Instant::now()),
            Ok(_) => {}
            Err(e) => return (e.kind(), Instant::now()),
        }
    }
}

/// Sockets in CLOSE_WAIT or FIN_WAIT2 in `netns` (as `ss` lists them).
fn lingering(netns: &str) -> Vec<String> {
    sh("ip", &["netns", "exec", netns, "ss", "-tanH"])
        .lines()
        .filter(|l| l.starts_with("CLOSE-WAIT") || l.starts_with("FIN-WAIT-2"))
        .map(str::to_string)
        .collect()
}

#[test]
fn a_client_reset_reaches_the_application_and_sockets_have_keepalive() {
    if !require_root() {
        return;
    }
    let (mut topo, client, server, yaml) = mesh::client_and_server();
    let plain = topo.add_pod("plain", 12);
    let (agent, _) = Agent::start_local(&topo, "node-1", &yaml, &[]);

    // HBONE (client -> enrolled server) and passthrough (client -> unenrolled pod).
    for (what, pod) in [("hbone", &server), ("passthrough", &plain)] {
        let dst = SocketAddr::new(pod.ip4, 9100);
        let listener = in_netns(&pod.netns_path(), move || {
            std::net::TcpListener::bind(dst).expect("bind")
        });
        let app = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().expect("accept");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            app_end(&mut s)
        });
        let client_socket = in_netns(&client.netns_path(), move || {
            let mut s = std::net::TcpStream::connect(dst).expect("connect");
            s.write_all(&[1u8; 100_000]).expect("write");
            s
        });
        // Live: every socket the agent accepted or dialled for it has keepalive on, with
        // upstream's defaults.
        // This connection's sockets: the one accepted on 15001 from the client, the one
        // dialled to the application and, over HBONE, both ends of the tunnel on 15008.
        let client_local = client_socket.local_addr().expect("local address");
        let ours = |local: &SocketAddr, peer: &SocketAddr| {
            (local.port() == 15001 && *peer == client_local)
                || *peer == dst
                || (what == "hbone" && (local.port() == 15008 || peer.port() == 15008))
        };
        // The agent sets the options right after accept or connect: wait for them, then read
        // their values.
        let what_for = format!("{what}: the relay's sockets, each with keepalive on");
        let sockets = wait_for(&what_for, Duration::from_secs(10), || {
            let s: Vec<_> = agent
                .connected_sockets()
                .into_iter()
                .filter(|(l, p, _)| ours(l, p))
                .collect();
            let accepted = s
                .iter()
                .any(|(l, p, _)| l.port() == 15001 && *p == client_local);
            let dialled = s.iter().any(|(_, p, _)| *p == dst);
            let tunnel = what != "hbone" || s.iter().any(|(l, _, _)| l.port() == 15008);
            let keepalive = s
                .iter()
                .all(|(_, _, fd)| socket2::SockRef::from(fd).keepalive().unwrap_or(false));
            (accepted && dialled && tunnel && keepalive).then_some(s)
        });
        for (local, peer, fd) in &sockets {
            let sock = socket2::SockRef::from(fd);
            assert!(
                sock.keepalive().expect("SO_KEEPALIVE"),
                "{what}: no keepalive on {local} -> {peer}"
            );
            assert_eq!(
                sock.keepalive_time().expect("TCP_KEEPIDLE"),
                Duration::from_secs(180),
                "{what}: {local} -> {peer}"
            );
            assert_eq!(
                sock.keepalive_interval().expect("TCP_KEEPINTVL"),
                Duration::from_secs(180)
            );
            assert_eq!(sock.keepalive_retries().expect("TCP_KEEPCNT"), 9);
        }
        drop(sockets);

        // The client resets the connection mid-transfer (SO_LINGER 0, close).
        socket2::SockRef::from(&client_socket)
            .set_linger(Some(Duration::ZERO))
            .expect("linger");
        let reset_at = Instant::now();
        drop(client_socket);
        let (kind, ended) = app.join().expect("app thread");
        assert!(
            ended.duration_since(reset_at) < Duration::from_secs(1),
            "{what}: the application side ended {:?} after the client's reset",
            ended.duration_since(reset_at)
        );
        assert_eq!(
            kind,
            std::io::ErrorKind::ConnectionReset,
            "{what}: the reset reached the application"
        );
        let netns = [&client.netns, &pod.netns];
        let left = wait_for("no lingering sockets", Duration::from_secs(2), || {
            let left: Vec<String> = netns.iter().flat_map(|n| lingering(n)).collect();
            left.is_empty().then_some(left)
        });
        assert!(left.is_empty(), "{what}: {left:?}");
    }
}

#[test]
fn out_of_file_descriptors_the_agent_keeps_serving_and_recovers() {
    if !require_root() {
        return;
    }
    let mut hop = OneHop::start(true, &[]);
    let pid = hop.agent.pid().expect("running") as libc::pid_t;
    // A connection held open through the tunnel before the limit bites.
    let dst = hop.dst();
    let held = in_netns(&hop.client.netns_path(), move || {
        let mut s = std::net::TcpStream::connect(dst).expect("connect");
        s.write_all(b"before").expect("write");
        s
    });
    wait_for("the held connection live", Duration::from_secs(10), || {
        (hop.app.accepted().len() == 1).then_some(())
    });

    // No descriptor left: a soft limit of 3 leaves open descriptors valid and makes every
    // new one fail with EMFILE (new descriptors must be numbered below the limit).
    let mut before = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit on the agent's pid reading its limit into a local.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut before) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let set_limit = |soft: u64| {
        let limit = libc::rlimit {
            rlim_cur: soft,
            rlim_max: before.rlim_max,
        };
        // SAFETY: prlimit on the agent's pid with a valid new limit and no old-limit pointer.
        let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
        assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    };
    let mark = hop.agent.log_mark();
    set_limit(3);
    // A new connection: the agent cannot accept it, says so once, and does not spin.
    let waiting = std::thread::spawn({
        let netns = hop.client.netns_path();
        move || ztunnel_e2e::traffic::exchange(&netns, dst, "during")
    });
    let line = hop
        .agent
        .wait_log_after(mark, &["accept failed", "out of file descriptors"]);
    assert!(
        line.contains("EMFILE") || line.contains("Too many open files"),
        "{line}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        hop.agent.lines_with(&["accept failed"]).len(),
        1,
        "logged once per interval, not per retry"
    );

    // Descriptors free up: the waiting connection is served, the held one still works.
    set_limit(before.rlim_cur);
    let answer = waiting
        .join()
        .expect("client thread")
        .expect("served after recovery");
    assert_eq!(answer.response, "hello during");
    let mut held = held;
    held.shutdown(std::net::Shutdown::Write)
        .expect("half-close");
    let mut reply = String::new();
    held.read_to_string(&mut reply).expect("read");
    assert_eq!(
        reply, "hello before",
        "the connection open throughout still works"
    );
    let metrics = hop.agent.scrape_metrics();
    assert!(
        metric_sum(
            &metrics,
            "ztunnel_accept_errors_total",
            &["error=\"EMFILE\""]
        ) >= 1,
        "counted"
    );
    let gauge = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
    };
    assert!(gauge("process_open_fds") > 10);
    assert_eq!(gauge("process_max_fds"), before.rlim_cur);
}
