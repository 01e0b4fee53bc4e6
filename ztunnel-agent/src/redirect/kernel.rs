//! Start-up checks: the kernel, mounts and privileges the redirect needs, each failure named
//! with its fix, before anything is loaded.

use std::path::{Path, PathBuf};

/// Oldest kernel with everything used: SO_NETNS_COOKIE (5.14); sk_lookup (5.9),
/// getpeername hooks (5.8), cgroup bpf_link (5.7) come before it.
pub const MIN_KERNEL: (u32, u32) = (5, 14);
/// bpffs magic number (statfs f_type).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// cgroup2 magic number (statfs f_type).
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// A missing requirement.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Kernel too old.
    #[error("kernel {found} is too old: ztunnel-agent needs Linux {}.{}+ (SO_NETNS_COOKIE, sk_lookup, cgroup getpeername hooks); upgrade the node's kernel", MIN_KERNEL.0, MIN_KERNEL.1)]
    KernelTooOld {
        /// uname release.
        found: String,
    },
    /// Not privileged.
    #[error("missing capabilities {missing}: run ztunnel-agent as root or grant CAP_BPF, CAP_NET_ADMIN and CAP_SYS_ADMIN (privileged: true in the DaemonSet)")]
    Privileges {
        /// Names of missing capabilities.
        missing: String,
    },
    /// No cgroup v2.
    #[error("no cgroup v2 mount found in /proc/mounts: mount one (mount -t cgroup2 none /sys/fs/cgroup) or boot with systemd.unified_cgroup_hierarchy=1")]
    NoCgroup2,
    /// The configured cgroup is not cgroup v2.
    #[error("{0} is not a cgroup v2 directory: pass one with --cgroup-path")]
    NotCgroup2(PathBuf),
    /// bpffs absent and not mountable.
    #[error("{path} is not on a bpffs and mounting one failed ({reason}): mount it (mount -t bpf bpf /sys/fs/bpf) or mount the host's /sys/fs/bpf into the container")]
    NoBpffs {
        /// The pin directory's parent.
        path: PathBuf,
        /// Why mounting failed.
        reason: String,
    },
}

/// Checks the kernel version and privileges.
pub fn check_kernel_and_privileges() -> Result<(), Error> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let release = release.trim().to_string();
    if !kernel_at_least(&release, MIN_KERNEL) {
        return Err(Error::KernelTooOld { found: release });
    }
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let needed = [
        (39, "CAP_BPF"),
        (12, "CAP_NET_ADMIN"),
        (21, "CAP_SYS_ADMIN"),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(bit, _)| effective & (1u64 << bit) == 0)
        .map(|(_, name)| *name)
        .collect();
    if !missing.is_empty() {
        return Err(Error::Privileges {
            missing: missing.join(", "),
        });
    }
    Ok(())
}

fn kernel_at_least(release: &str, (major, minor): (u32, u32)) -> bool {
    let mut parts = release
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}

/// The cgroup v2 mount point, from /proc/mounts.
pub fn cgroup2_root() -> Result<PathBuf, Error> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(path))
        })
        .next()
        .ok_or(Error::NoCgroup2)
}

/// The default attach point: the kubepods cgroup if there is one, else the cgroup v2 root.
pub fn default_cgroup() -> Result<PathBuf, Error> {
    let root = cgroup2_root()?;
    for name in ["kubepods.slice", "kubepods"] {
        let candidate = root.join(name);
        if candidate.is_dir() {
            return Ok(candidate);
        }
    }
    Ok(root)
}

fn fs_type(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs is plain old data; all-zero is a valid value to be overwritten.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` valid writable memory.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    (rc == 0).then_some(st.f_type as i64)
}

/// Checks that the cgroup is a cgroup v2 directory.
pub fn check_cgroup(path: &Path) -> Result<(), Error> {
    if fs_type(path) == Some(CGROUP2_SUPER_MAGIC) {
        Ok(())
    } else {
        Err(Error::NotCgroup2(path.to_path_buf()))
    }
}

/// Where bpffs is conventionally mounted.
const BPFFS: &str = "/sys/fs/bpf";

/// Makes sure the pin directory is on bpffs, mounting one at /sys/fs/bpf if the pin directory
/// is below it and nothing is mounted there yet.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), Error> {
    let existing = pin_dir
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    if fs_type(existing) == Some(BPF_FS_MAGIC) {
        return Ok(());
    }
    let fail = |reason: String| Error::NoBpffs {
        path: pin_dir.to_path_buf(),
        reason,
    };
    if !pin_dir.starts_with(BPFFS) {
        return Err(fail(format!("it is not below {BPFFS}")));
    }
    std::fs::create_dir_all(BPFFS).map_err(|e| fail(e.to_string()))?;
    // SAFETY: all pointers are valid NUL-terminated strings; data may be null.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(fail(std::io::Error::last_os_error().to_string()));
    }
    tracing::info!(path = BPFFS, "mounted bpffs");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions_compare() {
        assert!(kernel_at_least("6.18.44-fc-v595", MIN_KERNEL));
        assert!(kernel_at_least("5.14.0", MIN_KERNEL));
        assert!(!kernel_at_least("5.10.0-28-amd64", MIN_KERNEL));
        assert!(!kernel_at_least("", MIN_KERNEL));
    }
}
