//! Wiring: checks, the kernel redirect, pod sources, and the agent's own servers.

use std::sync::Arc;

use anyhow::Context;
use tokio::sync::{Mutex, Notify};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::drain::Drain;
use crate::enroll::{self, Enrollment};
use crate::identity::ca::LocalCa;
use crate::identity::caclient::CaClient;
use crate::identity::manager::{CertManager, CertSource};
use crate::netns::HostNetns;
use crate::proxy::hbone::Pool;
use crate::proxy::MeshContext;
use crate::readiness::Readiness;
use crate::redirect::{kernel, Redirect};
use crate::state::{PodRef, SharedState};
use crate::xds::client::XdsClient;

const BLOCK_EBPF: &str = "ebpf attached";
const BLOCK_PODS: &str = "pods enrolled";
const BLOCK_XDS: &str = "xds synced";
const BLOCK_CERTS: &str = "certificates ready";
const BLOCK_DRAINING: &str = "draining";

/// Runs the agent until SIGTERM/SIGINT or `POST /quitquitquit`, then drains (see
/// [`crate::drain`]). The kernel redirect stays pinned on exit, so enrolled pods stay
/// captured (fail closed) until the next agent, or are served by an agent already running
/// beside this one (an overlapping upgrade).
pub async fn run(config: Config) -> anyhow::Result<()> {
    // The local config is validated before anything touches the kernel.
    if let Some(path) = &config.local_xds_path {
        crate::xds::local::load(path).context("the local config is invalid")?;
    }
    kernel::check_kernel_and_privileges()?;
    kernel::check_cgroup(&config.redirect.cgroup)?;
    kernel::ensure_bpffs(&config.redirect.pin_dir)?;
    tracing::info!(config = ?config, "starting ztunnel-agent {}", env!("CARGO_PKG_VERSION"));
    if let Some(problem) = &config.dns_problem {
        tracing::warn!(error = %problem, "DNS capture is off: pods resolve names directly");
    }

    let readiness = Readiness::default();
    readiness.block(BLOCK_EBPF);
    readiness.block(BLOCK_PODS);
    // `stop`: SIGTERM, SIGINT or /quitquitquit asked the agent to stop (it drains);
    // `draining`: stop taking new work (pod sources); `shutdown`: the drain is over, every
    // remaining task ends.
    let stop = CancellationToken::new();
    let draining = CancellationToken::new();
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(stop.clone()));

    let readiness_listener = crate::http::bind(config.readiness_addr, "readiness").await?;
    let metrics_listener = crate::http::bind(config.metrics_addr, "metrics").await?;
    let admin_listener = crate::http::bind(config.admin_addr, "admin").await?;

    let host = HostNetns::current()?;
    let redirect = Redirect::install(config.redirect.clone())?;
    for (program, state) in redirect.attachments() {
        tracing::info!(program, state = ?state, cgroup = %config.redirect.cgroup.display(), "eBPF program");
    }
    // Loading eBPF parsed the kernel's BTF (several MiB, all freed now): returned at once,
    // not over the allocator's decay time.
    let arenas = crate::allocator::release_unused();
    tracing::debug!(arenas, "start-up's freed memory returned to the kernel");
    readiness.unblock(BLOCK_EBPF);
    let state = SharedState::default();
    let certs = match &config.ca {
        Some(target) => {
            let client = CaClient::new(target.clone())?;
            tracing::info!(ca = %target.authority, "workload certificates come from the istiod CA");
            CertManager::new(
                CertSource::Istiod(Box::new(client)),
                &config.trust_domain,
                config.cert_ttl,
                config.mesh_roots.clone(),
            )
        }
        None => CertManager::local(
            LocalCa::load_or_create(&config.ca_dir, &config.trust_domain)?,
            config.cert_ttl,
        ),
    };
    let mesh = Arc::new(MeshContext {
        state: state.clone(),
        certs: Arc::new(certs),
        pool: Arc::new(Pool::default()),
        tracker: Arc::default(),
        drain: Drain::default(),
        keepalive: config.keepalive,
        limits: config.limits,
        kernel_relay: redirect.kernel_relay(),
    });
    tokio::spawn(mesh.pool.clone().run_eviction(shutdown.clone()));
    crate::metrics::global().configure_series(
        config.metrics_max_series,
        config.metrics_series_idle_timeout,
    );
    crate::metrics::global().set_runtime(tokio::runtime::Handle::current());
    crate::metrics::global().set_build_tag(&config.build_tag);
    tokio::spawn(evict_idle_series(state.clone(), shutdown.clone()));
    let mut enrollment = Enrollment::new(redirect, host, mesh.clone());
    enrollment.set_readiness(readiness.clone());
    enrollment.set_dns(&config.dns);
    enrollment.set_preserve_source(config.preserve_source_address);
    let enrollment = Arc::new(Mutex::new(enrollment));
    let scrape = enrollment.clone();
    crate::metrics::global().set_pod_counters_source(Arc::new(move || {
        // A scrape during an enrollment change skips the pod counters once rather than wait.
        scrape
            .try_lock()
            .map(|e| e.pod_counters())
            .unwrap_or_default()
    }));

    let r = readiness.clone();
    tokio::spawn(crate::http::serve(
        readiness_listener,
        move |req| {
            let resp = crate::admin::ready(&req, &r);
            async move { resp }
        },
        shutdown.clone(),
    ));
    tokio::spawn(crate::http::serve(
        metrics_listener,
        |req| {
            let resp = crate::admin::metrics(&req);
            async move { resp }
        },
        shutdown.clone(),
    ));
    let config_json = serde_json::json!({
        "nodeName": config.node_name,
        "clusterId": config.cluster_id,
        "localXdsPath": config.local_xds_path,
        "inpodUds": config.inpod_uds,
        "xdsAddress": config.xds.as_ref().map(|t| &t.authority),
        "caAddress": config.ca.as_ref().map(|t| &t.authority),
        "proxyId": config.node.id,
        "pinDir": config.redirect.pin_dir,
        "cgroupPath": config.redirect.cgroup,
        "excludeOutboundPorts": config.redirect.exclude_outbound_ports,
        "excludeInboundPorts": config.redirect.exclude_inbound_ports,
        "kernelRelay": config.redirect.kernel_relay,
        "trustDomain": config.trust_domain,
        "caDir": config.ca_dir,
        "certTtlSecs": config.cert_ttl.as_secs(),
        "meshRootsPath": config.mesh_roots_path,
        "adminAddr": config.admin_addr,
        "metricsAddr": config.metrics_addr,
        "readinessAddr": config.readiness_addr,
        "logFilter": config.log_filter,
        "logFormat": format!("{:?}", config.log_format),
        "drainDeadlineMs": u64::try_from(config.drain_deadline.as_millis()).unwrap_or(u64::MAX),
        "keepalive": config.keepalive.as_ref().map(|k| format!("{k:?}")),
        "metricsMaxSeries": config.metrics_max_series,
        "metricsSeriesIdleTimeoutSecs": config.metrics_series_idle_timeout.as_secs(),
        "istioVersion": config.build_tag,
        "dnsCapture": config.dns.capture,
        "dnsResolvConf": config.dns_resolv_conf,
        "dnsUpstreams": config.dns.upstreams,
        "preserveSourceAddress": config.preserve_source_address,
        "maxConnectionsPerPod": config.limits.connections_per_pod,
        "maxHandshakesPerPeer": config.limits.handshakes_per_peer,
        "hboneHandshakeTimeoutMs": u64::try_from(config.limits.handshake_timeout.as_millis()).unwrap_or(u64::MAX),
        "hboneMaxHeaderBytes": config.limits.max_header_bytes,
        "hboneMaxStreamsPerConnection": config.limits.streams_per_connection,
        "hboneMaxStreamsPerPeer": config.limits.streams_per_peer,
        "hboneMaxPendingConnectsPerPeer": config.limits.pending_connects_per_peer,
    });
    let config_source = match (&config.xds, &config.local_xds_path) {
        (Some(t), _) => format!("xDS from {}", t.authority),
        (None, Some(path)) => format!("local config {}", path.display()),
        (None, None) => "no mesh configuration source (every destination is passthrough)".into(),
    };

    // Control plane: the state follows xDS; pods whose workload disappears are unenrolled.
    let mut xds_synced = None;
    let mut xds_status = None;
    if let Some(target) = &config.xds {
        readiness.block(BLOCK_XDS);
        let (synced_tx, synced_rx) = tokio::sync::oneshot::channel();
        let changed = Arc::new(Notify::new());
        let (m, c) = (mesh.clone(), changed.clone());
        let client = XdsClient::new(
            target.clone(),
            config.node.clone(),
            Box::new(move |next| {
                m.apply_state(next);
                c.notify_one();
            }),
            synced_tx,
        );
        xds_status = Some(client.status());
        tokio::spawn(client.run(shutdown.clone()));
        tokio::spawn(follow_workloads(
            mesh.clone(),
            enrollment.clone(),
            changed,
            draining.clone(),
        ));
        xds_synced = Some(synced_rx);
    }
    let mut admin = crate::admin::Admin::new(stop.clone());
    admin.add_handler(Arc::new(crate::config_dump::ConfigDumpHandler {
        enrollment: enrollment.clone(),
        config_json,
    }));
    admin.add_handler(Arc::new(crate::diagnose::collect::DiagnoseHandler {
        enrollment: enrollment.clone(),
        readiness: readiness.clone(),
        xds: xds_status,
        node: config.node_name.clone(),
        config_source,
    }));
    admin.add_handler(Arc::new(crate::diagnose::flow::FlowHandler {
        enrollment: enrollment.clone(),
        node: config.node_name.clone(),
    }));
    admin.add_handler(Arc::new(crate::diagnose::collect::RecentConnectionsHandler));
    admin.add_handler(Arc::new(crate::profiling::CpuProfileHandler));
    admin.add_handler(Arc::new(crate::profiling::HeapProfileHandler));
    let admin = Arc::new(admin);
    tokio::spawn(crate::http::serve(
        admin_listener,
        move |req| {
            let admin = admin.clone();
            async move { admin.handle(req).await }
        },
        shutdown.clone(),
    ));
    if let Some(path) = &config.mesh_roots_path {
        tokio::spawn(watch_roots(
            path.clone(),
            mesh.certs.clone(),
            shutdown.clone(),
        ));
    }
    if config.ca.is_some() {
        tokio::spawn(track_certificates(
            mesh.certs.clone(),
            readiness.clone(),
            shutdown.clone(),
        ));
    }

    // Pod sources. Pods a previous run left in the maps are swept only once every source
    // has had its initial sync, so a restart never uncaptures a live pod.
    if let (Some(path), Some(node)) = (&config.local_xds_path, &config.node_name) {
        let text = enroll::local::initial(path, node, &mesh, &enrollment)
            .await
            .context("the local config is invalid")?;
        tokio::spawn(enroll::local::watch(
            path.clone(),
            node.clone(),
            mesh.clone(),
            enrollment.clone(),
            text,
            draining.clone(),
        ));
    }
    if let Some(uds) = &config.inpod_uds {
        let synced = Arc::new(Notify::new());
        // Closed when draining starts: istio-cni then talks to the agent that replaces this
        // one.
        tokio::spawn(enroll::zds::run(
            uds.clone(),
            enrollment.clone(),
            synced.clone(),
            draining.clone(),
        ));
        tokio::select! {
            _ = synced.notified() => {}
            _ = stop.cancelled() => {}
        }
    }
    if let Some(synced) = xds_synced {
        tokio::select! {
            _ = synced => readiness.unblock(BLOCK_XDS),
            _ = stop.cancelled() => {}
        }
    }
    if !stop.is_cancelled() {
        // The pods' certificates were requested during enrollment: readiness waits for them
        // from now (track_certificates keeps it in step afterwards).
        sync_cert_blocker(&mesh.certs, &readiness);
        let swept = enrollment.lock().await.sweep_stale()?;
        if swept > 0 {
            tracing::info!(swept, "stale pods removed from the kernel maps");
        }
        readiness.unblock(BLOCK_PODS);
    }

    stop.cancelled().await;
    // Not ready from this moment: the kubelet and load balancers stop sending work.
    readiness.block(BLOCK_DRAINING);
    draining.cancel();
    let live = mesh.drain.live();
    tracing::info!(
        live_connections = live,
        deadline = ?config.drain_deadline,
        "draining: listeners closed (new connections go to the next agent's sockets), HBONE peers sent GOAWAY; live connections run until they end or the deadline"
    );
    let started = std::time::Instant::now();
    let open = mesh.drain.run(config.drain_deadline, DRAIN_GRACE).await;
    if open > 0 {
        tracing::warn!(
            closed = open,
            "drain deadline reached: the connections still open (and the HBONE connections carrying them) were closed, each connection with its access-log line"
        );
    }
    tracing::info!(elapsed = ?started.elapsed(), "drained; exiting");
    shutdown.cancel();
    mesh.certs.stop();
    Ok(())
}

