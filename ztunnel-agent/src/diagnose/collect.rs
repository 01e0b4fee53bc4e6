//! The agent's side of `diagnose`: gathers the [`Evidence`] from the enrollment, the kernel
//! and the pods' own socket tables, served at `/debug/diagnose`.

use std::os::unix::fs::MetadataExt;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use tokio::sync::Mutex;
use ztunnel_common::AF_INET6;

use super::evidence::*;
use crate::admin::{query_param, AdminHandler, Responding};
use crate::enroll::{Enrollment, PodFacts, Source};
use crate::http::text;
use crate::readiness::Readiness;

/// `/debug/diagnose` on the admin port: what the agent knows, for `ztunnel-agent diagnose`.
pub struct DiagnoseHandler {
    /// Enrolled pods and the kernel redirect.
    pub enrollment: Arc<Mutex<Enrollment>>,
    /// Readiness blockers.
    pub readiness: Readiness,
    /// The xDS stream, in control-plane mode.
    pub xds: Option<crate::xds::client::XdsStatusHandle>,
    /// Node name.
    pub node: Option<String>,
    /// Where the mesh configuration comes from, for people.
    pub config_source: String,
}

impl AdminHandler for DiagnoseHandler {
    fn path(&self) -> &'static str {
        "/debug/diagnose"
    }

    fn description(&self) -> &'static str {
        "?pod=<ns>/<name>&window_ms=<ms>: evidence for `ztunnel-agent diagnose` (JSON)"
    }

    fn handle(&self, req: Request<Incoming>) -> Responding<'_> {
        Box::pin(async move {
            let query = match query_param(&req, "pod") {
                None => None,
                Some(pod) => match parse_pod_ref(pod) {
                    Some(pod_ref) => Some(pod_ref),
                    None => {
                        return text(
                            StatusCode::BAD_REQUEST,
                            format!("pod={pod}: expected <namespace>/<pod>\n"),
                        )
                    }
                },
            };
            let window = match query_param(&req, "window_ms").map(str::parse::<u64>) {
                None => DEFAULT_WINDOW,
                Some(Ok(ms)) => Duration::from_millis(ms).min(MAX_WINDOW),
                Some(Err(_)) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "window_ms: expected milliseconds, e.g. window_ms=1000\n",
                    )
                }
            };
            let evidence = collect(self, query, window).await;
            let body = serde_json::to_string_pretty(&evidence).unwrap_or_default();
            text(StatusCode::OK, body)
        })
    }
}

/// `/debug/connections` on the admin port: the node's recent connection outcomes (every
/// pod's), newest last, and the recent failures apart.
pub struct RecentConnectionsHandler;

impl AdminHandler for RecentConnectionsHandler {
    fn path(&self) -> &'static str {
        "/debug/connections"
    }

    fn description(&self) -> &'static str {
        "the node's recent connection outcomes, and recent failures (JSON)"
    }

    fn handle(&self, _req: Request<Incoming>) -> Responding<'_> {
        Box::pin(async move {
            let (recent, failed) = crate::accesslog::recent_all();
            let body = serde_json::json!({ "recent": recent, "recentFailed": failed });
            text(
                StatusCode::OK,
                serde_json::to_string_pretty(&body).unwrap_or_default(),
            )
        })
    }
}

