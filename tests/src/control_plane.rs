//! The development control plane: a small istiod stand-in speaking the real protocols over
//! TLS, for the tests and `cargo xtask demo`. It is test tooling, not a product.
//!
//! - xDS: `DeltaAggregatedResources`, serving `istio.workload.Address` and
//!   `istio.security.Authorization` built from a mesh YAML file (the local-config format),
//!   pushing changes when the file changes, honouring `initial_resource_versions`, and
//!   recording every ACK and NACK.
//! - CA: `CreateCertificate`, signing the agent's CSR with its own root (the chain ends with
//!   the root, as istiod's does); it can rotate to a new root and can be told to answer with
//!   the wrong identity.
//! - `GET /debug/config_dump?proxyID=<id>` on its debug port: the resources it holds for
//!   connected proxies whose id contains `<id>`, as istiod shows them.
//!
//! It runs on its own runtime; dropping it is a crash (every stream cut at once).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::{mpsc, watch};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};
use ztunnel_agent::identity::ca::LocalCa;
use ztunnel_agent::proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use ztunnel_agent::proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use ztunnel_agent::proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
};
use ztunnel_agent::proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource};
use ztunnel_agent::tls::pem::pem_encode;
use ztunnel_agent::xds::client::{ADDRESS_TYPE, AUTHORIZATION_TYPE};
use ztunnel_agent::xds::{convert, local};

/// Resources by type URL, then name: (version, body).
type Resources = BTreeMap<String, BTreeMap<String, (String, prost_types::Any)>>;

/// One ACK or NACK the control plane received.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The proxy's node id.
    pub node: String,
    /// Type URL.
    pub type_url: String,
    /// Nonce answered.
    pub nonce: String,
    /// The NACK's message, if it was one.
    pub error: Option<String>,
}

/// A subscription the control plane received.
#[derive(Clone, Debug)]
pub struct Subscription {
    /// The proxy's node id.
    pub node: String,
    /// Type URL.
    pub type_url: String,
    /// `initial_resource_versions`: what the proxy said it holds.
    pub held: BTreeMap<String, String>,
}

/// What the tests can observe and steer.
#[derive(Default)]
struct Shared {
    /// From the mesh file.
    file: Mutex<Resources>,
    /// Added by tests on top of the file (for invalid resources).
    injected: Mutex<Resources>,
    /// Every ACK and NACK, in order.
    replies: Mutex<Vec<Reply>>,
    /// Initial requests, in order.
    subscriptions: Mutex<Vec<Subscription>>,
    /// Certificates issued, by identity.
    issued: Mutex<BTreeMap<String, usize>>,
    /// Connected proxies (node ids).
    proxies: Mutex<Vec<String>>,
    /// The mesh file parsed, for the debug view.
    config: Mutex<Option<serde_json::Value>>,
    wrong_identity: AtomicBool,
}

/// How to run it.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Mesh YAML (the local-config format), watched for changes.
    pub mesh: PathBuf,
    /// Directory of the CA root (created if absent).
    pub ca_dir: PathBuf,
    /// Longest certificate lifetime it issues (istiod's max workload TTL).
    pub max_cert_ttl: Duration,
    /// Token every call must carry (`authorization: Bearer <token>`), if any.
    pub token: Option<String>,
}

/// A running development control plane.
pub struct ControlPlane {
    runtime: Option<tokio::runtime::Runtime>,
    shared: Arc<Shared>,
    signer: Arc<Mutex<Arc<LocalCa>>>,
    changed: watch::Sender<u64>,
    /// Where the gRPC server listens.
    pub addresses: Vec<SocketAddr>,
    /// Where the debug server listens.
    pub debug_addresses: Vec<SocketAddr>,
    /// The root bundle agents must trust (`XDS_ROOT_CA` / `CA_ROOT_CA`).
    pub roots_path: PathBuf,
    settings: Settings,
}

