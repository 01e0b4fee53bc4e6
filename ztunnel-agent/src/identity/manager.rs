//! Certificates per identity, issued on first use and re-issued once half their lifetime has
//! passed. The local CA sits behind this; the istiod CA client will too.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;

use super::ca::{self, LocalCa};
use super::Identity;

/// A workload's certificate, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCert {
    /// Whose.
    pub identity: Identity,
    /// Chain and key for rustls.
    pub certified: Arc<CertifiedKey>,
    /// Validity start.
    pub not_before: SystemTime,
    /// Validity end.
    pub not_after: SystemTime,
}

impl WorkloadCert {
    fn due_for_renewal(&self, now: SystemTime) -> bool {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        now >= self.not_before + lifetime / 2
    }
}

/// Failures getting a certificate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The CA failed.
    #[error("cannot issue a certificate for {identity}")]
    Issue {
        /// Whose.
        identity: String,
        /// Why.
        #[source]
        source: Box<ca::Error>,
    },
    /// rustls refused the key.
    #[error("the key issued for {identity} is not usable by rustls")]
    Key {
        /// Whose.
        identity: String,
        /// Why.
        #[source]
        source: Box<rustls::Error>,
    },
}

/// Hands out certificates by identity.
#[derive(Debug)]
pub struct CertManager {
    ca: LocalCa,
    validity: Duration,
    certs: Mutex<HashMap<Identity, Arc<WorkloadCert>>>,
}

impl CertManager {
    /// A manager issuing from `ca` with certificates valid for `validity`.
    pub fn new(ca: LocalCa, validity: Duration) -> Self {
        Self {
            ca,
            validity,
            certs: Mutex::new(HashMap::new()),
        }
    }

    /// The trust domain peers must be in.
    pub fn trust_domain(&self) -> &str {
        self.ca.trust_domain()
    }

    /// The roots peers are checked against.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        vec![self.ca.root()]
    }

    /// The current certificate for `identity`, issuing or renewing it as needed.
    pub fn fetch(&self, identity: &Identity) -> Result<Arc<WorkloadCert>, Error> {
        let now = SystemTime::now();
        if let Some(cert) = self.lock().get(identity) {
            if !cert.due_for_renewal(now) {
                return Ok(cert.clone());
            }
        }
        // Issued outside the lock: signing takes a moment and other identities need not wait.
        let issued = self
            .ca
            .issue(identity, self.validity)
            .map_err(|source| Error::Issue {
                identity: identity.to_string(),
                source: Box::new(source),
            })?;
        let provider = rustls::crypto::ring::default_provider();
        let certified =
            CertifiedKey::from_der(issued.chain, issued.key, &provider).map_err(|source| {
                Error::Key {
                    identity: identity.to_string(),
                    source: Box::new(source),
                }
            })?;
        let cert = Arc::new(WorkloadCert {
            identity: identity.clone(),
            certified: Arc::new(certified),
            not_before: issued.not_before,
            not_after: issued.not_after,
        });
        tracing::debug!(identity = %identity, "issued workload certificate");
        self.lock().insert(identity.clone(), cert.clone());
        Ok(cert)
    }

    /// Every certificate held (for config_dump).
    pub fn all(&self) -> Vec<Arc<WorkloadCert>> {
        let mut all: Vec<_> = self.lock().values().cloned().collect();
        all.sort_by(|a, b| a.identity.cmp(&b.identity));
        all
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Arc<WorkloadCert>>> {
        self.certs.lock().unwrap_or_else(|p| p.into_inner())
    }
}
