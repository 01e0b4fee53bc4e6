//! An HBONE CONNECT as a pod's 15008 server sees it: `:authority`, the `forwarded` header
//! and the connection's local address (lines of the input), checked against a mesh with a
//! waypoint (the sandwich rules) and the source-address trust rules.
#![no_main]

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use ztunnel_agent::proxy::hbone::server::{client_addr, forwarded_for, inbound_target};
use ztunnel_agent::state::MeshState;

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

fuzz_target!(|data: &[u8]| {
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
});
