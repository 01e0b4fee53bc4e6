//! The DNS proxy's listeners in a pod (UDP and TCP on the pod's loopback, port 15053) and
//! the handling of one question: parse it (a malformed message is answered FORMERR when it
//! has an id, counted and logged at a bounded rate), answer it from the mesh state or forward
//! it, and count it with upstream's `istio_dns_*` metrics. One pod can have at most
//! [`MAX_IN_FLIGHT`] questions and [`MAX_TCP_CONNECTIONS`] TCP connections open at once;
//! past that its questions are refused (REFUSED, counted), so a flood costs bounded memory
//! and other pods, served by their own listeners, are unaffected.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::answer::{self, Client};
use crate::metrics::DnsLabels;
use crate::proxy::PodProxy;

/// Questions one pod may have in flight (answered locally or forwarded).
pub const MAX_IN_FLIGHT: usize = 256;
/// TCP connections one pod may hold open to the proxy.
pub const MAX_TCP_CONNECTIONS: usize = 64;
/// A TCP connection idle this long between questions is closed.
pub const TCP_IDLE: Duration = Duration::from_secs(5);
/// The largest UDP question read.
const MAX_UDP_QUESTION: usize = 4096;

/// UDP or TCP, as the `request_protocol` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    /// UDP.
    Udp,
    /// TCP.
    Tcp,
}

impl Protocol {
    fn label(self) -> &'static str {
        match self {
            Protocol::Udp => "udp",
            Protocol::Tcp => "tcp",
        }
    }
}

/// A pod's DNS proxy: where it forwards, and its bounds.
pub struct PodDns {
    pod: Arc<PodProxy>,
    resolvers: Arc<[SocketAddr]>,
    in_flight: Arc<Semaphore>,
    tcp_connections: Arc<Semaphore>,
}

impl PodDns {
    /// The DNS proxy of `pod`, forwarding to `resolvers`.
    pub fn new(pod: Arc<PodProxy>, resolvers: Arc<[SocketAddr]>) -> Arc<Self> {
        Arc::new(Self {
            pod,
            resolvers,
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            tcp_connections: Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS)),
        })
    }
}

/// At most one warning a second for refused questions, agent-wide, with the count of those
/// not logged: a flood cannot flood the log.
static REJECTION_LOG: Mutex<Option<(Instant, u64)>> = Mutex::new(None);

fn rejected(pod: &PodProxy, reason: &'static str, detail: &dyn std::fmt::Display) {
    crate::metrics::global().dns_rejected(reason);
    let mut log = REJECTION_LOG.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    match &mut *log {
        Some((last, suppressed)) if now.duration_since(*last) < Duration::from_secs(1) => {
            *suppressed += 1;
        }
        slot => {
            let suppressed = slot.map_or(0, |(_, s)| s);
            *slot = Some((now, 0));
            tracing::warn!(
                pod = %pod.name,
                namespace = %pod.namespace,
                reason,
                detail = %detail,
                suppressed,
                "DNS question refused (ztunnel_dns_rejected_total counts them all; `suppressed` were not logged in the last second)"
            );
        }
    }
}

/// Serves the pod's UDP listener until `cancel`.
pub async fn serve_udp(socket: UdpSocket, dns: Arc<PodDns>, cancel: CancellationToken) {
    let socket = Arc::new(socket);
    let mut buf = vec![0u8; MAX_UDP_QUESTION];
    loop {
        let (n, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            received = socket.recv_from(&mut buf) => match received {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(pod = %dns.pod.name, error = %e, "DNS proxy: UDP receive failed");
                    continue;
                }
            },
        };
        let question = buf[..n].to_vec();
        let Ok(permit) = dns.in_flight.clone().try_acquire_owned() else {
            rejected(
                &dns.pod,
                "too_many_in_flight",
                &format!("{MAX_IN_FLIGHT} questions already in flight from {peer}"),
            );
            if let Some(answer) = error_answer(&question, ResponseCode::Refused) {
                let _ = socket.send_to(&answer, peer).await;
            }
            continue;
        };
        let (socket, dns) = (socket.clone(), dns.clone());
        tokio::spawn(async move {
            let _permit = permit;
            if let Some(answer) = handle(&dns, &question, Protocol::Udp).await {
                if let Err(e) = socket.send_to(&answer, peer).await {
                    tracing::debug!(pod = %dns.pod.name, error = %e, "DNS proxy: UDP answer not sent");
                }
            }
        });
    }
}

