//! 15001: connections an enrolled pod made, captured by `cgroup/connect4|6`. A service VIP
//! picks an endpoint by strict round robin; an HBONE workload is reached through a tunnel to
//! its 15008 (or its waypoint's); anything else is plain TCP passthrough.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::hbone::PoolKey;
use super::{Error, PodProxy, ILLEGAL_PORTS};
use crate::accesslog::{ConnectionRecord, Direction, Peer};
use crate::identity::Identity;
use crate::socket::so_original_dst;
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

/// Where a connection goes.
#[derive(Debug)]
enum Route {
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

/// Where the application meant to go: the eBPF map, then `SO_ORIGINAL_DST` (an iptables
/// set-up), then the local address (which for 15001 is a self-call and is refused).
pub fn original_destination(pod: &PodProxy, stream: &TcpStream, peer: SocketAddr) -> SocketAddr {
    if let Some(dst) = pod.orig_dst.take(pod.netns.cookie(), peer) {
        return dst;
    }
    if let Ok(dst) = so_original_dst(stream.as_fd(), peer.is_ipv6()) {
        return dst;
    }
    stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

/// The address of `w` in the same family as `like`, else its first.
fn address_of(w: &Workload, like: IpAddr) -> Option<IpAddr> {
    w.workload_ips
        .iter()
        .find(|ip| ip.is_ipv4() == like.is_ipv4())
        .or_else(|| w.workload_ips.first())
        .copied()
}

fn route(pod: &PodProxy, mesh: &MeshState, dst: SocketAddr) -> Result<Route, RouteError> {
    let service = mesh.service_by_vip(&pod.network, dst.ip());
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
        None => match mesh.workload_by_ip(&pod.network, dst.ip()) {
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
    let dst = original_destination(&pod, &client, peer);
    tracing::debug!(
        pod = %pod.name,
        namespace = %pod.namespace,
        src.addr = %peer,
        original_dst = %dst,
        direction = "outbound",
        "captured connection"
    );
    let mesh = pod.mesh.state.snapshot();
    let mut record = ConnectionRecord::new(Direction::Outbound, peer, dst);
    record.src = pod.as_peer(&mesh, None);
    if ILLEGAL_PORTS.contains(&dst.port()) {
        return record.complete(Some(&Error::SelfCall(dst)));
    }
    let route = match route(&pod, &mesh, dst) {
        Ok(r) => r,
        Err(e) => return record.complete(Some(&e)),
    };
    match route {
        Route::Passthrough(target, workload) => {
            record.dst_addr = target;
            if let Some(w) = &workload {
                record.dst = peer_of(w, false);
            }
            let upstream = match pod.connect(target).await {
                Ok(s) => s,
                Err(e) => return record.complete(Some(&e)),
            };
            record.established();
            let (sent, received, err) = super::splice::bidirectional(&client, &upstream).await;
            record.bytes_sent = sent;
            record.bytes_recv = received;
            record.complete(err.as_ref().map(|e| e as &dyn std::error::Error));
        }
        Route::Hbone {
            hbone_addr,
            authority,
            expected,
            workload,
            service,
        } => {
            record.src.identity = Some(pod.identity.clone());
            record.dst_addr = hbone_addr;
            record.dst_hbone_addr = Some(authority);
            record.dst_service = service;
            record.dst = peer_of(&workload, true);
            let key = PoolKey {
                source: pod.identity.clone(),
                expected,
                dst: hbone_addr,
                src_ip: peer.ip(),
            };
            let (tunnel, _stream) = match pod.mesh.pool.tunnel(&pod, key, authority, peer).await {
                Ok(t) => t,
                Err(e) => return record.complete(Some(&e)),
            };
            record.established();
            let (sent, received, err) = super::copy::tunnel(client, tunnel.send, tunnel.recv).await;
            record.bytes_sent = sent;
            record.bytes_recv = received;
            record.complete(err.as_ref().map(|e| e as &dyn std::error::Error));
        }
    }
}
