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
    },
}

/// The address of `w` in the same family as `like`, else its first.
fn address_of(w: &Workload, like: IpAddr) -> Option<IpAddr> {
    w.workload_ips
        .iter()
        .find(|ip| ip.is_ipv4() == like.is_ipv4())
        .or_else(|| w.workload_ips.first())
        .copied()
}

/// Where a connection from a pod on `network` to `dst` goes, from the mesh state alone (a
/// service VIP advances that service's round robin). Self-calls are refused before this.
pub fn route(mesh: &MeshState, network: &str, dst: SocketAddr) -> Result<Route, RouteError> {
    let service = mesh.service_by_vip(network, dst.ip());
    let (workload, target) = match &service {
        Some(entry) => {
            let endpoint =
                mesh.pick_endpoint(entry, dst.port())
                    .ok_or_else(|| RouteError::NoEndpoint {
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
        });
    }
    Ok(Route::Hbone {
        hbone_addr: SocketAddr::new(target.ip(), ztunnel_common::HBONE_PORT),
        authority: target,
        expected,
        workload,
        service: service.map(|s| s.service.hostname.clone()),
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
pub async fn handle(pod: Arc<PodProxy>, client: TcpStream, peer: SocketAddr) {
    let dst = pod.sockets.original_dst(&client, peer);
    let mut conn = Connection::new(Direction::Outbound, peer, dst);
    let span = conn.span();
    let result = proxy(&pod, client, dst, &mut conn).instrument(span).await;
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
    if ILLEGAL_PORTS.contains(&dst.port()) {
        return Err(Error::SelfCall(dst).into());
    }
    match route(&mesh, &pod.network, dst)? {
        Route::Passthrough(target, workload) => {
            conn.record.dst_addr = target;
            if let Some(w) = &workload {
                conn.record.dst = peer_of(w, false);
            }
            let upstream = pod.connect(target).await?;
            conn.established();
            super::splice::bidirectional(&client, &upstream, &conn.sent, &conn.received).await?;
        }
        Route::Hbone {
            hbone_addr,
            authority,
            expected,
            workload,
            service,
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
            super::copy::tunnel(client, tunnel.send, tunnel.recv, &conn.sent, &conn.received)
                .await?;
        }
    }
    Ok(())
}
