//! Relays a question the mesh does not answer to the resolvers, unchanged (EDNS, flags and
//! all, so the pod gets the resolver's own answer, NXDOMAIN and its SOA included): over UDP
//! from a socket opened in the pod's network namespace with the agent's mark (so capture
//! leaves it alone and the pod's network policy applies), or over TCP when the pod asked
//! over TCP. Each resolver is tried in turn, twice over, each attempt bounded; a truncated
//! UDP answer is passed on as is, and the pod's resolver library retries over TCP.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::proxy::PodProxy;

/// How long one resolver has to answer one attempt.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// Rounds over the resolvers.
const ROUNDS: usize = 2;
/// The largest DNS message (TCP's length prefix).
const MAX_MESSAGE: usize = 65535;

/// A question that could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No resolver configured.
    #[error(
        "no resolver to forward to: set ZTUNNEL_DNS_RESOLV_CONF to a file with `nameserver` lines"
    )]
    NoResolver,
    /// Every attempt failed; the last failure is the source.
    #[error("no answer from {resolvers} after {attempts} attempts of {timeout:?}: is the cluster's DNS reachable from the pod (a NetworkPolicy on port 53?)")]
    Exhausted {
        /// The resolvers tried.
        resolvers: String,
        /// Attempts made.
        attempts: usize,
        /// Per attempt.
        timeout: Duration,
        /// The last failure.
        #[source]
        last: Box<Attempt>,
    },
}

/// One failed attempt.
#[derive(Debug, thiserror::Error)]
pub enum Attempt {
    /// The socket could not be opened, or sending or receiving failed.
    #[error("resolver {resolver}: {source}")]
    Io {
        /// The resolver.
        resolver: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The resolver did not answer in time.
    #[error("resolver {0} did not answer within the attempt's time")]
    Timeout(SocketAddr),
    /// Its answer does not belong to the question.
    #[error("resolver {0} answered with another message id")]
    Mismatch(SocketAddr),
}

/// Forwards `query` (its id is `id`) for `pod`; the resolver's answer, unchanged. A UDP
/// answer is read into `max_udp` bytes (the question's EDNS payload size, at least 512).
pub async fn forward(
    pod: &PodProxy,
    resolvers: &[SocketAddr],
    query: &[u8],
    id: u16,
    over_tcp: bool,
    max_udp: usize,
) -> Result<Vec<u8>, Error> {
    if resolvers.is_empty() {
        return Err(Error::NoResolver);
    }
    let mut last = None;
    let mut attempts = 0;
    for _ in 0..ROUNDS {
        for &resolver in resolvers {
            attempts += 1;
            let attempt = async {
                if over_tcp {
                    ask_tcp(pod, resolver, query).await
                } else {
                    ask_udp(pod, resolver, query, max_udp).await
                }
            };
            let result = match tokio::time::timeout(ATTEMPT_TIMEOUT, attempt).await {
                Ok(result) => result,
                Err(_) => Err(Attempt::Timeout(resolver)),
            };
            match result {
                Ok(answer) if answer.len() >= 12 && answer[..2] == id.to_be_bytes() => {
                    return Ok(answer)
                }
                Ok(_) => last = Some(Attempt::Mismatch(resolver)),
                Err(e) => last = Some(e),
            }
        }
    }
    Err(Error::Exhausted {
        resolvers: resolvers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        attempts,
        timeout: ATTEMPT_TIMEOUT,
        last: Box::new(last.unwrap_or(Attempt::Timeout(resolvers[0]))),
    })
}

async fn ask_udp(
    pod: &PodProxy,
    resolver: SocketAddr,
    query: &[u8],
    max_udp: usize,
) -> Result<Vec<u8>, Attempt> {
    let io = |source| Attempt::Io { resolver, source };
    let socket = pod.sockets.udp_socket(resolver).map_err(io)?;
    socket.connect(resolver).await.map_err(io)?;
    socket.send(query).await.map_err(io)?;
    let mut buf = vec![0u8; max_udp.clamp(512, MAX_MESSAGE)];
    let n = socket.recv(&mut buf).await.map_err(io)?;
    buf.truncate(n);
    Ok(buf)
}

async fn ask_tcp(pod: &PodProxy, resolver: SocketAddr, query: &[u8]) -> Result<Vec<u8>, Attempt> {
    let io = |source| Attempt::Io { resolver, source };
    let mut stream = pod.connect(resolver).await.map_err(|e| {
        io(io::Error::other(
            crate::telemetry::ErrorChain(&e).to_string(),
        ))
    })?;
    let len = u16::try_from(query.len()).map_err(|_| io(io::ErrorKind::InvalidInput.into()))?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await.map_err(io)?;
    let len = stream.read_u16().await.map_err(io)?;
    let mut answer = vec![0u8; usize::from(len)];
    stream.read_exact(&mut answer).await.map_err(io)?;
    Ok(answer)
}
