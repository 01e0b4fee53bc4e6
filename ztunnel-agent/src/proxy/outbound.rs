//! 15001: connections an enrolled pod made, captured by `cgroup/connect4|6`. A service VIP
//! picks an endpoint by strict round robin; an HBONE workload is reached through a tunnel to
//! its 15008 (or its waypoint's); anything else is plain TCP passthrough.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::Instrument;

use super::connection::{Classify, Connection, ConnectionError};
use super::hbone::PoolKey;
use super::{Error, PodProxy, ILLEGAL_PORTS};
use crate::accesslog::{Direction, Peer};
use crate::identity::Identity;
use crate::metrics::OpenSocket;
use crate::state::workload::{NetworkAddress, Protocol, Workload};
use crate::state::MeshState;

/// Routing failures.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// A service without a usable endpoint.
    #[error("service {service} has no healthy endpoint for port {port}")]
    NoEndpoint {
        /// Service hostname.
        service: String,
        /// Port.
        port: u16,
    },
    /// A waypoint given by hostname (not supported yet).
    #[error("waypoint {0} is given by hostname; only network/IP waypoints are supported")]
    WaypointHostname(String),
    /// The destination is one of the agent's own ports.
    #[error(transparent)]
    Refused(#[from] Error),
}

impl Classify for RouteError {}

/// Where a connection goes.
#[derive(Debug, PartialEq)]
pub enum Route {
    /// Plain TCP to this address (with the workload, when known).
    Passthrough(SocketAddr, Option<Arc<Workload>>),
    /// An HBONE tunnel.
    Hbone {
        /// The server's 15008 (the workload's or its waypoint's).
        hbone_addr: SocketAddr,
        /// `:authority`.
        authority: SocketAddr,
        /// Identities the server may present.
        expected: Vec<Identity>,
        /// Destination workload.
        workload: Arc<Workload>,
        /// Service hostname, when dialled through a VIP.
        service: Option<String>,
        /// The waypoint the tunnel goes through, as the mesh names it (`network/IP`).
        waypoint: Option<String>,
    },
}

/// Whether routing a service connection takes the round robin's turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pick {
    /// A real connection: the next endpoint, advancing the round robin.
    Next,
    /// An explanation (`diagnose flow`): the endpoint the next connection would get, leaving
    /// the round robin where it is.
    Peek,
}

/// The address of `w` in the same family as `like`, else its first.
fn address_of(w: &Workload, like: IpAddr) -> Option<IpAddr> {
    crate::state::workload::address_like(&w.workload_ips, like)
}

/// Where a connection from a pod on `network` to `dst` goes, from the mesh state alone (a
/// service VIP advances that service's round robin). A self-call to one of the agent's ports
/// is refused.
pub fn route(mesh: &MeshState, network: &str, dst: SocketAddr) -> Result<Route, RouteError> {
    route_with(mesh, network, dst, Pick::Next)
}

