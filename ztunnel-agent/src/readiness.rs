//! Readiness: a set of named blockers; ready when none is left.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// Shared readiness state.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    blockers: Arc<Mutex<BTreeSet<String>>>,
}

impl Readiness {
    /// Adds a blocker.
    pub fn block(&self, name: impl Into<String>) {
        let name = name.into();
        if self.lock().insert(name.clone()) {
            tracing::info!(blocker = name, "not ready");
        }
    }

    /// Removes a blocker.
    pub fn unblock(&self, name: &str) {
        let mut blockers = self.lock();
        if blockers.remove(name) {
            tracing::info!(blocker = name, "readiness blocker cleared");
            if blockers.is_empty() {
                tracing::info!("ready: all readiness blockers cleared");
            }
        }
    }

    /// The blockers left (empty: ready).
    pub fn pending(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.blockers.lock().unwrap_or_else(|p| p.into_inner())
    }
}
