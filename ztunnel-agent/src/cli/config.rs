//! `ztunnel-agent config ...` (the CLI subcommand, not the agent's settings): the guide's
//! `istioctl ztunnel-config` without Kubernetes. Reads a config_dump (from a running agent's
//! admin endpoint or a saved file) and prints the same tables istioctl prints, or the sections
//! as JSON/YAML.

use std::net::SocketAddr;
use std::path::Path;
use std::time::SystemTime;

use base64::Engine as _;
use serde_json::Value;

use crate::text_table::table;

/// Failures reading or rendering a dump.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Asking the agent failed.
    #[error(transparent)]
    Agent(#[from] super::admin_client::Error),
    /// The file could not be read.
    #[error("cannot read {path}")]
    File {
        /// Path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a config_dump.
    #[error("{what} is not a config_dump (JSON with workloads, services, ...)")]
    NotADump {
        /// Where it came from.
        what: String,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// JSON, but without any config_dump section.
    #[error("{what} is JSON but not a ztunnel config_dump: it has none of workloads, services, policies, certificates (save it with `curl localhost:15000/config_dump`)")]
    NoSections {
        /// Where it came from.
        what: String,
    },
    /// YAML output failed.
    #[error("cannot render YAML")]
    Yaml(#[source] serde_yaml_ng::Error),
}

/// Which section to show.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// Workloads.
    Workloads,
    /// Services.
    Services,
    /// Authorization policies.
    Policies,
    /// Certificates.
    Certificates,
    /// Live connections.
    Connections,
    /// Everything.
    All,
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Tables.
    Short,
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// Row filters, as istioctl has them.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only this namespace.
    pub namespace: Option<String>,
    /// Only workloads on this node.
    pub node: Option<String>,
    /// Only this workload (pod name).
    pub workload_name: Option<String>,
}

/// Fetches a dump from a running agent.
pub fn fetch(addr: SocketAddr) -> Result<Value, Error> {
    Ok(super::admin_client::fetch_json(addr, "/config_dump")?)
}

/// Reads a saved dump.
pub fn load(path: &Path) -> Result<Value, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::File {
        path: path.display().to_string(),
        source,
    })?;
    let dump: Value = serde_json::from_str(&text).map_err(|source| Error::NotADump {
        what: path.display().to_string(),
        source,
    })?;
    let sections = ["workloads", "services", "policies", "certificates"];
    if !sections.iter().any(|k| dump.get(k).is_some()) {
        return Err(Error::NoSections {
            what: path.display().to_string(),
        });
    }
    Ok(dump)
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

/// The entries of a section: upstream dumps them as an array, older upstream releases as an
/// object keyed by address.
fn items(v: &Value) -> Vec<&Value> {
    match v {
        Value::Object(map) => map.values().collect(),
        other => array(other).iter().collect(),
    }
}

fn keep_namespace(filter: &Filter, ns: &str) -> bool {
    filter.namespace.as_deref().is_none_or(|want| want == ns)
}

/// The waypoint column, as istioctl fills it: the name of the service the waypoint names (by
/// `namespace/hostname` or by one of its VIPs); for a waypoint given by a pod's address, that
/// pod's name; `None` without a waypoint and `NA` for a waypoint the dump does not know.
fn waypoint(v: &Value, dump: &Value) -> String {
    let dest = s(&v["waypoint"]["destination"]);
    if dest.is_empty() {
        return "None".into();
    }
    let services = items(&dump["services"]);
    let by_service = services.iter().find(|svc| {
        format!("{}/{}", s(&svc["namespace"]), s(&svc["hostname"])) == dest
            || array(&svc["vips"]).iter().any(|vip| s(vip) == dest)
    });
    if let Some(svc) = by_service {
        return s(&svc["name"]);
    }
    let ip = dest.rsplit_once('/').map_or(dest.as_str(), |(_, ip)| ip);
    items(&dump["workloads"])
        .into_iter()
        .find(|w| array(&w["workloadIps"]).iter().any(|a| s(a) == ip))
        .map_or_else(|| "NA".to_string(), |w| s(&w["name"]))
}

fn workloads(dump: &Value, filter: &Filter) -> String {
    let mut list: Vec<&Value> = items(&dump["workloads"])
        .into_iter()
        .filter(|w| keep_namespace(filter, &s(&w["namespace"])))
        .filter(|w| filter.node.as_deref().is_none_or(|n| n == s(&w["node"])))
        .filter(|w| {
            filter
                .workload_name
                .as_deref()
                .is_none_or(|n| n == s(&w["name"]))
        })
        .collect();
    list.sort_by_key(|w| (s(&w["namespace"]), s(&w["name"])));
    let mut rows = vec![[
        "NAMESPACE",
        "POD NAME",
        "IP",
        "NODE",
        "WAYPOINT",
        "PROTOCOL",
    ]
    .map(String::from)
    .to_vec()];
    for w in list {
        let ips: Vec<String> = array(&w["workloadIps"]).iter().map(s).collect();
        let ip = if ips.is_empty() {
            s(&w["hostname"])
        } else {
            ips.join(",")
        };
        rows.push(vec![
            s(&w["namespace"]),
            s(&w["name"]),
            ip,
            s(&w["node"]),
            waypoint(w, dump),
            s(&w["protocol"]),
        ]);
    }
    table(&rows)
}

fn services(dump: &Value, filter: &Filter) -> String {
    let mut list: Vec<&Value> = items(&dump["services"])
        .into_iter()
        .filter(|v| keep_namespace(filter, &s(&v["namespace"])))
        .collect();
    list.sort_by_key(|v| (s(&v["namespace"]), s(&v["hostname"])));
    let mut rows = vec![[
        "NAMESPACE",
        "SERVICE NAME",
        "SERVICE VIP",
        "WAYPOINT",
        "ENDPOINTS",
    ]
    .map(String::from)
    .to_vec()];
    for v in list {
        let vips: Vec<String> = array(&v["vips"])
            .iter()
            .map(|vip| {
                let vip = s(vip);
                vip.split_once('/')
                    .map_or(vip.clone(), |(_, ip)| ip.to_string())
            })
            .collect();
        let endpoints = v["endpoints"].as_object();
        let total = endpoints.map_or(0, |e| e.len());
        // Releases before endpoint health had no status: every endpoint was in use.
        let healthy = endpoints.map_or(0, |e| {
            e.values()
                .filter(|ep| ep["status"] == "Healthy" || ep["status"].is_null())
                .count()
        });
        rows.push(vec![
            s(&v["namespace"]),
            s(&v["name"]),
            vips.join(","),
            waypoint(v, dump),
            format!("{healthy}/{total}"),
        ]);
    }
    table(&rows)
}

fn policies(dump: &Value, filter: &Filter) -> String {
    let mut list: Vec<&Value> = items(&dump["policies"])
        .into_iter()
        .filter(|p| keep_namespace(filter, &s(&p["namespace"])))
        .collect();
    list.sort_by_key(|p| (s(&p["namespace"]), s(&p["name"])));
    let mut rows = vec![["NAMESPACE", "POLICY NAME", "ACTION", "SCOPE"]
        .map(String::from)
        .to_vec()];
    for p in list {
        rows.push(vec![
            s(&p["namespace"]),
            s(&p["name"]),
            s(&p["action"]),
            s(&p["scope"]),
        ]);
    }
    table(&rows)
}

/// Serial (lowercase hex) and validity of a dumped certificate, from its PEM (base64 of the
/// PEM text, as upstream dumps it; older releases dumped the PEM text itself).
fn cert_facts(entry: &Value) -> Option<(String, bool)> {
    let text = s(&entry["pem"]);
    let pem = if text.trim_start().starts_with("-----BEGIN") {
        text.into_bytes()
    } else {
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()?
    };
    let (_, block) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
    let cert = block.parse_x509().ok()?;
    let serial: String = cert
        .raw_serial()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let serial = serial.trim_start_matches('0').to_string();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let validity = cert.validity();
    let valid = validity.not_before.timestamp() <= now && now <= validity.not_after.timestamp();
    Some((serial, valid))
}

fn certificates(dump: &Value, filter: &Filter) -> String {
    let mut rows = vec![[
        "CERTIFICATE NAME",
        "TYPE",
        "STATUS",
        "VALID CERT",
        "SERIAL NUMBER",
        "NOT AFTER",
        "NOT BEFORE",
    ]
    .map(String::from)
    .to_vec()];
    for c in array(&dump["certificates"]) {
        let identity = s(&c["identity"]);
        if let Some(ns) = &filter.namespace {
            if !identity.contains(&format!("/ns/{ns}/")) {
                continue;
            }
        }
        let chain = array(&c["certChain"]);
        let roots = array(&c["rootCerts"]);
        // Releases without `rootCerts` ended the chain with the root.
        let root_in_chain = roots.is_empty() && chain.len() > 1;
        let kinds = chain.iter().enumerate().map(|(i, e)| {
            let kind = match i {
                0 => "Leaf",
                i if root_in_chain && i + 1 == chain.len() => "Root",
                _ => "Intermediate",
            };
            (kind, e)
        });
        let roots = roots.iter().map(|e| ("Root", e));
        // The column holds the state's word; the reason (after ':') is in `-o json`.
        let state = s(&c["state"]);
        let state = state.split(':').next().unwrap_or_default().to_string();
        if chain.is_empty() {
            // Nothing issued (yet): one row saying so, as istioctl prints it.
            rows.push(vec![
                identity.clone(),
                "Leaf".into(),
                state.clone(),
                "false".into(),
                "NA".into(),
                "NA".into(),
                "NA".into(),
            ]);
        }
        for (kind, entry) in kinds.chain(roots) {
            let (serial, valid) = cert_facts(entry).unwrap_or_default();
            rows.push(vec![
                identity.clone(),
                kind.to_string(),
                state.clone(),
                valid.to_string(),
                serial,
                s(&entry["expirationTime"]),
                s(&entry["validFrom"]),
            ]);
        }
    }
    table(&rows)
}

fn connections(dump: &Value, filter: &Filter) -> String {
    let mut rows = vec![[
        "WORKLOAD",
        "DIRECTION",
        "LOCAL",
        "REMOTE",
        "REMOTE TARGET",
        "PROTOCOL",
    ]
    .map(String::from)
    .to_vec()];
    if let Some(state) = dump["workloadState"].as_object() {
        for w in state.values() {
            let (name, ns) = (s(&w["info"]["name"]), s(&w["info"]["namespace"]));
            if !keep_namespace(filter, &ns) {
                continue;
            }
            for (direction, list) in [("Inbound", "inbound"), ("Outbound", "outbound")] {
                for c in array(&w["connections"][list]) {
                    rows.push(vec![
                        format!("{name}.{ns}"),
                        direction.to_string(),
                        s(&c["actualDst"]),
                        s(&c["src"]),
                        s(&c["originalDst"]),
                        s(&c["protocol"]),
                    ]);
                }
            }
        }
    }
    table(&rows)
}

/// Renders `section` of `dump` in `output` format.
pub fn render(
    dump: &Value,
    section: Section,
    output: Output,
    filter: &Filter,
) -> Result<String, Error> {
    let key = match section {
        Section::Workloads => "workloads",
        Section::Services => "services",
        Section::Policies => "policies",
        Section::Certificates => "certificates",
        Section::Connections => "workloadState",
        Section::All => "",
    };
    let selected = if key.is_empty() { dump } else { &dump[key] };
    match output {
        Output::Json => Ok(serde_json::to_string_pretty(selected).unwrap_or_default() + "\n"),
        Output::Yaml => serde_yaml_ng::to_string(selected).map_err(Error::Yaml),
        Output::Short => Ok(match section {
            Section::Workloads => workloads(dump, filter),
            Section::Services => services(dump, filter),
            Section::Policies => policies(dump, filter),
            Section::Certificates => certificates(dump, filter),
            Section::Connections => connections(dump, filter),
            Section::All => [
                workloads(dump, filter),
                services(dump, filter),
                policies(dump, filter),
                certificates(dump, filter),
                connections(dump, filter),
            ]
            .join("\n"),
        }),
    }
}

/// Runs `ztunnel-agent config`.
pub fn run(args: &super::ConfigArgs) -> std::process::ExitCode {
    let dump = match &args.file {
        Some(path) => load(path),
        None => fetch(args.admin_address),
    };
    let filter = Filter {
        namespace: args.namespace.clone(),
        node: args.node.clone(),
        workload_name: args.workload_name.clone(),
    };
    match dump.and_then(|d| render(&d, args.section, args.output, &filter)) {
        Ok(text) => {
            print!("{text}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => super::fail(&e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_like_tabwriter() {
        let dump = serde_json::json!({
            "workloads": [
                {"namespace": "default", "name": "productpage-v1", "workloadIps": ["10.244.1.10"], "node": "ambient-worker", "protocol": "HBONE"},
                {"namespace": "default", "name": "curl", "workloadIps": ["10.244.1.12"], "node": "ambient-worker", "protocol": "HBONE",
                 "waypoint": {"destination": "default/waypoint.default.svc.cluster.local", "hboneMtlsPort": 15008}},
                {"namespace": "default", "name": "ratings-v1", "workloadIps": ["10.244.1.13"], "node": "ambient-worker", "protocol": "HBONE",
                 "waypoint": {"destination": "/10.96.0.99", "hboneMtlsPort": 15008}},
                {"namespace": "default", "name": "reviews-v1", "workloadIps": ["10.244.1.14"], "node": "ambient-worker", "protocol": "HBONE",
                 "waypoint": {"destination": "/10.244.1.12", "hboneMtlsPort": 15008}},
                {"namespace": "default", "name": "reviews-v2", "workloadIps": ["10.244.1.15"], "node": "ambient-worker", "protocol": "HBONE",
                 "waypoint": {"destination": "/10.9.9.9", "hboneMtlsPort": 15008}},
            ],
            "services": [
                {"namespace": "default", "name": "bookinfo-wp", "hostname": "waypoint.default.svc.cluster.local", "vips": ["/10.96.0.99"]},
            ]
        });
        let out =
            render(&dump, Section::Workloads, Output::Short, &Filter::default()).expect("table");
        assert_eq!(
            out,
            "NAMESPACE POD NAME       IP          NODE           WAYPOINT    PROTOCOL\n\
             default   curl           10.244.1.12 ambient-worker bookinfo-wp HBONE\n\
             default   productpage-v1 10.244.1.10 ambient-worker None        HBONE\n\
             default   ratings-v1     10.244.1.13 ambient-worker bookinfo-wp HBONE\n\
             default   reviews-v1     10.244.1.14 ambient-worker curl        HBONE\n\
             default   reviews-v2     10.244.1.15 ambient-worker NA          HBONE\n"
        );
        let only = Filter {
            workload_name: Some("curl".into()),
            ..Default::default()
        };
        let out = render(&dump, Section::Workloads, Output::Short, &only).expect("table");
        assert_eq!(out.lines().count(), 2);
    }
}
