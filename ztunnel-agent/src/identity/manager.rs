//! Certificates per identity, and the roots peers are checked against.
//!
//! Two sources sit behind one interface. The local CA (standalone mode) issues inline on first
//! use and re-issues once half the lifetime has passed. The istiod CA client (control-plane
//! mode) is asynchronous: [`CertManager::ensure`] starts one worker per identity that requests
//! a certificate, renews it at half life and backs off per identity on failure; a certificate
//! that cannot be renewed keeps serving until it expires. The state of each identity is
//! `Initializing`, `Available` or `Unavailable: <reason>`, as config_dump shows it.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;
use tokio_util::sync::CancellationToken;

use super::ca::{self, Issued, LocalCa};
use super::caclient::{self, CaClient};
use super::Identity;

/// First retry after a failed request to istiod; doubles up to [`MAX_BACKOFF`].
const INITIAL_BACKOFF: Duration = Duration::from_millis(250);
/// Shortest wait before renewing a certificate just received.
const MIN_RENEWAL_WAIT: Duration = Duration::from_millis(500);
/// Longest wait between retries for one identity.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

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
    fn renewal_time(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + lifetime / 2
    }

    fn expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

/// Where an identity's certificate stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CertState {
    /// Requested, no answer yet.
    Initializing,
    /// A valid certificate is held.
    Available,
    /// The last request failed (an older certificate may still serve until it expires).
    Unavailable(String),
}

impl std::fmt::Display for CertState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CertState::Initializing => f.write_str("Initializing"),
            CertState::Available => f.write_str("Available"),
            CertState::Unavailable(why) => write!(f, "Unavailable: {why}"),
        }
    }
}

/// Failures getting a certificate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The local CA failed.
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
    /// istiod has not (yet) issued a certificate for this identity.
    #[error("no certificate for {identity} yet ({state}): check the CA address and `ztunnel-agent config certificates`")]
    NotReady {
        /// Whose.
        identity: String,
        /// Where it stands.
        state: CertState,
    },
}

/// Where certificates come from.
#[derive(Debug)]
pub enum CertSource {
    /// The built-in CA (standalone mode).
    Local(Box<LocalCa>),
    /// istiod's `IstioCertificateService`.
    Istiod(Box<CaClient>),
}

#[derive(Debug)]
struct Slot {
    cert: Option<Arc<WorkloadCert>>,
    state: CertState,
    /// The roots the CA returned with the held certificate.
    roots: Vec<CertificateDer<'static>>,
}

/// Hands out certificates by identity.
#[derive(Debug)]
pub struct CertManager {
    source: CertSource,
    trust_domain: String,
    validity: Duration,
    slots: Mutex<HashMap<Identity, Slot>>,
    /// Roots from configuration (the root bundle file, the local CA's root).
    configured: Mutex<Vec<CertificateDer<'static>>>,
    /// The mesh roots: configured ones plus those returned with the held certificates,
    /// deduplicated (kept computed; read on every verifier rebuild).
    roots: Mutex<Vec<CertificateDer<'static>>>,
    /// Bumped whenever the roots change, so TLS verifiers rebuild their stores.
    roots_generation: AtomicU64,
    /// Wakes readiness and tests when a slot changes state.
    changed: tokio::sync::watch::Sender<u64>,
    shutdown: CancellationToken,
}

impl CertManager {
    /// A manager issuing from `source` with certificates valid for `validity`, trusting
    /// `roots` (the local CA adds its own root).
    pub fn new(
        source: CertSource,
        trust_domain: &str,
        validity: Duration,
        mut roots: Vec<CertificateDer<'static>>,
    ) -> Self {
        if let CertSource::Local(ca) = &source {
            roots.push(ca.root());
        }
        let roots = dedup(roots);
        Self {
            source,
            trust_domain: trust_domain.to_string(),
            validity,
            slots: Mutex::new(HashMap::new()),
            configured: Mutex::new(roots.clone()),
            roots: Mutex::new(roots),
            roots_generation: AtomicU64::new(0),
            changed: tokio::sync::watch::channel(0).0,
            shutdown: CancellationToken::new(),
        }
    }

    /// A manager over the local CA.
    pub fn local(ca: LocalCa, validity: Duration) -> Self {
        let td = ca.trust_domain().to_string();
        Self::new(CertSource::Local(Box::new(ca)), &td, validity, Vec::new())
    }

