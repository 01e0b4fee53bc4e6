//! The validated configuration, built once from the command line and passed down.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::cli::{LogFormat, RunArgs};
use crate::redirect::{kernel, RedirectConfig};

/// Invalid settings, each naming the flag and the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Admin must stay on loopback.
    #[error("--admin-addr {0} is not a loopback address: the admin server exposes config and shutdown, keep it on 127.0.0.1 or [::1]")]
    AdminNotLoopback(SocketAddr),
    /// Nothing to enroll pods from.
    #[error("no pod source: set LOCAL_XDS_PATH (--local-xds-path) with NODE_NAME, or INPOD_UDS (--inpod-uds) for istio-cni")]
    NoPodSource,
    /// A local config needs a node name to know which workloads are local.
    #[error("LOCAL_XDS_PATH is set but NODE_NAME (--node-name) is not: the agent enrolls the workloads whose `node` is this node")]
    NoNodeName,
    /// Two configuration sources at once.
    #[error(
        "both LOCAL_XDS_PATH and XDS_ADDRESS are set: choose the local file (standalone) or istiod"
    )]
    TwoSources,
    /// xDS without a pod source.
    #[error("XDS_ADDRESS is set but INPOD_UDS is not: in control-plane mode pods are enrolled by istio-cni over ZDS")]
    XdsWithoutCni,
    /// A control-plane address or root bundle is unusable.
    #[error(transparent)]
    ControlPlane(#[from] crate::tls::grpc::Error),
    /// cgroup problems.
    #[error(transparent)]
    Kernel(#[from] kernel::Error),
    /// Certificates would be renewed constantly.
    #[error("--cert-ttl-secs {0} is below 60: certificates would be renewed constantly")]
    CertTtl(u64),
    /// A port list contains 0.
    #[error("{flag} contains port 0: list real destination ports")]
    PortZero {
        /// The flag.
        flag: &'static str,
    },
}

/// Everything the agent runs with.
#[derive(Clone, Debug)]
pub struct Config {
    /// Local mesh configuration file.
    pub local_xds_path: Option<PathBuf>,
    /// This node's name.
    pub node_name: Option<String>,
    /// istio-cni ZDS socket.
    pub inpod_uds: Option<PathBuf>,
    /// Cluster id.
    pub cluster_id: String,
    /// Redirect settings.
    pub redirect: RedirectConfig,
    /// Local CA directory.
    pub ca_dir: PathBuf,
    /// Trust domain.
    pub trust_domain: String,
    /// Certificate lifetime.
    pub cert_ttl: std::time::Duration,
    /// istiod's xDS server, in control-plane mode.
    pub xds: Option<crate::tls::grpc::Target>,
    /// istiod's CA; without it the local CA issues certificates.
    pub ca: Option<crate::tls::grpc::Target>,
    /// The mesh root bundle file, re-read for root rotation (control-plane mode).
    pub mesh_roots_path: Option<PathBuf>,
    /// Roots trusted for workload certificates besides those the CA returns.
    pub mesh_roots: Vec<rustls::pki_types::CertificateDer<'static>>,
    /// How the agent introduces itself to xDS.
    pub node: crate::xds::client::NodeInfo,
    /// Admin server address.
    pub admin_addr: SocketAddr,
    /// Metrics server address.
    pub metrics_addr: SocketAddr,
    /// Readiness server address.
    pub readiness_addr: SocketAddr,
    /// Log filter.
    pub log_filter: String,
    /// Log format.
    pub log_format: LogFormat,
    /// How long live connections may run on after SIGTERM before they are closed.
    pub drain_deadline: std::time::Duration,
    /// TCP keepalive on accepted and dialled sockets (None: off).
    pub keepalive: Option<crate::socket::Keepalive>,
    /// Connections to a pod's application carry the client's address.
    pub preserve_source_address: bool,
    /// What one pod can make the agent hold.
    pub limits: crate::proxy::Limits,
    /// Bound on the `istio_tcp_*` label sets.
    pub metrics_max_series: usize,
    /// Idle time after which a label set of deleted workloads is evicted.
    pub metrics_series_idle_timeout: std::time::Duration,
    /// `istio_build`'s `tag`.
    pub build_tag: String,
    /// The DNS proxy (capture on or off, where it forwards).
    pub dns: crate::dns::DnsSettings,
    /// The resolver configuration it forwards with.
    pub dns_resolv_conf: PathBuf,
    /// Why DNS capture is off although asked for (logged at start).
    pub dns_problem: Option<String>,
}

/// The drain deadline, with upstream ztunnel's rules: `CONNECTION_TERMINATION_DEADLINE` if
/// set; else the pod's grace period less 5 s (less 1 s for a grace period of 10 s or less,
/// at least 1 s), since the kubelet SIGKILLs at the grace period and the agent needs a
/// moment to close what is left, log it and exit; else 5 s.
pub fn drain_deadline(
    explicit: Option<std::time::Duration>,
    grace_period_secs: Option<u64>,
) -> std::time::Duration {
    use std::time::Duration;
    match (explicit, grace_period_secs) {
        (Some(deadline), _) => deadline,
        (None, Some(grace)) if grace > 10 => Duration::from_secs(grace - 5),
        (None, Some(grace)) => Duration::from_secs(grace.saturating_sub(1).max(1)),
        (None, None) => Duration::from_secs(5),
    }
}

impl Config {
    /// Validates the command line.
    pub fn from_args(args: &RunArgs) -> Result<Self, Error> {
        if !args.admin_addr.ip().is_loopback() {
            return Err(Error::AdminNotLoopback(args.admin_addr));
        }
        if args.xds_address.is_some() && args.local_xds_path.is_some() {
            return Err(Error::TwoSources);
        }
        if args.xds_address.is_some() && args.inpod_uds.is_none() {
            return Err(Error::XdsWithoutCni);
        }
        if args.local_xds_path.is_none() && args.inpod_uds.is_none() {
            return Err(Error::NoPodSource);
        }
        if args.local_xds_path.is_some() && args.node_name.is_none() {
            return Err(Error::NoNodeName);
        }
        if args.cert_ttl_secs < 60 {
            return Err(Error::CertTtl(args.cert_ttl_secs));
        }
        for (flag, ports) in [
            ("--exclude-outbound-ports", &args.exclude_outbound_ports),
            ("--exclude-inbound-ports", &args.exclude_inbound_ports),
        ] {
            if ports.contains(&0) {
                return Err(Error::PortZero { flag });
            }
        }
        let cgroup = match &args.cgroup_path {
            Some(path) => path.clone(),
            None => kernel::default_cgroup()?,
        };
        let token = Some(args.auth_token.clone()).filter(|p| p.exists());
        let xds = match &args.xds_address {
            Some(address) => {
                let roots = crate::tls::grpc::read_roots("XDS_ROOT_CA", &args.xds_root_ca)?;
                Some(crate::tls::grpc::Target::new(
                    "XDS_ADDRESS",
                    address,
                    None,
                    roots,
                    token.clone(),
                )?)
            }
            None => None,
        };
        // istiod serves both on one address; CA_ADDRESS alone selects the CA only.
        let ca_address = args.ca_address.as_ref().or(args.xds_address.as_ref());
        let (ca, mesh_roots) = match ca_address {
            Some(address) => {
                let roots = crate::tls::grpc::read_roots("CA_ROOT_CA", &args.ca_root_ca)?;
                let target = crate::tls::grpc::Target::new(
                    "CA_ADDRESS",
                    address,
                    None,
                    roots.clone(),
                    token,
                )?;
                (Some(target), roots)
            }
            None => (None, Vec::new()),
        };
        // Without a resolver to forward to, capturing DNS would break every non-mesh name:
        // the pods keep resolving directly, and the start-up log says why.
        let (dns, dns_problem) = if args.dns_capture {
            match crate::dns::DnsSettings::from_resolv_conf(&args.dns_resolv_conf) {
                Ok(dns) => (dns, None),
                Err(e) => (crate::dns::DnsSettings::default(), Some(e.to_string())),
            }
        } else {
            (crate::dns::DnsSettings::default(), None)
        };
        let node = crate::xds::client::NodeInfo::new(
            args.pod_name.as_deref(),
            args.pod_namespace.as_deref(),
            args.instance_ip,
            args.node_name.as_deref(),
            &args.cluster_id,
        );
        Ok(Self {
            mesh_roots_path: ca.as_ref().map(|_| args.ca_root_ca.clone()),
            xds,
            ca,
            mesh_roots,
            node,
            local_xds_path: args.local_xds_path.clone(),
            node_name: args.node_name.clone(),
            inpod_uds: args.inpod_uds.clone(),
            cluster_id: args.cluster_id.clone(),
            redirect: RedirectConfig {
                pin_dir: args.pin_dir.clone(),
                cgroup,
                exclude_outbound_ports: args.exclude_outbound_ports.clone(),
                exclude_inbound_ports: args.exclude_inbound_ports.clone(),
                kernel_relay: args.kernel_relay,
            },
            dns,
            dns_problem,
            dns_resolv_conf: args.dns_resolv_conf.clone(),
            ca_dir: args.ca_dir.clone(),
            trust_domain: args.trust_domain.clone(),
            cert_ttl: std::time::Duration::from_secs(args.cert_ttl_secs),
            admin_addr: args.admin_addr,
            metrics_addr: args.metrics_addr,
            readiness_addr: args.readiness_addr,
            log_filter: args.log_filter.clone(),
            log_format: args.log_format,
            drain_deadline: drain_deadline(
                args.connection_termination_deadline,
                args.termination_grace_period_seconds,
            ),
            preserve_source_address: args.preserve_source_address,
            limits: crate::proxy::Limits {
                connections_per_pod: args.max_connections_per_pod,
                handshakes_per_peer: args.max_handshakes_per_peer,
                handshake_timeout: args.hbone_handshake_timeout,
                max_header_bytes: args.hbone_max_header_bytes,
                streams_per_connection: args.hbone_max_streams_per_connection,
                streams_per_peer: args.hbone_max_streams_per_peer,
                pending_connects_per_peer: args.hbone_max_pending_connects_per_peer,
            },
            keepalive: args.keepalive_enabled.then_some(crate::socket::Keepalive {
                time: args.keepalive_time,
                interval: args.keepalive_interval,
                retries: args.keepalive_retries,
            }),
            metrics_max_series: args.metrics_max_series,
            metrics_series_idle_timeout: args.metrics_series_idle_timeout,
            build_tag: args
                .istio_version
                .clone()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_deadline_follows_upstream() {
        let s = std::time::Duration::from_secs;
        assert_eq!(drain_deadline(None, Some(30)), s(25));
        assert_eq!(drain_deadline(None, Some(10)), s(9));
        assert_eq!(drain_deadline(None, Some(1)), s(1));
        assert_eq!(drain_deadline(None, None), s(5));
        assert_eq!(drain_deadline(Some(s(3)), Some(30)), s(3));
    }
}
