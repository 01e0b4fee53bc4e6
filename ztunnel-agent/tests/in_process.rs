//! The proxy's handlers driven in-process over loopback, without root: the outbound (15001),
//! inbound plaintext (15006) and HBONE (15008) handlers run as the agent runs them, with
//! real sockets, real TLS (certificates from a local CA made at test time) and real HTTP/2;
//! only socket creation and the original-destination lookup are swapped for loopback ones
//! (`PodSockets`), mapping mesh addresses to loopback listeners.
//!
//! Each test runs on a current-thread runtime with its own log capture, and gives its pods
//! names no other test uses, so the process-wide metrics can be read per test.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use ztunnel_agent::accesslog::Direction;
use ztunnel_agent::identity::ca::LocalCa;
use ztunnel_agent::identity::manager::CertManager;
use ztunnel_agent::proxy::hbone::Pool;
use ztunnel_agent::proxy::{self, Connecting, MeshContext, OriginalDst, PodProxy, PodSockets};
use ztunnel_agent::state::SharedState;

/// A scratch directory removed when the test ends (pass or fail).
struct Scratch(PathBuf);

impl Scratch {
    fn new(test: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("ztunnel-inproc-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Self(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Log lines written on this thread, in the agent's plain format.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("logs")).into_owned()
    }

    /// Access-log lines containing every one of `parts`.
    fn access(&self, parts: &[&str]) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains("connection complete") && parts.iter().all(|p| l.contains(p)))
            .map(str::to_string)
            .collect()
    }
}

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().expect("logs").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = Logs;

    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// Mesh addresses mapped to loopback, and a fixed original destination for 15001.
#[derive(Default)]
struct LoopbackSockets {
    routes: Mutex<HashMap<SocketAddr, SocketAddr>>,
    orig_dst: Mutex<Option<SocketAddr>>,
    inbound_dst: Mutex<Option<SocketAddr>>,
}

impl LoopbackSockets {
    fn route(&self, mesh: SocketAddr, real: SocketAddr) {
        self.routes.lock().expect("routes").insert(mesh, real);
    }
}

impl PodSockets for LoopbackSockets {
    fn connect(&self, dst: SocketAddr) -> Connecting<'_> {
        let real = self.routes.lock().expect("routes").get(&dst).copied();
        Box::pin(async move {
            // An unmapped address is refused, as an address nobody listens on would be.
            let real = real.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 1)));
            let socket = tokio::net::TcpSocket::new_v4()
                .map_err(|source| proxy::Error::Connect { dst, source })?;
            proxy::in_pod::connect_with_timeout(socket, real)
                .await
                .map_err(|e| match e {
                    proxy::Error::Connect { source, .. } => proxy::Error::Connect { dst, source },
                    other => other,
                })
        })
    }

    fn original_dst(&self, _stream: &TcpStream, _peer: SocketAddr) -> OriginalDst {
        let dst = self.orig_dst.lock().expect("orig");
        OriginalDst(dst.expect("the test set an original destination"))
    }

    fn inbound_dst(&self, _stream: &TcpStream) -> io::Result<OriginalDst> {
        let dst = self.inbound_dst.lock().expect("inbound");
        Ok(OriginalDst(dst.expect("the test set it")))
    }
}

/// A node's worth of proxy: the mesh state from `yaml`, a local CA, and pods started on demand.
struct Node {
    mesh: Arc<MeshContext>,
    cancel: CancellationToken,
    _scratch: Scratch,
}

/// A pod's three listeners on loopback and its sockets.
struct Pod {
    outbound: SocketAddr,
    inbound: SocketAddr,
    hbone: SocketAddr,
    sockets: Arc<LoopbackSockets>,
}

