//! The DNS proxy: an enrolled pod's DNS (UDP and TCP, IPv4 and IPv6) goes to the agent,
//! which answers mesh names from the control plane's state and forwards the rest to a real
//! DNS server (dnsmasq) in another namespace; an unenrolled pod's DNS is untouched; a change
//! pushed by the control plane is answered at once; garbage leaves the proxy serving.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use ztunnel_e2e::mesh::{self, Workload};
use ztunnel_e2e::traffic::in_netns;
use ztunnel_e2e::xds_mesh::{settings, start_cp, start_mesh_with, XDS_PORT};
use ztunnel_e2e::{metric_sum, require_root, rss_kib, wait_for};

/// The DNS server pod's host number: 10.244.1.30 and fd00::1e.
const DNS_HOST: u8 = 30;

/// dnsmasq, stopped on drop.
struct Dnsmasq(Child);

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq in `netns` on its pod's addresses: `external.example` has an A and an AAAA
/// record, cluster.local names are NXDOMAIN (it knows none), nothing is forwarded further.
fn start_dnsmasq(netns: &str, ip4: IpAddr, ip6: IpAddr) -> Dnsmasq {
    let child = Command::new("ip")
        .args([
            "netns",
            "exec",
            netns,
            "dnsmasq",
            "--keep-in-foreground",
            "--no-resolv",
            "--no-hosts",
        ])
        .args([
            "--conf-file=/dev/null",
            "--pid-file=",
            "--user=root",
            "--group=root",
            "--bind-interfaces",
        ])
        .arg(format!("--listen-address={ip4}"))
        .arg(format!("--listen-address={ip6}"))
        .args([
            "--address=/external.example/203.0.113.7",
            "--address=/external.example/2001:db8::7",
        ])
        .args(["--local=/cluster.local/", "--log-facility=-"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("dnsmasq (Debian's dnsmasq-base, installed by cargo xtask setup)");
    Dnsmasq(child)
}

fn request(name: &str, qtype: RecordType, id: u16) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
    m.to_vec().expect("encode")
}

/// An answer and where it came from.
struct Answer {
    message: Message,
    from: SocketAddr,
}

impl Answer {
    fn addresses(&self) -> Vec<String> {
        self.message
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0.to_string()),
                RData::AAAA(a) => Some(a.0.to_string()),
                _ => None,
            })
            .collect()
    }
}

/// Asks `server` over UDP (unconnected socket, so the reply's source is checked) from
/// inside `netns`.
fn ask_udp(netns: &Path, server: SocketAddr, name: &str, qtype: RecordType) -> Answer {
    try_ask_udp(netns, server, name, qtype, Duration::from_secs(5)).expect("an answer within 5 s")
}

/// [`ask_udp`], `None` without an answer within `timeout`.
fn try_ask_udp(
    netns: &Path,
    server: SocketAddr,
    name: &str,
    qtype: RecordType,
    timeout: Duration,
) -> Option<Answer> {
    let name = name.to_string();
    in_netns(netns, move || {
        let bind: SocketAddr = if server.is_ipv6() {
            "[::]:0"
        } else {
            "0.0.0.0:0"
        }
        .parse()
        .expect("any");
        let socket = UdpSocket::bind(bind).expect("udp socket");
        socket.set_read_timeout(Some(timeout)).expect("timeout");
        socket
            .send_to(&request(&name, qtype, 0x1234), server)
            .expect("send");
        let mut buf = [0u8; 4096];
        let (n, from) = socket.recv_from(&mut buf).ok()?;
        let message = Message::from_vec(&buf[..n]).expect("a DNS answer");
        assert_eq!(message.metadata.id, 0x1234);
        Some(Answer { message, from })
    })
}

/// Asks `server` over TCP from inside `netns`.
fn ask_tcp(netns: &Path, server: SocketAddr, name: &str, qtype: RecordType) -> Message {
    use std::io::{Read, Write};
    let name = name.to_string();
    in_netns(netns, move || {
        let mut stream =
            std::net::TcpStream::connect_timeout(&server, Duration::from_secs(5)).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let q = request(&name, qtype, 0x4321);
        let mut framed = (q.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&q);
        stream.write_all(&framed).expect("send");
        let mut len = [0u8; 2];
        stream.read_exact(&mut len).expect("length");
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(len))];
        stream.read_exact(&mut buf).expect("answer");
        Message::from_vec(&buf).expect("a DNS answer")
    })
}

