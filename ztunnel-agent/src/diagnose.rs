//! `ztunnel-agent diagnose [<namespace>/<pod>]`: is this pod's traffic going through the mesh,
//! and if not, why.
//!
//! The agent gathers the evidence (`GET /debug/diagnose` on the admin port): the kernel's
//! view of the pinned links (link ids, the cgroup and network namespace they are attached
//! to), the maps' entries for each pod, the pod's listeners as its own network namespace's
//! socket table shows them, the capture counters over a short window, certificate and xDS
//! state, and the pod's recent connection outcomes. The command walks the chain a captured
//! connection depends on, in order, and names the first broken link; exit status 0 means
//! every link holds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::accesslog::Outcome;
use crate::xds::client::XdsStatus;

/// The default counter window.
pub const DEFAULT_WINDOW: Duration = Duration::from_millis(1000);
/// Longest window the agent accepts (diagnose answers within 5 s).
pub const MAX_WINDOW: Duration = Duration::from_millis(3000);
/// Recent connections shown per pod.
pub const RECENT_SHOWN: usize = 5;

/// Everything the agent knows that bears on capture (`GET /debug/diagnose`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Evidence {
    /// Agent version.
    pub version: String,
    /// Node name.
    pub node: Option<String>,
    /// Readiness blockers left (empty: ready).
    pub not_ready: Vec<String>,
    /// Pin directory.
    pub pin_dir: String,
    /// The cgroup the capture programs should be attached to.
    pub cgroup: String,
    /// Its id (inode), as link info reports attachments.
    pub cgroup_id: Option<u64>,
    /// The cgroup programs' links.
    pub links: Vec<LinkEvidence>,
    /// Where the mesh configuration comes from (`xds <address>`, `local <path>`).
    pub config_source: String,
    /// The xDS stream, in control-plane mode.
    pub xds: Option<XdsStatus>,
    /// Certificates by identity.
    pub certificates: Vec<CertEvidence>,
    /// How long the capture counters were watched.
    pub window_ms: u64,
    /// Enrolled pods (all, or the one asked about).
    pub pods: Vec<PodEvidence>,
    /// The pod asked about, as the mesh state knows it.
    pub query: Option<QueryEvidence>,
    /// Pods out of capture because their workload left xDS (`namespace/name`).
    #[serde(default)]
    pub parked: Vec<String>,
}

/// A pinned link as the kernel reports it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LinkEvidence {
    /// Program (or `inbound-<cookie>`).
    pub name: String,
    /// Link id.
    pub id: Option<u32>,
    /// Program id.
    pub program_id: Option<u32>,
    /// Cgroup id or netns inode it is attached to (0: detached).
    pub attached_to: Option<u64>,
    /// Why it could not be read.
    pub error: Option<String>,
}

impl LinkEvidence {
    /// From a pinned link read.
    pub fn from_read(
        name: &str,
        read: &std::io::Result<crate::redirect::linkinfo::PinnedLinkInfo>,
    ) -> Self {
        use crate::redirect::linkinfo::Target;
        match read {
            Ok(info) => Self {
                name: name.to_string(),
                id: Some(info.id),
                program_id: Some(info.program_id),
                attached_to: match info.target {
                    Target::Cgroup(id) | Target::Netns(id) => Some(id),
                    Target::Other(_) => None,
                },
                error: None,
            },
            Err(e) => Self {
                name: name.to_string(),
                error: Some(e.to_string()),
                ..Default::default()
            },
        }
    }
}

/// A certificate's state.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertEvidence {
    /// SPIFFE identity.
    pub identity: String,
    /// `Available`, `Initializing` or `Unavailable: <why>`.
    pub state: String,
    /// Expiry of the held certificate.
    pub not_after: Option<SystemTime>,
}

/// One listener of a pod.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerEvidence {
    /// Bound address.
    pub addr: SocketAddr,
    /// Its socket is in LISTEN state in the pod's socket table.
    pub listening: bool,
}

