//! HBONE: HTTP/2 CONNECT over mutual TLS to port 15008.
//!
//! Client: a pool of HTTP/2 connections keyed by (source identity, expected destination
//! identities, destination address, source IP); a connection carries up to the peer's stream
//! limit, then a new one is opened. No lock is held across a handshake.
//!
//! Server (15008 in each pod): TLS with the pod's certificate, client certificate required;
//! CONNECT only; the authority must be one of the pod's addresses (400 otherwise); 200 only
//! once the application accepted the connection (503 otherwise).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use rustls::pki_types::ServerName;
use std::sync::atomic::AtomicBool;
use tokio::net::TcpStream;

use tracing::Instrument;

use super::connection::{Classify, Connection, ConnectionError};
use super::{PodProxy, ILLEGAL_PORTS};
use crate::accesslog::{Direction, Peer};
use crate::identity::Identity;
use crate::metrics::ResponseFlag;
use crate::telemetry::ErrorChain;

/// Per-stream flow-control window.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// Per-connection flow-control window.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// Largest frame.
pub const MAX_FRAME: u32 = 1024 * 1024;
/// Streams per connection.
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
    #[error("authority {authority} is not an address of pod {pod}")]
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

/// A client connection: the handle that opens streams, and whether its task has ended.
#[derive(Clone)]
pub struct ClientConnection {
    sender: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

struct Pooled {
    conn: ClientConnection,
    active: Arc<AtomicUsize>,
    last_used: std::time::Instant,
}

impl Pooled {
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
            // The peer advertises 100 (upstream and ours); a new connection past that.
            let limit = c
                .conn
                .sender
                .current_max_send_streams()
                .min(MAX_STREAMS as usize);
            let active = c.active.load(Ordering::Relaxed);
            (active < limit).then(|| {
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
                    self.open_on_new(pod, key, request()?).await?
                }
            },
            None => self.open_on_new(pod, key, request()?).await?,
        };
        let response = response.await.map_err(h2_error)?;
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

/// Sends the CONNECT request's headers on `conn` (waiting for a free stream slot).
async fn open_stream(
    conn: &ClientConnection,
    request: Request<()>,
) -> Result<(h2::client::ResponseFuture, SendStream<Bytes>), h2::Error> {
    let mut sender = conn.sender.clone().ready().await?;
    sender.send_request(request, false)
}

/// TCP (from inside the pod, marked), TLS with the source's certificate, then HTTP/2 driven
/// by its own task (with keepalive PINGs) until it closes.
async fn connect(pod: &PodProxy, key: &PoolKey) -> Result<ClientConnection, Error> {
    let peer = key.dst;
    let tcp = pod.connect(peer).await?;
    let config =
        crate::tls::client_config(pod.mesh.certs.as_ref(), &key.source, key.expected.clone())?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = ServerName::IpAddress(peer.ip().into());
    let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| Error::HandshakeTimeout(peer))?
        .map_err(|source| Error::Tls { peer, source })?;
    let handshake = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .enable_push(false)
        .handshake::<_, Bytes>(tls);
    let (sender, mut connection) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
        .await
        .map_err(|_| Error::HandshakeTimeout(peer))?
        .map_err(|source| Error::H2 { peer, source })?;
    let closed = Arc::new(AtomicBool::new(false));
    let ping = connection.ping_pong();
    let ended = closed.clone();
    tokio::spawn(async move {
        tokio::select! {
            result = connection => if let Err(e) = result {
                tracing::debug!(peer = %peer, error = %ErrorChain(&e), "HBONE connection closed");
            },
            why = keepalive(ping) => {
                tracing::warn!(peer = %peer, "HBONE connection closed: {why}");
            }
        }
        ended.store(true, Ordering::Relaxed);
    });
    Ok(ClientConnection { sender, closed })
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

fn baggage(pod: &PodProxy) -> String {
    format!(
        "k8s.namespace.name={},k8s.pod.name={}",
        pod.namespace, pod.name
    )
}

/// A fresh W3C traceparent (random trace and span ids, not sampled).
fn traceparent() -> String {
    use std::fmt::Write as _;
    let mut bytes = [0u8; 24];
    let _ = crate::tls::provider().secure_random.fill(&mut bytes);
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    for (i, b) in bytes.iter().enumerate() {
        if i == 16 {
            out.push('-');
        }
        let _ = write!(out, "{b:02x}");
    }
    out.push_str("-00");
    out
}

/// Serves one connection accepted on a pod's 15008.
pub async fn serve(pod: Arc<PodProxy>, stream: TcpStream, peer: SocketAddr) {
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    // A connection that fails before any CONNECT is logged as one inbound connection.
    let fail = |e: Error| {
        let mut conn = Connection::new(Direction::Inbound, peer, local);
        conn.record.dst = pod.as_peer(&pod.mesh.state.snapshot(), None);
        conn.finish(Err(e.into()));
    };
    let accepted = tokio::time::timeout(HANDSHAKE_TIMEOUT, pod.hbone_tls.accept(stream)).await;
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(source)) => return fail(Error::Tls { peer, source }),
        Err(_) => return fail(Error::HandshakeTimeout(peer)),
    };
    let client_identity = match crate::tls::peer_identity(
        tls.get_ref().1.peer_certificates(),
        pod.mesh.certs.trust_domain(),
    ) {
        Ok(id) => id,
        Err(e) => return fail(Error::PeerIdentity(e)),
    };
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .handshake::<_, Bytes>(tls);
    let mut conn = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(source)) => return fail(Error::H2 { peer, source }),
        Err(_) => return fail(Error::HandshakeTimeout(peer)),
    };
    let mut keepalive = std::pin::pin!(keepalive(conn.ping_pong()));
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    tokio::spawn(handle_connect(
                        pod.clone(),
                        peer,
                        client_identity.clone(),
                        req,
                        respond,
                    ));
                }
                Some(Err(e)) => {
                    tracing::debug!(src.addr = %peer, error = %ErrorChain(&e), "HBONE connection ended");
                    return;
                }
                None => return,
            },
            why = &mut keepalive => {
                tracing::warn!(src.addr = %peer, "HBONE connection closed: {why}");
                return;
            }
        }
    }
}

