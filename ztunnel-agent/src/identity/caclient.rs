//! The istiod CA client: `istio.v1.auth.IstioCertificateService/CreateCertificate` with an
//! ECDSA P-256 CSR carrying the workload's SPIFFE URI SAN. The agent asks on behalf of the
//! pods on its node, so each request names the workload in the `ImpersonatedIdentity`
//! metadata (istiod's "shared ztunnel" mode). The returned leaf must carry exactly the
//! identity asked for; the last certificate of the chain is taken as a root.

use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use super::ca::Issued;
use super::Identity;
use crate::proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::ca::IstioCertificateRequest;
use crate::tls::grpc::Target;

/// The metadata key istiod reads the impersonated identity from.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// CA request failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building the CSR failed.
    #[error("cannot build a certificate request for {identity}")]
    Csr {
        /// Whose.
        identity: String,
        /// Why.
        #[source]
        source: rcgen::Error,
    },
    /// The call failed.
    #[error("CA {address} refused or failed the request for {identity}: {status}")]
    Call {
        /// Where.
        address: String,
        /// Whose.
        identity: String,
        /// gRPC status (code and message).
        status: Box<tonic::Status>,
    },
    /// The answer is not a usable certificate for the identity asked for.
    #[error("CA answer for {identity} is unusable: {problem}")]
    Unusable {
        /// Whose.
        identity: String,
        /// What is wrong.
        problem: String,
    },
}

/// What the CA answered.
#[derive(Debug)]
pub struct Response {
    /// The certificate, its chain and key.
    pub issued: Issued,
    /// Roots found at the end of the chain.
    pub roots: Vec<CertificateDer<'static>>,
}

/// A client for istiod's CA.
#[derive(Clone, Debug)]
pub struct CaClient {
    target: Target,
    client: IstioCertificateServiceClient<tonic::transport::Channel>,
}

impl CaClient {
    /// A client for `target` (connects on first use).
    pub fn new(target: Target) -> Result<Self, crate::tls::grpc::Error> {
        let client = IstioCertificateServiceClient::new(target.channel()?);
        Ok(Self { target, client })
    }

    /// Requests a certificate for `identity` valid for `validity`.
    pub async fn request(
        &self,
        identity: &Identity,
        validity: Duration,
    ) -> Result<Response, Error> {
        let name = identity.to_string();
        let csr_err = |source| Error::Csr {
            identity: name.clone(),
            source,
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(csr_err)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(name.clone().try_into().map_err(csr_err)?)];
        let csr = params.serialize_request(&key).map_err(csr_err)?;
        let csr = csr.pem().map_err(csr_err)?;
        let metadata = prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(name.clone())),
                },
            )]
            .into(),
        };
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(validity.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(metadata),
        });
        request.set_timeout(Duration::from_secs(10));
        self.target.authorize(&mut request);
        let response = self
            .client
            .clone()
            .create_certificate(request)
            .await
            .map_err(|status| Error::Call {
                address: self.target.authority.clone(),
                identity: name.clone(),
                status: Box::new(status),
            })?
            .into_inner();
        let checked =
            check_chain(&response.cert_chain, &name).map_err(|problem| Error::Unusable {
                identity: name.clone(),
                problem,
            })?;
        Ok(Response {
            issued: Issued {
                chain: checked.chain,
                key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
                not_before: checked.not_before,
                not_after: checked.not_after,
            },
            roots: checked.roots,
        })
    }
}

/// A CA's answer, checked: the chain (leaf first), the root istiod appended, the leaf's
/// validity.
#[derive(Debug)]
pub struct CheckedChain {
    /// Leaf first, without the appended root.
    pub chain: Vec<CertificateDer<'static>>,
    /// The root the CA appended (empty for a chain of one).
    pub roots: Vec<CertificateDer<'static>>,
    /// The leaf's validity start.
    pub not_before: SystemTime,
    /// The leaf's validity end.
    pub not_after: SystemTime,
}

/// Checks the PEM certificates of a CA's answer for the identity `name` (the fuzz targets'
/// entry): `Err` says what makes it unusable.
pub fn check_chain(cert_chain: &[String], name: &str) -> Result<CheckedChain, String> {
    let mut chain: Vec<CertificateDer<'static>> = cert_chain
        .iter()
        .flat_map(|pem| crate::tls::pem::parse_pem_certs(pem.as_bytes()))
        .collect();
    let leaf = chain
        .first()
        .cloned()
        .ok_or_else(|| "the certificate chain is empty".to_string())?;
    let (not_before, not_after, sans) =
        leaf_facts(&leaf).ok_or_else(|| "the leaf certificate does not parse".to_string())?;
    if sans != [name] {
        return Err(format!(
            "the leaf certificate is for [{}], not {name}: is the CA issuing for the right workload?",
            sans.join(", ")
        ));
    }
    // istiod appends its root to the chain; a chain of one is the leaf alone.
    let roots = if chain.len() > 1 {
        chain.pop().into_iter().collect()
    } else {
        Vec::new()
    };
    Ok(CheckedChain {
        chain,
        roots,
        not_before,
        not_after,
    })
}

/// Validity and URI SANs of a leaf.
fn leaf_facts(der: &CertificateDer<'_>) -> Option<(SystemTime, SystemTime, Vec<String>)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let at = |t: x509_parser::time::ASN1Time| {
        let secs = u64::try_from(t.timestamp()).unwrap_or(0);
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    };
    let validity = cert.validity();
    let sans = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => Some(u.to_string()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Some((at(validity.not_before), at(validity.not_after), sans))
}