/// An enrolled pod.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodEvidence {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Uid.
    pub uid: String,
    /// Addresses.
    pub ips: Vec<IpAddr>,
    /// Netns cookie.
    pub netns_cookie: u64,
    /// Netns inode.
    pub netns_inode: u64,
    /// `zds` or `localconfig`.
    pub source: String,
    /// SPIFFE identity it serves with.
    pub identity: String,
    /// Whether the mesh state has its workload.
    pub workload_known: bool,
    /// Its cookie is in `ENROLLED_PODS`.
    pub map_enrolled: bool,
    /// Each address and the cookie `POD_ADDRS` maps it to.
    pub map_addresses: Vec<(IpAddr, Option<u64>)>,
    /// Families with a 15006 listener in `INBOUND_LISTENERS`.
    pub map_listener_families: Vec<String>,
    /// Its `sk_lookup` link.
    pub inbound_link: LinkEvidence,
    /// Its listeners.
    pub listeners: Vec<ListenerEvidence>,
    /// Why the socket table could not be read.
    pub listener_check_error: Option<String>,
    /// Capture counters at the start of the window.
    pub counters_before: BTreeMap<String, u64>,
    /// And at its end.
    pub counters_after: BTreeMap<String, u64>,
    /// Recent connections, newest last.
    pub recent: Vec<Outcome>,
    /// Recent failed connections, newest last.
    pub recent_failed: Vec<Outcome>,
}

/// The pod asked about.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QueryEvidence {
    /// Namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Its workload in the mesh state.
    pub workload: Option<WorkloadEvidence>,
}

/// A workload as the mesh state holds it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadEvidence {
    /// Uid.
    pub uid: String,
    /// Node.
    pub node: String,
    /// HBONE or TCP.
    pub protocol: String,
    /// Addresses.
    pub ips: Vec<IpAddr>,
}

/// Parses `<namespace>/<pod>`.
pub fn parse_pod_ref(text: &str) -> Option<(String, String)> {
    match text.split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Some((ns.to_string(), name.to_string()))
        }
        _ => None,
    }
}

/// Counters as a name -> value map.
pub fn counter_map(c: &ztunnel_common::PodCounters) -> BTreeMap<String, u64> {
    c.fields()
        .iter()
        .map(|(k, v)| ((*k).to_string(), *v))
        .collect()
}

/// The state of a socket-table row that means LISTEN.
const TCP_LISTEN: &str = "0A";

/// Inodes of the listening TCP sockets in the calling thread's network namespace.
pub fn listening_inodes() -> std::io::Result<Vec<u64>> {
    let mut inodes = Vec::new();
    for table in ["/proc/thread-self/net/tcp", "/proc/thread-self/net/tcp6"] {
        let text = match std::fs::read_to_string(table) {
            Ok(t) => t,
            // No IPv6 in this kernel.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) == Some(&TCP_LISTEN) {
                if let Some(inode) = fields.get(9).and_then(|i| i.parse().ok()) {
                    inodes.push(inode);
                }
            }
        }
    }
    Ok(inodes)
}

/// How one link of the chain stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Holds.
    Ok,
    /// Holds, but something deserves a look.
    Warn,
    /// Broken: traffic does not go through the mesh (or not at all).
    Fail,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Warn => "warn",
            Verdict::Fail => "FAIL",
        }
    }
}

/// One link of the chain, with its evidence.
#[derive(Clone, Debug)]
pub struct Check {
    /// Which link.
    pub name: &'static str,
    /// How it stands.
    pub verdict: Verdict,
    /// One line.
    pub summary: String,
    /// Supporting lines.
    pub evidence: Vec<String>,
}

impl Check {
    fn new(name: &'static str, verdict: Verdict, summary: impl Into<String>) -> Self {
        Self {
            name,
            verdict,
            summary: summary.into(),
            evidence: Vec::new(),
        }
    }

    fn with(mut self, line: impl Into<String>) -> Self {
        self.evidence.push(line.into());
        self
    }
}

/// A finished diagnosis.
#[derive(Clone, Debug)]
pub struct Report {
    /// What was diagnosed.
    pub subject: String,
    /// The chain, in order.
    pub checks: Vec<Check>,
    /// Extra lines (the node view's pod table).
    pub table: Option<String>,
}

impl Report {
    /// The first broken link.
    pub fn first_failure(&self) -> Option<&Check> {
        self.checks.iter().find(|c| c.verdict == Verdict::Fail)
    }

