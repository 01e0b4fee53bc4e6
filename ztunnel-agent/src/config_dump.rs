//! `/config_dump` in upstream ztunnel's shape (CONTRACTS.md), so `istioctl ztunnel-config`
//! and people used to it read it: camelCase, workloads sorted by uid, services by hostname,
//! certificates with base64 PEM and decimal serial numbers, live connections per workload.

use base64::Engine as _;
use serde_json::{json, Map, Value};

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use tokio::sync::Mutex;

use crate::admin::{AdminHandler, Responding};
use crate::enroll::{Enrollment, PodStatus};
use crate::http::text;
use crate::identity::manager::CertManager;
use crate::proxy::tracker::Tracker;
use crate::state::MeshState;
use crate::telemetry::rfc3339;

/// `/config_dump` on the admin port.
pub struct ConfigDumpHandler {
    /// Enrolled pods and the mesh they are served from.
    pub enrollment: Arc<Mutex<Enrollment>>,
    /// The `config` section.
    pub config_json: Value,
}

impl AdminHandler for ConfigDumpHandler {
    fn path(&self) -> &'static str {
        "/config_dump"
    }

    fn description(&self) -> &'static str {
        "workloads, services, policies, certificates, pods (JSON)"
    }

    fn handle(&self, _req: Request<Incoming>) -> Responding<'_> {
        Box::pin(async move {
            // The lock only for the pod list: building the dump does not hold up enrollment.
            let (pods, mesh) = {
                let enrollment = self.enrollment.lock().await;
                (enrollment.status(), enrollment.mesh().clone())
            };
            let dump = build(
                &mesh.state.snapshot(),
                &mesh.certs,
                &mesh.tracker,
                &pods,
                &self.config_json,
            );
            let body = serde_json::to_string_pretty(&dump).unwrap_or_default();
            text(StatusCode::OK, body)
        })
    }
}

/// A certificate as upstream dumps it.
fn cert_entry(der: &[u8]) -> Value {
    let b64 = base64::engine::general_purpose::STANDARD;
    let pem = crate::tls::pem::pem_encode(&der.into());
    let parsed = x509_parser::parse_x509_certificate(der)
        .ok()
        .map(|(_, c)| c);
    json!({
        "pem": b64.encode(pem.as_bytes()),
        "serialNumber": parsed.as_ref().map(|c| c.serial.to_string()).unwrap_or_default(),
        "validFrom": parsed.as_ref().map(|c| rfc3339(c.validity().not_before.timestamp())),
        "expirationTime": parsed.as_ref().map(|c| rfc3339(c.validity().not_after.timestamp())),
    })
}

fn workloads(state: &MeshState) -> Vec<Value> {
    state
        .workloads()
        .map(|w| {
            let mut v = serde_json::to_value(&**w).unwrap_or_default();
            if let Some(obj) = v.as_object_mut() {
                // Upstream lists the services a workload backs by key; the port maps are the
                // services' endpoints.
                let services: Vec<&String> = w.services.keys().collect();
                obj.insert("services".into(), json!(services));
                let id = w.identity();
                obj.insert("trustDomain".into(), json!(id.trust_domain));
                obj.insert("serviceAccount".into(), json!(id.service_account));
                obj.insert("uid".into(), json!(w.key()));
                if w.netns.is_none() {
                    obj.remove("netns");
                }
            }
            v
        })
        .collect()
}

fn services(state: &MeshState) -> Vec<Value> {
    let mut list: Vec<Value> = state
        .services()
        .map(|entry| {
            let s = &entry.service;
            let endpoints: Map<String, Value> = entry
                .endpoints
                .iter()
                .map(|(uid, ports)| {
                    let status = state
                        .workload(uid)
                        .map(|w| format!("{:?}", w.status))
                        .unwrap_or_else(|| "Unhealthy".into());
                    (
                        uid.clone(),
                        json!({"workloadUid": uid, "port": ports, "status": status}),
                    )
                })
                .collect();
            json!({
                "name": s.name,
                "namespace": s.namespace,
                "hostname": s.hostname,
                "vips": s.vips,
                "ports": s.ports,
                "endpoints": endpoints,
                "subjectAltNames": s.subject_alt_names,
                "waypoint": s.waypoint,
                "loadBalancer": s.load_balancer,
            })
        })
        .collect();
    list.sort_by(|a, b| a["hostname"].as_str().cmp(&b["hostname"].as_str()));
    list
}

fn certificates(certs: &CertManager) -> Vec<Value> {
    let roots: Vec<Value> = certs.roots().iter().map(|r| cert_entry(r)).collect();
    certs
        .all()
        .iter()
        .map(|(identity, state, cert)| {
            let chain: Vec<Value> = cert
                .iter()
                .flat_map(|c| c.certified.cert.iter())
                .map(|d| cert_entry(d))
                .collect();
            json!({
                "identity": identity.to_string(),
                "state": state.to_string(),
                "certChain": chain,
                "rootCerts": roots,
            })
        })
        .collect()
}

fn workload_state(pods: &[PodStatus], tracker: &Tracker) -> Map<String, Value> {
    let live = tracker.by_pod();
    pods.iter()
        .map(|p| {
            let inbound: Vec<Value> = live
                .get(&p.uid)
                .into_iter()
                .flatten()
                .map(|c| {
                    json!({
                        "src": c.src.to_string(),
                        "originalDst": c.dst.to_string(),
                        "actualDst": c.dst.to_string(),
                        "protocol": if c.mtls { "HBONE" } else { "TCP" },
                    })
                })
                .collect();
            (
                p.uid.clone(),
                json!({
                    "state": "Up",
                    "info": {"name": p.name, "namespace": p.namespace, "serviceAccount": p.service_account},
                    "connections": {"inbound": inbound, "outbound": []},
                    "netnsCookie": p.netns_cookie,
                    "enrolledBy": p.source,
                    "dnsCapture": p.dns_capture,
                    "sourceAddress": p.source_address,
                }),
            )
        })
        .collect()
}

/// Builds the whole dump.
pub fn build(
    state: &MeshState,
    certs: &CertManager,
    tracker: &Tracker,
    pods: &[PodStatus],
    config: &Value,
) -> Value {
    json!({
        "workloads": workloads(state),
        "services": services(state),
        "policies": state.policies().map(|p| &**p).collect::<Vec<_>>(),
        "certificates": certificates(certs),
        "workloadState": workload_state(pods, tracker),
        "staticConfig": {},
        "config": config,
        "version": env!("CARGO_PKG_VERSION"),
    })
}
