//! The per-pod listeners: 15001 (outbound, to HBONE or plain TCP), 15006 (inbound plaintext)
//! and 15008 (inbound HBONE), all inside the pod's network namespace.

pub mod connection;
pub mod copy;
pub mod hbone;
pub mod in_pod;
pub mod inbound_passthrough;
pub mod outbound;
pub mod splice;
pub mod tracker;

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use ztunnel_common::{HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use crate::accesslog::{Direction, Peer};
use crate::identity::manager::CertManager;
use crate::identity::Identity;
use crate::metrics::OpenSocket;
use crate::state::{MeshState, SharedState};
use connection::Classify;

/// Ports a captured connection may never target (a self-call would loop).
pub const ILLEGAL_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT];
/// How long an upstream connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a proxied connection failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Target is one of the agent's own ports.
    #[error("refused self-call to {0}: the destination is one of the agent's ports (15001, 15006, 15008)")]
    SelfCall(SocketAddr),
    /// Connect failed.
    #[error("connection to {dst} failed")]
    Connect {
        /// Destination.
        dst: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Connect timed out.
    #[error("connection to {0} timed out: is the destination up, or a NetworkPolicy dropping it?")]
    ConnectTimeout(SocketAddr),
    /// The pod's namespace could not be entered.
    #[error(transparent)]
    Netns(#[from] crate::netns::Error),
    /// A limit refused the connection.
    #[error(transparent)]
    Limit(#[from] LimitReached),
}

/// Bounds on what one pod can make the agent hold at once: hitting one refuses the new
/// connection (an access-log error naming the limit, `ztunnel_limit_refusals_total{limit}`)
/// and touches nothing else: other pods, and the pod's established connections, go on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections one pod's listeners hold at once, each way (15001 outbound; inbound: 15006
    /// connections, 15008 tunnels and every CONNECT stream in them, each of which holds a
    /// connection to the application).
    pub connections_per_pod: usize,
    /// TLS and HTTP/2 handshakes one peer address may have in progress on one pod's 15008
    /// (a peer that stalls its handshakes costs a bounded amount, and other peers go on).
    pub handshakes_per_peer: usize,
    /// How long a handshake on 15008 may take before the connection is dropped.
    pub handshake_timeout: Duration,
    /// Largest header block an HBONE CONNECT may carry, in bytes.
    pub max_header_bytes: u32,
    /// CONNECT streams one HBONE connection may have open at once (HTTP/2's
    /// SETTINGS_MAX_CONCURRENT_STREAMS: a client opening more gets REFUSED_STREAM).
    pub streams_per_connection: u32,
    /// CONNECT streams one peer address may have open on one pod at once, across all its
    /// HBONE connections.
    pub streams_per_peer: usize,
    /// CONNECT streams of one peer address on one pod whose connection to the application has
    /// waited more than 100 ms (an application that stops accepting holds them).
    pub pending_connects_per_peer: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            connections_per_pod: 32768,
            handshakes_per_peer: 64,
            handshake_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            streams_per_connection: 100,
            streams_per_peer: 16384,
            pending_connects_per_peer: 1024,
        }
    }
}

/// A limit that refused a connection.
#[derive(Debug, thiserror::Error)]
#[error("refused: pod {namespace}/{pod} already holds {value} {what} (limit {limit}; set with {setting})")]
pub struct LimitReached {
    /// The limit's name (the metric's `limit` label).
    pub limit: &'static str,
    /// What it counts.
    pub what: &'static str,
    /// Its value.
    pub value: usize,
    /// The setting that sets it.
    pub setting: &'static str,
    /// The pod.
    pub pod: String,
    /// Its namespace.
    pub namespace: String,
}

impl Classify for LimitReached {}

/// What one pod holds now, counted against [`Limits`].
#[derive(Debug, Default)]
pub struct PodLoad {
    /// Connections accepted on 15001.
    pub outbound: Arc<std::sync::atomic::AtomicUsize>,
    /// Connections accepted on 15006 and 15008, and the CONNECT streams in the latter.
    pub inbound: Arc<std::sync::atomic::AtomicUsize>,
    /// Handshakes in progress on 15008, by peer address.
    pub handshakes: PeerCounts,
    /// CONNECT streams open on 15008, by peer address.
    pub streams: PeerCounts,
    /// CONNECT streams still connecting to the application, by peer address.
    pub pending_connects: PeerCounts,
}

/// A count per peer address (see [`PeerSlot`]).
pub type PeerCounts = Arc<std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>>;

