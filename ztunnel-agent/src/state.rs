//! Mesh state: workloads, services and policies, indexed by address, uid and hostname. Built
//! whole from a source (the local file now, xDS later) and swapped atomically; lookups never
//! block on a rebuild.

pub mod policy;
pub mod service;
pub mod workload;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use self::policy::Authorization;
use self::service::{HealthPolicy, LoadBalancerMode, Scope, Service};
use self::workload::{HealthStatus, Locality, NetworkAddress, Workload};

/// A pod named the way operators name it, `<namespace>/<pod>` (and xDS and istio-cni agree
/// on: a Kubernetes UID or an xDS uid is a different key, see `MeshState::pod_workload`).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PodRef {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
}

impl PodRef {
    /// `namespace/name`.
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Parses `<namespace>/<pod>` (both parts non-empty, one slash).
    pub fn parse(text: &str) -> Option<Self> {
        match text.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Some(Self::new(ns, name))
            }
            _ => None,
        }
    }
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A state that cannot be built, naming the offending resource.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two workloads claim one address.
    #[error("workloads {first} and {second} both have address {address}: pod addresses must be unique per network")]
    DuplicateAddress {
        /// Address.
        address: NetworkAddress,
        /// First uid.
        first: String,
        /// Second uid.
        second: String,
    },
    /// Two workloads share a uid.
    #[error("two workloads have uid {0}: uids must be unique")]
    DuplicateUid(String),
    /// A VIP is also a workload address, or two services share one.
    #[error("service {service} has VIP {vip}, already used by {other}")]
    DuplicateVip {
        /// Service key.
        service: String,
        /// The VIP.
        vip: NetworkAddress,
        /// Who has it.
        other: String,
    },
}

/// A service with its endpoints and round-robin cursor.
#[derive(Debug)]
pub struct ServiceEntry {
    /// The service.
    pub service: Service,
    /// Backing workloads by uid: service port -> target port.
    pub endpoints: BTreeMap<String, BTreeMap<u16, u16>>,
    /// Next endpoint to pick (strict round robin over healthy endpoints).
    cursor: AtomicUsize,
}

/// The chosen backend of a service connection.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// The workload.
    pub workload: Arc<Workload>,
    /// The port to reach it on.
    pub port: u16,
}

/// The current state, replaced whole on each change; readers take a cheap snapshot.
#[derive(Clone, Debug, Default)]
pub struct SharedState(Arc<std::sync::RwLock<Arc<MeshState>>>);

impl SharedState {
    /// The state now.
    pub fn snapshot(&self) -> Arc<MeshState> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the state (round-robin positions carry over).
    pub fn replace(&self, next: MeshState) {
        let mut guard = self.0.write().unwrap_or_else(|p| p.into_inner());
        next.inherit_cursors(&guard);
        *guard = Arc::new(next);
    }
}

/// Everything known about the mesh.
#[derive(Debug, Default)]
pub struct MeshState {
    workloads: BTreeMap<String, Arc<Workload>>,
    by_address: HashMap<NetworkAddress, String>,
    /// `(namespace, name)` -> uid, for pods whose enrollment names them by Kubernetes UID.
    by_pod_name: HashMap<(String, String), String>,
    services: BTreeMap<String, Arc<ServiceEntry>>,
    by_vip: HashMap<NetworkAddress, String>,
    /// Lowercase hostname -> service keys, and workloads' hostnames -> uid: a DNS question
    /// costs a few hash probes, not a scan of the mesh.
    by_hostname: HashMap<String, Vec<String>>,
    by_workload_hostname: HashMap<String, String>,
    policies: BTreeMap<String, Arc<Authorization>>,
}

