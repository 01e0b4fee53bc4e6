//! gRPC channels to the control plane (istiod's xDS and CA on :15012): TLS 1.3/1.2 with ALPN
//! h2, the server checked against the control-plane root bundle under the address's host name
//! (or a name given apart, for an address that is an IP), and `authorization: Bearer <token>`
//! on every call, the token file re-read each time because Kubernetes rotates it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tonic::transport::{Channel, Endpoint, Uri};

/// Channel set-up failures.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The address does not parse.
    #[error("{flag} {address:?} is not host:port or https://host:port (e.g. https://istiod.istio-system.svc:15012)")]
    Address {
        /// Which setting.
        flag: &'static str,
        /// What was given.
        address: String,
    },
    /// The root bundle cannot be read.
    #[error("cannot read the control-plane root certificates from {path}: check {flag}")]
    Roots {
        /// The file.
        path: PathBuf,
        /// Which setting.
        flag: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The root bundle holds no certificate.
    #[error("{path} holds no PEM certificate: {flag} must point at the mesh root bundle")]
    NoRoots {
        /// The file.
        path: PathBuf,
        /// Which setting.
        flag: &'static str,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration for {address} failed")]
    Tls {
        /// Where.
        address: String,
        /// Why.
        #[source]
        source: rustls::Error,
    },
}

/// A control-plane server: where, which name its certificate must carry, which roots sign it.
#[derive(Clone, Debug)]
pub struct Target {
    /// `host:port`.
    pub authority: String,
    /// The name the server certificate is checked against.
    pub server_name: ServerName<'static>,
    /// Trusted roots.
    pub roots: Vec<CertificateDer<'static>>,
    /// Bearer token file, read per call.
    pub token_path: Option<PathBuf>,
}

impl Target {
    /// Parses `address` (`host:port` or `https://host:port`); `server_name` overrides the
    /// host as the name checked in the server certificate.
    pub fn new(
        flag: &'static str,
        address: &str,
        server_name: Option<&str>,
        roots: Vec<CertificateDer<'static>>,
        token_path: Option<PathBuf>,
    ) -> Result<Self, Error> {
        let bad = || Error::Address {
            flag,
            address: address.to_string(),
        };
        let authority = address
            .strip_prefix("https://")
            .unwrap_or(address)
            .trim_end_matches('/');
        let uri: Uri = format!("https://{authority}").parse().map_err(|_| bad())?;
        let host = uri.host().ok_or_else(bad)?;
        if uri.port_u16().is_none() || !uri.path().trim_matches('/').is_empty() {
            return Err(bad());
        }
        let name = server_name.unwrap_or(host.trim_start_matches('[').trim_end_matches(']'));
        let server_name = ServerName::try_from(name.to_string()).map_err(|_| bad())?;
        Ok(Self {
            authority: authority.to_string(),
            server_name,
            roots,
            token_path,
        })
    }

    /// A lazily connecting channel: the first call connects, a broken connection is
    /// re-established on the next call.
    pub fn channel(&self) -> Result<Channel, Error> {
        let tls = Arc::new(self.client_config()?);
        let endpoint = Endpoint::from_shared(format!("http://{}", self.authority))
            .map_err(|_| Error::Address {
                flag: "address",
                address: self.authority.clone(),
            })?
            .connect_timeout(std::time::Duration::from_secs(5))
            .http2_keep_alive_interval(std::time::Duration::from_secs(30))
            .keep_alive_timeout(std::time::Duration::from_secs(10));
        let (authority, name) = (self.authority.clone(), self.server_name.clone());
        let connector = tower::service_fn(move |_: Uri| {
            let (tls, authority, name) = (tls.clone(), authority.clone(), name.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&authority).await?;
                tcp.set_nodelay(true)?;
                let stream = tokio_rustls::TlsConnector::from(tls)
                    .connect(name, tcp)
                    .await?;
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        Ok(endpoint.connect_with_connector_lazy(connector))
    }

    fn client_config(&self) -> Result<rustls::ClientConfig, Error> {
        let tls = |source| Error::Tls {
            address: self.authority.clone(),
            source,
        };
        let mut store = rustls::RootCertStore::empty();
        for root in &self.roots {
            store.add(root.clone()).map_err(tls)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls)?
            .with_root_certificates(store)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// Adds the bearer token to a request's metadata (no token file: nothing added).
    pub fn authorize<T>(&self, request: &mut tonic::Request<T>) {
        let Some(path) = &self.token_path else { return };
        match std::fs::read_to_string(path) {
            Ok(token) => {
                let value = format!("Bearer {}", token.trim());
                match value.parse() {
                    Ok(v) => {
                        request.metadata_mut().insert("authorization", v);
                    }
                    Err(_) => {
                        tracing::warn!(path = %path.display(), "the token file holds characters not allowed in a header; sending no token");
                    }
                }
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot read the token file; sending no token");
            }
        }
    }
}

/// Reads every certificate of a PEM bundle.
pub fn read_roots(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let text = std::fs::read(path).map_err(|source| Error::Roots {
        path: path.to_path_buf(),
        flag,
        source,
    })?;
    let roots = crate::tls::pem::parse_pem_certs(&text);
    if roots.is_empty() {
        return Err(Error::NoRoots {
            path: path.to_path_buf(),
            flag,
        });
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_or_are_named() {
        let t = Target::new(
            "XDS_ADDRESS",
            "https://istiod.istio-system.svc:15012",
            None,
            vec![],
            None,
        )
        .expect("valid");
        assert_eq!(t.authority, "istiod.istio-system.svc:15012");
        let t = Target::new(
            "XDS_ADDRESS",
            "127.0.0.1:15012",
            Some("istiod.istio-system.svc"),
            vec![],
            None,
        )
        .expect("valid");
        assert_eq!(
            t.server_name,
            ServerName::try_from("istiod.istio-system.svc").expect("name")
        );
        let err = Target::new("XDS_ADDRESS", "istiod", None, vec![], None)
            .expect_err("no port")
            .to_string();
        assert!(
            err.contains("XDS_ADDRESS") && err.contains("host:port"),
            "{err}"
        );
    }
}
