//! Graceful drain: the agent stops taking new work, lets the connections it carries run on
//! until they end or a deadline passes, then closes the rest (each still with its access-log
//! line).
//!
//! Two phases, each a signal every task can watch:
//! - **started** (SIGTERM, `POST /quitquitquit`): listeners close (the kernel hands new
//!   connections to another agent's sockets in the same `SO_REUSEPORT` group, or refuses them
//!   when there is none), HBONE servers send GOAWAY, readiness answers 503;
//! - **deadline** (started + the drain period): connections still open are closed with
//!   [`DeadlineReached`] as their error.
//!
//! Connections are counted while they run ([`Drain::track`]), so the agent exits as soon as
//! the last one ends rather than always waiting for the deadline.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::task_tracker::TrackedFuture;
use tokio_util::task::TaskTracker;

/// How long after the deadline a connection that does not watch it itself is dropped.
const LATE: Duration = Duration::from_millis(100);

/// A connection still open when the drain deadline passed.
#[derive(Debug, thiserror::Error)]
#[error("closed at the drain deadline: the agent is stopping and the connection was still open {0:?} after it began draining (CONNECTION_TERMINATION_DEADLINE, or TERMINATION_GRACE_PERIOD_SECONDS, sets the period)")]
pub struct DeadlineReached(pub Duration);

/// The drain signals and the count of live connections, shared by every listener and
/// connection of one agent.
#[derive(Clone, Debug, Default)]
pub struct Drain {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    started: CancellationToken,
    deadline: CancellationToken,
    closed: CancellationToken,
    period: std::sync::Mutex<Duration>,
    /// The live connections' tasks. Its combinator holds each connection's future once (a
    /// wrapping `async` block would store it twice: futures are the per-connection memory).
    live: TaskTracker,
}

impl Drain {
    /// `work` (one connection's task), counted as live until it completes.
    pub fn track<F: Future>(&self, work: F) -> TrackedFuture<F> {
        self.inner.live.track_future(work)
    }

    /// Connections live now.
    pub fn live(&self) -> usize {
        self.inner.live.len()
    }

    /// Resolves when draining begins: stop taking new work.
    pub async fn started(&self) {
        self.inner.started.cancelled().await;
    }

    /// Resolves when the deadline passes: close what is still open.
    async fn deadline(&self) {
        self.inner.deadline.cancelled().await;
    }

    /// Resolves once the drain is over (the deadline and its grace passed, or nothing was
    /// left): what carries connections (an HTTP/2 connection) may close now, after the
    /// connections on it have ended and sent their resets.
    pub async fn closed(&self) {
        self.inner.closed.cancelled().await;
    }

    /// Resolves when the deadline passes, with the error a connection closed by it reports.
    /// The relays watch this themselves and end with it, resetting both ends.
    pub async fn deadline_reached(&self) -> DeadlineReached {
        self.deadline().await;
        DeadlineReached(*self.inner.period.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Resolves a moment after the deadline: for a connection still in a phase that does not
    /// watch the deadline itself (connecting, handshaking), to be dropped with
    /// [`DeadlineReached`] for its access-log line. Used as a `select!` branch beside the
    /// connection's own future, inline, so that future is stored once.
    pub async fn overdue(&self) -> DeadlineReached {
        let reached = self.deadline_reached().await;
        tokio::time::sleep(LATE).await;
        reached
    }

    /// Begins draining and waits until every tracked connection has ended or `period` has
    /// passed; then signals the deadline and waits up to `grace` more for the closed
    /// connections to record their ends. Returns how many were still open at the deadline.
    pub async fn run(&self, period: Duration, grace: Duration) -> usize {
        *self.inner.period.lock().unwrap_or_else(|p| p.into_inner()) = period;
        self.inner.started.cancel();
        // Closing the tracker only lets `wait` resolve once it is empty; tasks still end
        // (and count) as before.
        self.inner.live.close();
        let ended = tokio::time::timeout(period, self.inner.live.wait())
            .await
            .is_ok();
        let open = if ended { 0 } else { self.live() };
        self.inner.deadline.cancel();
        if !ended {
            let _ = tokio::time::timeout(grace, self.inner.live.wait()).await;
        }
        self.inner.closed.cancel();
        open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_ends_when_the_last_connection_ends() {
        let drain = Drain::default();
        let d = drain.clone();
        let connection = tokio::spawn(drain.track(async move { d.started().await }));
        while drain.live() == 0 {
            tokio::task::yield_now().await;
        }
        let open = drain
            .run(Duration::from_secs(30), Duration::from_secs(1))
            .await;
        assert_eq!(open, 0);
        assert_eq!(drain.live(), 0);
        connection.await.expect("connection");
    }

    #[tokio::test]
    async fn connections_past_the_deadline_are_closed_with_the_reason() {
        let drain = Drain::default();
        let d = drain.clone();
        let connection = tokio::spawn(drain.track(async move {
            let reached = tokio::select! {
                biased;
                () = std::future::pending() => unreachable!("never ends on its own"),
                reached = d.overdue() => reached,
            };
            reached.to_string()
        }));
        while drain.live() == 0 {
            tokio::task::yield_now().await;
        }
        let open = drain
            .run(Duration::from_millis(50), Duration::from_secs(5))
            .await;
        assert_eq!(open, 1);
        let why = connection.await.expect("task");
        assert!(why.contains("drain deadline"), "{why}");
        assert_eq!(drain.live(), 0, "its end was waited for");
    }
}
