//! The kernel maps, kept in step with enrolled pods: pods added and removed in the order that
//! lets no connection slip past the proxy, the maps read back for views and counters, and the
//! original-destination table connections accepted on 15001 read.

use super::*;

/// A pod as the kernel programs know it.
#[derive(Clone, Debug)]
pub struct PodRedirect<'a> {
    /// Its network namespace cookie.
    pub netns_cookie: NetnsCookie,
    /// Its network namespace (for the sk_lookup link).
    pub netns: &'a File,
    /// Its addresses.
    pub ips: &'a [IpAddr],
    /// Its 15006 listeners (IPv4 and, if it has IPv6, IPv6).
    pub inbound_listeners: &'a [(u32, std::os::fd::RawFd)],
    /// Its DNS goes to the agent's DNS proxy.
    pub dns_capture: bool,
}

/// A pod as the kernel maps hold it (for `diagnose`).
#[derive(Debug)]
pub struct PodKernelView {
    /// Its cookie is in `ENROLLED_PODS` (outbound capture on).
    pub enrolled: bool,
    /// Each of its addresses and the cookie `POD_ADDRS` maps it to.
    pub addresses: Vec<(IpAddr, Option<u64>)>,
    /// Families with a 15006 listener in `INBOUND_LISTENERS`.
    pub listener_families: Vec<u32>,
    /// Its pinned `sk_lookup` link.
    pub inbound_link: io::Result<linkinfo::PinnedLinkInfo>,
    /// Its capture counters.
    pub counters: PodCounters,
    /// Its `ENROLLED_PODS` entry has DNS capture on.
    pub dns_capture: bool,
    /// Its DNS capture counters.
    pub dns_counters: DnsCounters,
}

/// The kernel's record of where captured connections were going, keyed by their client end.
pub struct OrigDstTable(pub(super) Mutex<HashMap<MapData, ConnKey, OrigDst>>);

impl std::fmt::Debug for OrigDstTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OrigDstTable")
    }
}

impl OrigDstTable {
    /// Takes the original destination of a connection accepted on a pod's 15001 listener
    /// from `peer`, deleting the entry.
    pub fn take(&self, cookie: NetnsCookie, peer: SocketAddr) -> Option<SocketAddr> {
        let ip = ip_key(peer.ip());
        let key = ConnKey {
            netns_cookie: cookie.0,
            family: ip.family,
            port: u32::from(peer.port()),
            addr: ip.addr,
        };
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let orig = table.get(&key, 0).ok()?;
        // A failed delete leaves an entry LRU eviction will reclaim.
        let _ = table.remove(&key);
        orig_dst_addr(&orig)
    }
}

/// The connections the agent is opening from a client's address to a pod's application
/// (`AGENT_DIALS`): registered just before connect() so `sk_lookup` leaves them to the
/// application instead of steering them back to 15006, and forgotten once connect() returns
/// (only a SYN looks a listener up).
pub struct DialTable(pub(super) Mutex<HashMap<MapData, DialKey, u32>>);

impl std::fmt::Debug for DialTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DialTable")
    }
}

impl DialTable {
    /// Registers a connection from `client` to `app` about to be opened.
    pub fn register(&self, client: SocketAddr, app: SocketAddr) -> Result<(), MapError> {
        let key = ztunnel_common::convert::dial_key(client, app);
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        table.insert(key, 0, 0)
    }

    /// Forgets a connection registered with [`Self::register`] (a failed delete leaves an
    /// entry LRU eviction reclaims).
    pub fn forget(&self, client: SocketAddr, app: SocketAddr) {
        let key = ztunnel_common::convert::dial_key(client, app);
        let mut table = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = table.remove(&key);
    }
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl Redirect {
    pub(super) fn set_excluded_ports(&mut self) -> Result<(), Error> {
        for (map, ports) in [
            (
                maps::EXCLUDED_OUTBOUND_PORTS,
                self.config.exclude_outbound_ports.clone(),
            ),
            (
                maps::EXCLUDED_INBOUND_PORTS,
                self.config.exclude_inbound_ports.clone(),
            ),
        ] {
            let mut table: HashMap<MapData, PortKey, u32> = take_map(&mut self.ebpf, map)?;
            let wanted: BTreeSet<u16> = ports.into_iter().collect();
            let stale: Vec<PortKey> = table
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !wanted.contains(&k.port))
                .collect();
            for key in stale {
                table.remove(&key).map_err(|source| Error::Map {
                    map,
                    what: format!("excluded port {}", key.port),
                    source,
                })?;
            }
            for port in wanted {
                table
                    .insert(PortKey { port, _pad: 0 }, 1, 0)
                    .map_err(|source| Error::Map {
                        map,
                        what: format!("excluded port {port}"),
                        source,
                    })?;
            }
        }
        Ok(())
    }

