//! A real Prometheus server (Debian's `prometheus`, installed by `cargo xtask setup`) run
//! inside a test's node namespace, scraping agents' 15020 the way a cluster's Prometheus
//! does: the `pod`/`namespace`/`app` target labels are the ones Kubernetes service discovery
//! relabeling gives ztunnel's pods, so the dashboard's PromQL runs unchanged.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::wait_for;

/// Where `cargo xtask setup` installs it.
const BINARY: &str = "/usr/bin/prometheus";
/// Its HTTP port inside the node namespace.
const PORT: u16 = 19090;

/// A scrape target: `addr` (`127.0.0.1:15020`) with the pod labels a cluster gives it.
pub struct Target<'a> {
    /// host:port of the agent's metrics server, as seen from the node namespace.
    pub addr: &'a str,
    /// The agent pod's name (the dashboard's `pod` label).
    pub pod: &'a str,
}

/// One sample of an instant query: its labels and value.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Label name -> value.
    pub labels: serde_json::Map<String, Value>,
    /// The value.
    pub value: f64,
}

impl Sample {
    /// The value of label `name` ("" when absent).
    pub fn label(&self, name: &str) -> &str {
        self.labels.get(name).and_then(Value::as_str).unwrap_or("")
    }
}

/// A running Prometheus; stopped on drop.
pub struct Prometheus {
    child: Child,
    node: String,
    dir: PathBuf,
}

impl Prometheus {
    /// Starts Prometheus in node namespace `node`, scraping `targets` every `interval`, and
    /// waits until it is ready.
    pub fn start(node: &str, targets: &[Target<'_>], interval: Duration) -> Self {
        assert!(
            std::path::Path::new(BINARY).exists(),
            "{BINARY} is missing: run `cargo xtask setup` (it installs Debian's prometheus)"
        );
        let dir = std::env::temp_dir().join(format!("ztunnel-e2e-prometheus-{node}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).expect("prometheus dir");
        let secs = interval.as_secs_f64();
        let mut config = format!(
            "global:\n  scrape_interval: {secs}s\n  scrape_timeout: {secs}s\n  evaluation_interval: {secs}s\nscrape_configs:\n"
        );
        for t in targets {
            // What the kubernetes-pods job's relabeling gives a ztunnel pod.
            config.push_str(&format!(
                "  - job_name: ztunnel-{pod}\n    metrics_path: /stats/prometheus\n    static_configs:\n      - targets: ['{addr}']\n        labels:\n          app: ztunnel\n          namespace: istio-system\n          pod: {pod}\n",
                pod = t.pod,
                addr = t.addr
            ));
        }
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).expect("prometheus config");
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("prometheus log");
        let child = Command::new("ip")
            .args(["netns", "exec", node, BINARY])
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{PORT}"))
            .arg("--storage.tsdb.retention.time=1h")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let prometheus = Self {
            child,
            node: node.to_string(),
            dir,
        };
        wait_for("prometheus ready", Duration::from_secs(30), || {
            prometheus
                .get("/-/ready")
                .ok()
                .filter(|b| b.contains("Ready"))
        });
        // Ready comes before the first targets (discovery hands them over after up to 5 s):
        // wait until every target has been scraped, so what happens next is seen from its
        // start (a counter first scraped after it moved shows no rate).
        let count = targets.len();
        wait_for(
            "prometheus to scrape every target",
            Duration::from_secs(30),
            || (prometheus.targets().matches("\"health\":\"up\"").count() >= count).then_some(()),
        );
        prometheus
    }

    fn get(&self, path: &str) -> std::io::Result<String> {
        self.curl(&[&format!("http://127.0.0.1:{PORT}{path}")])
    }

    fn curl(&self, args: &[&str]) -> std::io::Result<String> {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.node,
                "curl",
                "-sS",
                "--max-time",
                "10",
            ])
            .args(args)
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(
                String::from_utf8_lossy(&out.stderr).into_owned(),
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs an instant PromQL query; panics (with Prometheus' error) if it is invalid.
    pub fn query(&self, expr: &str) -> Vec<Sample> {
        let body = self
            .curl(&[
                "-G",
                &format!("http://127.0.0.1:{PORT}/api/v1/query"),
                "--data-urlencode",
                &format!("query={expr}"),
            ])
            .unwrap_or_else(|e| panic!("query {expr}: {e}"));
        let json: Value = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("query {expr}: not JSON ({e}): {body}"));
        assert_eq!(json["status"], "success", "query {expr}: {body}");
        let result = &json["data"]["result"];
        let samples = match json["data"]["resultType"].as_str() {
            Some("vector") => result.as_array().cloned().unwrap_or_default(),
            Some("scalar") => vec![serde_json::json!({"metric": {}, "value": result})],
            other => panic!("query {expr}: unexpected result type {other:?}: {body}"),
        };
        samples
            .iter()
            .map(|s| Sample {
                labels: s["metric"].as_object().cloned().unwrap_or_default(),
                value: s["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(f64::NAN),
            })
            .collect()
    }

    /// Waits until `expr` returns at least one sample for which `accept` holds; returns them
    /// all.
    pub fn wait_query(
        &self,
        expr: &str,
        timeout: Duration,
        accept: impl Fn(&Sample) -> bool,
    ) -> Vec<Sample> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let samples = self.query(expr);
            if samples.iter().any(&accept) {
                return samples;
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "timed out after {timeout:?} waiting for `{expr}`; last result: {samples:?}; targets: {}",
                    self.targets()
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until every target has been scraped again after this call (what just happened
    /// is then in the data).
    pub fn wait_for_scrape(&self) {
        let last = |p: &Self| {
            p.query("timestamp(up)")
                .iter()
                .map(|s| s.value)
                .fold(f64::NAN, f64::min)
        };
        let before = last(self);
        wait_for("a new scrape", Duration::from_secs(30), || {
            (last(self) > before).then_some(())
        });
    }

    /// The scrape targets' state (`/api/v1/targets`: health, last error), as JSON text.
    pub fn targets(&self) -> String {
        self.get("/api/v1/targets").unwrap_or_default()
    }

    /// The server's own log (for a failing test's message).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
