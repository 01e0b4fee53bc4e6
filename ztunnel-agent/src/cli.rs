//! Command line. Every `run` setting is a flag that can also come from the environment
//! variable upstream ztunnel's DaemonSet uses for the same thing.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use crate::telemetry::LogFormat;

pub mod admin_client;
pub mod bug_report;
pub mod config;
pub mod diagnose;
pub mod redirect;

/// Default pin directory for maps and links.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ztunnel";

/// ztunnel-agent: node agent for Istio-style ambient meshes.
#[derive(Debug, Parser)]
#[command(name = "ztunnel-agent", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent.
    Run(Box<RunArgs>),
    /// Show a running agent's (or a saved) configuration, like `istioctl ztunnel-config`.
    Config(ConfigArgs),
    /// Is a pod's traffic going through the mesh, and if not, why (exit 0: healthy; 1: a
    /// link is broken, named on the last line; 2: the agent could not be asked). `diagnose
    /// flow <ns>/<pod> <host-or-ip>:<port>` explains one connection before it is sent.
    Diagnose(DiagnoseArgs),
    /// Collect what a maintainer needs into one archive (settings with secrets cut,
    /// config_dump, diagnose, metrics, recent logs and connections, the kernel's pinned
    /// state); works with the agent down too, listing what it could not collect.
    BugReport(bug_report::BugReportArgs),
    /// Inspect or remove the kernel redirect.
    Redirect {
        /// What to do with it.
        #[command(subcommand)]
        action: RedirectAction,
    },
}

/// `redirect` subcommands.
#[derive(Debug, Subcommand)]
pub enum RedirectAction {
    /// Print the pinned maps and links, decoded.
    Dump(PinDirArg),
    /// Detach every program and remove every pin (captured pods fall back to no capture).
    Uninstall(PinDirArg),
}

/// `config` arguments.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// Which section.
    #[arg(value_enum)]
    pub section: config::Section,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "short")]
    pub output: config::Output,
    /// The agent's admin endpoint.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_address: std::net::SocketAddr,
    /// Read a saved config_dump instead of asking an agent.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Only this namespace.
    #[arg(long)]
    pub namespace: Option<String>,
    /// Only workloads on this node.
    #[arg(long)]
    pub node: Option<String>,
    /// Only this workload (pod name).
    #[arg(long)]
    pub workload_name: Option<String>,
}

/// `diagnose` arguments.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DiagnoseArgs {
    /// A question other than "is this pod captured".
    #[command(subcommand)]
    pub question: Option<DiagnoseQuestion>,
    /// The pod, as `<namespace>/<pod>`; without it, a summary of the node.
    pub pod: Option<String>,
    /// The agent's admin endpoint.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_address: std::net::SocketAddr,
    /// How long to watch the capture counters, in milliseconds (at most 3000).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(0..=3000))]
    pub window_ms: u64,
    /// Print the agent's evidence as JSON instead of the verdict.
    #[arg(long)]
    pub json: bool,
}

/// `diagnose` subcommands.
#[derive(Debug, Subcommand)]
pub enum DiagnoseQuestion {
    /// What would happen to a connection from this pod to that destination, without sending
    /// it: capture, name resolution, the endpoint the round robin picks next, the protocol
    /// and `:authority`, the source certificate, the HBONE pool and the authorization verdict
    /// (exit 0: it would flow, or is deliberately not captured (an excluded port, loopback);
    /// 1: a step would fail, named on the last line; 2: the agent could not be asked).
    Flow(FlowArgs),
}

