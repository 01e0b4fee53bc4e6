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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

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
    live: AtomicUsize,
    idle: Notify,
}

/// Counts one live connection until dropped.
#[derive(Debug)]
pub struct Tracked(Arc<Inner>);

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.0.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drain {
    /// Counts a connection as live until the returned guard is dropped.
    pub fn track(&self) -> Tracked {
        self.inner.live.fetch_add(1, Ordering::AcqRel);
        Tracked(self.inner.clone())
    }

    /// Connections live now.
    pub fn live(&self) -> usize {
        self.inner.live.load(Ordering::Acquire)
    }

    /// Whether draining has begun.
    pub fn is_started(&self) -> bool {
        self.inner.started.is_cancelled()
    }

    /// Resolves when draining begins: stop taking new work.
    pub async fn started(&self) {
        self.inner.started.cancelled().await;
    }

    /// Resolves when the deadline passes: close what is still open.
    pub async fn deadline(&self) {
        self.inner.deadline.cancelled().await;
    }

    /// Resolves once the drain is over (the deadline and its grace passed, or nothing was
    /// left): what carries connections (an HTTP/2 connection) may close now, after the
    /// connections on it have ended and sent their resets.
    pub async fn closed(&self) {
        self.inner.closed.cancelled().await;
    }

    /// Runs `work` (one connection's handling). The relays watch the deadline themselves and
    /// end with [`DeadlineReached`] as their error, resetting both ends; a connection still in
    /// another phase (connecting, handshaking) is dropped shortly after the deadline, also
    /// with [`DeadlineReached`], for its access-log line.
    pub async fn until_deadline<T, E>(
        &self,
        work: impl Future<Output = Result<T, E>>,
    ) -> Result<T, E>
    where
        E: From<DeadlineReached>,
    {
        tokio::select! {
            biased;
            result = work => result,
            reached = async {
                let reached = self.deadline_reached().await;
                tokio::time::sleep(LATE).await;
                reached
            } => Err(reached.into()),
        }
    }

    /// Resolves when the deadline passes, with the error a connection closed by it reports.
    pub async fn deadline_reached(&self) -> DeadlineReached {
        self.deadline().await;
        DeadlineReached(*self.inner.period.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Begins draining and waits until every tracked connection has ended or `period` has
    /// passed; then signals the deadline and waits up to `grace` more for the closed
    /// connections to record their ends. Returns how many were still open at the deadline.
    pub async fn run(&self, period: Duration, grace: Duration) -> usize {
        *self.inner.period.lock().unwrap_or_else(|p| p.into_inner()) = period;
        self.inner.started.cancel();
        let ended = tokio::time::timeout(period, self.wait_idle()).await.is_ok();
        let open = if ended { 0 } else { self.live() };
        self.inner.deadline.cancel();
        if !ended {
            let _ = tokio::time::timeout(grace, self.wait_idle()).await;
        }
        self.inner.closed.cancel();
        open
    }

    async fn wait_idle(&self) {
        loop {
            let idle = self.inner.idle.notified();
            let mut idle = std::pin::pin!(idle);
            // Registered before the check, so a connection ending in between is not missed.
            idle.as_mut().enable();
            if self.live() == 0 {
                return;
            }
            idle.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_ends_when_the_last_connection_ends() {
        let drain = Drain::default();
        let tracked = drain.track();
        let d = drain.clone();
        let watcher = tokio::spawn(async move {
            d.started().await;
            drop(tracked);
        });
        let open = drain
            .run(Duration::from_secs(30), Duration::from_secs(1))
            .await;
        assert_eq!(open, 0);
        assert_eq!(drain.live(), 0);
        watcher.await.expect("watcher");
    }

    #[tokio::test]
    async fn connections_past_the_deadline_are_closed_with_the_reason() {
        let drain = Drain::default();
        let d = drain.clone();
        let connection = tokio::spawn(async move {
            let _tracked = d.track();
            d.until_deadline(std::future::pending::<Result<(), DeadlineReached>>())
                .await
        });
        // Let the connection register before draining.
        while drain.live() == 0 {
            tokio::task::yield_now().await;
        }
        let open = drain
            .run(Duration::from_millis(50), Duration::from_secs(5))
            .await;
        assert_eq!(open, 1);
        let ended = connection.await.expect("task");
        let err = ended.expect_err("closed at the deadline");
        assert!(err.to_string().contains("drain deadline"), "{err}");
        assert_eq!(drain.live(), 0, "its end was waited for");
    }
}
