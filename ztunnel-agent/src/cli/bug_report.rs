//! `ztunnel-agent bug-report [-o file.tar.gz]`: one archive with what a maintainer asks for
//! first. From the running agent (admin and metrics ports): its settings, `config_dump`, the
//! node `diagnose` (JSON and as printed), xDS and certificate status, recent connections, its
//! last log lines and a metrics snapshot. From the kernel, which keeps capturing when the
//! agent is down: the kernel version and the checks the agent runs at start, the pinned
//! programs, links and maps decoded (`redirect dump`) and raw (`bpftool`). What cannot be
//! collected is listed in the archive's README.txt with the reason, and the archive is still
//! written. Private keys and bearer tokens are cut from every file before it is archived.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::Args;
use serde_json::Value;
use ztunnel_common::maps;

use super::admin_client::{fetch_json, fetch_text};
use crate::diagnose::{node_report, Evidence};
use crate::redirect::kernel;
use crate::telemetry::ErrorChain;

/// `bug-report` arguments.
#[derive(Debug, Args)]
pub struct BugReportArgs {
    /// Where to write the archive [default: ztunnel-bug-report-<time>.tar.gz here].
    #[arg(short = 'o', long)]
    pub output: Option<PathBuf>,
    /// The agent's admin endpoint.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_address: SocketAddr,
    /// The agent's metrics endpoint.
    #[arg(long, default_value = "127.0.0.1:15020")]
    pub metrics_address: SocketAddr,
    /// Where the agent pins maps and links.
    #[arg(long, env = "ZTUNNEL_PIN_DIR", default_value = super::DEFAULT_PIN_DIR)]
    pub pin_dir: PathBuf,
    /// How many of the agent's last log lines to include (it keeps 1000).
    #[arg(long, default_value_t = crate::telemetry::RECENT_LOG_LINES)]
    pub log_lines: usize,
}

