//! The set-up several tests share: one node named after the test, an enrolled client pod, a
//! server pod with the test server on 9080, and an agent on the local config, ready.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::agent::Agent;
use crate::mesh::{self, Workload};
use crate::topology::{Pod, Topology};
use crate::traffic::Server;

/// Client 10.244.1.10 (service account `client`), server 10.244.1.11 (service account
/// `server` when enrolled), the application on the server's 9080.
pub struct OneHop {
    /// The agent (declared first: it stops before the namespaces go).
    pub agent: Agent,
    /// The local config it reads.
    pub config: PathBuf,
    /// The client pod (always enrolled).
    pub client: Pod,
    /// The server pod.
    pub server: Pod,
    /// The test server on the server pod's 9080.
    pub app: Server,
    /// The node.
    pub topo: Topology,
}

impl OneHop {
    /// Starts it; the server pod is enrolled (HBONE) when `server_enrolled`, else plain TCP;
    /// `extra` are more `run` arguments.
    pub fn start(server_enrolled: bool, extra: &[&str]) -> Self {
        let mut topo = Topology::for_test();
        let client = topo.add_pod("client", 10);
        let server = topo.add_pod("server", 11);
        let app = Server::start(server.netns_path(), SocketAddr::new(server.ip4, 9080));
        let mut workloads = vec![Workload::hbone(&client, "client", "node-1")];
        if server_enrolled {
            workloads.push(Workload::hbone(&server, "server", "node-1"));
        }
        let yaml = mesh::yaml(&workloads, &[]);
        let (agent, config) = Agent::start_local(&topo, "node-1", &yaml, extra);
        Self {
            agent,
            config,
            client,
            server,
            app,
            topo,
        }
    }

    /// The application's address.
    pub fn dst(&self) -> SocketAddr {
        SocketAddr::new(self.server.ip4, 9080)
    }
}
