//! `cargo xtask fuzz [--seconds N] [--target T]`: every fuzz target under fuzz/ (cargo fuzz,
//! libFuzzer, nightly) for a bounded time each, from the seeds in fuzz/corpus/<target> and a
//! working corpus in target/fuzz-corpus/<target> that grows from run to run;
//! a crash fails the run and leaves its input in fuzz/artifacts/<target>/. Writes
//! target/fuzz-results.md (executions, coverage, corpus size per target).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// What one target's run reported.
struct Ran {
    target: String,
    executions: String,
    coverage: String,
    corpus: String,
    ok: bool,
}

/// Runs the targets (all, or `only`) for `seconds` each; `dev` builds without optimisation
/// (quicker to build, slower to run: what the test suite uses).
pub fn run(root: &Path, seconds: u64, only: Option<&str>, dev: bool) -> Result<()> {
    ensure_tools()?;
    let dir = root.join("fuzz/fuzz_targets");
    let mut targets: Vec<String> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "rs"))
        .filter_map(|e| {
            e.path()
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
        })
        .filter(|t| only.is_none_or(|o| o == t))
        .collect();
    targets.sort();
    if targets.is_empty() {
        bail!("no fuzz target named {}", only.unwrap_or_default());
    }
    let mode: &[&str] = if dev { &["--dev"] } else { &[] };
    // Without a sanitizer: the targets are safe Rust, so libFuzzer's coverage guidance and
    // Rust's own checks (panics, overflow with debug assertions) find what matters, and the
    // build is much quicker.
    crate::setup::run_cmd(
        Command::new("cargo")
            .current_dir(root)
            .args(["+nightly", "fuzz", "build", "--sanitizer", "none"])
            .args(mode),
    )
    .context("building the fuzz targets")?;
    let mut ran = Vec::new();
    for target in &targets {
        // New inputs go to the working corpus under target/; the seeds in fuzz/corpus (kept
        // in the repository, with every past crash as a regression input) are read too.
        let corpus = root.join("target/fuzz-corpus").join(target);
        let seeds = root.join("fuzz/corpus").join(target);
        for dir in [&corpus, &seeds] {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        println!("fuzzing {target} for {seconds} s");
        let out = Command::new("cargo")
            .current_dir(root)
            .args(["+nightly", "fuzz", "run", "--sanitizer", "none"])
            .args(mode)
            .arg(target)
            .arg(&corpus)
            .arg(&seeds)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-timeout=10",
                "-rss_limit_mb=2048",
                "-max_len=65536",
                "-print_final_stats=1",
            ])
            .output()
            .with_context(|| format!("running fuzz target {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let entries = std::fs::read_dir(&corpus).map_or(0, |d| d.count());
        let result = Ran {
            target: target.clone(),
            executions: stat(&log, "stat::number_of_executed_units:"),
            coverage: last_field(&log, "cov:"),
            corpus: entries.to_string(),
            ok: out.status.success(),
        };
        if !result.ok {
            eprintln!("{log}");
        }
        ran.push(result);
    }
    let mut report = format!(
        "# Fuzzing: {seconds} s per target{}\n\n| target | executions | coverage (edges) | corpus | result |\n|---|---|---|---|---|\n",
        if dev { " (debug build)" } else { "" }
    );
    for r in &ran {
        report.push_str(&format!(
            "| {} | {} | {} | {} | {} |\n",
            r.target,
            r.executions,
            r.coverage,
            r.corpus,
            if r.ok {
                "clean"
            } else {
                "CRASH (see fuzz/artifacts)"
            }
        ));
    }
    println!("\n{report}");
    let out = root.join("target/fuzz-results.md");
    let _ = std::fs::create_dir_all(root.join("target"));
    std::fs::write(&out, &report).with_context(|| format!("writing {}", out.display()))?;
    let crashed: Vec<&str> = ran
        .iter()
        .filter(|r| !r.ok)
        .map(|r| r.target.as_str())
        .collect();
    if !crashed.is_empty() {
        bail!(
            "fuzz targets failed: {} (inputs in fuzz/artifacts/<target>/; reproduce with `cargo +nightly fuzz run --sanitizer none <target> <input>`)",
            crashed.join(", ")
        );
    }
    Ok(())
}

/// The nightly toolchain and cargo-fuzz, installed when missing.
fn ensure_tools() -> Result<()> {
    let has_nightly = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_nightly {
        crate::setup::run_cmd(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))
        .context("installing the nightly toolchain cargo fuzz needs")?;
    }
    let has_fuzz = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_fuzz {
        crate::setup::run_cmd(Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]))
            .context("installing cargo-fuzz")?;
    }
    Ok(())
}

/// The value after `key` on libFuzzer's final-stats line.
fn stat(log: &str, key: &str) -> String {
    log.lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix(key).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| "?".to_string())
}

/// The number after `key` (e.g. `cov:`) on the last status line that has it.
fn last_field(log: &str, key: &str) -> String {
    log.lines()
        .rev()
        .find_map(|l| {
            let rest = l.split(key).nth(1)?;
            rest.split_whitespace().next().map(str::to_string)
        })
        .unwrap_or_else(|| "?".to_string())
}
