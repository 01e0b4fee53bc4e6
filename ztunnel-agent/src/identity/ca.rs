//! The built-in CA for standalone mode: a root created on first start and kept on disk (or
//! given as files), issuing short-lived ECDSA P-256 workload certificates whose only SAN is
//! the workload's SPIFFE URI.

use crate::tls::pem::{parse_pem_certs, pem_encode};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::Identity;

/// File names of the root inside the CA directory.
const ROOT_CERT: &str = "root-cert.pem";
const ROOT_KEY: &str = "root-key.pem";
/// Root lifetime when we create one.
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves are backdated a little to tolerate clock skew between nodes.
const BACKDATE: Duration = Duration::from_secs(60);

/// CA failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the root.
    #[error("cannot use the CA root in {dir}: the directory must be writable on first start, readable after")]
    Io {
        /// The CA directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Bad root files or a signing failure.
    #[error("CA {what} failed: if {dir}/root-cert.pem and root-key.pem were given, they must be a PEM CA certificate and its PKCS#8 key")]
    Crypto {
        /// What was being done.
        what: &'static str,
        /// The CA directory.
        dir: PathBuf,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
}

/// A certificate issued for a workload.
#[derive(Debug)]
pub struct Issued {
    /// Leaf then intermediates (none for the local CA).
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
    /// Validity start.
    pub not_before: SystemTime,
    /// Validity end.
    pub not_after: SystemTime,
}

/// The local CA.
pub struct LocalCa {
    dir: PathBuf,
    issuer: rcgen::Certificate,
    key: KeyPair,
    root_der: CertificateDer<'static>,
    trust_domain: String,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalCa({})", self.dir.display())
    }
}

impl Error {
    /// Wraps an I/O failure in `dir`.
    fn io(dir: &Path) -> impl Fn(std::io::Error) -> Error + Copy + '_ {
        move |source| Error::Io {
            dir: dir.to_path_buf(),
            source,
        }
    }

    /// Wraps a certificate or key failure while doing `what` in `dir`.
    fn crypto(dir: &Path) -> impl Fn(&'static str, rcgen::Error) -> Error + Copy + '_ {
        move |what, source| Error::Crypto {
            what,
            dir: dir.to_path_buf(),
            source,
        }
    }
}

impl LocalCa {
    /// Loads the root from `dir`, creating it (and the directory) on first start.
    pub fn load_or_create(dir: &Path, trust_domain: &str) -> Result<Self, Error> {
        let io = Error::io(dir);
        let (cert_path, key_path) = (dir.join(ROOT_CERT), dir.join(ROOT_KEY));
        if !cert_path.exists() {
            std::fs::create_dir_all(dir).map_err(io)?;
            // Two agents sharing the directory (a restart overlapping the old process, two
            // agents on one test machine) must not both create a root: one creates, the
            // other waits here and then reads it.
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(".create.lock"))
                .map_err(io)?;
            let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
                .map_err(|(_, errno)| io(std::io::Error::from(errno)))?;
            if !cert_path.exists() {
                if key_path.exists() {
                    return Err(io(std::io::Error::other(format!(
                        "{} exists without {}: add the certificate, or remove the key to have a new root created",
                        key_path.display(),
                        cert_path.display()
                    ))));
                }
                create_root(dir, trust_domain, &cert_path, &key_path)?;
            }
        }
        Self::load(dir, trust_domain, &cert_path, &key_path)
    }

    fn load(
        dir: &Path,
        trust_domain: &str,
        cert_path: &Path,
        key_path: &Path,
    ) -> Result<Self, Error> {
        let io = Error::io(dir);
        let crypto = Error::crypto(dir);
        let cert_pem = std::fs::read_to_string(cert_path).map_err(io)?;
        let key_pem = std::fs::read_to_string(key_path).map_err(io)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| crypto("reading root-key.pem", e))?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)
            .map_err(|e| crypto("reading root-cert.pem", e))?;
        // Re-signing the parsed parameters gives an issuer with the same subject and key, which
        // is all that signing leaves needs; the root on disk is what peers trust.
        let issuer = params
            .self_signed(&key)
            .map_err(|e| crypto("loading the root", e))?;
        let root_der = parse_pem_certs(cert_pem.as_bytes())
            .into_iter()
            .next()
            .ok_or_else(|| {
                crypto(
                    "reading root-cert.pem",
                    rcgen::Error::CouldNotParseCertificate,
                )
            })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            issuer,
            key,
            root_der,
            trust_domain: trust_domain.to_string(),
        })
    }

    /// The root certificate peers must trust.
    pub fn root(&self) -> CertificateDer<'static> {
        self.root_der.clone()
    }

    /// The trust domain of this CA.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Issues a certificate for `identity`, valid for `validity`.
    pub fn issue(&self, identity: &Identity, validity: Duration) -> Result<Issued, Error> {
        let crypto = Error::crypto(&self.dir);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| crypto("leaf key generation", e))?;
        let uri = identity
            .to_string()
            .try_into()
            .map_err(|e| crypto("encoding the SPIFFE URI", e))?;
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri)];
        params.distinguished_name = DistinguishedName::new();
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        let now = SystemTime::now();
        let not_before = now - BACKDATE;
        let not_after = now + validity;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(|e| crypto("signing a workload certificate", e))?;
        Ok(Issued {
            chain: vec![cert.der().clone()],
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            not_before,
            not_after,
        })
    }
}