impl MeshState {
    /// Builds the state from resources, checking that addresses and uids are unique.
    pub fn build(
        workloads: Vec<Workload>,
        services: Vec<Service>,
        policies: Vec<Authorization>,
    ) -> Result<Self, Error> {
        let mut state = MeshState::default();
        for w in workloads {
            let uid = w.key();
            for ip in &w.workload_ips {
                let address = NetworkAddress {
                    network: w.network.clone(),
                    address: *ip,
                };
                if let Some(first) = state.by_address.insert(address.clone(), uid.clone()) {
                    return Err(Error::DuplicateAddress {
                        address,
                        first,
                        second: uid,
                    });
                }
            }
            if !w.hostname.is_empty() {
                state
                    .by_workload_hostname
                    .entry(w.hostname.to_ascii_lowercase())
                    .or_insert_with(|| uid.clone());
            }
            if !w.name.is_empty() {
                state
                    .by_pod_name
                    .insert((w.namespace.clone(), w.name.clone()), uid.clone());
            }
            if state.workloads.insert(uid.clone(), Arc::new(w)).is_some() {
                return Err(Error::DuplicateUid(uid));
            }
        }
        for s in services {
            let key = s.key();
            for vip in &s.vips {
                let other = state
                    .by_vip
                    .get(vip)
                    .cloned()
                    .or_else(|| state.by_address.get(vip).cloned());
                if let Some(other) = other {
                    return Err(Error::DuplicateVip {
                        service: key,
                        vip: vip.clone(),
                        other,
                    });
                }
                state.by_vip.insert(vip.clone(), key.clone());
            }
            state
                .by_hostname
                .entry(s.hostname.to_ascii_lowercase())
                .or_default()
                .push(key.clone());
            let endpoints = state
                .workloads
                .iter()
                .filter_map(|(uid, w)| {
                    w.services
                        .get(&key)
                        .map(|ports| (uid.clone(), ports.clone()))
                })
                .collect();
            state.services.insert(
                key,
                Arc::new(ServiceEntry {
                    service: s,
                    endpoints,
                    cursor: AtomicUsize::new(0),
                }),
            );
        }
        for p in policies {
            state.policies.insert(p.key(), Arc::new(p));
        }
        Ok(state)
    }

