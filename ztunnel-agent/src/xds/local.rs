//! The local mesh configuration file (upstream ztunnel's `LOCAL_XDS_PATH` YAML), read as
//! upstream writes it. One extension: a workload on this node may carry `netns`, the path of
//! its network namespace, to be enrolled without istio-cni.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::state::policy::Authorization;
use crate::state::service::Service;
use crate::state::workload::Workload;
use crate::state::{self, MeshState};

/// A file that cannot be used, with the file, line and field named.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Unreadable file.
    #[error("cannot read {path}: check LOCAL_XDS_PATH")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Malformed YAML or a field of the wrong type (serde_yaml names field, line, column).
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde's message: `workloads[1].workloadIps[0]: invalid IP address syntax at line 9 column 7`.
        message: String,
    },
    /// The resources contradict each other.
    #[error("{path}: {source}")]
    State {
        /// The file.
        path: PathBuf,
        /// What.
        #[source]
        source: Box<state::Error>,
    },
    /// A policy with an unusable value.
    #[error("{path}: policies[{index}] ({name}): {problem}")]
    Policy {
        /// The file.
        path: PathBuf,
        /// Index in `policies`.
        index: usize,
        /// Policy name.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// A semantic problem serde cannot see.
    #[error("{path}: workloads[{index}] ({name}): {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Index in `workloads`.
        index: usize,
        /// Workload name.
        name: String,
        /// What is wrong and how to fix it.
        problem: String,
    },
}

/// The file's top level, as upstream reads it.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalConfig {
    /// Workloads.
    #[serde(default)]
    pub workloads: Vec<Workload>,
    /// Services.
    #[serde(default)]
    pub services: Vec<Service>,
    /// Authorization policies.
    #[serde(default)]
    pub policies: Vec<Authorization>,
}

/// Reads and validates a file.
pub fn load(path: &Path) -> Result<LocalConfig, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &text)
}

/// Parses and validates file contents.
pub fn parse(path: &Path, text: &str) -> Result<LocalConfig, Error> {
    let config: LocalConfig = if text.trim().is_empty() {
        LocalConfig::default()
    } else {
        serde_yaml_ng::from_str(text).map_err(|e| Error::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?
    };
    for (index, p) in config.policies.iter().enumerate() {
        let cidrs = p.rules.iter().flatten().flatten().flat_map(|m| {
            m.source_ips
                .iter()
                .chain(&m.not_source_ips)
                .chain(&m.destination_ips)
                .chain(&m.not_destination_ips)
        });
        for cidr in cidrs {
            if !crate::authz::valid_cidr(cidr) {
                return Err(Error::Policy {
                    path: path.to_path_buf(),
                    index,
                    name: p.name.clone(),
                    problem: format!("{cidr:?} is not an address or CIDR such as 10.0.0.0/8"),
                });
            }
        }
    }
    for (index, w) in config.workloads.iter().enumerate() {
        let invalid = |problem: &str| Error::Invalid {
            path: path.to_path_buf(),
            index,
            name: w.name.clone(),
            problem: problem.to_string(),
        };
        if w.name.is_empty() {
            return Err(invalid("`name` is missing"));
        }
        if let Some(netns) = &w.netns {
            if !netns.is_absolute() {
                return Err(invalid(
                    "`netns` must be an absolute path such as /var/run/netns/<pod>",
                ));
            }
        }
    }
    Ok(config)
}

/// Reads a file into a mesh state (and the workloads to enroll).
pub fn load_state(path: &Path, text: &str) -> Result<(MeshState, Vec<Workload>), Error> {
    let config = parse(path, text)?;
    let LocalConfig {
        workloads,
        services,
        policies,
    } = config;
    let state =
        MeshState::build(workloads.clone(), services, policies).map_err(|source| Error::State {
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
    Ok((state, workloads))
}

impl LocalConfig {
    /// Workloads on `node` that carry a network namespace path: the pods to enroll.
    pub fn local_pods<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> {
        self.workloads
            .iter()
            .filter(move |w| w.node == node && w.netns.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loads_workloads_with_netns_extension() {
        let text = r#"
workloads:
- uid: cluster1//v1/Pod/default/productpage
  name: productpage
  namespace: default
  serviceAccount: bookinfo-productpage
  workloadIps: ["10.244.1.10", "fd00::10"]
  protocol: HBONE
  node: node-1
  netns: /var/run/netns/productpage
- name: remote
  namespace: default
  workloadIps: ["10.244.2.10"]
  node: node-2
"#;
        let c = parse(Path::new("mesh.yaml"), text).expect("valid file");
        let local: Vec<_> = c.local_pods("node-1").collect();
        assert_eq!(local.len(), 1);
        assert_eq!(local[0].workload_ips.len(), 2);
        assert_eq!(c.local_pods("node-2").count(), 0, "no netns, not enrolled");
    }

    #[test]
    fn bad_ip_names_file_field_and_line() {
        let text = "workloads:\n- name: a\n  workloadIps: [\"10.244.1\"]\n  namespace: d\n";
        let err = parse(Path::new("/etc/mesh.yaml"), text)
            .expect_err("invalid address")
            .to_string();
        assert!(err.contains("/etc/mesh.yaml"), "{err}");
        assert!(err.contains("workloadIps"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn unknown_field_is_named_with_its_line() {
        let text =
            "workloads:\n- name: a\n  namespace: default\n  workloadIps: []\n  serviceAcount: x\n";
        let err = parse(Path::new("m.yaml"), text)
            .expect_err("typo")
            .to_string();
        assert!(
            err.contains("serviceAcount") && err.contains("line 5"),
            "{err}"
        );
    }

    #[test]
    fn relative_netns_is_refused_with_fix() {
        let text =
            "workloads:\n- name: a\n  namespace: d\n  workloadIps: []\n  netns: productpage\n";
        let err = parse(Path::new("m.yaml"), text)
            .expect_err("relative")
            .to_string();
        assert!(err.contains("workloads[0] (a)"), "{err}");
        assert!(err.contains("absolute path"), "{err}");
    }

    #[test]
    fn upstream_example_loads_unchanged() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/upstream-localhost.yaml");
        let c = load(&path).expect("upstream's examples/localhost.yaml loads");
        assert_eq!(c.workloads.len(), 2);
        assert_eq!(c.workloads[0].service_account, "default");
        assert_eq!(
            c.workloads[1].protocol,
            crate::state::workload::Protocol::TCP
        );
        let text = std::fs::read_to_string(&path).expect("fixture");
        let (state, _) = load_state(&path, &text).expect("state builds");
        let svc = state
            .service_by_vip("", "127.10.0.1".parse().expect("ip"))
            .expect("vip /127.10.0.1");
        assert_eq!(svc.endpoints.len(), 2);
        assert_eq!(
            c.local_pods("local").count(),
            0,
            "no netns: nothing to enroll"
        );
        assert!(!c.services.is_empty() && !c.policies.is_empty());
    }
}
