//! Standalone enrollment: the local config file's workloads on this node that carry a
//! `netns` path. The file is re-read when it changes; an invalid new version is refused and
//! the last good one stays in force.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use super::{Enrollment, PodSpec, Source};
use crate::netns::PodNetns;
use crate::proxy::MeshContext;
use crate::state::workload::Workload;
use crate::xds::local;

/// How often the file is checked for changes.
const POLL: Duration = Duration::from_millis(500);

/// Reads the file once (start-up: an invalid file is an error) and enrolls its pods.
pub async fn initial(
    path: &Path,
    node: &str,
    mesh: &MeshContext,
    enrollment: &Mutex<Enrollment>,
) -> Result<String, local::Error> {
    let text = std::fs::read_to_string(path).map_err(|source| local::Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let (state, workloads) = local::load_state(path, &text)?;
    mesh.state.replace(state);
    apply(&workloads, node, enrollment).await;
    Ok(text)
}

/// Watches the file and applies each valid change until cancelled.
pub async fn watch(
    path: PathBuf,
    node: String,
    mesh: Arc<MeshContext>,
    enrollment: Arc<Mutex<Enrollment>>,
    mut last: String,
    cancel: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => {
                if last != "\0unreadable" {
                    tracing::error!(path = %path.display(), error = %e, "cannot read the local config; keeping the last good one");
                    last = "\0unreadable".to_string();
                }
                continue;
            }
        };
        if text == last {
            continue;
        }
        last = text.clone();
        match local::load_state(&path, &text) {
            Ok((state, workloads)) => {
                tracing::info!(path = %path.display(), "local config changed; applying");
                mesh.apply_state(state);
                apply(&workloads, &node, &enrollment).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "local config refused; keeping the last good one");
            }
        }
    }
}

/// Makes the enrolled set match the file: enroll what is listed, remove what is not.
async fn apply(workloads: &[Workload], node: &str, enrollment: &Mutex<Enrollment>) {
    let mut enrollment = enrollment.lock().await;
    let mut keep = Vec::new();
    for w in workloads.iter().filter(|w| w.node == node) {
        let Some(netns_path) = &w.netns else { continue };
        let spec = PodSpec {
            uid: w.key(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            ips: w.workload_ips.clone(),
        };
        keep.push(spec.uid.clone());
        let netns = match PodNetns::open(netns_path, enrollment.host()) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(pod = %w.name, error = %crate::telemetry::ErrorChain(&e), "pod not enrolled");
                continue;
            }
        };
        if let Err(e) = enrollment.enroll(Source::LocalConfig, spec, netns).await {
            tracing::error!(pod = %w.name, error = %crate::telemetry::ErrorChain(&e), "pod not enrolled");
        }
    }
    if let Err(e) = enrollment.retain(Source::LocalConfig, &keep).await {
        tracing::error!(error = %crate::telemetry::ErrorChain(&e), "removing pods dropped from the local config failed");
    }
}