/// One unit of a peer's count in [`PeerCounts`], given back when dropped.
#[derive(Debug)]
pub struct PeerSlot {
    counts: PeerCounts,
    peer: IpAddr,
}

impl PeerSlot {
    /// Takes one unit of `peer`'s count if it holds fewer than `limit`.
    pub fn take(counts: &PeerCounts, peer: IpAddr, limit: usize) -> Option<PeerSlot> {
        let mut map = counts.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(peer).or_insert(0);
        if *n >= limit {
            return None;
        }
        *n += 1;
        Some(PeerSlot {
            counts: counts.clone(),
            peer,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.peer);
            }
        }
    }
}

/// What an accepted connection holds until its handler ends: its count in
/// `istio_tcp_sockets_open` and its unit of the pod's connection limit.
#[derive(Debug)]
pub struct Accepted {
    _socket: OpenSocket,
    _slot: Slot,
}

/// One unit of a [`PodLoad`] count, given back when dropped.
#[derive(Debug)]
pub struct Slot(Arc<std::sync::atomic::AtomicUsize>);

impl Slot {
    /// Takes one unit of `count` if fewer than `limit` are taken.
    pub fn take(count: &Arc<std::sync::atomic::AtomicUsize>, limit: usize) -> Option<Slot> {
        use std::sync::atomic::Ordering;
        // Never over the limit, not even for an instant (a concurrent take near the limit
        // would otherwise be refused by this one's passing increment).
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(count.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Classify for Error {}

/// Where a captured connection was meant to go (what the application dialled), as opposed
/// to the peer address of the accepted socket or the address the agent dials instead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OriginalDst(pub SocketAddr);

/// The client address a connection to the pod's application carries (source-address
/// preservation), as far as it is known and trusted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAddr {
    /// The client's exact address (HBONE: what the client's agent forwarded, verified
    /// against the peer's identity).
    Exact(SocketAddr),
    /// The client's address with a port of the agent's choosing, never `busy` (plaintext: the
    /// agent's own accepted socket holds the client's real port for the same address pair).
    Ip {
        /// The client's address.
        ip: IpAddr,
        /// A port that must not be used.
        busy: Option<u16>,
    },
}

impl ClientAddr {
    /// The client's address.
    pub fn ip(&self) -> IpAddr {
        match self {
            ClientAddr::Exact(addr) => addr.ip(),
            ClientAddr::Ip { ip, .. } => *ip,
        }
    }
}

/// What a connection to the pod's application holds for as long as it lives (kernel map
/// entries, reservations), released when dropped.
pub type Held = Option<Box<dyn Send>>;

/// A connection to the pod's application being opened, with what it holds.
pub type ConnectingApp<'a> =
    Pin<Box<dyn Future<Output = Result<(TcpStream, Held), Error>> + Send + 'a>>;

/// A connection being opened (boxed: [`PodSockets`] is used as a trait object).
pub type Connecting<'a> = Pin<Box<dyn Future<Output = Result<TcpStream, Error>> + Send + 'a>>;

/// How a pod's proxy opens sockets. In the agent: sockets opened inside the pod's
/// network namespace and original destinations from the eBPF map ([`in_pod::InPodSockets`]);
/// in tests: plain loopback sockets, so the handlers run in-process without root.
pub trait PodSockets: Send + Sync {
    /// Opens a TCP connection to `dst` as the pod, never captured again by the agent.
    fn connect(&self, dst: SocketAddr) -> Connecting<'_>;

    /// Opens a TCP connection to the pod's application at `dst` that the application sees
    /// coming from `client`; by default (and wherever the kernel refuses) from the pod's own
    /// address, as [`Self::connect`].
    fn connect_from(&self, client: ClientAddr, dst: SocketAddr) -> ConnectingApp<'_> {
        let _ = client;
        Box::pin(async move { Ok((self.connect(dst).await?, None)) })
    }

    /// Where an outbound connection accepted on 15001 from `peer` was meant to go.
    fn original_dst(&self, stream: &TcpStream, peer: SocketAddr) -> OriginalDst;

    /// Where an inbound plaintext connection accepted on 15006 was meant to go: the accepted
    /// socket's local address (`sk_lookup` steers without rewriting it).
    fn inbound_dst(&self, stream: &TcpStream) -> io::Result<OriginalDst> {
        stream.local_addr().map(OriginalDst)
    }

    /// A UDP socket for talking to `dst` as the pod (the DNS proxy's forwarder); by default
    /// unbound, in the agent's own namespace.
    fn udp_socket(&self, dst: SocketAddr) -> io::Result<tokio::net::UdpSocket> {
        let any: SocketAddr = if dst.is_ipv6() {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        } else {
            (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
        };
        let socket = std::net::UdpSocket::bind(any)?;
        socket.set_nonblocking(true)?;
        tokio::net::UdpSocket::from_std(socket)
    }
}

/// What every pod's proxy shares: the mesh state, certificates and the HBONE pool.
#[derive(Debug)]
pub struct MeshContext {
    /// Workloads, services, policies.
    pub state: SharedState,
    /// Certificates by identity.
    pub certs: Arc<CertManager>,
    /// HBONE connections.
    pub pool: Arc<hbone::Pool>,
    /// Live inbound connections (late policy rejection).
    pub tracker: Arc<tracker::Tracker>,
    /// The agent's drain signals and live-connection count.
    pub drain: crate::drain::Drain,
    /// TCP keepalive on every accepted and dialled socket (None: off).
    pub keepalive: Option<crate::socket::Keepalive>,
    /// What one pod can make the agent hold.
    pub limits: Limits,
    /// The kernel relay of plain passthrough connections (None: off, or refused by the
    /// kernel; the agent splices them).
    pub kernel_relay: Option<Arc<crate::redirect::KernelRelay>>,
}

impl MeshContext {
    /// Sets the options every socket the agent opens gets (see
    /// [`crate::socket::connection_options`]). Accepted sockets have them from their
    /// listener.
    pub fn socket_options(&self, stream: &TcpStream) {
        if let Err(e) = crate::socket::connection_options(stream, self.keepalive.as_ref()) {
            tracing::debug!(error = %e, "TCP_NODELAY or keepalive not set");
        }
    }

    /// Installs a new mesh state from any source (local file, xDS) and closes the live
    /// connections its policies now deny (late rejection).
    pub fn apply_state(&self, next: crate::state::MeshState) {
        self.state.replace(next);
        let closed = self.tracker.reevaluate(&self.state.snapshot());
        if closed > 0 {
            tracing::info!(closed, "connections closed by the changed policies");
        }
    }
}

/// The pod a listener serves.
pub struct PodProxy {
    /// Pod uid (the workload key in the mesh state).
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Pod namespace.
    pub namespace: String,
    /// The pod's identity.
    pub identity: Identity,
    /// The pod's network.
    pub network: String,
    /// Pod addresses.
    pub ips: Vec<IpAddr>,
    /// How the pod's connections are opened and its original destinations found.
    pub sockets: Arc<dyn PodSockets>,
    /// Shared mesh context.
    pub mesh: Arc<MeshContext>,
    /// TLS server for 15008 with the pod's certificate.
    pub hbone_tls: tokio_rustls::TlsAcceptor,
    /// What it holds now, against [`MeshContext::limits`].
    pub load: PodLoad,
}

impl std::fmt::Debug for PodProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PodProxy({}/{})", self.namespace, self.name)
    }
}