    /// Carries round-robin positions over from the state this one replaces, so a config
    /// change does not restart every service at its first endpoint.
    pub fn inherit_cursors(&self, previous: &MeshState) {
        for (key, entry) in &self.services {
            if let Some(old) = previous.services.get(key) {
                entry
                    .cursor
                    .store(old.cursor.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
    }

    /// All workloads, sorted by uid.
    pub fn workloads(&self) -> impl Iterator<Item = &Arc<Workload>> {
        self.workloads.values()
    }

    /// All services, sorted by `namespace/hostname`.
    pub fn services(&self) -> impl Iterator<Item = &Arc<ServiceEntry>> {
        self.services.values()
    }

    /// All policies, sorted by `namespace/name`.
    pub fn policies(&self) -> impl Iterator<Item = &Arc<Authorization>> {
        self.policies.values()
    }

    /// The workload with this uid.
    pub fn workload(&self, uid: &str) -> Option<Arc<Workload>> {
        self.workloads.get(uid).cloned()
    }

    /// A pod's workload: by uid, else by namespace and name (istio-cni names pods by
    /// Kubernetes UID, xDS by `<cluster>//Pod/<ns>/<name>`).
    pub fn pod_workload(&self, uid: &str, namespace: &str, name: &str) -> Option<Arc<Workload>> {
        self.workload(uid).or_else(|| {
            self.by_pod_name
                .get(&(namespace.to_string(), name.to_string()))
                .and_then(|uid| self.workload(uid))
        })
    }

    /// The workload with this address.
    pub fn workload_by_ip(&self, network: &str, ip: IpAddr) -> Option<Arc<Workload>> {
        let key = NetworkAddress {
            network: network.to_string(),
            address: ip,
        };
        self.by_address.get(&key).and_then(|uid| self.workload(uid))
    }

    /// The service with this VIP.
    pub fn service_by_vip(&self, network: &str, ip: IpAddr) -> Option<Arc<ServiceEntry>> {
        let key = NetworkAddress {
            network: network.to_string(),
            address: ip,
        };
        self.by_vip
            .get(&key)
            .and_then(|k| self.services.get(k))
            .cloned()
    }

    /// The service with this `namespace/hostname`.
    pub fn service(&self, key: &str) -> Option<Arc<ServiceEntry>> {
        self.services.get(key).cloned()
    }

    /// Every endpoint of `entry` serving `port`, in round-robin order, with its health.
    fn endpoint_iter<'a>(
        &'a self,
        entry: &'a ServiceEntry,
        port: u16,
    ) -> impl Iterator<Item = (Endpoint, HealthStatus)> + 'a {
        let default_target = entry.service.ports.get(&port).copied();
        entry.endpoints.iter().filter_map(move |(uid, ports)| {
            let workload = self.workload(uid)?;
            let port = endpoint_port(ports, default_target, port)?;
            let status = workload.status;
            Some((Endpoint { workload, port }, status))
        })
    }

    /// Every endpoint of `entry` serving `port`, in round-robin order, with its health
    /// (unhealthy ones are listed but never picked).
    pub fn endpoints(&self, entry: &ServiceEntry, port: u16) -> Vec<(Endpoint, HealthStatus)> {
        self.endpoint_iter(entry, port).collect()
    }

    /// The endpoints of `entry` serving `port` that a connection from `src` may get, in
    /// round-robin order: healthy ones (or all, under `AllowAll`), and under `Strict` or
    /// `Failover` only those matching the most of the service's routing preferences
    /// (upstream's ranking: preferences in order, stopping at the first mismatch).
    fn eligible_endpoints(&self, entry: &ServiceEntry, port: u16, src: &Workload) -> Vec<Endpoint> {
        let lb = entry.service.load_balancer.as_ref();
        let allow_all = lb.is_some_and(|lb| lb.health_policy == HealthPolicy::AllowAll);
        let endpoints = self
            .endpoint_iter(entry, port)
            .filter(|(_, status)| allow_all || *status == HealthStatus::Healthy)
            .map(|(endpoint, _)| endpoint);
        let Some(lb) = lb.filter(|lb| {
            matches!(
                lb.mode,
                LoadBalancerMode::Strict | LoadBalancerMode::Failover
            )
        }) else {
            return endpoints.collect();
        };
        let wanted = lb.routing_preferences.len();
        let ranked: Vec<(usize, Endpoint)> = endpoints
            .filter_map(|e| {
                let (matched, bonus) = locality_rank(&lb.routing_preferences, src, &e.workload);
                let strict_miss = lb.mode == LoadBalancerMode::Strict && matched < wanted;
                (!strict_miss).then_some((matched + bonus, e))
            })
            .collect();
        let best = ranked.iter().map(|(rank, _)| *rank).max().unwrap_or(0);
        ranked
            .into_iter()
            .filter(|(rank, _)| *rank == best)
            .map(|(_, e)| e)
            .collect()
    }

    /// The next endpoint of `entry` serving `port` for a connection from `src`, in strict
    /// round robin over the eligible ones (the guide's promise: per connection, in a fixed
    /// order; the service's load-balancing settings only narrow who takes turns). `take_turn`
    /// advances the round robin (a real connection); without it the pick is only named
    /// (`diagnose flow`).
    pub fn next_endpoint(
        &self,
        entry: &ServiceEntry,
        port: u16,
        src: &Workload,
        take_turn: bool,
    ) -> Option<Endpoint> {
        let eligible = self.eligible_endpoints(entry, port, src);
        if eligible.is_empty() {
            return None;
        }
        let turn = if take_turn {
            entry.cursor.fetch_add(1, Ordering::Relaxed)
        } else {
            entry.cursor.load(Ordering::Relaxed)
        };
        let n = eligible.len();
        eligible.into_iter().nth(turn % n)
    }

    /// The workload whose hostname is `name` (lowercase, no trailing dot).
    pub fn workload_by_hostname(&self, name: &str) -> Option<Arc<Workload>> {
        self.by_workload_hostname
            .get(name)
            .and_then(|uid| self.workload(uid))
    }

    /// Resolves `host` as a pod in `namespace` would under Kubernetes' DNS search rules
    /// (`reviews`, `reviews.default`, `reviews.default.svc`, the full name; a trailing dot
    /// means the name is already complete) to the mesh service with that hostname (its own
    /// namespace's first), or a workload with that hostname.
    pub fn resolve_host(&self, namespace: &str, host: &str) -> Option<ResolvedHost> {
        let host = host.to_ascii_lowercase();
        let candidates: Vec<String> = match host.strip_suffix('.') {
            Some(full) => vec![full.to_string()],
            None => {
                let mut names: Vec<String> = [
                    format!("{namespace}.svc.{DNS_DOMAIN}"),
                    format!("svc.{DNS_DOMAIN}"),
                    DNS_DOMAIN.to_string(),
                ]
                .iter()
                .map(|search| format!("{host}.{search}"))
                .collect();
                names.push(host.clone());
                names
            }
        };
        candidates
            .into_iter()
            .find_map(|name| self.find_hostname(namespace, &name))
    }

    /// The mesh service (the asking namespace's first) or workload whose hostname is exactly
    /// `name` (lowercase, no trailing dot), by index. A service without VIPs counts only inside the
    /// cluster's `svc` domain, where it is headless: its endpoints' addresses answer.
    pub fn find_hostname(&self, namespace: &str, name: &str) -> Option<ResolvedHost> {
        let headless =
            name.ends_with(DNS_DOMAIN) && name[..name.len() - DNS_DOMAIN.len()].ends_with(".svc.");
        let mut services: Vec<&Arc<ServiceEntry>> = self
            .by_hostname
            .get(name)
            .into_iter()
            .flatten()
            .filter_map(|key| self.services.get(key))
            .filter(|s| !s.service.vips.is_empty() || headless)
            .collect();
        services.sort_by_key(|s| s.service.namespace != namespace);
        if let Some(entry) = services.first() {
            let addresses = if entry.service.vips.is_empty() {
                entry
                    .endpoints
                    .keys()
                    .filter_map(|uid| self.workload(uid))
                    .flat_map(|w| {
                        let network = w.network.clone();
                        w.workload_ips
                            .clone()
                            .into_iter()
                            .map(move |address| NetworkAddress {
                                network: network.clone(),
                                address,
                            })
                    })
                    .collect()
            } else {
                entry.service.vips.clone()
            };
            return Some(ResolvedHost {
                hostname: name.to_string(),
                service: Some((*entry).clone()),
                addresses,
            });
        }
        let workload = self
            .by_workload_hostname
            .get(name)
            .and_then(|uid| self.workload(uid))?;
        Some(ResolvedHost {
            hostname: name.to_string(),
            service: None,
            addresses: workload
                .workload_ips
                .iter()
                .map(|ip| NetworkAddress {
                    network: workload.network.clone(),
                    address: *ip,
                })
                .collect(),
        })
    }
}

/// The port an endpoint with `ports` (service port -> target port) serves service port `port`
/// on; `default_target` is the service's own mapping (0 means "the same port").
fn endpoint_port(
    ports: &BTreeMap<u16, u16>,
    default_target: Option<u16>,
    port: u16,
) -> Option<u16> {
    Some(match ports.get(&port).copied().or(default_target)? {
        0 => default_target.filter(|t| *t != 0).unwrap_or(port),
        t => t,
    })
}

/// How many of `preferences`, in order, `endpoint` shares with `src`, and a bonus (upstream's
/// rank: the count stops at the first mismatch; a matching `Network` first is worth every
/// other preference more, and a mismatching one is skipped so the others still rank). Strict
/// mode needs the count alone to cover every preference; endpoints rank by the sum.
pub(crate) fn locality_rank(
    preferences: &[Scope],
    src: &Workload,
    endpoint: &Workload,
) -> (usize, usize) {
    let none = Locality::default();
    let (a, b) = (
        src.locality.as_ref().unwrap_or(&none),
        endpoint.locality.as_ref().unwrap_or(&none),
    );
    let network_first = preferences.first() == Some(&Scope::Network);
    let (mut rank, mut bonus) = (0, 0);
    for scope in preferences {
        let same = match scope {
            Scope::Region => a.region == b.region,
            Scope::Zone => a.zone == b.zone,
            Scope::Subzone => a.subzone == b.subzone,
            Scope::Node => src.node == endpoint.node,
            Scope::Cluster => src.cluster_id == endpoint.cluster_id,
            Scope::Network => {
                let same = src.network == endpoint.network;
                if network_first {
                    if !same {
                        continue;
                    }
                    bonus = preferences.len() - 1;
                }
                same
            }
        };
        if !same {
            break;
        }
        rank += 1;
    }
    (rank, bonus)
}

/// The cluster's DNS domain, as kubelet writes it into pods' search lists.
pub const DNS_DOMAIN: &str = "cluster.local";

/// A name resolved from the mesh state.
#[derive(Clone, Debug)]
pub struct ResolvedHost {
    /// The full hostname that matched.
    pub hostname: String,
    /// The service it names, if it is a service.
    pub service: Option<Arc<ServiceEntry>>,
    /// Its addresses (a service's VIPs or a workload's IPs).
    pub addresses: Vec<NetworkAddress>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(name: &str, ip: &str, svc: &str, status: HealthStatus) -> Workload {
        Workload {
            uid: format!("c//v1/Pod/default/{name}"),
            name: name.into(),
            namespace: "default".into(),
            workload_ips: vec![ip.parse().expect("ip")],
            status,
            services: BTreeMap::from([(svc.to_string(), BTreeMap::from([(9080, 9080)]))]),
            ..Default::default()
        }
    }

