//! L4 authorization, Istio's semantics: policies apply to a workload by scope (Global, its
//! Namespace, or WorkloadSelector through the workload's `authorizationPolicies`). DENY
//! policies are checked first (any match denies); then, if any ALLOW policy applies, one must
//! match. Rules are OR'd, a rule's clauses AND'd, a clause's matches OR'd; in a match every
//! populated field must hold (a positive list: one entry hits; a `not` list: none does).
//! Dry-run policies are evaluated and logged, never enforced.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::identity::Identity;
use crate::state::policy::{Action, Authorization, RbacMatch, Scope, StringMatch};
use crate::state::workload::Workload;
use crate::state::MeshState;

/// What a connection looks like to policy.
#[derive(Clone, Debug)]
pub struct Connection<'a> {
    /// Source address.
    pub src: IpAddr,
    /// The peer's verified identity (none for plaintext).
    pub identity: Option<&'a Identity>,
    /// Destination address and port.
    pub dst: SocketAddr,
}

/// A refused connection, named for the access log.
#[derive(Debug, thiserror::Error)]
pub enum Denied {
    /// A DENY policy matched.
    #[error("connection closed due to policy rejection: {0}")]
    Explicit(String),
    /// ALLOW policies apply and none matched.
    #[error("connection closed due to policy rejection: allow policies exist, but none allowed")]
    NotAllowed,
}

fn applies(policy: &Authorization, workload: &Workload) -> bool {
    match policy.scope {
        Scope::Global => true,
        Scope::Namespace => policy.namespace == workload.namespace,
        Scope::WorkloadSelector => workload.authorization_policies.contains(&policy.key()),
    }
}

fn string_hits(m: &StringMatch, value: Option<&str>) -> bool {
    let Some(v) = value else { return false };
    match m {
        StringMatch::Exact(s) => v == s,
        StringMatch::Prefix(s) => v.starts_with(s.as_str()),
        StringMatch::Suffix(s) => v.ends_with(s.as_str()),
        StringMatch::Presence(_) => !v.is_empty(),
    }
}

