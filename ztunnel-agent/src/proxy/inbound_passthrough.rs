//! 15006: plaintext connections to an enrolled pod, steered by the `sk_lookup` program. The
//! accepted socket's local address is the original destination.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;

use super::{log_complete, relay, Direction, Error, PodProxy, ILLEGAL_PORTS};

/// Serves one captured inbound connection.
pub async fn handle(pod: Arc<PodProxy>, client: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let dst = match client.local_addr() {
        Ok(addr) => addr,
        Err(e) => {
            tracing::warn!(src.addr = %peer, error = %e, "connection failed: no local address");
            return;
        }
    };
    tracing::info!(
        pod = %pod.name,
        namespace = %pod.namespace,
        src.addr = %peer,
        original_dst = %dst,
        direction = "inbound",
        "captured connection"
    );
    if ILLEGAL_PORTS.contains(&dst.port()) {
        let e = Error::SelfCall(dst);
        log_complete(Direction::Inbound, peer, dst, started, (0, 0), Some(&e));
        return;
    }
    let upstream = match pod.connect(dst).await {
        Ok(s) => s,
        Err(e) => {
            log_complete(Direction::Inbound, peer, dst, started, (0, 0), Some(&e));
            return;
        }
    };
    // Inbound: the reporting side sends what the application answers.
    let (from_client, to_client, err) = relay(client, upstream).await;
    let err = err.map(Error::Relay);
    log_complete(
        Direction::Inbound,
        peer,
        dst,
        started,
        (to_client, from_client),
        err.as_ref().map(|e| e as &dyn std::error::Error),
    );
}