/// `getent <db> <name>` in the pod, with a resolv.conf kubelet would write for namespace
/// default (ip netns exec bind-mounts /etc/netns/<pod>/resolv.conf).
fn getent(netns: &str, db: &str, name: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "getent", db, name])
        .output()
        .expect("getent");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The mesh: client and server (service `server`, VIP `vip`), a ServiceEntry-style host with
/// an auto-allocated VIP, a dual-stack service, and optionally one more service.
fn mesh_yaml(
    m_client: &ztunnel_e2e::topology::Pod,
    server: &ztunnel_e2e::topology::Pod,
    vip: &str,
    added: bool,
) -> String {
    let mut y = mesh::yaml(
        &[
            Workload::hbone(m_client, "client", "node"),
            Workload {
                services: &["server"],
                ..Workload::hbone(server, "server", "node")
            },
        ],
        &[("server", vip)],
    );
    y.push_str("- name: api\n  namespace: default\n  hostname: api.example.com\n  vips: [\"/240.240.0.1\"]\n  ports:\n    443: 443\n");
    y.push_str("- name: dual\n  namespace: default\n  hostname: dual.default.svc.cluster.local\n  vips: [\"/10.96.0.60\", \"/fd00:96::60\"]\n  ports:\n    80: 80\n");
    if added {
        y.push_str("- name: added\n  namespace: default\n  hostname: added.default.svc.cluster.local\n  vips: [\"/10.96.0.61\"]\n  ports:\n    80: 80\n");
    }
    y
}

/// Milliseconds of `n` UDP questions, one after the other: (median, p99).
fn latency(netns: &Path, server: SocketAddr, name: &str, n: usize) -> (f64, f64) {
    let name = name.to_string();
    let mut times = in_netns(netns, move || {
        let socket = UdpSocket::bind("0.0.0.0:0").expect("udp");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 4096];
        (0..n)
            .map(|i| {
                let q = request(&name, RecordType::A, i as u16);
                let started = Instant::now();
                socket.send_to(&q, server).expect("send");
                socket.recv_from(&mut buf).expect("answer");
                started.elapsed().as_secs_f64() * 1000.0
            })
            .collect::<Vec<f64>>()
    });
    times.sort_by(f64::total_cmp);
    (times[n / 2], times[(n * 99) / 100])
}

