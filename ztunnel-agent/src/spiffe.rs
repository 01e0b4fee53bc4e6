//! SPIFFE identities of the Istio form, `spiffe://<trust domain>/ns/<namespace>/sa/<service
//! account>`: what workload certificates carry and what policies and the access log name.

use std::fmt;
use std::str::FromStr;

/// A parsed SPIFFE identity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// Trust domain.
    pub trust_domain: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
}

/// A string that is not a SPIFFE id of the Istio form.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a SPIFFE id of the form spiffe://<trust domain>/ns/<namespace>/sa/<service account>")]
pub struct ParseError(pub String);

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for Identity {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseError(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(err)?;
        let mut parts = rest.split('/');
        let (td, ns_kw, ns, sa_kw, sa) = (
            parts.next().ok_or_else(err)?,
            parts.next().ok_or_else(err)?,
            parts.next().ok_or_else(err)?,
            parts.next().ok_or_else(err)?,
            parts.next().ok_or_else(err)?,
        );
        if parts.next().is_some()
            || ns_kw != "ns"
            || sa_kw != "sa"
            || td.is_empty()
            || ns.is_empty()
            || sa.is_empty()
        {
            return Err(err());
        }
        Ok(Self {
            trust_domain: td.to_string(),
            namespace: ns.to_string(),
            service_account: sa.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_other_forms() {
        let s = "spiffe://cluster.local/ns/default/sa/curl";
        let id: Identity = s.parse().expect("valid");
        assert_eq!(id.namespace, "default");
        assert_eq!(id.to_string(), s);
        for bad in [
            "spiffe://cluster.local/ns/default",
            "spiffe://cluster.local/ns/default/sa/curl/x",
            "https://cluster.local/ns/default/sa/curl",
            "spiffe:///ns/default/sa/curl",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad}");
        }
    }
}