impl Node {
    fn new(test: &str, yaml: &str) -> Self {
        let scratch = Scratch::new(test);
        let path = scratch.path().join("mesh.yaml");
        let (state, _) = ztunnel_agent::xds::local::load_state(&path, yaml).expect("mesh yaml");
        let shared = SharedState::default();
        shared.replace(state);
        let ca = LocalCa::load_or_create(&scratch.path().join("ca"), "cluster.local").expect("ca");
        let certs = Arc::new(CertManager::local(ca, Duration::from_secs(3600)));
        let mesh = Arc::new(MeshContext {
            state: shared,
            certs,
            pool: Arc::new(Pool::default()),
            tracker: Arc::default(),
            drain: Default::default(),
            keepalive: Some(Default::default()),
            limits: Default::default(),
            // These tests run unprivileged: passthrough is spliced.
            kernel_relay: None,
        });
        Self {
            mesh,
            cancel: CancellationToken::new(),
            _scratch: scratch,
        }
    }

    /// Starts the listeners of the workload `name` (its uid is `uid-<name>`).
    async fn pod(&self, name: &str) -> Pod {
        let state = self.mesh.state.snapshot();
        let w = state
            .workload(&format!("uid-{name}"))
            .expect("the workload is in the yaml");
        let identity = w.identity();
        self.mesh.certs.ensure(&identity).expect("certificate");
        let tls = ztunnel_agent::tls::server_config(self.mesh.certs.clone(), identity.clone())
            .expect("server config");
        let sockets = Arc::new(LoopbackSockets::default());
        let pod = Arc::new(PodProxy {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            identity,
            network: w.network.clone(),
            ips: w.workload_ips.clone(),
            sockets: sockets.clone(),
            mesh: self.mesh.clone(),
            hbone_tls: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            load: Default::default(),
        });
        let bind = || async {
            TcpListener::bind("127.0.0.1:0")
                .await
                .expect("loopback listener")
        };
        let (outbound, inbound, hbone) = (bind().await, bind().await, bind().await);
        let addrs = (
            outbound.local_addr().expect("addr"),
            inbound.local_addr().expect("addr"),
            hbone.local_addr().expect("addr"),
        );
        let c = self.cancel.clone();
        tokio::spawn(proxy::accept_loop(
            outbound,
            pod.clone(),
            c.clone(),
            Direction::Outbound,
            proxy::outbound::handle,
        ));
        tokio::spawn(proxy::accept_loop(
            inbound,
            pod.clone(),
            c.clone(),
            Direction::Inbound,
            proxy::inbound_passthrough::handle,
        ));
        tokio::spawn(proxy::accept_loop(
            hbone,
            pod,
            c,
            Direction::Inbound,
            proxy::hbone::serve,
        ));
        Pod {
            outbound: addrs.0,
            inbound: addrs.1,
            hbone: addrs.2,
            sockets,
        }
    }
}

impl Node {
    /// `<p>-client` dialling `<p>-server`'s 10.0.0.2:8080 over HBONE, the server's application
    /// being `app`.
    async fn hbone_pair(&self, p: &str, app: SocketAddr) -> (Pod, Pod) {
        let client = self.pod(&format!("{p}-client")).await;
        let server = self.pod(&format!("{p}-server")).await;
        *client.sockets.orig_dst.lock().expect("orig") = Some(addr("10.0.0.2:8080"));
        client.sockets.route(addr("10.0.0.2:15008"), server.hbone);
        server.sockets.route(addr("10.0.0.2:8080"), app);
        (client, server)
    }
}

impl Pod {
    /// The pod's outbound connections are meant for `dst`, which is reached at `real`.
    fn send_to(&self, dst: &str, real: SocketAddr) {
        *self.sockets.orig_dst.lock().expect("orig") = Some(addr(dst));
        self.sockets.route(addr(dst), real);
    }
}

fn addr(text: &str) -> SocketAddr {
    text.parse().expect("a socket address")
}

/// Runs `test` on a current-thread runtime with this thread's logs captured.
fn run<F: std::future::Future<Output = ()>>(logs: &Logs, test: F) {
    run_logging("info", logs, test)
}