impl LocalCa {
    /// Signs a certificate signing request (the development control plane's CA uses this):
    /// the leaf gets the CSR's key and SANs, or `override_san` instead when given (tests use
    /// it to make a CA that answers with the wrong identity).
    pub fn sign_request(
        &self,
        csr_pem: &str,
        validity: Duration,
        override_san: Option<&str>,
    ) -> Result<(CertificateDer<'static>, SystemTime, SystemTime), Error> {
        let crypto = Error::crypto(&self.dir);
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| crypto("reading a certificate signing request", e))?;
        if let Some(san) = override_san {
            let uri = san
                .to_string()
                .try_into()
                .map_err(|e| crypto("encoding the SPIFFE URI", e))?;
            csr.params.subject_alt_names = vec![SanType::URI(uri)];
        }
        csr.params.is_ca = IsCa::ExplicitNoCa;
        csr.params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        csr.params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        csr.params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        let now = SystemTime::now();
        // Short-lived test certificates must not look half-expired on arrival.
        let backdate = BACKDATE.min(validity / 10);
        let (not_before, not_after) = (now - backdate, now + validity);
        csr.params.not_before = not_before.into();
        csr.params.not_after = not_after.into();
        let cert = csr
            .signed_by(&self.issuer, &self.key)
            .map_err(|e| crypto("signing a certificate request", e))?;
        Ok((cert.der().clone(), not_before, not_after))
    }

    /// The root as PEM.
    pub fn root_pem(&self) -> String {
        pem_encode(&self.root_der)
    }
}

/// 16 random bytes with the top bit clear (serials are positive integers).
fn random_serial() -> [u8; 16] {
    let mut bytes = [0u8; 16];
    // ring's SystemRandom is what rustls and rcgen already use.
    let _ = ring_fill(&mut bytes);
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    bytes
}

fn ring_fill(bytes: &mut [u8]) -> Result<(), rustls::Error> {
    crate::tls::provider()
        .secure_random
        .fill(bytes)
        .map_err(|_| rustls::Error::FailedToGetRandomBytes)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

/// Creates the root key and certificate (the certificate last, renamed into place, so a
/// reader that sees it sees both complete).
fn create_root(
    dir: &Path,
    trust_domain: &str,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), Error> {
    let io = Error::io(dir);
    let crypto = Error::crypto(dir);
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| crypto("root key generation", e))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, "ztunnel-agent local CA");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ROOT_VALIDITY).into();
    let cert = params
        .self_signed(&key)
        .map_err(|e| crypto("root self-signing", e))?;
    write_private(key_path, key.serialize_pem().as_bytes()).map_err(io)?;
    let partial = dir.join(".root-cert.pem.partial");
    std::fs::write(&partial, cert.pem()).map_err(io)?;
    std::fs::rename(&partial, cert_path).map_err(io)?;
    tracing::info!(dir = %dir.display(), "created the local CA root");
    Ok(())
}