    /// As printed.
    pub fn render(&self) -> String {
        let mut out = format!("diagnose {}\n", self.subject);
        for c in &self.checks {
            let _ = writeln!(
                out,
                "  {:<5} {:<14} {}",
                c.verdict.label(),
                c.name,
                c.summary
            );
            for line in &c.evidence {
                let _ = writeln!(out, "  {:<5} {:<14}   {line}", "", "");
            }
        }
        if let Some(table) = &self.table {
            out.push('\n');
            out.push_str(table);
        }
        out.push('\n');
        match self.first_failure() {
            Some(c) => {
                let _ = writeln!(
                    out,
                    "verdict: NOT HEALTHY, first broken link: {}: {}",
                    c.name, c.summary
                );
            }
            None => {
                let _ = writeln!(out, "verdict: healthy");
            }
        }
        out
    }
}

fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    crate::admin::config_dump::rfc3339(secs)
}

fn agent_check(e: &Evidence) -> Check {
    let node = e.node.as_deref().unwrap_or("(no node name)");
    if e.not_ready.is_empty() {
        Check::new(
            "agent",
            Verdict::Ok,
            format!("ztunnel-agent {} on node {node}, ready", e.version),
        )
    } else {
        Check::new(
            "agent",
            Verdict::Warn,
            format!(
                "ztunnel-agent {} on node {node}, NOT ready: waiting for {}",
                e.version,
                e.not_ready.join(", ")
            ),
        )
    }
}

fn programs_check(e: &Evidence) -> Check {
    let Some(cgroup_id) = e.cgroup_id else {
        return Check::new(
            "programs",
            Verdict::Fail,
            format!(
                "the cgroup {} the programs attach to cannot be read (gone?): pods in it are not captured; check --cgroup-path",
                e.cgroup
            ),
        );
    };
    let broken: Vec<String> = e
        .links
        .iter()
        .filter_map(|l| match (&l.error, l.attached_to) {
            (Some(err), _) => Some(format!("{} has no readable pinned link ({err})", l.name)),
            (None, Some(0)) => Some(format!(
                "{} link {} is detached from its cgroup",
                l.name,
                l.id.unwrap_or_default()
            )),
            (None, Some(id)) if e.cgroup_id.is_some() && id != cgroup_id => Some(format!(
                "{} link {} is attached to cgroup id {id}, not {} (id {cgroup_id})",
                l.name,
                l.id.unwrap_or_default(),
                e.cgroup
            )),
            _ => None,
        })
        .collect();
    let mut check = if broken.is_empty() {
        Check::new(
            "programs",
            Verdict::Ok,
            format!(
                "{} cgroup programs attached to {} (cgroup id {cgroup_id})",
                e.links.len(),
                e.cgroup
            ),
        )
    } else {
        Check::new(
            "programs",
            Verdict::Fail,
            format!(
                "{}; pods are not captured: restart the agent to re-attach (pins under {})",
                broken.join("; "),
                e.pin_dir
            ),
        )
    };
    for l in &e.links {
        if l.error.is_none() {
            check = check.with(format!(
                "{}: link {} program {}",
                l.name,
                l.id.unwrap_or_default(),
                l.program_id.unwrap_or_default()
            ));
        }
    }
    check
}

fn config_check(e: &Evidence) -> Check {
    let Some(x) = &e.xds else {
        return Check::new("control plane", Verdict::Ok, e.config_source.clone());
    };
    let synced = crate::xds::client::TYPES
        .iter()
        .all(|t| x.synced_types.iter().any(|s| s == t));
    let since = x.since.map(rfc3339).unwrap_or_default();
    let held: Vec<String> = x
        .resources
        .iter()
        .map(|(t, n)| format!("{n} {}", t.rsplit('.').next().unwrap_or(t)))
        .collect();
    let mut check = match (x.connected, synced) {
        (true, true) => Check::new(
            "control plane",
            Verdict::Ok,
            format!("xDS {} connected since {since}, synced ({})", x.address, held.join(", ")),
        ),
        (false, true) => Check::new(
            "control plane",
            Verdict::Warn,
            format!(
                "xDS {} disconnected since {since}; serving the last state ({})",
                x.address,
                held.join(", ")
            ),
        ),
        (_, false) => Check::new(
            "control plane",
            Verdict::Fail,
            format!(
                "xDS {} has not synced yet: the agent does not know the mesh; is istiod reachable and does it accept this node's token?",
                x.address
            ),
        ),
    };
    if let Some(err) = &x.last_error {
        check = check.with(format!("last stream error: {err}"));
    }
    if let Some(nack) = &x.last_nack {
        if check.verdict == Verdict::Ok {
            check.verdict = Verdict::Warn;
        }
        let at = x.last_nack_at.map(rfc3339).unwrap_or_default();
        check = check.with(format!("last NACK {at}: {nack}"));
    }
    check
}

