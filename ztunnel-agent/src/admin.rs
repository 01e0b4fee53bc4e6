//! Admin (127.0.0.1:15000), readiness (15021) and metrics (15020) endpoints.

pub mod config_dump;

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::enroll::Enrollment;
use crate::http::{text, Body};
use crate::readiness::Readiness;

/// The admin endpoints and what they are for (served at `/`).
const ENDPOINTS: &[(&str, &str)] = &[
    (
        "/config_dump",
        "workloads, services, policies, certificates, pods (JSON)",
    ),
    (
        "/logging",
        "GET: the log filter; POST ?level=<RUST_LOG filter>: change it",
    ),
    (
        "/debug/diagnose",
        "?pod=<ns>/<name>&window_ms=<ms>: evidence for `ztunnel-agent diagnose` (JSON)",
    ),
    (
        "/quitquitquit",
        "POST: stop the agent (kernel redirect stays pinned)",
    ),
];

/// What the admin endpoints read.
pub struct AdminContext {
    /// Enrolled pods and the kernel redirect.
    pub enrollment: Arc<Mutex<Enrollment>>,
    /// Cancelled by `/quitquitquit`.
    pub shutdown: CancellationToken,
    /// The `config` section of config_dump.
    pub config_json: serde_json::Value,
    /// Readiness blockers.
    pub readiness: Readiness,
    /// The xDS stream, in control-plane mode.
    pub xds: Option<crate::xds::client::XdsStatusHandle>,
    /// Node name.
    pub node: Option<String>,
    /// Where the mesh configuration comes from, for people.
    pub config_source: String,
}

/// The query parameter `name`, if present.
fn query_param<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
}

/// Handles an admin request.
pub async fn admin(req: Request<Incoming>, ctx: Arc<AdminContext>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => {
            let list: String = ENDPOINTS
                .iter()
                .map(|(p, d)| format!("{p}: {d}\n"))
                .collect();
            text(StatusCode::OK, list)
        }
        (&Method::GET, "/config_dump") => {
            // The lock only for the pod list: building the dump does not hold up enrollment.
            let (pods, mesh) = {
                let enrollment = ctx.enrollment.lock().await;
                (enrollment.status(), enrollment.mesh().clone())
            };
            let dump = config_dump::build(
                &mesh.state.snapshot(),
                &mesh.certs,
                &mesh.tracker,
                &pods,
                &ctx.config_json,
            );
            let body = serde_json::to_string_pretty(&dump).unwrap_or_default();
            text(StatusCode::OK, body)
        }
        (&Method::GET, "/logging") => text(
            StatusCode::OK,
            format!(
                "current log filter: {}\n",
                crate::telemetry::current_filter()
            ),
        ),
        (&Method::GET, "/debug/diagnose") => {
            let query = match query_param(&req, "pod") {
                None => None,
                Some(pod) => match crate::diagnose::parse_pod_ref(pod) {
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
                None => crate::diagnose::DEFAULT_WINDOW,
                Some(Ok(ms)) => {
                    std::time::Duration::from_millis(ms).min(crate::diagnose::MAX_WINDOW)
                }
                Some(Err(_)) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "window_ms: expected milliseconds, e.g. window_ms=1000\n",
                    )
                }
            };
            let evidence = crate::diagnose::collect(&ctx, query, window).await;
            let body = serde_json::to_string_pretty(&evidence).unwrap_or_default();
            text(StatusCode::OK, body)
        }
        (&Method::POST, "/logging") => {
            let level = query_param(&req, "level");
            match level {
                None => text(
                    StatusCode::BAD_REQUEST,
                    "missing ?level=<filter>, e.g. /logging?level=info,access=off\n",
                ),
                Some(level) => {
                    let level = level
                        .replace("%2C", ",")
                        .replace("%3D", "=")
                        .replace("%3A", ":");
                    match crate::telemetry::set_filter(&level) {
                        Ok(()) => text(StatusCode::OK, format!("current log filter: {level}\n")),
                        Err(e) => text(StatusCode::BAD_REQUEST, format!("{e}\n")),
                    }
                }
            }
        }
        (&Method::POST, "/quitquitquit") => {
            ctx.shutdown.cancel();
            text(StatusCode::OK, "shutting down\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: see / for the endpoints\n",
        ),
    }
}

/// Handles a readiness request.
pub fn ready(req: &Request<Incoming>, readiness: &Readiness) -> Response<Body> {
    if req.uri().path() != "/healthz/ready" {
        return text(StatusCode::NOT_FOUND, "not found\n");
    }
    let pending = readiness.pending();
    if pending.is_empty() {
        text(StatusCode::OK, "ready\n")
    } else {
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {}\n", pending.join(", ")),
        )
    }
}

/// Handles a metrics request.
pub fn metrics(req: &Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/metrics" | "/stats/prometheus" => text(StatusCode::OK, crate::metrics::global().encode()),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}
