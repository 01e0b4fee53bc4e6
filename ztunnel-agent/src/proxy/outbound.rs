//! 15001: connections an enrolled pod made, captured by `cgroup/connect4|6`. A service VIP
//! picks an endpoint by strict round robin; an HBONE workload is reached through a tunnel to
//! its 15008 (or its waypoint's); anything else is plain TCP passthrough.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::Instrument;

use super::connection::{Classify, Connection, ConnectionError};
use super::hbone::{PoolKey, StreamGuard, Tunnel};
use super::{Accepted, Error, PodProxy, ILLEGAL_PORTS};
use crate::accesslog::{Direction, Peer};
use crate::identity::Identity;
use crate::state::service::LoadBalancerMode;
use crate::state::workload::{GatewayAddress, NetworkAddress, Protocol, Workload};
use crate::state::{Endpoint, MeshState, ServiceEntry};

/// Routing failures.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// A service without a usable endpoint.
    #[error("service {service} has no healthy endpoint for port {port}{why}")]
    NoEndpoint {
        /// Service hostname.
        service: String,
        /// Port.
        port: u16,
        /// What narrowed the choice, when the service's load balancing did.
        why: &'static str,
    },
    /// A waypoint the mesh state does not know.
    #[error("no healthy waypoint for {whose}: waypoint {waypoint} is not in the mesh state (no service or workload has that address or hostname; is the waypoint deployed, and does istiod send it?)")]
    UnknownWaypoint {
        /// `service <hostname>` or `workload <ns>/<name>`.
        whose: String,
        /// The waypoint as the mesh names it.
        waypoint: String,
    },
    /// A waypoint service none of whose endpoints can take the tunnel.
    #[error("no healthy waypoint for {whose}: waypoint service {waypoint} has no healthy endpoint on port {port}")]
    NoHealthyWaypoint {
        /// `service <hostname>` or `workload <ns>/<name>`.
        whose: String,
        /// The waypoint's service hostname.
        waypoint: String,
        /// Its HBONE port.
        port: u16,
    },
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
        /// The server's HBONE address (the workload's 15008, or its waypoint endpoint's
        /// `hboneMtlsPort`).
        hbone_addr: SocketAddr,
        /// `:authority`.
        authority: SocketAddr,
        /// Identities the server may present.
        expected: Vec<Identity>,
        /// The workload the tunnel reaches: the destination, or the waypoint.
        workload: Arc<Workload>,
        /// Service hostname, when dialled through a VIP.
        service: Option<String>,
        /// The waypoint the tunnel goes through, as the mesh names it (`network/IP` or
        /// `namespace/hostname`).
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

/// Who opens a connection, as routing needs to know it.
#[derive(Clone, Copy, Debug)]
pub struct Source<'a> {
    /// The network the connection starts on.
    pub network: &'a str,
    /// The source's workload (locality for load balancing, and whether it is a waypoint);
    /// a default one when the mesh state does not know it yet.
    pub workload: &'a Workload,
    /// The identity it connects with.
    pub identity: &'a Identity,
    /// The address it connects from.
    pub ip: IpAddr,
}

/// The address of `w` in the same family as `like`, else its first.
fn address_of(w: &Workload, like: IpAddr) -> Option<IpAddr> {
    crate::state::workload::address_like(&w.workload_ips, like)
}

/// Where a connection from `src` to `dst` goes, from the mesh state alone (a service VIP
/// advances that service's round robin). A self-call to one of the agent's ports is refused.
pub fn route(mesh: &MeshState, src: &Source<'_>, dst: SocketAddr) -> Result<Route, RouteError> {
    route_with(mesh, src, dst, Pick::Next)
}

fn pick(
    mesh: &MeshState,
    entry: &ServiceEntry,
    port: u16,
    src: &Workload,
    how: Pick,
) -> Option<Endpoint> {
    mesh.next_endpoint(entry, port, src, how == Pick::Next)
}

