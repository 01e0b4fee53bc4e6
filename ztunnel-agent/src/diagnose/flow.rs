//! `ztunnel-agent diagnose flow <ns>/<pod> <host-or-ip>:<port>`: what would happen to a
//! connection from this pod to that destination, without sending it.
//!
//! The agent answers from its live state (`GET /debug/flow`) with the code the connection
//! itself would run: the kernel's capture decision over the same maps
//! (`ztunnel_common::outbound_decision`), the proxy's routing (`proxy::outbound::route_with`,
//! peeking at the round robin instead of taking its turn), the HBONE pool, the certificate
//! manager and authorization (`authz::evaluate`). Nothing here decides on its own.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use ztunnel_common::OutboundDecision;

use super::report::{render_checks, rfc3339, Check, Verdict};
use crate::admin::{query_param, AdminHandler, Responding};
use crate::enroll::{Enrollment, PodFacts};
use crate::http::text;
use crate::identity::manager::CertState;
use crate::proxy::hbone::PoolKey;
use crate::proxy::outbound::{route_with, Pick, Route, RouteError, Source};
use crate::state::service::LoadBalancerMode;
use crate::state::workload::HealthStatus;
use crate::state::{MeshState, PodRef};

/// `/debug/flow` on the admin port.
pub struct FlowHandler {
    /// Enrolled pods, the kernel redirect and the mesh context.
    pub enrollment: Arc<Mutex<Enrollment>>,
    /// Node name.
    pub node: Option<String>,
}

/// One endpoint of the destination service.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowEndpoint {
    /// `namespace/name` of the workload.
    pub workload: String,
    /// Address and port it would be reached on.
    pub address: Option<SocketAddr>,
    /// `Healthy` or `Unhealthy`.
    pub health: String,
    /// The round robin picks it next.
    pub next: bool,
}

/// The authorization verdict at the destination.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowAuthorization {
    /// Allowed.
    pub allowed: bool,
    /// The policy that decided (`namespace/name`), if one did.
    pub policy: Option<String>,
    /// Its rule that matched (index into `rules`).
    pub rule: Option<usize>,
    /// The enforced policies that apply to the destination.
    pub applicable: Vec<String>,
    /// The destination is a pod this agent serves (it enforces the verdict itself).
    pub on_this_node: bool,
}

/// The explanation (`GET /debug/flow`, JSON).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Flow {
    /// The source pod, `namespace/name`.
    pub pod: String,
    /// The destination as given.
    pub destination: String,
    /// The address the pod would dial.
    pub dialled: Option<SocketAddr>,
    /// The mesh hostname the destination resolved as.
    pub hostname: Option<String>,
    /// The kernel's decision (`Capture`, `Loopback`, `OwnAddress`, `ExcludedPort`,
    /// `NoPodAddress`), or none when the pod is not captured at all.
    pub capture: Option<String>,
    /// The destination service.
    pub service: Option<String>,
    /// Its endpoints for the port.
    pub endpoints: Vec<FlowEndpoint>,
    /// The destination workload, `namespace/name`.
    pub workload: Option<String>,
    /// `HBONE` or `passthrough`.
    pub protocol: Option<String>,
    /// Where the agent would connect (the HBONE server's 15008 or the passthrough target).
    pub target: Option<SocketAddr>,
    /// The CONNECT `:authority`.
    pub authority: Option<SocketAddr>,
    /// Identities the HBONE server may present.
    pub expected_identities: Vec<String>,
    /// The waypoint the tunnel goes through.
    pub waypoint: Option<String>,
    /// The source certificate's state.
    pub source_certificate: Option<String>,
    /// Open streams on each pooled HBONE connection the flow would reuse.
    pub pooled_streams: Option<Vec<usize>>,
    /// The verdict at the destination.
    pub authorization: Option<FlowAuthorization>,
    /// Each step, as printed.
    pub checks: Vec<Check>,
    /// One line: what would happen.
    pub verdict: String,
}

impl Flow {
    /// The first failing step.
    pub fn first_failure(&self) -> Option<&Check> {
        self.checks.iter().find(|c| c.verdict == Verdict::Fail)
    }