/// Diagnoses one pod.
pub fn pod_report(e: &Evidence, namespace: &str, name: &str) -> Report {
    let subject = format!("{namespace}/{name}");
    let mut checks = vec![agent_check(e), programs_check(e)];
    let pod = e
        .pods
        .iter()
        .find(|p| p.namespace == namespace && p.name == name);
    let workload = e.query.as_ref().and_then(|q| q.workload.as_ref());
    let Some(pod) = pod else {
        let parked = e.parked.contains(&subject);
        let check = match workload {
            None if parked => Check::new(
                "enrolled",
                Verdict::Fail,
                "not enrolled: its workload was removed from the mesh state (xDS), so capture stopped; the agent keeps its network namespace and enrolls it again when the workload returns (check istiod: is the pod still Running?)",
            ),
            Some(w) => Check::new(
                "enrolled",
                Verdict::Fail,
                format!(
                    "not enrolled: the mesh knows the workload (uid {}, node {}, {}) but no network namespace was handed to this agent; its traffic bypasses the mesh. Is the namespace labelled istio.io/dataplane-mode=ambient, is the pod on this node, and do istio-cni's logs show it added?",
                    w.uid,
                    if w.node.is_empty() { "?" } else { &w.node },
                    w.protocol
                ),
            ),
            None => Check::new(
                "enrolled",
                Verdict::Fail,
                format!(
                    "not enrolled, and the mesh state has no workload {subject}: check the name, or whether istiod (or the local config) describes it"
                ),
            ),
        };
        checks.push(check);
        checks.push(config_check(e));
        return Report {
            subject,
            checks,
            table: None,
        };
    };
    checks.extend(pod_checks(e, pod));
    checks.push(config_check(e));
    checks.push(recent_check(pod));
    Report {
        subject,
        checks,
        table: None,
    }
}

/// The checks of one enrolled pod alone (the agent-wide ones are not repeated per pod).
fn pod_checks(e: &Evidence, pod: &PodEvidence) -> [Check; 5] {
    let enrolled = Check::new(
        "enrolled",
        Verdict::Ok,
        format!(
            "netns cookie {} (inode {}), {}, from {}",
            pod.netns_cookie,
            pod.netns_inode,
            pod.ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", "),
            pod.source
        ),
    )
    .with(if pod.workload_known {
        format!(
            "workload {} known to the mesh state, identity {}",
            pod.uid, pod.identity
        )
    } else {
        format!(
            "workload not (yet) in the mesh state; identity {} from istio-cni",
            pod.identity
        )
    });
    [
        enrolled,
        kernel_check(pod),
        listener_check(pod),
        capture_check(pod, e.window_ms),
        cert_check(e, &pod.identity),
    ]
}

fn kernel_check(pod: &PodEvidence) -> Check {
    let mut problems = Vec::new();
    if !pod.map_enrolled {
        problems.push(format!(
            "netns cookie {} is missing from ENROLLED_PODS (outbound is not captured)",
            pod.netns_cookie
        ));
    }
    for (ip, owner) in &pod.map_addresses {
        match owner {
            Some(c) if *c == pod.netns_cookie => {}
            Some(c) => problems.push(format!("POD_ADDRS maps {ip} to another netns cookie {c}")),
            None => problems.push(format!("{ip} is missing from POD_ADDRS")),
        }
    }
    let link = &pod.inbound_link;
    match (&link.error, link.attached_to) {
        (Some(err), _) => problems.push(format!(
            "inbound sk_lookup link {} is not pinned ({err}): inbound is not captured",
            link.name
        )),
        (None, Some(0)) => problems.push(format!(
            "inbound sk_lookup link {} is detached from the pod's netns: inbound is not captured",
            link.id.unwrap_or_default()
        )),
        (None, Some(ino)) if pod.netns_inode != 0 && ino != pod.netns_inode => {
            problems.push(format!(
                "inbound sk_lookup link {} is attached to netns inode {ino}, not the pod's {}",
                link.id.unwrap_or_default(),
                pod.netns_inode
            ))
        }
        _ => {}
    }
    if problems.is_empty() {
        Check::new(
            "kernel maps",
            Verdict::Ok,
            format!(
                "cookie {} in ENROLLED_PODS; {} in POD_ADDRS; inbound sk_lookup link {} on the pod's netns",
                pod.netns_cookie,
                pod.map_addresses.len(),
                link.id.unwrap_or_default()
            ),
        )
    } else {
        Check::new(
            "kernel maps",
            Verdict::Fail,
            format!(
                "{}; re-enroll the pod (istio-cni re-adds it when the agent restarts)",
                problems.join("; ")
            ),
        )
    }
}

