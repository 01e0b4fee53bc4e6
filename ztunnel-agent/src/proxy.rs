//! The per-pod listeners. Until HBONE lands, 15001 and 15006 forward plain TCP to the
//! original destination from inside the pod's network namespace, and 15008 refuses.

pub mod inbound_passthrough;
pub mod outbound;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use ztunnel_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use crate::netns::PodNetns;
use crate::redirect::OrigDstTable;
use crate::socket::set_agent_mark;

/// Ports a captured connection may never target (a self-call would loop).
pub const ILLEGAL_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT];
/// How long an upstream connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a proxied connection failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Target is one of the agent's own ports.
    #[error("refused self-call to {0}: the destination is one of the agent's ports (15001, 15006, 15008)")]
    SelfCall(SocketAddr),
    /// Connect failed.
    #[error("connection to {dst} failed")]
    Connect {
        /// Destination.
        dst: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Connect timed out.
    #[error("connection to {0} timed out: is the destination up, or a NetworkPolicy dropping it?")]
    ConnectTimeout(SocketAddr),
    /// The pod's namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] crate::netns::Error),
    /// Copying failed midway.
    #[error("relay interrupted")]
    Relay(#[source] io::Error),
}

/// The pod a listener serves.
#[derive(Debug)]
pub struct PodProxy {
    /// Pod uid.
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod addresses.
    pub ips: Vec<IpAddr>,
    /// Pod network namespace.
    pub netns: PodNetns,
    /// Where outbound original destinations are looked up.
    pub orig_dst: Arc<OrigDstTable>,
}

impl PodProxy {
    /// Opens a TCP connection to `dst` from inside the pod, marked as the agent's own so
    /// capture does not loop it back.
    pub async fn connect(&self, dst: SocketAddr) -> Result<TcpStream, Error> {
        let socket = self.netns.run(|| -> io::Result<socket2::Socket> {
            let domain = socket2::Domain::for_address(dst);
            let socket = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
            set_agent_mark(&socket)?;
            socket.set_nonblocking(true)?;
            socket.set_nodelay(true)?;
            Ok(socket)
        })?;
        let socket = socket.map_err(|source| Error::Connect { dst, source })?;
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(source)) => Err(Error::Connect { dst, source }),
            Err(_) => Err(Error::ConnectTimeout(dst)),
        }
    }
}

/// Copies both ways until both sides are done, propagating half-closes.
/// Returns (bytes client->upstream, bytes upstream->client).
pub async fn relay(
    mut client: TcpStream,
    mut upstream: TcpStream,
) -> (u64, u64, Option<io::Error>) {
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((sent, received)) => (sent, received, None),
        Err(e) => (0, 0, Some(e)),
    }
}

/// Direction of a connection, as the access log names it.
#[derive(Clone, Copy, Debug)]
pub enum Direction {
    /// From the pod.
    Outbound,
    /// To the pod.
    Inbound,
}

impl Direction {
    fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Logs the end of a connection: exactly one event per connection, from here.
pub fn log_complete(
    direction: Direction,
    src: SocketAddr,
    dst: SocketAddr,
    started: Instant,
    bytes: (u64, u64),
    error: Option<&dyn std::error::Error>,
) {
    let duration = format!("{}ms", started.elapsed().as_millis());
    let direction = direction.as_str();
    match error {
        None => tracing::event!(
            target: "access",
            tracing::Level::INFO,
            {
                src.addr = %src,
                dst.addr = %dst,
                direction,
                bytes_sent = bytes.0,
                bytes_recv = bytes.1,
                duration,
            },
            "connection complete"
        ),
        Some(e) => tracing::event!(
            target: "access",
            tracing::Level::ERROR,
            {
                src.addr = %src,
                dst.addr = %dst,
                direction,
                bytes_sent = bytes.0,
                bytes_recv = bytes.1,
                duration,
                error = %crate::telemetry::ErrorChain(e),
            },
            "connection complete"
        ),
    }
}

/// Accepts on `listener` until cancelled, handing each connection to `handle`.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    pod: Arc<PodProxy>,
    cancel: CancellationToken,
    handle: F,
) where
    F: Fn(Arc<PodProxy>, TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(handle(pod.clone(), stream, peer));
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(pod = %pod.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

/// 15008 until HBONE exists: accept and close, saying why.
pub async fn hbone_refuse(_pod: Arc<PodProxy>, stream: TcpStream, peer: SocketAddr) {
    tracing::warn!(
        src.addr = %peer,
        "connection failed: HBONE (15008) is not served by this build yet"
    );
    drop(stream);
}
