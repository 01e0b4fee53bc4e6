//! HBONE: HTTP/2 CONNECT over mutual TLS to port 15008.
//!
//! [`pool`]: the client side's HTTP/2 connections, keyed by (source identity, expected
//! destination identities, destination address, source IP); a connection carries up to the
//! peer's stream limit, then a new one is opened. No lock is held across a handshake.
//! [`client`]: opening one such connection (TCP from the pod, TLS, HTTP/2 with keepalive) and
//! a CONNECT stream on it.
//! [`server`]: 15008 in each pod: TLS with the pod's certificate, client certificate
//! required; CONNECT only; the authority must be one of the pod's addresses (400 otherwise);
//! 200 only once the application accepted the connection (503 otherwise).

pub mod client;
pub mod pool;
pub mod server;

use std::net::SocketAddr;
use std::time::Duration;

use http::{Method, StatusCode};

use super::connection::Classify;
use crate::metrics::ResponseFlag;

pub use pool::{Pool, PoolKey, StreamGuard, Tunnel};
pub use server::serve;

/// Per-stream flow-control window.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Per-connection flow-control window.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest frame.
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Streams the client pool puts on one connection at most (upstream's
/// POOL_MAX_STREAMS_PER_CONNECTION; a server may allow fewer, see `Limits`).
pub const MAX_STREAMS: u32 = 100;
/// Keepalive PING interval and timeout.
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(20);
/// TLS and HTTP/2 handshake limit.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A pooled connection with no stream for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Tunnel failures, named for the access log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// TCP to 15008 failed.
    #[error(transparent)]
    Connect(#[from] super::Error),
    /// The TLS handshake failed (identity, root, or no certificate).
    #[error("TLS handshake with {peer} failed")]
    Tls {
        /// Peer.
        peer: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A handshake took too long.
    #[error("handshake with {0} timed out")]
    HandshakeTimeout(SocketAddr),
    /// TLS configuration.
    #[error(transparent)]
    Config(#[from] crate::tls::Error),
    /// HTTP/2 failed.
    #[error("HTTP/2 with {peer} failed")]
    H2 {
        /// Peer.
        peer: SocketAddr,
        /// Why.
        #[source]
        source: h2::Error,
    },
    /// The server refused the CONNECT.
    #[error("HBONE CONNECT to {authority} via {peer} answered {status}")]
    Status {
        /// Tunnel target.
        authority: SocketAddr,
        /// Peer.
        peer: SocketAddr,
        /// The status.
        status: StatusCode,
    },
    /// The authority is not this pod's.
    #[error("authority {authority} is not an address of pod {pod}, nor a service or workload whose waypoint is this pod")]
    WrongAuthority {
        /// Requested.
        authority: String,
        /// This pod.
        pod: String,
    },
    /// Not a CONNECT.
    #[error("{0} request: HBONE accepts CONNECT only")]
    NotConnect(Method),
    /// The peer's identity is unusable.
    #[error("client identity rejected")]
    PeerIdentity(#[source] crate::tls::Error),
    /// The client reset its CONNECT stream before the application answered.
    #[error("the client cancelled the CONNECT ({0}) before the application answered")]
    Cancelled(h2::Reason),
}

impl Classify for Error {
    fn response_flag(&self) -> ResponseFlag {
        match self {
            Error::Tls { .. } | Error::HandshakeTimeout(_) | Error::Config(_) => {
                ResponseFlag::TlsFailure
            }
            Error::PeerIdentity(_) => ResponseFlag::IdentityError,
            Error::H2 { .. } => ResponseFlag::H2HandshakeFailure,
            _ => ResponseFlag::Connect,
        }
    }
}

/// PINGs the peer every [`PING_INTERVAL`]; returns (why) when one is not answered within
/// [`PING_TIMEOUT`]. The connection must be polled alongside.
async fn keepalive(ping: Option<h2::PingPong>) -> String {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(PING_INTERVAL).await;
        match tokio::time::timeout(PING_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("keepalive PING failed: {e}"),
            Err(_) => return format!("keepalive PING unanswered for {} s", PING_TIMEOUT.as_secs()),
        }
    }
}
