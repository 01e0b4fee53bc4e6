//! 15006: plaintext connections to an enrolled pod, steered by the `sk_lookup` program. The
//! accepted socket's local address is the original destination. Policy decides here once
//! authorization lands; for now the connection is forwarded to the application.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::{Error, PodProxy, ILLEGAL_PORTS};
use crate::accesslog::{ConnectionRecord, Direction, Peer};

/// Serves one captured inbound connection.
pub async fn handle(pod: Arc<PodProxy>, client: TcpStream, peer: SocketAddr) {
    let dst = match client.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            tracing::warn!(src.addr = %peer, error = %e, "connection failed: no local address");
            return;
        }
    };
    tracing::debug!(
        pod = %pod.name,
        namespace = %pod.namespace,
        src.addr = %peer,
        original_dst = %dst,
        direction = "inbound",
        "captured connection"
    );
    let mut record = ConnectionRecord::new(Direction::Inbound, peer, dst);
    let mesh = pod.mesh.state.snapshot();
    if let Some(w) = mesh.workload_by_ip(&pod.network, peer.ip()) {
        record.src = Peer {
            workload: Some(w.name.clone()),
            namespace: Some(w.namespace.clone()),
            identity: None,
            detail: Some(w.clone()),
        };
    }
    record.dst = pod.as_peer(&mesh, None);
    record.dst_service = PodProxy::service_of(record.dst.detail.as_deref(), dst.port());
    if ILLEGAL_PORTS.contains(&dst.port()) {
        return record.complete(Some(&Error::SelfCall(dst)));
    }
    // Plaintext carries no identity: a policy that requires one denies it.
    let conn = crate::authz::Connection {
        src: peer.ip(),
        identity: None,
        dst,
    };
    if let Err(denied) = pod.authorize(&mesh, record.dst.detail.as_deref(), &conn) {
        return record.complete(Some(&denied));
    }
    let upstream = match pod.connect(dst).await {
        Ok(s) => s,
        Err(e) => return record.complete(Some(&e)),
    };
    record.established();
    let tracked = pod.mesh.tracker.track(pod.clone(), peer.ip(), None, dst);
    // Inbound: the reporting side sends what the application answers.
    tokio::select! {
        (from_client, to_client, err) = super::splice::bidirectional(&client, &upstream) => {
            record.bytes_sent = to_client;
            record.bytes_recv = from_client;
            record.complete(err.as_ref().map(|e| e as &dyn std::error::Error));
        }
        denied = tracked.revoked() => record.complete(Some(&denied)),
    }
}
