//! Workload identities: SPIFFE ids `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`,
//! and the certificates that prove them.

pub mod ca;
pub mod caclient;
pub mod manager;

/// The trust domain used when a workload names none.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

pub use crate::spiffe::{Identity, ParseError};