    fn reviews() -> Service {
        Service {
            name: "reviews".into(),
            namespace: "default".into(),
            hostname: "reviews.default.svc.cluster.local".into(),
            vips: vec!["/10.96.0.20".parse().expect("vip")],
            ports: BTreeMap::from([(9080, 9080)]),
            ..Default::default()
        }
    }

    #[test]
    fn strict_round_robin_over_healthy_endpoints() {
        let key = "default/reviews.default.svc.cluster.local";
        let state = MeshState::build(
            vec![
                workload("reviews-v1", "10.244.1.14", key, HealthStatus::Healthy),
                workload("reviews-v2", "10.244.1.15", key, HealthStatus::Healthy),
                workload("reviews-v3", "10.244.1.16", key, HealthStatus::Healthy),
                workload("reviews-v4", "10.244.1.17", key, HealthStatus::Unhealthy),
            ],
            vec![reviews()],
            vec![],
        )
        .expect("valid state");
        let entry = state
            .service_by_vip("", "10.96.0.20".parse().expect("ip"))
            .expect("vip indexed");
        let picks: Vec<String> = (0..9)
            .map(|_| {
                state
                    .next_endpoint(&entry, 9080, &Workload::default(), true)
                    .expect("endpoint")
                    .workload
                    .name
                    .clone()
            })
            .collect();
        for name in ["reviews-v1", "reviews-v2", "reviews-v3"] {
            assert_eq!(picks.iter().filter(|p| *p == name).count(), 3, "{picks:?}");
        }
        assert_eq!(picks[0..3], picks[3..6], "fixed order");
        assert!(
            state
                .next_endpoint(&entry, 1234, &Workload::default(), true)
                .is_none(),
            "no such port"
        );
        // Peeking names the next pick without taking it.
        let next = state
            .next_endpoint(&entry, 9080, &Workload::default(), false)
            .expect("peek")
            .workload
            .name
            .clone();
        assert_eq!(
            next,
            state
                .next_endpoint(&entry, 9080, &Workload::default(), false)
                .expect("peek")
                .workload
                .name
        );
        assert_eq!(
            next,
            state
                .next_endpoint(&entry, 9080, &Workload::default(), true)
                .expect("pick")
                .workload
                .name
        );
        let listed: Vec<(String, HealthStatus)> = state
            .endpoints(&entry, 9080)
            .into_iter()
            .map(|(e, h)| (e.workload.name.clone(), h))
            .collect();
        assert_eq!(
            listed.len(),
            4,
            "unhealthy endpoints are listed: {listed:?}"
        );
        assert_eq!(
            listed[3],
            ("reviews-v4".to_string(), HealthStatus::Unhealthy)
        );
    }

