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
use self::service::Service;
use self::workload::{HealthStatus, NetworkAddress, Workload};

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

    /// Picks the next healthy endpoint of `entry` serving `port`, in strict round robin (the
    /// guide's promise: per connection, in a fixed order, not configurable).
    pub fn pick_endpoint(&self, entry: &ServiceEntry, port: u16) -> Option<Endpoint> {
        let default_target = entry.service.ports.get(&port).copied();
        let candidates: Vec<Endpoint> = entry
            .endpoints
            .iter()
            .filter_map(|(uid, ports)| {
                let workload = self.workload(uid)?;
                if workload.status != HealthStatus::Healthy {
                    return None;
                }
                let target = match ports.get(&port).copied().or(default_target)? {
                    0 => default_target.filter(|t| *t != 0).unwrap_or(port),
                    t => t,
                };
                Some(Endpoint {
                    workload,
                    port: target,
                })
            })
            .collect();
        if candidates.is_empty() {
            return None;
        }
        let turn = entry.cursor.fetch_add(1, Ordering::Relaxed);
        let n = candidates.len();
        candidates.into_iter().nth(turn % n)
    }
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
                    .pick_endpoint(&entry, 9080)
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
        assert!(state.pick_endpoint(&entry, 1234).is_none(), "no such port");
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