/// [`route`], choosing whether a service VIP takes the round robin's turn. Upstream's order:
/// a service's waypoint for service-addressed traffic; else the endpoint (round robin within
/// the service's load-balancing preferences); then, for workload-addressed traffic not coming
/// from that waypoint, the workload's waypoint.
pub fn route_with(
    mesh: &MeshState,
    src: &Source<'_>,
    dst: SocketAddr,
    how: Pick,
) -> Result<Route, RouteError> {
    if ILLEGAL_PORTS.contains(&dst.port()) {
        return Err(Error::SelfCall(dst).into());
    }
    let service = mesh.service_by_vip(src.network, dst.ip());
    let (workload, target) = match &service {
        Some(entry) => {
            // Unlike upstream, the waypoint's own connections to its service are not sent
            // back to it (upstream relies on waypoints not being captured).
            if let Some(gw) = entry
                .service
                .waypoint
                .as_ref()
                .filter(|gw| !from_waypoint(mesh, gw, src))
            {
                let whose = format!("service {}", entry.service.hostname);
                return through_waypoint(mesh, src, gw, &whose, dst, how, Some(entry));
            }
            let lb = entry.service.load_balancer.as_ref();
            if lb.is_some_and(|lb| lb.mode == LoadBalancerMode::Passthrough) {
                return Ok(Route::Passthrough(dst, None));
            }
            let no_endpoint = || RouteError::NoEndpoint {
                service: entry.service.hostname.clone(),
                port: dst.port(),
                why: match lb.map(|lb| lb.mode) {
                    Some(LoadBalancerMode::Strict) => {
                        " matching its strict routing preferences (loadBalancer.mode STRICT)"
                    }
                    _ => "",
                },
            };
            let endpoint =
                pick(mesh, entry, dst.port(), src.workload, how).ok_or_else(no_endpoint)?;
            let ip = address_of(&endpoint.workload, dst.ip()).ok_or_else(no_endpoint)?;
            (endpoint.workload, SocketAddr::new(ip, endpoint.port))
        }
        None => match mesh.workload_by_ip(src.network, dst.ip()) {
            Some(w) => (w, dst),
            None => return Ok(Route::Passthrough(dst, None)),
        },
    };
    if service.is_none() {
        if let Some(gw) = &workload.waypoint {
            if !from_waypoint(mesh, gw, src) {
                let whose = format!("workload {}/{}", workload.namespace, workload.name);
                return through_waypoint(mesh, src, gw, &whose, dst, how, None);
            }
        }
    }
    if workload.protocol != Protocol::HBONE {
        return Ok(Route::Passthrough(target, Some(workload)));
    }
    let mut expected: Vec<Identity> = service
        .iter()
        .flat_map(|s| s.service.subject_alt_names.iter())
        .filter_map(|san| san.parse().ok())
        .collect();
    expected.push(workload.identity());
    Ok(Route::Hbone {
        hbone_addr: SocketAddr::new(target.ip(), ztunnel_common::HBONE_PORT),
        authority: target,
        expected,
        workload,
        service: service.map(|s| s.service.hostname.clone()),
        waypoint: None,
    })
}

/// A waypoint as the mesh names it: an address (of a service or a workload) or a hostname.
enum WaypointRef<'a> {
    Address(NetworkAddress),
    Hostname {
        namespace: &'a str,
        hostname: &'a str,
    },
}

fn waypoint_ref(destination: &str) -> WaypointRef<'_> {
    match destination.parse::<NetworkAddress>() {
        Ok(address) => WaypointRef::Address(address),
        Err(_) => {
            let (namespace, hostname) = destination.split_once('/').unwrap_or(("", destination));
            WaypointRef::Hostname {
                namespace,
                hostname,
            }
        }
    }
}

/// The waypoint's service (when it is one) or its workload.
fn waypoint_target(
    mesh: &MeshState,
    gw: &GatewayAddress,
) -> Option<Result<Arc<ServiceEntry>, Arc<Workload>>> {
    match waypoint_ref(&gw.destination) {
        WaypointRef::Address(a) => mesh
            .service_by_vip(&a.network, a.address)
            .map(Ok)
            .or_else(|| mesh.workload_by_ip(&a.network, a.address).map(Err)),
        WaypointRef::Hostname {
            namespace,
            hostname,
        } => mesh
            .service(&format!("{namespace}/{hostname}"))
            .map(Ok)
            .or_else(|| {
                mesh.workload_by_hostname(&hostname.to_ascii_lowercase())
                    .filter(|w| w.namespace == namespace)
                    .map(Err)
            }),
    }
}

/// Whether one of the workloads making up waypoint `gw` (its service's endpoints, or the
/// workload it names) satisfies `is`.
pub(crate) fn waypoint_has(
    mesh: &MeshState,
    gw: &GatewayAddress,
    is: impl Fn(&Workload) -> bool,
) -> bool {
    match waypoint_target(mesh, gw) {
        Some(Ok(entry)) => entry
            .endpoints
            .keys()
            .filter_map(|uid| mesh.workload(uid))
            .any(|w| is(&w)),
        Some(Err(w)) => is(&w),
        None => false,
    }
}

/// Whether `src` is one of the workloads making up waypoint `gw` (its identity and address
/// both match): its traffic goes straight to the destination, never back to itself.
fn from_waypoint(mesh: &MeshState, gw: &GatewayAddress, src: &Source<'_>) -> bool {
    waypoint_has(mesh, gw, |w| {
        w.identity() == *src.identity && w.workload_ips.contains(&src.ip)
    })
}