    /// Starts capturing a pod. Order matters so that no connection slips past the proxy:
    /// listeners are registered and inbound steering attached before outbound capture (the
    /// `ENROLLED_PODS` entry) is switched on.
    pub fn add_pod(&mut self, pod: &PodRedirect<'_>) -> Result<(), Error> {
        let cookie = pod.netns_cookie.0;
        for &(family, fd) in pod.inbound_listeners {
            let key = ListenerKey {
                netns_cookie: cookie,
                family,
                _pad: 0,
            };
            self.listeners
                .insert(key, fd, 0)
                .map_err(|source| Error::Map {
                    map: maps::INBOUND_LISTENERS,
                    what: format!("pod netns {cookie}"),
                    source,
                })?;
        }
        for ip in pod.ips {
            self.pod_addrs
                .insert(
                    ip_key(*ip),
                    PodAddr {
                        netns_cookie: cookie,
                    },
                    0,
                )
                .map_err(|source| Error::Map {
                    map: maps::POD_ADDRS,
                    what: ip.to_string(),
                    source,
                })?;
        }
        self.attach_inbound(pod.netns_cookie, pod.netns)?;
        let mut config = pod_config(pod.ips);
        if pod.dns_capture {
            config.flags |= ztunnel_common::pod_flags::DNS_CAPTURE;
        }
        self.enrolled
            .insert(cookie, config, 0)
            .map_err(|source| Error::Map {
                map: maps::ENROLLED_PODS,
                what: format!("pod netns {cookie}"),
                source,
            })?;
        Ok(())
    }