/// [`route`], choosing whether a service VIP takes the round robin's turn.
pub fn route_with(
    mesh: &MeshState,
    network: &str,
    dst: SocketAddr,
    pick: Pick,
) -> Result<Route, RouteError> {
    if ILLEGAL_PORTS.contains(&dst.port()) {
        return Err(Error::SelfCall(dst).into());
    }
    let service = mesh.service_by_vip(network, dst.ip());
    let (workload, target) = match &service {
        Some(entry) => {
            let endpoint = match pick {
                Pick::Next => mesh.pick_endpoint(entry, dst.port()),
                Pick::Peek => mesh.peek_endpoint(entry, dst.port()),
            };
            let endpoint = endpoint.ok_or_else(|| RouteError::NoEndpoint {
                service: entry.service.hostname.clone(),
                port: dst.port(),
            })?;
            let ip =
                address_of(&endpoint.workload, dst.ip()).ok_or_else(|| RouteError::NoEndpoint {
                    service: entry.service.hostname.clone(),
                    port: dst.port(),
                })?;
            (endpoint.workload, SocketAddr::new(ip, endpoint.port))
        }
        None => match mesh.workload_by_ip(network, dst.ip()) {
            Some(w) => (w, dst),
            None => return Ok(Route::Passthrough(dst, None)),
        },
    };
    if workload.protocol != Protocol::HBONE {
        return Ok(Route::Passthrough(target, Some(workload)));
    }
    let mut expected: Vec<Identity> = service
        .iter()
        .flat_map(|s| s.service.subject_alt_names.iter())
        .filter_map(|san| san.parse().ok())
        .collect();
    expected.push(workload.identity());
    let waypoint = service
        .as_ref()
        .and_then(|s| s.service.waypoint.clone())
        .or_else(|| workload.waypoint.clone());
    if let Some(wp) = waypoint {
        let addr: NetworkAddress = wp
            .destination
            .parse()
            .map_err(|_| RouteError::WaypointHostname(wp.destination.clone()))?;
        let hbone_addr = SocketAddr::new(addr.address, wp.hbone_mtls_port);
        if let Some(w) = mesh.workload_by_ip(&addr.network, addr.address) {
            expected.push(w.identity());
        }
        // Through a waypoint the authority is what the application dialled (VIP:port).
        return Ok(Route::Hbone {
            hbone_addr,
            authority: dst,
            expected,
            workload,
            service: service.map(|s| s.service.hostname.clone()),
            waypoint: Some(wp.destination),
        });
    }
    Ok(Route::Hbone {
        hbone_addr: SocketAddr::new(target.ip(), ztunnel_common::HBONE_PORT),
        authority: target,
        expected,
        workload,
        service: service.map(|s| s.service.hostname.clone()),
        waypoint: None,
    })
}

fn peer_of(w: &Arc<Workload>, with_identity: bool) -> Peer {
    Peer {
        workload: Some(w.name.clone()),
        namespace: Some(w.namespace.clone()),
        identity: with_identity.then(|| w.identity()),
        detail: Some(w.clone()),
    }
}

/// Serves one captured outbound connection.
/// `_socket` keeps it counted in `istio_tcp_sockets_open` until this returns.
pub async fn handle(pod: Arc<PodProxy>, client: TcpStream, peer: SocketAddr, _socket: OpenSocket) {
    let super::OriginalDst(dst) = pod.sockets.original_dst(&client, peer);
    let mut conn = Connection::new(Direction::Outbound, peer, dst);
    let span = conn.span();
    // Inline (not a helper taking the future): the connection's future is stored once.
    let result = tokio::select! {
        biased;
        result = proxy(&pod, client, dst, &mut conn).instrument(span) => result,
        reached = pod.mesh.drain.overdue() => Err(reached.into()),
    };
    conn.finish(result);
}

