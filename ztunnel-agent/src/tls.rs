//! rustls configurations for HBONE: TLS 1.3 only, ALPN `h2`, no SNI, client certificates
//! required. Peers are identified by the SPIFFE URI SAN of their leaf certificate; the client
//! accepts a server only if that identity is one it expects for the destination, the server
//! accepts a client whose chain leads to the mesh roots and whose trust domain is ours.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::spiffe::Identity;

pub mod grpc;
pub mod pem;

/// ALPN protocol of HBONE.
pub const ALPN_H2: &[u8] = b"h2";

/// TLS set-up and peer-identity failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building a configuration failed.
    #[error("TLS configuration failed")]
    Config(#[source] rustls::Error),
    /// The roots could not be used.
    #[error("the mesh root certificates are not usable")]
    Roots(#[source] rustls::server::VerifierBuilderError),
    /// Getting our own certificate failed.
    #[error(transparent)]
    Cert(Box<dyn std::error::Error + Send + Sync>),
    /// The peer presented no certificate.
    #[error("the peer presented no certificate")]
    NoPeerCert,
    /// The peer's certificate has no usable SPIFFE id (what it presented instead).
    #[error("the peer certificate has no usable SPIFFE identity: {0}")]
    NoIdentity(String),
    /// The peer is in another trust domain.
    #[error("peer identity {0} is not in trust domain {1}")]
    TrustDomain(Identity, String),
}

/// Where the workload TLS configurations get certificates and roots: the certificate
/// manager (`identity::manager`) implements it, so identity depends on tls and not the
/// reverse.
pub trait CertStore: Send + Sync + std::fmt::Debug {
    /// The current certificate and key of `identity`, ready for rustls.
    fn certified_key(
        &self,
        identity: &Identity,
    ) -> Result<Arc<CertifiedKey>, Box<dyn std::error::Error + Send + Sync>>;
    /// The mesh roots in force.
    fn roots(&self) -> Vec<CertificateDer<'static>>;
    /// Changes whenever [`CertStore::roots`] does.
    fn roots_generation(&self) -> u64;
}

/// ring's provider, TLS 1.3 suites only, AES-128-GCM first: both AES-GCM suites are what
/// upstream ztunnel offers, and AES-128 takes 10 rounds per block instead of 14, which is
/// most of the CPU a bulk HBONE transfer spends (the peer's order decides when it is the
/// server; every suite here is still accepted).
/// Built once: it is needed on every handshake.
pub fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    static PROVIDER: std::sync::LazyLock<Arc<CryptoProvider>> = std::sync::LazyLock::new(|| {
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = vec![
            TLS13_AES_128_GCM_SHA256,
            TLS13_AES_256_GCM_SHA384,
            TLS13_CHACHA20_POLY1305_SHA256,
        ];
        Arc::new(provider)
    });
    PROVIDER.clone()
}

fn root_store(certs: &dyn CertStore) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for root in certs.roots() {
        // A root the store rejects simply does not anchor anything.
        let _ = roots.add(root);
    }
    roots
}

/// The SPIFFE identity of a leaf certificate.
pub fn identity_of(cert: &CertificateDer<'_>) -> Option<Identity> {
    spiffe_identity(cert).ok()
}

/// The SPIFFE identity of a leaf certificate, or what the certificate presented instead, so a
/// refusal names it (`its URI SAN "spiffe:///ns/default/sa/x" is not of the form ...`, not
/// only "no SPIFFE identity"). Presented strings are quoted and cut to 200 characters.
pub fn spiffe_identity(cert: &CertificateDer<'_>) -> Result<Identity, String> {
    use x509_parser::extensions::GeneralName;
    let shown = |text: &str| format!("{:?}", crate::telemetry::cut(text, 200));
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("it is not a readable X.509 certificate ({e})"))?;
    let san = match parsed.subject_alternative_name() {
        Ok(Some(san)) => san,
        Ok(None) => {
            return Err(format!(
                "it has no subjectAltName (subject {})",
                shown(&parsed.subject().to_string())
            ))
        }
        Err(e) => return Err(format!("its subjectAltName is not readable ({e})")),
    };
    let mut uris = Vec::new();
    for name in &san.value.general_names {
        if let GeneralName::URI(uri) = name {
            match uri.parse::<Identity>() {
                Ok(id) => return Ok(id),
                Err(_) => uris.push(shown(uri)),
            }
        }
    }
    if uris.is_empty() {
        let names: Vec<String> = san
            .value
            .general_names
            .iter()
            .take(8)
            .map(|n| shown(&n.to_string()))
            .collect();
        return Err(format!(
            "its subjectAltName has no URI, only [{}]",
            names.join(", ")
        ));
    }
    uris.truncate(8);
    Err(format!(
        "its URI SAN {} is not of the form spiffe://<trust domain>/ns/<namespace>/sa/<service account>",
        uris.join(", ")
    ))
}