    /// Stops capturing a pod: outbound capture first, then inbound steering, then the rest.
    pub fn remove_pod(&mut self, cookie: NetnsCookie) -> Result<(), Error> {
        let c = cookie.0;
        ignore_missing(self.enrolled.remove(&c)).map_err(|source| Error::Map {
            map: maps::ENROLLED_PODS,
            what: format!("pod netns {c}"),
            source,
        })?;
        let path = self.inbound_link_path(cookie);
        if path.exists() {
            std::fs::remove_file(&path).map_err(|source| Error::Pin {
                path: path.clone(),
                dir: self.config.pin_dir.display().to_string(),
                source,
            })?;
        }
        let addrs: Vec<IpKey> = self
            .pod_addrs
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, owner)| owner.netns_cookie == c)
            .map(|(k, _)| k)
            .collect();
        for key in addrs {
            ignore_missing(self.pod_addrs.remove(&key)).map_err(|source| Error::Map {
                map: maps::POD_ADDRS,
                what: format!("pod netns {c}"),
                source,
            })?;
        }
        for family in [AF_INET, AF_INET6] {
            let key = ListenerKey {
                netns_cookie: c,
                family,
                _pad: 0,
            };
            ignore_missing(self.listeners.remove(&key)).map_err(|source| Error::Map {
                map: maps::INBOUND_LISTENERS,
                what: format!("pod netns {c}"),
                source,
            })?;
        }
        ignore_missing(self.counters.remove(&c)).map_err(|source| Error::Map {
            map: maps::POD_COUNTERS,
            what: format!("pod netns {c}"),
            source,
        })?;
        ignore_missing(self.dns_counters.remove(&c)).map_err(|source| Error::Map {
            map: maps::DNS_COUNTERS,
            what: format!("pod netns {c}"),
            source,
        })?;
        Ok(())
    }

    /// Pods the maps hold (from this run or, after a restart, from the previous one).
    pub fn enrolled_cookies(&self) -> Vec<NetnsCookie> {
        let mut cookies: Vec<NetnsCookie> = self
            .enrolled
            .keys()
            .filter_map(Result::ok)
            .map(NetnsCookie)
            .collect();
        // A pod whose ENROLLED_PODS entry is gone may still have a pinned inbound link.
        if let Ok(entries) = std::fs::read_dir(self.config.pin_dir.join("links")) {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let parsed = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("inbound-"))
                    .and_then(|c| c.parse().ok());
                if let Some(c) = parsed {
                    cookies.push(NetnsCookie(c));
                }
            }
        }
        cookies.sort();
        cookies.dedup();
        cookies
    }

    /// Whether a live socket (this agent's or another running agent's) is registered as
    /// the pod's inbound listener; the kernel removes a socket from the map when it closes.
    pub fn has_live_listener(&self, cookie: NetnsCookie) -> bool {
        self.listeners
            .keys()
            .filter_map(Result::ok)
            .any(|k| k.netns_cookie == cookie.0)
    }

    /// A pod as the kernel maps hold it.
    pub fn pod_view(&self, cookie: NetnsCookie, ips: &[IpAddr]) -> PodKernelView {
        let c = cookie.0;
        let listener_families = [AF_INET, AF_INET6]
            .into_iter()
            .filter(|family| {
                self.listeners
                    .keys()
                    .filter_map(Result::ok)
                    .any(|k| k.netns_cookie == c && k.family == *family)
            })
            .collect();
        let config = self.enrolled.get(&c, 0).ok();
        PodKernelView {
            enrolled: config.is_some(),
            dns_capture: config
                .is_some_and(|p| p.flags & ztunnel_common::pod_flags::DNS_CAPTURE != 0),
            dns_counters: self.dns_counters(cookie),
            addresses: ips
                .iter()
                .map(|ip| {
                    let owner = self
                        .pod_addrs
                        .get(&ip_key(*ip), 0)
                        .ok()
                        .map(|a| a.netns_cookie);
                    (*ip, owner)
                })
                .collect(),
            listener_families,
            inbound_link: linkinfo::read(&self.inbound_link_path(cookie)),
            counters: self.counters(cookie),
        }
    }

    /// What the kernel's connect hook would do now with pod `cookie`'s TCP connection to
    /// `dst`, read from the same maps with the same decision function (`Ok(None)`: the pod is
    /// not in `ENROLLED_PODS`, so its connections are left alone). A map that cannot be read
    /// is an error, never a guess.
    pub fn outbound_decision(
        &self,
        cookie: NetnsCookie,
        dst: SocketAddr,
    ) -> Result<Option<ztunnel_common::OutboundDecision>, Error> {
        let c = cookie.0;
        let pod = match self.enrolled.get(&c, 0) {
            Ok(pod) => pod,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(source) => {
                return Err(Error::Map {
                    map: maps::ENROLLED_PODS,
                    what: format!("reading pod netns {c}"),
                    source,
                })
            }
        };
        // The exclusions as the kernel holds them (the pinned map), not as configured.
        let map_err = |source| Error::Map {
            map: maps::EXCLUDED_OUTBOUND_PORTS,
            what: "reading".to_string(),
            source,
        };
        let excluded: HashMap<MapData, PortKey, u32> = HashMap::try_from(aya::maps::Map::HashMap(
            MapData::from_pin(self.config.pin_dir.join(maps::EXCLUDED_OUTBOUND_PORTS))
                .map_err(map_err)?,
        ))
        .map_err(map_err)?;
        let key = ip_key(dst.ip());
        Ok(Some(ztunnel_common::outbound_decision(
            &pod,
            key.family,
            &key.addr,
            dst.port(),
            || {
                self.pod_addrs
                    .get(&key, 0)
                    .is_ok_and(|owner| owner.netns_cookie == c)
            },
            |port| excluded.get(&PortKey { port, _pad: 0 }, 0).is_ok(),
        )))
    }

    /// A pod's DNS capture counters, summed over CPUs.
    pub fn dns_counters(&self, cookie: NetnsCookie) -> DnsCounters {
        let mut total = DnsCounters::default();
        if let Ok(values) = self.dns_counters.get(&cookie.0, 0) {
            for v in values.iter() {
                total.add(v);
            }
        }
        total
    }

    /// A pod's capture counters, summed over CPUs.
    pub fn counters(&self, cookie: NetnsCookie) -> PodCounters {
        sum_counters(
            self.counters
                .get(&cookie.0, 0)
                .ok()
                .as_ref()
                .map(|v| &v[..]),
        )
    }
}
