//! Live inbound connections, so that a policy change can close the ones it now denies (late
//! rejection) and status views can list them.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

use super::PodProxy;
use crate::authz::{Connection, Denied};
use crate::identity::Identity;
use crate::state::MeshState;

/// One live inbound connection.
struct Live {
    pod: Arc<PodProxy>,
    src: IpAddr,
    identity: Option<Identity>,
    dst: SocketAddr,
    cancel: CancellationToken,
    denied: Mutex<Option<Denied>>,
}

/// A live connection as status views show it.
#[derive(Clone, Debug)]
pub struct LiveConnection {
    /// Source address.
    pub src: IpAddr,
    /// Destination.
    pub dst: SocketAddr,
    /// Whether it arrived over HBONE.
    pub mtls: bool,
}

/// The registry.
#[derive(Default)]
pub struct Tracker {
    next: AtomicU64,
    live: Mutex<HashMap<u64, Arc<Live>>>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tracker")
    }
}

/// Keeps a connection registered until dropped.
pub struct Tracked {
    id: u64,
    live: Arc<Live>,
    tracker: Arc<Tracker>,
}

impl Tracked {
    /// Resolves when a policy change denies the connection; returns why.
    pub async fn revoked(&self) -> Denied {
        self.live.cancel.cancelled().await;
        self.live
            .denied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or(Denied::NotAllowed)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.tracker.lock().remove(&self.id);
    }
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<Live>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers an authorized inbound connection.
    pub fn track(
        self: &Arc<Self>,
        pod: Arc<PodProxy>,
        src: IpAddr,
        identity: Option<Identity>,
        dst: SocketAddr,
    ) -> Tracked {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let live = Arc::new(Live {
            pod,
            src,
            identity,
            dst,
            cancel: CancellationToken::new(),
            denied: Mutex::new(None),
        });
        self.lock().insert(id, live.clone());
        Tracked {
            id,
            live,
            tracker: self.clone(),
        }
    }

    /// Re-checks every live connection against `state`; closes the denied ones. Returns how
    /// many were closed.
    pub fn reevaluate(&self, state: &MeshState) -> usize {
        let live: Vec<Arc<Live>> = self.lock().values().cloned().collect();
        let mut closed = 0;
        for c in live {
            let conn = Connection {
                src: c.src,
                identity: c.identity.as_ref(),
                dst: c.dst,
            };
            if let Err(denied) = c
                .pod
                .authorize(state, c.pod.workload(state).as_deref(), &conn)
            {
                *c.denied.lock().unwrap_or_else(|p| p.into_inner()) = Some(denied);
                c.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }

    /// Live connections per pod uid.
    pub fn by_pod(&self) -> HashMap<String, Vec<LiveConnection>> {
        let mut out: HashMap<String, Vec<LiveConnection>> = HashMap::new();
        for c in self.lock().values() {
            out.entry(c.pod.uid.clone())
                .or_default()
                .push(LiveConnection {
                    src: c.src,
                    dst: c.dst,
                    mtls: c.identity.is_some(),
                });
        }
        out
    }
}
