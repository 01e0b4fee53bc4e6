//! Answers for mesh names, from the mesh state, with upstream ztunnel's semantics (its
//! src/dns/server.rs, read for facts): names are matched lowercase; besides the name asked,
//! its Kubernetes expansions and the name with the asking pod's search domains stripped
//! (`<ns>.svc.cluster.local`, `svc.cluster.local`, `cluster.local`) are tried, and a match
//! under another name is answered with a CNAME to it; `*.` wildcard hostnames match;
//! only A and AAAA are answered here (anything else is forwarded); a mesh name with no
//! address of the asked family on the pod's network gets an empty NOERROR answer (NODATA),
//! never NXDOMAIN; answers are authoritative, with recursion available and a 30 s TTL.

use std::net::IpAddr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use crate::state::{MeshState, DNS_DOMAIN};

/// TTL of local answers (upstream's).
pub const TTL: u32 = 30;

/// Who is asking.
#[derive(Clone, Copy, Debug)]
pub struct Client<'a> {
    /// The pod's namespace (its search domains).
    pub namespace: &'a str,
    /// The pod's network (VIPs of other networks are not answered).
    pub network: &'a str,
}

/// The search domains kubelet gives a pod in `namespace`.
fn search_domains(namespace: &str) -> [String; 3] {
    [
        format!("{namespace}.svc.{DNS_DOMAIN}"),
        format!("svc.{DNS_DOMAIN}"),
        DNS_DOMAIN.to_string(),
    ]
}

/// The Kubernetes forms a short name may stand for, seen from `namespace`.
fn expansions(name: &str, namespace: &str) -> Vec<String> {
    let labels: Vec<&str> = name.split('.').collect();
    match labels.len() {
        1 => vec![format!("{name}.{namespace}.svc.{DNS_DOMAIN}")],
        2 => vec![
            format!("{name}.svc.{DNS_DOMAIN}"),
            format!("{name}.{namespace}.svc.{DNS_DOMAIN}"),
        ],
        3 | 4 if labels.last() == Some(&"svc") => vec![format!("{name}.{DNS_DOMAIN}")],
        _ => Vec::new(),
    }
}

/// The names tried for `name`, in order.
fn aliases(name: &str, namespace: &str) -> Vec<String> {
    let mut out = vec![name.to_string()];
    out.extend(expansions(name, namespace));
    for domain in search_domains(namespace) {
        if let Some(stripped) = name.strip_suffix(&format!(".{domain}")) {
            out.push(stripped.to_string());
            out.extend(expansions(stripped, namespace));
        }
    }
    let mut seen = std::collections::HashSet::new();
    out.retain(|n| seen.insert(n.clone()));
    out
}

/// `*.rest` for each parent of `name`, nearest first.
fn wildcards(name: &str) -> Vec<String> {
    let labels: Vec<&str> = name.split('.').collect();
    (1..labels.len())
        .map(|i| format!("*.{}", labels[i..].join(".")))
        .collect()
}

/// A mesh name found for a question: the name to answer under (a CNAME target when it is
/// not the name asked) and the addresses of the asked family on the client's network.
#[derive(Debug, PartialEq)]
pub struct Found {
    /// The mesh hostname that matched (None: a wildcard matched; answer under the name asked).
    pub canonical: Option<String>,
    /// Addresses to answer with.
    pub addresses: Vec<IpAddr>,
}

/// Looks `name` (lowercase, no trailing dot) up for `client`; `None` when it is not a mesh
/// name (forward it).
pub fn find(state: &MeshState, client: Client<'_>, name: &str, v6: bool) -> Option<Found> {
    let candidates = aliases(name, client.namespace);
    let (canonical, resolved) = candidates
        .iter()
        .find_map(|alias| {
            state
                .find_hostname(client.namespace, alias)
                .map(|r| (Some(alias.clone()), r))
        })
        .or_else(|| {
            candidates.iter().find_map(|alias| {
                wildcards(alias)
                    .iter()
                    .find_map(|w| state.find_hostname(client.namespace, w))
                    .map(|r| (None, r))
            })
        })?;
    let addresses = resolved
        .addresses
        .iter()
        .filter(|a| a.network == client.network)
        .map(|a| a.address.to_canonical())
        .filter(|ip| ip.is_ipv6() == v6)
        .collect();
    Some(Found {
        canonical: canonical.filter(|c| c != name),
        addresses,
    })
}

