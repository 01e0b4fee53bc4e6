//! `cargo xtask setup`: installs, idempotently, what the eBPF build and the privileged tests
//! need on a fresh Debian machine. Everything comes from Debian's archive or crates.io.
//!
//! The recipe (see ../shared/EBPF.md): Debian's rustc-web ships a prebuilt `core` for
//! `bpfel-unknown-none`; rustup gets it as the linked toolchain `debian`; bpf-linker is built
//! against the same LLVM (22) that this rustc uses.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Debian packages the build and the tests use.
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "bpftool",
    "iproute2",
    "protobuf-compiler",
    "libprotobuf-dev",
    "curl",
    // jemalloc (the agent's allocator) is built from its C sources.
    "make",
    "gcc",
    // The privileged metrics test scrapes the agent with a real Prometheus and runs the
    // PromQL of Istio's ztunnel dashboard against it.
    "prometheus",
    // The DNS proxy tests forward to a real DNS server in a test namespace.
    "dnsmasq-base",
];
/// The bpf-linker release known to work with LLVM 22.
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian's rustc-web links this libLLVM; bpf-linker must use the same one.
const LIBLLVM: &str = "/usr/lib/x86_64-linux-gnu/libLLVM.so.22.1";
/// Name of the rustup toolchain that points at Debian's compiler.
pub const DEBIAN_TOOLCHAIN: &str = "debian";
/// The manifest validator (PyPI), with the Kubernetes schemas bundled.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// Where bpffs is mounted.
const BPFFS: &str = "/sys/fs/bpf";

/// Runs every step; each step checks first and does nothing when its piece is present.
pub fn run(root: &Path) -> Result<()> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !missing.is_empty() {
        eprintln!("setup: installing Debian packages: {}", missing.join(" "));
        apt_install(&missing)?;
    }
    link_debian_toolchain()?;
    install_bpf_linker(root)?;
    mount_bpffs()?;
    install_kubernetes_validate()?;
    Ok(())
}

fn install_kubernetes_validate() -> Result<()> {
    // Run as a module: a console script installed under pyenv has no shim until a rehash.
    let present = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--version"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if present {
        return Ok(());
    }
    eprintln!("setup: installing {KUBERNETES_VALIDATE} (manifest validation)");
    run_cmd(Command::new("python3").args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        KUBERNETES_VALIDATE,
    ]))
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn apt_install(packages: &[&str]) -> Result<()> {
    let lock = "DPkg::Lock::Timeout=600";
    run_cmd(Command::new("apt-get").args(["-o", lock, "update", "-q"]))?;
    run_cmd(
        Command::new("apt-get")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .args(["-o", lock, "install", "-y", "-q", "--no-install-recommends"])
            .args(packages),
    )
}

fn link_debian_toolchain() -> Result<()> {
    let ok = Command::new("rustc")
        .args([&format!("+{DEBIAN_TOOLCHAIN}"), "-vV"])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return Ok(());
    }
    eprintln!("setup: linking Debian's rustc into rustup as toolchain `{DEBIAN_TOOLCHAIN}`");
    run_cmd(Command::new("rustup").args(["toolchain", "link", DEBIAN_TOOLCHAIN, "/usr"]))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

fn install_bpf_linker(root: &Path) -> Result<()> {
    let linker = cargo_home().join("bin").join("bpf-linker");
    let installed = Command::new(&linker)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    if !Path::new(LIBLLVM).exists() {
        bail!("{LIBLLVM} is missing although rustc-web is installed: is this Debian 12 with the rustc-web 1.96 package?");
    }
    // bpf-linker's build looks for <prefix>/lib/libLLVM.so; a symlink to the library that
    // rustc-web already brings spares the 400 MiB llvm-22-dev package.
    let prefix = root.join("target").join("llvm-prefix");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    let so = lib.join("libLLVM.so");
    if !so.exists() {
        std::os::unix::fs::symlink(LIBLLVM, &so)
            .with_context(|| format!("linking {} to {LIBLLVM}", so.display()))?;
    }
    eprintln!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (2-4 minutes)");
    run_cmd(
        Command::new("cargo")
            .env("LLVM_PREFIX", &prefix)
            .args(["install", "--locked", "--force"])
            .arg(format!("bpf-linker@{BPF_LINKER_VERSION}"))
            .args(["--no-default-features", "--features", "llvm-22"]),
    )
}

fn mount_bpffs() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(BPFFS) && l.contains(" bpf "))
    {
        return Ok(());
    }
    eprintln!("setup: mounting bpffs at {BPFFS}");
    std::fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    run_cmd(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

/// Runs a command with inherited output and fails with its name when it fails.
pub fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}