/// A tunnel to one of waypoint `gw`'s workloads for a connection to `dst`: to a healthy
/// endpoint of the waypoint's service (round robin, at the port the service maps
/// `hboneMtlsPort` to) or to the waypoint workload at `hboneMtlsPort`; `:authority` is what
/// the application dialled; the server must present the waypoint's identity or the
/// subjectAltNames of the waypoint service it was reached through. A waypoint given by address keeps that address's family; one
/// given by hostname follows the dialled address's.
fn through_waypoint(
    mesh: &MeshState,
    src: &Source<'_>,
    gw: &GatewayAddress,
    whose: &str,
    dst: SocketAddr,
    how: Pick,
    service: Option<&Arc<ServiceEntry>>,
) -> Result<Route, RouteError> {
    let like = match waypoint_ref(&gw.destination) {
        WaypointRef::Address(a) => a.address,
        WaypointRef::Hostname { .. } => dst.ip(),
    };
    let unknown = || RouteError::UnknownWaypoint {
        whose: whose.to_string(),
        waypoint: gw.destination.clone(),
    };
    let (workload, port, sans) =
        match waypoint_target(mesh, gw).ok_or_else(unknown)? {
            Ok(entry) => {
                let endpoint = pick(mesh, &entry, gw.hbone_mtls_port, src.workload, how)
                    .ok_or_else(|| RouteError::NoHealthyWaypoint {
                        whose: whose.to_string(),
                        waypoint: entry.service.hostname.clone(),
                        port: gw.hbone_mtls_port,
                    })?;
                let sans = entry.service.subject_alt_names.clone();
                (endpoint.workload, endpoint.port, sans)
            }
            Err(workload) => (workload, gw.hbone_mtls_port, Vec::new()),
        };
    // The exact address a waypoint was given by, when it is the workload's (upstream's rule).
    let exact = workload.workload_ips.contains(&like).then_some(like);
    let ip = exact
        .or_else(|| address_of(&workload, like))
        .ok_or_else(|| RouteError::NoHealthyWaypoint {
            whose: whose.to_string(),
            waypoint: format!(
                "{} (workload {}/{} has no address)",
                gw.destination, workload.namespace, workload.name
            ),
            port: gw.hbone_mtls_port,
        })?;
    // As upstream: the waypoint workload's identity, and the subjectAltNames of the waypoint
    // service it was reached through (none for a waypoint given by a pod's address).
    let mut expected = vec![workload.identity()];
    expected.extend(sans.iter().filter_map(|san| san.parse().ok()));
    Ok(Route::Hbone {
        hbone_addr: SocketAddr::new(ip, port),
        authority: dst,
        expected,
        workload,
        service: service.map(|s| s.service.hostname.clone()),
        waypoint: Some(gw.destination.clone()),
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
/// `_accepted` keeps it counted in `istio_tcp_sockets_open` and in the pod's connection limit
/// until this returns.
pub async fn handle(pod: Arc<PodProxy>, client: TcpStream, peer: SocketAddr, _accepted: Accepted) {
    let super::OriginalDst(dst) = pod.sockets.original_dst(&client, peer);
    let mut conn = Connection::new(Direction::Outbound, peer, dst);
    let span = conn.span();
    // Boxed: here the relay's future was stored twice in this one (made, then moved into
    // `select!`), and this future is the task's memory for as long as the connection lives
    // (an idle outbound task was 4.5 KB; boxed, 0.8 KB plus the boxed relay's 0.8 KB).
    let proxying = Box::pin(proxy(&pod, client, dst, &mut conn).instrument(span));
    let result = tokio::select! {
        biased;
        result = proxying => result,
        reached = pod.mesh.drain.overdue() => Err(reached.into()),
    };
    conn.finish(result);
}

/// An outbound connection routed and connected: what its bytes go to.
enum Established {
    /// Plain TCP to the destination.
    Passthrough(TcpStream),
    /// A CONNECT stream, counted on its pooled connection while the guard lives.
    Hbone(Tunnel, StreamGuard),
}

/// Routes and connects, then relays until either side ends.
async fn proxy(
    pod: &PodProxy,
    client: TcpStream,
    dst: SocketAddr,
    conn: &mut Connection,
) -> Result<(), ConnectionError> {
    // Boxed: routing and connecting (a TLS and HTTP/2 handshake when no pooled connection
    // serves) are this future's largest state, and the task holding it lives as long as the
    // connection; boxed, that memory is freed once connected, and the relay keeps only what
    // it moves bytes with.
    let established = Box::pin(establish(pod, dst, conn)).await?;
    conn.established();
    let deadline = pod.mesh.drain.deadline_reached();
    match established {
        Established::Passthrough(upstream) => {
            // Boxed: the splice relay's state is larger than the HBONE relay's, and every
            // connection's task would otherwise be sized for it.
            Box::pin(super::splice::bidirectional(
                client,
                upstream,
                &conn.sent,
                &conn.received,
                deadline,
                pod.mesh.kernel_relay.as_deref(),
            ))
            .await?;
        }
        Established::Hbone(tunnel, _stream) => {
            let mut client = client;
            let relayed = super::copy::tunnel(
                &mut client,
                tunnel.send,
                tunnel.recv,
                &conn.sent,
                &conn.received,
                deadline,
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

/// Routes the connection (filling in its record) and connects to where it goes: the
/// destination itself, or a CONNECT stream on a pooled HBONE connection.
async fn establish(
    pod: &PodProxy,
    dst: SocketAddr,
    conn: &mut Connection,
) -> Result<Established, ConnectionError> {
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
    let me = pod.routing_workload(&mesh);
    let src = Source {
        network: &pod.network,
        workload: &me,
        identity: &pod.identity,
        ip: peer.ip(),
    };
    match route(&mesh, &src, dst)? {
        Route::Passthrough(target, workload) => {
            conn.record.dst_addr = target;
            if let Some(w) = &workload {
                conn.record.dst = peer_of(w, false);
            }
            Ok(Established::Passthrough(pod.connect(target).await?))
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
            let (tunnel, stream) = pod.mesh.pool.tunnel(pod, key, authority, peer).await?;
            Ok(Established::Hbone(tunnel, stream))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two HBONE pods behind `reviews` (one dual-stack), a TCP pod behind `legacy`, an HBONE
    /// pod `ratings` whose waypoint is the waypoint pod's address, a TCP pod `old` whose
    /// waypoint is the waypoint service's VIP, a service `productpage` with the waypoint pod as
    /// its waypoint, a service `named` whose waypoint is given by hostname, two waypoint pods
    /// behind the `waypoint` service (port 15008, its own SAN), and broken waypoints: an
    /// address nobody has, a service without endpoints.
    const MESH: &str = r#"
workloads:
- {uid: r1, name: reviews-v1, namespace: default, serviceAccount: reviews, protocol: HBONE,
   workloadIps: [10.0.0.11, "fd00::11"], services: {"default/reviews.default.svc.cluster.local": {9080: 9081}},
   waypoint: {destination: "/10.0.0.41", hboneMtlsPort: 15008}}
- {uid: r2, name: reviews-v2, namespace: default, serviceAccount: reviews, protocol: HBONE,
   workloadIps: [10.0.0.12], services: {"default/reviews.default.svc.cluster.local": {9080: 9081}}}
- {uid: l1, name: legacy-v1, namespace: default, protocol: TCP,
   workloadIps: [10.0.0.21], services: {"default/legacy.default.svc.cluster.local": {80: 8080}}}
- {uid: rt, name: ratings-v1, namespace: default, serviceAccount: ratings, protocol: HBONE,
   workloadIps: [10.0.0.31], waypoint: {destination: "/10.0.0.41", hboneMtlsPort: 15008}}
- {uid: old, name: old-v1, namespace: default, serviceAccount: old, protocol: TCP,
   workloadIps: [10.0.0.32], waypoint: {destination: "/10.96.0.99", hboneMtlsPort: 15008}}
- {uid: pp, name: productpage-v1, namespace: default, serviceAccount: productpage, protocol: HBONE,
   workloadIps: [10.0.0.51], services: {"default/productpage.default.svc.cluster.local": {9080: 9080}}}
- {uid: wp0, name: waypoint-0, namespace: default, serviceAccount: waypoint, protocol: HBONE,
   workloadIps: [10.0.0.41, "fd00::41"], services: {"default/waypoint.default.svc.cluster.local": {15008: 15008}}}
- {uid: two, name: two-v1, namespace: default, serviceAccount: two, protocol: HBONE,
   workloadIps: [10.0.0.71], waypoint: {destination: "/10.0.0.82", hboneMtlsPort: 15008}}
- {uid: wp2, name: waypoint-2, namespace: default, serviceAccount: waypoint, protocol: HBONE,
   workloadIps: [10.0.0.81, 10.0.0.82]}
- {uid: vm, name: vm-waypoint, namespace: other, serviceAccount: waypoint, protocol: HBONE,
   workloadIps: [10.0.0.91], hostname: vm-waypoint.example}
- {uid: wp1, name: waypoint-1, namespace: default, serviceAccount: waypoint, protocol: HBONE,
   workloadIps: [10.0.0.42, "fd00::42"], services: {"default/waypoint.default.svc.cluster.local": {15008: 15008}}}
services:
- {name: reviews, namespace: default, hostname: reviews.default.svc.cluster.local,
   vips: ["/10.96.0.10", "/fd00::10"], ports: {9080: 9081},
   subjectAltNames: ["spiffe://cluster.local/ns/default/sa/reviews-san"]}
- {name: legacy, namespace: default, hostname: legacy.default.svc.cluster.local,
   vips: ["/10.96.0.20"], ports: {80: 8080}}
- {name: productpage, namespace: default, hostname: productpage.default.svc.cluster.local,
   vips: ["/10.96.0.30"], ports: {9080: 9080},
   waypoint: {destination: "/10.0.0.41", hboneMtlsPort: 15008}}
- {name: named, namespace: default, hostname: named.default.svc.cluster.local,
   vips: ["/10.96.0.40", "/fd00::40"], ports: {80: 80},
   waypoint: {destination: "default/waypoint.default.svc.cluster.local", hboneMtlsPort: 15008}}
- {name: waypoint, namespace: default, hostname: waypoint.default.svc.cluster.local,
   vips: ["/10.96.0.99"], ports: {15008: 15008},
   subjectAltNames: ["spiffe://cluster.local/ns/default/sa/waypoint-san"]}
- {name: lost, namespace: default, hostname: lost.default.svc.cluster.local,
   vips: ["/10.96.0.60"], ports: {80: 80},
   waypoint: {destination: "/10.96.0.98", hboneMtlsPort: 15008}}
- {name: elsewhere, namespace: default, hostname: elsewhere.default.svc.cluster.local,
   vips: ["/10.96.0.63"], ports: {80: 80},
   waypoint: {destination: "default/vm-waypoint.example", hboneMtlsPort: 15008}}
- {name: gone, namespace: default, hostname: gone.default.svc.cluster.local,
   vips: ["/10.96.0.61"], ports: {15008: 15008}}
- {name: stranded, namespace: default, hostname: stranded.default.svc.cluster.local,
   vips: ["/10.96.0.62"], ports: {80: 80},
   waypoint: {destination: "default/gone.default.svc.cluster.local", hboneMtlsPort: 15008}}
"#;

    fn mesh_from(yaml: &str) -> MeshState {
        crate::xds::local::load_state(std::path::Path::new("routing.yaml"), yaml)
            .expect("the routing mesh parses")
            .0
    }

    fn mesh() -> MeshState {
        mesh_from(MESH)
    }

    fn identity(sa: &str) -> Identity {
        format!("spiffe://cluster.local/ns/default/sa/{sa}")
            .parse()
            .expect("identity")
    }

    /// Routes `dst` for a source with `identity` at `ip`, its workload looked up by address.
    fn route_as(
        mesh: &MeshState,
        sa: &str,
        ip: &str,
        dst: SocketAddr,
    ) -> Result<Route, RouteError> {
        let ip: IpAddr = ip.parse().expect("ip");
        let id = identity(sa);
        let workload = mesh
            .workload_by_ip("", ip)
            .map(|w| (*w).clone())
            .unwrap_or_default();
        let src = Source {
            network: "",
            workload: &workload,
            identity: &id,
            ip,
        };
        route(mesh, &src, dst)
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
                waypoint,
            }) => {
                let expected: Vec<String> =
                    expected.iter().map(|i| i.service_account.clone()).collect();
                format!(
                    "hbone {hbone_addr} authority={authority} {} expect=[{}]{}{}",
                    workload.name,
                    expected.join(","),
                    service.map(|s| format!(" via {s}")).unwrap_or_default(),
                    waypoint
                        .map(|w| format!(" waypoint {w}"))
                        .unwrap_or_default(),
                )
            }
        }
    }

    /// Each case is a connection from a plain client pod (10.0.0.99, not in the mesh state)
    /// unless it names its source; cases run in order (round robin carries over).
    #[test]
    fn routing_table() {
        let mesh = mesh();
        let cases: &[(&str, &str, &str, &str)] = &[
            // A VIP: strict round robin over its endpoints, the service's port mapping, the
            // service's SANs and the endpoint's identity accepted. An endpoint's own
            // waypoint is not used for service-addressed traffic (upstream's rule).
            ("client", "10.0.0.99", "10.96.0.10:9080", "hbone 10.0.0.11:15008 authority=10.0.0.11:9081 reviews-v1 expect=[reviews-san,reviews] via reviews.default.svc.cluster.local"),
            ("client", "10.0.0.99", "10.96.0.10:9080", "hbone 10.0.0.12:15008 authority=10.0.0.12:9081 reviews-v2 expect=[reviews-san,reviews] via reviews.default.svc.cluster.local"),
            // Another service keeps its own turn; the first one continues where it was.
            ("client", "10.0.0.99", "10.96.0.20:80", "tcp 10.0.0.21:8080 legacy-v1"),
            ("client", "10.0.0.99", "10.96.0.10:9080", "hbone 10.0.0.11:15008 authority=10.0.0.11:9081 reviews-v1 expect=[reviews-san,reviews] via reviews.default.svc.cluster.local"),
            // A pod IP: straight to its 15008, the port as dialled.
            ("client", "10.0.0.99", "10.0.0.12:9080", "hbone 10.0.0.12:15008 authority=10.0.0.12:9080 reviews-v2 expect=[reviews]"),
            // A TCP (non-HBONE) workload: plain passthrough, workload known for the log.
            ("client", "10.0.0.99", "10.0.0.21:8080", "tcp 10.0.0.21:8080 legacy-v1"),
            // Nobody the mesh knows: passthrough as dialled.
            ("client", "10.0.0.99", "192.0.2.7:443", "tcp 192.0.2.7:443 (unknown)"),
            // Workload-addressed traffic to a workload with a waypoint given by the waypoint
            // pod's address: the tunnel goes to that pod's hboneMtlsPort, :authority as
            // dialled, and only the waypoint (its identity or its service's SAN) is accepted.
            ("client", "10.0.0.99", "10.0.0.31:9080", "hbone 10.0.0.41:15008 authority=10.0.0.31:9080 waypoint-0 expect=[waypoint] waypoint /10.0.0.41"),
            ("client", "10.0.0.99", "10.0.0.11:9081", "hbone 10.0.0.41:15008 authority=10.0.0.11:9081 waypoint-0 expect=[waypoint] waypoint /10.0.0.41"),
            // Over IPv6 to the same pod: the waypoint given by an IPv4 address stays IPv4.
            ("client", "fd00::99", "[fd00::11]:9081", "hbone 10.0.0.41:15008 authority=[fd00::11]:9081 waypoint-0 expect=[waypoint] waypoint /10.0.0.41"),
            // A TCP workload whose waypoint is the waypoint service's VIP: HBONE to one of the
            // service's endpoints (round robin), at the port the service maps 15008 to.
            ("client", "10.0.0.99", "10.0.0.32:5432", "hbone 10.0.0.41:15008 authority=10.0.0.32:5432 waypoint-0 expect=[waypoint,waypoint-san] waypoint /10.96.0.99"),
            ("client", "10.0.0.99", "10.0.0.32:5432", "hbone 10.0.0.42:15008 authority=10.0.0.32:5432 waypoint-1 expect=[waypoint,waypoint-san] waypoint /10.96.0.99"),
            // Traffic from the waypoint itself (its identity, its address) goes straight to
            // the destination: no loop.
            ("waypoint", "10.0.0.41", "10.0.0.31:9080", "hbone 10.0.0.31:15008 authority=10.0.0.31:9080 ratings-v1 expect=[ratings]"),
            ("waypoint", "10.0.0.42", "10.0.0.32:5432", "tcp 10.0.0.32:5432 old-v1"),
            // The waypoint's address with another identity is not the waypoint.
            ("ratings", "10.0.0.41", "10.0.0.31:9080", "hbone 10.0.0.41:15008 authority=10.0.0.31:9080 waypoint-0 expect=[waypoint] waypoint /10.0.0.41"),
            // Service-addressed traffic to a service with a waypoint: the service's
            // waypoint, :authority the VIP and port, no endpoint picked here.
            ("client", "10.0.0.99", "10.96.0.30:9080", "hbone 10.0.0.41:15008 authority=10.96.0.30:9080 waypoint-0 expect=[waypoint] via productpage.default.svc.cluster.local waypoint /10.0.0.41"),
            // A waypoint given by hostname: the waypoint service's endpoints in turn, in the
            // dialled address's family.
            ("client", "10.0.0.99", "10.96.0.40:80", "hbone 10.0.0.41:15008 authority=10.96.0.40:80 waypoint-0 expect=[waypoint,waypoint-san] via named.default.svc.cluster.local waypoint default/waypoint.default.svc.cluster.local"),
            ("client", "fd00::99", "[fd00::40]:80", "hbone [fd00::42]:15008 authority=[fd00::40]:80 waypoint-1 expect=[waypoint,waypoint-san] via named.default.svc.cluster.local waypoint default/waypoint.default.svc.cluster.local"),
            // Waypoints that cannot be resolved fail the connection, naming what is missing;
            // never a silent bypass.
            ("client", "10.0.0.99", "10.96.0.60:80", "error: no healthy waypoint for service lost.default.svc.cluster.local: waypoint /10.96.0.98 is not in the mesh state (no service or workload has that address or hostname; is the waypoint deployed, and does istiod send it?)"),
            ("client", "10.0.0.99", "10.96.0.62:80", "error: no healthy waypoint for service stranded.default.svc.cluster.local: waypoint service gone.default.svc.cluster.local has no healthy endpoint on port 15008"),
            // A waypoint pod given by its second address is reached on that address.
            ("client", "10.0.0.99", "10.0.0.71:80", "hbone 10.0.0.82:15008 authority=10.0.0.71:80 waypoint-2 expect=[waypoint] waypoint /10.0.0.82"),
            // A hostname names a workload only in the namespace it gives.
            ("client", "10.0.0.99", "10.96.0.63:80", "error: no healthy waypoint for service elsewhere.default.svc.cluster.local: waypoint default/vm-waypoint.example is not in the mesh state (no service or workload has that address or hostname; is the waypoint deployed, and does istiod send it?)"),
            // Self-calls to the agent's ports are refused, whatever the address.
            ("client", "10.0.0.99", "10.0.0.12:15001", "error: refused self-call to 10.0.0.12:15001: the destination is one of the agent's ports (15001, 15006, 15008)"),
            ("client", "10.0.0.99", "10.96.0.10:15006", "error: refused self-call to 10.96.0.10:15006: the destination is one of the agent's ports (15001, 15006, 15008)"),
            ("client", "10.0.0.99", "192.0.2.7:15008", "error: refused self-call to 192.0.2.7:15008: the destination is one of the agent's ports (15001, 15006, 15008)"),
            // IPv6: a service's v6 VIP reaches the endpoint's v6 address, and an endpoint
            // without one on its IPv4 address.
            ("client", "fd00::99", "[fd00::10]:9080", "hbone 10.0.0.12:15008 authority=10.0.0.12:9081 reviews-v2 expect=[reviews-san,reviews] via reviews.default.svc.cluster.local"),
            ("client", "fd00::99", "[fd00::10]:9080", "hbone [fd00::11]:15008 authority=[fd00::11]:9081 reviews-v1 expect=[reviews-san,reviews] via reviews.default.svc.cluster.local"),
            ("client", "fd00::99", "[2001:db8::1]:80", "tcp [2001:db8::1]:80 (unknown)"),
        ];
        for (sa, ip, dst, want) in cases {
            let dst: SocketAddr = dst.parse().expect("address");
            assert_eq!(
                summary(route_as(&mesh, sa, ip, dst)),
                *want,
                "from {sa}@{ip} to {dst}"
            );
        }
    }

    /// Endpoints in three localities behind one service, the source in `us-east/a`.
    fn locality_mesh(lb: &str) -> MeshState {
        let yaml = format!(
            r#"
workloads:
- {{uid: src, name: client, namespace: default, workloadIps: [10.1.0.1], node: n1, locality: {{region: us-east, zone: a, subzone: ""}}}}
- {{uid: e1, name: same-zone-1, namespace: default, protocol: TCP, workloadIps: [10.1.0.11], node: n2, locality: {{region: us-east, zone: a, subzone: ""}}, services: {{"default/api.default.svc.cluster.local": {{80: 80}}}}}}
- {{uid: e2, name: same-zone-2, namespace: default, protocol: TCP, workloadIps: [10.1.0.12], node: n1, locality: {{region: us-east, zone: a, subzone: ""}}, services: {{"default/api.default.svc.cluster.local": {{80: 80}}}}}}
- {{uid: e3, name: same-region, namespace: default, protocol: TCP, workloadIps: [10.1.0.13], node: n3, locality: {{region: us-east, zone: b, subzone: ""}}, services: {{"default/api.default.svc.cluster.local": {{80: 80}}}}}}
- {{uid: e4, name: far-away, namespace: default, protocol: TCP, workloadIps: [10.1.0.14], node: n4, locality: {{region: eu-west, zone: a, subzone: ""}}, services: {{"default/api.default.svc.cluster.local": {{80: 80}}}}}}
services:
- {{name: api, namespace: default, hostname: api.default.svc.cluster.local, vips: ["/10.96.1.1"], ports: {{80: 80}}, loadBalancer: {lb}}}
"#
        );
        mesh_from(&yaml)
    }

    fn picks(mesh: &MeshState, n: usize) -> Vec<String> {
        (0..n)
            .map(|_| {
                match route_as(
                    mesh,
                    "client",
                    "10.1.0.1",
                    "10.96.1.1:80".parse().expect("a"),
                ) {
                    Ok(Route::Passthrough(_, Some(w))) => w.name.clone(),
                    other => summary(other),
                }
            })
            .collect()
    }

    /// Healthy `names` only: the others marked Unhealthy.
    fn with_unhealthy(lb: &str, unhealthy: &[&str]) -> MeshState {
        let mut state = locality_mesh(lb);
        let workloads: Vec<Workload> = state
            .workloads()
            .map(|w| {
                let mut w = (**w).clone();
                if unhealthy.contains(&w.name.as_str()) {
                    w.status = crate::state::workload::HealthStatus::Unhealthy;
                }
                w
            })
            .collect();
        let services = state.services().map(|s| s.service.clone()).collect();
        state = MeshState::build(workloads, services, vec![]).expect("state");
        state
    }

    #[test]
    fn load_balancing_modes() {
        let failover = "{routingPreferences: [Region, Zone], mode: Failover}";
        // Failover: the best level (same region and zone) in exact round robin.
        assert_eq!(
            picks(&locality_mesh(failover), 4),
            ["same-zone-1", "same-zone-2", "same-zone-1", "same-zone-2"]
        );
        // The local zone empties: the next level (same region), then anything.
        assert_eq!(
            picks(
                &with_unhealthy(failover, &["same-zone-1", "same-zone-2"]),
                2
            ),
            ["same-region", "same-region"]
        );
        assert_eq!(
            picks(
                &with_unhealthy(failover, &["same-zone-1", "same-zone-2", "same-region"]),
                2
            ),
            ["far-away", "far-away"]
        );
        // Strict: only full matches; none left refuses with a reason.
        let strict = "{routingPreferences: [Region, Zone], mode: Strict}";
        assert_eq!(
            picks(&locality_mesh(strict), 2),
            ["same-zone-1", "same-zone-2"]
        );
        assert_eq!(
            picks(&with_unhealthy(strict, &["same-zone-1", "same-zone-2"]), 1),
            ["error: service api.default.svc.cluster.local has no healthy endpoint for port 80 matching its strict routing preferences (loadBalancer.mode STRICT)"]
        );
        // Node first: the endpoint on the source's node.
        let node = "{routingPreferences: [Node], mode: Strict}";
        assert_eq!(
            picks(&locality_mesh(node), 2),
            ["same-zone-2", "same-zone-2"]
        );
        // AllowAll: unhealthy endpoints take their turn too.
        let allow_all =
            "{routingPreferences: [Region, Zone], mode: Strict, healthPolicy: AllowAll}";
        assert_eq!(
            picks(&with_unhealthy(allow_all, &["same-zone-1"]), 2),
            ["same-zone-1", "same-zone-2"]
        );
        // Standard ignores preferences: all four in turn, in a fixed order.
        let standard = "{routingPreferences: [Region, Zone]}";
        assert_eq!(
            picks(&locality_mesh(standard), 5),
            [
                "same-zone-1",
                "same-zone-2",
                "same-region",
                "far-away",
                "same-zone-1"
            ]
        );
        // Passthrough: no endpoint selection, the address as dialled.
        let passthrough = "{mode: Passthrough}";
        assert_eq!(
            picks(&locality_mesh(passthrough), 1),
            ["tcp 10.96.1.1:80 (unknown)"]
        );
        // ... unless the service has a waypoint: the waypoint comes first, never bypassed.
        let with_waypoint = locality_mesh(
            "{mode: Passthrough}, waypoint: {destination: \"/10.1.0.11\", hboneMtlsPort: 15008}",
        );
        assert_eq!(
            picks(&with_waypoint, 1),
            ["hbone 10.1.0.11:15008 authority=10.96.1.1:80 same-zone-1 expect=[default] via api.default.svc.cluster.local waypoint /10.1.0.11"]
        );
    }

    #[test]
    fn network_first_ranks_above_every_other_preference() {
        let src = Workload {
            network: "n1".into(),
            locality: Some(crate::state::workload::Locality {
                region: "r1".into(),
                zone: "z1".into(),
                subzone: String::new(),
            }),
            ..Default::default()
        };
        let at = |network: &str, region: &str| Workload {
            network: network.into(),
            locality: Some(crate::state::workload::Locality {
                region: region.into(),
                zone: "z9".into(),
                subzone: String::new(),
            }),
            ..Default::default()
        };
        let prefs = [
            crate::state::service::Scope::Network,
            crate::state::service::Scope::Region,
            crate::state::service::Scope::Zone,
        ];
        let rank = |w: &Workload| crate::state::locality_rank(&prefs, &src, w);
        let sum = |w: &Workload| {
            let (matched, bonus) = rank(w);
            matched + bonus
        };
        // Same network alone outranks another network's same region and zone...
        assert!(sum(&at("n1", "r9")) > sum(&at("n2", "r1")));
        assert_eq!(rank(&at("n1", "r1")), (2, 2));
        assert_eq!(rank(&at("n2", "r1")), (1, 0));
        // ... but for STRICT only what matched counts: same network, other region misses.
        assert_eq!(rank(&at("n1", "r9")), (1, 2));
    }
}
