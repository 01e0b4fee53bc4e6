//! 15006: plaintext connections to an enrolled pod, steered there by the `sk_lookup` program.
//! The accepted socket's local address is the original destination. L4 authorization decides
//! (a plaintext connection carries no identity, so a policy that requires one denies it); an
//! allowed connection is spliced to the application and re-checked when policies change.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tracing::Instrument;

use super::connection::{Connection, ConnectionError};
use super::{Accepted, Error, PodProxy, ILLEGAL_PORTS};
use crate::accesslog::{Direction, Peer};

/// Serves one captured inbound connection.
/// `_accepted` keeps it counted in `istio_tcp_sockets_open` and in the pod's connection limit
/// until this returns.
pub async fn handle(pod: Arc<PodProxy>, client: TcpStream, peer: SocketAddr, _accepted: Accepted) {
    let dst = match pod.sockets.inbound_dst(&client) {
        Ok(super::OriginalDst(addr)) => addr,
        Err(e) => {
            tracing::warn!(src.addr = %peer, error = %e, "connection failed: no local address");
            return;
        }
    };
    let mut conn = Connection::new(Direction::Inbound, peer, dst);
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
    pod: &Arc<PodProxy>,
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
        direction = "inbound",
        "captured connection"
    );
    let mesh = pod.mesh.state.snapshot();
    if let Some(w) = mesh.workload_by_ip(&pod.network, peer.ip()) {
        conn.record.src = Peer {
            workload: Some(w.name.clone()),
            namespace: Some(w.namespace.clone()),
            identity: None,
            detail: Some(w.clone()),
        };
    }
    conn.record.dst = pod.as_peer(&mesh, None);
    conn.record.dst_service = PodProxy::service_of(conn.record.dst.detail.as_deref(), dst.port());
    if ILLEGAL_PORTS.contains(&dst.port()) {
        return Err(Error::SelfCall(dst).into());
    }
    let authz = crate::authz::Connection {
        src: peer.ip(),
        identity: None,
        dst,
    };
    pod.authorize(&mesh, conn.record.dst.detail.as_deref(), &authz)?;
    // From the peer's address; its port stays with the agent's own accepted socket (the same
    // pair of addresses), so the application sees another.
    let from = super::ClientAddr::Ip {
        ip: peer.ip(),
        busy: Some(peer.port()),
    };
    let (upstream, _held) = pod.connect_from(from, dst).await?;
    conn.established();
    let tracked = pod.mesh.tracker.track(pod.clone(), peer.ip(), None, dst);
    // Inbound: the reporting side sends what the application answers.
    tokio::select! {
        relayed = super::splice::bidirectional(client, upstream, &conn.received, &conn.sent, pod.mesh.drain.deadline_reached(), pod.mesh.kernel_relay.as_deref()) => relayed?,
        denied = tracked.revoked() => return Err(denied.into()),
    }
    Ok(())
}
