//! 15001: connections an enrolled pod made, captured by `cgroup/connect4|6`.

use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Instant;

use tokio::net::TcpStream;

use super::{log_complete, relay, Direction, Error, PodProxy, ILLEGAL_PORTS};
use crate::socket::so_original_dst;

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

/// Serves one captured outbound connection.
pub async fn handle(pod: Arc<PodProxy>, client: TcpStream, peer: SocketAddr) {
    let started = Instant::now();
    let dst = original_destination(&pod, &client, peer);
    tracing::info!(
        pod = %pod.name,
        namespace = %pod.namespace,
        src.addr = %peer,
        original_dst = %dst,
        direction = "outbound",
        "captured connection"
    );
    if ILLEGAL_PORTS.contains(&dst.port()) {
        let e = Error::SelfCall(dst);
        log_complete(Direction::Outbound, peer, dst, started, (0, 0), Some(&e));
        return;
    }
    let upstream = match pod.connect(dst).await {
        Ok(s) => s,
        Err(e) => {
            log_complete(Direction::Outbound, peer, dst, started, (0, 0), Some(&e));
            return;
        }
    };
    let (sent, received, err) = relay(client, upstream).await;
    let err = err.map(Error::Relay);
    log_complete(
        Direction::Outbound,
        peer,
        dst,
        started,
        (sent, received),
        err.as_ref().map(|e| e as &dyn std::error::Error),
    );
}