/// The local answer to `request` (one question), or `None` to forward it.
pub fn answer(state: &MeshState, client: Client<'_>, request: &Message) -> Option<Message> {
    let query = request.queries.first()?;
    let v6 = match query.query_type() {
        RecordType::A => false,
        RecordType::AAAA => true,
        _ => return None,
    };
    let asked = query.name().to_lowercase();
    let text = asked.to_ascii();
    let text = text.trim_end_matches('.');
    let found = find(state, client, text, v6)?;
    let mut response = Message::new(request.metadata.id, MessageType::Response, OpCode::Query);
    response.metadata.authoritative = true;
    response.metadata.recursion_desired = request.metadata.recursion_desired;
    response.metadata.recursion_available = true;
    response.metadata.response_code = ResponseCode::NoError;
    response.add_query(query.clone());
    if let Some(edns) = &request.edns {
        let mut ours = hickory_proto::op::Edns::new();
        ours.set_max_payload(edns.max_payload().max(512));
        response.set_edns(ours);
    }
    let mut owner = asked.clone();
    if let Some(canonical) = &found.canonical {
        if let Ok(target) = Name::from_ascii(format!("{canonical}.")) {
            response.add_answer(Record::from_rdata(
                asked.clone(),
                TTL,
                RData::CNAME(CNAME(target.clone())),
            ));
            owner = target;
        }
    }
    for ip in found.addresses {
        let rdata = match ip {
            IpAddr::V4(v4) => RData::A(A(v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
        };
        response.add_answer(Record::from_rdata(owner.clone(), TTL, rdata));
    }
    Some(response)
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;

    use super::*;

    const MESH: &str = r#"
workloads:
- {uid: r1, name: reviews-v1, namespace: default, protocol: HBONE, workloadIps: [10.0.0.11],
   services: {"default/reviews.default.svc.cluster.local": {9080: 9080}}}
- {uid: h1, name: db-0, namespace: default, protocol: HBONE, workloadIps: [10.0.0.21, "fd00::21"],
   hostname: db-0.db.default.svc.cluster.local,
   services: {"default/db.default.svc.cluster.local": {5432: 5432}}}
services:
- {name: reviews, namespace: default, hostname: reviews.default.svc.cluster.local,
   vips: ["/10.96.0.10"], ports: {9080: 9080}}
- {name: reviews, namespace: other, hostname: reviews.other.svc.cluster.local,
   vips: ["/10.96.1.10", "/fd00:96::110"], ports: {9080: 9080}}
- {name: db, namespace: default, hostname: db.default.svc.cluster.local, vips: [], ports: {5432: 5432}}
- {name: api, namespace: default, hostname: api.example.com, vips: ["/240.240.0.1"], ports: {443: 443}}
- {name: wild, namespace: default, hostname: "*.wild.example.com", vips: ["/240.240.0.2"], ports: {443: 443}}
- {name: novip, namespace: default, hostname: novip.example.com, vips: [], ports: {443: 443}}
"#;

    fn mesh() -> MeshState {
        crate::xds::local::load_state(std::path::Path::new("dns.yaml"), MESH)
            .expect("the DNS mesh parses")
            .0
    }

    /// The answer to `name` `qtype` from a pod in `namespace`, in one line.
    fn ask(state: &MeshState, namespace: &str, name: &str, qtype: RecordType) -> String {
        let mut request = Message::new(7, MessageType::Query, OpCode::Query);
        request.metadata.recursion_desired = true;
        request.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
        let client = Client {
            namespace,
            network: "",
        };
        match answer(state, client, &request) {
            None => "forward".to_string(),
            Some(r) => {
                assert_eq!(r.metadata.id, 7);
                assert!(r.metadata.authoritative && r.metadata.recursion_available);
                let records: Vec<String> = r
                    .answers
                    .iter()
                    .map(|a| format!("{} {}", a.name, a.data))
                    .collect();
                format!("{} [{}]", r.metadata.response_code, records.join(", "))
            }
        }
    }

    #[test]
    fn mesh_names_are_answered_as_upstream_answers_them() {
        let state = mesh();
        let cases: &[(&str, &str, RecordType, &str)] = &[
            // The full name, any case, with or without the trailing dot.
            ("default", "reviews.default.svc.cluster.local.", RecordType::A, "No Error [reviews.default.svc.cluster.local. 10.96.0.10]"),
            ("default", "Reviews.Default.SVC.cluster.local.", RecordType::A, "No Error [reviews.default.svc.cluster.local. 10.96.0.10]"),
            // The short and namespace-qualified names, as sent by a resolver that tried them
            // as they are: a CNAME to the full name.
            ("default", "reviews.", RecordType::A, "No Error [reviews. reviews.default.svc.cluster.local., reviews.default.svc.cluster.local. 10.96.0.10]"),
            ("other", "reviews.", RecordType::A, "No Error [reviews. reviews.other.svc.cluster.local., reviews.other.svc.cluster.local. 10.96.1.10]"),
            ("default", "reviews.other.", RecordType::A, "No Error [reviews.other. reviews.other.svc.cluster.local., reviews.other.svc.cluster.local. 10.96.1.10]"),
            // A search domain appended to a full name is stripped.
            ("default", "reviews.default.svc.cluster.local.default.svc.cluster.local.", RecordType::A, "No Error [reviews.default.svc.cluster.local.default.svc.cluster.local. reviews.default.svc.cluster.local., reviews.default.svc.cluster.local. 10.96.0.10]"),
            // AAAA where the service has only IPv4: NODATA, not NXDOMAIN.
            ("default", "reviews.default.svc.cluster.local.", RecordType::AAAA, "No Error []"),
            ("other", "reviews.other.svc.cluster.local.", RecordType::AAAA, "No Error [reviews.other.svc.cluster.local. fd00:96::110]"),
            // A ServiceEntry host with an auto-allocated VIP, and a wildcard host.
            ("default", "api.example.com.", RecordType::A, "No Error [api.example.com. 240.240.0.1]"),
            ("default", "x.wild.example.com.", RecordType::A, "No Error [x.wild.example.com. 240.240.0.2]"),
            // Headless service: its endpoints; a workload's own hostname.
            ("default", "db.default.svc.cluster.local.", RecordType::A, "No Error [db.default.svc.cluster.local. 10.0.0.21]"),
            ("default", "db-0.db.default.svc.cluster.local.", RecordType::AAAA, "No Error [db-0.db.default.svc.cluster.local. fd00::21]"),
            // Not the mesh's: forwarded (a VIP-less host outside the svc domain too).
            ("default", "example.org.", RecordType::A, "forward"),
            ("default", "novip.example.com.", RecordType::A, "forward"),
            ("default", "ratings.default.svc.cluster.local.", RecordType::A, "forward"),
            // Other record types are forwarded, even for mesh names.
            ("default", "reviews.default.svc.cluster.local.", RecordType::SRV, "forward"),
            ("default", "reviews.default.svc.cluster.local.", RecordType::TXT, "forward"),
        ];
        for (ns, name, qtype, want) in cases {
            assert_eq!(
                ask(&state, ns, name, *qtype),
                *want,
                "{name} {qtype} from {ns}"
            );
        }
    }

    #[test]
    fn another_network_s_vip_is_not_answered() {
        let state = mesh();
        let mut request = Message::new(1, MessageType::Query, OpCode::Query);
        request.add_query(Query::query(
            Name::from_ascii("reviews.default.svc.cluster.local.").expect("name"),
            RecordType::A,
        ));
        let client = Client {
            namespace: "default",
            network: "net-2",
        };
        let r = answer(&state, client, &request).expect("still a mesh name");
        assert!(r.answers.is_empty(), "{r:?}");
    }
}
