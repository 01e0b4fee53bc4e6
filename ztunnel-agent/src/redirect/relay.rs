//! The kernel relay's maps (the kernel side is ztunnel-ebpf's `relay`): hands the two sockets
//! of a plain passthrough connection to a stream verdict program that sends what one
//! receives out of the other.
//!
//! Engaging a connection takes four map updates in an order that never loses or reorders a
//! byte: both sockets first go into `RELAY_TARGETS` (no program there, so their data stays
//! queued where it is); then each goes into `RELAY_SOCKS`, whose program from then on
//! relays what it receives, starting with what was already queued (the receive callback is
//! run once by hand for that). A socket the kernel refuses (an unusual state, full maps)
//! leaves its direction to the agent.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Mutex;

use aya::maps::{MapData, SockHash};
use aya::programs::SkSkb;
use aya::Ebpf;
use ztunnel_common::{maps, programs};

use super::{program, take_map, Error};
use crate::socket::kick_receive;

/// Which sockets' incoming bytes the kernel relays after [`KernelRelay::engage`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engaged {
    /// Neither: the agent moves both directions.
    Neither,
    /// The first socket's (first -> second); the agent moves the other direction.
    First,
    /// Both.
    Both,
}

struct RelayMaps {
    socks: SockHash<MapData, u64>,
    targets: SockHash<MapData, u64>,
}

/// The loaded relay program and its two maps.
pub struct KernelRelay {
    maps: Mutex<RelayMaps>,
}

impl std::fmt::Debug for KernelRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelRelay").finish_non_exhaustive()
    }
}

impl KernelRelay {
    /// Loads the stream verdict program from `ebpf` and attaches it to `RELAY_SOCKS`. The
    /// attachment lives as long as `ebpf`.
    pub(super) fn load(ebpf: &mut Ebpf) -> Result<Self, Error> {
        let socks: SockHash<MapData, u64> = take_map(ebpf, maps::RELAY_SOCKS)?;
        let targets: SockHash<MapData, u64> = take_map(ebpf, maps::RELAY_TARGETS)?;
        let verdict: &mut SkSkb = program(ebpf, programs::RELAY)?;
        let err = |what| {
            move |source| Error::Program {
                what,
                name: programs::RELAY,
                source,
            }
        };
        verdict.load().map_err(err("loading"))?;
        verdict.attach(socks.fd()).map_err(err("attaching"))?;
        Ok(Self {
            maps: Mutex::new(RelayMaps { socks, targets }),
        })
    }

    /// Hands `first` and `second` (two connected TCP sockets of one connection, neither
    /// holding a half-read packet: whatever they have queued is relayed whole) to the kernel
    /// as far as it takes them.
    pub fn engage(&self, first: BorrowedFd<'_>, second: BorrowedFd<'_>) -> Engaged {
        let cookie = |fd: BorrowedFd<'_>| socket2::SockRef::from(&fd).cookie();
        let (first_cookie, second_cookie) = match (cookie(first), cookie(second)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "no socket cookie: the connection is spliced");
                return Engaged::Neither;
            }
        };
        // A panic while holding the maps cannot leave them inconsistent (each update is
        // one syscall): carry on.
        let mut maps = self
            .maps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let refused = |e: aya::maps::MapError| {
            tracing::debug!(error = %e, "the kernel relay refused a socket: the agent moves its bytes");
        };
        // Where each socket's bytes go: the other socket, under the sender's cookie.
        if let Err(e) = maps.targets.insert(first_cookie, second.as_raw_fd(), 0) {
            refused(e);
            return Engaged::Neither;
        }
        if let Err(e) = maps.targets.insert(second_cookie, first.as_raw_fd(), 0) {
            refused(e);
            let _ = maps.targets.remove(&first_cookie);
            return Engaged::Neither;
        }
        if let Err(e) = maps.socks.insert(first_cookie, first.as_raw_fd(), 0) {
            refused(e);
            let _ = maps.targets.remove(&first_cookie);
            let _ = maps.targets.remove(&second_cookie);
            return Engaged::Neither;
        }
        kick(first);
        if let Err(e) = maps.socks.insert(second_cookie, second.as_raw_fd(), 0) {
            // The first socket's bytes already flow; the second's stay queued for the agent.
            refused(e);
            return Engaged::First;
        }
        kick(second);
        Engaged::Both
    }
}

/// Hands what `fd` received before it joined `RELAY_SOCKS` to the program.
fn kick(fd: BorrowedFd<'_>) {
    if let Err(e) = kick_receive(fd) {
        // Only an invalid socket fails here; its connection fails on its own.
        tracing::debug!(error = %e, "SO_RCVLOWAT not set on a relayed socket");
    }
}

#[cfg(test)]
pub mod testing {
    //! A kernel relay of its own for tests (needs root): the embedded object loaded with no
    //! pinning, so nothing is shared with an agent on the machine.

    use super::KernelRelay;

    /// The loaded object (it holds the program's attachment) and the relay; None (the test
    /// skips) when not root, unless CI or ZTUNNEL_E2E_REQUIRED forbid skipping, as the
    /// privileged end-to-end tests do.
    pub fn relay() -> Option<(aya::Ebpf, KernelRelay)> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            let ci = std::env::var("CI").is_ok_and(|v| !matches!(v.as_str(), "" | "0" | "false"));
            assert!(
                !ci && std::env::var_os("ZTUNNEL_E2E_REQUIRED").is_none(),
                "privileged test cannot run: not root, and CI / ZTUNNEL_E2E_REQUIRED forbid skipping"
            );
            eprintln!("skipping privileged test: run as root (cargo xtask test does)");
            return None;
        }
        let mut ebpf = aya::EbpfLoader::new()
            .load(super::super::EBPF_OBJECT)
            .expect("the embedded eBPF object loads (as root)");
        let relay = KernelRelay::load(&mut ebpf).expect("the relay program attaches");
        Some((ebpf, relay))
    }
}
