//! `cargo xtask demo`: a demo node with captured traffic.

use std::path::Path;

use anyhow::Result;

/// Runs the demo.
pub fn run(_root: &Path) -> Result<()> {
    anyhow::bail!("demo not written yet")
}