async fn proxy(
    pod: &PodProxy,
    client: TcpStream,
    dst: SocketAddr,
    conn: &mut Connection,
) -> Result<(), ConnectionError> {
    let peer = conn.record.src_addr;
    tracing::debug!(
        pod = %pod.name,
        namespace = %pod.namespace,
        src.addr = %peer,
        original_dst = %dst,
        direction = "outbound",
        "captured connection"
    );
    let mesh = pod.mesh.state.snapshot();
    conn.record.src = pod.as_peer(&mesh, None);
    match route(&mesh, &pod.network, dst)? {
        Route::Passthrough(target, workload) => {
            conn.record.dst_addr = target;
            if let Some(w) = &workload {
                conn.record.dst = peer_of(w, false);
            }
            let upstream = pod.connect(target).await?;
            conn.established();
            let deadline = pod.mesh.drain.deadline_reached();
            super::splice::bidirectional(&client, &upstream, &conn.sent, &conn.received, deadline)
                .await?;
        }
        Route::Hbone {
            hbone_addr,
            authority,
            expected,
            workload,
            service,
            waypoint: _,
        } => {
            conn.record.src.identity = Some(pod.identity.clone());
            conn.record.dst_addr = hbone_addr;
            conn.record.dst_hbone_addr = Some(authority);
            conn.record.dst_service = service;
            conn.record.dst = peer_of(&workload, true);
            let key = PoolKey {
                source: pod.identity.clone(),
                expected,
                dst: hbone_addr,
                src_ip: peer.ip(),
            };
            let (tunnel, _stream) = pod.mesh.pool.tunnel(pod, key, authority, peer).await?;
            conn.established();
            let mut client = client;
            let relayed = super::copy::tunnel(
                &mut client,
                tunnel.send,
                tunnel.recv,
                &conn.sent,
                &conn.received,
                pod.mesh.drain.deadline_reached(),
            )
            .await;
            if relayed.is_err() {
                super::reset_on_close(&client);
            }
            relayed?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two HBONE pods behind `reviews` (one dual-stack), a TCP pod behind `legacy`, an HBONE
    /// pod `ratings` with its own waypoint, a service `productpage` with a waypoint service,
    /// a service whose waypoint is a hostname, and the waypoint's own pod and service.
    const MESH: &str = r#"
workloads:
- {uid: r1, name: reviews-v1, namespace: default, serviceAccount: reviews, protocol: HBONE,
   workloadIps: [10.0.0.11, "fd00::11"], services: {"default/reviews.default.svc.cluster.local": {9080: 9081}}}
- {uid: r2, name: reviews-v2, namespace: default, serviceAccount: reviews, protocol: HBONE,
   workloadIps: [10.0.0.12], services: {"default/reviews.default.svc.cluster.local": {9080: 9081}}}
- {uid: l1, name: legacy-v1, namespace: default, protocol: TCP,
   workloadIps: [10.0.0.21], services: {"default/legacy.default.svc.cluster.local": {80: 8080}}}
- {uid: rt, name: ratings-v1, namespace: default, serviceAccount: ratings, protocol: HBONE,
   workloadIps: [10.0.0.31], waypoint: {destination: "/10.0.0.41", hboneMtlsPort: 15008}}
- {uid: pp, name: productpage-v1, namespace: default, serviceAccount: productpage, protocol: HBONE,
   workloadIps: [10.0.0.51], services: {"default/productpage.default.svc.cluster.local": {9080: 9080}}}
- {uid: wp, name: waypoint-0, namespace: default, serviceAccount: waypoint, protocol: HBONE,
   workloadIps: [10.0.0.41]}
services:
- {name: reviews, namespace: default, hostname: reviews.default.svc.cluster.local,
   vips: ["/10.96.0.10"], ports: {9080: 9081},
   subjectAltNames: ["spiffe://cluster.local/ns/default/sa/reviews-san"]}
- {name: legacy, namespace: default, hostname: legacy.default.svc.cluster.local,
   vips: ["/10.96.0.20"], ports: {80: 8080}}
- {name: productpage, namespace: default, hostname: productpage.default.svc.cluster.local,
   vips: ["/10.96.0.30"], ports: {9080: 9080},
   waypoint: {destination: "/10.0.0.41", hboneMtlsPort: 15008}}
- {name: named, namespace: default, hostname: named.default.svc.cluster.local,
   vips: ["/10.96.0.40"], ports: {80: 80},
   waypoint: {destination: "default/waypoint.default.svc.cluster.local", hboneMtlsPort: 15008}}
"#;

    fn mesh() -> MeshState {
        crate::xds::local::load_state(std::path::Path::new("routing.yaml"), MESH)
            .expect("the routing mesh parses")
            .0
    }

    /// A route in one line, for the table.
    fn summary(route: Result<Route, RouteError>) -> String {
        match route {
            Err(e) => format!("error: {e}"),
            Ok(Route::Passthrough(to, w)) => format!(
                "tcp {to} {}",
                w.map_or("(unknown)".to_string(), |w| w.name.clone())
            ),
            Ok(Route::Hbone {
                hbone_addr,
                authority,
                expected,
                workload,
                service,
                waypoint: _,
            }) => {
                let expected: Vec<String> =
                    expected.iter().map(|i| i.service_account.clone()).collect();
                format!(
                    "hbone {hbone_addr} authority={authority} {} expect=[{}]{}",
                    workload.name,
                    expected.join(","),
                    service.map(|s| format!(" via {s}")).unwrap_or_default()
                )
            }
        }
    }

    #[test]
    fn routing_table() {
        let mesh = mesh();
        let cases: &[(&str, &str)] = &[
            // A VIP: strict round robin over its endpoints, the service's port mapping, the
            // service's SANs and the endpoint's identity accepted.
            ("10.96.0.10:9080", "hbone 10.0.0.11:15008 authority=10.0.0.11:9081 reviews-v1 expect=[reviews-san,reviews] via reviews.default.svc.cluster.local"),
            ("10.96.0.10:9080", "hbone 10.0.0.12:15008 authority=10.0.0.12:9081 reviews-v2 expect=[reviews-san,reviews] via reviews.default.svc.cluster.local"),
            // Another service keeps its own turn; the first one continues where it was.
            ("10.96.0.20:80", "tcp 10.0.0.21:8080 legacy-v1"),
            ("10.96.0.10:9080", "hbone 10.0.0.11:15008 authority=10.0.0.11:9081 reviews-v1 expect=[reviews-san,reviews] via reviews.default.svc.cluster.local"),
            // A pod IP: straight to its 15008, the port as dialled.
            ("10.0.0.12:9080", "hbone 10.0.0.12:15008 authority=10.0.0.12:9080 reviews-v2 expect=[reviews]"),
            // A TCP (non-HBONE) workload: plain passthrough, workload known for the log.
            ("10.0.0.21:8080", "tcp 10.0.0.21:8080 legacy-v1"),
            // Nobody the mesh knows: passthrough as dialled.
            ("192.0.2.7:443", "tcp 192.0.2.7:443 (unknown)"),
            // A workload's waypoint: the tunnel goes to the waypoint, authority as dialled,
            // the waypoint's identity accepted besides the destination's.
            ("10.0.0.31:9080", "hbone 10.0.0.41:15008 authority=10.0.0.31:9080 ratings-v1 expect=[ratings,waypoint]"),
            // A service's waypoint, for service-addressed traffic: authority is the VIP.
            ("10.96.0.30:9080", "hbone 10.0.0.41:15008 authority=10.96.0.30:9080 productpage-v1 expect=[productpage,waypoint] via productpage.default.svc.cluster.local"),
            // A service without endpoints.
            ("10.96.0.40:80", "error: service named.default.svc.cluster.local has no healthy endpoint for port 80"),
            // Self-calls to the agent's ports are refused, whatever the address.
            ("10.0.0.12:15001", "error: refused self-call to 10.0.0.12:15001: the destination is one of the agent's ports (15001, 15006, 15008)"),
            ("10.96.0.10:15006", "error: refused self-call to 10.96.0.10:15006: the destination is one of the agent's ports (15001, 15006, 15008)"),
            ("192.0.2.7:15008", "error: refused self-call to 192.0.2.7:15008: the destination is one of the agent's ports (15001, 15006, 15008)"),
            // IPv6: a pod's v6 address is tunnelled over v6.
            ("[fd00::11]:9080", "hbone [fd00::11]:15008 authority=[fd00::11]:9080 reviews-v1 expect=[reviews]"),
            ("[2001:db8::1]:80", "tcp [2001:db8::1]:80 (unknown)"),
        ];
        for (dst, want) in cases {
            let dst: SocketAddr = dst.parse().expect("address");
            assert_eq!(summary(route(&mesh, "", dst)), *want, "to {dst}");
        }
    }

    #[test]
    fn a_waypoint_given_by_hostname_is_named_in_the_error() {
        let yaml = MESH.replace(
            "services:\n",
            "- {uid: n1, name: named-v1, namespace: default, protocol: HBONE, workloadIps: [10.0.0.61],\n   services: {\"default/named.default.svc.cluster.local\": {80: 80}}}\nservices:\n",
        );
        let mesh = crate::xds::local::load_state(std::path::Path::new("r.yaml"), &yaml)
            .expect("parses")
            .0;
        let got = summary(route(&mesh, "", "10.96.0.40:80".parse().expect("a")));
        assert!(
            got.contains("default/waypoint.default.svc.cluster.local"),
            "{got}"
        );
        assert!(got.contains("only network/IP waypoints"), "{got}");
    }
}
