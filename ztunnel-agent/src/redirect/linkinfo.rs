//! A pinned link's kernel view: link id, program id, and where it is attached (the cgroup id
//! of a cgroup link, the network namespace inode of an `sk_lookup` link). aya reports the
//! first two but not the attachment point, and a link that was detached behind the agent's
//! back (`bpftool link detach`) is only visible there: its cgroup id or netns inode reads 0.

use std::ffi::CString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// `enum bpf_cmd` values (include/uapi/linux/bpf.h).
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
/// `enum bpf_link_type` values.
const BPF_LINK_TYPE_CGROUP: u32 = 3;
const BPF_LINK_TYPE_NETNS: u32 = 5;

/// `union bpf_attr` as `BPF_OBJ_GET` reads it.
#[repr(C)]
#[derive(Default)]
struct ObjGetAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `union bpf_attr` as `BPF_OBJ_GET_INFO_BY_FD` reads it.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

/// `struct bpf_link_info`: three words, then a union that starts 8-aligned. The union is
/// sized generously; the kernel writes at most its own `sizeof` and accepts a larger, zeroed
/// buffer.
#[repr(C)]
struct RawLinkInfo {
    kind: u32,
    id: u32,
    prog_id: u32,
    _pad: u32,
    union: [u64; 30],
}

/// Where a link is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A cgroup link: the cgroup's id (its inode on cgroup v2; 0 once detached).
    Cgroup(u64),
    /// A network namespace link: the namespace's inode (0 once detached).
    Netns(u64),
    /// Another kind of link.
    Other(u32),
}

/// A pinned link as the kernel reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PinnedLinkInfo {
    /// Link id (as `bpftool link` shows it).
    pub id: u32,
    /// Program id.
    pub program_id: u32,
    /// Attachment point.
    pub target: Target,
}

// The layouts the kernel expects (include/uapi/linux/bpf.h).
const _: () = assert!(std::mem::size_of::<ObjGetAttr>() == 24);
const _: () = assert!(std::mem::size_of::<InfoAttr>() == 16);
const _: () = assert!(std::mem::offset_of!(RawLinkInfo, union) == 16);

/// Calls `bpf(cmd, attr, sizeof attr)`.
///
/// # Safety
/// `T` must be one of this module's `#[repr(C)]` attribute structs laid out as the kernel's
/// `union bpf_attr` for `cmd`, and every pointer it carries must point to memory that stays
/// valid (and, for output buffers, writable for the length given) during the call.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is live and exclusively borrowed, its size is passed with it and the
    // kernel reads and writes only within that size; the caller vouches for its layout and
    // for the pointers inside it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Reads the link pinned at `path`.
pub fn read(path: &Path) -> io::Result<PinnedLinkInfo> {
    let name = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} holds a NUL byte", path.display()),
        )
    })?;
    let mut get = ObjGetAttr {
        pathname: name.as_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: ObjGetAttr is BPF_OBJ_GET's layout; `pathname` points to `name`, alive and
    // NUL-terminated until after the call.
    let fd = unsafe { bpf(BPF_OBJ_GET, &mut get) }?;
    let fd = RawFd::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: BPF_OBJ_GET returned a new file descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut info = RawLinkInfo {
        kind: 0,
        id: 0,
        prog_id: 0,
        _pad: 0,
        union: [0; 30],
    };
    let mut attr = InfoAttr {
        bpf_fd: u32::try_from(std::os::fd::AsRawFd::as_raw_fd(&fd)).map_err(io::Error::other)?,
        info_len: u32::try_from(std::mem::size_of::<RawLinkInfo>()).map_err(io::Error::other)?,
        info: std::ptr::from_mut(&mut info) as u64,
    };
    // SAFETY: InfoAttr is BPF_OBJ_GET_INFO_BY_FD's layout; `info` points to `info`, alive,
    // writable and `info_len` bytes long until after the call.
    unsafe { bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr) }?;
    let first = info.union[0];
    let low = u32::from_ne_bytes(first.to_ne_bytes()[..4].try_into().unwrap_or([0; 4]));
    let target = match info.kind {
        BPF_LINK_TYPE_CGROUP => Target::Cgroup(first),
        BPF_LINK_TYPE_NETNS => Target::Netns(u64::from(low)),
        other => Target::Other(other),
    };
    Ok(PinnedLinkInfo {
        id: info.id,
        program_id: info.prog_id,
        target,
    })
}