#[test]
fn dns_is_captured_answered_from_the_mesh_forwarded_and_left_alone_for_others() {
    if !require_root() {
        return;
    }
    let dir = std::env::temp_dir().join("zt-cp-dns-resolv");
    std::fs::create_dir_all(&dir).expect("dir");
    let resolv = dir.join("resolv.conf");
    std::fs::write(&resolv, "nameserver 10.244.1.30\n").expect("resolv.conf");
    let resolv_arg = resolv.display().to_string();
    let mut m = start_mesh_with(
        "cp-dns",
        &format!("127.0.0.1:{XDS_PORT}"),
        &["--dns-resolv-conf", &resolv_arg],
    );
    std::fs::write(
        &m.mesh_path,
        mesh_yaml(&m.client, &m.server, "10.96.0.50", false),
    )
    .expect("mesh");
    let cp = start_cp(
        &m.topo,
        settings(&m.dir, &m.mesh_path, Duration::from_secs(3600)),
    );
    let plain = m.topo.add_pod("plain", 12);
    let dns_pod = m.topo.add_pod("dns", DNS_HOST);
    let _dnsmasq = start_dnsmasq(&dns_pod.netns, dns_pod.ip4, dns_pod.ip6);
    m.agent.wait_ready();
    let resolver = SocketAddr::new(dns_pod.ip4, 53);
    let resolver6 = SocketAddr::new(dns_pod.ip6, 53);
    let client = m.client.netns_path();
    // dnsmasq is up before the first question.
    wait_for("dnsmasq answering", Duration::from_secs(10), || {
        in_netns(&plain.netns_path(), move || {
            let s = UdpSocket::bind("0.0.0.0:0").ok()?;
            s.set_read_timeout(Some(Duration::from_millis(200))).ok()?;
            s.send_to(&request("external.example.", RecordType::A, 1), resolver)
                .ok()?;
            let mut buf = [0u8; 512];
            s.recv_from(&mut buf).ok().map(|_| ())
        })
    });

    // A mesh name from the enrolled pod: the VIP, authoritative, and the reply comes from the
    // resolver the pod asked (the kernel restored its address).
    let a = ask_udp(
        &client,
        resolver,
        "server.default.svc.cluster.local.",
        RecordType::A,
    );
    assert_eq!(a.addresses(), ["10.96.0.50"]);
    assert!(a.message.metadata.authoritative, "answered by the agent");
    assert_eq!(
        a.from, resolver,
        "the reply's source is the resolver the pod asked"
    );
    // The short name as is: a CNAME to the full name, then its VIP.
    let a = ask_udp(&client, resolver, "server.", RecordType::A);
    assert_eq!(a.addresses(), ["10.96.0.50"]);
    assert!(
        matches!(a.message.answers[0].data, RData::CNAME(_)),
        "{:?}",
        a.message
    );
    // A ServiceEntry-style host known only by its auto-allocated VIP.
    let a = ask_udp(&client, resolver, "api.example.com.", RecordType::A);
    assert_eq!(a.addresses(), ["240.240.0.1"]);
    // AAAA: a dual-stack service's v6 VIP; an IPv4-only service has none (NODATA, not
    // NXDOMAIN), over an IPv6 question to the resolver's IPv6 address.
    let a = ask_udp(
        &client,
        resolver6,
        "dual.default.svc.cluster.local.",
        RecordType::AAAA,
    );
    assert_eq!(a.addresses(), ["fd00:96::60"]);
    assert_eq!(a.from, resolver6);
    let a = ask_udp(
        &client,
        resolver,
        "server.default.svc.cluster.local.",
        RecordType::AAAA,
    );
    assert!(a.addresses().is_empty());
    assert_eq!(a.message.metadata.response_code, ResponseCode::NoError);
    // Anything else is forwarded to the real DNS server, its answer returned (not ours).
    let a = ask_udp(&client, resolver, "external.example.", RecordType::A);
    assert_eq!(a.addresses(), ["203.0.113.7"]);
    assert_eq!(a.from, resolver);
    let a = ask_udp(&client, resolver6, "external.example.", RecordType::AAAA);
    assert_eq!(a.addresses(), ["2001:db8::7"]);
    // DNS over TCP, mesh and forwarded.
    let t = ask_tcp(
        &client,
        resolver,
        "server.default.svc.cluster.local.",
        RecordType::A,
    );
    assert!(t.metadata.authoritative);
    assert_eq!(t.answers.len(), 1, "{t:?}");
    let t = ask_tcp(&client, resolver, "external.example.", RecordType::A);
    assert_eq!(t.answers.len(), 1, "{t:?}");
    // A real resolver library with kubelet's search list: short, qualified and full names.
    let etc = std::path::PathBuf::from("/etc/netns").join(&m.client.netns);
    std::fs::create_dir_all(&etc).expect("/etc/netns");
    std::fs::write(
        etc.join("resolv.conf"),
        "nameserver 10.244.1.30\nsearch default.svc.cluster.local svc.cluster.local cluster.local\noptions ndots:5\n",
    )
    .expect("pod resolv.conf");
    for name in [
        "server",
        "server.default",
        "server.default.svc",
        "server.default.svc.cluster.local",
    ] {
        let got = getent(&m.client.netns, "ahostsv4", name);
        assert!(
            got.starts_with("10.96.0.50 "),
            "getent ahostsv4 {name}: {got:?}"
        );
    }
    let _ = std::fs::remove_dir_all(&etc);

    // The same question from an unenrolled pod goes to the DNS server itself (which knows no
    // mesh name).
    let a = ask_udp(
        &plain.netns_path(),
        resolver,
        "server.default.svc.cluster.local.",
        RecordType::A,
    );
    assert_eq!(a.message.metadata.response_code, ResponseCode::NXDomain);

    // The control plane changes the VIP and adds a service: answered within a second.
    std::fs::write(
        &m.mesh_path,
        mesh_yaml(&m.client, &m.server, "10.96.0.70", true),
    )
    .expect("mesh");
    let changed = Instant::now();
    cp.reload();
    wait_for(
        "the new VIP and service answered",
        Duration::from_secs(1),
        || {
            let a = ask_udp(
                &client,
                resolver,
                "server.default.svc.cluster.local.",
                RecordType::A,
            );
            let b = ask_udp(
                &client,
                resolver,
                "added.default.svc.cluster.local.",
                RecordType::A,
            );
            (a.addresses() == ["10.96.0.70"] && b.addresses() == ["10.96.0.61"]).then_some(())
        },
    );
    println!(
        "VIP change answered {:?} after the control plane's push",
        changed.elapsed()
    );

    // Garbage, in a bounded loop: truncated, random, empty, many questions, a response.
    let pid = m.agent.pid().expect("agent pid");
    let rss_before = rss_kib(pid);
    let valid = request("server.default.svc.cluster.local.", RecordType::A, 7);
    in_netns(&client, move || {
        let s = UdpSocket::bind("0.0.0.0:0").expect("udp");
        let mut seed: u32 = 0x9e37_79b9;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        for i in 0..2000usize {
            let packet: Vec<u8> = match i % 5 {
                0 => valid[..(next() as usize % valid.len())].to_vec(),
                1 => (0..(next() % 600)).map(|_| next() as u8).collect(),
                2 => Vec::new(),
                3 => {
                    let mut p = valid.clone();
                    p[5] = 9; // nine questions announced, one present
                    p
                }
                _ => {
                    let mut p = valid.clone();
                    p[2] |= 0x80; // a response, not a question
                    p
                }
            };
            let _ = s.send_to(&packet, resolver);
        }
    });
    // A flood may overflow the proxy's socket buffer, as it would a DNS server's: asked again
    // as resolvers do (every 500 ms), the next question is answered.
    let a = wait_for(
        "an answer after the garbage",
        Duration::from_secs(10),
        || {
            try_ask_udp(
                &client,
                resolver,
                "server.default.svc.cluster.local.",
                RecordType::A,
                Duration::from_millis(500),
            )
        },
    );
    assert_eq!(
        a.addresses(),
        ["10.96.0.70"],
        "still serving after the garbage"
    );
    assert!(m.agent.is_running());
    let rss_after = rss_kib(pid);
    println!("agent RSS before/after 2000 malformed datagrams: {rss_before} / {rss_after} KiB");

    // Counted as upstream counts it, and the refusals by reason.
    let metrics = m.agent.scrape_metrics();
    assert!(
        metric_sum(
            &metrics,
            "istio_dns_requests_total",
            &["request_protocol=\"udp\"", "request_query_type=\"a\""]
        ) >= 5,
        "{metrics}"
    );
    assert!(
        metric_sum(
            &metrics,
            "istio_dns_requests_total",
            &["request_protocol=\"tcp\""]
        ) >= 2
    );
    assert!(metric_sum(&metrics, "istio_dns_upstream_requests_total", &[]) >= 3);
    assert!(
        metrics.contains("istio_dns_upstream_request_duration_seconds_bucket"),
        "{metrics}"
    );
    assert!(
        metric_sum(
            &metrics,
            "ztunnel_dns_rejected_total",
            &["reason=\"malformed\""]
        ) >= 100,
        "{metrics}"
    );
    assert!(
        metric_sum(
            &metrics,
            "ztunnel_dns_rejected_total",
            &["reason=\"not_a_query\""]
        ) >= 100
    );
    // diagnose shows the pod's DNS capture and its kernel counters; config_dump says so.
    let report = m.agent.cli(&["diagnose", "default/client"]);
    let dns_line = report
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some("dns"))
        .unwrap_or_default();
    assert!(
        dns_line.contains("captured: port 53 goes to the agent's DNS proxy"),
        "{report}"
    );
    assert!(
        dns_line.contains("captured_udp=")
            && dns_line.contains("captured_tcp=")
            && dns_line.contains("replies_restored="),
        "{report}"
    );
    let dump: serde_json::Value =
        serde_json::from_str(&m.agent.http_get(15000, "/config_dump")).expect("config_dump JSON");
    assert_eq!(
        dump["workloadState"]["uid-client"]["dnsCapture"], true,
        "the pod's own DNS capture state: {dump}"
    );

    // Query latency through the proxy and directly, one run.
    let n = 300;
    let (mesh_med, mesh_p99) = latency(&client, resolver, "server.default.svc.cluster.local.", n);
    let (fwd_med, fwd_p99) = latency(&client, resolver, "external.example.", n);
    let (direct_med, direct_p99) = latency(&plain.netns_path(), resolver, "external.example.", n);
    println!(
        "DNS latency over {n} questions (ms, median / p99): mesh name answered by the proxy {mesh_med:.3} / {mesh_p99:.3}; forwarded through the proxy {fwd_med:.3} / {fwd_p99:.3}; direct to dnsmasq {direct_med:.3} / {direct_p99:.3}"
    );
}
