//! `ztunnel-agent config --file` on config_dumps in upstream ztunnel's shapes (no agent, no
//! root needed): the current shape (arrays, base64 PEM, `rootCerts`) and the older one
//! (sections keyed by address, PEM text, the root at the end of the chain).

use std::path::PathBuf;
use std::process::Command;

use ztunnel_e2e::agent::agent_binary;

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
        .display()
        .to_string()
}

/// `ztunnel-agent config <args>`: (exit code, stdout, stderr).
fn config(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(agent_binary())
        .arg("config")
        .args(args)
        .output()
        .expect("run ztunnel-agent config");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(args: &[&str]) -> String {
    let (code, out, err) = config(args);
    assert_eq!(code, 0, "config {args:?}: {err}");
    assert!(err.is_empty(), "config {args:?} wrote to stderr: {err}");
    out
}

/// The row whose first column is `first` and that contains `part`.
fn row<'a>(table: &'a str, first: &str, part: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(first) && l.contains(part))
        .unwrap_or_else(|| panic!("no row {first} .. {part} in:\n{table}"))
}

fn cols(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

fn check_dump(file: &str) {
    // Every section, every format, without error.
    for section in [
        "workloads",
        "services",
        "policies",
        "certificates",
        "connections",
        "all",
    ] {
        for output in ["short", "json", "yaml"] {
            let out = ok(&[section, "-o", output, "--file", file]);
            assert!(
                !out.trim().is_empty(),
                "{section} -o {output} printed nothing"
            );
        }
    }
    let all: serde_json::Value =
        serde_json::from_str(&ok(&["all", "-o", "json", "--file", file])).expect("JSON");
    for key in ["workloads", "services", "policies", "certificates"] {
        assert!(all.get(key).is_some(), "all -o json lacks {key}");
    }

    let workloads = ok(&["workloads", "--file", file]);
    assert!(workloads.starts_with("NAMESPACE "), "{workloads}");
    assert_eq!(
        cols(row(&workloads, "default", "productpage")),
        [
            "default",
            "productpage-v1-54bb874995-h5p9k",
            "10.244.1.9",
            "worker-1",
            "None",
            "HBONE"
        ]
    );
    let reviews = cols(row(&workloads, "default", "reviews-v2"));
    // Its waypoint is a VIP no service in the dump has: istioctl prints NA, and so do we.
    assert_eq!(reviews[4], "NA", "the waypoint column: {workloads}");
    assert_eq!(cols(row(&workloads, "legacy", "httpbin"))[5], "TCP");
    // A workload without IPs shows its hostname.
    assert!(row(&workloads, "default", "vm-1").contains("vm-1.example.internal"));
    // Filters.
    let only = ok(&["workloads", "--file", file, "--node", "worker-2"]);
    assert_eq!(only.lines().count(), 3, "{only}");

    let services = ok(&["services", "--file", file]);
    assert_eq!(
        cols(row(&services, "default", "productpage")),
        ["default", "productpage", "10.96.10.20", "None", "1/1"]
    );

    let certs = ok(&["certificates", "--file", file]);
    let leaf = cols(row(
        &certs,
        "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
        "Leaf",
    ));
    assert_eq!(
        leaf,
        [
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
            "Leaf",
            "Available",
            "true",
            "1f2e3d4c5b6a",
            "2099-12-31T00:00:00Z",
            "2024-01-01T00:00:00Z"
        ]
    );
    let root = cols(row(
        &certs,
        "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
        "Root",
    ));
    assert_eq!(root[4], "5a17c0ffee", "{certs}");
}

#[test]
fn reads_a_current_upstream_config_dump() {
    let file = fixture("upstream-config-dump.json");
    check_dump(&file);
    // Sections only the current shape has.
    let services = ok(&["services", "--file", &file]);
    assert_eq!(
        cols(row(&services, "default", "reviews")),
        // Its waypoint is a VIP no service in the dump has: istioctl prints NA.
        ["default", "reviews", "10.96.10.30", "NA", "0/1"]
    );
    let conns = ok(&["connections", "--file", &file]);
    assert!(
        row(&conns, "productpage-v1-54bb874995-h5p9k.default", "Inbound")
            .contains("10.244.1.7:53712"),
        "{conns}"
    );
    // Identities without a certificate get a row with their state.
    let certs = ok(&["certificates", "--file", &file]);
    assert_eq!(
        cols(row(
            &certs,
            "spiffe://cluster.local/ns/default/sa/sleep",
            "Leaf"
        )),
        [
            "spiffe://cluster.local/ns/default/sa/sleep",
            "Leaf",
            "Unavailable",
            "false",
            "NA",
            "NA",
            "NA"
        ]
    );
    assert!(
        row(&certs, "spiffe://cluster.local/ns/default/sa/curl", "Leaf").contains("Initializing"),
        "{certs}"
    );
}

#[test]
fn reads_an_older_upstream_config_dump() {
    let file = fixture("upstream-config-dump-1.20.json");
    check_dump(&file);
    // Endpoints without a health status count as healthy.
    let services = ok(&["services", "--file", &file]);
    assert!(
        cols(row(&services, "default", "reviews")).ends_with(&["1/1"]),
        "{services}"
    );
}

#[test]
fn refuses_what_is_not_a_config_dump() {
    let dir = std::env::temp_dir().join(format!("zt-config-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let not_json = dir.join("not.json");
    std::fs::write(&not_json, "workloads: []\n").expect("write");
    let (code, _, err) = config(&["workloads", "--file", &not_json.display().to_string()]);
    assert_ne!(code, 0);
    assert!(err.contains("is not a config_dump"), "{err}");
    let other = dir.join("other.json");
    std::fs::write(&other, "{\"clusters\": []}").expect("write");
    let (code, _, err) = config(&["workloads", "--file", &other.display().to_string()]);
    assert_ne!(code, 0);
    assert!(err.contains("not a ztunnel config_dump"), "{err}");
    let (code, _, err) = config(&["workloads", "--file", "/nonexistent/dump.json"]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot read /nonexistent/dump.json"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
