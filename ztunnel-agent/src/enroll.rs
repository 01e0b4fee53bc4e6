//! Pod enrollment: a pod arrives with its network namespace (from istio-cni over ZDS, or from
//! the local config's `netns` field); the agent opens its listeners inside that namespace and
//! registers the pod with the kernel programs. Removal does the reverse.

pub mod local;
pub mod source_route;
pub mod zds;

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use ztunnel_common::{AF_INET, AF_INET6, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};

use crate::accesslog::Direction;
use crate::identity::Identity;
use crate::netns::{HostNetns, PodNetns};
use crate::proxy::{self, MeshContext, PodProxy};
use crate::redirect::{self, PodRedirect, Redirect};
use crate::socket::NetnsCookie;

/// Why a pod could not be enrolled or removed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Namespace problems.
    #[error(transparent)]
    Netns(#[from] crate::netns::Error),
    /// A listener could not be opened in the pod.
    #[error("cannot listen on {addr} in pod {pod}: is another proxy (a sidecar?) using the port?")]
    Listen {
        /// Pod.
        pod: String,
        /// Address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No addresses.
    #[error("pod {0} has no IP address in its network namespace: enroll it after the CNI has set up its interface")]
    NoAddress(String),
    /// Kernel maps.
    #[error(transparent)]
    Redirect(#[from] redirect::Error),
    /// The pod's TLS server could not be set up.
    #[error("cannot set up HBONE for pod {pod}")]
    Tls {
        /// Pod.
        pod: String,
        /// Why.
        #[source]
        source: crate::tls::Error,
    },
    /// Reading interface addresses failed.
    #[error("cannot list the addresses of pod {pod}")]
    Addresses {
        /// Pod.
        pod: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Where a pod's enrollment came from; each source only removes its own pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The local config file's `netns` field.
    LocalConfig,
    /// istio-cni over ZDS.
    Zds,
}

/// A pod to enroll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodSpec {
    /// Unique id (the Kubernetes pod uid, or the local config's uid).
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Addresses; empty means "read them from the pod's interfaces".
    pub ips: Vec<IpAddr>,
}

/// A pod the agent serves.
struct EnrolledPod {
    spec: PodSpec,
    source: Source,
    /// Listener addresses and their socket inodes (to find them in the pod's socket table).
    listeners: Vec<(SocketAddr, u64)>,
    netns: PodNetns,
    proxy: Arc<PodProxy>,
    /// Its DNS goes to the agent's DNS proxy.
    dns_capture: bool,
    /// Whether its application sees its clients' addresses.
    source_address: proxy::in_pod::SourceState,
    cancel: CancellationToken,
    tasks: JoinSet<()>,
}

/// A summary of an enrolled pod, for status views.
#[derive(Clone, Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    /// Pod uid.
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Addresses.
    pub ips: Vec<IpAddr>,
    /// Service account.
    pub service_account: String,
    /// Netns cookie.
    pub netns_cookie: u64,
    /// Its DNS goes to the agent's DNS proxy.
    pub dns_capture: bool,
    /// Whether its application sees its clients' addresses: `preserved`, `off`, or
    /// `unavailable: <why>`.
    pub source_address: String,
    /// Where the enrollment came from.
    pub source: Source,
}

/// What enrollment knows about one enrolled pod.
pub struct PodFacts {
    /// As enrolled.
    pub spec: PodSpec,
    /// Where the enrollment came from.
    pub source: Source,
    /// The pod's addresses.
    pub ips: Vec<IpAddr>,
    /// The identity it is served with.
    pub identity: Identity,
    /// Its network namespace.
    pub netns: PodNetns,
    /// The agent's listeners in it and their socket inodes.
    pub listeners: Vec<(SocketAddr, u64)>,
    /// The kernel maps' view of it.
    pub kernel: redirect::PodKernelView,
    /// Whether the mesh state has its workload.
    pub workload_known: bool,
    /// Its proxy (routing, policy subject).
    pub proxy: Arc<PodProxy>,
}

/// A pod out of capture because its workload left the mesh state: its namespace is kept so
/// that it is enrolled again when the workload comes back (istio-cni does not re-add it).
struct ParkedPod {
    spec: PodSpec,
    source: Source,
    netns: PodNetns,
}

/// A pod its source handed over that this agent could not serve.
struct Unserved {
    source: Source,
    cookie: NetnsCookie,
    /// Its readiness blocker.
    blocker: String,
    /// This agent put it in the kernel maps without listeners (fail closed).
    fenced: bool,
}

/// The enrolled pods and the kernel redirect they are registered with.
pub struct Enrollment {
    redirect: Redirect,
    host: HostNetns,
    mesh: Arc<MeshContext>,
    pods: BTreeMap<String, EnrolledPod>,
    parked: BTreeMap<String, ParkedPod>,
    /// A pod its source handed over but that could not be served blocks readiness (named
    /// after the pod) until it is enrolled or removed.
    readiness: Option<crate::readiness::Readiness>,
    /// The pods a source handed over that could not be served, by uid.
    unserved: BTreeMap<String, Unserved>,
    /// Whether pods' DNS is captured (see [`Enrollment::set_dns`]).
    dns_capture: bool,
    /// Where their DNS proxies forward.
    dns_resolvers: Arc<[SocketAddr]>,
    /// Whether pods' applications see their clients' addresses (see
    /// [`Enrollment::set_preserve_source`]).
    preserve_source: bool,
}

impl Enrollment {
    /// Starts with no pods (the kernel maps may still hold pods from before a restart; they
    /// keep being captured until [`Enrollment::sweep_stale`]).
    pub fn new(redirect: Redirect, host: HostNetns, mesh: Arc<MeshContext>) -> Self {
        Self {
            redirect,
            host,
            mesh,
            pods: BTreeMap::new(),
            parked: BTreeMap::new(),
            readiness: None,
            unserved: BTreeMap::new(),
            dns_capture: false,
            dns_resolvers: Arc::from(Vec::new()),
            preserve_source: true,
        }
    }

    /// Whether enrollments from now on connect to the pod's application from the client's
    /// address (on by default).
    pub fn set_preserve_source(&mut self, on: bool) {
        self.preserve_source = on;
    }

    /// Captures pods' DNS into the agent's DNS proxy, forwarding as `dns` says (off until
    /// called: enrollments from then on get it).
    pub fn set_dns(&mut self, dns: &crate::dns::DnsSettings) {
        self.dns_capture = dns.capture;
        self.dns_resolvers = dns.upstreams.clone().into();
    }

    /// Reports pods that cannot be served as readiness blockers (`pod <ns>/<name> not
    /// served`): during an overlapping upgrade the new agent then stays unready, and the old
    /// one keeps serving, instead of the pod losing its proxy.
    pub fn set_readiness(&mut self, readiness: crate::readiness::Readiness) {
        self.readiness = Some(readiness);
    }

    /// `workload_manager_active_proxy_count` (pods served) and `..._pending_proxy_count`
    /// (pods handed over but not served; converges to zero once they are enrolled or gone).
    fn report_proxies(&self) {
        crate::metrics::global().set_proxies(self.pods.len(), self.unserved.len());
    }

    fn served(&mut self, uid: &str) {
        if let (Some(unserved), Some(readiness)) = (self.unserved.remove(uid), &self.readiness) {
            readiness.unblock(&unserved.blocker);
        }
    }

    /// Its source removed a pod this agent could not serve: its blocker goes, and so does the
    /// fail-closed capture this agent put in place for it.
    fn forget_unserved(&mut self, uid: &str) -> Result<(), Error> {
        let Some(unserved) = self.unserved.remove(uid) else {
            return Ok(());
        };
        self.report_proxies();
        if let Some(readiness) = &self.readiness {
            readiness.unblock(&unserved.blocker);
        }
        if unserved.fenced && !self.pods.contains_key(uid) {
            self.redirect.remove_pod(unserved.cookie)?;
        }
        Ok(())
    }

    /// A pod its source enrolls in the mesh that this agent cannot serve must not reach
    /// anything around the proxy: unless the kernel maps already hold it (another live
    /// agent serves it, or a previous run did), it is registered without listeners, so its
    /// outbound connections go to its 15001 (where no agent listens: refused) and inbound
    /// ones are dropped. Returns whether it was.
    fn fence(&mut self, spec: &PodSpec, netns: &PodNetns) -> bool {
        if self.redirect.enrolled_cookies().contains(&netns.cookie()) {
            return false;
        }
        let ips = if spec.ips.is_empty() {
            interface_addresses(netns, &spec.name).unwrap_or_default()
        } else {
            spec.ips.clone()
        };
        if ips.is_empty() {
            return false;
        }
        let fenced = self.redirect.add_pod(&PodRedirect {
            netns_cookie: netns.cookie(),
            netns: netns.file(),
            ips: &ips,
            inbound_listeners: &[],
            // Its DNS stays uncaptured: nothing would answer it.
            dns_capture: false,
        });
        match fenced {
            Ok(()) => {
                tracing::warn!(pod = %spec.name, namespace = %spec.namespace, "pod not served: its connections are refused (fail closed) until it is enrolled");
                true
            }
            Err(e) => {
                tracing::error!(pod = %spec.name, namespace = %spec.namespace, error = %crate::telemetry::ErrorChain(&e), "pod not served, and it could not be fenced off either: its traffic is not captured");
                false
            }
        }
    }

    fn not_served(&mut self, source: Source, spec: &PodSpec, netns: &PodNetns) {
        let cookie = netns.cookie();
        let fenced = match self.unserved.get(&spec.uid) {
            Some(u) if u.cookie == cookie => u.fenced,
            _ => self.fence(spec, netns),
        };
        let blocker = format!(
            "pod {}/{} (uid {}) not served: its enrollment failed (see the log)",
            spec.namespace, spec.name, spec.uid
        );
        if let Some(readiness) = &self.readiness {
            readiness.block(blocker.clone());
        }
        self.unserved.insert(
            spec.uid.clone(),
            Unserved {
                source,
                cookie,
                blocker,
                fenced,
            },
        );
    }

    /// Takes a pod out of capture, keeping its namespace to enroll it again with
    /// [`Enrollment::unpark`]. Returns whether it was enrolled.
    pub async fn park(&mut self, uid: &str) -> Result<bool, Error> {
        let Some(pod) = self.pods.get(uid) else {
            return Ok(false);
        };
        let parked = ParkedPod {
            spec: pod.spec.clone(),
            source: pod.source,
            netns: pod.netns.clone(),
        };
        let result = self.unenroll(uid).await;
        // Parked even if the kernel maps refused the removal: the pod must not be lost.
        self.parked.insert(uid.to_string(), parked);
        result.map(|_| true)
    }

    /// Enrolls again the parked pods named `namespace/name`; returns how many. A pod that
    /// fails to enroll stays parked (and the last error is returned).
    pub async fn unpark(&mut self, namespace: &str, name: &str) -> Result<usize, Error> {
        let uids: Vec<String> = self
            .parked
            .iter()
            .filter(|(_, p)| p.spec.namespace == namespace && p.spec.name == name)
            .map(|(uid, _)| uid.clone())
            .collect();
        let mut enrolled = 0;
        let mut failure = None;
        for uid in uids {
            let Some(p) = self.parked.remove(&uid) else {
                continue;
            };
            let (source, spec, netns) = (p.source, p.spec.clone(), p.netns.clone());
            match self.enroll(source, spec, netns).await {
                Ok(()) => enrolled += 1,
                Err(e) => {
                    self.parked.insert(uid, p);
                    failure = Some(e);
                }
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(enrolled),
        }
    }

    /// Parked pods as `namespace/name`.
    pub fn parked(&self) -> Vec<String> {
        self.parked
            .values()
            .map(|p| format!("{}/{}", p.spec.namespace, p.spec.name))
            .collect()
    }

    /// The agent's own network namespace.
    pub fn host(&self) -> &HostNetns {
        &self.host
    }

    /// The shared mesh context.
    pub fn mesh(&self) -> &Arc<MeshContext> {
        &self.mesh
    }

    /// Enrolled pods.
    pub fn status(&self) -> Vec<PodStatus> {
        self.pods
            .values()
            .map(|p| PodStatus {
                uid: p.spec.uid.clone(),
                name: p.spec.name.clone(),
                namespace: p.spec.namespace.clone(),
                ips: p.proxy.ips.clone(),
                service_account: p.proxy.identity.service_account.clone(),
                netns_cookie: p.netns.cookie().0,
                dns_capture: p.dns_capture,
                source_address: p.source_address.to_string(),
                source: p.source,
            })
            .collect()
    }

    /// Every enrolled pod's kernel capture counters: (pod, namespace, counters).
    pub fn pod_counters(&self) -> Vec<(String, String, ztunnel_common::PodCounters)> {
        self.pods
            .values()
            .map(|p| {
                (
                    p.spec.name.clone(),
                    p.spec.namespace.clone(),
                    self.redirect.counters(p.netns.cookie()),
                )
            })
            .collect()
    }

    /// Plain facts about the enrolled pods (only `only`, a namespace and name, if given):
    /// what enrollment set up and the kernel maps' view of it, for `diagnose` to judge.
    pub fn facts(&self, only: Option<(&str, &str)>) -> Vec<PodFacts> {
        let snapshot = self.mesh.state.snapshot();
        self.pods
            .values()
            .filter(|p| only.is_none_or(|(ns, name)| p.spec.namespace == ns && p.spec.name == name))
            .map(|p| PodFacts {
                spec: p.spec.clone(),
                source: p.source,
                ips: p.proxy.ips.clone(),
                identity: p.proxy.identity.clone(),
                netns: p.netns.clone(),
                listeners: p.listeners.clone(),
                kernel: self.redirect.pod_view(p.netns.cookie(), &p.proxy.ips),
                workload_known: snapshot
                    .pod_workload(&p.spec.uid, &p.spec.namespace, &p.spec.name)
                    .is_some(),
                proxy: p.proxy.clone(),
            })
            .collect()
    }

    /// An enrolled pod's capture counters now, by netns cookie.
    pub fn counters(&self, cookie: u64) -> ztunnel_common::PodCounters {
        self.redirect.counters(NetnsCookie(cookie))
    }

    /// The kernel redirect.
    pub fn redirect(&self) -> &Redirect {
        &self.redirect
    }

    /// Enrolls a pod (or re-enrolls it if its namespace or addresses changed). A pod that
    /// fails blocks readiness until it is enrolled or removed.
    pub async fn enroll(
        &mut self,
        source: Source,
        spec: PodSpec,
        netns: PodNetns,
    ) -> Result<(), Error> {
        let uid = spec.uid.clone();
        let (failed, failed_netns) = (spec.clone(), netns.clone());
        let result = self.try_enroll(source, spec, netns).await;
        match &result {
            Ok(()) => self.served(&uid),
            Err(_) => self.not_served(source, &failed, &failed_netns),
        }
        self.report_proxies();
        result
    }

    async fn try_enroll(
        &mut self,
        source: Source,
        spec: PodSpec,
        netns: PodNetns,
    ) -> Result<(), Error> {
        // Its source handing it over again supersedes a parked copy.
        self.parked.remove(&spec.uid);
        if let Some(existing) = self.pods.get(&spec.uid) {
            if existing.spec == spec && existing.netns.cookie() == netns.cookie() {
                return Ok(());
            }
            self.unenroll(&spec.uid.clone()).await?;
        }
        let ips = if spec.ips.is_empty() {
            interface_addresses(&netns, &spec.name)?
        } else {
            spec.ips.clone()
        };
        if ips.is_empty() {
            return Err(Error::NoAddress(spec.name.clone()));
        }
        let has_v6 = ips.iter().any(|ip| ip.is_ipv6());
        let mut listeners = Vec::new();
        let keepalive = self.mesh.keepalive;
        for (port, listener) in open_listeners(&netns, &spec.name, has_v6, keepalive.as_ref())? {
            let addr = listener
                .local_addr()
                .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], port)));
            let listener = TcpListener::from_std(listener).map_err(|source| Error::Listen {
                pod: spec.name.clone(),
                addr,
                source,
            })?;
            listeners.push((addr, listener));
        }
        // The DNS proxy's listeners; a pod whose listeners cannot be opened keeps its DNS
        // uncaptured (said once, here) rather than losing it.
        let dns_listeners = if self.dns_capture {
            let opened = netns
                .run(|| crate::dns::server::bind(true).or_else(|_| crate::dns::server::bind(false)))
                .map_err(std::io::Error::other)
                .and_then(|r| r);
            match opened {
                Ok(sockets) => Some(sockets),
                Err(e) => {
                    tracing::warn!(pod = %spec.name, namespace = %spec.namespace, error = %e, "DNS proxy listeners not opened in the pod (is something else on 127.0.0.1:15053?): its DNS is not captured");
                    None
                }
            }
        } else {
            None
        };
        let listener_inodes: Vec<(SocketAddr, u64)> = listeners
            .iter()
            .map(|(addr, l)| {
                let inode = nix::sys::stat::fstat(l.as_raw_fd()).map_or(0, |st| st.st_ino);
                (*addr, inode)
            })
            .collect();
        let inbound_fds: Vec<(u32, i32)> = listeners
            .iter()
            .filter(|(addr, _)| addr.port() == INBOUND_PLAINTEXT_PORT)
            .map(|(addr, l)| {
                let family = if addr.is_ipv6() { AF_INET6 } else { AF_INET };
                (family, l.as_raw_fd())
            })
            .collect();
        // The mesh state knows the workload (identity, network) when the pod is in it;
        // a ZDS pod not (yet) in the state gets the identity its CNI message describes.
        // istio-cni names pods by Kubernetes UID, xDS by `<cluster>//Pod/<ns>/<name>`.
        let snapshot = self.mesh.state.snapshot();
        let known = snapshot.pod_workload(&spec.uid, &spec.namespace, &spec.name);
        let (identity, network) = match &known {
            Some(w) => (w.identity(), w.network.clone()),
            None => (
                Identity {
                    trust_domain: self.mesh.certs.trust_domain().to_string(),
                    namespace: spec.namespace.clone(),
                    service_account: if spec.service_account.is_empty() {
                        "default".to_string()
                    } else {
                        spec.service_account.clone()
                    },
                },
                String::new(),
            ),
        };
        // Issued now rather than at the first handshake: readiness then implies the pod's
        // certificate exists, and the first connection does not pay for key generation.
        self.mesh
            .certs
            .ensure(&identity)
            .map_err(|source| Error::Tls {
                pod: spec.name.clone(),
                source: crate::tls::Error::Cert(Box::new(source)),
            })?;
        let tls = crate::tls::server_config(self.mesh.certs.clone(), identity.clone()).map_err(
            |source| Error::Tls {
                pod: spec.name.clone(),
                source,
            },
        )?;
        // Registered with the kernel last, once nothing else can fail: during an overlapping
        // upgrade this takes the inbound steering from the agent serving the pod now, which
        // must not happen for a pod this agent then fails to serve.
        self.redirect.add_pod(&PodRedirect {
            netns_cookie: netns.cookie(),
            netns: netns.file(),
            ips: &ips,
            inbound_listeners: &inbound_fds,
            dns_capture: dns_listeners.is_some(),
        })?;
        let source_address = self.source_routing(&netns, &spec, has_v6);
        let proxy = Arc::new(PodProxy {
            uid: spec.uid.clone(),
            name: spec.name.clone(),
            namespace: spec.namespace.clone(),
            identity,
            network,
            ips: ips.clone(),
            sockets: Arc::new(proxy::in_pod::InPodSockets::new(
                netns.clone(),
                self.redirect.orig_dst_table(),
                proxy::in_pod::SourceAddress {
                    dials: self.redirect.dial_table(),
                    pod_ips: ips.clone(),
                    plaintext_peers: Default::default(),
                    state: source_address.clone(),
                    pod: (spec.name.clone(), spec.namespace.clone()),
                    // A refusal at enrollment was just said.
                    warned: std::sync::atomic::AtomicBool::new(
                        source_address != proxy::in_pod::SourceState::On,
                    ),
                },
            )),
            mesh: self.mesh.clone(),
            hbone_tls: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            load: Default::default(),
        });
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        for (addr, listener) in listeners {
            let (pod, cancel) = (proxy.clone(), cancel.clone());
            match addr.port() {
                OUTBOUND_PORT => tasks.spawn(proxy::accept_loop(
                    listener,
                    pod,
                    cancel,
                    Direction::Outbound,
                    proxy::outbound::handle,
                )),
                INBOUND_PLAINTEXT_PORT => tasks.spawn(proxy::accept_loop(
                    listener,
                    pod,
                    cancel,
                    Direction::Inbound,
                    proxy::inbound_passthrough::handle,
                )),
                _ => tasks.spawn(proxy::accept_loop(
                    listener,
                    pod,
                    cancel,
                    Direction::Inbound,
                    proxy::hbone::serve,
                )),
            };
        }
        let dns_capture = dns_listeners.is_some();
        if let Some((udp, tcp)) = dns_listeners {
            let dns = crate::dns::server::PodDns::new(proxy.clone(), self.dns_resolvers.clone());
            for socket in udp {
                match tokio::net::UdpSocket::from_std(socket) {
                    Ok(socket) => {
                        tasks.spawn(crate::dns::server::serve_udp(
                            socket,
                            dns.clone(),
                            cancel.clone(),
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(pod = %spec.name, error = %e, "DNS proxy UDP listener not served")
                    }
                }
            }
            for listener in tcp {
                match TcpListener::from_std(listener) {
                    Ok(listener) => {
                        tasks.spawn(crate::dns::server::serve_tcp(
                            listener,
                            dns.clone(),
                            cancel.clone(),
                        ));
                    }
                    Err(e) => {
                        tracing::warn!(pod = %spec.name, error = %e, "DNS proxy TCP listener not served")
                    }
                }
            }
        }
        tracing::info!(
            pod = %spec.name,
            namespace = %spec.namespace,
            uid = %spec.uid,
            ips = ?ips,
            dns_capture,
            source_address = %source_address,
            netns_cookie = %netns.cookie(),
            "pod enrolled"
        );
        self.pods.insert(
            spec.uid.clone(),
            EnrolledPod {
                spec,
                source,
                listeners: listener_inodes,
                netns,
                proxy,
                dns_capture,
                source_address,
                cancel,
                tasks,
            },
        );
        crate::metrics::global().proxy_started();
        Ok(())
    }

    /// Sets the pod's namespace up so its application's replies to connections from a
    /// client's address come back to the agent (see [`source_route`]); a refusal is said
    /// once, here, and the pod keeps its own address.
    fn source_routing(
        &self,
        netns: &PodNetns,
        spec: &PodSpec,
        ipv6: bool,
    ) -> proxy::in_pod::SourceState {
        use proxy::in_pod::SourceState;
        if !self.preserve_source {
            return SourceState::Off;
        }
        let installed = netns
            .run(|| source_route::install(ipv6))
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        match installed {
            Ok(()) => SourceState::On,
            Err(why) => {
                tracing::warn!(pod = %spec.name, namespace = %spec.namespace, reason = %why, "the pod's application will see the pod's own address instead of its clients' (source-address preservation unavailable; counted in ztunnel_source_address_fallbacks_total)");
                SourceState::Refused(why)
            }
        }
    }

    /// Removes a pod: capture stops, then its listeners close. Returns whether it was
    /// enrolled.
    pub async fn unenroll(&mut self, uid: &str) -> Result<bool, Error> {
        // Removed by its source: a parked copy is forgotten too, and a failure to serve it
        // no longer matters.
        let was_unserved = self.unserved.contains_key(uid);
        self.forget_unserved(uid)?;
        let was_parked = self.parked.remove(uid).is_some();
        let Some(mut pod) = self.pods.remove(uid) else {
            return Ok(was_parked || was_unserved);
        };
        let result = self.redirect.remove_pod(pod.netns.cookie());
        pod.cancel.cancel();
        // Wait until every accept loop has returned, so the listeners are closed when this
        // returns (connections already accepted finish on their own).
        while pod.tasks.join_next().await.is_some() {}
        crate::metrics::global().proxy_stopped();
        crate::metrics::global()
            .forget_source_address_fallbacks(&pod.spec.name, &pod.spec.namespace);
        self.report_proxies();
        tracing::info!(pod = %pod.spec.name, namespace = %pod.spec.namespace, uid = %uid, "pod removed");
        result?;
        Ok(true)
    }

    /// Unenrolls the pods `source` enrolled that are not in `keep`.
    pub async fn retain(&mut self, source: Source, keep: &[String]) -> Result<(), Error> {
        self.parked
            .retain(|uid, p| p.source != source || keep.contains(uid));
        let forgotten: Vec<String> = self
            .unserved
            .iter()
            .filter(|(uid, u)| u.source == source && !keep.contains(uid))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in forgotten {
            self.forget_unserved(&uid)?;
        }
        let gone: Vec<String> = self
            .pods
            .iter()
            .filter(|(uid, pod)| pod.source == source && !keep.contains(uid))
            .map(|(uid, _)| uid.clone())
            .collect();
        for uid in gone {
            self.unenroll(&uid).await?;
        }
        Ok(())
    }

    /// Removes from the kernel maps the pods a previous run enrolled that no source has
    /// enrolled again. Call once every pod source has had its initial sync.
    ///
    /// A pod whose inbound listener is still registered in the kernel is served by another
    /// live agent (the one this agent replaces, during an overlapping upgrade): the kernel
    /// drops a socket from `INBOUND_LISTENERS` when its process closes it, so a registered
    /// listener proves a live owner. Such a pod is left alone; removing it would let its
    /// traffic bypass that agent's proxy.
    pub fn sweep_stale(&mut self) -> Result<usize, Error> {
        let live: Vec<NetnsCookie> = self.pods.values().map(|p| p.netns.cookie()).collect();
        let mut swept = 0;
        for cookie in self.redirect.enrolled_cookies() {
            // A pod a source handed over but this agent failed to serve stays captured (its
            // connections fail rather than bypass the proxy; readiness says so).
            if live.contains(&cookie) || self.unserved.values().any(|u| u.cookie == cookie) {
                continue;
            }
            if self.redirect.has_live_listener(cookie) {
                tracing::warn!(netns_cookie = %cookie, "a pod in the kernel maps that no source gave this agent is served by another live agent: left as it is");
                continue;
            }
            {
                self.redirect.remove_pod(cookie)?;
                tracing::info!(netns_cookie = %cookie, "removed a pod left over from a previous run");
                swept += 1;
            }
        }
        Ok(swept)
    }
}