impl ControlPlane {
    /// Starts it on already bound listeners (bind them inside a test's network namespace to
    /// serve agents there): `grpc` for xDS and the CA, `debug` for the debug view. The server
    /// certificate names every gRPC listener's IP and `istiod.istio-system.svc`.
    pub fn start(settings: Settings, grpc: Vec<TcpListener>, debug: Vec<TcpListener>) -> Self {
        let (ca, roots_path) = Self::prepare_root(&settings.ca_dir);
        let ca = Arc::new(ca);
        let addresses: Vec<SocketAddr> =
            grpc.iter().map(|l| l.local_addr().expect("addr")).collect();
        let debug_addresses = debug
            .iter()
            .map(|l| l.local_addr().expect("addr"))
            .collect();
        let server_tls = server_tls(&ca, &addresses);
        let shared = Arc::new(Shared::default());
        let signer = Arc::new(Mutex::new(ca));
        let (changed, _) = watch::channel(0u64);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let mut me = Self {
            runtime: None,
            shared: shared.clone(),
            signer: signer.clone(),
            changed: changed.clone(),
            addresses,
            debug_addresses,
            roots_path,
            settings: settings.clone(),
        };
        me.reload();
        let _guard = runtime.enter();
        let xds = Xds {
            shared: shared.clone(),
            changed: changed.clone(),
            token: settings.token.clone(),
        };
        let ca_service = Ca {
            shared: shared.clone(),
            signer,
            max_ttl: settings.max_cert_ttl,
            token: settings.token.clone(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls));
        for listener in grpc {
            listener.set_nonblocking(true).expect("nonblocking");
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let (tx, acceptor) = (tx.clone(), acceptor.clone());
            runtime.spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let (tx, acceptor) = (tx.clone(), acceptor.clone());
                    tokio::spawn(async move {
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            let _ = tx.send(Ok::<_, std::io::Error>(tls));
                        }
                    });
                }
            });
        }
        runtime.spawn(
            tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(xds))
                .add_service(IstioCertificateServiceServer::new(ca_service))
                .serve_with_incoming(tokio_stream::wrappers::UnboundedReceiverStream::new(rx)),
        );
        for listener in debug {
            listener.set_nonblocking(true).expect("nonblocking");
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            runtime.spawn(serve_debug(listener, shared.clone()));
        }
        // The mesh file is polled; a change is pushed to every stream.
        let (path, shared_w, changed_w) = (settings.mesh.clone(), shared.clone(), changed.clone());
        runtime.spawn(async move {
            let mut last = std::fs::read_to_string(&path).unwrap_or_default();
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                if text != last {
                    last = text;
                    if load_file(&path, &shared_w) {
                        changed_w.send_modify(|n| *n += 1);
                    }
                }
            }
        });
        me.runtime = Some(runtime);
        me
    }

    /// The CA root in `ca_dir` (created if absent) and the bundle file agents trust
    /// (`<ca_dir>/roots.pem`). Tests call it before starting an agent that must read the
    /// bundle while the control plane is not up yet.
    pub fn prepare_root(ca_dir: &Path) -> (LocalCa, PathBuf) {
        let ca = LocalCa::load_or_create(ca_dir, "cluster.local").expect("control-plane CA");
        let roots_path = ca_dir.join("roots.pem");
        if !roots_path.exists() {
            std::fs::write(&roots_path, ca.root_pem()).expect("write roots");
        }
        (ca, roots_path)
    }

    /// Binds `127.0.0.1:port` inside `netns` (a node's network namespace) for it. A control
    /// plane just dropped closes its listeners in the background: retried for a while.
    pub fn bind_in(netns: &Path, port: u16) -> TcpListener {
        crate::traffic::in_netns(netns, move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                match TcpListener::bind(("127.0.0.1", port)) {
                    Ok(listener) => return listener,
                    Err(e)
                        if e.kind() == std::io::ErrorKind::AddrInUse
                            && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => panic!("bind 127.0.0.1:{port} in the node namespace: {e}"),
                }
            }
        })
    }

    /// Re-reads the mesh file now.
    pub fn reload(&self) {
        if load_file(&self.settings.mesh, &self.shared) {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// Serves `body` as resource `name` of `type_url` on top of the file, pushed at once
    /// (tests use it for resources the YAML cannot express, such as a malformed address).
    pub fn inject(&self, type_url: &str, name: &str, body: Vec<u8>) {
        let any = prost_types::Any {
            type_url: type_url.to_string(),
            value: body,
        };
        lock(&self.shared.injected)
            .entry(type_url.to_string())
            .or_default()
            .insert(name.to_string(), (version_of(&any.value), any));
        self.changed.send_modify(|n| *n += 1);
    }

    /// Stops serving an injected resource (a removal is pushed at once).
    pub fn remove_injected(&self, type_url: &str, name: &str) {
        if let Some(injected) = lock(&self.shared.injected).get_mut(type_url) {
            injected.remove(name);
        }
        self.changed.send_modify(|n| *n += 1);
    }

    /// Every ACK and NACK so far.
    pub fn replies(&self) -> Vec<Reply> {
        lock(&self.shared.replies).clone()
    }

    /// Initial requests so far.
    pub fn subscriptions(&self) -> Vec<Subscription> {
        lock(&self.shared.subscriptions).clone()
    }

    /// Certificates issued for `identity` so far.
    pub fn issued(&self, identity: &str) -> usize {
        lock(&self.shared.issued)
            .get(identity)
            .copied()
            .unwrap_or(0)
    }

    /// From now on, sign every request with the wrong identity (or stop doing so).
    pub fn answer_with_wrong_identity(&self, on: bool) {
        self.shared.wrong_identity.store(on, Ordering::SeqCst);
    }

    /// Root rotation, first half: a new root created in `dir` joins the bundle (old and new
    /// both trusted); `sign_with_new` switches signing to it.
    pub fn add_root(&self, dir: &Path) -> Arc<LocalCa> {
        let new = Arc::new(LocalCa::load_or_create(dir, "cluster.local").expect("new root"));
        let mut bundle = std::fs::read_to_string(&self.roots_path).expect("roots");
        bundle.push_str(&new.root_pem());
        std::fs::write(&self.roots_path, bundle).expect("write roots");
        new
    }

    /// Root rotation, last step: the bundle holds only `ca`'s root (the old one retired).
    pub fn retire_roots_but(&self, ca: &LocalCa) {
        std::fs::write(&self.roots_path, ca.root_pem()).expect("write roots");
    }

    /// Root rotation, second half: leaves are signed by `ca` from now on.
    pub fn sign_with(&self, ca: Arc<LocalCa>) {
        *lock(&self.signer) = ca;
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn version_of(bytes: &[u8]) -> String {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    format!("{:016x}", h.finish())
}

/// Loads the mesh file into resources; a bad file keeps the previous ones (and says so).
fn load_file(path: &Path, shared: &Shared) -> bool {
    let config = match local::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("control plane: mesh file refused, keeping the previous one: {e}");
            return false;
        }
    };
    let mut resources = Resources::new();
    let mut put = |type_url: &str, name: String, body: Vec<u8>| {
        let any = prost_types::Any {
            type_url: type_url.to_string(),
            value: body,
        };
        resources
            .entry(type_url.to_string())
            .or_default()
            .insert(name, (version_of(&any.value), any));
    };
    use ztunnel_agent::proto::workload::{address, Address};
    for w in &config.workloads {
        let body = Address {
            r#type: Some(address::Type::Workload(convert::workload_to_proto(w))),
        };
        put(ADDRESS_TYPE, w.key(), body.encode_to_vec());
    }
    for s in &config.services {
        let body = Address {
            r#type: Some(address::Type::Service(convert::service_to_proto(s))),
        };
        put(ADDRESS_TYPE, s.key(), body.encode_to_vec());
    }
    for p in &config.policies {
        put(
            AUTHORIZATION_TYPE,
            p.key(),
            convert::authorization_to_proto(p).encode_to_vec(),
        );
    }
    *lock(&shared.file) = resources;
    *lock(&shared.config) = Some(serde_json::json!({
        "workloads": config.workloads,
        "services": config.services,
        "policies": config.policies,
    }));
    true
}

fn current(shared: &Shared, type_url: &str) -> BTreeMap<String, (String, prost_types::Any)> {
    let mut all = lock(&shared.file)
        .get(type_url)
        .cloned()
        .unwrap_or_default();
    if let Some(extra) = lock(&shared.injected).get(type_url) {
        all.extend(extra.clone());
    }
    all
}

fn check_token<T>(token: &Option<String>, request: &Request<T>) -> Result<(), Box<Status>> {
    let Some(token) = token else { return Ok(()) };
    let got = request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok());
    if got == Some(&format!("Bearer {token}")) {
        Ok(())
    } else {
        Err(Box::new(Status::unauthenticated(
            "missing or wrong bearer token: mount the istio-token and set AUTH_TOKEN",
        )))
    }
}