impl PodProxy {
    /// Opens a TCP connection to `dst` as the pod (see [`PodSockets::connect`]).
    pub async fn connect(&self, dst: SocketAddr) -> Result<TcpStream, Error> {
        let stream = self.sockets.connect(dst).await?;
        self.mesh.socket_options(&stream);
        Ok(stream)
    }

    /// Opens a TCP connection to the pod's application that it sees coming from `client`
    /// (see [`PodSockets::connect_from`]).
    /// Keep what it holds for as long as the connection lives.
    pub async fn connect_from(
        &self,
        client: ClientAddr,
        dst: SocketAddr,
    ) -> Result<(TcpStream, Held), Error> {
        let (stream, held) = self.sockets.connect_from(client, dst).await?;
        self.mesh.socket_options(&stream);
        Ok((stream, held))
    }

    /// A limit this pod reached: counted (`ztunnel_limit_refusals_total{limit}`) and
    /// described for the access log.
    pub fn limit_reached(
        &self,
        limit: &'static str,
        what: &'static str,
        value: usize,
        setting: &'static str,
    ) -> LimitReached {
        crate::metrics::global().limit_refusal(limit);
        LimitReached {
            limit,
            what,
            value,
            setting,
            pod: self.name.clone(),
            namespace: self.namespace.clone(),
        }
    }

    /// This pod's workload in `mesh` (by uid, else by namespace and name: istio-cni names
    /// pods by Kubernetes UID, xDS by `<cluster>//Pod/<ns>/<name>`).
    pub fn workload(&self, mesh: &MeshState) -> Option<Arc<crate::state::workload::Workload>> {
        mesh.pod_workload(&self.uid, &self.namespace, &self.name)
    }