    #[test]
    fn hostnames_resolve_with_kubernetes_search_rules() {
        let mut other_ns = reviews();
        other_ns.namespace = "other".into();
        other_ns.hostname = "reviews.other.svc.cluster.local".into();
        other_ns.vips = vec!["/10.96.0.30".parse().expect("vip")];
        let mut external = reviews();
        external.name = "api".into();
        external.hostname = "api.example.com".into();
        external.vips = vec!["/240.240.0.1".parse().expect("vip")];
        let state = MeshState::build(vec![], vec![reviews(), other_ns, external], vec![])
            .expect("valid state");
        let resolve = |ns: &str, host: &str| {
            state.resolve_host(ns, host).map(|r| {
                format!(
                    "{} {}",
                    r.hostname,
                    r.addresses
                        .iter()
                        .map(|a| a.address.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                )
            })
        };
        let own = Some("reviews.default.svc.cluster.local 10.96.0.20".to_string());
        for name in [
            "reviews",
            "reviews.default",
            "reviews.default.svc",
            "reviews.default.svc.cluster.local",
            "reviews.default.svc.cluster.local.",
            "Reviews.Default",
        ] {
            assert_eq!(resolve("default", name), own, "{name}");
        }
        // The short name follows the asking pod's namespace.
        assert_eq!(
            resolve("other", "reviews"),
            Some("reviews.other.svc.cluster.local 10.96.0.30".to_string())
        );
        assert_eq!(
            resolve("default", "reviews.other"),
            Some("reviews.other.svc.cluster.local 10.96.0.30".to_string())
        );
        // A ServiceEntry-style host, and names the mesh does not have.
        assert_eq!(
            resolve("default", "api.example.com"),
            Some("api.example.com 240.240.0.1".to_string())
        );
        assert_eq!(
            resolve("default", "reviews.default.svc.cluster.local.x."),
            None
        );
        assert_eq!(resolve("default", "ratings"), None);
    }

    #[test]
    fn duplicate_addresses_are_refused_by_name() {
        let err = MeshState::build(
            vec![
                workload("a", "10.244.1.14", "x", HealthStatus::Healthy),
                workload("b", "10.244.1.14", "x", HealthStatus::Healthy),
            ],
            vec![],
            vec![],
        )
        .expect_err("duplicate");
        assert!(err.to_string().contains("/10.244.1.14"), "{err}");
    }
}
