//! Two nodes, two agents: HBONE across nodes and on one node, plain passthrough, and the
//! refusals (wrong identity, no client certificate, another root, a CONNECT to an address
//! that is not the pod's), each logged with its reason while other traffic keeps flowing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use ztunnel_agent::identity::ca::LocalCa;
use ztunnel_agent::identity::manager::CertManager;
use ztunnel_e2e::agent::Agent;
use ztunnel_e2e::mesh::{self, Workload};
use ztunnel_e2e::require_root;
use ztunnel_e2e::topology::Topology;
use ztunnel_e2e::traffic::{exchange, in_netns, Server};

fn start(topo: &Topology, node: &str, config: &Path, ca: &Path) -> Agent {
    let (c, ca) = (config.display().to_string(), ca.display().to_string());
    let mut agent = Agent::start(
        topo,
        &["--node-name", node, "--local-xds-path", &c, "--ca-dir", &ca],
    );
    agent.wait_ready();
    agent
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn hbone_across_and_within_nodes_and_passthrough() {
    if !require_root() {
        return;
    }
    let mut n1 = Topology::for_test_node(1);
    let mut n2 = Topology::for_test_node(2);
    Topology::link(&n1, &n2);
    let client = n1.add_pod("client", 10);
    let local = n1.add_pod("local", 11);
    let remote = n2.add_pod("remote", 10);
    let plain = n2.add_pod("plain", 11);
    let outside = n2.add_pod("outside", 12);
    let _servers: Vec<Server> = [&local, &remote, &plain, &outside]
        .iter()
        .map(|p| Server::start(p.netns_path(), SocketAddr::new(p.ip4, 9080)))
        .collect();
    let dir = scratch("zt-xn-cfg");
    let config = dir.join("mesh.yaml");
    std::fs::write(
        &config,
        mesh::yaml(
            &[
                Workload::hbone(&client, "client", "node-1"),
                Workload::hbone(&local, "local", "node-1"),
                Workload::hbone(&remote, "remote", "node-2"),
                Workload {
                    protocol: "TCP",
                    ..Workload::hbone(&plain, "plain", "node-2")
                },
            ],
            &[],
        ),
    )
    .expect("config");
    let ca = dir.join("ca");
    let mut a1 = start(&n1, "node-1", &config, &ca);
    let mut a2 = start(&n2, "node-2", &config, &ca);

    // Cross-node: over HBONE to the remote pod's 15008, reported by both agents.
    let dst = SocketAddr::new(remote.ip4, 9080);
    assert_eq!(
        exchange(&client.netns_path(), dst, "x")
            .expect("cross")
            .response,
        "hello x"
    );
    let out = a1.wait_log(&[
        "connection complete",
        "direction=\"outbound\"",
        "dst.workload=\"remote\"",
    ]);
    assert!(out.contains("dst.addr=10.244.2.10:15008"), "{out}");
    assert!(
        out.contains("dst.identity=\"spiffe://cluster.local/ns/default/sa/remote\""),
        "{out}"
    );
    let inb = a2.wait_log(&[
        "connection complete",
        "direction=\"inbound\"",
        "dst.workload=\"remote\"",
    ]);
    assert!(
        inb.contains("src.identity=\"spiffe://cluster.local/ns/default/sa/client\""),
        "{inb}"
    );
    assert!(inb.contains("src.workload=\"client\""), "{inb}");

    // Same node: HBONE too.
    let dst = SocketAddr::new(local.ip4, 9080);
    assert_eq!(
        exchange(&client.netns_path(), dst, "y")
            .expect("local")
            .response,
        "hello y"
    );
    let out = a1.wait_log(&[
        "connection complete",
        "direction=\"outbound\"",
        "dst.workload=\"local\"",
    ]);
    assert!(out.contains("dst.addr=10.244.1.11:15008"), "{out}");

    // A TCP-protocol workload and a destination outside the mesh: plain passthrough,
    // logged without identities or HBONE address.
    for (pod, name) in [(&plain, Some("plain")), (&outside, None)] {
        let dst = SocketAddr::new(pod.ip4, 9080);
        assert_eq!(
            exchange(&client.netns_path(), dst, "z")
                .expect("passthrough")
                .response,
            "hello z"
        );
        let line = a1.wait_log(&["connection complete", &format!("dst.addr={dst}")]);
        assert!(
            !line.contains("identity") && !line.contains("hbone_addr"),
            "{line}"
        );
        match name {
            Some(n) => assert!(line.contains(&format!("dst.workload=\"{n}\"")), "{line}"),
            None => assert!(!line.contains("dst.workload"), "{line}"),
        }
    }
}

/// Runs `f` on a current-thread runtime in a thread inside `netns`.
fn async_in<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
) -> T {
    in_netns(netns, move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(f())
    })
}

/// Which client certificate the test client presents.
enum Present {
    /// One from the mesh CA.
    Mesh,
    /// None at all.
    Nothing,
    /// One from another CA.
    From(Arc<CertManager>),
}

/// A CONNECT to `hbone` (`<pod>:15008`) for `authority`, trusting the mesh roots in `certs`.
/// Returns the status, or the TLS/HTTP error.
async fn connect_as(
    certs: Arc<CertManager>,
    hbone: SocketAddr,
    authority: &str,
    expected: &str,
    present: Present,
) -> Result<StatusCode, String> {
    let me = "spiffe://cluster.local/ns/default/sa/tester"
        .parse()
        .expect("id");
    let mut config = ztunnel_agent::tls::client_config(
        certs.as_ref(),
        &me,
        vec![expected.parse().expect("expected id")],
    )
    .map_err(|e| e.to_string())?;
    match present {
        Present::Mesh => {}
        Present::Nothing => config.client_auth_cert_resolver = Arc::new(NoCert),
        Present::From(other) => {
            let foreign = other.fetch(&me).map_err(|e| e.to_string())?;
            config.client_auth_cert_resolver = Arc::new(Foreign(foreign.certified.clone()));
        }
    }
    let tcp = tokio::net::TcpStream::connect(hbone)
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls::pki_types::ServerName::IpAddress(hbone.ip().into()),
            tcp,
        )
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status())
}