/// The peer identity of an established connection, checked against the trust domain.
pub fn peer_identity(
    certs: Option<&[CertificateDer<'_>]>,
    trust_domain: &str,
) -> Result<Identity, Error> {
    let leaf = certs.and_then(|c| c.first()).ok_or(Error::NoPeerCert)?;
    let id = spiffe_identity(leaf).map_err(Error::NoIdentity)?;
    if id.trust_domain != trust_domain {
        return Err(Error::TrustDomain(id, trust_domain.to_string()));
    }
    Ok(id)
}

/// Serves the pod's current certificate (renewed certificates are picked up per handshake).
#[derive(Debug)]
struct PodCertResolver {
    certs: Arc<dyn CertStore>,
    identity: Identity,
}

impl ResolvesServerCert for PodCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match self.certs.certified_key(&self.identity) {
            Ok(certified) => Some(certified),
            Err(e) => {
                tracing::error!(identity = %self.identity, error = %crate::telemetry::ErrorChain(&*e), "no certificate to serve HBONE");
                None
            }
        }
    }
}

/// Verifies HBONE clients against the mesh roots as they are at handshake time: when the
/// roots change (root rotation) the webpki verifier is rebuilt, so pods enrolled before the
/// rotation accept peers whose certificates come from the new root.
#[derive(Debug)]
struct MeshClientVerifier {
    certs: Arc<dyn CertStore>,
    cached: std::sync::Mutex<(u64, Arc<dyn ClientCertVerifier>)>,
}

impl MeshClientVerifier {
    fn new(certs: Arc<dyn CertStore>) -> Result<Self, Error> {
        let generation = certs.roots_generation();
        let verifier = webpki_client_verifier(certs.as_ref())?;
        Ok(Self {
            certs,
            cached: std::sync::Mutex::new((generation, verifier)),
        })
    }

    fn current(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let generation = self.certs.roots_generation();
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if cached.0 != generation {
            let verifier = webpki_client_verifier(self.certs.as_ref())
                .map_err(|e| rustls::Error::General(e.to_string()))?;
            *cached = (generation, verifier);
        }
        Ok(cached.1.clone())
    }
}

fn webpki_client_verifier(certs: &dyn CertStore) -> Result<Arc<dyn ClientCertVerifier>, Error> {
    WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(certs)), provider())
        .build()
        .map_err(Error::Roots)
}

impl ClientCertVerifier for MeshClientVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        // HBONE clients present their one certificate whatever the hints say.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current()?
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The 15008 server configuration of a pod with `identity`.
pub fn server_config(certs: Arc<dyn CertStore>, identity: Identity) -> Result<ServerConfig, Error> {
    let provider = provider();
    let verifier = MeshClientVerifier::new(certs.clone())?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Config)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(PodCertResolver { certs, identity }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(config)
}