/// Serves the pod's TCP listener until `cancel`.
pub async fn serve_tcp(listener: TcpListener, dns: Arc<PodDns>, cancel: CancellationToken) {
    loop {
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(pod = %dns.pod.name, error = %e, "DNS proxy: TCP accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = dns.tcp_connections.clone().try_acquire_owned() else {
            rejected(
                &dns.pod,
                "too_many_tcp_connections",
                &format!("{MAX_TCP_CONNECTIONS} TCP connections already open, {peer} closed"),
            );
            continue;
        };
        let (dns, cancel) = (dns.clone(), cancel.clone());
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = serve_connection(stream, &dns) => {}
            }
        });
    }
}

/// Answers length-prefixed questions on one TCP connection until it closes or idles.
async fn serve_connection(mut stream: TcpStream, dns: &PodDns) {
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, stream.read_u16()).await {
            Ok(Ok(len)) => usize::from(len),
            _ => return,
        };
        let mut question = vec![0u8; len];
        match tokio::time::timeout(TCP_IDLE, stream.read_exact(&mut question)).await {
            Ok(Ok(_)) => {}
            _ => {
                rejected(
                    &dns.pod,
                    "truncated",
                    &"a TCP question shorter than its length prefix",
                );
                return;
            }
        }
        let Ok(_permit) = dns.in_flight.try_acquire() else {
            rejected(
                &dns.pod,
                "too_many_in_flight",
                &format!("{MAX_IN_FLIGHT} questions already in flight"),
            );
            return;
        };
        let Some(answer) = handle(dns, &question, Protocol::Tcp).await else {
            return;
        };
        let Ok(len) = u16::try_from(answer.len()) else {
            return;
        };
        let mut framed = Vec::with_capacity(answer.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&answer);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

/// An error answer to `question`, when it has at least an id. When it parses, the answer
/// repeats its question, RD bit and EDNS: resolver libraries (glibc) ignore an answer whose
/// question does not match theirs, and would wait out their timeout instead of moving on.
fn error_answer(question: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    let id = u16::from_be_bytes([*question.first()?, *question.get(1)?]);
    let mut answer = Message::error_msg(id, OpCode::Query, code);
    if let Ok(request) = Message::from_vec(question) {
        answer.metadata.recursion_desired = request.metadata.recursion_desired;
        answer.metadata.recursion_available = true;
        answer.add_queries(request.queries.iter().take(1).cloned());
        if let Some(edns) = &request.edns {
            let mut ours = hickory_proto::op::Edns::new();
            ours.set_max_payload(edns.max_payload().max(512));
            answer.set_edns(ours);
        }
    }
    answer.to_vec().ok()
}

/// The `request_query_type` label: the usual types by name, anything else `other` (an
/// attacker choosing types must not choose the number of series).
fn query_type_label(request: &Message) -> &'static str {
    use hickory_proto::rr::RecordType as T;
    match request.queries.first().map(|q| q.query_type()) {
        Some(T::A) => "a",
        Some(T::AAAA) => "aaaa",
        Some(T::CNAME) => "cname",
        Some(T::SRV) => "srv",
        Some(T::PTR) => "ptr",
        Some(T::TXT) => "txt",
        Some(T::MX) => "mx",
        Some(T::NS) => "ns",
        Some(T::SOA) => "soa",
        Some(T::HTTPS) => "https",
        Some(T::SVCB) => "svcb",
        Some(T::ANY) => "any",
        Some(T::CAA) => "caa",
        None => "unknown",
        Some(_) => "other",
    }
}

