//! Developer tasks: `cargo xtask setup|demo|test|run`.

mod demo;
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
        Task::Run { args } => {
            build_agent()?;
            setup::run_cmd(Command::new(agent_binary(&root)).args(args))
        }
    }
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
    build_agent()?;
    // The end-to-end tests start the agent binary built above.
    setup::run_cmd(
        Command::new("cargo")
            .args([
                "test",
                "--workspace",
                "--exclude",
                "ztunnel-ebpf",
                "--no-fail-fast",
            ])
            .args(args),
    )
}