/// Checks the server's chain against the mesh roots and its SPIFFE id against the expected
/// set; the hostname is not used (peers are dialled by IP, no SNI).
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: RootCertStore,
    expected: Vec<Identity>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let id = spiffe_identity(end_entity).map_err(|presented| {
            rustls::Error::General(format!(
                "server certificate has no usable SPIFFE identity: {presented}"
            ))
        })?;
        if self.expected.contains(&id) {
            Ok(ServerCertVerified::assertion())
        } else {
            let expected: Vec<String> = self.expected.iter().map(|i| i.to_string()).collect();
            Err(rustls::Error::General(format!(
                "server identity {id} is not one of the expected [{}]",
                expected.join(", ")
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Only TLS 1.3 is offered.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client configuration presenting `source`'s certificate and accepting only `expected`.
pub fn client_config(
    certs: &dyn CertStore,
    source: &Identity,
    expected: Vec<Identity>,
) -> Result<ClientConfig, Error> {
    let provider = provider();
    let certified = certs.certified_key(source).map_err(Error::Cert)?;
    let verifier = SpiffeServerVerifier {
        roots: root_store(certs),
        expected,
        provider: provider.clone(),
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(Error::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(FixedClientCert(certified)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    Ok(config)
}

#[derive(Debug)]
struct FixedClientCert(Arc<CertifiedKey>);

impl rustls::client::ResolvesClientCert for FixedClientCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::identity::ca::LocalCa;
    use crate::identity::manager::CertManager;

    fn id(sa: &str) -> Identity {
        format!("spiffe://cluster.local/ns/default/sa/{sa}")
            .parse()
            .expect("valid id")
    }

    fn manager(dir: &std::path::Path) -> Arc<CertManager> {
        let ca = LocalCa::load_or_create(dir, "cluster.local").expect("ca");
        Arc::new(CertManager::local(ca, Duration::from_secs(3600)))
    }

    /// Handshakes a client and a server over a pipe; returns (client result, server result).
    async fn handshake(
        client: ClientConfig,
        server: ServerConfig,
    ) -> (Result<(), String>, Result<Identity, String>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let name = ServerName::try_from("10.244.1.10").expect("ip name");
        let client = async move {
            let mut s = connector
                .connect(name, a)
                .await
                .map_err(|e| e.to_string())?;
            s.write_all(b"x").await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            Ok(())
        };
        let server = async move {
            let mut s = acceptor.accept(b).await.map_err(|e| e.to_string())?;
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            s.write_all(b"y").await.map_err(|e| e.to_string())?;
            s.flush().await.map_err(|e| e.to_string())?;
            peer_identity(s.get_ref().1.peer_certificates(), "cluster.local")
                .map_err(|e| e.to_string())
        };
        tokio::join!(client, server)
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("zt-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[tokio::test]
    async fn mutual_tls_with_expected_identity() {
        let certs = manager(&temp_dir("ok"));
        let server = server_config(certs.clone(), id("productpage")).expect("server");
        let client =
            client_config(certs.as_ref(), &id("curl"), vec![id("productpage")]).expect("client");
        let (c, s) = handshake(client, server).await;
        assert_eq!(c, Ok(()));
        assert_eq!(
            s,
            Ok(id("curl")),
            "server sees the client's SPIFFE identity"
        );
    }

    #[tokio::test]
    async fn unexpected_server_identity_is_refused() {
        let certs = manager(&temp_dir("wrongid"));
        let server = server_config(certs.clone(), id("ratings")).expect("server");
        let client =
            client_config(certs.as_ref(), &id("curl"), vec![id("productpage")]).expect("client");
        let (c, _) = handshake(client, server).await;
        let err = c.expect_err("wrong identity refused");
        assert!(
            err.contains("ratings") && err.contains("productpage"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn certificate_from_another_root_is_refused() {
        let ours = manager(&temp_dir("root-a"));
        let theirs = manager(&temp_dir("root-b"));
        let server = server_config(ours.clone(), id("productpage")).expect("server");
        let client =
            client_config(theirs.as_ref(), &id("curl"), vec![id("productpage")]).expect("client");
        let (c, s) = handshake(client, server).await;
        assert!(c.is_err() && s.is_err(), "{c:?} {s:?}");
    }

    #[tokio::test]
    async fn client_without_certificate_is_refused() {
        let certs = manager(&temp_dir("nocert"));
        let server = server_config(certs.clone(), id("productpage")).expect("server");
        let mut client =
            client_config(certs.as_ref(), &id("curl"), vec![id("productpage")]).expect("client");
        client.client_auth_cert_resolver = Arc::new(NoClientCert);
        let (_, s) = handshake(client, server).await;
        assert!(
            s.is_err(),
            "server must require a client certificate: {s:?}"
        );
    }

    #[derive(Debug)]
    struct NoClientCert;

    impl rustls::client::ResolvesClientCert for NoClientCert {
        fn resolve(&self, _: &[&[u8]], _: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
            None
        }

        fn has_certs(&self) -> bool {
            false
        }
    }

    /// A self-signed certificate with these subjectAltNames (None: no extension at all).
    fn cert_with_sans(sans: Option<Vec<rcgen::SanType>>) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans.unwrap_or_default();
        params.self_signed(&key).expect("cert").der().clone()
    }

    /// Each refusal names what the certificate presented instead of a SPIFFE id.
    #[test]
    fn missing_or_malformed_spiffe_ids_are_named_as_presented() {
        use rcgen::SanType;
        let uri = |u: &str| SanType::URI(u.try_into().expect("ia5"));
        let cases: Vec<(Option<Vec<SanType>>, &[&str])> = vec![
            (
                Some(vec![uri("spiffe:///ns/default/sa/x")]),
                &[
                    "\"spiffe:///ns/default/sa/x\"",
                    "not of the form spiffe://<trust domain>",
                ],
            ),
            (
                Some(vec![uri("https://example.com/x"), uri("spiffe://td/ns/a")]),
                &["\"https://example.com/x\"", "\"spiffe://td/ns/a\""],
            ),
            (
                Some(vec![SanType::DnsName(
                    "reviews.default.svc".try_into().expect("ia5"),
                )]),
                &["no URI", "reviews.default.svc"],
            ),
            (None, &["no subjectAltName"]),
        ];
        for (sans, want) in cases {
            let err = spiffe_identity(&cert_with_sans(sans)).expect_err("refused");
            for part in want {
                assert!(err.contains(part), "{part} in {err}");
            }
        }
        let good = cert_with_sans(Some(vec![
            SanType::DnsName("x".try_into().expect("ia5")),
            uri("spiffe://cluster.local/ns/default/sa/curl"),
        ]));
        assert_eq!(spiffe_identity(&good).expect("id"), id("curl"));
        let peer = cert_with_sans(Some(vec![uri("spiffe:///ns/default/sa/x")]));
        let err = peer_identity(Some(&[peer]), "cluster.local").expect_err("refused");
        assert!(
            err.to_string().contains("spiffe:///ns/default/sa/x"),
            "{err}"
        );
        let other = cert_with_sans(Some(vec![uri("spiffe://other.td/ns/default/sa/curl")]));
        let err = peer_identity(Some(&[other]), "cluster.local").expect_err("refused");
        assert!(
            err.to_string().contains("other.td") && err.to_string().contains("cluster.local"),
            "{err}"
        );
    }

    /// An expired server certificate is refused, and the error says so with the times.
    #[test]
    fn an_expired_server_certificate_is_refused_with_its_times() {
        let certs = manager(&temp_dir("expired"));
        let leaf = certs.certified_key(&id("productpage")).expect("cert");
        let verifier = SpiffeServerVerifier {
            roots: root_store(certs.as_ref()),
            expected: vec![id("productpage")],
            provider: provider(),
        };
        let name = ServerName::try_from("10.244.1.10").expect("ip name");
        let now = UnixTime::now();
        verifier
            .verify_server_cert(&leaf.cert[0], &leaf.cert[1..], &name, &[], now)
            .expect("valid now");
        // The manager issues for an hour.
        let later = UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs() + 2 * 3600));
        let err = verifier
            .verify_server_cert(&leaf.cert[0], &leaf.cert[1..], &name, &[], later)
            .expect_err("expired");
        let err = err.to_string();
        assert!(
            err.contains("expired") && err.contains("not valid after"),
            "{err}"
        );
    }

    #[test]
    fn local_ca_root_persists_and_leaf_carries_spiffe_san() {
        let dir = temp_dir("persist");
        let first = LocalCa::load_or_create(&dir, "cluster.local").expect("create");
        let again = LocalCa::load_or_create(&dir, "cluster.local").expect("reload");
        assert_eq!(first.root(), again.root(), "root kept on disk");
        let issued = again
            .issue(&id("curl"), Duration::from_secs(60))
            .expect("issue");
        assert_eq!(identity_of(&issued.chain[0]), Some(id("curl")));
    }

    #[test]
    fn agents_starting_together_share_one_root() {
        let dir = temp_dir("race");
        let _ = std::fs::remove_dir_all(&dir);
        let starts: Vec<_> = (0..6)
            .map(|_| {
                let dir = dir.clone();
                std::thread::spawn(move || LocalCa::load_or_create(&dir, "cluster.local"))
            })
            .collect();
        let roots: Vec<_> = starts
            .into_iter()
            .map(|t| {
                t.join()
                    .expect("thread")
                    .expect("every start succeeds")
                    .root()
            })
            .collect();
        assert!(roots.windows(2).all(|w| w[0] == w[1]), "one root");
        // A key left without its certificate is named, not overwritten.
        let orphan = temp_dir("orphan");
        let _ = std::fs::remove_dir_all(&orphan);
        std::fs::create_dir_all(&orphan).expect("dir");
        std::fs::write(orphan.join("root-key.pem"), "key").expect("key");
        let err = LocalCa::load_or_create(&orphan, "cluster.local")
            .err()
            .map(|e| crate::telemetry::ErrorChain(&e).to_string())
            .unwrap_or_default();
        assert!(err.contains("exists without"), "{err}");
    }
}
