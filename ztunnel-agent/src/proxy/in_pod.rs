//! The agent's [`PodSockets`]: sockets opened inside the pod's network namespace, marked as
//! the agent's own so capture does not loop them back; original destinations from the eBPF
//! map, then `SO_ORIGINAL_DST` (an iptables set-up), then the local address (which for 15001
//! is a self-call and is refused). Connections to the pod's application carry the client's
//! address where the pod's namespace was set up for it (see `enroll::source_route`).

use std::collections::HashSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;

use super::{
    ClientAddr, Connecting, ConnectingApp, Error, OriginalDst, PodSockets, CONNECT_TIMEOUT,
};
use crate::netns::PodNetns;
use crate::redirect::{DialTable, OrigDstTable};
use crate::socket::{set_agent_mark, so_original_dst, transparent_socket};

/// A pod's network namespace and the kernel's original-destination table.
#[derive(Debug)]
pub struct InPodSockets {
    netns: PodNetns,
    orig_dst: Arc<OrigDstTable>,
    source: SourceAddress,
}

/// Whether the pod's application sees its clients' addresses.
#[derive(Debug)]
pub struct SourceAddress {
    /// Where connections from a client's address register so `sk_lookup` leaves them to the
    /// application.
    pub dials: Arc<DialTable>,
    /// The pod's own addresses (a client among them is connected from as usual).
    pub pod_ips: Vec<IpAddr>,
    /// Live plaintext connections to the application, by (peer, application) addresses: the
    /// agent's accepted socket on 15006 holds that pair, so a connection from the peer's
    /// address must not pick the peer's port for the same application (its SYN would reach
    /// the agent's socket).
    pub plaintext_peers: Arc<PeerSet>,
    /// Whether the pod's namespace is set up for it.
    pub state: SourceState,
    /// For the metric and the one warning: the pod's name and namespace.
    pub pod: (String, String),
    /// The one warning about this pod's fallback was given (at enrollment, or at the first
    /// refused connection).
    pub warned: AtomicBool,
}

/// Whether a pod's connections to its application carry the client's address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceState {
    /// They do.
    On,
    /// Turned off by the setting (`ENABLE_ORIG_SRC=false`): the pod's own address, uncounted.
    Off,
    /// The kernel refused to set the pod's namespace up (why): the pod's own address, each
    /// connection counted.
    Refused(String),
}

impl std::fmt::Display for SourceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceState::On => f.write_str("preserved"),
            SourceState::Off => f.write_str("off"),
            SourceState::Refused(why) => write!(f, "unavailable: {why}"),
        }
    }
}

impl InPodSockets {
    /// The network of the pod in `netns`.
    pub fn new(netns: PodNetns, orig_dst: Arc<OrigDstTable>, source: SourceAddress) -> Self {
        Self {
            netns,
            orig_dst,
            source,
        }
    }

    /// A socket inside the pod, marked as the agent's, not yet connected.
    fn plain_socket(&self, dst: SocketAddr) -> Result<tokio::net::TcpSocket, Error> {
        let socket = self.netns.run(|| -> io::Result<socket2::Socket> {
            let domain = socket2::Domain::for_address(dst);
            // Non-blocking from creation (no fcntl calls); TCP_NODELAY and keepalive come
            // with every connected socket's options (`MeshContext::socket_options`).
            let socket = socket2::Socket::new(domain, socket2::Type::STREAM.nonblocking(), None)?;
            set_agent_mark(&socket)?;
            Ok(socket)
        })?;
        let socket = socket.map_err(|source| Error::Connect { dst, source })?;
        Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
    }

