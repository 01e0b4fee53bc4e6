//! Network namespaces: the agent's own and each enrolled pod's. Sockets are created inside a
//! pod's namespace by switching the calling thread there for the duration of a synchronous
//! closure (no `.await` in between), then switching back.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::socket::{netns_cookie, NetnsCookie};

/// Errors entering or inspecting a network namespace.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The namespace file could not be opened.
    #[error("cannot open network namespace {path}: does the pod still exist?")]
    Open {
        /// The path given.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// setns(2) failed.
    #[error("cannot enter network namespace {what}: {hint}")]
    Enter {
        /// Which namespace.
        what: String,
        /// What the failure means (see [`enter_hint`]).
        hint: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A socket to read the namespace cookie could not be made.
    #[error("cannot read the cookie of network namespace {what}: kernel 5.14+ is needed for SO_NETNS_COOKIE")]
    Cookie {
        /// Which namespace.
        what: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What a failed setns(2) means: EINVAL is a file that is no network namespace, EPERM a
/// missing capability.
fn enter_hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::EINVAL) => {
            "the file is not a network namespace (whoever named or sent it gave the wrong one)"
        }
        Some(libc::EPERM) => "the agent needs CAP_SYS_ADMIN",
        _ => "setns(2) failed",
    }
}

/// The agent's own network namespace, to return to after working in a pod's.
#[derive(Clone, Debug)]
pub struct HostNetns {
    file: Arc<File>,
}

impl HostNetns {
    /// Captures the namespace the calling thread is in now (call at start-up).
    pub fn current() -> Result<Self, Error> {
        let path = Path::new("/proc/thread-self/ns/net");
        let file = File::open(path).map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Self {
            file: Arc::new(file),
        })
    }
}

/// An enrolled pod's network namespace.
#[derive(Clone, Debug)]
pub struct PodNetns {
    file: Arc<File>,
    cookie: NetnsCookie,
    host: HostNetns,
    what: String,
}

impl PodNetns {
    /// Opens a namespace by path (for example `/var/run/netns/productpage`).
    pub fn open(path: &Path, host: &HostNetns) -> Result<Self, Error> {
        let file = File::open(path).map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_file(file, path.display().to_string(), host)
    }

    /// Adopts a namespace fd (for example one received over ZDS).
    pub fn from_file(file: File, what: String, host: &HostNetns) -> Result<Self, Error> {
        let mut netns = Self {
            file: Arc::new(file),
            cookie: NetnsCookie(0),
            host: host.clone(),
            what,
        };
        let cookie = netns.run(|| {
            let probe = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
            netns_cookie(probe.as_fd())
        })?;
        netns.cookie = cookie.map_err(|source| Error::Cookie {
            what: netns.what.clone(),
            source,
        })?;
        Ok(netns)
    }

    /// The cookie the kernel programs key this pod by.
    pub fn cookie(&self) -> NetnsCookie {
        self.cookie
    }

    /// The namespace file (to attach `sk_lookup` to it).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Runs `f` on this thread inside the pod's namespace and returns to the agent's.
    /// `f` must not block for long: it holds the calling (possibly runtime) thread.
    pub fn run<R>(&self, f: impl FnOnce() -> R) -> Result<R, Error> {
        setns(&self.file).map_err(|source| Error::Enter {
            hint: enter_hint(&source),
            what: self.what.clone(),
            source,
        })?;
        let result = f();
        // Returning can only fail if the host namespace fd were invalid; it is held open for
        // the agent's lifetime, so a failure here means the process is beyond repair.
        if let Err(e) = setns(&self.host.file) {
            tracing::error!(error = %e, "cannot return to the agent's network namespace; exiting");
            std::process::abort();
        }
        Ok(result)
    }
}

fn setns(file: &File) -> io::Result<()> {
    // SAFETY: setns on a valid namespace fd changes only this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