/// Opens 15001, 15006 and 15008 inside the pod (IPv4, and IPv6 when the pod has it).
fn open_listeners(
    netns: &PodNetns,
    pod: &str,
    has_v6: bool,
    keepalive: Option<&crate::socket::Keepalive>,
) -> Result<Vec<(u16, std::net::TcpListener)>, Error> {
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for port in [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT] {
        addrs.push(SocketAddr::from(([0, 0, 0, 0], port)));
        if has_v6 {
            addrs.push(SocketAddr::from(([0u16; 8], port)));
        }
    }
    let opened = netns.run(|| {
        tune_pod_netns();
        addrs
            .iter()
            .map(|addr| {
                bind(*addr, keepalive)
                    .map(|l| (addr.port(), l))
                    .map_err(|e| (*addr, e))
            })
            .collect::<Result<Vec<_>, _>>()
    })?;
    opened.map_err(|(addr, source)| Error::Listen {
        pod: pod.to_string(),
        addr,
        source,
    })
}

/// Two TCP settings of the current network namespace (call it from inside the pod's;
/// /proc/sys/net shows the namespace of the thread that opens it):
/// - `net.ipv4.tcp_migrate_req` = 1 (Linux 5.14; covers IPv6 too): when the draining agent
///   closes its listener, connections already in its accept queue move to the new agent's
///   listener in the same `SO_REUSEPORT` group instead of being reset (without it, those
///   few connections are reset, as with upstream ztunnel);
/// - `net.ipv4.tcp_tw_reuse` = 1 when it has the kernel default 2 (loopback only): every
///   captured connection is connected to the pod's own address and port 15001, so the
///   TIME_WAIT entries of all the pod's closed outbound connections share one
///   (address, 15001) pair and its ~28,000 ephemeral ports; without reuse a pod whose
///   application closes first could open only about 470 new outbound connections a second
///   (measured: `cargo xtask soak` (c)). With timestamps (the default) reuse is safe.
fn tune_pod_netns() {
    const MIGRATE: &str = "/proc/sys/net/ipv4/tcp_migrate_req";
    const TW_REUSE: &str = "/proc/sys/net/ipv4/tcp_tw_reuse";
    if let Err(e) = std::fs::write(MIGRATE, "1") {
        tracing::warn!(error = %e, "{MIGRATE} not set in the pod's namespace: connections queued on a draining agent's listeners are reset during an upgrade");
    }
    let tw_reuse = std::fs::read_to_string(TW_REUSE).unwrap_or_default();
    if tw_reuse.trim() == "2" {
        if let Err(e) = std::fs::write(TW_REUSE, "1") {
            tracing::warn!(error = %e, "{TW_REUSE} not set in the pod's namespace: its new outbound connections are limited to about 470/s while its application closes first");
        }
    }
}