fn listener_check(pod: &PodEvidence) -> Check {
    if let Some(err) = &pod.listener_check_error {
        return Check::new(
            "listeners",
            Verdict::Fail,
            format!("cannot read the pod's socket table ({err}): has its network namespace gone?"),
        );
    }
    let mut problems: Vec<String> = pod
        .listeners
        .iter()
        .filter(|l| !l.listening)
        .map(|l| format!("{} is not listening in the pod's network namespace", l.addr))
        .collect();
    let needs_v6 = pod.ips.iter().any(IpAddr::is_ipv6);
    for family in ["ipv4", "ipv6"] {
        if (family == "ipv4" || needs_v6) && !pod.map_listener_families.iter().any(|f| f == family)
        {
            problems.push(format!(
                "no {family} 15006 listener in INBOUND_LISTENERS (inbound is dropped)"
            ));
        }
    }
    let all: Vec<String> = pod.listeners.iter().map(|l| l.addr.to_string()).collect();
    if problems.is_empty() {
        Check::new(
            "listeners",
            Verdict::Ok,
            format!(
                "{} listening in the pod's netns; 15006 registered for inbound",
                all.join(", ")
            ),
        )
    } else {
        Check::new(
            "listeners",
            Verdict::Fail,
            format!(
                "{}; the pod's traffic is refused or dropped: restart the agent (istio-cni re-adds the pod)",
                problems.join("; ")
            ),
        )
    }
}

fn capture_check(pod: &PodEvidence, window_ms: u64) -> Check {
    let delta = |k: &str| -> u64 {
        let after = pod.counters_after.get(k).copied().unwrap_or_default();
        let before = pod.counters_before.get(k).copied().unwrap_or_default();
        after.saturating_sub(before)
    };
    let total = |k: &str| pod.counters_after.get(k).copied().unwrap_or_default();
    let moved: Vec<String> = pod
        .counters_after
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| {
            let d = delta(k);
            if d > 0 {
                format!("{k}={v} (+{d})")
            } else {
                format!("{k}={v}")
            }
        })
        .collect();
    // Inbound HBONE is not steered: it arrives on 15008 directly (`skipped_hbone_port`).
    let captured = [
        "outbound_captured",
        "inbound_captured",
        "skipped_hbone_port",
    ];
    let captured_now: u64 = captured.iter().map(|k| delta(k)).sum();
    let dropped_now = [
        "dropped_no_listener",
        "refused_map_full",
        "refused_no_pod_address",
        "orig_dst_lost",
    ]
    .iter()
    .map(|k| delta(k))
    .sum::<u64>();
    let window = format!("{}s", window_ms as f64 / 1000.0);
    let mut check = if dropped_now > 0 {
        Check::new(
            "capture",
            Verdict::Fail,
            format!("{dropped_now} connections dropped or refused by the kernel programs in the last {window}"),
        )
    } else if captured_now > 0 {
        Check::new(
            "capture",
            Verdict::Ok,
            format!("moving: {captured_now} connections captured in the last {window}"),
        )
    } else if captured.iter().any(|k| total(k) > 0) {
        Check::new(
            "capture",
            Verdict::Ok,
            format!(
                "since enrollment: {} outbound and {} inbound plaintext captured, {} inbound HBONE; none in the last {window} (idle?)",
                total("outbound_captured"),
                total("inbound_captured"),
                total("skipped_hbone_port")
            ),
        )
    } else {
        Check::new(
            "capture",
            Verdict::Ok,
            "nothing captured since enrollment: no traffic yet (send some and run again)",
        )
    };
    if !moved.is_empty() {
        check = check.with(moved.join(" "));
    }
    check
}