/// Answers one question from the pod (`None`: nothing to send back).
pub async fn handle(dns: &PodDns, question: &[u8], protocol: Protocol) -> Option<Vec<u8>> {
    let pod = &*dns.pod;
    let request = match Message::from_vec(question) {
        Ok(m) => m,
        Err(e) => {
            rejected(pod, "malformed", &e);
            return error_answer(question, ResponseCode::FormErr);
        }
    };
    let id = request.metadata.id;
    if request.metadata.message_type != MessageType::Query {
        rejected(pod, "not_a_query", &"a response sent as a question");
        return error_answer(question, ResponseCode::FormErr);
    }
    if request.metadata.op_code != OpCode::Query {
        return Message::error_msg(id, request.metadata.op_code, ResponseCode::NotImp)
            .to_vec()
            .ok();
    }
    if request.queries.len() != 1 {
        rejected(
            pod,
            "malformed",
            &format!("{} questions in one message", request.queries.len()),
        );
        return error_answer(question, ResponseCode::FormErr);
    }
    let state = pod.mesh.state.snapshot();
    let workload = pod.workload(&state);
    let canonical = |v: Option<&str>| v.filter(|s| !s.is_empty()).unwrap_or("unknown").to_string();
    let labels = DnsLabels {
        request_query_type: query_type_label(&request),
        request_protocol: protocol.label(),
        source_canonical_service: canonical(workload.as_deref().map(|w| w.canonical_name.as_str())),
        source_canonical_revision: canonical(
            workload.as_deref().map(|w| w.canonical_revision.as_str()),
        ),
    };
    let metrics = crate::metrics::global();
    metrics.dns_request(&labels);
    let client = Client {
        namespace: &pod.namespace,
        network: &pod.network,
    };
    if let Some(answer) = answer::answer(&state, client, &request) {
        let bytes = answer.to_vec().ok()?;
        if protocol == Protocol::Udp && bytes.len() > usize::from(request.max_payload()) {
            return answer.truncate().to_vec().ok();
        }
        return Some(bytes);
    }
    metrics.dns_upstream_request(&labels);
    let started = Instant::now();
    let forwarded = super::forward::forward(
        pod,
        &dns.resolvers,
        question,
        id,
        protocol == Protocol::Tcp,
        usize::from(request.max_payload()),
    )
    .await;
    metrics.dns_upstream_duration(&labels, started.elapsed());
    match forwarded {
        Ok(answer) => Some(answer),
        Err(e) => {
            metrics.dns_upstream_failure(&labels);
            tracing::debug!(pod = %pod.name, namespace = %pod.namespace, error = %crate::telemetry::ErrorChain(&e), "DNS question not forwarded");
            error_answer(question, ResponseCode::ServFail)
        }
    }
}

/// The pod's DNS listeners: UDP and TCP on 127.0.0.1:15053 and, when `v6`, [::1]:15053.
/// Shared with another agent in the pod during an overlapping upgrade (`SO_REUSEPORT`).
pub fn bind(v6: bool) -> std::io::Result<(Vec<std::net::UdpSocket>, Vec<std::net::TcpListener>)> {
    let mut addrs: Vec<SocketAddr> = vec![(
        std::net::Ipv4Addr::LOCALHOST,
        ztunnel_common::DNS_PROXY_PORT,
    )
        .into()];
    if v6 {
        addrs.push(
            (
                std::net::Ipv6Addr::LOCALHOST,
                ztunnel_common::DNS_PROXY_PORT,
            )
                .into(),
        );
    }
    let (mut udp, mut tcp) = (Vec::new(), Vec::new());
    for addr in addrs {
        let domain = socket2::Domain::for_address(addr);
        let u = socket2::Socket::new(domain, socket2::Type::DGRAM, None)?;
        let t = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
        for s in [&u, &t] {
            if addr.is_ipv6() {
                s.set_only_v6(true)?;
            }
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            s.set_nonblocking(true)?;
            s.bind(&addr.into())?;
        }
        t.listen(128)?;
        // Room for a burst of questions while the proxy catches up (best effort: the
        // kernel caps it at net.core.rmem_max).
        let _ = u.set_recv_buffer_size(1 << 20);
        udp.push(u.into());
        tcp.push(t.into());
    }
    Ok((udp, tcp))
}
