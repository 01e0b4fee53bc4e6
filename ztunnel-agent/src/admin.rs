//! Admin (127.0.0.1:15000), readiness (15021) and metrics (15020) endpoints.
//!
//! The admin server knows only its built-in endpoints (`/`, `/logging`, `/quitquitquit`);
//! everything else is an [`AdminHandler`] another component registers (`/config_dump`,
//! `/debug/diagnose`), so admin imports none of them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio_util::sync::CancellationToken;

use crate::http::{text, Body};
use crate::readiness::Readiness;

/// An admin response being built.
pub type Responding<'a> = Pin<Box<dyn Future<Output = Response<Body>> + Send + 'a>>;

/// An endpoint another component serves on the admin port.
pub trait AdminHandler: Send + Sync {
    /// The path it answers (`/config_dump`).
    fn path(&self) -> &'static str;
    /// What it is for, listed at `/`.
    fn description(&self) -> &'static str;
    /// Answers a request for [`AdminHandler::path`].
    fn handle(&self, req: Request<Incoming>) -> Responding<'_>;
}

/// The admin server's endpoints.
pub struct Admin {
    handlers: Vec<Arc<dyn AdminHandler>>,
    shutdown: CancellationToken,
}

impl Admin {
    /// An admin server whose `/quitquitquit` cancels `shutdown` (the agent then drains).
    pub fn new(shutdown: CancellationToken) -> Self {
        Self {
            handlers: Vec::new(),
            shutdown,
        }
    }

    /// Serves `handler` at its path.
    pub fn add_handler(&mut self, handler: Arc<dyn AdminHandler>) {
        self.handlers.push(handler);
    }

    fn endpoints(&self) -> Vec<(&'static str, &'static str)> {
        let mut list: Vec<(&'static str, &'static str)> = self
            .handlers
            .iter()
            .map(|h| (h.path(), h.description()))
            .collect();
        list.push((
            "/logging",
            "GET: the log filter; POST ?level=<RUST_LOG filter>: change it",
        ));
        list.push((
            "/debug/logs",
            "?lines=<n>: the agent's last log lines (at most 1000), oldest first",
        ));
        list.push((
            "/quitquitquit",
            "POST: drain and stop the agent, as SIGTERM does (kernel redirect stays pinned)",
        ));
        list
    }

    /// Handles an admin request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_string();
        if let Some(handler) = self.handlers.iter().find(|h| h.path() == path) {
            if req.method() != Method::GET {
                return text(
                    StatusCode::METHOD_NOT_ALLOWED,
                    format!("{path}: GET only\n"),
                );
            }
            return handler.handle(req).await;
        }
        match (req.method(), path.as_str()) {
            (&Method::GET, "/") => {
                let list: String = self
                    .endpoints()
                    .iter()
                    .map(|(p, d)| format!("{p}: {d}\n"))
                    .collect();
                text(StatusCode::OK, list)
            }
            (&Method::GET, "/logging") => text(
                StatusCode::OK,
                format!(
                    "current log filter: {}\n",
                    crate::telemetry::current_filter()
                ),
            ),
            (&Method::POST, "/logging") => match query_param(&req, "level") {
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
            },
            (&Method::GET, "/debug/logs") => {
                let lines = match query_param(&req, "lines").map(str::parse::<usize>) {
                    None => crate::telemetry::RECENT_LOG_LINES,
                    Some(Ok(n)) => n,
                    Some(Err(_)) => {
                        return text(
                            StatusCode::BAD_REQUEST,
                            "lines: expected a number of lines, e.g. lines=200\n",
                        )
                    }
                };
                let mut body = crate::telemetry::recent_log_lines(lines).join("\n");
                body.push('\n');
                text(StatusCode::OK, body)
            }
            (&Method::POST, "/quitquitquit") => {
                self.shutdown.cancel();
                text(StatusCode::OK, "shutting down\n")
            }
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: see / for the endpoints\n",
            ),
        }
    }
}

/// The query parameter `name`, if present.
pub fn query_param<'a>(req: &'a Request<Incoming>, name: &str) -> Option<&'a str> {
    query_value(req.uri().query().unwrap_or_default(), name)
}

/// The value of `name` in a query string (`a=1&b=2`), if present.
pub fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
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

/// Handles a metrics request: the same exposition on both paths, labelled OpenMetrics when
/// the scraper asks for it (Prometheus does), plain text otherwise, as upstream answers.
pub fn metrics(req: &Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/metrics" | "/stats/prometheus" => {
            let mut response = text(StatusCode::OK, crate::metrics::global().encode());
            let content_type = if wants_openmetrics(req) {
                "application/openmetrics-text;charset=utf-8;version=1.0.0"
            } else {
                "text/plain; charset=utf-8"
            };
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(content_type),
            );
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Whether `Accept` lists `application/openmetrics-text` (any parameters).
fn wants_openmetrics(req: &Request<Incoming>) -> bool {
    req.headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|media| {
            media.split(';').next().is_some_and(|t| {
                t.trim()
                    .eq_ignore_ascii_case("application/openmetrics-text")
            })
        })
}
