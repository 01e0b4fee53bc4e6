//! One client connection to an HBONE peer (TCP from inside the pod, TLS with the source's
//! certificate, HTTP/2 with keepalive PINGs) and the CONNECT streams opened on it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::SendStream;
use http::Request;
use rustls::pki_types::ServerName;

use super::pool::PoolKey;
use super::*;
use crate::proxy::PodProxy;
use crate::telemetry::ErrorChain;

/// A client connection: the handle that opens streams, and whether its task has ended.
#[derive(Clone)]
pub struct ClientConnection {
    pub(super) sender: SendRequest<Bytes>,
    pub(super) closed: Arc<AtomicBool>,
}

/// Sends the CONNECT request's headers on `conn` (waiting for a free stream slot).
pub(super) async fn open_stream(
    conn: &ClientConnection,
    request: Request<()>,
) -> Result<(h2::client::ResponseFuture, SendStream<Bytes>), h2::Error> {
    let mut sender = conn.sender.clone().ready().await?;
    sender.send_request(request, false)
}

/// TCP (from inside the pod, marked), TLS with the source's certificate, then HTTP/2 driven
/// by its own task (with keepalive PINGs) until it closes.
pub(super) async fn connect(pod: &PodProxy, key: &PoolKey) -> Result<ClientConnection, Error> {
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
    let drain = pod.mesh.drain.clone();
    tokio::spawn(async move {
        tokio::select! {
            // The drain is over: no stream may still be open on it.
            _ = drain.closed() => {}
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

pub(super) fn baggage(pod: &PodProxy) -> String {
    format!(
        "k8s.namespace.name={},k8s.pod.name={}",
        pod.namespace, pod.name
    )
}

/// A fresh W3C traceparent (random trace and span ids, not sampled).
pub(super) fn traceparent() -> String {
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