    /// The trust domain peers must be in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The roots peers are checked against.
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        lock(&self.roots).clone()
    }

    /// Changes whenever the set of roots changes.
    pub fn roots_generation(&self) -> u64 {
        self.roots_generation.load(Ordering::Acquire)
    }

    /// Replaces the configured roots (the root bundle changed). Root rotation adds the new
    /// root to the bundle before the CA signs with it; a root removed from the bundle stops
    /// being trusted unless it anchors a certificate this agent holds.
    pub fn set_configured_roots(&self, bundle: Vec<CertificateDer<'static>>) {
        let mut bundle = bundle;
        if let CertSource::Local(ca) = &self.source {
            bundle.push(ca.root());
        }
        *lock(&self.configured) = dedup(bundle);
        self.recompute_roots();
    }

    /// Recomputes the mesh roots from configuration and the held certificates' roots.
    fn recompute_roots(&self) {
        let mut all = lock(&self.configured).clone();
        for slot in lock(&self.slots).values() {
            all.extend(slot.roots.iter().cloned());
        }
        let all = dedup(all);
        let mut roots = lock(&self.roots);
        if *roots != all {
            *roots = all;
            self.roots_generation.fetch_add(1, Ordering::AcqRel);
            tracing::info!(roots = roots.len(), "mesh root certificates updated");
        }
    }

    /// Subscribes to state changes of any identity.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Stops the renewal workers.
    pub fn stop(&self) {
        self.shutdown.cancel();
    }

    /// Makes sure `identity` gets a certificate: with the local CA it is issued now; with
    /// istiod a worker is started (once per identity) that requests and renews it.
    pub fn ensure(self: &Arc<Self>, identity: &Identity) -> Result<(), Error> {
        match &self.source {
            CertSource::Local(_) => self.fetch(identity).map(|_| ()),
            CertSource::Istiod(_) => {
                let mut slots = lock(&self.slots);
                if slots.contains_key(identity) {
                    return Ok(());
                }
                slots.insert(
                    identity.clone(),
                    Slot {
                        cert: None,
                        state: CertState::Initializing,
                        roots: Vec::new(),
                    },
                );
                drop(slots);
                self.notify();
                tokio::spawn(self.clone().renew_forever(identity.clone()));
                Ok(())
            }
        }
    }

    /// The current certificate for `identity`. With the local CA it is issued or renewed as
    /// needed; with istiod it is whatever the worker holds, if not expired.
    pub fn fetch(&self, identity: &Identity) -> Result<Arc<WorkloadCert>, Error> {
        let now = SystemTime::now();
        let held = lock(&self.slots)
            .get(identity)
            .map(|s| (s.cert.clone(), s.state.clone()));
        match &self.source {
            CertSource::Local(ca) => {
                if let Some((Some(cert), _)) = &held {
                    if now < cert.renewal_time() {
                        return Ok(cert.clone());
                    }
                }
                // Issued outside the lock: signing takes a moment and others need not wait.
                let issued = ca
                    .issue(identity, self.validity)
                    .map_err(|source| Error::Issue {
                        identity: identity.to_string(),
                        source: Box::new(source),
                    })?;
                let cert = Arc::new(certified(identity, issued)?);
                tracing::debug!(identity = %identity, "issued workload certificate");
                self.store(identity, Some(cert.clone()), CertState::Available);
                Ok(cert)
            }
            CertSource::Istiod(_) => held_certificate(identity, held, now),
        }
    }

    /// What [`CertManager::fetch`] would give a connection now, without issuing anything:
    /// the held certificate, `Ok(None)` when the local CA would issue one on demand, or why a
    /// connection would fail (for `diagnose flow`).
    pub fn usable(&self, identity: &Identity) -> Result<Option<Arc<WorkloadCert>>, Error> {
        let now = SystemTime::now();
        let held = lock(&self.slots)
            .get(identity)
            .map(|s| (s.cert.clone(), s.state.clone()));
        match &self.source {
            CertSource::Local(_) => Ok(held
                .and_then(|(cert, _)| cert)
                .filter(|cert| !cert.expired(now))),
            CertSource::Istiod(_) => held_certificate(identity, held, now).map(Some),
        }
    }

    /// Every identity with its state and certificate (for config_dump), sorted.
    pub fn all(&self) -> Vec<(Identity, CertState, Option<Arc<WorkloadCert>>)> {
        let now = SystemTime::now();
        let mut all: Vec<_> = lock(&self.slots)
            .iter()
            .map(|(id, slot)| {
                let state = match (&slot.state, &slot.cert) {
                    (CertState::Available, Some(c)) if c.expired(now) => {
                        CertState::Unavailable("certificate expired".into())
                    }
                    (s, _) => s.clone(),
                };
                (id.clone(), state, slot.cert.clone())
            })
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Identities that have no usable certificate (readiness waits for none).
    pub fn pending(&self) -> BTreeSet<Identity> {
        let now = SystemTime::now();
        lock(&self.slots)
            .iter()
            .filter(|(_, s)| s.cert.as_ref().is_none_or(|c| c.expired(now)))
            .map(|(id, _)| id.clone())
            .collect()
    }

    fn store(&self, identity: &Identity, cert: Option<Arc<WorkloadCert>>, state: CertState) {
        let mut slots = lock(&self.slots);
        let slot = slots.entry(identity.clone()).or_insert(Slot {
            cert: None,
            state: CertState::Initializing,
            roots: Vec::new(),
        });
        if cert.is_some() {
            slot.cert = cert;
        }
        slot.state = state;
        drop(slots);
        self.notify();
    }

    fn notify(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// The istiod worker of one identity: request, hold, renew at half life; on failure
    /// retry with backoff while the previous certificate (if any) keeps serving.
    async fn renew_forever(self: Arc<Self>, identity: Identity) {
        let CertSource::Istiod(client) = &self.source else {
            return;
        };
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let wait = match client.request(&identity, self.validity).await {
                Ok(response) => match self.accept(&identity, response) {
                    Ok(cert) => {
                        backoff = INITIAL_BACKOFF;
                        tracing::info!(identity = %identity, expires = ?cert.not_after, "workload certificate issued by the CA");
                        // A floor, so a CA handing out nearly expired certificates is not
                        // asked again in a tight loop.
                        cert.renewal_time()
                            .duration_since(SystemTime::now())
                            .unwrap_or_default()
                            .max(MIN_RENEWAL_WAIT)
                    }
                    Err(e) => self.failed(&identity, &e, &mut backoff),
                },
                Err(e) => self.failed(&identity, &e, &mut backoff),
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    fn failed(
        &self,
        identity: &Identity,
        error: &caclient::Error,
        backoff: &mut Duration,
    ) -> Duration {
        let reason = crate::telemetry::ErrorChain(error).to_string();
        tracing::warn!(identity = %identity, error = %reason, retry_in = ?*backoff, "certificate request failed");
        self.store(identity, None, CertState::Unavailable(reason));
        let wait = *backoff;
        *backoff = (*backoff * 2).min(MAX_BACKOFF);
        wait
    }

    fn accept(
        &self,
        identity: &Identity,
        response: caclient::Response,
    ) -> Result<Arc<WorkloadCert>, caclient::Error> {
        let cert = Arc::new(certified(identity, response.issued).map_err(|e| {
            caclient::Error::Unusable {
                identity: identity.to_string(),
                problem: crate::telemetry::ErrorChain(&e).to_string(),
            }
        })?);
        self.store(identity, Some(cert.clone()), CertState::Available);
        if let Some(slot) = lock(&self.slots).get_mut(identity) {
            slot.roots = response.roots;
        }
        self.recompute_roots();
        Ok(cert)
    }
}

/// Drops repeated certificates, keeping the first of each.
fn dedup(certs: Vec<CertificateDer<'static>>) -> Vec<CertificateDer<'static>> {
    let mut out: Vec<CertificateDer<'static>> = Vec::with_capacity(certs.len());
    for c in certs {
        if !out.contains(&c) {
            out.push(c);
        }
    }
    out
}

fn certified(identity: &Identity, issued: Issued) -> Result<WorkloadCert, Error> {
    let certified = CertifiedKey::from_der(issued.chain, issued.key, &crate::tls::provider())
        .map_err(|source| Error::Key {
            identity: identity.to_string(),
            source: Box::new(source),
        })?;
    Ok(WorkloadCert {
        identity: identity.clone(),
        certified: Arc::new(certified),
        not_before: issued.not_before,
        not_after: issued.not_after,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl crate::tls::CertStore for CertManager {
    fn certified_key(
        &self,
        identity: &Identity,
    ) -> Result<Arc<rustls::sign::CertifiedKey>, Box<dyn std::error::Error + Send + Sync>> {
        Ok(self.fetch(identity)?.certified.clone())
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        CertManager::roots(self)
    }

    fn roots_generation(&self) -> u64 {
        CertManager::roots_generation(self)
    }
}

/// A held certificate still valid (an older one keeps serving through a failed renewal), or
/// why a connection cannot have one.
fn held_certificate(
    identity: &Identity,
    held: Option<(Option<Arc<WorkloadCert>>, CertState)>,
    now: SystemTime,
) -> Result<Arc<WorkloadCert>, Error> {
    match held {
        Some((Some(cert), _)) if !cert.expired(now) => Ok(cert),
        Some((_, state)) => Err(Error::NotReady {
            identity: identity.to_string(),
            state,
        }),
        None => Err(Error::NotReady {
            identity: identity.to_string(),
            state: CertState::Unavailable("never requested".into()),
        }),
    }
}