/// `diagnose flow` arguments.
#[derive(Debug, Args)]
pub struct FlowArgs {
    /// The source pod, as `<namespace>/<pod>`.
    pub pod: String,
    /// The destination, as the application would dial it: `reviews:9080`,
    /// `reviews.default.svc.cluster.local:9080`, `10.96.0.14:9080`, `[fd00::1]:9080`.
    pub destination: String,
    /// The agent's admin endpoint.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_address: std::net::SocketAddr,
    /// Print the explanation as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The pin directory argument shared by `redirect` subcommands.
#[derive(Debug, Args)]
pub struct PinDirArg {
    /// Where the agent pins maps and links.
    #[arg(long, env = "ZTUNNEL_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
}

/// `run` settings.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Local mesh configuration (upstream ztunnel's LOCAL_XDS_PATH YAML); workloads on this
    /// node with a `netns` field are enrolled.
    #[arg(long, env = "LOCAL_XDS_PATH")]
    pub local_xds_path: Option<PathBuf>,
    /// Name of this node; workloads whose `node` matches are local.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// The agent's own pod name.
    #[arg(long, env = "POD_NAME")]
    pub pod_name: Option<String>,
    /// The agent's own namespace.
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
    /// The agent's own IP.
    #[arg(long, env = "INSTANCE_IP")]
    pub instance_ip: Option<std::net::IpAddr>,
    /// xDS server (istiod), for the control-plane mode.
    #[arg(long, env = "XDS_ADDRESS")]
    pub xds_address: Option<String>,
    /// CA server (istiod), for the control-plane mode.
    #[arg(long, env = "CA_ADDRESS")]
    pub ca_address: Option<String>,
    /// Root certificate bundle (PEM, may hold several roots) that signs the xDS server's
    /// certificate.
    #[arg(
        long,
        env = "XDS_ROOT_CA",
        default_value = "/var/run/secrets/istio/root-cert.pem"
    )]
    pub xds_root_ca: PathBuf,
    /// Root certificate bundle that signs the CA server's certificate; also trusted as mesh
    /// roots for workload certificates.
    #[arg(
        long,
        env = "CA_ROOT_CA",
        default_value = "/var/run/secrets/istio/root-cert.pem"
    )]
    pub ca_root_ca: PathBuf,
    /// Token file sent as `authorization: Bearer <token>` to xDS and the CA (re-read per
    /// call; no file, no token).
    #[arg(
        long,
        env = "AUTH_TOKEN",
        default_value = "/var/run/secrets/tokens/istio-token"
    )]
    pub auth_token: PathBuf,
    /// Cluster id.
    #[arg(long, env = "CLUSTER_ID", default_value = "Kubernetes")]
    pub cluster_id: String,
    /// istio-cni's ZDS socket; when set, pods are enrolled from it.
    #[arg(long, env = "INPOD_UDS")]
    pub inpod_uds: Option<PathBuf>,
    /// Log filter, RUST_LOG syntax (e.g. `info,access=off`).
    #[arg(long = "log", env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "plain")]
    pub log_format: LogFormat,
    /// Threads of the proxy runtime (upstream's setting; 2 by default, as upstream).
    #[arg(
        long,
        env = "ZTUNNEL_WORKER_THREADS",
        default_value_t = 2,
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    pub worker_threads: u16,
    /// Where maps and links are pinned (one directory per agent).
    #[arg(long, env = "ZTUNNEL_PIN_DIR", default_value = DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// cgroup v2 directory the capture programs attach to [default: the kubepods cgroup if
    /// present, else the cgroup v2 root].
    #[arg(long, env = "ZTUNNEL_CGROUP_PATH")]
    pub cgroup_path: Option<PathBuf>,
    /// Destination ports never captured outbound (comma-separated).
    #[arg(long, env = "ZTUNNEL_EXCLUDE_OUTBOUND_PORTS", value_delimiter = ',')]
    pub exclude_outbound_ports: Vec<u16>,
    /// Destination ports never captured inbound (comma-separated).
    #[arg(long, env = "ZTUNNEL_EXCLUDE_INBOUND_PORTS", value_delimiter = ',')]
    pub exclude_inbound_ports: Vec<u16>,
    /// Directory of the local CA's root (root-cert.pem, root-key.pem); created on first start.
    #[arg(
        long,
        env = "ZTUNNEL_CA_DIR",
        default_value = "/var/lib/ztunnel-agent/ca"
    )]
    pub ca_dir: PathBuf,
    /// Trust domain of workload identities.
    #[arg(long, env = "TRUST_DOMAIN", default_value = "cluster.local")]
    pub trust_domain: String,
    /// Lifetime of workload certificates in seconds (renewed at half life).
    #[arg(long, env = "ZTUNNEL_CERT_TTL_SECS", default_value_t = 86400)]
    pub cert_ttl_secs: u64,
    /// Admin server (loopback only).
    #[arg(long, env = "ZTUNNEL_ADMIN_ADDR", default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Prometheus metrics server.
    #[arg(long, env = "ZTUNNEL_METRICS_ADDR", default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Readiness server.
    #[arg(long, env = "ZTUNNEL_READINESS_ADDR", default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// The agent pod's termination grace period, in seconds (as upstream ztunnel, set equal to
    /// the pod spec's): on SIGTERM live connections may run on until a drain deadline 5 s
    /// shorter (1 s for 10 s or less), then are closed. Unset: a 5 s deadline.
    #[arg(long, env = "TERMINATION_GRACE_PERIOD_SECONDS")]
    pub termination_grace_period_seconds: Option<u64>,
    /// The drain deadline itself (e.g. `20s`), overriding the one derived from the grace
    /// period (upstream's setting).
    #[arg(long, env = "CONNECTION_TERMINATION_DEADLINE", value_parser = parse_duration)]
    pub connection_termination_deadline: Option<std::time::Duration>,
    /// TCP keepalive on every socket the agent accepts or opens.
    #[arg(long, env = "KEEPALIVE_ENABLED", default_value_t = true, action = clap::ArgAction::Set)]
    pub keepalive_enabled: bool,
    /// Idle time before the first keepalive probe (e.g. `180s`, `3m`).
    #[arg(long, env = "KEEPALIVE_TIME", default_value = "180s", value_parser = parse_keepalive_duration)]
    pub keepalive_time: std::time::Duration,
    /// Time between keepalive probes.
    #[arg(long, env = "KEEPALIVE_INTERVAL", default_value = "180s", value_parser = parse_keepalive_duration)]
    pub keepalive_interval: std::time::Duration,
    /// Unanswered probes before a connection is dropped.
    #[arg(long, env = "KEEPALIVE_RETRIES", default_value_t = 9, value_parser = clap::value_parser!(u32).range(1..=127))]
    pub keepalive_retries: u32,
    /// The most label sets the `istio_tcp_*` metric families hold (each is one series in each
    /// of the five families). At the bound the least recently active idle set makes room;
    /// when every set has a live connection, new ones are not counted
    /// (`ztunnel_metric_series_refused_total`).
    #[arg(long, env = "METRICS_MAX_SERIES", default_value_t = crate::metrics::DEFAULT_MAX_SERIES, value_parser = parse_max_series)]
    pub metrics_max_series: usize,
    /// How long an `istio_tcp_*` label set whose workloads were deleted stays after its last
    /// connection ended (e.g. `10m`); then it is evicted, so pod churn does not grow the
    /// series without end.
    #[arg(long, env = "METRICS_SERIES_IDLE_TIMEOUT", default_value = "10m", value_parser = parse_duration)]
    pub metrics_series_idle_timeout: std::time::Duration,
    /// Capture enrolled pods' DNS (UDP and TCP port 53) into the agent's DNS proxy on
    /// 127.0.0.1:15053 in each pod, which answers mesh names and forwards the rest (upstream's
    /// DNS_CAPTURE proxy metadata; on by default, as upstream).
    #[arg(long, env = "ISTIO_META_DNS_CAPTURE", default_value_t = true, action = clap::ArgAction::Set, value_parser = parse_bool_setting)]
    pub dns_capture: bool,
    /// Connections one pod's listeners may hold at once, each way (outbound on 15001;
    /// inbound on 15006 and 15008 together, every HBONE stream counted as one): past it new
    /// ones are reset (streams answered 503), so one pod cannot use up the agent's file
    /// descriptors for all.
    #[arg(long, env = "ZTUNNEL_MAX_CONNECTIONS_PER_POD", default_value_t = 32768, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections_per_pod: usize,
    /// TLS and HTTP/2 handshakes one peer address may have in progress on a pod's 15008: a
    /// peer that connects and stalls costs a bounded amount, and other peers go on.
    #[arg(long, env = "ZTUNNEL_MAX_HANDSHAKES_PER_PEER", default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_handshakes_per_peer: usize,
    /// How long a handshake on 15008 may take (e.g. `10s`).
    #[arg(long, env = "ZTUNNEL_HBONE_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub hbone_handshake_timeout: std::time::Duration,
    /// The largest header block an HBONE CONNECT may carry, in bytes.
    #[arg(long, env = "ZTUNNEL_HBONE_MAX_HEADER_BYTES", default_value_t = 16384, value_parser = clap::value_parser!(u32).range(1024..))]
    pub hbone_max_header_bytes: u32,
    /// CONNECT streams one HBONE connection to a pod may have open at once (advertised to the
    /// client as HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS; a client that opens more anyway
    /// gets REFUSED_STREAM from HTTP/2 itself).
    #[arg(long, env = "ZTUNNEL_HBONE_MAX_STREAMS_PER_CONNECTION", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub hbone_max_streams_per_connection: u32,
    /// CONNECT streams one peer address may have open on one pod at once, across all its
    /// HBONE connections (by default half of the default ZTUNNEL_MAX_CONNECTIONS_PER_POD, so
    /// one peer address, even a waypoint's, cannot take a pod's whole inbound budget).
    #[arg(long, env = "ZTUNNEL_HBONE_MAX_STREAMS_PER_PEER", default_value_t = 16384, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub hbone_max_streams_per_peer: usize,
    /// CONNECT streams one peer address may have waiting more than 100 ms for a connection
    /// to a pod's application at once (an application that stops accepting holds them until
    /// the connect times out); past it, such CONNECTs from that peer are answered 503.
    #[arg(long, env = "ZTUNNEL_HBONE_MAX_PENDING_CONNECTS_PER_PEER", default_value_t = 1024, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub hbone_max_pending_connects_per_peer: usize,
    /// Connect to each pod's application from the client's address (its pod IP and port
    /// over HBONE, the peer's IP for plaintext), so the application's logs, allow-lists and
    /// rate limits see the client; off, the application sees its own pod's address.
    /// Upstream's ENABLE_ORIG_SRC; on by default. A pod whose kernel refuses falls back.
    #[arg(long, env = "ENABLE_ORIG_SRC", default_value_t = true, action = clap::ArgAction::Set, value_parser = parse_bool_setting)]
    pub preserve_source_address: bool,
    /// Let the kernel move the bytes of interactive plain passthrough connections (outbound
    /// to a destination outside the mesh, inbound plaintext): such a connection starts
    /// spliced and, after 8 small moves and no large one, an `sk_skb` program sends what one
    /// of the agent's two sockets receives out of the other, so the payload no longer wakes
    /// the agent. Off by default: the kernel gives the relay no flow control of its own. A
    /// direction whose destination falls more than 8 MiB behind is handed back to the
    /// agent, which copies the rest under TCP's flow control; but a client that sends
    /// without reading (or much faster than it reads) while its server sends too cannot be
    /// held back: past 16 MiB the kernel drops its bytes and the agent resets the
    /// connection, which TCP would only have stalled. Off, for bulk from the start, or where
    /// the kernel refuses a connection, the agent splices it to the end.
    #[arg(long, env = "ZTUNNEL_KERNEL_RELAY", default_value_t = false, action = clap::ArgAction::Set, value_parser = parse_bool_setting)]
    pub kernel_relay: bool,
    /// Where the DNS proxy finds the resolvers it forwards non-mesh names to (its
    /// `nameserver` lines; upstream uses the agent's own /etc/resolv.conf too).
    #[arg(
        long,
        env = "ZTUNNEL_DNS_RESOLV_CONF",
        default_value = "/etc/resolv.conf"
    )]
    pub dns_resolv_conf: PathBuf,
    /// The Istio version the chart deploys this agent as: the `tag` of `istio_build`, which
    /// Istio's dashboard groups by [default: this build's version].
    #[arg(long, env = "ISTIO_META_ISTIO_VERSION")]
    pub istio_version: Option<String>,
}