/// [`run`] with the log filter `filter`.
fn run_logging<F: std::future::Future<Output = ()>>(filter: &str, logs: &Logs, test: F) {
    let subscriber = ztunnel_agent::telemetry::plain_subscriber(filter, logs.clone());
    let _guard = tracing::subscriber::set_default(subscriber);
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(test);
}

/// The mesh: client `<p>-client` (10.0.0.1), HBONE server `<p>-server` (10.0.0.2:8080),
/// plaintext server `<p>-plain` (10.0.0.3:8080), each in namespace `default`.
fn mesh_yaml(p: &str) -> String {
    format!(
        r#"
workloads:
- uid: uid-{p}-client
  name: {p}-client
  namespace: default
  serviceAccount: {p}-client
  workloadIps: [10.0.0.1]
  protocol: HBONE
- uid: uid-{p}-server
  name: {p}-server
  namespace: default
  serviceAccount: {p}-server
  workloadIps: [10.0.0.2]
  protocol: HBONE
- uid: uid-{p}-plain
  name: {p}-plain
  namespace: default
  workloadIps: [10.0.0.3]
  protocol: TCP
"#
    )
}

/// A server that reads until EOF (returning what it read) and then answers `reply`.
async fn sink_server(reply: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("app");
    let addr = listener.local_addr().expect("addr");
    let task = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("app accept");
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.expect("app read");
        s.write_all(reply).await.expect("app reply");
        s.shutdown().await.expect("app close");
        got
    });
    (addr, task)
}

/// The sum of `name` samples whose labels contain every one of `labels`.
fn metric(name: &str, labels: &[&str]) -> u64 {
    let text = ztunnel_agent::metrics::global().encode();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|p| l.contains(p)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// A field of a log line: `bytes_sent=42` -> "42".
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line
        .find(&format!(" {key}="))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        + key.len()
        + 2;
    line[start..].split(' ').next().unwrap_or_default()
}

/// Waits (up to 10 s) for `check`, yielding to the proxy's tasks in between.
async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

const CHUNK: usize = 256 * 1024;

/// Streams 8 chunks from `client`'s pod through the proxy, checking after each (once the
/// application read it) that `istio_tcp_received_bytes_total` (Istio counts the request's
/// bytes as received, also for `reporter="source"`) under `labels` already moved while the
/// connection is still open and unlogged; then closes and returns the outbound line, whose
/// `bytes_sent` must equal the counter.
async fn long_transfer(
    logs: &Logs,
    client: &Pod,
    app_read: &Arc<std::sync::atomic::AtomicUsize>,
    who: &str,
    labels: &[&str],
) -> String {
    const CHUNKS: usize = 8;
    let mut s = TcpStream::connect(client.outbound).await.expect("connect");
    let chunk = vec![7u8; CHUNK];
    for i in 1..=CHUNKS {
        s.write_all(&chunk).await.expect("client write");
        let want = i * CHUNK;
        wait_until("the application to read the chunk", || {
            app_read.load(std::sync::atomic::Ordering::Relaxed) >= want
        })
        .await;
        let counted = metric("istio_tcp_received_bytes_total", labels);
        assert!(
            counted >= want as u64,
            "after {want} bytes reached the application the counter shows {counted}"
        );
    }
    assert!(logs.access(&[who]).is_empty(), "still open: no line yet");
    s.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.expect("EOF");
    let outbound = [who, "direction=\"outbound\""];
    wait_until("the outbound line", || !logs.access(&outbound).is_empty()).await;
    let line = logs.access(&outbound).remove(0);
    let logged: u64 = field(&line, "bytes_sent").parse().expect("number");
    assert_eq!(logged, (CHUNKS * CHUNK) as u64, "{line}");
    assert_eq!(metric("istio_tcp_received_bytes_total", labels), logged);
    line
}

/// An application that counts what it reads (until EOF) and then closes.
async fn counting_server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("app");
    let addr = listener.local_addr().expect("addr");
    let read = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = read.clone();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("app accept");
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
                }
            }
        }
    });
    (addr, read)
}

