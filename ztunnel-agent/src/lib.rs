//! ztunnel-agent: a node agent for Istio-style ambient meshes. eBPF programs capture pod
//! traffic; a tokio proxy inside each pod's network namespace carries it.

pub mod accesslog;
pub mod admin;
pub mod allocator;
pub mod app;
pub mod authz;
pub mod cli;
pub mod config;
pub mod config_dump;
pub mod diagnose;
pub mod dns;
pub mod drain;
pub mod enroll;
pub mod http;
pub mod identity;
pub mod metrics;
pub mod netns;
pub mod profiling;
pub mod proxy;
pub mod readiness;
pub mod redirect;
pub mod socket;
pub mod spiffe;
pub mod state;
pub mod telemetry;
pub mod text_table;
pub mod tls;
pub mod xds;

/// Messages and services generated from proto/ (wire-compatible with Istio's and Envoy's),
/// nested by package as prost's cross-package paths require, with short aliases.
#[allow(missing_docs, clippy::all)]
pub mod proto {
    pub mod istio {
        pub mod workload {
            include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));
            pub mod zds {
                include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
            }
        }
        pub mod security {
            include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
        }
        pub mod v1 {
            pub mod auth {
                include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
            }
        }
    }
    pub mod envoy {
        pub mod config {
            pub mod core {
                pub mod v3 {
                    include!(concat!(env!("OUT_DIR"), "/envoy.config.core.v3.rs"));
                }
            }
        }
        pub mod service {
            pub mod discovery {
                pub mod v3 {
                    include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
                }
            }
        }
    }
    pub mod google {
        pub mod rpc {
            include!(concat!(env!("OUT_DIR"), "/google.rpc.rs"));
        }
    }
    pub use envoy::config::core::v3 as core;
    pub use envoy::service::discovery::v3 as discovery;
    pub use google::rpc;
    pub use istio::security;
    pub use istio::v1::auth as ca;
    pub use istio::workload;
}

/// istio-cni's ZDS messages, generated from proto/zds.proto.
pub use proto::istio::workload::zds as zds_proto;
