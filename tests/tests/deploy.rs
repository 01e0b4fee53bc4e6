//! The DaemonSet configures the agent only through settings the agent really reads: every
//! environment variable it sets (base and overlays) appears in `ztunnel-agent run --help`.

use std::path::Path;
use std::process::Command;

use ztunnel_e2e::agent::agent_binary;

/// Every `env[].name` of every container in a manifest.
fn env_names(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).expect("manifest");
    let doc: serde_yaml_ng::Value = serde_yaml_ng::from_str(&text).expect("YAML");
    let containers = doc["spec"]["template"]["spec"]["containers"]
        .as_sequence()
        .cloned()
        .unwrap_or_default();
    containers
        .iter()
        .flat_map(|c| c["env"].as_sequence().cloned().unwrap_or_default())
        .filter_map(|e| e["name"].as_str().map(str::to_string))
        .collect()
}

#[test]
fn every_daemonset_env_var_is_an_agent_setting() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
    let help = Command::new(agent_binary())
        .args(["run", "--help"])
        .output()
        .expect("agent --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let mut checked = 0;
    for manifest in [
        "base/daemonset.yaml",
        "overlays/example/debug-logging.yaml",
        "overlays/standalone/local-config.yaml",
    ] {
        let names = env_names(&deploy.join(manifest));
        assert!(!names.is_empty(), "{manifest} sets no environment");
        for name in names {
            assert!(
                help.contains(&format!("[env: {name}=")),
                "{manifest} sets {name}, which ztunnel-agent run does not read:\n{help}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} variables checked");
}

#[test]
fn rollouts_overlap_and_the_drain_fits_the_grace_period() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base/daemonset.yaml");
    let doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(path).expect("manifest")).expect("YAML");
    let rolling = &doc["spec"]["updateStrategy"]["rollingUpdate"];
    assert_eq!(
        rolling["maxSurge"].as_u64(),
        Some(1),
        "the new agent starts beside the old one"
    );
    assert_eq!(
        rolling["maxUnavailable"].as_u64(),
        Some(0),
        "no node without an agent"
    );
    let pod = &doc["spec"]["template"]["spec"];
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace period");
    let env = pod["containers"][0]["env"].as_sequence().expect("env");
    let told = env
        .iter()
        .find(|e| e["name"].as_str() == Some("TERMINATION_GRACE_PERIOD_SECONDS"))
        .and_then(|e| e["value"].as_str())
        .and_then(|v| v.parse::<u64>().ok());
    assert_eq!(
        told,
        Some(grace),
        "the agent drains within the pod's grace period"
    );
}
