//! `cargo xtask demo`: builds the agent and runs the demo node (tests/src/bin/ztunnel-demo.rs,
//! which reuses the end-to-end harness).

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use crate::setup::run_cmd;

/// Builds everything and runs the demo.
pub fn run(_root: &Path, extra: &[String]) -> Result<()> {
    crate::build_agent()?;
    run_cmd(
        Command::new("cargo")
            .args([
                "run",
                "--quiet",
                "-p",
                "ztunnel-e2e",
                "--bin",
                "ztunnel-demo",
                "--",
            ])
            .args(extra),
    )
    .context("running the demo")
}