fn cert_check(e: &Evidence, identity: &str) -> Check {
    match e.certificates.iter().find(|c| c.identity == identity) {
        Some(c) if c.state == "Available" => Check::new(
            "certificate",
            Verdict::Ok,
            format!(
                "{identity} Available, expires {}",
                c.not_after.map(rfc3339).unwrap_or_default()
            ),
        ),
        Some(c) => Check::new(
            "certificate",
            Verdict::Fail,
            format!(
                "{identity} {}: HBONE to and from this pod fails until the CA issues it",
                c.state
            ),
        ),
        None => Check::new(
            "certificate",
            Verdict::Fail,
            format!("no certificate was requested for {identity}: the agent requests it when the pod is enrolled; check the agent log for `certificate request failed`"),
        ),
    }
}

fn recent_check(pod: &PodEvidence) -> Check {
    let line = |o: &Outcome| -> String {
        let mut s = format!(
            "{} {} {} -> {}",
            rfc3339(o.at),
            o.direction.as_str(),
            o.src,
            o.dst
        );
        if let Some(id) = &o.peer_identity {
            let _ = write!(s, " peer {id}");
        }
        match &o.error {
            Some(err) => {
                let _ = write!(s, " error: {err}");
            }
            None => {
                let _ = write!(s, " ok, {}/{} bytes", o.bytes.0, o.bytes.1);
            }
        }
        s
    };
    let shown = pod.recent.len();
    let failed_shown = pod.recent.iter().filter(|o| o.error.is_some()).count();
    let mut check = if pod.recent.is_empty() && pod.recent_failed.is_empty() {
        Check::new(
            "connections",
            Verdict::Ok,
            "no completed connections recorded",
        )
    } else if pod.recent_failed.is_empty() {
        Check::new(
            "connections",
            Verdict::Ok,
            format!("last {shown} completed without error"),
        )
    } else {
        let last = pod
            .recent_failed
            .last()
            .and_then(|o| o.error.clone())
            .unwrap_or_default();
        Check::new(
            "connections",
            Verdict::Warn,
            format!(
                "{failed_shown} of the last {shown} failed; {} recent failures, the latest: {last}",
                pod.recent_failed.len()
            ),
        )
    };
    for o in &pod.recent {
        check = check.with(line(o));
    }
    for o in pod
        .recent_failed
        .iter()
        .filter(|f| !pod.recent.iter().any(|r| r.at == f.at && r.src == f.src))
    {
        check = check.with(line(o));
    }
    check
}

