//! Test harness for the privileged end-to-end tests: a node (network namespace) with pods
//! (network namespaces on a bridge, IPv4 and IPv6), agents started for real, and traffic
//! sent from inside pods. Everything is torn down on drop, also when a test fails.

pub mod agent;
pub mod cni;
pub mod control_plane;
pub mod mesh;
pub mod one_hop;
pub mod prometheus;
pub mod raw_h2;
pub mod topology;
pub mod traffic;
pub mod waypoint;
pub mod xds_mesh;

use std::time::{Duration, Instant};

/// Set by `cargo xtask test`: the privileged tests must run, never skip.
pub const REQUIRED_ENV: &str = "ZTUNNEL_E2E_REQUIRED";

/// Fails (under CI or `cargo xtask test`) or skips (a bare `cargo test` as a user) when not
/// root. Returns false to skip.
pub fn require_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    // Any CI value but an explicit "no" (CI systems set "true", "1", "yes"...).
    let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
    if ci || std::env::var_os(REQUIRED_ENV).is_some() {
        panic!("privileged test cannot run: not root, and CI / {REQUIRED_ENV} forbid skipping");
    }
    eprintln!("skipping privileged test: run as root (cargo xtask test does)");
    false
}

/// Polls `check` until it returns Some or the deadline passes.
pub fn wait_for<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The sum of the samples of `metric` whose labels contain every one of `labels` (a metric
/// without labels: its one sample, with `labels` empty).
pub fn metric_sum(metrics: &str, metric: &str, labels: &[&str]) -> u64 {
    let (labelled, bare) = (format!("{metric}{{"), format!("{metric} "));
    metrics
        .lines()
        .filter(|l| l.starts_with(&labelled) || l.starts_with(&bare))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Runs a command, panicking with its output if it fails.
pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A process's resident memory in KiB (`VmRSS`), 0 if it is gone.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A process's open file descriptors, 0 if it is gone.
pub fn open_fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count() as u64)
}