#[test]
fn hbone_round_trip_logs_both_sides_and_counts_match() {
    let logs = Logs::default();
    run_logging("info,ztunnel_agent::proxy=debug", &logs, async {
        let node = Node::new("hbone-rt", &mesh_yaml("hrt"));
        let (app, served) = sink_server(b"pong").await;
        let (client, _server) = node.hbone_pair("hrt", app).await;

        let mut s = TcpStream::connect(client.outbound).await.expect("connect");
        s.write_all(b"ping over hbone").await.expect("write");
        s.shutdown().await.expect("half-close");
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await.expect("reply");
        assert_eq!(reply, b"pong");
        assert_eq!(served.await.expect("app"), b"ping over hbone");

        wait_until("both access-log lines", || {
            logs.access(&["hrt-client"]).len() == 2
        })
        .await;
        let out = &logs.access(&["direction=\"outbound\"", "hrt-client"])[0];
        let inb = &logs.access(&["direction=\"inbound\"", "hrt-client"])[0];
        for line in [out, inb] {
            assert!(
                line.contains("src.identity=\"spiffe://cluster.local/ns/default/sa/hrt-client\""),
                "{line}"
            );
            assert!(
                line.contains("dst.identity=\"spiffe://cluster.local/ns/default/sa/hrt-server\""),
                "{line}"
            );
            assert!(line.contains("dst.hbone_addr=\"10.0.0.2:8080\""), "{line}");
            assert!(!line.contains("error="), "{line}");
        }
        assert!(out.contains("dst.addr=10.0.0.2:15008"), "{out}");
        assert_eq!(field(out, "bytes_sent"), "15");
        assert_eq!(field(out, "bytes_recv"), "4");
        assert_eq!(field(inb, "bytes_sent"), "4");
        assert_eq!(field(inb, "bytes_recv"), "15");
        let out_labels = ["reporter=\"source\"", "source_workload=\"hrt-client\""];
        // Inbound, the source is known by its certificate (loopback hides its address).
        let in_labels = [
            "reporter=\"destination\"",
            "source_principal=\"spiffe://cluster.local/ns/default/sa/hrt-client\"",
        ];
        // Request bytes are received, response bytes sent, for both reporters (Istio's
        // definition; the outbound log line speaks from the client's side instead).
        assert_eq!(metric("istio_tcp_sent_bytes_total", &out_labels), 4);
        assert_eq!(metric("istio_tcp_received_bytes_total", &out_labels), 15);
        assert_eq!(metric("istio_tcp_sent_bytes_total", &in_labels), 4);
        assert_eq!(metric("istio_tcp_received_bytes_total", &in_labels), 15);
        assert_eq!(metric("istio_tcp_connections_opened_total", &out_labels), 1);
        assert_eq!(metric("istio_tcp_connections_closed_total", &out_labels), 1);
        // With the proxy at debug, the handler's other lines name the connection.
        let captured: Vec<String> = logs
            .text()
            .lines()
            .filter(|l| l.contains("captured connection"))
            .map(str::to_string)
            .collect();
        assert!(
            captured
                .iter()
                .any(|l| l.contains("span=\"outbound{id=")
                    && l.contains("original_dst=10.0.0.2:8080")),
            "{captured:?}"
        );
        node.cancel.cancel();
    });
}

#[test]
fn hbone_bytes_metrics_move_during_a_long_transfer_and_equal_the_log() {
    let logs = Logs::default();
    run(&logs, async {
        let node = Node::new("hbone-long", &mesh_yaml("hlong"));
        let (app, app_read) = counting_server().await;
        let (client, _server) = node.hbone_pair("hlong", app).await;
        let labels = ["source_workload=\"hlong-client\"", "reporter=\"source\""];
        long_transfer(&logs, &client, &app_read, "hlong-client", &labels).await;
        node.cancel.cancel();
    });
}

