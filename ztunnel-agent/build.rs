//! Builds the kernel programs (ztunnel-ebpf) with Debian's bpf-capable rustc and embeds the
//! object; compiles the protos. Fails with one line pointing at `cargo xtask setup` when the
//! eBPF toolchain is missing.

use std::path::Path;
use std::process::Command;

fn main() -> anyhow::Result<()> {
    println!("cargo::rerun-if-changed=../ztunnel-common/src");
    println!("cargo::rerun-if-changed=../proto");
    if let Some(missing) = missing_toolchain() {
        println!("cargo::error=the eBPF toolchain is missing ({missing}): run `cargo xtask setup`");
        return Ok(());
    }
    // One call for all files: they import each other across packages.
    tonic_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_protos(
            &[
                "../proto/zds.proto",
                "../proto/workload.proto",
                "../proto/authorization.proto",
                "../proto/ca.proto",
                "../proto/envoy_core.proto",
                "../proto/google_rpc_status.proto",
                "../proto/discovery.proto",
            ],
            &["../proto"],
        )?;
    let ebpf = aya_build::Package {
        name: "ztunnel-ebpf",
        root_dir: "../ztunnel-ebpf",
        ..Default::default()
    };
    aya_build::build_ebpf([ebpf], aya_build::Toolchain::Custom("debian"))
}

/// What of the eBPF toolchain (see ../shared/EBPF.md and xtask/src/setup.rs) is absent.
fn missing_toolchain() -> Option<&'static str> {
    let linked = Command::new("rustc")
        .args(["+debian", "-vV"])
        .env_remove("RUSTC")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !linked {
        return Some("no rustup toolchain `debian`");
    }
    if !Path::new("/usr/lib/rustlib/bpfel-unknown-none/lib").is_dir() {
        return Some("no prebuilt core for bpfel-unknown-none");
    }
    let linker = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !linker {
        return Some("no bpf-linker on PATH");
    }
    if Command::new("protoc").arg("--version").output().is_err() {
        return Some("no protoc on PATH");
    }
    if !Path::new("/usr/include/google/protobuf/struct.proto").exists() {
        return Some("no protobuf well-known types (libprotobuf-dev)");
    }
    None
}
