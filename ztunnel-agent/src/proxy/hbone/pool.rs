//! The client side's pool of HTTP/2 connections to HBONE peers, and tunnels opened on them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};

use super::client::{baggage, connect, open_stream, traceparent, ClientConnection};
use super::*;
use crate::identity::Identity;
use crate::proxy::PodProxy;

/// Pool key: connections are shared only between identical tunnels.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// Identity presented.
    pub source: Identity,
    /// Identities accepted from the server.
    pub expected: Vec<Identity>,
    /// The server's 15008 address.
    pub dst: SocketAddr,
    /// The pod the tunnel carries traffic for.
    pub src_ip: IpAddr,
}

struct Pooled {
    conn: ClientConnection,
    active: Arc<AtomicUsize>,
    last_used: std::time::Instant,
}

impl Pooled {
    /// Whether another stream fits: the peer advertises 100 (upstream and ours); past that,
    /// a new connection.
    fn has_free_stream(&self) -> bool {
        let limit = self
            .conn
            .sender
            .current_max_send_streams()
            .min(MAX_STREAMS as usize);
        self.active.load(Ordering::Relaxed) < limit
    }

    /// Closed, or idle past the timeout (dropping the last sender closes the connection).
    fn expired(&self, now: std::time::Instant, idle: Duration) -> bool {
        self.conn.closed.load(Ordering::Relaxed)
            || (self.active.load(Ordering::Relaxed) == 0 && now - self.last_used >= idle)
    }
}

/// One HBONE stream: what is sent to the peer and what comes back.
pub struct Tunnel {
    /// Towards the peer.
    pub send: SendStream<Bytes>,
    /// From the peer.
    pub recv: RecvStream,
}

/// Counts a stream on a pooled connection until dropped.
pub struct StreamGuard(Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// HTTP/2 connections to HBONE peers.
#[derive(Default)]
pub struct Pool {
    conns: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pool")
    }
}

impl Pool {
    /// A connection with a free stream for `key`, if one exists.
    fn checkout(&self, key: &PoolKey) -> Option<(ClientConnection, StreamGuard)> {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let list = conns.get_mut(key)?;
        let now = std::time::Instant::now();
        list.retain(|c| !c.expired(now, IDLE_TIMEOUT));
        list.iter_mut().find_map(|c| {
            c.has_free_stream().then(|| {
                c.active.fetch_add(1, Ordering::Relaxed);
                c.last_used = now;
                (c.conn.clone(), StreamGuard(c.active.clone()))
            })
        })
    }

    fn checkin(&self, key: PoolKey, conn: ClientConnection) -> StreamGuard {
        let active = Arc::new(AtomicUsize::new(1));
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        conns.entry(key).or_default().push(Pooled {
            conn,
            active: active.clone(),
            last_used: std::time::Instant::now(),
        });
        StreamGuard(active)
    }

    /// The open streams on each live pooled connection for `key`, and whether a new tunnel
    /// would reuse one (one has a free stream), for `diagnose flow`.
    pub fn streams(&self, key: &PoolKey) -> (Vec<usize>, bool) {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        let live: Vec<&Pooled> = conns.get(key).map_or_else(Vec::new, |list| {
            list.iter()
                .filter(|c| !c.expired(now, IDLE_TIMEOUT))
                .collect()
        });
        (
            live.iter()
                .map(|c| c.active.load(Ordering::Relaxed))
                .collect(),
            live.iter().any(|c| c.has_free_stream()),
        )
    }

    /// Closes connections idle for `idle` (or already closed); returns how many remain.
    pub fn evict_idle(&self, idle: Duration) -> usize {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        conns.retain(|_, list| {
            list.retain(|c| !c.expired(now, idle));
            !list.is_empty()
        });
        conns.values().map(Vec::len).sum()
    }

