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
use crate::state::SharedState;

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
        "/quitquitquit",
        "POST: stop the agent (kernel redirect stays pinned)",
    ),
];

/// Handles an admin request.
pub async fn admin(
    req: Request<Incoming>,
    enrollment: Arc<Mutex<Enrollment>>,
    state: SharedState,
    shutdown: CancellationToken,
    config_json: Arc<serde_json::Value>,
) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/") => {
            let list: String = ENDPOINTS
                .iter()
                .map(|(p, d)| format!("{p}: {d}\n"))
                .collect();
            text(StatusCode::OK, list)
        }
        (&Method::GET, "/config_dump") => {
            let enrollment = enrollment.lock().await;
            let pods = enrollment.status();
            let mesh = enrollment.mesh();
            let dump = config_dump::build(
                &state.snapshot(),
                &mesh.certs,
                &mesh.tracker,
                &pods,
                &config_json,
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
        (&Method::POST, "/logging") => {
            let level = req
                .uri()
                .query()
                .unwrap_or_default()
                .split('&')
                .find_map(|kv| kv.strip_prefix("level="));
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
            shutdown.cancel();
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
