//! The CLI's side of `diagnose`: the checks that walk the capture chain over the
//! [`Evidence`], in order, naming the first broken link, and their rendering.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::time::SystemTime;

use super::evidence::*;
use crate::accesslog::Outcome;

/// How one link of the chain stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
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
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Check {
    /// Which link.
    pub name: String,
    /// How it stands.
    pub verdict: Verdict,
    /// One line.
    pub summary: String,
    /// Supporting lines.
    pub evidence: Vec<String>,
}

impl Check {
    /// A link and how it stands.
    pub fn new(name: &str, verdict: Verdict, summary: impl Into<String>) -> Self {
        Self {
            name: name.to_string(),
            verdict,
            summary: summary.into(),
            evidence: Vec::new(),
        }
    }

    /// Adds a line of evidence.
    pub fn with(mut self, line: impl Into<String>) -> Self {
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
        out.push_str(&render_checks(&self.checks));
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

/// The checks as printed, one line each with their evidence indented below.
pub fn render_checks(checks: &[Check]) -> String {
    let mut out = String::new();
    for c in checks {
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
    out
}

/// A time as RFC 3339 UTC.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    crate::telemetry::rfc3339(secs)
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
    checks.push(dns_check(pod));
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

/// DNS capture: on or off, and the kernel's DNS counters.
fn dns_check(pod: &PodEvidence) -> Check {
    let counters: Vec<String> = pod
        .dns_counters
        .iter()
        .filter(|(_, v)| **v > 0)
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let counters = if counters.is_empty() {
        "no DNS seen yet".to_string()
    } else {
        counters.join(" ")
    };
    if pod.dns_capture {
        Check::new(
            "dns",
            Verdict::Ok,
            format!(
                "captured: port 53 goes to the agent's DNS proxy on 127.0.0.1:{}; {counters}",
                ztunnel_common::DNS_PROXY_PORT
            ),
        )
    } else {
        Check::new(
            "dns",
            Verdict::Ok,
            format!("not captured (DNS_CAPTURE off, or the proxy's listeners could not be opened): the pod's resolver is asked directly; {counters}"),
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
        table: Some(crate::text_table::table(&rows)),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::xds::client::XdsStatus;

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

    fn first(e: &Evidence) -> Option<(String, String)> {
        pod_report(e, "default", "app")
            .first_failure()
            .map(|c| (c.name.clone(), c.summary.clone()))
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
            .map(|c| c.name.as_str())
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
