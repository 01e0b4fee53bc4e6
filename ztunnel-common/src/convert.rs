//! Conversions between the kernel's map layouts and userspace types (addresses, original
//! destinations, per-CPU counters), kept next to the layouts they read.

use core::net::{IpAddr, SocketAddr};

use crate::{pod_flags, DialKey, IpKey, OrigDst, PodConfig, PodCounters, AF_INET, AF_INET6};

/// The map key of an address (an IPv4-mapped IPv6 address is keyed as the IPv4 one).
pub fn ip_key(ip: IpAddr) -> IpKey {
    match ip {
        IpAddr::V4(v4) => IpKey {
            family: AF_INET,
            addr: [u32::from_ne_bytes(v4.octets()), 0, 0, 0],
        },
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => ip_key(IpAddr::V4(v4)),
            None => {
                let o = v6.octets();
                let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
                IpKey {
                    family: AF_INET6,
                    addr: [word(0), word(4), word(8), word(12)],
                }
            }
        },
    }
}

/// The `AGENT_DIALS` key of a connection from `client` to `app` (both of one family), as
/// `sk_lookup` sees its SYN.
pub fn dial_key(client: SocketAddr, app: SocketAddr) -> DialKey {
    let (local, remote) = (ip_key(app.ip()), ip_key(client.ip()));
    DialKey {
        family: local.family,
        local_port: app.port(),
        remote_port: client.port(),
        local: local.addr,
        remote: remote.addr,
    }
}

/// The address a map key holds (`None` for an unknown family).
pub fn ip_from_key(family: u32, addr: &[u32; 4]) -> Option<IpAddr> {
    match family {
        AF_INET => Some(IpAddr::from(addr[0].to_ne_bytes())),
        AF_INET6 => {
            let mut o = [0u8; 16];
            for (i, w) in addr.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            Some(IpAddr::from(o))
        }
        _ => None,
    }
}

/// The socket address of a recorded original destination.
pub fn orig_dst_addr(orig: &OrigDst) -> Option<SocketAddr> {
    let ip = ip_from_key(u32::from(orig.family), &orig.addr)?;
    Some(SocketAddr::new(ip, u16::from_be(orig.port_be)))
}

/// Sums per-CPU counter values.
pub fn sum_counters(values: Option<&[PodCounters]>) -> PodCounters {
    let mut total = PodCounters::default();
    for v in values.unwrap_or_default() {
        total.add(v);
    }
    total
}

/// A pod's `ENROLLED_PODS` value: the first address of each family.
pub fn pod_config(ips: &[IpAddr]) -> PodConfig {
    let mut config = PodConfig {
        flags: 0,
        ip4: 0,
        ip6: [0; 4],
    };
    for ip in ips {
        let key = ip_key(*ip);
        if key.family == AF_INET && config.flags & pod_flags::HAS_IPV4 == 0 {
            config.flags |= pod_flags::HAS_IPV4;
            config.ip4 = key.addr[0];
        } else if key.family == AF_INET6 && config.flags & pod_flags::HAS_IPV6 == 0 {
            config.flags |= pod_flags::HAS_IPV6;
            config.ip6 = key.addr;
        }
    }
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the `map_values` fuzz target: per-CPU values a map may hold (garbage in a
    /// pinned map, or counters near the top) summed with overflow panicked in debug builds
    /// and wrapped in release ones; the sum saturates.
    #[test]
    fn per_cpu_counters_sum_without_overflow() {
        let near_top = PodCounters {
            outbound_captured: u64::MAX - 1,
            ..Default::default()
        };
        let more = PodCounters {
            outbound_captured: 5,
            inbound_captured: 3,
            ..Default::default()
        };
        let total = sum_counters(Some(&[near_top, more]));
        assert_eq!(total.outbound_captured, u64::MAX);
        assert_eq!(total.inbound_captured, 3);
    }
}