    /// This pod as the access log names it.
    pub fn as_peer(&self, mesh: &MeshState, identity: Option<Identity>) -> Peer {
        Peer {
            workload: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
            identity,
            detail: self.workload(mesh),
        }
    }

    /// Checks L4 authorization for a connection to this pod, whose workload (looked up once
    /// per connection, see [`PodProxy::workload`]) is `workload`.
    pub fn authorize(
        &self,
        mesh: &MeshState,
        workload: Option<&crate::state::workload::Workload>,
        conn: &crate::authz::Connection<'_>,
    ) -> Result<(), crate::authz::Denied> {
        crate::authz::check(mesh, &self.policy_subject(workload), conn)
    }

    /// The workload policies are selected for: this pod's, or, for a pod the mesh state does
    /// not know (yet), one with its name and namespace (its namespace still selects).
    pub fn policy_subject<'a>(
        &self,
        workload: Option<&'a crate::state::workload::Workload>,
    ) -> std::borrow::Cow<'a, crate::state::workload::Workload> {
        match workload {
            Some(w) => std::borrow::Cow::Borrowed(w),
            None => std::borrow::Cow::Owned(crate::state::workload::Workload {
                name: self.name.clone(),
                namespace: self.namespace.clone(),
                ..Default::default()
            }),
        }
    }

    /// This pod as routing sees it (its locality for load balancing, and whether it is a
    /// waypoint): its workload, or, unknown to the mesh state yet, one with its name,
    /// namespace and network.
    pub fn routing_workload(&self, mesh: &MeshState) -> Arc<crate::state::workload::Workload> {
        self.workload(mesh).unwrap_or_else(|| {
            Arc::new(crate::state::workload::Workload {
                name: self.name.clone(),
                namespace: self.namespace.clone(),
                network: self.network.clone(),
                ..Default::default()
            })
        })
    }

    /// The hostname of a service `workload` (this pod's) backs on `target_port`.
    pub fn service_of(
        workload: Option<&crate::state::workload::Workload>,
        target_port: u16,
    ) -> Option<String> {
        let workload = workload?;
        workload.services.iter().find_map(|(key, ports)| {
            ports.values().any(|p| *p == target_port).then(|| {
                key.split_once('/')
                    .map_or(key.as_str(), |(_, h)| h)
                    .to_string()
            })
        })
    }
}

/// Makes closing `stream` send a RST instead of a FIN (`SO_LINGER` 0): for a relay that
/// ended in error, so the failure reaches the application on that side and no socket is left
/// in FIN_WAIT2 or CLOSE_WAIT.
pub fn reset_on_close(stream: &impl std::os::fd::AsFd) {
    if let Err(e) = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        tracing::debug!(error = %e, "SO_LINGER not set");
    }
}

/// Accepts on `listener` (best made by `enroll`, whose sockets have the connection options
/// from the start) until `cancel` (the pod leaves) or the agent begins draining,
/// handing each accepted socket to `handle`, which runs as its own task, counted as live
/// for the drain (the handlers create a [`connection::Connection`] per connection, and the
/// HBONE server one per CONNECT stream). Each accepted socket is counted in
/// `istio_tcp_sockets_open` under `reporter` (outbound: source; inbound: destination), and
/// in the pod's connection limit, for as long as its handler holds the [`Accepted`].
/// Returning closes the listener.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    pod: Arc<PodProxy>,
    cancel: CancellationToken,
    reporter: Direction,
    handle: F,
) where
    F: Fn(Arc<PodProxy>, TcpStream, SocketAddr, Accepted) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let drain = pod.mesh.drain.clone();
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = drain.started() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let count = match reporter {
                        Direction::Outbound => &pod.load.outbound,
                        Direction::Inbound => &pod.load.inbound,
                    };
                    let Some(slot) = Slot::take(count, pod.mesh.limits.connections_per_pod) else {
                        refuse_over_limit(&pod, stream, peer, reporter);
                        continue;
                    };
                    // TCP_NODELAY and keepalive: set on the listener before it listened
                    // (`enroll`), so the accepted socket has them already, unless another
                    // listener made it (during an upgrade, the connections queued on an
                    // older agent's listener move to this one when it closes) or the
                    // listener refused them. One getsockopt tells.
                    if !socket2::SockRef::from(&stream).nodelay().unwrap_or(false) {
                        pod.mesh.socket_options(&stream);
                    }
                    let accepted = Accepted {
                        _socket: crate::metrics::global().socket_opened(reporter),
                        _slot: slot,
                    };
                    // The handler's future spawned as it is: wrapped in an `async` block,
                    // it would be stored twice (as captured and as awaited), in every
                    // connection's task.
                    tokio::spawn(drain.track(handle(pod.clone(), stream, peer, accepted)));
                }
                // The socket stopped listening (shut down behind the agent's back, or its
                // namespace torn down): accepting again would fail forever.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    let addr = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
                    tracing::error!(
                        pod = %pod.name,
                        namespace = %pod.namespace,
                        listener = %addr,
                        error = %e,
                        "listener closed: this pod's connections on the port fail until it is re-enrolled; `ztunnel-agent diagnose {}/{}` shows it",
                        pod.namespace,
                        pod.name
                    );
                    return;
                }
                Err(e) => {
                    // Out of descriptors (EMFILE, ENFILE) or memory: the connection stays in
                    // the kernel's queue; back off so the loop never spins, and try again
                    // (it recovers as soon as descriptors free up).
                    accept_failed(&pod, &listener, &e);
                    tokio::select! {
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                        _ = cancel.cancelled() => return,
                        _ = drain.started() => return,
                    }
                }
            }
        }
    }
}

