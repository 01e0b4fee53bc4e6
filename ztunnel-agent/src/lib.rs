//! ztunnel-agent: a node agent for Istio-style ambient meshes. eBPF programs capture pod
//! traffic; a tokio proxy inside each pod's network namespace carries it.

pub mod accesslog;
pub mod admin;
pub mod app;
pub mod authz;
pub mod cli;
pub mod config;
pub mod enroll;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod netns;
pub mod proxy;
pub mod readiness;
pub mod redirect;
pub mod socket;
pub mod state;
pub mod telemetry;
pub mod tls;
pub mod xds;
pub mod ztunnel_config;

/// istio-cni's ZDS messages, generated from proto/zds.proto.
#[allow(missing_docs, clippy::all)]
pub mod zds_proto {
    include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
}
