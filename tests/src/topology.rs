//! Network namespaces: one node with a bridge, pods attached to it by veth pairs.

use std::net::IpAddr;
use std::path::PathBuf;

use crate::sh;

/// A pod: a network namespace with `eth0` on the node's bridge.
#[derive(Clone, Debug)]
pub struct Pod {
    /// Short name (as the tests call it).
    pub name: String,
    /// Network namespace name.
    pub netns: String,
    /// IPv4 address.
    pub ip4: IpAddr,
    /// IPv6 address.
    pub ip6: IpAddr,
}

impl Pod {
    /// Path of the namespace file.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.netns))
    }
}

/// A node namespace with pods; deleted on drop.
pub struct Topology {
    /// Prefix of every namespace name (unique per test).
    pub prefix: String,
    /// This node's pod subnet: 10.244.<subnet>.0/24 and fd00:<subnet>::/64.
    pub subnet: u8,
    /// The node's namespace name.
    pub node: String,
    /// Pods.
    pub pods: Vec<Pod>,
}

/// The running test's name: libtest runs each test on a thread named after it. Namespaces,
/// pin directories and scratch directories are named after it, so a leftover names its test.
pub fn test_name() -> String {
    let thread = std::thread::current();
    let name = thread
        .name()
        .filter(|n| *n != "main")
        .expect("run under the test harness (each test on a thread named after it)");
    name.rsplit("::").next().unwrap_or(name).replace('_', "-")
}

impl Topology {
    /// The node of the running test (named after it, see [`test_name`]).
    pub fn for_test() -> Self {
        Self::new(&test_name())
    }

    /// Node `n` (pod subnet 10.244.<n>.0/24) of the running test.
    pub fn for_test_node(n: u8) -> Self {
        Self::with_subnet(&format!("{}-n{n}", test_name()), n)
    }

    /// Creates the node namespace and its bridge (10.244.1.1/24, fd00::1/64).
    pub fn new(test: &str) -> Self {
        Self::with_subnet(test, 1)
    }

