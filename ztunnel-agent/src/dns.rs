//! The DNS proxy: in each enrolled pod whose DNS is captured, the agent listens on the pod's
//! loopback, port 15053 (UDP and TCP, IPv4 and IPv6), where the kernel sends the pod's DNS
//! (`ztunnel-ebpf/src/dns.rs`). A/AAAA questions for mesh names (services' hostnames, with
//! their VIPs, auto-allocated ones included; workloads with a hostname) are answered from the
//! mesh state as it is at that moment, with upstream ztunnel's semantics ([`answer`]);
//! everything else is relayed unchanged to the resolvers in the agent's resolv.conf, from
//! the pod's network namespace with the agent's mark ([`forward`]). [`server`] reads the
//! queries, bounds what one pod can have in flight and counts everything.

pub mod answer;
pub mod forward;
pub mod server;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

/// Failures reading the DNS settings.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The resolver configuration cannot be read.
    #[error("cannot read the DNS proxy's resolver configuration {path}: the proxy forwards non-mesh names to its `nameserver` lines (set ZTUNNEL_DNS_RESOLV_CONF, or ISTIO_META_DNS_CAPTURE=false to turn the proxy off)")]
    ResolvConf {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It names no resolver.
    #[error("{path} has no usable `nameserver` line: the DNS proxy would have nowhere to forward non-mesh names (set ZTUNNEL_DNS_RESOLV_CONF to a file naming the cluster's DNS service, or ISTIO_META_DNS_CAPTURE=false)")]
    NoNameserver {
        /// The file.
        path: PathBuf,
    },
}

/// How the DNS proxy runs.
#[derive(Clone, Debug, Default)]
pub struct DnsSettings {
    /// Whether enrolled pods' DNS is captured.
    pub capture: bool,
    /// Where non-mesh questions are forwarded, in order.
    pub upstreams: Vec<SocketAddr>,
}

impl DnsSettings {
    /// DNS capture on, forwarding to the `nameserver` lines of `resolv_conf`.
    pub fn from_resolv_conf(resolv_conf: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(resolv_conf).map_err(|source| Error::ResolvConf {
            path: resolv_conf.to_path_buf(),
            source,
        })?;
        let upstreams = nameservers(&text);
        if upstreams.is_empty() {
            return Err(Error::NoNameserver {
                path: resolv_conf.to_path_buf(),
            });
        }
        Ok(Self {
            capture: true,
            upstreams,
        })
    }
}

/// The `nameserver` addresses of a resolv.conf, port 53 (a loopback resolver, such as
/// systemd-resolved's 127.0.0.53, is skipped: it is the node's, not reachable from a pod).
pub fn nameservers(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver")).then(|| words.next())?
        })
        .filter_map(|addr| addr.split('%').next()?.parse::<IpAddr>().ok())
        .filter(|ip| !ip.is_loopback())
        .map(|ip| SocketAddr::new(ip, ztunnel_common::DNS_PORT))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_are_read_as_resolvers_read_them() {
        let conf = "# generated\nsearch default.svc.cluster.local svc.cluster.local\nnameserver 10.96.0.10\nnameserver fd00::10%eth0\nnameserver 127.0.0.53\nnameserver bogus\noptions ndots:5\n";
        assert_eq!(
            nameservers(conf),
            vec![
                "10.96.0.10:53".parse::<SocketAddr>().expect("addr"),
                "[fd00::10]:53".parse().expect("addr")
            ]
        );
        assert!(nameservers("search x\n").is_empty());
    }
}
