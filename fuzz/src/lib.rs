//! The bodies of the fuzz targets: every parser and converter of outside input, one function
//! per target, taking the raw input. `fuzz_targets/<name>.rs` hands them to libFuzzer
//! (`cargo xtask fuzz`, coverage-guided, nightly); the main test suite includes this file in
//! `tests/tests/fuzz_replay.rs`, which replays the committed corpora and mutates them for a
//! bounded time on the stable build (what CI runs). Each body must never panic.

use rustls::pki_types::CertificateDer;
use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use ztunnel_agent::admin::query_value;
use ztunnel_agent::proxy::hbone::server::{client_addr, forwarded_for, inbound_target};
use ztunnel_agent::state::MeshState;
use ztunnel_agent::xds::client::{check_resource, ADDRESS_TYPE, AUTHORIZATION_TYPE};
use ztunnel_common::convert::{ip_from_key, orig_dst_addr, sum_counters};
use ztunnel_common::{OrigDst, PodCounters};

/// The local config file (YAML) as `--local-xds-path` reads it, through to the mesh state.
pub fn local_config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = ztunnel_agent::xds::local::load_state(std::path::Path::new("fuzz.yaml"), text);
    }
}

/// An xDS resource body as istiod sends it (`istio.workload.Address` or
/// `istio.security.Authorization` bytes), decoded and converted to the mesh state's types.
pub fn xds_resource(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let type_url = if selector % 2 == 0 {
        ADDRESS_TYPE
    } else {
        AUTHORIZATION_TYPE
    };
    let _ = check_resource(type_url, body);
}

/// A ZDS datagram from istio-cni: `WorkloadRequest` bytes with its ancillary-data cases
/// (truncated, zero to three file descriptors).
pub fn zds_request(data: &[u8]) {
    let Some((&flags, bytes)) = data.split_first() else {
        return;
    };
    let truncated = flags & 1 == 1;
    let fds = usize::from((flags >> 1) & 3);
    let _ = ztunnel_agent::enroll::zds::parse_request(bytes, truncated, fds);
}

const MESH: &str = r#"
workloads:
- {uid: c, name: client, namespace: default, protocol: HBONE, workloadIps: [10.0.0.1, "fd00::1"]}
- {uid: s, name: server, namespace: default, protocol: HBONE, workloadIps: [10.0.0.2],
   services: {"default/server.default.svc.cluster.local": {80: 8080}},
   waypoint: {destination: "/10.96.0.3", hboneMtlsPort: 15008}}
- {uid: w, name: waypoint, namespace: default, protocol: HBONE, workloadIps: [10.0.0.3],
   services: {"default/waypoint.default.svc.cluster.local": {15008: 15008}}}
services:
- {name: server, namespace: default, hostname: server.default.svc.cluster.local,
   vips: ["/10.96.0.2"], ports: {80: 8080}, waypoint: {destination: "default/waypoint.default.svc.cluster.local", hboneMtlsPort: 15008}}
- {name: waypoint, namespace: default, hostname: waypoint.default.svc.cluster.local,
   vips: ["/10.96.0.3"], ports: {15008: 15008}}
"#;

fn mesh() -> &'static MeshState {
    static MESH_STATE: OnceLock<MeshState> = OnceLock::new();
    MESH_STATE.get_or_init(|| {
        ztunnel_agent::xds::local::load_state(std::path::Path::new("mesh.yaml"), MESH)
            .map(|(state, _)| state)
            .expect("the target's mesh loads")
    })
}

