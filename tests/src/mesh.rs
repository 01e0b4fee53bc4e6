//! Local-config YAML for tests, the demo and the benchmark, and the troubleshooting guide's
//! topology (its pods, service accounts and services).

use crate::topology::{Pod, Topology};

/// The test's node with an enrolled client (10.244.1.10) and server (10.244.1.11), and the
/// local config naming both as HBONE workloads.
pub fn client_and_server() -> (Topology, Pod, Pod, String) {
    let mut topo = Topology::for_test();
    let client = topo.add_pod("client", 10);
    let server = topo.add_pod("server", 11);
    let yaml = yaml(
        &[
            Workload::hbone(&client, "client", "node-1"),
            Workload::hbone(&server, "server", "node-1"),
        ],
        &[],
    );
    (topo, client, server, yaml)
}

/// How a pod appears in the mesh config.
#[derive(Clone, Debug)]
pub struct Workload<'a> {
    /// The pod.
    pub pod: &'a Pod,
    /// Service account.
    pub sa: &'a str,
    /// Node name.
    pub node: &'a str,
    /// `HBONE` or `TCP`.
    pub protocol: &'a str,
    /// Whether the agent enrolls it (a `netns` field).
    pub enrolled: bool,
    /// Services it backs on 9080 (`<name>` in namespace default).
    pub services: &'a [&'a str],
    /// Include the pod's IPv6 address too.
    pub ipv6: bool,
}

impl<'a> Workload<'a> {
    /// An enrolled HBONE workload on `node`, IPv4 only, backing no service.
    pub fn hbone(pod: &'a Pod, sa: &'a str, node: &'a str) -> Self {
        Self {
            pod,
            sa,
            node,
            protocol: "HBONE",
            enrolled: true,
            services: &[],
            ipv6: false,
        }
    }
}

/// Renders `workloads:` and `services:` (name, VIP; port 9080 -> 9080).
pub fn yaml(workloads: &[Workload<'_>], services: &[(&str, &str)]) -> String {
    let mut y = String::from("workloads:\n");
    for w in workloads {
        let ips = if w.ipv6 {
            format!("\"{}\", \"{}\"", w.pod.ip4, w.pod.ip6)
        } else {
            format!("\"{}\"", w.pod.ip4)
        };
        y.push_str(&format!(
            "- uid: cluster1//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  serviceAccount: {sa}\n  workloadIps: [{ips}]\n  protocol: {proto}\n  node: {node}\n",
            name = w.pod.name,
            sa = w.sa,
            proto = w.protocol,
            node = w.node,
        ));
        if w.enrolled {
            y.push_str(&format!("  netns: {}\n", w.pod.netns_path().display()));
        }
        if !w.services.is_empty() {
            y.push_str("  services:\n");
            for svc in w.services {
                y.push_str(&format!(
                    "    \"default/{svc}.default.svc.cluster.local\":\n      9080: 9080\n"
                ));
            }
        }
    }
    if !services.is_empty() {
        y.push_str("services:\n");
        for (svc, vip) in services {
            y.push_str(&format!(
                "- name: {svc}\n  namespace: default\n  hostname: {svc}.default.svc.cluster.local\n  vips: [\"/{vip}\"]\n  ports:\n    9080: 9080\n"
            ));
        }
    }
    y
}

/// The troubleshooting guide's walkthrough: pods, their service accounts and services.
pub mod guide {
    use super::{yaml, Workload};
    use crate::topology::{Pod, Topology};

    /// Name, service account, host number (10.244.1.<n>), service.
    pub const PODS: &[(&str, &str, u8, Option<&str>)] = &[
        (
            "productpage-v1",
            "bookinfo-productpage",
            10,
            Some("productpage"),
        ),
        ("details-v1", "bookinfo-details", 11, Some("details")),
        ("curl", "curl", 12, None),
        ("ratings-v1", "bookinfo-ratings", 13, Some("ratings")),
        ("reviews-v1", "bookinfo-reviews", 14, Some("reviews")),
        ("reviews-v2", "bookinfo-reviews", 15, Some("reviews")),
        ("reviews-v3", "bookinfo-reviews", 16, Some("reviews")),
    ];
    /// Service VIPs.
    pub const SERVICES: &[(&str, &str)] = &[
        ("productpage", "10.96.0.10"),
        ("details", "10.96.0.11"),
        ("ratings", "10.96.0.13"),
        ("reviews", "10.96.0.14"),
    ];

    /// Adds the guide's pods to `topo` (in `PODS` order).
    pub fn add_pods(topo: &mut Topology) -> Vec<Pod> {
        PODS.iter()
            .map(|(name, _, host, _)| topo.add_pod(name, *host))
            .collect()
    }

    /// The local config for `pods` (from [`add_pods`]) on `node`, all HBONE and enrolled.
    pub fn mesh_yaml(pods: &[Pod], node: &str, ipv6: bool) -> String {
        let services: Vec<Vec<&str>> = PODS.iter().map(|p| p.3.into_iter().collect()).collect();
        let workloads: Vec<Workload<'_>> = pods
            .iter()
            .zip(PODS)
            .zip(&services)
            .map(|((pod, (_, sa, _, _)), svcs)| Workload {
                services: svcs,
                ipv6,
                ..Workload::hbone(pod, sa, node)
            })
            .collect();
        yaml(&workloads, SERVICES)
    }
}
