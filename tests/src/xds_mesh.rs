//! A node in control-plane mode for the tests: a client and a server pod enrolled over ZDS
//! and an agent fed by the development control plane's xDS and CA (started by the test, which
//! may start it late or not at all).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::agent::Agent;
use crate::cni::CniServer;
use crate::control_plane::{ControlPlane, Settings};
use crate::mesh::{self, Workload};
use crate::topology::{Pod, Topology};
use crate::traffic::{exchange, Server};

/// The bearer token the agent sends and the control plane expects.
pub const TOKEN: &str = "test-token";
/// xDS and CA port in the node namespace (istiod's).
pub const XDS_PORT: u16 = 15012;
/// The control plane's debug port.
pub const DEBUG_PORT: u16 = 15014;

/// A node with a client and a server pod, enrolled over ZDS, an agent in control-plane mode.
pub struct Mesh {
    /// The node.
    pub topo: Topology,
    /// The client pod (10.244.1.10).
    pub client: Pod,
    /// The server pod (10.244.1.11), answering on 9080.
    pub server: Pod,
    /// The server's application.
    pub app: Server,
    /// istio-cni's side of ZDS.
    pub cni: CniServer,
    /// The agent (pod `ztunnel-abc` in istio-system).
    pub agent: Agent,
    /// Scratch directory.
    pub dir: PathBuf,
    /// The mesh file the control plane serves.
    pub mesh_path: PathBuf,
}

/// The mesh the control plane serves: client and (optionally) server workloads, the
/// `server` service (10.96.0.50) and optionally `extra` (10.96.0.51).
pub fn mesh_yaml(client: &Pod, server: &Pod, with_server: bool, extra_service: bool) -> String {
    let svc: &[&str] = &["server"];
    let mut workloads = vec![Workload::hbone(client, "client", "node")];
    if with_server {
        workloads.push(Workload {
            services: svc,
            ..Workload::hbone(server, "server", "node")
        });
    }
    let mut services = vec![("server", "10.96.0.50")];
    if extra_service {
        services.push(("extra", "10.96.0.51"));
    }
    // The netns paths are the local-config extension; xDS does not carry them.
    mesh::yaml(&workloads, &services)
}

/// Control-plane settings for a mesh in `dir`.
pub fn settings(dir: &Path, mesh_path: &Path, ttl: Duration) -> Settings {
    Settings {
        mesh: mesh_path.to_path_buf(),
        ca_dir: dir.join("cp-ca"),
        max_cert_ttl: ttl,
        token: Some(TOKEN.into()),
    }
}

/// Starts the control plane on the node's xDS and debug ports.
pub fn start_cp(topo: &Topology, settings: Settings) -> ControlPlane {
    ControlPlane::start(
        settings,
        vec![ControlPlane::bind_in(&topo.node_path(), XDS_PORT)],
        vec![ControlPlane::bind_in(&topo.node_path(), DEBUG_PORT)],
    )
}

/// Starts topology, pods, CNI and agent; the control plane is the caller's (it may start
/// later or serve the CA elsewhere). `ca` is the CA address.
pub fn start_mesh(test: &str, ca: &str) -> Mesh {
    start_mesh_with(test, ca, &[])
}

/// [`start_mesh`] with more agent arguments.
pub fn start_mesh_with(test: &str, ca: &str, extra: &[&str]) -> Mesh {
    let mut topo = Topology::new(test);
    let client = topo.add_pod("client", 10);
    let server = topo.add_pod("server", 11);
    let app = Server::start(server.netns_path(), SocketAddr::new(server.ip4, 9080));
    let dir = std::env::temp_dir().join(format!("{}-cp", topo.prefix));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let mesh_path = dir.join("mesh.yaml");
    std::fs::write(&mesh_path, mesh_yaml(&client, &server, true, false)).expect("mesh");
    let token = dir.join("token");
    std::fs::write(&token, TOKEN).expect("token");
    // The root exists before the agent starts: it reads the bundle even while no control
    // plane is up.
    let (_, roots) = ControlPlane::prepare_root(&dir.join("cp-ca"));
    let sock = dir.join("cni.sock");
    let mut cni = CniServer::listen(&sock);
    let xds = format!("127.0.0.1:{XDS_PORT}");
    let args = [
        "--xds-address",
        &xds,
        "--ca-address",
        ca,
        "--xds-root-ca",
        &roots.display().to_string(),
        "--ca-root-ca",
        &roots.display().to_string(),
        "--auth-token",
        &token.display().to_string(),
        "--inpod-uds",
        &sock.display().to_string(),
        "--node-name",
        "node",
        "--pod-name",
        "ztunnel-abc",
        "--pod-namespace",
        "istio-system",
    ]
    .map(String::from);
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend_from_slice(extra);
    let agent = Agent::start(&topo, &args);
    cni.accept_hello();
    assert_eq!(
        cni.add_as("uid-client", "client", "client", &client.netns_path()),
        ""
    );
    assert_eq!(
        cni.add_as("uid-server", "server", "server", &server.netns_path()),
        ""
    );
    assert_eq!(cni.snapshot_sent(), "");
    Mesh {
        topo,
        client,
        server,
        app,
        cni,
        agent,
        dir,
        mesh_path,
    }
}

/// One exchange from the client to the server's 9080 through the mesh; the answer.
pub fn hbone_exchange(m: &Mesh, payload: &str) -> String {
    let dst = SocketAddr::new(m.server.ip4, 9080);
    exchange(&m.client.netns_path(), dst, payload)
        .expect("connection through the mesh")
        .response
}