struct Xds {
    shared: Arc<Shared>,
    changed: watch::Sender<u64>,
    token: Option<String>,
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<DeltaDiscoveryResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for Xds {
    type DeltaAggregatedResourcesStream = ResponseStream;

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<ResponseStream>, Status> {
        check_token(&self.token, &request).map_err(|e| *e)?;
        let mut requests = request.into_inner();
        let (tx, rx) = mpsc::unbounded_channel();
        let (shared, mut changed) = (self.shared.clone(), self.changed.subscribe());
        tokio::spawn(async move {
            let mut node = String::new();
            // What this stream has been sent: type -> name -> version.
            let mut sent: HashMap<String, BTreeMap<String, String>> = HashMap::new();
            let mut nonce = 0u64;
            loop {
                tokio::select! {
                    request = requests.next() => {
                        let Some(Ok(request)) = request else { break };
                        if let Some(n) = &request.node {
                            if node.is_empty() {
                                node = n.id.clone();
                                lock(&shared.proxies).push(node.clone());
                            }
                        }
                        if request.response_nonce.is_empty() {
                            // A subscription: the client says what it holds.
                            let held: BTreeMap<String, String> =
                                request.initial_resource_versions.clone().into_iter().collect();
                            lock(&shared.subscriptions).push(Subscription {
                                node: node.clone(),
                                type_url: request.type_url.clone(),
                                held: held.clone(),
                            });
                            sent.insert(request.type_url.clone(), held);
                            let first = push(&shared, &request.type_url, &mut sent, &mut nonce, true);
                            if let Some(r) = first { let _ = tx.send(Ok(r)); }
                        } else {
                            lock(&shared.replies).push(Reply {
                                node: node.clone(),
                                type_url: request.type_url.clone(),
                                nonce: request.response_nonce.clone(),
                                error: request.error_detail.map(|s| s.message),
                            });
                        }
                    }
                    r = changed.changed() => {
                        if r.is_err() { break }
                        let types: Vec<String> = sent.keys().cloned().collect();
                        for t in types {
                            if let Some(r) = push(&shared, &t, &mut sent, &mut nonce, false) {
                                let _ = tx.send(Ok(r));
                            }
                        }
                    }
                }
            }
            lock(&shared.proxies).retain(|p| *p != node);
        });
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The response bringing a stream's view of `type_url` up to date (always one for the first
/// answer to a subscription, so the client can count itself synced).
fn push(
    shared: &Shared,
    type_url: &str,
    sent: &mut HashMap<String, BTreeMap<String, String>>,
    nonce: &mut u64,
    first: bool,
) -> Option<DeltaDiscoveryResponse> {
    let now = current(shared, type_url);
    let held = sent.entry(type_url.to_string()).or_default();
    let resources: Vec<Resource> = now
        .iter()
        .filter(|(name, (version, _))| held.get(*name) != Some(version))
        .map(|(name, (version, any))| Resource {
            name: name.clone(),
            version: version.clone(),
            resource: Some(any.clone()),
            ..Default::default()
        })
        .collect();
    let removed: Vec<String> = held
        .keys()
        .filter(|name| !now.contains_key(*name))
        .cloned()
        .collect();
    if resources.is_empty() && removed.is_empty() && !first {
        return None;
    }
    *held = now
        .iter()
        .map(|(n, (v, _))| (n.clone(), v.clone()))
        .collect();
    *nonce += 1;
    Some(DeltaDiscoveryResponse {
        type_url: type_url.to_string(),
        resources,
        removed_resources: removed,
        nonce: nonce.to_string(),
        system_version_info: String::new(),
        control_plane: None,
    })
}

struct Ca {
    shared: Arc<Shared>,
    signer: Arc<Mutex<Arc<LocalCa>>>,
    max_ttl: Duration,
    token: Option<String>,
}

#[tonic::async_trait]
impl IstioCertificateService for Ca {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        check_token(&self.token, &request).map_err(|e| *e)?;
        let request = request.into_inner();
        let identity = request
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get("ImpersonatedIdentity"))
            .and_then(|v| match &v.kind {
                Some(prost_types::value::Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            })
            .ok_or_else(|| Status::invalid_argument("no ImpersonatedIdentity in metadata"))?;
        let requested = Duration::from_secs(u64::try_from(request.validity_duration).unwrap_or(0));
        let ttl = if requested.is_zero() {
            self.max_ttl
        } else {
            requested.min(self.max_ttl)
        };
        let wrong = self.shared.wrong_identity.load(Ordering::SeqCst);
        let signer = lock(&self.signer).clone();
        let (leaf, _, _) = signer
            .sign_request(
                &request.csr,
                ttl,
                wrong.then_some("spiffe://cluster.local/ns/evil/sa/impostor"),
            )
            .map_err(|e| Status::invalid_argument(format!("cannot sign: {e}")))?;
        *lock(&self.shared.issued).entry(identity).or_default() += 1;
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: vec![pem_encode(&leaf), signer.root_pem()],
            root_cert: None,
        }))
    }
}