/// A pod's listener on `addr`, whose accepted sockets all have the connection options
/// (set before it listens, so none is accepted without them).
fn bind(
    addr: SocketAddr,
    keepalive: Option<&crate::socket::Keepalive>,
) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    // Another agent (the one this replaces, or its replacement during an overlapping
    // upgrade) may hold the same port in the pod: both listen, the kernel spreads new
    // connections over the group, and when one closes the other takes over.
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    if let Err(e) = crate::socket::connection_options(&socket, keepalive) {
        // The accept loop sets them on each accepted socket instead.
        tracing::warn!(%addr, error = %e, "TCP_NODELAY or keepalive not set on a pod's listener: set on each connection instead");
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// The pod's global addresses, read from inside its namespace.
fn interface_addresses(netns: &PodNetns, pod: &str) -> Result<Vec<IpAddr>, Error> {
    let listed = netns.run(|| -> io::Result<Vec<IpAddr>> {
        let mut ips = Vec::new();
        for ifaddr in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
            let Some(addr) = ifaddr.address else { continue };
            let ip = if let Some(v4) = addr.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else if let Some(v6) = addr.as_sockaddr_in6() {
                IpAddr::V6(v6.ip())
            } else {
                continue;
            };
            let link_local = matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80);
            if !ip.is_loopback() && !link_local && !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        Ok(ips)
    })?;
    listed.map_err(|source| Error::Addresses {
        pod: pod.to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// The socket a pod's listener accepts, once a client has connected.
    fn accepted(keepalive: Option<&crate::socket::Keepalive>) -> std::net::TcpStream {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)), keepalive).expect("listener");
        listener.set_nonblocking(false).expect("blocking accept");
        let addr = listener.local_addr().expect("address");
        let _client = std::net::TcpStream::connect(addr).expect("connect");
        listener.accept().expect("accept").0
    }

    /// Every socket a pod's listener accepts has TCP_NODELAY and the configured keepalive
    /// from the listener (the accept loop sets them only where they are missing).
    #[test]
    fn accepted_sockets_have_the_connection_options_of_their_listener() {
        let keepalive = crate::socket::Keepalive {
            time: Duration::from_secs(170),
            interval: Duration::from_secs(25),
            retries: 4,
        };
        let socket = accepted(Some(&keepalive));
        let socket = socket2::SockRef::from(&socket);
        assert!(socket.nodelay().expect("TCP_NODELAY"), "TCP_NODELAY");
        assert!(socket.keepalive().expect("SO_KEEPALIVE"), "SO_KEEPALIVE");
        assert_eq!(socket.keepalive_time().expect("idle"), keepalive.time);
        assert_eq!(
            socket.keepalive_interval().expect("interval"),
            keepalive.interval
        );
        assert_eq!(
            socket.keepalive_retries().expect("count"),
            keepalive.retries
        );

        // Keepalive off: none, TCP_NODELAY still.
        let socket = accepted(None);
        let socket = socket2::SockRef::from(&socket);
        assert!(socket.nodelay().expect("TCP_NODELAY"), "TCP_NODELAY");
        assert!(
            !socket.keepalive().expect("SO_KEEPALIVE"),
            "no SO_KEEPALIVE"
        );
    }
}