/// How long connections closed at the drain deadline get to record their ends.
/// Kept short: upstream's deadline for a short grace period leaves only 1 s before SIGKILL.
const DRAIN_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// Cancels `stop` on SIGTERM or SIGINT (listening from the start, so a signal that arrives
/// while the agent is still starting is not lost).
async fn stop_on_signal(stop: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; stop the agent with POST /quitquitquit");
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, draining"),
        _ = stop.cancelled() => {
            tracing::info!("stop requested (POST /quitquitquit), draining");
            return;
        }
    }
    stop.cancel();
}

/// Follows the mesh state: a pod whose workload was removed from xDS is taken out of capture
/// (parked, its namespace kept), and enrolled again when the workload comes back. Pods are
/// matched by namespace and name, since istio-cni names them by Kubernetes UID and xDS by
/// `<cluster>//Pod/<ns>/<name>`.
async fn follow_workloads(
    mesh: Arc<MeshContext>,
    enrollment: Arc<Mutex<Enrollment>>,
    changed: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let names = |state: &crate::state::MeshState| -> std::collections::BTreeSet<PodRef> {
        state
            .workloads()
            .map(|w| PodRef::new(w.namespace.as_str(), w.name.as_str()))
            .collect()
    };
    let mut known = names(&mesh.state.snapshot());
    loop {
        tokio::select! {
            _ = changed.notified() => {}
            _ = shutdown.cancelled() => return,
        }
        let now = names(&mesh.state.snapshot());
        let removed: Vec<_> = known.difference(&now).cloned().collect();
        let added: Vec<_> = now.difference(&known).cloned().collect();
        known = now;
        if removed.is_empty() && added.is_empty() {
            continue;
        }
        let mut enrollment = enrollment.lock().await;
        for pod in enrollment.status() {
            if removed.contains(&PodRef::new(pod.namespace.as_str(), pod.name.as_str())) {
                match enrollment.park(&pod.uid).await {
                    Ok(_) => {
                        tracing::info!(pod = %pod.name, namespace = %pod.namespace, "pod unenrolled: its workload was removed from xDS (enrolled again if it returns)")
                    }
                    Err(e) => {
                        tracing::error!(pod = %pod.name, namespace = %pod.namespace, error = %crate::telemetry::ErrorChain(&e), "unenrolling a removed workload failed")
                    }
                }
            }
        }
        for PodRef { namespace, name } in added {
            match enrollment.unpark(&namespace, &name).await {
                Ok(0) => {}
                Ok(_) => {
                    tracing::info!(pod = %name, namespace = %namespace, "pod enrolled again: its workload is back in xDS")
                }
                Err(e) => {
                    tracing::error!(pod = %name, namespace = %namespace, error = %crate::telemetry::ErrorChain(&e), "enrolling a returning workload failed")
                }
            }
        }
    }
}

