//! The access log: exactly one `connection complete` event per connection and direction,
//! target `access`, with the troubleshooting guide's fields in the guide's order. A field with
//! no value is left out (tracing omits `None`); strings are quoted, addresses and integers not.

use std::net::SocketAddr;
use std::time::Instant;

use std::sync::Arc;

use crate::identity::Identity;
use crate::state::workload::Workload;

/// Which side reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// From the pod.
    Outbound,
    /// To the pod.
    Inbound,
}

impl Direction {
    /// As the log writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// A workload as the log names it.
#[derive(Clone, Debug, Default)]
pub struct Peer {
    /// Pod name.
    pub workload: Option<String>,
    /// Namespace.
    pub namespace: Option<String>,
    /// SPIFFE identity (only under mTLS).
    pub identity: Option<Identity>,
    /// The workload as the mesh state knows it (canonical names for metrics).
    pub detail: Option<Arc<Workload>>,
}

/// Everything logged about one connection.
#[derive(Debug)]
pub struct ConnectionRecord {
    /// Direction.
    pub direction: Direction,
    /// Source address.
    pub src_addr: SocketAddr,
    /// Source workload.
    pub src: Peer,
    /// Destination address (outbound HBONE: the peer's 15008 address).
    pub dst_addr: SocketAddr,
    /// The tunnel's target (`:authority`), only for HBONE.
    pub dst_hbone_addr: Option<SocketAddr>,
    /// Destination service hostname.
    pub dst_service: Option<String>,
    /// Destination workload.
    pub dst: Peer,
    /// Bytes sent, from the reporting side's point of view.
    pub bytes_sent: u64,
    /// Bytes received.
    pub bytes_recv: u64,
    /// When the connection started.
    pub started: Instant,
    /// Whether it was established (counted as opened).
    pub established: bool,
}

impl ConnectionRecord {
    /// A record for a connection starting now.
    pub fn new(direction: Direction, src_addr: SocketAddr, dst_addr: SocketAddr) -> Self {
        Self {
            direction,
            src_addr,
            src: Peer::default(),
            dst_addr,
            dst_hbone_addr: None,
            dst_service: None,
            dst: Peer::default(),
            bytes_sent: 0,
            bytes_recv: 0,
            started: Instant::now(),
            established: false,
        }
    }

    /// Marks the connection established (both ends connected) and counts it as opened.
    pub fn established(&mut self) {
        self.established = true;
        crate::metrics::global().opened(self);
    }

    /// Emits the one `connection complete` event (level error when `error` is set) and
    /// updates the connection metrics from the same record.
    pub fn complete(&self, error: Option<&(dyn std::error::Error + 'static)>) {
        crate::metrics::global().closed(self, error.map(response_flags));
        let duration = format!("{}ms", self.started.elapsed().as_millis());
        let src_identity = self.src.identity.as_ref().map(Identity::to_string);
        let dst_identity = self.dst.identity.as_ref().map(Identity::to_string);
        let hbone = self.dst_hbone_addr.map(|a| a.to_string());
        let error = error.map(|e| crate::telemetry::ErrorChain(e).to_string());
        macro_rules! emit {
            ($level:expr) => {
                tracing::event!(
                    target: "access",
                    $level,
                    {
                        src.addr = %self.src_addr,
                        src.workload = self.src.workload.as_deref(),
                        src.namespace = self.src.namespace.as_deref(),
                        src.identity = src_identity.as_deref(),
                        dst.addr = %self.dst_addr,
                        dst.hbone_addr = hbone.as_deref(),
                        dst.service = self.dst_service.as_deref(),
                        dst.workload = self.dst.workload.as_deref(),
                        dst.namespace = self.dst.namespace.as_deref(),
                        dst.identity = dst_identity.as_deref(),
                        direction = self.direction.as_str(),
                        bytes_sent = self.bytes_sent,
                        bytes_recv = self.bytes_recv,
                        duration = duration.as_str(),
                        error = error.as_deref(),
                    },
                    "connection complete"
                )
            };
        }
        if error.is_some() {
            emit!(tracing::Level::ERROR);
        } else {
            emit!(tracing::Level::INFO);
        }
    }
}

/// Istio's response flag for a failure.
fn response_flags(error: &(dyn std::error::Error + 'static)) -> &'static str {
    use crate::proxy::hbone::Error as Hbone;
    if error.is::<crate::authz::Denied>() {
        return "DENY";
    }
    if let Some(e) = error.downcast_ref::<Hbone>() {
        return match e {
            Hbone::Tls { .. } | Hbone::HandshakeTimeout(_) | Hbone::Config(_) => "TLS_FAILURE",
            Hbone::PeerIdentity(_) => "IDENTITY_ERROR",
            Hbone::H2 { .. } => "H2_HANDSHAKE_FAILURE",
            _ => "CONNECT",
        };
    }
    "CONNECT"
}
