//! The agent's [`PodSockets`]: sockets opened inside the pod's network namespace, marked as
//! the agent's own so capture does not loop them back; original destinations from the eBPF
//! map, then `SO_ORIGINAL_DST` (an iptables set-up), then the local address (which for 15001
//! is a self-call and is refused).

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::{Connecting, Error, OriginalDst, PodSockets, CONNECT_TIMEOUT};
use crate::netns::PodNetns;
use crate::redirect::OrigDstTable;
use crate::socket::{set_agent_mark, so_original_dst};

/// A pod's network namespace and the kernel's original-destination table.
#[derive(Debug)]
pub struct InPodSockets {
    netns: PodNetns,
    orig_dst: Arc<OrigDstTable>,
}

impl InPodSockets {
    /// The network of the pod in `netns`.
    pub fn new(netns: PodNetns, orig_dst: Arc<OrigDstTable>) -> Self {
        Self { netns, orig_dst }
    }
}

impl PodSockets for InPodSockets {
    fn connect(&self, dst: SocketAddr) -> Connecting<'_> {
        Box::pin(async move {
            let socket = self.netns.run(|| -> io::Result<socket2::Socket> {
                let domain = socket2::Domain::for_address(dst);
                let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
                set_agent_mark(&socket)?;
                socket.set_nonblocking(true)?;
                socket.set_nodelay(true)?;
                Ok(socket)
            })?;
            let socket = socket.map_err(|source| Error::Connect { dst, source })?;
            connect_with_timeout(tokio::net::TcpSocket::from_std_stream(socket.into()), dst).await
        })
    }

    fn udp_socket(&self, dst: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
        let socket = self
            .netns
            .run(|| -> io::Result<socket2::Socket> {
                let domain = socket2::Domain::for_address(dst);
                let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, None)?;
                set_agent_mark(&socket)?;
                socket.set_nonblocking(true)?;
                Ok(socket)
            })
            .map_err(io::Error::other)??;
        tokio::net::UdpSocket::from_std(socket.into())
    }

    fn original_dst(&self, stream: &TcpStream, peer: SocketAddr) -> OriginalDst {
        if let Some(dst) = self.orig_dst.take(self.netns.cookie(), peer) {
            return OriginalDst(dst);
        }
        if let Ok(dst) = so_original_dst(stream.as_fd(), peer.is_ipv6()) {
            return OriginalDst(dst);
        }
        OriginalDst(
            stream
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
        )
    }
}

/// Connects `socket` to `dst` within [`CONNECT_TIMEOUT`].
pub async fn connect_with_timeout(
    socket: tokio::net::TcpSocket,
    dst: SocketAddr,
) -> Result<TcpStream, Error> {
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(Error::Connect { dst, source }),
        Err(_) => Err(Error::ConnectTimeout(dst)),
    }
}