    /// A node whose pods are in 10.244.<subnet>.0/24 and fd00:<subnet>::/64 (subnet 1 uses
    /// fd00::/64).
    pub fn with_subnet(test: &str, subnet: u8) -> Self {
        // Namespace names are per test, so tests run in parallel without sharing anything.
        let prefix = format!("zt-{test}");
        let node = format!("{prefix}-node");
        // Left over from a crashed earlier run: remove first.
        cleanup_prefix(&prefix);
        sh("ip", &["netns", "add", &node]);
        let topo = Self {
            prefix,
            subnet,
            node: node.clone(),
            pods: Vec::new(),
        };
        let (gw4, gw6) = (
            format!("10.244.{subnet}.1/24"),
            format!("{}1/64", topo.v6_prefix()),
        );
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["link", "add", "br0", "type", "bridge"],
            vec!["addr", "add", gw4.as_str(), "dev", "br0"],
            vec!["addr", "add", gw6.as_str(), "dev", "br0", "nodad"],
            vec!["link", "set", "br0", "up"],
        ] {
            let mut full = vec!["-n", &node];
            full.extend(args);
            sh("ip", &full);
        }
        topo
    }

    /// Adds a pod with addresses 10.244.1.<host> and fd00::<host>.
    pub fn add_pod(&mut self, name: &str, host: u8) -> Pod {
        let netns = format!("{}-{name}", self.prefix);
        let veth = format!("v{}{host}", short_hash(&self.prefix));
        sh("ip", &["netns", "add", &netns]);
        sh(
            "ip",
            &[
                "link", "add", &veth, "netns", &self.node, "type", "veth", "peer", "name", "eth0",
                "netns", &netns,
            ],
        );
        sh(
            "ip",
            &[
                "-n", &self.node, "link", "set", &veth, "master", "br0", "up",
            ],
        );
        let ip4 = format!("10.244.{}.{host}", self.subnet);
        let ip6 = format!("{}{host:x}", self.v6_prefix());
        let gw = format!("10.244.{}.1", self.subnet);
        let gw6 = format!("{}1", self.v6_prefix());
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", &format!("{ip4}/24"), "dev", "eth0"],
            vec!["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"],
            vec!["link", "set", "eth0", "up"],
            vec!["route", "add", "default", "via", gw.as_str()],
            vec!["-6", "route", "add", "default", "via", gw6.as_str()],
        ] {
            let mut full = vec!["-n", &netns];
            full.extend(args);
            sh("ip", &full);
        }
        let pod = Pod {
            name: name.to_string(),
            netns,
            ip4: ip4.parse().expect("valid ipv4"),
            ip6: ip6.parse().expect("valid ipv6"),
        };
        self.pods.push(pod.clone());
        pod
    }

    fn v6_prefix(&self) -> String {
        if self.subnet == 1 {
            "fd00::".to_string()
        } else {
            format!("fd00:{:x}::", self.subnet)
        }
    }

    /// Connects two nodes with a veth pair and routes each one's pod subnets via the other.
    /// A node may be linked to several others: each pair has its own interface names and
    /// its own /30 (and /64) between them.
    pub fn link(a: &Topology, b: &Topology) {
        let pair = format!("{}-{}", a.node, b.node);
        let (va, vb) = (
            format!("n{}", short_hash(&format!("{pair}-a"))),
            format!("n{}", short_hash(&format!("{pair}-b"))),
        );
        sh(
            "ip",
            &[
                "link", "add", &va, "netns", &a.node, "type", "veth", "peer", "name", &vb, "netns",
                &b.node,
            ],
        );
        // 172.31.<a>.<4b>/30 and fd31:<a>:<b>::/64: distinct for every pair of subnets.
        let (sa, sb) = (a.subnet, u16::from(b.subnet) * 4 % 256);
        let (a4, b4) = (
            format!("172.31.{sa}.{}", sb + 1),
            format!("172.31.{sa}.{}", sb + 2),
        );
        let v6 = format!("fd31:{sa:x}:{:x}:", b.subnet);
        let (a6, b6) = (format!("{v6}:1"), format!("{v6}:2"));
        for (topo, dev, mine, mine6, peer_net, peer_gw, gw6) in [
            (a, &va, &a4, &a6, b, &b4, &b6),
            (b, &vb, &b4, &b6, a, &a4, &a6),
        ] {
            let n = topo.node.as_str();
            let net4 = format!("10.244.{}.0/24", peer_net.subnet);
            let net6 = format!("{}/64", peer_net.v6_prefix());
            let (mine, mine6) = (format!("{mine}/30"), format!("{mine6}/64"));
            let (mine, mine6, peer_gw, gw6) = (
                mine.as_str(),
                mine6.as_str(),
                peer_gw.as_str(),
                gw6.as_str(),
            );
            sh("ip", &["-n", n, "addr", "add", mine, "dev", dev]);
            sh("ip", &["-n", n, "addr", "add", mine6, "dev", dev, "nodad"]);
            sh("ip", &["-n", n, "link", "set", dev, "up"]);
            sh("ip", &["-n", n, "route", "add", &net4, "via", peer_gw]);
            sh("ip", &["-n", n, "-6", "route", "add", &net6, "via", gw6]);
            sh(
                "ip",
                &["netns", "exec", n, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
            );
            sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    n,
                    "sysctl",
                    "-qw",
                    "net.ipv6.conf.all.forwarding=1",
                ],
            );
        }
    }

    /// Gives the node's bridge one more address (/32 or /128, no duplicate detection), e.g. a
    /// source the node's own processes use.
    pub fn add_node_addr(&self, ip: IpAddr) {
        let (net, flags): (String, &[&str]) = match ip {
            IpAddr::V4(_) => (format!("{ip}/32"), &[]),
            IpAddr::V6(_) => (format!("{ip}/128"), &["nodad"]),
        };
        let mut args = vec!["-n", &self.node, "addr", "add", &net, "dev", "br0"];
        args.extend_from_slice(flags);
        sh("ip", &args);
    }

    /// An extra namespace with only loopback (`<prefix>-<name>`), deleted with the topology:
    /// where a second agent runs during an overlapping upgrade (its admin, metrics and
    /// readiness ports apart from the first's, as two agent pods have).
    pub fn add_bare_netns(&self, name: &str) -> PathBuf {
        let netns = format!("{}-{name}", self.prefix);
        sh("ip", &["netns", "add", &netns]);
        sh("ip", &["-n", &netns, "link", "set", "lo", "up"]);
        PathBuf::from(format!("/var/run/netns/{netns}"))
    }

    /// Path of the node namespace file.
    pub fn node_path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.node))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        cleanup_prefix(&self.prefix);
    }
}

fn cleanup_prefix(prefix: &str) {
    let Ok(entries) = std::fs::read_dir("/var/run/netns") else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name == format!("{prefix}-node") || name.starts_with(&format!("{prefix}-")) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &name])
                .status();
        }
    }
}

/// A short stable tag so veth names (15 characters at most) differ per test.
fn short_hash(s: &str) -> String {
    let h = s
        .bytes()
        .fold(5381u32, |h, b| h.wrapping_mul(33) ^ u32::from(b));
    format!("{:06x}", h & 0xff_ffff)
}