/// Failures writing the archive (collection failures are listed inside it instead).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The archive could not be written.
    #[error("cannot write the bug report to {path}: is the directory writable?")]
    Write {
        /// The archive.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The files collected so far and what could not be.
#[derive(Default)]
struct Collected {
    files: Vec<(String, String)>,
    missing: Vec<(String, String)>,
}

impl Collected {
    fn add(&mut self, name: &str, text: String) {
        self.files.push((name.to_string(), redact(&text)));
    }

    fn miss(&mut self, name: &str, why: impl std::fmt::Display) {
        self.missing.push((name.to_string(), why.to_string()));
    }

    /// The missing files grouped by reason: (`a, b, c`, why), in first-seen order.
    fn missing_by_reason(&self) -> Vec<(String, String)> {
        let mut groups: Vec<(Vec<&str>, &str)> = Vec::new();
        for (name, why) in &self.missing {
            match groups.iter_mut().find(|(_, w)| w == why) {
                Some((names, _)) => names.push(name),
                None => groups.push((vec![name], why)),
            }
        }
        groups
            .into_iter()
            .map(|(names, why)| (names.join(", "), why.to_string()))
            .collect()
    }

    fn add_or_miss<E: std::error::Error>(&mut self, name: &str, result: Result<String, E>) {
        match result {
            Ok(text) => self.add(name, text),
            Err(e) => self.miss(name, ErrorChain(&e)),
        }
    }
}

/// What each file holds, for the README.
const CONTENTS: &[(&str, &str)] = &[
    ("version.txt", "this command's version and build, the kernel (uname)"),
    ("kernel-checks.txt", "the checks the agent runs at start: kernel version, capabilities, cgroup v2, the pin directory"),
    ("settings.json", "the agent's settings (the `config` section of config_dump)"),
    ("config_dump.json", "GET /config_dump: workloads, services, policies, certificates (public parts), pods"),
    ("diagnose.json", "GET /debug/diagnose: the node's capture evidence, xDS and certificate status"),
    ("diagnose.txt", "the node `diagnose` report as printed"),
    ("control-plane.json", "xDS stream status, certificates, readiness blockers (from diagnose.json)"),
    ("connections.json", "GET /debug/connections: recent connection outcomes, recent failures"),
    ("logs.txt", "GET /debug/logs: the agent's last log lines"),
    ("metrics.txt", "GET /metrics on the metrics port"),
    ("redirect-dump.txt", "`ztunnel-agent redirect dump`: pinned links and maps, decoded"),
    ("maps/<MAP>.json", "`bpftool -j map dump pinned <pin dir>/<MAP>`: raw map contents"),
    ("bpftool-links.txt", "`bpftool link show`"),
    ("bpftool-programs.txt", "`bpftool prog show`"),
];

/// Runs `bug-report`: 0 when the archive is written (even with parts missing, listed in it),
/// 1 when it cannot be written.
pub fn run(args: &BugReportArgs) -> ExitCode {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let stamp = crate::telemetry::rfc3339(i64::try_from(now).unwrap_or(i64::MAX)).replace(':', "");
    let output = args
        .output
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("ztunnel-bug-report-{stamp}.tar.gz")));
    let collected = collect(args);
    let root = format!("ztunnel-bug-report-{stamp}");
    match write_archive(&output, &root, &collected, &stamp) {
        Ok(()) => {
            println!(
                "wrote {} ({} files)",
                output.display(),
                collected.files.len() + 1
            );
            for (names, why) in collected.missing_by_reason() {
                eprintln!("not collected: {names}: {why}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => super::fail(&e),
    }
}

fn collect(args: &BugReportArgs) -> Collected {
    let mut c = Collected::default();
    c.add("version.txt", version());
    c.add("kernel-checks.txt", kernel_checks(&args.pin_dir));

    // From the agent.
    let admin = args.admin_address;
    match fetch_json(admin, "/config_dump") {
        Ok(dump) => {
            let settings = dump.get("config").cloned().unwrap_or(Value::Null);
            c.add("settings.json", pretty(&settings));
            c.add("config_dump.json", pretty(&dump));
        }
        Err(e) => {
            let why = ErrorChain(&e).to_string();
            c.miss("settings.json", &why);
            c.miss("config_dump.json", why);
        }
    }
    match fetch_json(admin, "/debug/diagnose?window_ms=500") {
        Ok(value) => {
            c.add("diagnose.json", pretty(&value));
            match serde_json::from_value::<Evidence>(value) {
                Ok(evidence) => {
                    c.add("diagnose.txt", node_report(&evidence).render());
                    let control_plane = serde_json::json!({
                        "agentVersion": evidence.version,
                        "configSource": evidence.config_source,
                        "xds": evidence.xds,
                        "certificates": evidence.certificates,
                        "notReady": evidence.not_ready,
                    });
                    c.add("control-plane.json", pretty(&control_plane));
                }
                Err(e) => {
                    let why = format!(
                        "the agent's diagnose evidence is not understood by this version: {e}"
                    );
                    c.miss("diagnose.txt", &why);
                    c.miss("control-plane.json", why);
                }
            }
        }
        Err(e) => {
            let why = ErrorChain(&e).to_string();
            c.miss("diagnose.json", &why);
            c.miss("diagnose.txt", &why);
            c.miss("control-plane.json", why);
        }
    }
    c.add_or_miss(
        "connections.json",
        fetch_json(admin, "/debug/connections").map(|v| pretty(&v)),
    );
    c.add_or_miss(
        "logs.txt",
        fetch_text(admin, &format!("/debug/logs?lines={}", args.log_lines)),
    );
    c.add_or_miss("metrics.txt", fetch_text(args.metrics_address, "/metrics"));

    // From the kernel.
    c.add_or_miss(
        "redirect-dump.txt",
        crate::redirect::dump::render(&args.pin_dir),
    );
    for map in maps::PINNED {
        let path = args.pin_dir.join(map);
        let path = path.display().to_string();
        c.add_or_miss(
            &format!("maps/{map}.json"),
            bpftool(&["-j", "map", "dump", "pinned", &path]),
        );
    }
    c.add_or_miss("bpftool-links.txt", bpftool(&["link", "show"]));
    c.add_or_miss("bpftool-programs.txt", bpftool(&["prog", "show"]));
    c
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

fn version() -> String {
    let mut out = format!(
        "ztunnel-agent {} (this command)\nbuild: {} profile, {}-{}\n",
        env!("CARGO_PKG_VERSION"),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        std::env::consts::ARCH,
        std::env::consts::OS,
    );
    match nix::sys::utsname::uname() {
        Ok(u) => {
            out.push_str(&format!(
                "kernel: {} {} {} {}\n",
                u.sysname().to_string_lossy(),
                u.release().to_string_lossy(),
                u.version().to_string_lossy(),
                u.machine().to_string_lossy()
            ));
        }
        Err(e) => out.push_str(&format!("kernel: uname failed: {e}\n")),
    }
    out
}

/// The agent's start-up checks, as this command (run where the agent runs, as root) sees
/// them.
fn kernel_checks(pin_dir: &Path) -> String {
    let outcome = |r: Result<String, kernel::Error>| match r {
        Ok(detail) => format!("ok    {detail}"),
        Err(e) => format!("FAIL  {}", ErrorChain(&e)),
    };
    let mut out = String::new();
    out.push_str(&format!(
        "kernel version and capabilities: {}\n",
        outcome(kernel::check_kernel_and_privileges().map(|()| {
            "kernel recent enough, CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN held".to_string()
        }))
    ));
    out.push_str(&format!(
        "cgroup v2 root: {}\n",
        outcome(kernel::cgroup2_root().map(|p| p.display().to_string()))
    ));
    let cgroup = kernel::default_cgroup().and_then(|p| kernel::check_cgroup(&p).map(|()| p));
    out.push_str(&format!(
        "default capture cgroup: {}\n",
        outcome(cgroup.map(|p| p.display().to_string()))
    ));
    let pins = match std::fs::read_dir(pin_dir) {
        Ok(entries) => {
            let mut names: Vec<String> = entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            format!("ok    {} holds {}", pin_dir.display(), names.join(", "))
        }
        Err(e) => format!("FAIL  {}: {e}", pin_dir.display()),
    };
    out.push_str(&format!("pin directory: {pins}\n"));
    out
}

/// `bpftool <args>`'s output (stderr appended when it complains).
fn bpftool(args: &[&str]) -> Result<String, std::io::Error> {
    let out = std::process::Command::new("bpftool")
        .args(args)
        .output()
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                std::io::Error::new(
                    e.kind(),
                    "bpftool is not in PATH: install bpftool (Debian: apt-get install bpftool) for the raw map contents",
                )
            } else {
                e
            }
        })?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() || !out.stderr.is_empty() {
        text.push_str(&format!(
            "\n# bpftool {} exited with {}: {}\n",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(text)
}

/// `text` with every PEM private key block and bearer token replaced by a marker.
pub fn redact(text: &str) -> String {
    const BEGIN: &str = "-----BEGIN ";
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(BEGIN) {
        let label_start = start + BEGIN.len();
        let label = rest[label_start..]
            .find("-----")
            .map(|len| &rest[label_start..label_start + len]);
        match label {
            Some(label) if label.ends_with("PRIVATE KEY") => {
                out.push_str(&rest[..start]);
                out.push_str("[private key redacted]");
                let end_marker = format!("-----END {label}-----");
                rest = match rest[label_start..].find(&end_marker) {
                    Some(at) => &rest[label_start + at + end_marker.len()..],
                    // An unterminated block: drop the rest rather than risk leaking it.
                    None => "",
                };
            }
            _ => {
                out.push_str(&rest[..label_start]);
                rest = &rest[label_start..];
            }
        }
    }
    out.push_str(rest);
    redact_bearer(&out)
}

fn redact_bearer(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    // ASCII lowercase keeps byte offsets, so positions found in it hold in the original.
    while let Some(at) = rest.to_ascii_lowercase().find("bearer ") {
        out.push_str(&rest[..at + 7]);
        let after = &rest[at + 7..];
        let end = after
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '\\')
            .unwrap_or(after.len());
        out.push_str("[redacted]");
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

fn write_archive(
    output: &Path,
    root: &str,
    collected: &Collected,
    stamp: &str,
) -> Result<(), Error> {
    let err = |source| Error::Write {
        path: output.to_path_buf(),
        source,
    };
    let mut readme = format!(
        "ztunnel-agent bug report, collected {stamp} by ztunnel-agent {}.\nPrivate keys and bearer tokens are cut from every file.\n\nfiles:\n",
        env!("CARGO_PKG_VERSION")
    );
    for (name, what) in CONTENTS {
        readme.push_str(&format!("  {name}: {what}\n"));
    }
    if collected.missing.is_empty() {
        readme.push_str("\nnothing is missing.\n");
    } else {
        readme.push_str("\nmissing (could not be collected):\n");
        for (names, why) in collected.missing_by_reason() {
            readme.push_str(&format!("  {names}: {why}\n"));
        }
    }
    // Readable by its owner only: it describes the node's whole mesh.
    let file = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(output)
            .map_err(err)?
    };
    let gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    let files =
        std::iter::once(("README.txt".to_string(), readme)).chain(collected.files.iter().cloned());
    for (name, text) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(text.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        );
        header.set_cksum();
        tar.append_data(&mut header, format!("{root}/{name}"), text.as_bytes())
            .map_err(err)?;
    }
    let gz = tar.into_inner().map_err(err)?;
    gz.finish().map_err(err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_keys_and_tokens_are_cut() {
        let text = "a\n-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\nSECRET1\n-----END PRIVATE KEY-----\nb -----BEGIN EC PRIVATE KEY-----\nSECRET2\n-----END EC PRIVATE KEY----- c\nauthorization: Bearer SECRET3\n{\"h\": \"Bearer SECRET4\"}\n-----BEGIN RSA PRIVATE KEY-----\nSECRET5";
        let cut = redact(text);
        for secret in [
            "SECRET1",
            "SECRET2",
            "SECRET3",
            "SECRET4",
            "SECRET5",
            "PRIVATE KEY",
        ] {
            assert!(!cut.contains(secret), "{secret} left in:\n{cut}");
        }
        assert!(
            cut.contains("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"),
            "{cut}"
        );
        assert!(cut.contains("Bearer [redacted]\n"), "{cut}");
        assert_eq!(
            redact("authorization: bearer abc"),
            "authorization: bearer [redacted]"
        );
        assert_eq!(
            redact(r#"{"h":"BEARER abc\"x"}"#),
            r#"{"h":"BEARER [redacted]\"x"}"#
        );
        assert!(cut.starts_with("a\n") && cut.contains(" c\n"), "{cut}");
        assert_eq!(redact("plain text"), "plain text");
    }
}
