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
//!
//! Each direction's accounting (`RELAY_FLOW`, `RELAY_ALLOWED`) is made before its socket
//! joins `RELAY_SOCKS`: the program charges what it relays against what the agent allows
//! and hands the direction back past it (see ztunnel-ebpf's `relay`; the agent's side is
//! `proxy::splice`).

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Mutex;

use aya::maps::{HashMap, MapData, SockHash};
use aya::programs::SkSkb;
use aya::Ebpf;
use ztunnel_common::{maps, programs, RelayFlow, RELAY_BOUND, RELAY_RCVBUF};

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
    flow: HashMap<MapData, u64, RelayFlow>,
    allowed: HashMap<MapData, u64, u64>,
    read: HashMap<MapData, u64, u64>,
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
        let flow: HashMap<MapData, u64, RelayFlow> = take_map(ebpf, maps::RELAY_FLOW)?;
        let allowed: HashMap<MapData, u64, u64> = take_map(ebpf, maps::RELAY_ALLOWED)?;
        let read: HashMap<MapData, u64, u64> = take_map(ebpf, maps::RELAY_READ)?;
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
            maps: Mutex::new(RelayMaps {
                socks,
                targets,
                flow,
                allowed,
                read,
            }),
        })
    }

    /// Hands `first` and `second` (two connected TCP sockets of one connection, neither
    /// holding a half-read packet: whatever they have queued is relayed whole) to the kernel
    /// as far as it takes them. Keep the engagement as long as the relay holds the sockets:
    /// dropping it drops the program's accounting of their directions.
    pub fn engage(&self, first: BorrowedFd<'_>, second: BorrowedFd<'_>) -> Engagement<'_> {
        let mut engagement = Engagement {
            relay: self,
            engaged: Engaged::Neither,
            cookies: [0; 2],
        };
        let cookie = |fd: BorrowedFd<'_>| socket2::SockRef::from(&fd).cookie();
        let (first_cookie, second_cookie) = match (cookie(first), cookie(second)) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(error = %e, "no socket cookie: the connection is spliced");
                return engagement;
            }
        };
        engagement.cookies = [first_cookie, second_cookie];
        engagement.engaged = self.take(first, second, engagement.cookies);
        engagement
    }

    /// The map updates of [`Self::engage`]; each socket the program takes gets the receive
    /// buffer its handed-back packets may fill ([`RELAY_RCVBUF`]).
    fn take(&self, first: BorrowedFd<'_>, second: BorrowedFd<'_>, cookies: [u64; 2]) -> Engaged {
        let [first_cookie, second_cookie] = cookies;
        let mut maps = self.maps();
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
        // Each direction's accounting before its program: without it the program hands
        // the direction straight back.
        let account = |maps: &mut RelayMaps, cookie: u64| {
            maps.flow.insert(cookie, RelayFlow::default(), 0)?;
            maps.allowed.insert(cookie, RELAY_BOUND, 0)
        };
        if let Err(e) = account(&mut maps, first_cookie)
            .and_then(|()| maps.socks.insert(first_cookie, first.as_raw_fd(), 0))
        {
            refused(e);
            let _ = maps.targets.remove(&first_cookie);
            let _ = maps.targets.remove(&second_cookie);
            forget_flow(&mut maps, first_cookie);
            return Engaged::Neither;
        }
        taken(first);
        if let Err(e) = account(&mut maps, second_cookie)
            .and_then(|()| maps.socks.insert(second_cookie, second.as_raw_fd(), 0))
        {
            // The first socket's bytes already flow; the second's stay queued for the agent.
            refused(e);
            forget_flow(&mut maps, second_cookie);
            return Engaged::First;
        }
        taken(second);
        Engaged::Both
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, RelayMaps> {
        // A panic while holding the maps cannot leave them inconsistent (each update is
        // one syscall): carry on.
        self.maps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The direction from the socket with this cookie, as the program counted it. Made
    /// before the program could see the socket and dropped only with its [`Engagement`], it
    /// is missing only if something else removed it: then what the destination must take
    /// first is unknown, and the relay fails rather than risk reordering.
    pub fn flow(&self, cookie: u64) -> std::io::Result<RelayFlow> {
        self.maps().flow.get(&cookie, 0).map_err(|e| {
            std::io::Error::other(format!(
                "a kernel-relayed direction lost its accounting: {e}"
            ))
        })
    }

    /// Lets the direction from the socket with this cookie charge up to `allowed` in all.
    pub fn allow(&self, cookie: u64, allowed: u64) -> Result<(), aya::maps::MapError> {
        self.maps().allowed.insert(cookie, allowed, 0)
    }

    /// Tells the program how much of the handed-back direction from the socket with this
    /// cookie the agent has read.
    pub fn set_read(&self, cookie: u64, read: u64) -> Result<(), aya::maps::MapError> {
        self.maps().read.insert(cookie, read, 0)
    }

    /// Drops the accounting of the direction from the socket with this cookie (its relay
    /// has ended).
    fn forget(&self, cookie: u64) {
        forget_flow(&mut self.maps(), cookie);
    }
}

/// A connection handed to the kernel relay: what the kernel took, and the cookies of the two
/// sockets (`[first, second]`), under which the program keeps each direction's accounting.
/// Dropped, it drops that accounting; kept until the relay no longer holds the sockets
/// (closing takes them out of every map), no program can be counting into an entry that is
/// gone.
pub struct Engagement<'r> {
    relay: &'r KernelRelay,
    /// Which sockets the kernel took.
    pub engaged: Engaged,
    /// Each socket's cookie (0 where it could not be read: nothing was engaged).
    pub cookies: [u64; 2],
}

impl Drop for Engagement<'_> {
    fn drop(&mut self) {
        // Nothing taken: nothing kept (a refusal cleans up at once).
        if self.engaged == Engaged::Neither {
            return;
        }
        for cookie in self.cookies {
            self.relay.forget(cookie);
        }
    }
}

fn forget_flow(maps: &mut RelayMaps, cookie: u64) {
    // Absent already (never made, or forgotten): nothing to do.
    let _ = maps.flow.remove(&cookie);
    let _ = maps.allowed.remove(&cookie);
    let _ = maps.read.remove(&cookie);
}

/// A socket the program took: what it received before it joined `RELAY_SOCKS` is handed to
/// the program, and its receive buffer is set to what handed-back packets may fill while the
/// agent does not read (the relayed bytes never wait there; capped by net.core.rmem_max).
fn taken(fd: BorrowedFd<'_>) {
    // Only an invalid socket fails either; its connection fails on its own.
    if let Err(e) = kick_receive(fd) {
        tracing::debug!(error = %e, "SO_RCVLOWAT not set on a relayed socket");
    }
    if let Err(e) = socket2::SockRef::from(&fd).set_recv_buffer_size(RELAY_RCVBUF as usize) {
        tracing::debug!(error = %e, "SO_RCVBUF not set on a relayed socket");
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