/// An HBONE CONNECT as a pod's 15008 server sees it: `:authority`, the `forwarded` header
/// and the connection's local address (lines of the input), checked against a mesh with a
/// waypoint (the sandwich rules) and the source-address trust rules.
pub fn hbone_connect(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split('\n');
    let authority = lines.next().unwrap_or_default();
    let forwarded = lines.next().unwrap_or_default();
    let local: IpAddr = lines
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or(IpAddr::from([10, 0, 0, 3]));
    let mesh = mesh();
    let waypoint = mesh.workload_by_ip("", IpAddr::from([10, 0, 0, 3]));
    if let Ok(target) = authority.parse::<SocketAddr>() {
        let pod_ips = [IpAddr::from([10, 0, 0, 3])];
        let _ = inbound_target(mesh, "", &pod_ips, local, waypoint.as_deref(), target);
    }
    let peer = SocketAddr::new(IpAddr::from([10, 0, 0, 1]), 40000);
    let identity = mesh
        .workload_by_ip("", IpAddr::from([10, 0, 0, 1]))
        .map(|w| w.identity());
    let _ = client_addr(mesh, "", peer, identity.as_ref(), forwarded_for(forwarded));
}

/// The admin server's query strings (`/debug/logs?lines=`, `/logging?level=`,
/// `/debug/pprof/profile?seconds=&frequency=`, `/debug/diagnose?pod=&window_ms=`,
/// `/debug/flow?pod=&dst=`) through the parsers each handler uses.
pub fn admin_query(data: &[u8]) {
    let Ok(query) = std::str::from_utf8(data) else {
        return;
    };
    let _ = query_value(query, "lines").map(str::parse::<usize>);
    let _ = query_value(query, "window_ms").map(str::parse::<u64>);
    if let Some(level) = query_value(query, "level") {
        // No logger is installed here: the filter is parsed, then refused for want of one.
        let _ = ztunnel_agent::telemetry::set_filter(level);
    }
    let _ = ztunnel_agent::profiling::ProfileRequest::parse(
        query_value(query, "seconds"),
        query_value(query, "frequency"),
    );
    let decoded = |name| {
        query_value(query, name).map(|v| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
    };
    if let Some(pod) = decoded("pod") {
        let _ = ztunnel_agent::diagnose::evidence::parse_pod_ref(&pod);
    }
    if let Some(dst) = decoded("dst") {
        let _ = ztunnel_agent::diagnose::flow::split_destination(&dst);
    }
}

/// A CA's answer (`cert_chain`, PEM strings separated by NUL in the input) as the CA client
/// checks it, and a peer's DER certificate as the TLS verifiers read its SPIFFE identity.
pub fn ca_chain(data: &[u8]) {
    let chain: Vec<String> = data
        .split(|b| *b == 0)
        .map(|part| String::from_utf8_lossy(part).into_owned())
        .collect();
    let _ = ztunnel_agent::identity::caclient::check_chain(
        &chain,
        "spiffe://cluster.local/ns/default/sa/x",
    );
    let _ = ztunnel_agent::tls::spiffe_identity(&CertificateDer::from(data));
    let _ = ztunnel_agent::tls::pem::parse_pem_certs(data);
}

fn word(data: &[u8], i: usize) -> u32 {
    let mut b = [0u8; 4];
    for (k, byte) in b.iter_mut().enumerate() {
        *byte = data.get(i * 4 + k).copied().unwrap_or(0);
    }
    u32::from_ne_bytes(b)
}

/// Values the agent reads back from the eBPF maps (original destinations, address keys, the
/// per-CPU counters), whatever bytes a pinned map holds.
pub fn map_values(data: &[u8]) {
    let family = word(data, 0);
    let addr = [word(data, 1), word(data, 2), word(data, 3), word(data, 4)];
    let _ = ip_from_key(family, &addr);
    let orig = OrigDst {
        family: (family & 0xffff) as u16,
        port_be: (family >> 16) as u16,
        addr,
    };
    let _ = orig_dst_addr(&orig);
    // Per-CPU counters: as many CPUs as the input has 8-byte words, each bumping the fields.
    let cpus: Vec<PodCounters> = data
        .chunks(8)
        .map(|chunk| {
            let mut v = [0u8; 8];
            v[..chunk.len()].copy_from_slice(chunk);
            let n = u64::from_ne_bytes(v);
            PodCounters {
                outbound_captured: n,
                inbound_captured: n.rotate_left(7),
                orig_dst_lost: n.rotate_left(13),
                ..Default::default()
            }
        })
        .collect();
    let summed = sum_counters(Some(&cpus));
    let _ = summed.fields();
}