/// Answers `status`; `end_of_stream` closes our side (a refusal), otherwise the returned
/// stream carries the tunnel's bytes.
fn respond(
    answer: &mut SendResponse<Bytes>,
    status: StatusCode,
    end_of_stream: bool,
) -> Result<SendStream<Bytes>, h2::Error> {
    let mut r = Response::new(());
    *r.status_mut() = status;
    answer.send_response(r, end_of_stream)
}

/// Answers a refused CONNECT; the stream may already be gone, which changes nothing.
fn refuse(answer: &mut SendResponse<Bytes>, status: StatusCode) {
    let _ = respond(answer, status, true);
}

/// A refused CONNECT: the status to answer and why.
struct Refusal {
    status: StatusCode,
    error: ConnectionError,
}

impl Refusal {
    fn new(status: StatusCode, error: impl Into<ConnectionError>) -> Self {
        Self {
            status,
            error: error.into(),
        }
    }
}

/// Serves one CONNECT stream: one inbound connection.
async fn handle_connect(
    pod: Arc<PodProxy>,
    peer: SocketAddr,
    client: Identity,
    req: Request<RecvStream>,
    mut answer: SendResponse<Bytes>,
) {
    let authority = req.uri().authority().map(|a| a.as_str().to_string());
    let target: Option<SocketAddr> = authority.as_deref().and_then(|a| a.parse().ok());
    // src.addr is the tunnel's peer, as upstream (and the guide) report it.
    let mut conn = Connection::new(Direction::Inbound, peer, target.unwrap_or(peer));
    let span = conn.span();
    let accepted = accept_connect(&pod, client, &req, authority, target, &mut conn)
        .instrument(span.clone())
        .await;
    let (app, tracked) = match accepted {
        Ok(accepted) => accepted,
        Err(refusal) => {
            // Logged before the answer, so the line exists once the client sees the status.
            conn.finish(Err(refusal.error));
            return refuse(&mut answer, refusal.status);
        }
    };
    let result = async {
        let send = respond(&mut answer, StatusCode::OK, false)
            .map_err(|source| Error::H2 { peer, source })?;
        conn.established();
        // Inbound: the reporting side sends what the application answers.
        tokio::select! {
            relayed = super::copy::tunnel(app, send, req.into_body(), &conn.sent, &conn.received) => relayed?,
            denied = tracked.revoked() => return Err(denied.into()),
        }
        Ok(())
    }
    .instrument(span)
    .await;
    conn.finish(result);
}

/// Checks a CONNECT (method, authority, self-call, policy) and connects to the application.
async fn accept_connect(
    pod: &Arc<PodProxy>,
    client: Identity,
    req: &Request<RecvStream>,
    authority: Option<String>,
    target: Option<SocketAddr>,
    conn: &mut Connection,
) -> Result<(TcpStream, super::tracker::Tracked), Refusal> {
    let peer = conn.record.src_addr;
    conn.record.dst_hbone_addr = target;
    let mesh = pod.mesh.state.snapshot();
    let src_workload = mesh.workload_by_ip(&pod.network, peer.ip());
    conn.record.src = Peer {
        workload: src_workload.as_ref().map(|w| w.name.clone()),
        namespace: src_workload.as_ref().map(|w| w.namespace.clone()),
        identity: Some(client),
        detail: src_workload.clone(),
    };
    conn.record.dst = pod.as_peer(&mesh, Some(pod.identity.clone()));
    conn.record.dst_service =
        target.and_then(|t| PodProxy::service_of(conn.record.dst.detail.as_deref(), t.port()));
    if req.method() != Method::CONNECT {
        let e = Error::NotConnect(req.method().clone());
        return Err(Refusal::new(StatusCode::BAD_REQUEST, e));
    }
    let Some(target) = target.filter(|t| pod.ips.contains(&t.ip())) else {
        let e = Error::WrongAuthority {
            authority: authority.unwrap_or_default(),
            pod: pod.name.clone(),
        };
        return Err(Refusal::new(StatusCode::BAD_REQUEST, e));
    };
    if ILLEGAL_PORTS.contains(&target.port()) {
        let e = super::Error::SelfCall(target);
        return Err(Refusal::new(StatusCode::BAD_REQUEST, e));
    }
    let authz = crate::authz::Connection {
        src: peer.ip(),
        identity: conn.record.src.identity.as_ref(),
        dst: target,
    };
    pod.authorize(&mesh, conn.record.dst.detail.as_deref(), &authz)
        .map_err(|denied| Refusal::new(StatusCode::UNAUTHORIZED, denied))?;
    let app = pod
        .connect(target)
        .await
        .map_err(|e| Refusal::new(StatusCode::SERVICE_UNAVAILABLE, e))?;
    let tracked = pod.mesh.tracker.track(
        pod.clone(),
        peer.ip(),
        conn.record.src.identity.clone(),
        target,
    );
    Ok((app, tracked))
}

#[cfg(test)]
mod tests {
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
