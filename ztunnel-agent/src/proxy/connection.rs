//! One proxied connection's life, in one type: created when the connection is accepted, it
//! carries the access-log record and a tracing span with a connection id; once established it
//! counts bytes as they move (the `istio_tcp_*_bytes_total` series move during a long
//! transfer); it ends exactly once, through [`Connection::finish`], which writes the access-log
//! line, the closing metrics and the recent outcome from the same record. A connection dropped
//! without finishing (its task cancelled at agent stop, a panic) is recorded by `Drop`, with an
//! error that says so: no connection ends without its line.

use std::error::Error as StdError;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use prometheus_client::metrics::counter::Counter;

use crate::accesslog::{ConnectionRecord, Direction};
use crate::metrics::{Opened, OpenedConnection, ResponseFlag};

/// Connection ids, unique in this process (the span's `id`).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// An error that knows Istio's response flag for the connection it ended.
pub trait Classify {
    /// The `response_flags` label for a connection this error ended.
    fn response_flag(&self) -> ResponseFlag {
        ResponseFlag::Connect
    }
}

/// Why a connection failed: the error (with its cause chain, for the log) and its flag.
#[derive(Debug)]
pub struct ConnectionError {
    flag: ResponseFlag,
    error: Box<dyn StdError + Send + Sync>,
}

impl ConnectionError {
    /// The error, for logging.
    pub fn error(&self) -> &(dyn StdError + 'static) {
        &*self.error
    }

    /// Its response flag.
    pub fn flag(&self) -> ResponseFlag {
        self.flag
    }
}

impl<E> From<E> for ConnectionError
where
    E: Classify + StdError + Send + Sync + 'static,
{
    fn from(error: E) -> Self {
        Self {
            flag: error.response_flag(),
            error: Box::new(error),
        }
    }
}

/// A relay's I/O failure: the connection was established, then broke.
impl Classify for io::Error {}

/// Closed by the agent's drain deadline.
impl Classify for crate::drain::DeadlineReached {}

impl Classify for crate::authz::Denied {
    fn response_flag(&self) -> ResponseFlag {
        ResponseFlag::Deny
    }
}

/// A connection dropped before it finished: its task was cancelled (the agent stopping) or
/// panicked.
#[derive(Debug, thiserror::Error)]
pub enum Unfinished {
    /// Dropped: the runtime shut down (agent stop) or the task was aborted.
    #[error("connection ended without finishing: the agent stopped (or its task was cancelled) while it was open")]
    Cancelled,
    /// Its handler panicked.
    #[error("connection ended without finishing: its handler panicked (a bug: please report it with the agent's log)")]
    Panicked,
}

impl Classify for Unfinished {}

/// Bytes moved one way: the connection's own total and, once established, the metric.
#[derive(Debug, Default)]
pub struct Meter {
    bytes: AtomicU64,
    metric: Option<Counter>,
}

impl Meter {
    /// Counts `n` bytes that reached their destination socket or stream.
    pub fn add(&self, n: usize) {
        let n = n as u64;
        self.bytes.fetch_add(n, Ordering::Relaxed);
        if let Some(metric) = &self.metric {
            metric.inc_by(n);
        }
    }

    /// Bytes counted so far.
    pub fn get(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// One proxied connection, from accept to its one access-log line.
#[derive(Debug)]
pub struct Connection {
    /// What the access log and the metric labels say about it (filled in as routing learns).
    pub record: ConnectionRecord,
    /// Bytes sent, from the reporting side's point of view.
    pub sent: Meter,
    /// Bytes received.
    pub received: Meter,
    /// Set once established: the labels it was counted opened with.
    opened: Option<Opened>,
    span: tracing::Span,
    finished: bool,
    /// Refused before its peer was authenticated, or by a limit: its line is rate-limited.
    rate_limited: bool,
}

impl Connection {
    /// A connection accepted now.
    pub fn new(direction: Direction, src_addr: SocketAddr, dst_addr: SocketAddr) -> Self {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        // Debug level: the access-log line carries what an operator needs at info, and a
        // recorded span costs memory for as long as the connection lives (about 0.6 KiB per
        // idle connection measured); with `ztunnel_agent::proxy=debug` every line a
        // connection's handler writes names the connection.
        let span = match direction {
            Direction::Outbound => tracing::debug_span!("outbound", id, src.addr = %src_addr),
            Direction::Inbound => tracing::debug_span!("inbound", id, src.addr = %src_addr),
        };
        Self {
            record: ConnectionRecord::new(direction, src_addr, dst_addr),
            sent: Meter::default(),
            received: Meter::default(),
            opened: None,
            span,
            finished: false,
            rate_limited: false,
        }
    }

    /// The connection's span: its handler runs inside it.
    pub fn span(&self) -> tracing::Span {
        self.span.clone()
    }

    /// Marks the connection established (both ends connected): counted as opened, and from
    /// now on its bytes move the byte counters.
    pub fn established(&mut self) {
        debug_assert!(self.opened.is_none(), "a connection is established once");
        let OpenedConnection {
            opened,
            sent,
            received,
        } = crate::metrics::global().opened(&self.record);
        // Istio counts the request's bytes (client to server) as received and the response's
        // as sent, whichever side reports (upstream ztunnel too, istio/istio#32399). The
        // outbound log's bytes_sent are the client's request, so they move the received
        // counter; inbound, the log and the metrics agree.
        let (log_sent, log_received) = match self.record.direction {
            Direction::Outbound => (received, sent),
            Direction::Inbound => (sent, received),
        };
        self.sent.metric = Some(log_sent);
        self.received.metric = Some(log_received);
        self.opened = Some(opened);
    }

    /// Ends the connection: one access-log line, the closing (or failed) metric, the recent
    /// outcome.
    pub fn finish(mut self, result: Result<(), ConnectionError>) {
        match &result {
            Ok(()) => self.end(None),
            Err(e) => self.end(Some((e.error(), e.flag()))),
        }
    }

    /// Ends a connection refused before its peer was authenticated (a failed or abandoned
    /// TLS handshake) or by a limit: as [`Self::finish`], but a flood causes these, so the
    /// access-log line is rate-limited (`accesslog::write_rate_limited`).
    pub fn finish_rate_limited(mut self, error: ConnectionError) {
        self.rate_limited = true;
        self.finish(Err(error));
    }

    fn end(&mut self, error: Option<(&(dyn StdError + 'static), ResponseFlag)>) {
        self.finished = true;
        let _entered = self.span.enter();
        self.record.bytes_sent = self.sent.get();
        self.record.bytes_recv = self.received.get();
        let flag = error.map_or(ResponseFlag::None, |(_, flag)| flag);
        match &self.opened {
            Some(opened) => crate::metrics::global().closed(&self.record, opened, flag),
            None => crate::metrics::global().failed(&self.record, flag),
        }
        if self.rate_limited {
            crate::accesslog::write_rate_limited(&self.record, error.map(|(e, _)| e));
        } else {
            crate::accesslog::write(&self.record, error.map(|(e, _)| e));
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if !self.finished {
            let unfinished = if std::thread::panicking() {
                Unfinished::Panicked
            } else {
                Unfinished::Cancelled
            };
            self.end(Some((&unfinished, unfinished.response_flag())));
        }
    }
}
