//! Readiness: a set of named blockers; ready when none is left.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// Shared readiness state.
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    blockers: Arc<Mutex<BTreeSet<&'static str>>>,
}

impl Readiness {
    /// Adds a blocker.
    pub fn block(&self, name: &'static str) {
        if self.lock().insert(name) {
            tracing::info!(blocker = name, "not ready");
        }
    }

    /// Removes a blocker.
    pub fn unblock(&self, name: &'static str) {
        let mut blockers = self.lock();
        if blockers.remove(name) {
            tracing::info!(blocker = name, "readiness blocker cleared");
            if blockers.is_empty() {
                tracing::info!("ready: all readiness blockers cleared");
            }
        }
    }

    /// The blockers left (empty: ready).
    pub fn pending(&self) -> Vec<&'static str> {
        self.lock().iter().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<&'static str>> {
        self.blockers.lock().unwrap_or_else(|p| p.into_inner())
    }
}