#[test]
fn passthrough_bytes_metrics_move_during_a_long_transfer_and_equal_the_log() {
    let logs = Logs::default();
    run(&logs, async {
        let node = Node::new("pass-long", &mesh_yaml("plong"));
        let client = node.pod("plong-client").await;
        let (app, app_read) = counting_server().await;
        // 10.0.0.3 is a TCP (non-HBONE) workload: plain passthrough, spliced in the kernel.
        client.send_to("10.0.0.3:8080", app);
        let labels = [
            "source_workload=\"plong-client\"",
            "destination_workload=\"plong-plain\"",
        ];
        let line = long_transfer(&logs, &client, &app_read, "plong-client", &labels).await;
        assert!(line.contains("dst.addr=10.0.0.3:8080"), "{line}");
        node.cancel.cancel();
    });
}

#[test]
fn a_passthrough_connection_reset_mid_transfer_keeps_its_byte_counts() {
    let logs = Logs::default();
    run(&logs, async {
        let node = Node::new("pass-reset", &mesh_yaml("preset"));
        let client = node.pod("preset-client").await;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("app");
        let app = listener.local_addr().expect("addr");
        client.send_to("10.0.0.3:8080", app);
        const SENT: usize = 3 * CHUNK;
        // The application reads exactly what was sent, answers a little, then resets.
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut got = vec![0u8; SENT];
            s.read_exact(&mut got).await.expect("read");
            s.write_all(b"partial answer").await.expect("answer");
            s.flush().await.expect("flush");
            tokio::time::sleep(Duration::from_millis(50)).await;
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .expect("linger 0");
            drop(s); // RST
        });
        let mut s = TcpStream::connect(client.outbound).await.expect("connect");
        s.write_all(&vec![1u8; SENT]).await.expect("write");
        let mut answer = [0u8; 14];
        s.read_exact(&mut answer).await.expect("answer");
        server.await.expect("server");
        // The application is gone; the client notices (reset or EOF).
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;

        wait_until("the line", || !logs.access(&["preset-client"]).is_empty()).await;
        let line = &logs.access(&["preset-client"])[0];
        assert!(line.contains("error="), "a reset is a failure: {line}");
        assert_eq!(level(line), "error", "{line}");
        assert_eq!(field(line, "bytes_sent"), SENT.to_string(), "{line}");
        assert_eq!(field(line, "bytes_recv"), "14", "{line}");
        let labels = ["source_workload=\"preset-client\""];
        assert_eq!(
            metric("istio_tcp_received_bytes_total", &labels),
            SENT as u64
        );
        assert_eq!(metric("istio_tcp_sent_bytes_total", &labels), 14);
        node.cancel.cancel();
    });
}

/// A line's level (its second tab-separated column).
fn level(line: &str) -> &str {
    line.split('\t').nth(1).unwrap_or_default()
}

#[test]
fn a_connection_dropped_with_its_runtime_still_gets_its_line() {
    let logs = Logs::default();
    let subscriber = ztunnel_agent::telemetry::plain_subscriber("info", logs.clone());
    let _guard = tracing::subscriber::set_default(subscriber);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let node = Node::new("dropped", &mesh_yaml("drop"));
    let held = runtime.block_on(async {
        let (app, app_read) = counting_server().await;
        let (client, _server) = node.hbone_pair("drop", app).await;
        let mut s = TcpStream::connect(client.outbound).await.expect("connect");
        s.write_all(b"held open").await.expect("write");
        wait_until("the bytes to arrive", || {
            app_read.load(std::sync::atomic::Ordering::Relaxed) == 9
        })
        .await;
        s
    });
    assert!(
        logs.access(&["drop-client"]).is_empty(),
        "open: no line yet"
    );
    drop(held);
    // The agent stopping: its runtime is dropped with the connection tasks in it.
    drop(runtime);
    let lines = logs.access(&["drop-client"]);
    assert_eq!(lines.len(), 2, "one line per side: {lines:?}");
    for line in &lines {
        assert!(line.contains("ended without finishing"), "{line}");
        assert_eq!(level(line), "error", "{line}");
    }
    let out = logs.access(&["drop-client", "direction=\"outbound\""]);
    assert_eq!(field(&out[0], "bytes_sent"), "9", "{}", out[0]);
}

