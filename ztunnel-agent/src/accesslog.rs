//! The access log: exactly one `connection complete` event per connection and direction,
//! target `access`, with the troubleshooting guide's fields in the guide's order. A field with
//! no value is left out (tracing omits `None`); strings are quoted, addresses and integers not.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use crate::identity::Identity;
use crate::state::workload::Workload;

/// Which side reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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
        }
    }
}

/// Emits the one `connection complete` event for `record` (level error when `error` is set)
/// and keeps its outcome for `diagnose`. Called once per connection, by the connection's
/// owner (`proxy::connection`), which also updates the metrics from the same record.
pub fn write(record: &ConnectionRecord, error: Option<&(dyn std::error::Error + 'static)>) {
    let duration = format!("{}ms", record.started.elapsed().as_millis());
    let src_identity = record.src.identity.as_ref().map(Identity::to_string);
    let dst_identity = record.dst.identity.as_ref().map(Identity::to_string);
    let hbone = record.dst_hbone_addr.map(|a| a.to_string());
    let error = error.map(|e| crate::telemetry::ErrorChain(e).to_string());
    macro_rules! emit {
        ($level:expr) => {
            tracing::event!(
                target: "access",
                $level,
                {
                    src.addr = %record.src_addr,
                    src.workload = record.src.workload.as_deref(),
                    src.namespace = record.src.namespace.as_deref(),
                    src.identity = src_identity.as_deref(),
                    dst.addr = %record.dst_addr,
                    dst.hbone_addr = hbone.as_deref(),
                    dst.service = record.dst_service.as_deref(),
                    dst.workload = record.dst.workload.as_deref(),
                    dst.namespace = record.dst.namespace.as_deref(),
                    dst.identity = dst_identity.as_deref(),
                    direction = record.direction.as_str(),
                    bytes_sent = record.bytes_sent,
                    bytes_recv = record.bytes_recv,
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
    // The identity strings were formatted once for the log line; the peer's moves on.
    let peer_identity = match record.direction {
        Direction::Outbound => dst_identity,
        Direction::Inbound => src_identity,
    };
    remember(record, peer_identity, error);
}

/// Completed connections kept for `diagnose`, newest last.
const RECENT_ALL: usize = 512;
/// Failed connections kept apart, so a busy pod's successes do not push refusals out.
const RECENT_FAILED: usize = 128;

/// A finished connection as `diagnose` shows it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    /// When it completed.
    pub at: SystemTime,
    /// The reporting pod's namespace (outbound: the source; inbound: the destination).
    pub namespace: String,
    /// The reporting pod's name.
    pub pod: String,
    /// Which side reported it.
    pub direction: Direction,
    /// Source address.
    pub src: SocketAddr,
    /// Destination address (outbound HBONE: the peer's 15008).
    pub dst: SocketAddr,
    /// The peer's identity, when mTLS established one.
    pub peer_identity: Option<String>,
    /// Bytes sent and received.
    pub bytes: (u64, u64),
    /// Why it failed (the access log's `error`).
    pub error: Option<String>,
}

#[derive(Default)]
struct Recent {
    all: VecDeque<Outcome>,
    failed: VecDeque<Outcome>,
}

static RECENT: Mutex<Recent> = Mutex::new(Recent {
    all: VecDeque::new(),
    failed: VecDeque::new(),
});

fn push(ring: &mut VecDeque<Outcome>, cap: usize, outcome: Outcome) {
    if ring.len() == cap {
        ring.pop_front();
    }
    ring.push_back(outcome);
}

fn remember(record: &ConnectionRecord, peer_identity: Option<String>, error: Option<String>) {
    let reporter = match record.direction {
        Direction::Outbound => &record.src,
        Direction::Inbound => &record.dst,
    };
    let outcome = Outcome {
        at: SystemTime::now(),
        namespace: reporter.namespace.clone().unwrap_or_default(),
        pod: reporter.workload.clone().unwrap_or_default(),
        direction: record.direction,
        src: record.src_addr,
        dst: record.dst_addr,
        peer_identity,
        bytes: (record.bytes_sent, record.bytes_recv),
        error,
    };
    let mut recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
    if outcome.error.is_some() {
        push(&mut recent.failed, RECENT_FAILED, outcome.clone());
    }
    push(&mut recent.all, RECENT_ALL, outcome);
}

/// The pod's recent connections (newest last, at most `limit`) and its recent failures.
pub fn recent(namespace: &str, pod: &str, limit: usize) -> (Vec<Outcome>, Vec<Outcome>) {
    let recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
    let pick = |ring: &VecDeque<Outcome>| -> Vec<Outcome> {
        let mut picked: Vec<Outcome> = ring
            .iter()
            .rev()
            .filter(|o| o.namespace == namespace && o.pod == pod)
            .take(limit)
            .cloned()
            .collect();
        picked.reverse();
        picked
    };
    (pick(&recent.all), pick(&recent.failed))
}