/// Whether `ip` is in `cidr` (`a.b.c.d/n`, `x::/n`, or a bare address). An unparsable entry
/// never matches (files with one are refused at load time).
fn cidr_hits(cidr: &str, ip: IpAddr) -> bool {
    let (addr, len) = match cidr.split_once('/') {
        Some((a, l)) => (a, l.parse::<u32>().ok()),
        None => (cidr, None),
    };
    let Ok(net) = addr.parse::<IpAddr>() else {
        return false;
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let len = len.unwrap_or(32).min(32);
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let len = len.unwrap_or(128).min(128);
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

/// Whether a policy's CIDR entry is usable (checked when a file loads).
pub fn valid_cidr(cidr: &str) -> bool {
    let (addr, len) = match cidr.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (cidr, None),
    };
    match (addr.parse::<IpAddr>(), len.map(str::parse::<u32>)) {
        (Ok(IpAddr::V4(_)), None) | (Ok(IpAddr::V6(_)), None) => true,
        (Ok(IpAddr::V4(_)), Some(Ok(l))) => l <= 32,
        (Ok(IpAddr::V6(_)), Some(Ok(l))) => l <= 128,
        _ => false,
    }
}

/// One positive and one negative list: the positive list (if any) must hit, the negative
/// list must not.
fn field<T>(yes: &[T], no: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (yes.is_empty() || yes.iter().any(&hit)) && !no.iter().any(hit)
}

fn match_holds(m: &RbacMatch, conn: &Connection<'_>) -> bool {
    let namespace = conn.identity.map(|i| i.namespace.as_str());
    // Principals are compared without the scheme: `cluster.local/ns/default/sa/curl`.
    let principal = conn.identity.map(|i| {
        format!(
            "{}/ns/{}/sa/{}",
            i.trust_domain, i.namespace, i.service_account
        )
    });
    let sa_hit = |s: &crate::state::policy::ServiceAccountMatch| {
        conn.identity
            .is_some_and(|i| i.namespace == s.namespace && i.service_account == s.service_account)
    };
    field(&m.namespaces, &m.not_namespaces, |s| {
        string_hits(s, namespace)
    }) && field(&m.principals, &m.not_principals, |s| {
        string_hits(s, principal.as_deref())
    }) && field(&m.service_accounts, &m.not_service_accounts, sa_hit)
        && field(&m.source_ips, &m.not_source_ips, |c| cidr_hits(c, conn.src))
        && field(&m.destination_ips, &m.not_destination_ips, |c| {
            cidr_hits(c, conn.dst.ip())
        })
        && field(&m.destination_ports, &m.not_destination_ports, |p| {
            *p == conn.dst.port()
        })
}

/// The index of the first of `policy`'s rules that matches `conn` (a policy without rules
/// matches nothing).
pub fn matching_rule(policy: &Authorization, conn: &Connection<'_>) -> Option<usize> {
    policy.rules.iter().position(|rule| {
        rule.iter()
            .all(|clause| clause.iter().any(|m| match_holds(m, conn)))
    })
}

/// Whether `policy`'s rules match `conn`.
pub fn matches(policy: &Authorization, conn: &Connection<'_>) -> bool {
    matching_rule(policy, conn).is_some()
}

/// A decision with its reasons, for the proxy (which needs the outcome) and `diagnose flow`
/// (which shows why).
#[derive(Debug)]
pub struct Decision {
    /// Allowed, or why not.
    pub outcome: Result<(), Denied>,
    /// The enforced policy and rule index that decided it (a DENY that matched, or the ALLOW
    /// that allowed); none when no policy applies, or ALLOW policies apply and none matched.
    pub decided_by: Option<(Arc<Authorization>, usize)>,
    /// The enforced policies that apply to the workload.
    pub applicable: Vec<Arc<Authorization>>,
    /// A dry-run DENY policy that would have denied, and its rule.
    pub dry_run_deny: Option<(Arc<Authorization>, usize)>,
    /// Dry-run ALLOW policies exist and none would have allowed.
    pub dry_run_not_allowed: bool,
}

/// Decides a connection to `workload`, with the policy and rule that decided it.
pub fn evaluate(state: &MeshState, workload: &Workload, conn: &Connection<'_>) -> Decision {
    let applicable: Vec<_> = state.policies().filter(|p| applies(p, workload)).collect();
    let mut decision = Decision {
        outcome: Ok(()),
        decided_by: None,
        applicable: applicable
            .iter()
            .filter(|p| !p.dry_run)
            .map(|p| Arc::clone(p))
            .collect(),
        dry_run_deny: None,
        dry_run_not_allowed: false,
    };
    for p in applicable.iter().filter(|p| p.action == Action::Deny) {
        if let Some(rule) = matching_rule(p, conn) {
            if p.dry_run {
                decision.dry_run_deny.get_or_insert((Arc::clone(p), rule));
                continue;
            }
            decision.outcome = Err(Denied::Explicit(p.key()));
            decision.decided_by = Some((Arc::clone(p), rule));
            return decision;
        }
    }
    let allows: Vec<_> = applicable
        .iter()
        .filter(|p| p.action == Action::Allow)
        .collect();
    decision.dry_run_not_allowed =
        allows.iter().any(|p| p.dry_run) && !allows.iter().any(|p| p.dry_run && matches(p, conn));
    let enforced: Vec<_> = allows.iter().filter(|p| !p.dry_run).collect();
    if enforced.is_empty() {
        return decision;
    }
    match enforced
        .iter()
        .find_map(|p| matching_rule(p, conn).map(|rule| (Arc::clone(p), rule)))
    {
        Some(allowed_by) => decision.decided_by = Some(allowed_by),
        None => decision.outcome = Err(Denied::NotAllowed),
    }
    decision
}

/// Decides a connection to `workload`. Dry-run policies that would have changed the outcome
/// are logged.
pub fn check(state: &MeshState, workload: &Workload, conn: &Connection<'_>) -> Result<(), Denied> {
    let decision = evaluate(state, workload, conn);
    if let Some((policy, _)) = &decision.dry_run_deny {
        tracing::info!(policy = %policy.key(), dst.addr = %conn.dst, "dry-run policy would deny this connection");
    }
    if decision.dry_run_not_allowed {
        tracing::info!(dst.addr = %conn.dst, "dry-run allow policies would not allow this connection");
    }
    decision.outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml: &str) -> Authorization {
        serde_yaml_ng::from_str(yaml).expect("valid policy")
    }

    fn workload(ns: &str) -> Workload {
        Workload {
            name: "productpage".into(),
            namespace: ns.into(),
            workload_ips: vec!["10.244.1.10".parse().expect("ip")],
            ..Default::default()
        }
    }

    fn id(ns: &str, sa: &str) -> Identity {
        format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
            .parse()
            .expect("id")
    }

    fn decide(policies: &[&str], identity: Option<&Identity>, port: u16) -> Result<(), String> {
        let state = MeshState::build(vec![], vec![], policies.iter().map(|p| policy(p)).collect())
            .expect("state");
        let conn = Connection {
            src: "10.244.2.7".parse().expect("ip"),
            identity,
            dst: SocketAddr::new("10.244.1.10".parse().expect("ip"), port),
        };
        check(&state, &workload("default"), &conn).map_err(|e| e.to_string())
    }

    const ALLOW_NS_FRONT: &str = "name: allow-front\nnamespace: default\nscope: Namespace\naction: Allow\nrules:\n- - - namespaces: [{Exact: front}]\n";
    const DENY_CURL: &str = "name: deny-curl\nnamespace: default\nscope: Namespace\naction: Deny\nrules:\n- - - principals: [{Exact: cluster.local/ns/front/sa/curl}]\n";
    const DENY_9999: &str = "name: deny-9999\nnamespace: default\nscope: Global\naction: Deny\nrules:\n- - - destinationPorts: [9999]\n";

    #[test]
    fn no_policy_allows() {
        assert_eq!(decide(&[], None, 9080), Ok(()));
    }

    #[test]
    fn allow_by_namespace() {
        assert_eq!(
            decide(&[ALLOW_NS_FRONT], Some(&id("front", "web")), 9080),
            Ok(())
        );
        let err = decide(&[ALLOW_NS_FRONT], Some(&id("back", "web")), 9080).expect_err("denied");
        assert!(
            err.contains("allow policies exist, but none allowed"),
            "{err}"
        );
        // Plaintext has no identity, so a namespace rule cannot allow it.
        assert!(decide(&[ALLOW_NS_FRONT], None, 9080).is_err());
    }

    #[test]
    fn deny_by_principal_wins_over_allow() {
        let err = decide(
            &[ALLOW_NS_FRONT, DENY_CURL],
            Some(&id("front", "curl")),
            9080,
        )
        .expect_err("denied");
        assert_eq!(
            err,
            "connection closed due to policy rejection: default/deny-curl"
        );
        assert_eq!(
            decide(
                &[ALLOW_NS_FRONT, DENY_CURL],
                Some(&id("front", "web")),
                9080
            ),
            Ok(())
        );
    }

    #[test]
    fn deny_by_port_and_negations() {
        assert!(decide(&[DENY_9999], None, 9999).is_err());
        assert_eq!(decide(&[DENY_9999], None, 9080), Ok(()));
        let not_9080 = "name: only-9080\nnamespace: default\nscope: Namespace\naction: Allow\nrules:\n- - - notDestinationPorts: [9080]\n";
        assert!(decide(&[not_9080], None, 9080).is_err());
        assert_eq!(decide(&[not_9080], None, 8080), Ok(()));
    }

    #[test]
    fn clauses_and_matches_combine() {
        // Two clauses (AND): from namespace front AND from 10.244.2.0/24.
        let both = "name: both\nnamespace: default\nscope: Namespace\naction: Allow\nrules:\n- - - namespaces: [{Exact: front}]\n  - - sourceIps: [10.244.2.0/24]\n";
        assert_eq!(decide(&[both], Some(&id("front", "a")), 9080), Ok(()));
        let elsewhere = "name: both\nnamespace: default\nscope: Namespace\naction: Allow\nrules:\n- - - namespaces: [{Exact: front}]\n  - - sourceIps: [10.9.0.0/16]\n";
        assert!(decide(&[elsewhere], Some(&id("front", "a")), 9080).is_err());
        // Two matches in a clause (OR).
        let either = "name: either\nnamespace: default\nscope: Namespace\naction: Allow\nrules:\n- - - namespaces: [{Exact: nope}]\n    - sourceIps: [10.244.2.7]\n";
        assert_eq!(decide(&[either], None, 9080), Ok(()));
    }

    #[test]
    fn dry_run_only_logs_and_other_scopes_do_not_apply() {
        let dry = "name: dry\nnamespace: default\nscope: Namespace\naction: Deny\ndryRun: true\nrules:\n- - - destinationPorts: [9080]\n";
        assert_eq!(decide(&[dry], None, 9080), Ok(()));
        let other_ns = "name: other\nnamespace: kube-system\nscope: Namespace\naction: Deny\nrules:\n- - - destinationPorts: [9080]\n";
        assert_eq!(decide(&[other_ns], None, 9080), Ok(()));
        let selector = "name: sel\nnamespace: default\nscope: WorkloadSelector\naction: Deny\nrules:\n- - - destinationPorts: [9080]\n";
        assert_eq!(
            decide(&[selector], None, 9080),
            Ok(()),
            "not selected by the workload"
        );
    }

    #[test]
    fn the_deciding_policy_and_rule_are_named() {
        let state = MeshState::build(
            vec![],
            vec![],
            vec![
                policy(ALLOW_NS_FRONT),
                policy(DENY_CURL),
                policy("name: two-rules\nnamespace: default\nscope: Namespace\naction: Allow\nrules:\n- - - namespaces: [{Exact: nope}]\n- - - namespaces: [{Exact: back}]\n"),
            ],
        )
        .expect("state");
        let decide = |identity: &Identity| {
            let conn = Connection {
                src: "10.244.2.7".parse().expect("ip"),
                identity: Some(identity),
                dst: "10.244.1.10:9080".parse().expect("addr"),
            };
            let d = evaluate(&state, &workload("default"), &conn);
            (
                d.outcome.is_ok(),
                d.decided_by.map(|(p, rule)| (p.key(), rule)),
                d.applicable.len(),
            )
        };
        assert_eq!(
            decide(&id("front", "curl")),
            (false, Some(("default/deny-curl".to_string(), 0)), 3)
        );
        assert_eq!(
            decide(&id("front", "web")),
            (true, Some(("default/allow-front".to_string(), 0)), 3)
        );
        assert_eq!(
            decide(&id("back", "web")),
            (true, Some(("default/two-rules".to_string(), 1)), 3)
        );
        assert_eq!(decide(&id("elsewhere", "web")), (false, None, 3));
    }

    #[test]
    fn cidrs() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        assert!(cidr_hits("10.244.0.0/16", ip("10.244.2.7")));
        assert!(!cidr_hits("10.244.0.0/16", ip("10.245.0.1")));
        assert!(cidr_hits("0.0.0.0/0", ip("1.2.3.4")));
        assert!(cidr_hits("fd00::/64", ip("fd00::a")));
        assert!(!cidr_hits("fd00::/64", ip("10.244.2.7")));
        assert!(cidr_hits("10.244.2.7", ip("10.244.2.7")));
    }
}