#[test]
fn inbound_plaintext_is_authorized_and_denials_are_logged_with_deny() {
    let yaml = format!(
        "{}\npolicies:\n- name: only-client\n  namespace: default\n  scope: Namespace\n  action: Allow\n  rules:\n  - - - principals: [{{Exact: cluster.local/ns/default/sa/pin-client}}]\n",
        mesh_yaml("pin")
    );
    let logs = Logs::default();
    run(&logs, async {
        let node = Node::new("inbound-deny", &yaml);
        let server = node.pod("pin-server").await;
        let (app, _served) = sink_server(b"never").await;
        *server.sockets.inbound_dst.lock().expect("i") = Some("10.0.0.2:8080".parse().expect("a"));
        server
            .sockets
            .route("10.0.0.2:8080".parse().expect("a"), app);
        // Plaintext has no identity: the principal-only ALLOW policy denies it.
        let mut s = TcpStream::connect(server.inbound).await.expect("connect");
        let mut got = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
        assert!(closed.is_ok(), "the proxy closes a denied connection");
        assert!(got.is_empty(), "nothing from the application");
        wait_until("the line", || !logs.access(&["pin-server"]).is_empty()).await;
        let line = &logs.access(&["pin-server"])[0];
        assert!(line.contains("direction=\"inbound\""), "{line}");
        assert!(line.contains("policy"), "{line}");
        assert_eq!(
            metric(
                "istio_tcp_connections_failed_total",
                &[
                    "destination_workload=\"pin-server\"",
                    "response_flags=\"DENY\""
                ]
            ),
            1
        );
        node.cancel.cancel();
    });
}

#[test]
fn a_self_call_to_the_agents_ports_is_refused() {
    let logs = Logs::default();
    run(&logs, async {
        let node = Node::new("selfcall", &mesh_yaml("self"));
        let client = node.pod("self-client").await;
        *client.sockets.orig_dst.lock().expect("o") = Some("10.0.0.9:15001".parse().expect("a"));
        let mut s = TcpStream::connect(client.outbound).await.expect("connect");
        let mut got = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
        assert!(closed.is_ok(), "the proxy closes a refused connection");
        wait_until("the line", || !logs.access(&["self-client"]).is_empty()).await;
        let line = &logs.access(&["self-client"])[0];
        assert!(
            line.contains("refused self-call to 10.0.0.9:15001"),
            "{line}"
        );
        node.cancel.cancel();
    });
}

#[test]
fn inbound_plaintext_counts_what_the_application_answers_as_sent() {
    let logs = Logs::default();
    run(&logs, async {
        let node = Node::new("inbound-ok", &mesh_yaml("pok"));
        let server = node.pod("pok-server").await;
        let (app, served) = sink_server(b"pong").await;
        *server.sockets.inbound_dst.lock().expect("i") = Some(addr("10.0.0.2:8080"));
        server.sockets.route(addr("10.0.0.2:8080"), app);
        let mut s = TcpStream::connect(server.inbound).await.expect("connect");
        s.write_all(b"hello").await.expect("write");
        s.shutdown().await.expect("half-close");
        let mut reply = Vec::new();
        s.read_to_end(&mut reply).await.expect("reply");
        assert_eq!(reply, b"pong");
        assert_eq!(served.await.expect("app"), b"hello");
        wait_until("the line", || !logs.access(&["pok-server"]).is_empty()).await;
        let line = &logs.access(&["pok-server"])[0];
        assert!(line.contains("direction=\"inbound\""), "{line}");
        assert!(!line.contains("error="), "{line}");
        // Inbound, the reporting side sends what the application answers.
        assert_eq!(field(line, "bytes_sent"), "4", "{line}");
        assert_eq!(field(line, "bytes_recv"), "5", "{line}");
        node.cancel.cancel();
    });
}
