//! Developer tasks: `cargo xtask setup|demo|test|bench|soak|fuzz|run`.

mod demo;
mod fuzz;
mod setup;

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "ztunnel-agent developer tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the eBPF toolchain and mount bpffs (idempotent).
    Setup,
    /// Build everything and run a demo node: pods in network namespaces, captured traffic,
    /// the pinned maps.
    Demo {
        /// Leave the demo running until Ctrl-C.
        #[arg(long)]
        keep: bool,
    },
    /// Run the whole test suite, privileged end-to-end tests included (needs root).
    Test {
        /// Extra arguments for `cargo test` (after `--`: test name filters).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Measure direct TCP, TCP passthrough and HBONE on one machine (release build; not a
    /// test). Writes target/bench-results.md.
    Bench,
    /// The agent's lifecycle under load: overlapping upgrades, kill -9, 100,000 connections,
    /// 10,000 idle tunnels, reset storms (release build; not a test, about 4 minutes once built).
    /// Writes target/soak-results.md.
    Soak,
    /// Fuzz every parser of outside input (cargo fuzz, libFuzzer, nightly) for a bounded time
    /// each, from the seeds in fuzz/corpus/. Writes target/fuzz-results.md.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        /// Only this target.
        #[arg(long)]
        target: Option<String>,
        /// Debug build (quicker to build, slower to run).
        #[arg(long)]
        dev: bool,
    },
    /// Build the agent and run it with the given arguments.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    setup::run(&root)?;
    match cli.task {
        Task::Setup => Ok(()),
        Task::Demo { keep } => {
            let extra = if keep {
                vec!["--keep".to_string()]
            } else {
                Vec::new()
            };
            demo::run(&root, &extra)
        }
        Task::Test { args } => test(&args),
        Task::Bench => harness(&root, "ztunnel-bench"),
        Task::Soak => harness(&root, "ztunnel-soak"),
        Task::Fuzz {
            seconds,
            target,
            dev,
        } => fuzz::run(&root, seconds, target.as_deref(), dev),
        Task::Run { args } => {
            build_agent()?;
            setup::run_cmd(Command::new(agent_binary(&root)).args(args))
        }
    }
}

/// Builds the agent in release mode and runs the harness binary `bin` against it.
fn harness(root: &std::path::Path, bin: &str) -> Result<()> {
    setup::run_cmd(Command::new("cargo").args(["build", "--release", "-p", "ztunnel-agent"]))?;
    setup::run_cmd(
        Command::new("cargo")
            .args([
                "run",
                "--release",
                "--quiet",
                "-p",
                "ztunnel-e2e",
                "--bin",
                bin,
            ])
            .env(
                "ZTUNNEL_AGENT_BIN",
                root.join("target/release/ztunnel-agent"),
            ),
    )
}

/// The workspace root, from this crate's manifest directory.
fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

fn build_agent() -> Result<()> {
    setup::run_cmd(Command::new("cargo").args(["build", "-p", "ztunnel-agent"]))
        .context("building ztunnel-agent")
}

fn agent_binary(root: &std::path::Path) -> PathBuf {
    root.join("target/debug/ztunnel-agent")
}

/// Lints, unit tests and the privileged end-to-end tests, in that order.
fn test(args: &[String]) -> Result<()> {
    setup::run_cmd(Command::new("cargo").args(["fmt", "--all", "--", "--check"]))
        .context("cargo fmt: run `cargo fmt --all`")?;
    setup::run_cmd(Command::new("cargo").args([
        "clippy",
        "--workspace",
        "--exclude",
        "ztunnel-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    validate_manifests()?;
    build_agent()?;
    // The end-to-end tests start the agent binary built above. No doctests: the crates have
    // none, and their empty summaries would be the run's last words.
    let mut child = Command::new("cargo")
        .args([
            "test",
            "--workspace",
            "--exclude",
            "ztunnel-ebpf",
            "--lib",
            "--bins",
            "--tests",
            "--no-fail-fast",
        ])
        .args(args)
        // The privileged tests fail rather than skip when they cannot run (see
        // tests/src/lib.rs `require_root`): a green run means they ran.
        .env("ZTUNNEL_E2E_REQUIRED", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("starting cargo test")?;
    let (mut passed, mut failed) = (0u64, 0u64);
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead;
        for line in std::io::BufReader::new(out).lines() {
            let line = line.context("reading cargo test output")?;
            println!("{line}");
            if let Some((p, f)) = parse_summary(&line) {
                passed += p;
                failed += f;
            }
        }
    }
    let status = child.wait().context("waiting for cargo test")?;
    println!("\ntests: {passed} passed, {failed} failed");
    if !status.success() || failed > 0 {
        anyhow::bail!("tests failed");
    }
    if passed == 0 {
        anyhow::bail!("no test ran");
    }
    Ok(())
}

/// Every complete manifest under deploy/base against the Kubernetes schemas.
fn validate_manifests() -> Result<()> {
    let base = workspace_root().join("deploy/base");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&base)
        .with_context(|| format!("reading {}", base.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    files.sort();
    setup::run_cmd(
        Command::new("python3")
            .args([
                "-m",
                "kubernetes_validate",
                "--strict",
                "--kubernetes-version",
                "1.33.0",
            ])
            .args(&files),
    )
    .context("deploy/ manifests do not validate against the Kubernetes 1.33 schemas")
}

/// Counts from a libtest line `test result: ok. 5 passed; 0 failed; ...`.
fn parse_summary(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("test result: ")?;
    let count = |word: &str| {
        rest.split(';').find_map(|part| {
            part.trim()
                .strip_suffix(word)?
                .trim()
                .rsplit(' ')
                .next()?
                .parse()
                .ok()
        })
    };
    Some((count("passed")?, count("failed")?))
}
