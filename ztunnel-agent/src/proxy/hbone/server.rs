//! The 15008 server in each pod: TLS with the pod's certificate, client certificate
//! required; each CONNECT stream is one inbound connection.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use tokio::net::TcpStream;
use tracing::Instrument;

use super::*;
use crate::accesslog::{Direction, Peer};
use crate::identity::Identity;
use crate::proxy::connection::{Connection, ConnectionError};
use crate::proxy::{Accepted, PodProxy, ILLEGAL_PORTS};
use crate::state::workload::Workload;
use crate::state::MeshState;
use crate::telemetry::ErrorChain;

/// Serves one connection accepted on a pod's 15008.
/// `_accepted` keeps it counted in `istio_tcp_sockets_open` and in the pod's connection limit
/// until this returns.
pub async fn serve(pod: Arc<PodProxy>, stream: TcpStream, peer: SocketAddr, _accepted: Accepted) {
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    // A connection that fails before any CONNECT is logged as one inbound connection, timed
    // from its accept; before the peer is authenticated, its line is rate-limited.
    let started = std::time::Instant::now();
    let end = |e: Error, authenticated: bool| {
        let mut conn = Connection::new(Direction::Inbound, peer, local);
        conn.record.started = started;
        conn.record.dst = pod.as_peer(&pod.mesh.state.snapshot(), None);
        if authenticated {
            conn.finish(Err(e.into()));
        } else {
            conn.finish_rate_limited(e.into());
        }
    };
    let limits = pod.mesh.limits;
    // One deadline for the TLS and the HTTP/2 handshakes together, as the setting says.
    let handshake_deadline = tokio::time::Instant::from_std(started) + limits.handshake_timeout;
    let Some(handshaking) =
        crate::proxy::PeerSlot::take(&pod.load.handshakes, peer.ip(), limits.handshakes_per_peer)
    else {
        crate::proxy::reset_on_close(&stream);
        drop(stream);
        let reached = pod.limit_reached(
            "handshakes_per_peer",
            "handshakes in progress from this peer",
            limits.handshakes_per_peer,
            "ZTUNNEL_MAX_HANDSHAKES_PER_PEER",
        );
        return end(Error::Connect(reached.into()), false);
    };
    let accepted = tokio::time::timeout_at(handshake_deadline, pod.hbone_tls.accept(stream)).await;
    let tls = match accepted {
        Ok(Ok(tls)) => tls,
        Ok(Err(source)) => return end(Error::Tls { peer, source }, false),
        Err(_) => return end(Error::HandshakeTimeout(peer), false),
    };
    let client_identity = match crate::tls::peer_identity(
        tls.get_ref().1.peer_certificates(),
        pod.mesh.certs.trust_domain(),
    ) {
        Ok(id) => id,
        // The chain verified: a peer of the mesh's roots, logged in full.
        Err(e) => return end(Error::PeerIdentity(e), true),
    };
    let fail = |e: Error| end(e, true);
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(limits.streams_per_connection)
        .max_header_list_size(limits.max_header_bytes)
        .handshake::<_, Bytes>(tls);
    let mut conn = match tokio::time::timeout_at(handshake_deadline, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(source)) => return fail(Error::H2 { peer, source }),
        Err(_) => return fail(Error::HandshakeTimeout(peer)),
    };
    drop(handshaking);
    let mut keepalive = std::pin::pin!(keepalive(conn.ping_pong()));
    let drain = pod.mesh.drain.clone();
    let mut draining = false;
    loop {
        tokio::select! {
            accepted = conn.accept() => match accepted {
                Some(Ok((req, respond))) => {
                    tokio::spawn(drain.track(handle_connect(Box::new(Stream {
                        pod: pod.clone(),
                        peer,
                        local: local.ip(),
                        client: client_identity.clone(),
                        req,
                        answer: respond,
                    }))));
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
            // Draining: GOAWAY tells the client to open no new stream here (its pool opens
            // a new connection, which the kernel gives to the next agent's listener); the
            // streams already open run on, and `accept` ends once they have.
            _ = drain.started(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
            // The drain is over (past the deadline and its grace): whatever is left goes.
            _ = drain.closed() => return,
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
    /// Refused by a limit (its line is rate-limited: a flood past a limit is one too).
    by_limit: bool,
}

impl Refusal {
    fn new(status: StatusCode, error: impl Into<ConnectionError>) -> Self {
        Self {
            status,
            error: error.into(),
            by_limit: false,
        }
    }

    /// A limit of `pod` was reached: 503, counted under the limit's name.
    fn limit(
        pod: &PodProxy,
        limit: &'static str,
        what: &'static str,
        value: usize,
        setting: &'static str,
    ) -> Self {
        let reached = pod.limit_reached(limit, what, value, setting);
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: crate::proxy::Error::from(reached).into(),
            by_limit: true,
        }
    }
}

/// How long a CONNECT's connection to the application may take before the stream counts as
/// pending ([`crate::proxy::Limits::pending_connects_per_peer`]).
const PENDING_AFTER: std::time::Duration = std::time::Duration::from_millis(100);

/// What an accepted CONNECT stream holds against its pod's limits until it ends.
struct StreamSlots {
    _peer: crate::proxy::PeerSlot,
    _pod: crate::proxy::Slot,
}

/// Takes one stream of `peer` ([`crate::proxy::Limits::streams_per_peer`]) and one of the
/// pod's inbound connections (each stream holds a connection to the application).
fn take_stream_slots(pod: &PodProxy, peer: IpAddr) -> Result<StreamSlots, Refusal> {
    let limits = pod.mesh.limits;
    let Some(per_peer) =
        crate::proxy::PeerSlot::take(&pod.load.streams, peer, limits.streams_per_peer)
    else {
        return Err(Refusal::limit(
            pod,
            "streams_per_peer",
            "HBONE streams from this peer",
            limits.streams_per_peer,
            "ZTUNNEL_HBONE_MAX_STREAMS_PER_PEER",
        ));
    };
    let Some(per_pod) = crate::proxy::Slot::take(&pod.load.inbound, limits.connections_per_pod)
    else {
        return Err(Refusal::limit(
            pod,
            "connections_per_pod",
            "inbound connections",
            limits.connections_per_pod,
            "ZTUNNEL_MAX_CONNECTIONS_PER_POD",
        ));
    };
    Ok(StreamSlots {
        _peer: per_peer,
        _pod: per_pod,
    })
}

/// Where a CONNECT for `authority`, accepted on this pod's `local` address, goes (upstream's
/// inbound checks): the authority itself when it is one of the pod's addresses; on a pod that
/// is a waypoint (the "sandwich"), the pod's own address at the authority's port when the
/// authority is a service VIP or a workload address whose waypoint is this pod. Anything else
/// is refused: a peer cannot use a pod's 15008 to reach another destination.
pub fn inbound_target(
    mesh: &MeshState,
    network: &str,
    pod_ips: &[IpAddr],
    local: IpAddr,
    workload: Option<&Workload>,
    authority: SocketAddr,
) -> Option<SocketAddr> {
    if pod_ips.contains(&authority.ip()) {
        return Some(authority);
    }
    if !pod_ips.contains(&local) {
        return None;
    }
    let me = workload?;
    let waypoint = match mesh.service_by_vip(network, authority.ip()) {
        Some(entry) => entry.service.waypoint.clone(),
        None => mesh
            .workload_by_ip(network, authority.ip())?
            .waypoint
            .clone(),
    }?;
    // `local` is one of this pod's addresses (checked above): the waypoint must include
    // this pod's workload.
    let key = me.key();
    let this_pod = crate::proxy::outbound::waypoint_has(mesh, &waypoint, |w| w.key() == key);
    this_pod.then(|| SocketAddr::new(local, authority.port()))
}

/// A CONNECT stream as accepted: the tunnel's pod, peer and local address, the peer's
/// identity, the request and its answer.
struct Stream {
    pod: Arc<PodProxy>,
    peer: SocketAddr,
    local: IpAddr,
    client: Identity,
    req: Request<RecvStream>,
    answer: SendResponse<Bytes>,
}

/// Serves one CONNECT stream: one inbound connection.
///
/// The stream stays boxed while the CONNECT is checked and the application connected, and
/// is unpacked only for the relay: this future is the task's memory for as long as the
/// connection lives, and the request (its headers) is not needed once connected.
async fn handle_connect(mut stream: Box<Stream>) {
    let authority = stream.req.uri().authority().map(|a| a.as_str().to_string());
    let target: Option<SocketAddr> = authority.as_deref().and_then(|a| a.parse().ok());
    // src.addr is the tunnel's peer, as upstream (and the guide) report it.
    let peer = stream.peer;
    let mut conn = Connection::new(Direction::Inbound, peer, target.unwrap_or(peer));
    let span = conn.span();
    // Moved out, an empty identity left in its place: the box keeps the rest until connected.
    let client = std::mem::replace(
        &mut stream.client,
        Identity {
            trust_domain: String::new(),
            namespace: String::new(),
            service_account: String::new(),
        },
    );
    // Boxed: connecting to the application is the largest state of this future, and the
    // task holding it lives as long as the connection; boxed, that memory is freed once the
    // application is connected.
    let accepting = Box::pin(accept_connect(
        &stream.pod,
        stream.local,
        client,
        &stream.req,
        authority,
        target,
        &mut conn,
    ));
    let answer = &mut stream.answer;
    // A client that resets the stream while the application is being connected gives its
    // slots back at once (not after the connect's timeout).
    let accepted = tokio::select! {
        accepted = accepting.instrument(span.clone()) => accepted,
        reset = std::future::poll_fn(|cx| answer.poll_reset(cx)) => {
            let reason = reset.unwrap_or(h2::Reason::CANCEL);
            return conn.finish(Err(Error::Cancelled(reason).into()));
        }
    };
    let (app, _held, _slots, target) = match accepted {
        Ok(accepted) => accepted,
        Err(refusal) => {
            // Logged before the answer, so the line exists once the client sees the status.
            if refusal.by_limit {
                conn.finish_rate_limited(refusal.error);
            } else {
                conn.finish(Err(refusal.error));
            }
            return refuse(answer, refusal.status);
        }
    };
    // Unpacked in a block of its own, so the box is freed here, not when the connection ends.
    let (pod, req, answer) = {
        let boxed = stream;
        let Stream {
            pod, req, answer, ..
        } = *boxed;
        (pod, req, answer)
    };
    // Inline (not a helper taking the future): measured, boxing this relay saves nothing
    // here (the task is as large either way), unlike the outbound one.
    let result = tokio::select! {
        biased;
        result = relay(&pod, peer, answer, req.into_body(), app, target, &mut conn).instrument(span) => result,
        reached = pod.mesh.drain.overdue() => Err(reached.into()),
    };
    conn.finish(result);
}

/// Answers 200 to an accepted CONNECT and relays until either side ends, a policy change
/// revokes it, or the drain deadline passes.
async fn relay(
    pod: &Arc<PodProxy>,
    peer: SocketAddr,
    mut answer: SendResponse<Bytes>,
    body: RecvStream,
    mut app: TcpStream,
    target: SocketAddr,
    conn: &mut Connection,
) -> Result<(), ConnectionError> {
    let send =
        respond(&mut answer, StatusCode::OK, false).map_err(|source| Error::H2 { peer, source })?;
    conn.established();
    let tracked = pod.mesh.tracker.track(
        pod.clone(),
        peer.ip(),
        conn.record.src.identity.clone(),
        target,
    );
    // Inbound: the reporting side sends what the application answers.
    let deadline = pod.mesh.drain.deadline_reached();
    let relayed = tokio::select! {
        relayed = crate::proxy::copy::tunnel(&mut app, send, body, &conn.sent, &conn.received, deadline) => relayed.map_err(ConnectionError::from),
        denied = tracked.revoked() => Err(denied.into()),
    };
    if relayed.is_err() {
        crate::proxy::reset_on_close(&app);
    }
    relayed
}

/// Checks a CONNECT (limits, method, authority, self-call, policy) and connects to the
/// application; returns the application's socket, what it holds, and its address.
async fn accept_connect(
    pod: &Arc<PodProxy>,
    local: IpAddr,
    client: Identity,
    req: &Request<RecvStream>,
    authority: Option<String>,
    target: Option<SocketAddr>,
    conn: &mut Connection,
) -> Result<(TcpStream, crate::proxy::Held, StreamSlots, SocketAddr), Refusal> {
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
    let workload = conn.record.dst.detail.clone();
    let inbound = target
        .and_then(|t| inbound_target(&mesh, &pod.network, &pod.ips, local, workload.as_deref(), t));
    let Some(target) = inbound else {
        let e = Error::WrongAuthority {
            authority: authority.unwrap_or_default(),
            pod: pod.name.clone(),
        };
        return Err(Refusal::new(StatusCode::BAD_REQUEST, e));
    };
    conn.record.dst_addr = target;
    if Some(target) != conn.record.dst_hbone_addr {
        // A sandwiched waypoint: the service is the one the authority names.
        conn.record.dst_service = conn
            .record
            .dst_hbone_addr
            .and_then(|a| mesh.service_by_vip(&pod.network, a.ip()))
            .map(|s| s.service.hostname.clone());
    }
    if ILLEGAL_PORTS.contains(&target.port()) {
        let e = crate::proxy::Error::SelfCall(target);
        return Err(Refusal::new(StatusCode::BAD_REQUEST, e));
    }
    let authz = crate::authz::Connection {
        src: peer.ip(),
        identity: conn.record.src.identity.as_ref(),
        dst: target,
    };
    pod.authorize(&mesh, conn.record.dst.detail.as_deref(), &authz)
        .map_err(|denied| Refusal::new(StatusCode::UNAUTHORIZED, denied))?;
    let forwarded = req
        .headers()
        .get("forwarded")
        .and_then(|v| v.to_str().ok())
        .and_then(forwarded_for);
    let client = client_addr(
        &mesh,
        &pod.network,
        peer,
        conn.record.src.identity.as_ref(),
        forwarded,
    );
    let slots = take_stream_slots(pod, peer.ip())?;
    // A connect that is not done within PENDING_AFTER waits on an application that is not
    // accepting: only then is it counted against the peer's pending limit (so a burst of
    // CONNECTs to a healthy application is never refused), and past the limit it is dropped.
    let mut connecting = std::pin::pin!(pod.connect_from(client, target));
    let connected = match tokio::time::timeout(PENDING_AFTER, &mut connecting).await {
        Ok(connected) => connected,
        Err(_) => {
            let limit = pod.mesh.limits.pending_connects_per_peer;
            let Some(_pending) =
                crate::proxy::PeerSlot::take(&pod.load.pending_connects, peer.ip(), limit)
            else {
                return Err(Refusal::limit(
                    pod,
                    "pending_connects_per_peer",
                    "HBONE streams from this peer waiting for the application",
                    limit,
                    "ZTUNNEL_HBONE_MAX_PENDING_CONNECTS_PER_PEER",
                ));
            };
            connecting.await
        }
    };
    let (app, held) = connected.map_err(|e| Refusal::new(StatusCode::SERVICE_UNAVAILABLE, e))?;
    Ok((app, held, slots, target))
}

/// The client address the application sees: the one the client's agent forwarded when it
/// is the tunnel's peer address or an address of a workload with the peer's identity (a peer
/// may speak only for workloads with its own identity); otherwise the tunnel peer's address with a port of
/// the agent's choosing (a waypoint's or gateway's tunnel: upstream's choice too).
pub fn client_addr(
    mesh: &MeshState,
    network: &str,
    peer: SocketAddr,
    identity: Option<&Identity>,
    forwarded: Option<SocketAddr>,
) -> crate::proxy::ClientAddr {
    use crate::proxy::ClientAddr;
    // An address no client can have (loopback, unspecified, multicast, link-local) is never
    // taken from the header.
    let usable = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => {
            !(v4.is_loopback() || v4.is_unspecified() || v4.is_multicast() || v4.is_link_local())
        }
        IpAddr::V6(v6) => {
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unicast_link_local())
        }
    };
    let forwarded = forwarded
        .map(|f| SocketAddr::new(f.ip().to_canonical(), f.port()))
        .filter(|f| usable(f.ip()));
    let trusted = forwarded.filter(|f| {
        f.ip() == peer.ip()
            || identity.is_some_and(|id| {
                mesh.workload_by_ip(network, f.ip())
                    .is_some_and(|w| w.identity() == *id)
            })
    });
    match trusted {
        Some(addr) => ClientAddr::Exact(addr),
        None => ClientAddr::Ip {
            ip: peer.ip(),
            busy: None,
        },
    }
}

/// The first `for=` of a `forwarded` header (RFC 7239): `for="10.0.0.1:4000"`,
/// `for="[fd00::1]:4000"`, or an address without a port (port 0).
pub fn forwarded_for(value: &str) -> Option<SocketAddr> {
    let first = value.split(',').next()?;
    let node = first.split(';').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("for")
            .then(|| value.trim().trim_matches('"'))
    })?;
    if let Ok(addr) = node.parse::<SocketAddr>() {
        return Some(addr);
    }
    let bare = node.trim_start_matches('[').trim_end_matches(']');
    bare.parse::<IpAddr>().ok().map(|ip| SocketAddr::new(ip, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_reads_the_first_node_in_each_spelling() {
        let cases: &[(&str, Option<&str>)] = &[
            (r#"for="10.0.0.1:4000""#, Some("10.0.0.1:4000")),
            (r#"for="[fd00::1]:4000""#, Some("[fd00::1]:4000")),
            (
                r#"for="10.0.0.1:4000";host=reviews.default.svc.cluster.local"#,
                Some("10.0.0.1:4000"),
            ),
            (
                r#"by=x; For="10.0.0.1:4000", for="10.9.9.9:1""#,
                Some("10.0.0.1:4000"),
            ),
            ("for=10.0.0.1", Some("10.0.0.1:0")),
            (r#"for="[fd00::1]""#, Some("[fd00::1]:0")),
            ("for=unknown", None),
            (r#"for="_hidden""#, None),
            ("host=example.com", None),
            ("", None),
        ];
        for (header, want) in cases {
            let want = want.map(|w| w.parse::<SocketAddr>().expect("addr"));
            assert_eq!(forwarded_for(header), want, "{header}");
        }
    }

    /// The forwarded address is used only when the peer may speak for it.
    #[test]
    fn the_forwarded_client_is_trusted_only_from_its_own_identity() {
        use crate::proxy::ClientAddr;
        let mesh = state("none", WAYPOINT);
        let client_id = mesh
            .workload_by_ip("", CLIENT.parse().expect("ip"))
            .expect("workload")
            .identity();
        // The fixture's pods share the default service account; the waypoint's own.
        let waypoint_id = Identity {
            service_account: "waypoint".to_string(),
            ..client_id.clone()
        };
        let at = |ip: &str, port| SocketAddr::new(ip.parse().expect("ip"), port);
        // The client's agent: its own pod's address, as forwarded, port included.
        let got = client_addr(
            &mesh,
            "",
            at(CLIENT, 55000),
            Some(&client_id),
            Some(at(CLIENT, 40000)),
        );
        assert_eq!(got, ClientAddr::Exact(at(CLIENT, 40000)));
        // Another address of a workload with the peer's identity.
        let got = client_addr(
            &mesh,
            "",
            at("10.1.1.1", 55000),
            Some(&client_id),
            Some(at(CLIENT, 40000)),
        );
        assert_eq!(got, ClientAddr::Exact(at(CLIENT, 40000)));
        // A waypoint forwarding the client's address: not its to speak for; its own.
        let got = client_addr(
            &mesh,
            "",
            at(WAYPOINT, 55000),
            Some(&waypoint_id),
            Some(at(CLIENT, 40000)),
        );
        assert_eq!(
            got,
            ClientAddr::Ip {
                ip: WAYPOINT.parse().expect("ip"),
                busy: None
            }
        );
        // Nothing forwarded, or an unknown address.
        let got = client_addr(&mesh, "", at(CLIENT, 55000), Some(&client_id), None);
        assert_eq!(
            got,
            ClientAddr::Ip {
                ip: CLIENT.parse().expect("ip"),
                busy: None
            }
        );
        let got = client_addr(
            &mesh,
            "",
            at(CLIENT, 55000),
            Some(&client_id),
            Some(at("10.7.7.7", 1)),
        );
        assert_eq!(
            got,
            ClientAddr::Ip {
                ip: CLIENT.parse().expect("ip"),
                busy: None
            }
        );
    }

    const CLIENT: &str = "10.0.0.1";
    const SERVER: &str = "10.0.0.2";
    const SERVER_VIP: &str = "10.96.0.2";
    const WAYPOINT: &str = "10.0.0.3";
    const WAYPOINT_VIP: &str = "10.96.0.3";

    /// Upstream's inbound test state: a client, a server behind `server`, and a waypoint pod
    /// behind `waypoint`; `attach` attaches the waypoint, given `by` pod address, VIP or
    /// `namespace/hostname`, to the server's workload (`workload`) or service (`service`).
    fn state(attach: &str, by: &str) -> MeshState {
        let by = if by.contains('/') {
            by.to_string()
        } else {
            format!("/{by}")
        };
        let wp = format!("waypoint: {{destination: \"{by}\", hboneMtlsPort: 15008}}");
        let (on_workload, on_service) = match attach {
            "workload" => (format!(", {wp}"), String::new()),
            "service" => (String::new(), format!(", {wp}")),
            _ => (String::new(), String::new()),
        };
        let yaml = format!(
            r#"
workloads:
- {{uid: c, name: client, namespace: default, protocol: HBONE, workloadIps: [{CLIENT}]}}
- {{uid: s, name: server, namespace: default, protocol: HBONE, workloadIps: [{SERVER}],
   services: {{"default/server.default.svc.cluster.local": {{80: 8080}}}}{on_workload}}}
- {{uid: w, name: waypoint, namespace: default, protocol: HBONE, workloadIps: [{WAYPOINT}],
   services: {{"default/waypoint.default.svc.cluster.local": {{15008: 15008}}}}}}
services:
- {{name: server, namespace: default, hostname: server.default.svc.cluster.local,
   vips: ["/{SERVER_VIP}"], ports: {{80: 8080}}{on_service}}}
- {{name: waypoint, namespace: default, hostname: waypoint.default.svc.cluster.local,
   vips: ["/{WAYPOINT_VIP}"], ports: {{15008: 15008}}}}
"#
        );
        crate::xds::local::load_state(std::path::Path::new("inbound.yaml"), &yaml)
            .expect("parses")
            .0
    }

    /// Name, attachment, waypoint given by, connection to, authority IP, expected target IP.
    type Case<'a> = (&'a str, &'a str, &'a str, &'a str, &'a str, Option<&'a str>);

    /// Upstream's `test_find_inbound_upstream` cases (src/proxy/inbound.rs) without an
    /// application tunnel (PROXY) or a hostname authority, which this agent does not take:
    /// (attachment, waypoint given by, connection to, authority IP, expected target IP).
    #[test]
    fn inbound_targets_follow_upstreams_sandwich_checks() {
        let cases: &[Case] = &[
            (
                "to workload no waypoint",
                "none",
                "",
                SERVER,
                SERVER,
                Some(SERVER),
            ),
            (
                "to workload with waypoint referenced by pod",
                "workload",
                WAYPOINT,
                WAYPOINT,
                SERVER,
                Some(WAYPOINT),
            ),
            (
                "to workload with waypoint referenced by vip",
                "workload",
                WAYPOINT_VIP,
                WAYPOINT,
                SERVER,
                Some(WAYPOINT),
            ),
            (
                "to service with waypoint referenced by pod",
                "service",
                WAYPOINT,
                WAYPOINT,
                SERVER_VIP,
                Some(WAYPOINT),
            ),
            (
                "to service with waypoint referenced by vip",
                "service",
                WAYPOINT_VIP,
                WAYPOINT,
                SERVER_VIP,
                Some(WAYPOINT),
            ),
            ("to server ip mismatch", "none", "", SERVER, CLIENT, None),
            (
                "to waypoint without attachment",
                "none",
                "",
                WAYPOINT,
                CLIENT,
                None,
            ),
            (
                "to workload via waypoint with wrong attachment",
                "service",
                WAYPOINT,
                WAYPOINT,
                SERVER,
                None,
            ),
            (
                "to service via waypoint with wrong attachment",
                "workload",
                WAYPOINT,
                WAYPOINT,
                SERVER_VIP,
                None,
            ),
            // Not upstream's: the server itself cannot be asked for its service's VIP.
            (
                "to the server for its own service's VIP",
                "service",
                WAYPOINT,
                SERVER,
                SERVER_VIP,
                None,
            ),
            (
                "to service with waypoint referenced by hostname",
                "service",
                "default/waypoint.default.svc.cluster.local",
                WAYPOINT,
                SERVER_VIP,
                Some(WAYPOINT),
            ),
            (
                "to workload with waypoint referenced by hostname",
                "workload",
                "default/waypoint.default.svc.cluster.local",
                WAYPOINT,
                SERVER,
                Some(WAYPOINT),
            ),
        ];
        for (name, attach, by, conn_to, authority, want) in cases {
            let mesh = state(attach, by);
            let local: IpAddr = conn_to.parse().expect("ip");
            let me = mesh.workload_by_ip("", local).expect("the pod");
            let authority = SocketAddr::new(authority.parse().expect("ip"), 8080);
            let got = inbound_target(&mesh, "", &me.workload_ips, local, Some(&me), authority);
            let want = want.map(|ip| SocketAddr::new(ip.parse().expect("ip"), 8080));
            assert_eq!(got, want, "{name}");
        }
        // A pod the mesh state does not know, or a connection to an address not the pod's
        // (the listener's loopback), is never a waypoint.
        let mesh = state("service", WAYPOINT);
        let me = mesh
            .workload_by_ip("", WAYPOINT.parse().expect("ip"))
            .expect("waypoint");
        let vip = SocketAddr::new(SERVER_VIP.parse().expect("ip"), 8080);
        let local: IpAddr = WAYPOINT.parse().expect("ip");
        let ips = &me.workload_ips;
        assert_eq!(inbound_target(&mesh, "", ips, local, None, vip), None);
        let lo: IpAddr = "127.0.0.1".parse().expect("ip");
        assert_eq!(inbound_target(&mesh, "", ips, lo, Some(&me), vip), None);
    }
}
