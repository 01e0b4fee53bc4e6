//! `ztunnel-agent redirect dump`: the pinned maps and links, decoded. bpftool prints the
//! same maps with field names (they carry BTF), but addresses there are raw network-order
//! words; this view shows them as addresses and sums the per-CPU counters.

use std::fmt::Write as _;
use std::path::Path;

use aya::maps::{HashMap, Map, MapData, PerCpuHashMap};
use ztunnel_common::{
    maps, ConnKey, IpKey, ListenerKey, OrigDst, PodAddr, PodConfig, PodCounters, PortKey, AF_INET,
    AF_INET6,
};

use super::linkinfo::Target;
use super::{ip_from_key, orig_dst_addr, sum_counters};

/// Errors reading the pinned state.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A pinned map could not be opened.
    #[error("cannot open pinned map {path}: is the agent installed with this pin directory (--pin-dir)?")]
    Open {
        /// Path.
        path: String,
        /// Why.
        #[source]
        source: aya::maps::MapError,
    },
}

fn open<T>(pin_dir: &Path, name: &str, wrap: fn(MapData) -> Map) -> Result<T, Error>
where
    T: TryFrom<Map, Error = aya::maps::MapError>,
{
    let path = pin_dir.join(name);
    let err = |source| Error::Open {
        path: path.display().to_string(),
        source,
    };
    let data = MapData::from_pin(&path).map_err(err)?;
    T::try_from(wrap(data)).map_err(err)
}

fn ip(family: u32, addr: &[u32; 4]) -> String {
    ip_from_key(family, addr).map_or_else(|| format!("family {family}?"), |i| i.to_string())
}

/// Renders the pinned state as text.
pub fn render(pin_dir: &Path) -> Result<String, Error> {
    let mut out = String::new();
    let enrolled: HashMap<MapData, u64, PodConfig> =
        open(pin_dir, maps::ENROLLED_PODS, Map::HashMap)?;
    let addrs: HashMap<MapData, IpKey, PodAddr> = open(pin_dir, maps::POD_ADDRS, Map::HashMap)?;
    let counters: PerCpuHashMap<MapData, u64, PodCounters> =
        open(pin_dir, maps::POD_COUNTERS, Map::PerCpuHashMap)?;
    let _ = writeln!(out, "pin directory {}", pin_dir.display());
    let _ = writeln!(out, "\nlinks:");
    if let Ok(entries) = std::fs::read_dir(pin_dir.join("links")) {
        let mut names: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        names.sort();
        for path in names {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            let line = match super::linkinfo::read(&path) {
                Ok(i) => {
                    let target = match i.target {
                        Target::Cgroup(0) | Target::Netns(0) => "DETACHED".to_string(),
                        Target::Cgroup(id) => format!("cgroup id {id}"),
                        Target::Netns(ino) => format!("netns inode {ino}"),
                        Target::Other(kind) => format!("link type {kind}"),
                    };
                    format!("link {} program {} on {target}", i.id, i.program_id)
                }
                Err(e) => format!("unreadable: {e}"),
            };
            let _ = writeln!(out, "  {:<28} {line}", name.unwrap_or_default());
        }
    }
    let _ = writeln!(out, "\n{} (netns cookie -> pod):", maps::ENROLLED_PODS);
    let mut pods: Vec<(u64, PodConfig)> = enrolled.iter().filter_map(Result::ok).collect();
    pods.sort_by_key(|(cookie, _)| *cookie);
    for (cookie, pod) in pods {
        let mut ips = Vec::new();
        if pod.flags & ztunnel_common::pod_flags::HAS_IPV4 != 0 {
            ips.push(ip(AF_INET, &[pod.ip4, 0, 0, 0]));
        }
        if pod.flags & ztunnel_common::pod_flags::HAS_IPV6 != 0 {
            ips.push(ip(AF_INET6, &pod.ip6));
        }
        let c = sum_counters(counters.get(&cookie, 0).ok().as_ref().map(|v| &v[..]));
        let _ = writeln!(out, "  {cookie:<20} {}", ips.join(", "));
        let moved: Vec<String> = c
            .fields()
            .iter()
            .filter(|(_, v)| *v > 0)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        if !moved.is_empty() {
            let _ = writeln!(out, "  {:<20} counters: {}", "", moved.join(" "));
        }
    }
    let _ = writeln!(out, "\n{} (address -> netns cookie):", maps::POD_ADDRS);
    let mut owned: Vec<(IpKey, PodAddr)> = addrs.iter().filter_map(Result::ok).collect();
    owned.sort_by_key(|(key, owner)| (owner.netns_cookie, key.family, key.addr));
    for (key, owner) in owned {
        let _ = writeln!(
            out,
            "  {:<40} {}",
            ip(key.family, &key.addr),
            owner.netns_cookie
        );
    }
    for name in [maps::EXCLUDED_OUTBOUND_PORTS, maps::EXCLUDED_INBOUND_PORTS] {
        let ports: HashMap<MapData, PortKey, u32> = open(pin_dir, name, Map::HashMap)?;
        let mut list: Vec<u16> = ports
            .keys()
            .filter_map(Result::ok)
            .map(|k| k.port)
            .collect();
        list.sort_unstable();
        let _ = writeln!(out, "\n{name}: {list:?}");
    }
    let listeners: aya::maps::SockHash<MapData, ListenerKey> =
        open(pin_dir, maps::INBOUND_LISTENERS, Map::SockHash)?;
    let _ = writeln!(out, "\n{} (netns cookie, family):", maps::INBOUND_LISTENERS);
    let mut keys: Vec<ListenerKey> = listeners.keys().filter_map(Result::ok).collect();
    keys.sort_by_key(|k| (k.netns_cookie, k.family));
    for key in keys {
        let family = if key.family == AF_INET {
            "ipv4"
        } else {
            "ipv6"
        };
        let _ = writeln!(out, "  {:<20} {family}", key.netns_cookie);
    }
    let orig: HashMap<MapData, ConnKey, OrigDst> = open(pin_dir, maps::ORIG_DST, Map::LruHashMap)?;
    let _ = writeln!(
        out,
        "\n{} (client -> original destination, not yet accepted):",
        maps::ORIG_DST
    );
    for (key, dst) in orig.iter().filter_map(Result::ok) {
        let client = format!("{}:{}", ip(key.family, &key.addr), key.port);
        let dst = orig_dst_addr(&dst).map_or_else(|| "?".to_string(), |d| d.to_string());
        let _ = writeln!(out, "  {client:<46} -> {dst}  (netns {})", key.netns_cookie);
    }
    Ok(out)
}