/// Refuses a connection over [`Limits::connections_per_pod`]: reset at once, a (rate-limited)
/// access-log error naming the limit, and the limit's counter.
fn refuse_over_limit(pod: &PodProxy, stream: TcpStream, peer: SocketAddr, reporter: Direction) {
    let local = match reporter {
        // Taken (not left to the map's LRU), and logged as where the pod meant to go.
        Direction::Outbound => pod.sockets.original_dst(&stream, peer).0,
        Direction::Inbound => stream
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0))),
    };
    reset_on_close(&stream);
    drop(stream);
    let what = match reporter {
        Direction::Outbound => "outbound connections",
        Direction::Inbound => "inbound connections",
    };
    let reached = pod.limit_reached(
        "connections_per_pod",
        what,
        pod.mesh.limits.connections_per_pod,
        "ZTUNNEL_MAX_CONNECTIONS_PER_POD",
    );
    let mut conn = connection::Connection::new(reporter, peer, local);
    // The reporting pod is the source outbound, the destination inbound.
    let me = pod.as_peer(&pod.mesh.state.snapshot(), None);
    match reporter {
        Direction::Outbound => conn.record.src = me,
        Direction::Inbound => conn.record.dst = me,
    }
    // Rate-limited like refusals before authentication: a flood past a limit is one too.
    conn.finish_rate_limited(Error::from(reached).into());
}

/// Wait after a failed accept before the next try.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one log line per this interval for failed accepts (a flood of EMFILE would
/// otherwise write thousands of lines a second).
const ACCEPT_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Counts a failed accept and logs it at most once per [`ACCEPT_LOG_INTERVAL`], with how
/// many were not logged since the last line.
fn accept_failed(pod: &PodProxy, listener: &TcpListener, e: &io::Error) {
    static LAST: std::sync::Mutex<Option<(std::time::Instant, u64)>> = std::sync::Mutex::new(None);
    let reason = match e.raw_os_error() {
        Some(libc::EMFILE) => "EMFILE",
        Some(libc::ENFILE) => "ENFILE",
        Some(libc::ENOBUFS) | Some(libc::ENOMEM) => "ENOMEM",
        _ => "other",
    };
    crate::metrics::global().accept_failed(reason);
    let now = std::time::Instant::now();
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    let suppressed = match &mut *last {
        Some((at, suppressed)) if now.duration_since(*at) < ACCEPT_LOG_INTERVAL => {
            *suppressed += 1;
            return;
        }
        Some((_, suppressed)) => *suppressed,
        None => 0,
    };
    *last = Some((now, 0));
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let hint = match reason {
        "EMFILE" => ": the agent is out of file descriptors (see process_open_fds and process_max_fds; raise the limit or find the pod holding them)",
        "ENFILE" => ": the node is out of file descriptors (fs.file-max)",
        _ => "",
    };
    tracing::error!(
        pod = %pod.name,
        namespace = %pod.namespace,
        listener = %addr,
        error = %e,
        suppressed,
        "accept failed{hint}; new connections wait in the kernel's queue (retrying every {ACCEPT_BACKOFF:?}; `suppressed` counts the failures not logged since the last line)"
    );
}