/// `true`/`false` in any case (upstream compares DNS_CAPTURE lowercased to "true").
fn parse_bool_setting(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(format!("`{text}` is not a boolean: write true or false")),
    }
}

fn parse_max_series(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "`{text}` is not a series bound: give a whole number of label sets, at least 1 (default {})",
            crate::metrics::DEFAULT_MAX_SERIES
        )),
    }
}

/// A keepalive time or interval: a duration of whole seconds the kernel takes (1-32767 s).
fn parse_keepalive_duration(text: &str) -> Result<std::time::Duration, String> {
    let d = parse_duration(text)?;
    if d.subsec_nanos() != 0 || !(1..=32_767).contains(&d.as_secs()) {
        return Err(format!(
            "`{text}`: TCP keepalive takes whole seconds from 1s to 32767s (the kernel's range); \
             default 180s"
        ));
    }
    Ok(d)
}

/// A duration as upstream's settings write it: `180s`, `3m`, `500ms`, `1h`, or bare seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration: write e.g. 180s, 3m, 500ms"))?;
    let d = match unit {
        "" | "s" => std::time::Duration::from_secs(n),
        "ms" => std::time::Duration::from_millis(n),
        "m" => std::time::Duration::from_secs(n * 60),
        "h" => std::time::Duration::from_secs(n * 3600),
        other => {
            return Err(format!(
                "unknown unit `{other}` in `{text}`: use ms, s, m or h"
            ))
        }
    };
    if d.is_zero() {
        return Err(format!("`{text}`: the duration must be more than zero"));
    }
    Ok(d)
}

/// Prints `error: <e and its causes>` and returns failure.
pub fn fail(e: &dyn std::error::Error) -> std::process::ExitCode {
    eprintln!("error: {}", crate::telemetry::ErrorChain(e));
    std::process::ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A keepalive setting the kernel would refuse is refused with the flag's range, where
    /// it would otherwise fail every pod's listeners.
    #[test]
    fn keepalive_durations_are_whole_seconds_in_the_kernels_range() {
        for good in ["1s", "180s", "3m", "32767", "1000ms"] {
            assert!(parse_keepalive_duration(good).is_ok(), "{good}");
        }
        for bad in ["500ms", "1500ms", "32768s", "10h"] {
            let e = parse_keepalive_duration(bad).expect_err(bad);
            assert!(e.contains("1s to 32767s"), "{bad}: {e}");
        }
    }
}