#[derive(Debug)]
struct NoCert;

#[derive(Debug)]
struct Foreign(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Foreign {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl rustls::client::ResolvesClientCert for NoCert {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

#[test]
fn refusals_are_logged_with_reasons_and_do_not_disturb_others() {
    if !require_root() {
        return;
    }
    let mut n1 = Topology::for_test_node(1);
    let mut n2 = Topology::for_test_node(2);
    Topology::link(&n1, &n2);
    let client = n1.add_pod("client", 10);
    let good = n2.add_pod("good", 10);
    let liar = n2.add_pod("liar", 11);
    let _servers: Vec<Server> = [&good, &liar]
        .iter()
        .map(|p| Server::start(p.netns_path(), SocketAddr::new(p.ip4, 9080)))
        .collect();
    let dir = scratch("zt-rf-cfg");
    let ca = dir.join("ca");
    // Node 1 expects `liar` to be service account "expected"; node 2 runs it as "actual".
    let (c1, c2) = (dir.join("node1.yaml"), dir.join("node2.yaml"));
    let wl = |liar_sa| {
        mesh::yaml(
            &[
                Workload::hbone(&client, "client", "node-1"),
                Workload::hbone(&good, "good", "node-2"),
                Workload::hbone(&liar, liar_sa, "node-2"),
            ],
            &[],
        )
    };
    std::fs::write(&c1, wl("expected")).expect("config 1");
    std::fs::write(&c2, wl("actual")).expect("config 2");
    let mut a1 = start(&n1, "node-1", &c1, &ca);
    let mut a2 = start(&n2, "node-2", &c2, &ca);

    // Wrong server identity: the client's agent refuses the handshake and says why.
    // Nothing reaches the application behind the wrong identity.
    let answer = exchange(&client.netns_path(), SocketAddr::new(liar.ip4, 9080), "no")
        .map(|e| e.response)
        .unwrap_or_default();
    assert_eq!(answer, "", "no bytes through a refused tunnel");
    let line = a1.wait_log(&["connection complete", "dst.workload=\"liar\""]);
    assert!(line.contains("\terror\t"), "{line}");
    assert!(
        line.contains("sa/actual") && line.contains("sa/expected"),
        "names both identities: {line}"
    );

    // A client without a certificate, and one whose certificate comes from another root:
    // the server refuses both.
    let hbone = SocketAddr::new(good.ip4, 15008);
    let good_id = "spiffe://cluster.local/ns/default/sa/good";
    let mesh_certs = Arc::new(CertManager::local(
        LocalCa::load_or_create(&ca, "cluster.local").expect("shared CA"),
        Duration::from_secs(3600),
    ));
    let certs = mesh_certs.clone();
    let status = async_in(&n1.node_path(), move || {
        Box::pin(async move {
            connect_as(certs, hbone, "10.244.2.10:9080", good_id, Present::Nothing).await
        })
    });
    assert!(status.is_err(), "no client certificate: {status:?}");
    // Counted on the server: the refusal is its own, not the client's.
    let refused = |agent: &Agent| {
        agent
            .lines_with(&["\terror\taccess", "dst.workload=\"good\"", "TLS handshake"])
            .len()
    };
    ztunnel_e2e::wait_for(
        "the no-certificate refusal logged",
        Duration::from_secs(10),
        || (refused(&a2) == 1).then_some(()),
    );
    assert_eq!(
        a2.lines_with(&["dst.workload=\"good\"", "peer sent no certificates"])
            .len(),
        1
    );
    let other_root = Arc::new(CertManager::local(
        LocalCa::load_or_create(&dir.join("other-ca"), "cluster.local").expect("other CA"),
        Duration::from_secs(3600),
    ));
    let certs = mesh_certs.clone();
    let status = async_in(&n1.node_path(), move || {
        Box::pin(async move {
            let foreign = Present::From(other_root);
            connect_as(certs, hbone, "10.244.2.10:9080", good_id, foreign).await
        })
    });
    assert!(status.is_err(), "certificate from another root: {status:?}");
    ztunnel_e2e::wait_for(
        "the foreign-root refusal logged",
        Duration::from_secs(10),
        || (refused(&a2) == 2).then_some(()),
    );

    // A CONNECT to an address that is not the pod's: 400, logged.
    let certs = mesh_certs.clone();
    let status = async_in(&n1.node_path(), move || {
        Box::pin(async move {
            connect_as(certs, hbone, "10.244.2.11:9080", good_id, Present::Mesh).await
        })
    });
    assert_eq!(status, Ok(StatusCode::BAD_REQUEST));
    a2.wait_log(&["authority 10.244.2.11:9080 is not an address of pod good"]);
    // And a valid one: 200.
    let certs = mesh_certs.clone();
    let status = async_in(&n1.node_path(), move || {
        Box::pin(async move {
            connect_as(certs, hbone, "10.244.2.10:9080", good_id, Present::Mesh).await
        })
    });
    assert_eq!(status, Ok(StatusCode::OK));

    // Others are unaffected.
    let got = exchange(
        &client.netns_path(),
        SocketAddr::new(good.ip4, 9080),
        "still",
    )
    .expect("good traffic still flows");
    assert_eq!(got.response, "hello still");
    assert!(a1.is_running() && a2.is_running());
}