/// The server certificate: signed by the CA through a CSR, naming the listener IPs and
/// istiod's service name.
fn server_tls(ca: &LocalCa, addresses: &[SocketAddr]) -> rustls::ServerConfig {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::DnsName(
        "istiod.istio-system.svc".try_into().expect("dns name"),
    )];
    for a in addresses {
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress(a.ip()));
    }
    let csr = params
        .serialize_request(&key)
        .expect("csr")
        .pem()
        .expect("pem");
    let (cert, _, _) = ca
        .sign_request(&csr, Duration::from_secs(24 * 3600), None)
        .expect("server certificate");
    let chain: Vec<CertificateDer<'static>> = vec![cert, ca.root()];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server cert");
    config.alpn_protocols = vec![b"h2".to_vec()];
    config
}

/// `GET /debug/config_dump?proxyID=<id>`: istiod's shape for a ztunnel, an Envoy ConfigDump
/// whose `configs` are typed Address resources.
async fn serve_debug(listener: tokio::net::TcpListener, shared: Arc<Shared>) {
    use http_body_util::Full;
    use hyper::body::Bytes;
    while let Ok((tcp, _)) = listener.accept().await {
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                let shared = shared.clone();
                async move {
                    let query = req.uri().query().unwrap_or_default().to_string();
                    let proxy = query
                        .split('&')
                        .find_map(|kv| kv.strip_prefix("proxyID="))
                        .unwrap_or_default()
                        .to_string();
                    let (status, body) = if req.uri().path() != "/debug/config_dump" {
                        (
                            404,
                            "not found: try /debug/config_dump?proxyID=<proxy>\n".to_string(),
                        )
                    } else if let Some(id) = lock(&shared.proxies)
                        .iter()
                        .find(|p| !proxy.is_empty() && p.contains(&proxy))
                        .cloned()
                    {
                        let config = lock(&shared.config).clone().unwrap_or_default();
                        let mut configs = Vec::new();
                        for w in config["workloads"].as_array().into_iter().flatten() {
                            configs.push(serde_json::json!({"@type": ADDRESS_TYPE, "workload": w}));
                        }
                        for s in config["services"].as_array().into_iter().flatten() {
                            configs.push(serde_json::json!({"@type": ADDRESS_TYPE, "service": s}));
                        }
                        let dump = serde_json::json!({"proxyId": id, "configs": configs});
                        (200, serde_json::to_string_pretty(&dump).unwrap_or_default())
                    } else {
                        (
                            404,
                            format!("no connected proxy matches proxyID={proxy:?}\n"),
                        )
                    };
                    let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
                    *resp.status_mut() =
                        hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
                    Ok::<_, std::convert::Infallible>(resp)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
        });
    }
}