/// Root rotation: the bundle file (Kubernetes updates the mounted ConfigMap) is the set of
/// configured roots: a root added is trusted from then on, before the CA signs with it; a
/// root removed stops being trusted (unless it anchors a certificate the agent holds).
async fn watch_roots(
    path: std::path::PathBuf,
    certs: Arc<CertManager>,
    shutdown: CancellationToken,
) {
    // Nothing seen yet: the first read is applied (the same roots as at start-up change
    // nothing), so a change between start-up and this task is not lost.
    let mut last = Vec::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
            _ = shutdown.cancelled() => return,
        }
        let Ok(now) = std::fs::read(&path) else {
            continue;
        };
        if now != last {
            let roots = crate::tls::pem::parse_pem_certs(&now);
            if roots.is_empty() {
                // A half-written or emptied bundle must not drop every configured root.
                tracing::warn!(path = %path.display(), "the root bundle holds no certificate; keeping the roots in use");
            } else {
                certs.set_configured_roots(roots);
            }
            last = now;
        }
    }
}

/// Sets the "certificates ready" blocker from the certificates' state. Serialized, so that
/// two callers cannot interleave a stale read with a fresh write and leave it wrong.
fn sync_cert_blocker(certs: &CertManager, readiness: &Readiness) {
    static SYNC: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = SYNC.lock().unwrap_or_else(|p| p.into_inner());
    if certs.pending().is_empty() {
        readiness.unblock(BLOCK_CERTS);
    } else {
        readiness.block(BLOCK_CERTS);
    }
}

/// Keeps the "certificates ready" readiness blocker in step with the CA client.
async fn track_certificates(
    certs: Arc<CertManager>,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    let mut changes = certs.subscribe();
    loop {
        sync_cert_blocker(&certs, &readiness);
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Removes, every so often, the `istio_tcp_*` label sets that have been idle past their
/// interval and whose workloads are no longer in the mesh state.
async fn evict_idle_series(state: SharedState, shutdown: CancellationToken) {
    let metrics = crate::metrics::global();
    // A quarter of the interval: a set goes at most 25% late; at least every second.
    let period = (metrics.series_idle() / 4).max(std::time::Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        let snapshot = state.snapshot();
        let evicted = metrics.evict_idle_series(|uid| snapshot.workload(uid).is_some());
        if evicted > 0 {
            tracing::debug!(evicted, "idle metric series of deleted workloads evicted");
        }
    }
}
