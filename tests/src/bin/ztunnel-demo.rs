//! `cargo xtask demo`: a demo node with the troubleshooting guide's pods enrolled by a
//! simulated istio-cni, a real agent fed by the development control plane (delta xDS and CA
//! over TLS), captured traffic, and the guide's troubleshooting views printed. Pass `--keep` to leave it
//! running until Ctrl-C.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;

use ztunnel_e2e::agent::{agent_binary, Agent};
use ztunnel_e2e::cni::CniServer;
use ztunnel_e2e::control_plane::{ControlPlane, Settings};
use ztunnel_e2e::mesh::guide;
use ztunnel_e2e::prometheus::{Prometheus, Target};
use ztunnel_e2e::sh;
use ztunnel_e2e::topology::{Pod, Topology};
use ztunnel_e2e::traffic::in_netns;

const PIN_DIR: &str = "/sys/fs/bpf/ztunnel";

fn heading(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

/// `curl` run inside the network namespace at `netns` (as an operator would from that pod
/// or node).
fn curl_in(netns: &std::path::Path, url: &str) -> std::process::Output {
    Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["curl", "-sS", "--max-time", "5", url])
        .output()
        .expect("run curl")
}

/// A tiny HTTP server on :9080 inside the pod, answering with the pod's name.
fn serve_http(pod: &Pod) {
    let netns = std::fs::File::open(pod.netns_path()).expect("open pod netns");
    let name = pod.name.clone();
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd changes only this thread's namespace.
        let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns");
        // [::] with IPV6_V6ONLY off (the Linux default) serves IPv4 and IPv6.
        let listener = TcpListener::bind(("::", 9080)).expect("bind :9080");
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let mut buf = [0u8; 2048];
            let _ = conn.read(&mut buf);
            let body = format!("hello from {name}\n");
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
}