/// The node summary: the agent, programs, control plane and certificates, then one row per pod.
pub fn node_report(e: &Evidence) -> Report {
    let mut checks = vec![agent_check(e), programs_check(e), config_check(e)];
    let bad_certs: Vec<&CertEvidence> = e
        .certificates
        .iter()
        .filter(|c| c.state != "Available")
        .collect();
    checks.push(if bad_certs.is_empty() {
        Check::new(
            "certificates",
            Verdict::Ok,
            format!("{} identities, all Available", e.certificates.len()),
        )
    } else {
        Check::new(
            "certificates",
            Verdict::Fail,
            format!(
                "{} of {} not available: {}",
                bad_certs.len(),
                e.certificates.len(),
                bad_certs
                    .iter()
                    .map(|c| format!("{} {}", c.identity, c.state))
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        )
    });
    let mut rows = vec![vec![
        "NAMESPACE".to_string(),
        "POD".into(),
        "IP".into(),
        "NETNS COOKIE".into(),
        "CAPTURED OUT/IN/HBONE".into(),
        "FAILED".into(),
        "STATUS".into(),
    ]];
    let mut first_bad: Option<String> = None;
    for pod in &e.pods {
        let mut checks = pod_checks(e, pod).to_vec();
        checks.push(recent_check(pod));
        let status = match checks.iter().find(|c| c.verdict == Verdict::Fail) {
            Some(c) => {
                if first_bad.is_none() {
                    first_bad = Some(format!(
                        "{}/{}: {}: {}",
                        pod.namespace, pod.name, c.name, c.summary
                    ));
                }
                format!("FAIL {}", c.name)
            }
            None => "ok".to_string(),
        };
        let count = |k: &str| pod.counters_after.get(k).copied().unwrap_or_default();
        rows.push(vec![
            pod.namespace.clone(),
            pod.name.clone(),
            pod.ips
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
            pod.netns_cookie.to_string(),
            format!(
                "{}/{}/{}",
                count("outbound_captured"),
                count("inbound_captured"),
                count("skipped_hbone_port")
            ),
            pod.recent_failed.len().to_string(),
            status,
        ]);
    }
    if !e.parked.is_empty() {
        checks.push(Check::new(
            "parked",
            Verdict::Warn,
            format!(
                "{}: workload removed from xDS, out of capture until it returns",
                e.parked.join(", ")
            ),
        ));
    }
    checks.push(match first_bad {
        None => Check::new(
            "pods",
            Verdict::Ok,
            format!("{} enrolled, all healthy", e.pods.len()),
        ),
        Some(bad) => Check::new("pods", Verdict::Fail, bad),
    });
    Report {
        subject: format!("node {}", e.node.as_deref().unwrap_or("(no node name)")),
        checks,
        table: Some(crate::ztunnel_config::table(&rows)),
    }
}

/// Gathers the evidence (agent side): everything but the counters at once, then the counters
/// again after `window`, without holding the enrollment lock while waiting.
pub async fn collect(
    ctx: &crate::admin::AdminContext,
    query: Option<(String, String)>,
    window: Duration,
) -> Evidence {
    use std::os::unix::fs::MetadataExt;
    let only = query
        .as_ref()
        .map(|(ns, name)| (ns.as_str(), name.as_str()));
    let (mut pods, links, config, certs, state, parked) = {
        let enrollment = ctx.enrollment.lock().await;
        let redirect = enrollment.redirect();
        let links: Vec<LinkEvidence> = redirect
            .cgroup_links()
            .iter()
            .map(|(name, read)| LinkEvidence::from_read(name, read))
            .collect();
        (
            enrollment.evidence(only),
            links,
            redirect.config().clone(),
            enrollment.mesh().certs.all(),
            enrollment.mesh().state.snapshot(),
            enrollment.parked(),
        )
    };
    tokio::time::sleep(window).await;
    {
        let enrollment = ctx.enrollment.lock().await;
        for pod in &mut pods {
            pod.counters_after = counter_map(&enrollment.counters(pod.netns_cookie));
        }
    }
    let query = query.map(|(namespace, name)| {
        // No uid here: the operator names the pod.
        let workload = state
            .pod_workload("", &namespace, &name)
            .map(|w| WorkloadEvidence {
                uid: w.key(),
                node: w.node.clone(),
                protocol: format!("{:?}", w.protocol),
                ips: w.workload_ips.clone(),
            });
        QueryEvidence {
            namespace,
            name,
            workload,
        }
    });
    Evidence {
        version: env!("CARGO_PKG_VERSION").to_string(),
        node: ctx.node.clone(),
        not_ready: ctx
            .readiness
            .pending()
            .into_iter()
            .map(String::from)
            .collect(),
        pin_dir: config.pin_dir.display().to_string(),
        cgroup: config.cgroup.display().to_string(),
        cgroup_id: std::fs::metadata(&config.cgroup).ok().map(|m| m.ino()),
        links,
        config_source: ctx.config_source.clone(),
        xds: ctx
            .xds
            .as_ref()
            .map(crate::xds::client::XdsStatusHandle::get),
        certificates: certs
            .into_iter()
            .map(|(identity, state, cert)| CertEvidence {
                identity: identity.to_string(),
                state: state.to_string(),
                not_after: cert.map(|c| c.not_after),
            })
            .collect(),
        window_ms: u64::try_from(window.as_millis()).unwrap_or(u64::MAX),
        pods,
        query,
        parked,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn healthy() -> Evidence {
        let link = |name: &str| LinkEvidence {
            name: name.into(),
            id: Some(10),
            program_id: Some(20),
            attached_to: Some(1),
            error: None,
        };
        let counters: BTreeMap<String, u64> = counter_map(&ztunnel_common::PodCounters::default());
        Evidence {
            version: "0.1.0".into(),
            node: Some("node".into()),
            cgroup: "/sys/fs/cgroup".into(),
            cgroup_id: Some(1),
            links: vec![link("ztunnel_connect4"), link("ztunnel_sockops")],
            config_source: "local config".into(),
            certificates: vec![CertEvidence {
                identity: "spiffe://cluster.local/ns/default/sa/app".into(),
                state: "Available".into(),
                not_after: None,
            }],
            window_ms: 1000,
            pods: vec![PodEvidence {
                namespace: "default".into(),
                name: "app".into(),
                ips: vec!["10.0.0.5".parse().expect("ip")],
                netns_cookie: 7,
                netns_inode: 99,
                identity: "spiffe://cluster.local/ns/default/sa/app".into(),
                workload_known: true,
                map_enrolled: true,
                map_addresses: vec![("10.0.0.5".parse().expect("ip"), Some(7))],
                map_listener_families: vec!["ipv4".into()],
                inbound_link: LinkEvidence {
                    attached_to: Some(99),
                    ..link("inbound-7")
                },
                listeners: vec![ListenerEvidence {
                    addr: "0.0.0.0:15006".parse().expect("addr"),
                    listening: true,
                }],
                counters_before: counters.clone(),
                counters_after: counters,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn first(e: &Evidence) -> Option<(&'static str, String)> {
        pod_report(e, "default", "app")
            .first_failure()
            .map(|c| (c.name, c.summary.clone()))
    }

    #[test]
    fn a_healthy_pod_has_no_broken_link() {
        assert_eq!(first(&healthy()), None);
        assert!(node_report(&healthy()).first_failure().is_none());
    }

    #[test]
    fn the_node_view_names_an_agent_wide_failure_once_not_per_pod() {
        let mut e = healthy();
        e.links[1].attached_to = Some(0);
        let report = node_report(&e);
        let failed: Vec<&str> = report
            .checks
            .iter()
            .filter(|c| c.verdict == Verdict::Fail)
            .map(|c| c.name)
            .collect();
        assert_eq!(failed, ["programs"], "the pods themselves are healthy");
        let table = report.table.expect("pod table");
        let rows: Vec<&str> = table.lines().skip(1).collect();
        assert!(!rows.is_empty(), "{table}");
        assert!(
            rows.iter().all(|r| r.trim_end().ends_with("ok")),
            "each healthy pod's row reads ok: {table}"
        );
    }

    #[test]
    fn a_detached_or_foreign_program_link_is_named() {
        let mut e = healthy();
        e.links[1].attached_to = Some(0);
        let (name, why) = first(&e).expect("broken");
        assert_eq!(name, "programs");
        assert!(why.contains("ztunnel_sockops link 10 is detached"), "{why}");
        let mut e = healthy();
        e.links[0].attached_to = Some(5);
        let (_, why) = first(&e).expect("broken");
        assert!(
            why.contains("attached to cgroup id 5, not /sys/fs/cgroup"),
            "{why}"
        );
    }

    #[test]
    fn kernel_map_problems_are_named() {
        let mut e = healthy();
        e.pods[0].map_enrolled = false;
        e.pods[0].map_addresses[0].1 = Some(8);
        let (name, why) = first(&e).expect("broken");
        assert_eq!(name, "kernel maps");
        assert!(why.contains("missing from ENROLLED_PODS"), "{why}");
        assert!(why.contains("10.0.0.5 to another netns cookie 8"), "{why}");
        let mut e = healthy();
        e.pods[0].inbound_link.attached_to = Some(100);
        let (_, why) = first(&e).expect("broken");
        assert!(why.contains("netns inode 100, not the pod's 99"), "{why}");
    }

    #[test]
    fn kernel_drops_in_the_window_fail_capture() {
        let mut e = healthy();
        e.pods[0]
            .counters_after
            .insert("dropped_no_listener".into(), 2);
        let (name, why) = first(&e).expect("broken");
        assert_eq!(name, "capture");
        assert!(why.starts_with("2 connections dropped"), "{why}");
    }

    #[test]
    fn xds_not_synced_fails_and_a_nack_warns() {
        let mut e = healthy();
        e.xds = Some(XdsStatus {
            address: "istiod:15012".into(),
            ..Default::default()
        });
        let (name, why) = first(&e).expect("broken");
        assert_eq!(name, "control plane");
        assert!(why.contains("istiod:15012 has not synced"), "{why}");
        let x = e.xds.as_mut().expect("xds");
        x.connected = true;
        x.synced_types = crate::xds::client::TYPES
            .iter()
            .map(|t| t.to_string())
            .collect();
        x.last_nack = Some("Address: w1: bad ip".into());
        assert_eq!(first(&e), None);
        let report = pod_report(&e, "default", "app");
        let cp = report
            .checks
            .iter()
            .find(|c| c.name == "control plane")
            .expect("check");
        assert_eq!(cp.verdict, Verdict::Warn);
        assert!(cp.evidence.iter().any(|l| l.contains("w1: bad ip")));
    }
}