    /// Connects to `dst` from `client` with a transparent socket. `Ok(Err(why))`: the kernel
    /// refused the socket or every address tried, or the connect timed out (the caller falls
    /// back); `Err`: the application's side failed, as any connect can.
    async fn connect_transparent(
        &self,
        client: ClientAddr,
        dst: SocketAddr,
    ) -> Result<Result<(TcpStream, Hold), String>, Error> {
        let ip = client.ip();
        let mut hold = Hold::default();
        let busy = match client {
            ClientAddr::Ip {
                busy: Some(port), ..
            } => {
                // The peer's own connection holds this pair of addresses on the agent's side
                // for as long as this one lives: no other of its connections picks it.
                let peer = (SocketAddr::new(ip, port), dst);
                lock(&self.source.plaintext_peers).insert(peer);
                hold.peer = Some((self.source.plaintext_peers.clone(), peer));
                Some(port)
            }
            _ => None,
        };
        let free = |port: u16| {
            Some(port) != busy
                && !lock(&self.source.plaintext_peers).contains(&(SocketAddr::new(ip, port), dst))
        };
        let mut port = match client {
            ClientAddr::Exact(addr) if addr.port() != 0 => addr.port(),
            _ => pick_port(free),
        };
        let mut last = String::new();
        for _ in 0..PORT_TRIES {
            let from = SocketAddr::new(ip, port);
            let socket = match self.netns.run(|| transparent_socket(dst.is_ipv6()))? {
                Ok(socket) => socket,
                Err(e) => return Ok(Err(format!("transparent socket refused: {e}"))),
            };
            if let Err(e) = socket.bind(&from.into()) {
                // The kernel refuses the address, or the port is taken: another port.
                last = format!("binding {from}: {e}");
                port = pick_port(free);
                continue;
            }
            let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
            if let Err(e) = self.source.dials.register(from, dst) {
                return Ok(Err(format!("AGENT_DIALS not updated: {e}")));
            }
            // Kept for the connection's life (see [`Hold`]); forgotten as soon as this attempt
            // fails or this future is dropped mid-connect (a drain deadline, say).
            let mut attempt = Hold {
                dial: Some((self.source.dials.clone(), from, dst)),
                peer: None,
            };
            match connect_with_timeout(socket, dst).await {
                Ok(stream) => {
                    hold.dial = attempt.dial.take();
                    return Ok(Ok((stream, hold)));
                }
                Err(Error::Connect { source, .. })
                    if matches!(
                        source.raw_os_error(),
                        Some(libc::EADDRINUSE | libc::EADDRNOTAVAIL)
                    ) =>
                {
                    drop(attempt);
                    // That address pair is in use (the same client reached this application
                    // through two services from one port): another port.
                    last = format!("connecting from {from}: {source}");
                    port = pick_port(free);
                }
                Err(Error::ConnectTimeout(_)) => {
                    // A connection to the application in its own namespace does not time out
                    // unless the replies went astray (the pod's routing changed since
                    // enrollment) or the application stopped accepting (its backlog is
                    // full): said, and retried from the pod's own address.
                    return Ok(Err(format!(
                        "the connection from {from} timed out (are the rule `fwmark 0x111/0xfff lookup 100` and table 100 still in the pod? or is the application's listen backlog full?)"
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Err(format!(
            "no usable source port after {PORT_TRIES} tries ({last})"
        )))
    }

    /// Counts a connection that could not carry its client's address, and warns once per
    /// pod with the reason.
    fn fell_back(&self, why: &str) {
        let (pod, namespace) = &self.source.pod;
        crate::metrics::global().source_address_fallback(pod, namespace);
        if !self.source.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(pod = %pod, namespace = %namespace, reason = %why, "the pod's application sees the pod's own address instead of its clients' (source-address preservation unavailable; counted in ztunnel_source_address_fallbacks_total)");
        }
    }
}

/// What a connection to the application from a client's address holds until it ends:
/// - its `AGENT_DIALS` entry: kept for the connection's life, not only until connect()
///   returns, because with SYN cookies the handshake's last ACK looks a listener up too; while
///   the connection lives its pair of addresses is taken, so no one else's SYN can match it;
/// - a plaintext peer's reservation of its pair of addresses (see `plaintext_peers`).
#[derive(Default)]
struct Hold {
    dial: Option<(Arc<DialTable>, SocketAddr, SocketAddr)>,
    peer: Option<(Arc<PeerSet>, (SocketAddr, SocketAddr))>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some((table, from, to)) = self.dial.take() {
            table.forget(from, to);
        }
        if let Some((peers, peer)) = self.peer.take() {
            lock(&peers).remove(&peer);
        }
    }
}

/// Live plaintext connections to the pod's application: (peer, application) address pairs.
pub type PeerSet = Mutex<HashSet<(SocketAddr, SocketAddr)>>;

fn lock(peers: &PeerSet) -> std::sync::MutexGuard<'_, HashSet<(SocketAddr, SocketAddr)>> {
    peers.lock().unwrap_or_else(|p| p.into_inner())
}

/// Connect attempts from different ports before falling back.
const PORT_TRIES: usize = 8;

/// A random port for a connection from a client's address, for which `free` holds: below
/// Linux's ephemeral range (32768 and up), so the client's own kernel, which picks its ports
/// from there, does not pick it for a new connection to the same application while this one
/// lives.
fn pick_port(free: impl Fn(u16) -> bool) -> u16 {
    const FIRST: u16 = 1024;
    const COUNT: u16 = 32768 - FIRST;
    let mut port = FIRST;
    for _ in 0..16 {
        let mut bytes = [0u8; 2];
        let _ = crate::tls::provider().secure_random.fill(&mut bytes);
        port = FIRST + u16::from_ne_bytes(bytes) % COUNT;
        if free(port) {
            break;
        }
    }
    port
}

impl PodSockets for InPodSockets {
    fn connect(&self, dst: SocketAddr) -> Connecting<'_> {
        Box::pin(async move { connect_with_timeout(self.plain_socket(dst)?, dst).await })
    }

    fn connect_from(&self, client: ClientAddr, dst: SocketAddr) -> ConnectingApp<'_> {
        Box::pin(async move {
            // A client of the other family, or the pod calling itself, is connected from the
            // pod's own address (as upstream does).
            let possible = client.ip().is_ipv6() == dst.is_ipv6()
                && !self.source.pod_ips.contains(&client.ip());
            match &self.source.state {
                SourceState::On if possible => match self.connect_transparent(client, dst).await? {
                    Ok((stream, hold)) => {
                        return Ok((stream, Some(Box::new(hold) as Box<dyn Send>)))
                    }
                    Err(why) => self.fell_back(&why),
                },
                SourceState::Refused(why) if possible => self.fell_back(why),
                _ => {}
            }
            Ok((
                connect_with_timeout(self.plain_socket(dst)?, dst).await?,
                None,
            ))
        })
    }

    fn udp_socket(&self, dst: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
        let socket = self
            .netns
            .run(|| -> io::Result<socket2::Socket> {
                let domain = socket2::Domain::for_address(dst);
                let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, None)?;
                set_agent_mark(&socket)?;
                socket.set_nonblocking(true)?;
                Ok(socket)
            })
            .map_err(io::Error::other)??;
        tokio::net::UdpSocket::from_std(socket.into())
    }

    fn original_dst(&self, stream: &TcpStream, peer: SocketAddr) -> OriginalDst {
        if let Some(dst) = self.orig_dst.take(self.netns.cookie(), peer) {
            return OriginalDst(dst);
        }
        if let Ok(dst) = so_original_dst(stream.as_fd(), peer.is_ipv6()) {
            return OriginalDst(dst);
        }
        OriginalDst(
            stream
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
        )
    }
}

/// Connects `socket` to `dst` within [`CONNECT_TIMEOUT`].
pub async fn connect_with_timeout(
    socket: tokio::net::TcpSocket,
    dst: SocketAddr,
) -> Result<TcpStream, Error> {
    match tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(Error::Connect { dst, source }),
        Err(_) => Err(Error::ConnectTimeout(dst)),
    }
}