    /// As printed.
    pub fn render(&self) -> String {
        format!(
            "diagnose flow {} -> {}\n{}\nverdict: {}\n",
            self.pod,
            self.destination,
            render_checks(&self.checks),
            self.verdict
        )
    }

    fn push(&mut self, check: Check) {
        self.checks.push(check);
    }

    /// Ends the explanation at a step that stops the connection (or takes it out of the
    /// mesh).
    fn stop(mut self, check: Check) -> Self {
        self.verdict = match check.verdict {
            Verdict::Fail => format!(
                "the connection would FAIL at {}: {}",
                check.name, check.summary
            ),
            _ => format!("the connection is not captured: {}", check.summary),
        };
        self.push(check);
        self
    }
}

impl AdminHandler for FlowHandler {
    fn path(&self) -> &'static str {
        "/debug/flow"
    }

    fn description(&self) -> &'static str {
        "?pod=<ns>/<name>&dst=<host-or-ip>:<port>: what a connection would do, without sending it (JSON, for `ztunnel-agent diagnose flow`)"
    }

    fn handle(&self, req: Request<Incoming>) -> Responding<'_> {
        Box::pin(async move {
            let decoded = |name| {
                query_param(&req, name).map(|v| {
                    percent_encoding::percent_decode_str(v)
                        .decode_utf8_lossy()
                        .into_owned()
                })
            };
            let (Some(pod), Some(dst)) = (decoded("pod"), decoded("dst")) else {
                return text(
                    StatusCode::BAD_REQUEST,
                    "expected ?pod=<namespace>/<pod>&dst=<host-or-ip>:<port>\n",
                );
            };
            let Some(pod_ref) = PodRef::parse(&pod) else {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("pod={pod}: expected <namespace>/<pod>\n"),
                );
            };
            let Some((host, port)) = split_destination(&dst) else {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("dst={dst}: expected <host-or-ip>:<port>, e.g. reviews:9080, 10.96.0.14:9080 or [fd00::1]:9080\n"),
                );
            };
            let flow = {
                let enrollment = self.enrollment.lock().await;
                explain(
                    &enrollment,
                    self.node.as_deref(),
                    &pod_ref,
                    &dst,
                    &host,
                    port,
                )
            };
            text(
                StatusCode::OK,
                serde_json::to_string_pretty(&flow).unwrap_or_default(),
            )
        })
    }
}

/// `host:port`, `a.b.c.d:port` or `[v6]:port` as (host, port).
pub fn split_destination(text: &str) -> Option<(String, u16)> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Some((addr.ip().to_string(), addr.port()));
    }
    let (host, port) = text.rsplit_once(':')?;
    let port = port.parse().ok().filter(|p| *p != 0)?;
    let valid = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    valid.then(|| (host.to_string(), port))
}

