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

/// Access-log lines of refused connections an agent writes per second at most, for refusals
/// before the peer was authenticated (a failed or abandoned TLS handshake on 15008) and
/// refusals by a limit: a flood of either must not flood the log. The rest are counted in the
/// metrics and summed up in one warning at the end of the second that left them out.
pub const REFUSAL_LINES_PER_SECOND: u32 = 10;

/// The budget of [`REFUSAL_LINES_PER_SECOND`]: the current one-second window, lines
/// written in it, and lines left out since they were last summed up.
struct Budget {
    window: Option<Instant>,
    written: u32,
    left_out: u64,
    left_out_since: Option<Instant>,
    /// A summary of the left-out lines is due at the end of the window.
    summary_due: bool,
}

static REFUSALS: std::sync::Mutex<Budget> = std::sync::Mutex::new(Budget {
    window: None,
    written: 0,
    left_out: 0,
    left_out_since: None,
    summary_due: false,
});

const WINDOW: std::time::Duration = std::time::Duration::from_secs(1);

/// Held by the task that writes a window's summary: dropped unfinished, it clears
/// [`Budget::summary_due`].
struct Due;

impl Drop for Due {
    fn drop(&mut self) {
        refusals().summary_due = false;
    }
}

fn refusals() -> std::sync::MutexGuard<'static, Budget> {
    REFUSALS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sums up the lines left out so far in one warning (`left_out=N`), if any were.
fn summarize(count: u64, since: Option<Instant>) {
    if count > 0 {
        let secs = since.map_or(0, |s| s.elapsed().as_secs());
        tracing::warn!(target: "access", left_out = count, "{count} access-log lines of refused connections (failed or abandoned TLS handshakes, limit refusals) were left out in the last {secs}s: at most {REFUSAL_LINES_PER_SECOND} a second are written; all are counted in istio_tcp_connections_failed_total and limit refusals in ztunnel_limit_refusals_total");
    }
}

