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
    /// The node's namespace name.
    pub node: String,
    /// Pods.
    pub pods: Vec<Pod>,
}

impl Topology {
    /// Creates the node namespace and its bridge (10.244.1.1/24, fd00::1/64).
    pub fn new(test: &str) -> Self {
        // Namespace names are per test, so tests run in parallel without sharing anything.
        let prefix = format!("zt-{test}");
        let node = format!("{prefix}-node");
        // Left over from a crashed earlier run: remove first.
        cleanup_prefix(&prefix);
        sh("ip", &["netns", "add", &node]);
        let topo = Self {
            prefix,
            node: node.clone(),
            pods: Vec::new(),
        };
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["link", "add", "br0", "type", "bridge"],
            vec!["addr", "add", "10.244.1.1/24", "dev", "br0"],
            vec!["addr", "add", "fd00::1/64", "dev", "br0", "nodad"],
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
        let ip4 = format!("10.244.1.{host}");
        let ip6 = format!("fd00::{host:x}");
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["addr", "add", &format!("{ip4}/24"), "dev", "eth0"],
            vec!["addr", "add", &format!("{ip6}/64"), "dev", "eth0", "nodad"],
            vec!["link", "set", "eth0", "up"],
            vec!["route", "add", "default", "via", "10.244.1.1"],
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