/// The explanation, from the agent's state now.
pub fn explain(
    enrollment: &Enrollment,
    node: Option<&str>,
    pod_ref: &PodRef,
    destination: &str,
    host: &str,
    port: u16,
) -> Flow {
    let mut flow = Flow {
        pod: pod_ref.to_string(),
        destination: destination.to_string(),
        ..Default::default()
    };
    let node_text = node.map_or("this node".to_string(), |n| format!("node {n}"));
    let node = node.unwrap_or_default();
    flow.push(Check::new(
        "agent",
        Verdict::Ok,
        format!("ztunnel-agent {} on {node_text}", env!("CARGO_PKG_VERSION")),
    ));
    let mesh = enrollment.mesh().clone();
    let state = mesh.state.snapshot();
    let pods = enrollment.facts(None);

    // The source pod.
    let Some(source) = pods
        .iter()
        .find(|p| p.spec.namespace == pod_ref.namespace && p.spec.name == pod_ref.name)
    else {
        let check = match state.pod_workload("", &pod_ref.namespace, &pod_ref.name) {
            Some(w) if !w.node.is_empty() && w.node != node => Check::new(
                "source",
                Verdict::Fail,
                format!("{pod_ref} runs on node {}, not on {node_text}: ask that node's agent", w.node),
            ),
            Some(_) => Check::new(
                "source",
                Verdict::Fail,
                format!("{pod_ref} is in the mesh but not enrolled on this node: its connections are not captured, they leave without the mesh (is the pod annotated for ambient, and did istio-cni hand it over? `ztunnel-agent diagnose {pod_ref}`)"),
            ),
            None => Check::new(
                "source",
                Verdict::Fail,
                format!("unknown pod {pod_ref}: neither enrolled on this node nor in the mesh state (check the name; `ztunnel-agent config workloads`)"),
            ),
        };
        return flow.stop(check);
    };
    let proxy = &source.proxy;
    flow.push(
        Check::new(
            "source",
            Verdict::Ok,
            format!("{pod_ref} enrolled, serving as {}", source.identity),
        )
        .with(format!(
            "addresses {}",
            source
                .ips
                .iter()
                .map(IpAddr::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )),
    );

    // The destination address.
    let dialled = match host.parse::<IpAddr>() {
        Ok(ip) => {
            let ip = ip.to_canonical();
            let what = if let Some(s) = state.service_by_vip(&proxy.network, ip) {
                format!("the VIP of service {}", s.service.hostname)
            } else if let Some(w) = state.workload_by_ip(&proxy.network, ip) {
                format!("the address of workload {}/{}", w.namespace, w.name)
            } else {
                "an address the mesh does not know".to_string()
            };
            let dialled = SocketAddr::new(ip, port);
            flow.push(Check::new(
                "destination",
                Verdict::Ok,
                format!("{dialled}: {what}"),
            ));
            dialled
        }
        Err(_) => match state.resolve_host(&pod_ref.namespace, host) {
            Some(resolved) => {
                let preferred = source.ips.first().copied();
                let chosen = resolved
                    .addresses
                    .iter()
                    .filter(|a| a.network == proxy.network)
                    .find(|a| preferred.is_none_or(|p| p.is_ipv4() == a.address.is_ipv4()))
                    .or_else(|| resolved.addresses.first())
                    .map(|a| a.address);
                let Some(ip) = chosen else {
                    return flow.stop(Check::new(
                        "destination",
                        Verdict::Fail,
                        format!(
                            "{host} is {} in the mesh, which has no address",
                            resolved.hostname
                        ),
                    ));
                };
                flow.hostname = Some(resolved.hostname.clone());
                let dialled = SocketAddr::new(ip, port);
                let kind = if resolved.service.is_some() {
                    "service VIP"
                } else {
                    "workload address"
                };
                flow.push(
                    Check::new(
                        "destination",
                        Verdict::Ok,
                        format!("{host} is {} ({kind} {ip})", resolved.hostname),
                    )
                    .with(format!(
                        "all addresses: {}",
                        resolved
                            .addresses
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )),
                );
                dialled
            }
            None => {
                return flow.stop(Check::new(
                    "destination",
                    Verdict::Fail,
                    format!("{host} is not a mesh name seen from namespace {}: the pod's DNS server answers for it, which this agent does not see; explain the address it returns instead (`diagnose flow {pod_ref} <ip>:{port}`)", pod_ref.namespace),
                ));
            }
        },
    };
    flow.dialled = Some(dialled);

    // The kernel's decision.
    let decision = match enrollment
        .redirect()
        .outbound_decision(source.netns.cookie(), dialled)
    {
        Ok(decision) => decision,
        Err(e) => {
            return flow.stop(Check::new(
                "capture",
                Verdict::Fail,
                format!(
                    "the kernel's capture state cannot be read: {} (`ztunnel-agent redirect dump` shows the pinned maps)",
                    crate::telemetry::ErrorChain(&e)
                ),
            ))
        }
    };
    flow.capture = decision.map(|d| format!("{d:?}"));
    let capture = match decision {
        None => {
            return flow.stop(Check::new(
                "capture",
                Verdict::Fail,
                format!("the pod's network namespace (cookie {}) is not in ENROLLED_PODS: its connections bypass the proxy (`ztunnel-agent diagnose {pod_ref}` names the broken link)", source.netns.cookie()),
            ))
        }
        Some(OutboundDecision::Capture) => Check::new(
            "capture",
            Verdict::Ok,
            "captured: connect() is redirected to the agent's 15001 in the pod",
        ),
        Some(OutboundDecision::Loopback) => {
            return flow.stop(Check::new(
                "capture",
                Verdict::Warn,
                format!("not captured: {} is loopback, it stays inside the pod", dialled.ip()),
            ))
        }
        Some(OutboundDecision::OwnAddress) => {
            return flow.stop(Check::new(
                "capture",
                Verdict::Warn,
                format!("not captured: {} is the pod's own address", dialled.ip()),
            ))
        }
        Some(OutboundDecision::ExcludedPort) => {
            return flow.stop(Check::new(
                "capture",
                Verdict::Warn,
                format!("not captured: port {port} is excluded (ZTUNNEL_EXCLUDE_OUTBOUND_PORTS); the connection goes straight to {dialled}, without mTLS or policy"),
            ))
        }
        Some(OutboundDecision::Dns) => {
            flow.push(Check::new(
                "capture",
                Verdict::Ok,
                format!("captured as DNS: connect() is redirected to the agent's DNS proxy on the pod's loopback port {}", ztunnel_common::DNS_PROXY_PORT),
            ));
            flow.verdict = "the connection would reach the agent's DNS proxy, which answers mesh names and forwards the rest".to_string();
            return flow;
        }
        Some(OutboundDecision::NoPodAddress) => {
            return flow.stop(Check::new(
                "capture",
                Verdict::Fail,
                format!("refused (EPERM): the pod has no {} address, so the proxy cannot carry a connection to {dialled}", if dialled.is_ipv4() { "IPv4" } else { "IPv6" }),
            ))
        }
    };
    flow.push(capture);

    // The route, by the proxy's own routing (peeking at the round robin, not taking its
    // turn), computed once: the endpoint shown next is the one the route names.
    let me = proxy.routing_workload(&state);
    let from = Source {
        network: &proxy.network,
        workload: &me,
        identity: &proxy.identity,
        ip: crate::state::workload::address_like(&source.ips, dialled.ip()).unwrap_or(dialled.ip()),
    };
    let routed = route_with(&state, &from, dialled, Pick::Peek);
    let routed_workload = match &routed {
        Ok(Route::Hbone { workload, .. }) => Some(workload.clone()),
        Ok(Route::Passthrough(_, workload)) => workload.clone(),
        Err(_) => None,
    };
    // The service's endpoints, with the round robin's next pick.
    if let Some(entry) = state.service_by_vip(&proxy.network, dialled.ip()) {
        flow.service = Some(entry.service.hostname.clone());
        // Through the service's waypoint, or with PASSTHROUGH load balancing, this agent
        // picks no endpoint: the listing is for information.
        let through_waypoint = matches!(
            &routed,
            Ok(Route::Hbone {
                waypoint: Some(_),
                ..
            }) | Err(RouteError::UnknownWaypoint { .. } | RouteError::NoHealthyWaypoint { .. })
        );
        let lb = entry.service.load_balancer.as_ref();
        // A service VIP routed as passthrough without a workload: loadBalancing PASSTHROUGH.
        let passthrough = matches!(&routed, Ok(Route::Passthrough(_, None)));
        let next = if through_waypoint || passthrough {
            None
        } else {
            routed_workload.clone()
        };
        let endpoints = state.endpoints(&entry, port);
        flow.endpoints = endpoints
            .iter()
            .map(|(e, health)| FlowEndpoint {
                workload: format!("{}/{}", e.workload.namespace, e.workload.name),
                address: crate::state::workload::address_like(
                    &e.workload.workload_ips,
                    dialled.ip(),
                )
                .map(|ip| SocketAddr::new(ip, e.port)),
                health: format!("{health:?}"),
                next: next.as_ref().is_some_and(|n| Arc::ptr_eq(n, &e.workload)),
            })
            .collect();
        let healthy = endpoints
            .iter()
            .filter(|(_, h)| *h == HealthStatus::Healthy)
            .count();
        let health = if healthy < endpoints.len() {
            Verdict::Warn
        } else {
            Verdict::Ok
        };
        let summary = format!(
            "service {}: {healthy} of {} endpoints healthy for port {port}",
            entry.service.hostname,
            endpoints.len()
        );
        let mut check = match (&next, &entry.service.waypoint) {
            (_, Some(wp)) if through_waypoint => Check::new(
                "endpoints",
                health,
                format!(
                    "{summary}; the service's waypoint {} picks the endpoint (this agent sends the connection to the waypoint)",
                    wp.destination
                ),
            ),
            _ if passthrough => Check::new(
                "endpoints",
                Verdict::Ok,
                format!("{summary}; loadBalancing mode PASSTHROUGH: no endpoint is picked, the connection goes to {dialled} as dialled"),
            ),
            (Some(n), _) => Check::new(
                "endpoints",
                health,
                format!(
                    "{summary}; the round robin (shared by every pod on this node) gives the next connection to {}/{}",
                    n.namespace, n.name
                ),
            ),
            (None, _) => Check::new(
                "endpoints",
                Verdict::Fail,
                match &routed {
                    Err(e) => crate::telemetry::ErrorChain(e).to_string(),
                    Ok(_) => format!(
                        "service {} has no healthy endpoint for port {port} ({} listed)",
                        entry.service.hostname,
                        endpoints.len()
                    ),
                },
            ),
        };
        if let Some(lb) = lb.filter(|lb| {
            matches!(
                lb.mode,
                LoadBalancerMode::Strict | LoadBalancerMode::Failover
            )
        }) {
            check = check.with(format!(
                "loadBalancing {:?} by {:?}: only the endpoints sharing the most of these with {}/{} take turns{}",
                lb.mode,
                lb.routing_preferences,
                proxy.namespace,
                proxy.name,
                if lb.mode == LoadBalancerMode::Strict { " (all of them, or none)" } else { "" }
            ));
        }
        for e in &flow.endpoints {
            check = check.with(format!(
                "{} {} {}{}",
                e.workload,
                e.address
                    .map_or("(no address)".to_string(), |a| a.to_string()),
                e.health,
                if e.next { "  <- next" } else { "" }
            ));
        }
        if next.is_none() && !through_waypoint && !passthrough {
            return flow.stop(check);
        }
        flow.push(check);
    }

    let route = match routed {
        Ok(route) => route,
        Err(e) => {
            return flow.stop(Check::new(
                "route",
                Verdict::Fail,
                crate::telemetry::ErrorChain(&e).to_string(),
            ))
        }
    };
    // The pod's address of the destination's family (capture refused the connection above
    // when it has none).
    let src_ip = from.ip;
    let (destination, identity, authz_dst) = match route {
        Route::Passthrough(target, workload) => {
            flow.protocol = Some("passthrough".into());
            flow.target = Some(target);
            let what = match &workload {
                Some(w) => format!(
                    "workload {}/{} speaks plain TCP ({:?})",
                    w.namespace, w.name, w.protocol
                ),
                None => match &flow.service {
                    Some(service) => {
                        format!("service {service} has loadBalancing mode PASSTHROUGH")
                    }
                    None => "the destination is outside the mesh".to_string(),
                },
            };
            flow.workload = workload
                .as_ref()
                .map(|w| format!("{}/{}", w.namespace, w.name));
            flow.push(Check::new(
                "route",
                Verdict::Ok,
                format!("passthrough: plain TCP to {target} ({what})"),
            ));
            (workload, None, target)
        }
        Route::Hbone {
            hbone_addr,
            authority,
            expected,
            workload,
            service: _,
            waypoint,
        } => {
            flow.protocol = Some("HBONE".into());
            flow.target = Some(hbone_addr);
            flow.authority = Some(authority);
            flow.expected_identities = expected.iter().map(ToString::to_string).collect();
            flow.waypoint = waypoint.clone();
            flow.workload = Some(format!("{}/{}", workload.namespace, workload.name));
            let mut check = Check::new(
                "route",
                Verdict::Ok,
                match &waypoint {
                    Some(wp) => format!(
                        "HBONE through waypoint {wp} at {hbone_addr}, :authority {authority}"
                    ),
                    None => format!("HBONE to {hbone_addr}, :authority {authority}"),
                },
            )
            .with(format!(
                "{} {}/{}",
                if waypoint.is_some() {
                    "waypoint workload"
                } else {
                    "destination workload"
                },
                workload.namespace,
                workload.name
            ))
            .with(format!(
                "the server must present one of: {}",
                flow.expected_identities.join(", ")
            ));
            if waypoint.is_some() {
                check = check.with("the waypoint applies L7 policy; the destination's agent sees the waypoint's identity");
            }
            flow.push(check);
            let key = PoolKey {
                source: source.identity.clone(),
                expected,
                dst: hbone_addr,
                src_ip,
            };
            let (streams, reuses) = mesh.pool.streams(&key);
            flow.push(Check::new(
                "pool",
                Verdict::Ok,
                match (streams.is_empty(), reuses) {
                    (true, _) => format!("no pooled connection to {hbone_addr}: the connection opens one (TCP and TLS handshake)"),
                    (false, true) => format!(
                        "{} pooled connection(s) to {hbone_addr} ({} streams open): the connection reuses one",
                        streams.len(),
                        streams.iter().sum::<usize>()
                    ),
                    (false, false) => format!(
                        "{} pooled connection(s) to {hbone_addr}, every one at its stream limit ({} streams open): the connection opens another",
                        streams.len(),
                        streams.iter().sum::<usize>()
                    ),
                },
            ));
            // A reused connection needs no certificate now; a new one needs the pod's.
            let certificate = if reuses {
                flow.source_certificate = Some("not needed: a pooled connection is reused".into());
                Check::new(
                    "certificate",
                    Verdict::Ok,
                    format!(
                        "{}: not needed now, the pooled connection's handshake is done",
                        source.identity
                    ),
                )
            } else {
                certificate_check(&mesh, &source.identity, &mut flow.source_certificate)
            };
            flow.push(certificate);
            flow.pooled_streams = Some(streams);
            (Some(workload), Some(source.identity.clone()), authority)
        }
    };

    // Authorization at the destination.
    let via_waypoint = flow.waypoint.is_some();
    let authz = authorization_check(
        &state,
        &pods,
        destination.as_deref(),
        identity.as_ref(),
        src_ip,
        authz_dst,
        via_waypoint,
        &mut flow.authorization,
    );
    flow.push(authz);
    flow.verdict = match flow.first_failure() {
        Some(c) => format!("the connection would FAIL at {}: {}", c.name, c.summary),
        None => format!(
            "the connection would flow: {}",
            flow.checks
                .iter()
                .find(|c| c.name == "route")
                .map_or(String::new(), |c| c.summary.clone())
        ),
    };
    flow
}

fn certificate_check(
    mesh: &crate::proxy::MeshContext,
    identity: &crate::identity::Identity,
    state_out: &mut Option<String>,
) -> Check {
    // What the TLS client would get from the certificate manager, without issuing anything.
    match mesh.certs.usable(identity) {
        Ok(Some(cert)) => {
            let state = mesh
                .certs
                .all()
                .into_iter()
                .find(|(id, _, _)| id == identity)
                .map_or(CertState::Available, |(_, state, _)| state);
            *state_out = Some(state.to_string());
            let renewal = match &state {
                CertState::Unavailable(why) => {
                    format!(" (renewal failing: {why}; this one serves until it expires)")
                }
                _ => String::new(),
            };
            Check::new(
                "certificate",
                if renewal.is_empty() {
                    Verdict::Ok
                } else {
                    Verdict::Warn
                },
                format!(
                    "{identity}: valid until {}{renewal}",
                    rfc3339(cert.not_after)
                ),
            )
        }
        Ok(None) => {
            *state_out = Some("issued on demand".into());
            Check::new(
                "certificate",
                Verdict::Ok,
                format!("{identity}: the local CA issues it at the connection's handshake"),
            )
        }
        Err(e) => {
            *state_out = Some(e.to_string());
            Check::new(
                "certificate",
                Verdict::Fail,
                format!(
                    "the connection's TLS handshake would fail: {}",
                    crate::telemetry::ErrorChain(&e)
                ),
            )
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn authorization_check(
    state: &MeshState,
    pods: &[PodFacts],
    workload: Option<&crate::state::workload::Workload>,
    identity: Option<&crate::identity::Identity>,
    src: IpAddr,
    dst: SocketAddr,
    via_waypoint: bool,
    out: &mut Option<FlowAuthorization>,
) -> Check {
    if via_waypoint {
        return Check::new(
            "authorization",
            Verdict::Ok,
            "decided by the waypoint, then by the destination's agent for the waypoint's identity",
        );
    }
    // The destination pod's own proxy, when this agent serves it, judges with the workload it
    // looks up itself (as its 15008 and 15006 do), whatever the route knew.
    let local = pods.iter().find(|p| p.ips.contains(&dst.ip()));
    let local_workload = local.and_then(|p| p.proxy.workload(state));
    let subject = match (local, workload) {
        (Some(p), _) => p.proxy.policy_subject(local_workload.as_deref()),
        (None, Some(w)) if w.protocol == crate::state::workload::Protocol::HBONE => {
            std::borrow::Cow::Borrowed(w)
        }
        (None, Some(w)) => {
            return Check::new(
                "authorization",
                Verdict::Warn,
                format!(
                    "not enforced: {}/{} speaks plain TCP and is not captured by an agent, so no mesh policy is applied to it",
                    w.namespace, w.name
                ),
            )
        }
        (None, None) => {
            return Check::new(
                "authorization",
                Verdict::Ok,
                "none: the destination is outside the mesh, no mesh policy applies",
            )
        }
    };
    let workload = &*subject;
    let conn = crate::authz::Connection { src, identity, dst };
    let decision = crate::authz::evaluate(state, &subject, &conn);
    let as_whom = match identity {
        Some(id) => format!("as {id}"),
        None => format!("as plaintext from {src} (no identity)"),
    };
    let summary = match (&decision.outcome, &decision.decided_by) {
        (Ok(()), Some((policy, rule))) => {
            format!(
                "allowed by ALLOW policy {} (rules[{rule}]) {as_whom}",
                policy.key()
            )
        }
        (Ok(()), None) if decision.applicable.is_empty() => format!(
            "allowed: no policy applies to {}/{} {as_whom}",
            workload.namespace, workload.name
        ),
        (Ok(()), None) => {
            format!("allowed: no DENY policy matches and no ALLOW policy applies {as_whom}")
        }
        (Err(_), Some((policy, rule))) => {
            format!(
                "denied by DENY policy {} (rules[{rule}]) {as_whom}",
                policy.key()
            )
        }
        (Err(_), None) => format!(
            "denied: ALLOW policies apply ({}) and none matches {as_whom}",
            decision
                .applicable
                .iter()
                .filter(|p| p.action == crate::state::policy::Action::Allow)
                .map(|p| p.key())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let summary =
        match local {
            Some(_) => format!("{summary}; enforced by this agent"),
            None => format!(
            "{summary}; enforced by the agent on node {} (from this agent's copy of the policies)",
            if workload.node.is_empty() { "(unknown)" } else { &workload.node }
        ),
        };
    let mut check = Check::new(
        "authorization",
        if decision.outcome.is_ok() {
            Verdict::Ok
        } else {
            Verdict::Fail
        },
        summary,
    );
    let applicable: Vec<String> = decision.applicable.iter().map(|p| p.key()).collect();
    if !applicable.is_empty() {
        check = check.with(format!("policies that apply: {}", applicable.join(", ")));
    }
    if let Some((policy, rule)) = &decision.dry_run_deny {
        check = check.with(format!(
            "dry-run DENY policy {} (rules[{rule}]) would deny it",
            policy.key()
        ));
    }
    if decision.dry_run_not_allowed {
        check = check.with("dry-run ALLOW policies would not allow it");
    }
    *out = Some(FlowAuthorization {
        allowed: decision.outcome.is_ok(),
        policy: decision.decided_by.as_ref().map(|(p, _)| p.key()),
        rule: decision.decided_by.as_ref().map(|(_, r)| *r),
        applicable,
        on_this_node: local.is_some(),
    });
    check
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn destinations_parse_as_operators_write_them() {
        let parse = |t: &str| split_destination(t);
        assert_eq!(parse("reviews:9080"), Some(("reviews".into(), 9080)));
        assert_eq!(parse("10.96.0.14:9080"), Some(("10.96.0.14".into(), 9080)));
        assert_eq!(parse("[fd00::1]:80"), Some(("fd00::1".into(), 80)));
        assert_eq!(
            parse("reviews.default.svc.cluster.local.:9080"),
            Some(("reviews.default.svc.cluster.local.".into(), 9080))
        );
        for bad in [
            "reviews",
            "reviews:",
            "reviews:0",
            "reviews:99999",
            ":80",
            "a b:80",
            "fd00::1:80x",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