/// [`write`] for a connection refused before its peer was authenticated or by a limit: the
/// line is written within the budget of [`REFUSAL_LINES_PER_SECOND`], else left out (counted
/// in the metrics only); lines left out are summed up in one warning at the end of the
/// window (or before the next line written, whichever comes first).
pub fn write_rate_limited(
    record: &ConnectionRecord,
    error: Option<&(dyn std::error::Error + 'static)>,
) {
    let now = Instant::now();
    let left_out = {
        let mut budget = refusals();
        if budget
            .window
            .is_none_or(|start| now.duration_since(start) >= WINDOW)
        {
            budget.window = Some(now);
            budget.written = 0;
        }
        if budget.written >= REFUSAL_LINES_PER_SECOND {
            budget.left_out += 1;
            budget.left_out_since.get_or_insert(now);
            if !budget.summary_due {
                if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                    budget.summary_due = true;
                    let end = budget.window.map_or(now, |start| start + WINDOW);
                    runtime.spawn(async move {
                        // Cancelled (its runtime shutting down), it lets the next left-out
                        // line schedule the summary again.
                        let due = Due;
                        tokio::time::sleep_until(end.into()).await;
                        std::mem::forget(due);
                        let (count, since) = {
                            let mut budget = refusals();
                            budget.summary_due = false;
                            (
                                std::mem::take(&mut budget.left_out),
                                budget.left_out_since.take(),
                            )
                        };
                        summarize(count, since);
                    });
                }
            }
            None
        } else {
            budget.written += 1;
            let since = budget.left_out_since.take();
            Some((std::mem::take(&mut budget.left_out), since))
        }
    };
    match left_out {
        // Counted in the metrics only: kept out of `diagnose`'s recent failures too, so a
        // flood does not push the pods' real failures out.
        None => {}
        Some((count, since)) => {
            summarize(count, since);
            write(record, error);
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

/// Every pod's recent connections and recent failures (newest last).
pub fn recent_all() -> (Vec<Outcome>, Vec<Outcome>) {
    let recent = RECENT.lock().unwrap_or_else(|p| p.into_inner());
    (
        recent.all.iter().cloned().collect(),
        recent.failed.iter().cloned().collect(),
    )
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What a plain-format subscriber wrote on this thread.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;

        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    fn logged(
        record: &ConnectionRecord,
        error: Option<&(dyn std::error::Error + 'static)>,
    ) -> String {
        let out = Captured::default();
        let subscriber = crate::telemetry::plain_subscriber("info", out.clone());
        tracing::subscriber::with_default(subscriber, || write(record, error));
        let text = out.0.lock().expect("lock").clone();
        String::from_utf8(text).expect("utf-8")
    }

    fn id(sa: &str) -> Identity {
        format!("spiffe://cluster.local/ns/default/sa/{sa}")
            .parse()
            .expect("id")
    }

    #[test]
    fn the_guides_line_field_for_field() {
        let mut r = ConnectionRecord::new(
            Direction::Outbound,
            "10.244.1.12:58508".parse().expect("a"),
            "10.244.1.10:15008".parse().expect("a"),
        );
        r.src = Peer {
            workload: Some("curl-7656cf8794-r7zb9".into()),
            namespace: Some("default".into()),
            identity: Some(id("curl")),
            detail: None,
        };
        r.dst_hbone_addr = Some("10.244.1.10:9080".parse().expect("a"));
        r.dst_service = Some("productpage.default.svc.cluster.local".into());
        r.dst = Peer {
            workload: Some("productpage-v1-87d54dd59-fn6vw".into()),
            namespace: Some("default".into()),
            identity: Some(id("bookinfo-productpage")),
            detail: None,
        };
        r.bytes_sent = 80;
        r.bytes_recv = 175;
        let line = logged(&r, None);
        let (prefix, fields) = line.split_once("connection complete ").expect("message");
        let columns: Vec<&str> = prefix.split('\t').collect();
        assert_eq!(&columns[1..], ["info", "access", ""], "{line}");
        let fields = fields.trim_end();
        let expected = "src.addr=10.244.1.12:58508 src.workload=\"curl-7656cf8794-r7zb9\" src.namespace=\"default\" src.identity=\"spiffe://cluster.local/ns/default/sa/curl\" dst.addr=10.244.1.10:15008 dst.hbone_addr=\"10.244.1.10:9080\" dst.service=\"productpage.default.svc.cluster.local\" dst.workload=\"productpage-v1-87d54dd59-fn6vw\" dst.namespace=\"default\" dst.identity=\"spiffe://cluster.local/ns/default/sa/bookinfo-productpage\" direction=\"outbound\" bytes_sent=80 bytes_recv=175 duration=\"";
        assert!(fields.starts_with(expected), "{fields}");
        assert!(fields.ends_with("ms\""), "{fields}");
    }

    #[test]
    fn missing_fields_are_left_out_and_failures_are_errors_with_their_chain() {
        let r = ConnectionRecord::new(
            Direction::Inbound,
            "192.0.2.1:1234".parse().expect("a"),
            "10.244.1.10:9080".parse().expect("a"),
        );
        let cause = std::io::Error::other("refused by the kernel");
        #[derive(Debug, thiserror::Error)]
        #[error("connection to 10.244.1.10:9080 failed")]
        struct Outer(#[source] std::io::Error);
        let line = logged(&r, Some(&Outer(cause)));
        assert_eq!(line.split('\t').nth(1), Some("error"), "{line}");
        for absent in [
            "src.workload",
            "src.identity",
            "dst.hbone_addr",
            "dst.service",
        ] {
            assert!(!line.contains(absent), "{absent} has no value: {line}");
        }
        assert!(
            line.contains("error=\"connection to 10.244.1.10:9080 failed: refused by the kernel\""),
            "{line}"
        );
        let (recent, failed) = recent("", "", 10);
        assert!(recent
            .iter()
            .chain(&failed)
            .any(|o| o.src == r.src_addr && o.error.is_some()));
    }
}