fn main() {
    let keep = std::env::args().any(|a| a == "--keep");
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the demo creates network namespaces and loads eBPF: run it as root");
        std::process::exit(1);
    }
    heading("demo node: namespace zt-demo-node, bridge 10.244.1.1/24, fd00::1/64");
    let mut topo = Topology::new("demo");
    let pods = guide::add_pods(&mut topo);
    for (pod, (_, _, _, svc)) in pods.iter().zip(guide::PODS) {
        println!(
            "  pod {:<16} {} {}  netns {}",
            pod.name,
            pod.ip4,
            pod.ip6,
            pod.netns_path().display()
        );
        if svc.is_some() {
            serve_http(pod);
        }
    }
    for (svc, vip) in guide::SERVICES {
        println!("  service {svc:<12} VIP {vip}:9080");
    }
    let yaml = guide::mesh_yaml(&pods, "demo-node", true);
    let dir: PathBuf = std::env::temp_dir().join("zt-demo-cp");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("demo dir");
    let config = dir.join("mesh.yaml");
    std::fs::write(&config, &yaml).expect("write demo config");

    heading("control plane: the development istiod (delta xDS + CA over TLS on 127.0.0.1:15012, debug on :15014), fed from the guide's mesh");
    let token = dir.join("istio-token");
    std::fs::write(&token, "demo-token").expect("token");
    let cp = ControlPlane::start(
        Settings {
            mesh: config.clone(),
            ca_dir: dir.join("ca"),
            max_cert_ttl: std::time::Duration::from_secs(24 * 3600),
            token: Some("demo-token".into()),
        },
        vec![ControlPlane::bind_in(&topo.node_path(), 15012)],
        vec![ControlPlane::bind_in(&topo.node_path(), 15014)],
    );
    let roots = cp.roots_path.display().to_string();
    let sock = dir.join("ztunnel.sock");
    let mut cni = CniServer::listen(&sock);
    let sock_arg = sock.display().to_string();
    let token_arg = token.display().to_string();
    let args = [
        "--node-name",
        "demo-node",
        "--pod-name",
        "ztunnel-demo",
        "--pod-namespace",
        "istio-system",
        "--xds-address",
        "127.0.0.1:15012",
        "--xds-root-ca",
        &roots,
        "--ca-root-ca",
        &roots,
        "--auth-token",
        &token_arg,
        "--inpod-uds",
        &sock_arg,
    ];
    heading(&format!("agent: ztunnel-agent run {}", args.join(" ")));
    let mut agent = Agent::start_pinned(&topo, PathBuf::from(PIN_DIR), &args);
    cni.accept_hello();
    heading("istio-cni (ZDS): the guide's pods added with their network namespaces");
    for (pod, (name, sa, _, _)) in pods.iter().zip(guide::PODS) {
        let ack = cni.add_as(&format!("uid-{name}"), name, sa, &pod.netns_path());
        println!("  add {name:<16} sa {sa:<22} ack {:?}", ack);
    }
    cni.snapshot_sent();
    agent.wait_ready();
    for line in agent.lines_with(&["pod enrolled"]) {
        println!("  {line}");
    }
    heading("prometheus: Debian's, in the node namespace, scraping the agent's :15020 every second (pod=ztunnel-demo, app=ztunnel, as Kubernetes discovery labels it)");
    let prometheus = Prometheus::start(
        &topo.node,
        &[Target {
            addr: "127.0.0.1:15020",
            pod: "ztunnel-demo",
        }],
        std::time::Duration::from_secs(1),
    );
    println!("  ready on 127.0.0.1:19090 (inside zt-demo-node)");

    let curl = topo
        .pods
        .iter()
        .find(|p| p.name == "curl")
        .expect("curl pod")
        .clone();
    let productpage = topo.pods[0].clone();
    heading("traffic: curl from the curl pod: productpage (VIP, then pod IPv6), reviews VIP x3");
    for target in [
        "10.96.0.10:9080".to_string(),
        SocketAddr::new(productpage.ip6, 9080).to_string(),
        "10.96.0.14:9080".to_string(),
        "10.96.0.14:9080".to_string(),
        "10.96.0.14:9080".to_string(),
    ] {
        let out = curl_in(&curl.netns_path(), &format!("http://{target}/"));
        print!("  {target} -> {}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            println!("  curl failed: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(300));

    heading("kubectl logs -l app=ztunnel | grep -E \"inbound|outbound\"  (the agent's log)");
    for line in agent.lines_with(&["connection complete"]) {
        println!("  {line}");
    }

    heading("curl 'localhost:15014/debug/config_dump?proxyID=ztunnel-demo'  (istiod's view; first lines)");
    let debug = curl_in(
        &topo.node_path(),
        "http://127.0.0.1:15014/debug/config_dump?proxyID=ztunnel-demo",
    );
    for l in String::from_utf8_lossy(&debug.stdout).lines().take(16) {
        println!("  {l}");
    }

    for section in ["workloads", "services", "certificates"] {
        heading(&format!(
            "ztunnel-agent config {section}   (istioctl ztunnel-config {section})"
        ));
        print!("{}", agent.cli(&["config", section]));
    }

    heading("PromQL on the agent's metrics  (what Istio's ztunnel dashboard and your alerts read)");
    let wait = std::time::Duration::from_secs(20);
    // A rate needs a series to grow between two scrapes: the first round made the series,
    // a second round (after a scrape) makes them move.
    prometheus.wait_for_scrape();
    println!("  (ten more requests from curl to the reviews and productpage VIPs, for the rates)");
    for i in 0..10 {
        let vip = if i % 2 == 0 {
            "10.96.0.14"
        } else {
            "10.96.0.10"
        };
        curl_in(&curl.netns_path(), &format!("http://{vip}:9080/"));
    }
    let queries: [(&str, &str, &[&str]); 3] = [
        (
            "bytes per second received and sent by the node's agent (last minute)",
            r#"sum by (pod) (rate(istio_tcp_received_bytes_total{pod=~"ztunnel-.*"}[1m]) + rate(istio_tcp_sent_bytes_total{pod=~"ztunnel-.*"}[1m]))"#,
            &["pod"],
        ),
        (
            "connections opened per source workload and destination service",
            r#"sum by (source_workload, destination_service) (istio_tcp_connections_opened_total{reporter="source"})"#,
            &["source_workload", "destination_service"],
        ),
        (
            "proxies the agent runs (Workload Manager panel)",
            r#"sum by (pod) (workload_manager_active_proxy_count{pod=~"ztunnel-.*"})"#,
            &["pod"],
        ),
    ];
    for (what, expr, labels) in queries {
        println!("  # {what}\n  {expr}");
        for sample in prometheus.wait_query(expr, wait, |s| s.value > 0.0) {
            let by: Vec<String> = labels
                .iter()
                .map(|l| format!("{l}={}", sample.label(l)))
                .collect();
            println!("    {{{}}} {:.1}", by.join(", "), sample.value);
        }
    }

    heading("ztunnel-agent diagnose default/productpage-v1   (is its traffic in the mesh, and if not, why)");
    let (_, out, err) = agent.cli_status(&["diagnose", "default/productpage-v1"]);
    print!("{out}{err}");
    heading("ztunnel-agent diagnose   (the node)");
    let (_, out, err) = agent.cli_status(&["diagnose"]);
    print!("{out}{err}");
    heading("ztunnel-agent diagnose flow default/productpage-v1 reviews:9080   (what a connection would do, before it is sent)");
    let (_, out, err) =
        agent.cli_status(&["diagnose", "flow", "default/productpage-v1", "reviews:9080"]);
    print!("{out}{err}");
    heading("DNS from curl: reviews.default.svc.cluster.local A, sent to the cluster DNS address (captured to the agent's DNS proxy on the pod's 127.0.0.1:15053)");
    let curl_pod = pods
        .iter()
        .find(|p| p.name == "curl")
        .expect("the guide's curl pod");
    let answer = in_netns(&curl_pod.netns_path(), || -> std::io::Result<String> {
        use hickory_proto::op::{Message, MessageType, OpCode, Query};
        use hickory_proto::rr::{Name, RecordType};
        let mut q = Message::new(1, MessageType::Query, OpCode::Query);
        q.metadata.recursion_desired = true;
        let name = Name::from_ascii("reviews.default.svc.cluster.local.")
            .map_err(std::io::Error::other)?;
        q.add_query(Query::query(name, RecordType::A));
        let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
        socket.set_read_timeout(Some(std::time::Duration::from_secs(3)))?;
        let resolver: std::net::SocketAddr =
            "10.96.0.10:53".parse().map_err(std::io::Error::other)?;
        socket.send_to(&q.to_vec().map_err(std::io::Error::other)?, resolver)?;
        let mut buf = [0u8; 1024];
        let (n, from) = socket.recv_from(&mut buf)?;
        let answer = Message::from_vec(&buf[..n]).map_err(std::io::Error::other)?;
        let records: Vec<String> = answer
            .answers
            .iter()
            .map(|r| format!("{} {} {}", r.name, r.ttl, r.data))
            .collect();
        Ok(format!(
            "  answer from {from} ({:?}, authoritative: {}): {}",
            answer.metadata.response_code,
            answer.metadata.authoritative,
            records.join(", ")
        ))
    });
    match answer {
        Ok(line) => println!("{line}"),
        Err(e) => println!("  no answer: {e}"),
    }

    let archive = std::env::temp_dir().join("ztunnel-demo-bug-report.tar.gz");
    let archive_arg = archive.display().to_string();
    heading(&format!("ztunnel-agent bug-report -o {archive_arg}   (everything a maintainer asks for, secrets cut)"));
    let (_, out, err) = agent.cli_status(&["bug-report", "-o", &archive_arg, "--pin-dir", PIN_DIR]);
    print!("{out}{err}");
    for l in sh("tar", &["tzf", &archive_arg]).lines() {
        println!("  {l}");
    }
    let _ = std::fs::remove_file(&archive);

    heading(&format!("ztunnel-agent redirect dump --pin-dir {PIN_DIR}"));
    print!("{}", agent.dump());

    heading("bpftool prog show  (ztunnel programs)");
    let progs = sh("bpftool", &["prog", "show"]);
    let mut lines = progs.lines().peekable();
    while let Some(l) = lines.next() {
        if l.contains("name ztunnel_") {
            println!("  {l}");
            while let Some(next) = lines.peek() {
                if next.starts_with(char::is_whitespace) {
                    println!("  {}", lines.next().unwrap_or_default());
                } else {
                    break;
                }
            }
        }
    }
    heading("bpftool cgroup tree  (ztunnel programs)");
    for l in sh("bpftool", &["cgroup", "tree"]).lines() {
        if l.starts_with('/') || l.starts_with("CgroupPath") || l.contains("ztunnel_") {
            println!("  {l}");
        }
    }
    for map in ["ENROLLED_PODS", "POD_COUNTERS"] {
        heading(&format!(
            "bpftool map dump pinned {PIN_DIR}/{map}  (first entries)"
        ));
        let dump = sh(
            "bpftool",
            &["map", "dump", "pinned", &format!("{PIN_DIR}/{map}")],
        );
        for l in dump.lines().take(24) {
            println!("  {l}");
        }
    }

    if keep {
        heading("running: press Ctrl-C to stop (pods and agent are torn down on exit)");
        let _ = Command::new("sleep").arg("infinity").status();
    }
    heading("tearing down: agent stopped, `ztunnel-agent redirect uninstall`, namespaces deleted");
    drop(agent);
    drop(cni);
    drop(cp);
    drop(topo);
    let _ = agent_binary();
}