    /// Evicts idle connections once a minute until cancelled.
    pub async fn run_eviction(self: Arc<Self>, cancel: tokio_util::sync::CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(60)) => {}
            }
            let remaining = self.evict_idle(IDLE_TIMEOUT);
            tracing::debug!(remaining, "HBONE pool: idle connections evicted");
        }
    }

    /// A new pooled connection for `key`, with `request`'s stream opened on it.
    async fn open_on_new(
        &self,
        pod: &PodProxy,
        key: PoolKey,
        request: Request<()>,
    ) -> Result<(h2::client::ResponseFuture, SendStream<Bytes>, StreamGuard), Error> {
        let peer = key.dst;
        let conn = connect(pod, &key).await?;
        let guard = self.checkin(key, conn.clone());
        let (response, send) = open_stream(&conn, request)
            .await
            .map_err(|source| Error::H2 { peer, source })?;
        Ok((response, send, guard))
    }

    /// Opens a tunnel from `pod` to `authority` through the HBONE server at `key.dst`.
    pub async fn tunnel(
        &self,
        pod: &PodProxy,
        key: PoolKey,
        authority: SocketAddr,
        src: SocketAddr,
    ) -> Result<(Tunnel, StreamGuard), Error> {
        let peer = key.dst;
        let h2_error = |source| Error::H2 { peer, source };
        let request = || {
            Request::builder()
                .method(Method::CONNECT)
                .uri(authority.to_string())
                .header("forwarded", format!("for=\"{src}\""))
                .header("baggage", baggage(pod))
                .header("traceparent", traceparent())
                .body(())
                .map_err(|_| Error::Status {
                    authority,
                    peer,
                    status: StatusCode::BAD_REQUEST,
                })
        };
        let (response, send, guard) = match self.checkout(&key) {
            Some((conn, guard)) => match open_stream(&conn, request()?).await {
                Ok((response, send)) => (response, send, guard),
                Err(_) => {
                    // The pooled connection can take no new stream (GOAWAY received, stream
                    // ids used up) though its task still serves older streams: never hand it
                    // out again; this tunnel goes over a new connection.
                    conn.closed.store(true, Ordering::Relaxed);
                    drop(guard);
                    self.open_on_new(pod, key.clone(), request()?).await?
                }
            },
            None => self.open_on_new(pod, key.clone(), request()?).await?,
        };
        let (response, send, guard) = match response.await {
            Ok(response) => (response, send, guard),
            // A graceful GOAWAY (NO_ERROR: the peer is draining) that fails this stream, or
            // REFUSED_STREAM, says the server never processed it: retried once, on a new
            // connection (which reaches the agent that replaces the draining one). The race is
            // inherent to a graceful GOAWAY: a stream may be sent as the final GOAWAY is on
            // its way. An error GOAWAY may have been processed, so it is not retried.
            Err(e)
                if (e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR))
                    || e.reason() == Some(h2::Reason::REFUSED_STREAM) =>
            {
                tracing::debug!(peer = %peer, error = %e, "HBONE stream refused by a draining peer; retrying on a new connection");
                drop((send, guard));
                let (response, send, guard) = self.open_on_new(pod, key, request()?).await?;
                (response.await.map_err(h2_error)?, send, guard)
            }
            Err(e) => return Err(h2_error(e)),
        };
        if response.status() != StatusCode::OK {
            return Err(Error::Status {
                authority,
                peer,
                status: response.status(),
            });
        }
        let recv = response.into_body();
        Ok((Tunnel { send, recv }, guard))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// An HTTP/2 client connection to a server on an in-memory pipe.
    async fn connection() -> ClientConnection {
        let (client, server) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(server).await.expect("server");
            while conn.accept().await.is_some() {}
        });
        let (sender, conn) = h2::client::handshake(client).await.expect("h2 handshake");
        tokio::spawn(conn);
        ClientConnection {
            sender,
            closed: Arc::new(AtomicBool::new(false)),
        }
    }

    fn key() -> PoolKey {
        PoolKey {
            source: "spiffe://cluster.local/ns/default/sa/a"
                .parse()
                .expect("id"),
            expected: vec!["spiffe://cluster.local/ns/default/sa/b"
                .parse()
                .expect("id")],
            dst: "10.244.1.10:15008".parse().expect("addr"),
            src_ip: "10.244.1.12".parse().expect("ip"),
        }
    }

    #[tokio::test]
    async fn connections_are_reused_and_idle_ones_evicted() {
        let pool = Pool::default();
        let guard = pool.checkin(key(), connection().await);
        let (_reused, second) = pool
            .checkout(&key())
            .expect("the pooled connection is reused");
        assert_eq!(pool.evict_idle(Duration::ZERO), 1, "busy: kept");
        drop((guard, second));
        assert_eq!(
            pool.evict_idle(Duration::from_secs(300)),
            1,
            "recently used: kept"
        );
        assert_eq!(pool.evict_idle(Duration::ZERO), 0, "idle: closed");
        assert!(pool.checkout(&key()).is_none());
    }
}