/// A pod's evidence from what enrollment knows: the listeners as the pod's own socket table
/// shows them, the counters now, its recent connection outcomes.
fn pod_evidence(p: PodFacts) -> PodEvidence {
    let cookie = p.netns.cookie();
    let listening = p
        .netns
        .run(listening_inodes)
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()));
    let (listeners, listener_check_error) = match listening {
        Ok(inodes) => (
            p.listeners
                .iter()
                .map(|(addr, inode)| ListenerEvidence {
                    addr: *addr,
                    listening: inodes.contains(inode),
                })
                .collect(),
            None,
        ),
        Err(e) => (Vec::new(), Some(e)),
    };
    let counters = counter_map(&p.kernel.counters);
    let (recent, recent_failed) =
        crate::accesslog::recent(&p.spec.namespace, &p.spec.name, RECENT_SHOWN);
    PodEvidence {
        namespace: p.spec.namespace,
        name: p.spec.name,
        uid: p.spec.uid,
        ips: p.ips,
        netns_cookie: cookie.0,
        netns_inode: p.netns.file().metadata().map_or(0, |m| m.ino()),
        source: match p.source {
            Source::LocalConfig => "local config".to_string(),
            Source::Zds => "istio-cni (ZDS)".to_string(),
        },
        identity: p.identity.to_string(),
        workload_known: p.workload_known,
        map_enrolled: p.kernel.enrolled,
        map_addresses: p.kernel.addresses.clone(),
        map_listener_families: p
            .kernel
            .listener_families
            .iter()
            .map(|f| if *f == AF_INET6 { "ipv6" } else { "ipv4" }.to_string())
            .collect(),
        inbound_link: LinkEvidence::from_read(&format!("inbound-{cookie}"), &p.kernel.inbound_link),
        listeners,
        listener_check_error,
        counters_before: counters.clone(),
        counters_after: counters,
        recent,
        recent_failed,
        dns_capture: p.kernel.dns_capture,
        dns_counters: p
            .kernel
            .dns_counters
            .fields()
            .iter()
            .map(|(k, v)| ((*k).to_string(), *v))
            .collect(),
    }
}

/// Gathers the evidence (agent side): everything but the counters at once, then the counters
/// again after `window`, without holding the enrollment lock while waiting.
pub async fn collect(ctx: &DiagnoseHandler, query: Option<PodRef>, window: Duration) -> Evidence {
    let only = query
        .as_ref()
        .map(|p| (p.namespace.as_str(), p.name.as_str()));
    let (pods, links, config, certs, state, parked) = {
        let enrollment = ctx.enrollment.lock().await;
        let redirect = enrollment.redirect();
        let links: Vec<LinkEvidence> = redirect
            .cgroup_links()
            .iter()
            .map(|(name, read)| LinkEvidence::from_read(name, read))
            .collect();
        (
            enrollment.facts(only),
            links,
            redirect.config().clone(),
            enrollment.mesh().certs.all(),
            enrollment.mesh().state.snapshot(),
            enrollment.parked(),
        )
    };
    // Reading the pods' socket tables enters their namespaces: done without the lock.
    let mut pods: Vec<PodEvidence> = pods.into_iter().map(pod_evidence).collect();
    tokio::time::sleep(window).await;
    {
        let enrollment = ctx.enrollment.lock().await;
        for pod in &mut pods {
            pod.counters_after = counter_map(&enrollment.counters(pod.netns_cookie));
        }
    }
    let query = query.map(|PodRef { namespace, name }| {
        // No uid here: the operator names the pod.
        let workload = state
            .pod_workload("", &namespace, &name)
            .map(|w| WorkloadEvidence {
                uid: w.key(),
                node: w.node.clone(),
                protocol: format!("{:?}", w.protocol),
                ips: w.workload_ips.clone(),
            });
        QueryEvidence {
            namespace,
            name,
            workload,
        }
    });
    Evidence {
        version: env!("CARGO_PKG_VERSION").to_string(),
        node: ctx.node.clone(),
        not_ready: ctx.readiness.pending(),
        pin_dir: config.pin_dir.display().to_string(),
        cgroup: config.cgroup.display().to_string(),
        cgroup_id: std::fs::metadata(&config.cgroup).ok().map(|m| m.ino()),
        links,
        config_source: ctx.config_source.clone(),
        xds: ctx
            .xds
            .as_ref()
            .map(crate::xds::client::XdsStatusHandle::get),
        certificates: certs
            .into_iter()
            .map(|(identity, state, cert)| CertEvidence {
                identity: identity.to_string(),
                state: state.to_string(),
                not_after: cert.map(|c| c.not_after),
            })
            .collect(),
        window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
        pods,
        query,
        parked,
    }
}

/// The state of a socket-table row that means LISTEN.
const TCP_LISTEN: &str = "0A";

/// Inodes of the listening TCP sockets in the calling thread's network namespace.
pub fn listening_inodes() -> std::io::Result<Vec<u64>> {
    let mut inodes = Vec::new();
    for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(t) => t,
            // No IPv6 in this kernel.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) == Some(&TCP_LISTEN) {
                if let Some(inode) = fields.get(9).and_then(|i| i.parse().ok()) {
                    inodes.push(inode);
                }
            }
        }
    }
    Ok(inodes)
}
