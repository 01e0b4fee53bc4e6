//! Socket options the kernel ABI needs: netns cookies, the agent's mark, `SO_ORIGINAL_DST`,
//! the receive kick and byte totals of relayed TCP sockets, and their end-watch.

use std::io;
use std::mem::size_of;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsRawFd, BorrowedFd};

use ztunnel_common::{AGENT_SOCKET_MARK, AGENT_TRANSPARENT_MARK};

/// The network namespace cookie the kernel programs see (`bpf_get_netns_cookie`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NetnsCookie(pub u64);

impl std::fmt::Display for NetnsCookie {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// `SO_NETNS_COOKIE` (Linux 5.14), not in every libc crate version.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Reads the cookie of the network namespace the socket was created in.
pub fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<NetnsCookie> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: the fd is a valid socket for the borrow; `cookie` and `len` are valid writable
    // memory of the size passed.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(NetnsCookie(cookie))
}

/// Makes the socket's receive callback run now for what it already holds: setting
/// `SO_RCVLOWAT` on a TCP socket signals readiness at once when data is waiting, which for a
/// socket just given a stream verdict program hands that data to the program.
pub fn kick_receive(fd: BorrowedFd<'_>) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: the fd is a valid socket for the borrow; the option value is a c_int we own.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&one as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A TCP socket's byte totals as its kernel counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpTotals {
    /// Payload bytes received in order (`tcpi_bytes_received`).
    pub received: u64,
    /// Payload bytes written to the socket: acknowledged by the peer, or still queued.
    pub written: u64,
}

/// Reads a TCP socket's byte totals. `written` never overstates: the acknowledged count is
/// read before the queue, so an ACK in between can only make it lower.
pub fn tcp_totals(fd: BorrowedFd<'_>) -> io::Result<TcpTotals> {
    let info = tcp_info(fd)?;
    Ok(TcpTotals {
        received: info.tcpi_bytes_received,
        written: info.tcpi_bytes_acked + unacked(fd)?,
    })
}

/// What has been written to a TCP socket nothing writes to meanwhile, exactly: the
/// acknowledged count is read on both sides of the queue until it holds still (an ACK
/// between [`tcp_totals`]' two reads makes its `written` low by what that ACK covered).
pub fn tcp_written_exact(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // With nothing written, only ACKs of what is in flight move it: a few at most.
    for _ in 0..64 {
        let acked = tcp_info(fd)?.tcpi_bytes_acked;
        let queued = unacked(fd)?;
        if tcp_info(fd)?.tcpi_bytes_acked == acked {
            return Ok(acked + queued);
        }
    }
    Err(io::Error::other(
        "a socket's acknowledged byte count kept moving while nothing was written to it",
    ))
}

fn tcp_info(fd: BorrowedFd<'_>) -> io::Result<libc::tcp_info> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: the fd is a valid socket for the borrow; `info` and `len` are valid writable
    // memory of the size passed (the kernel writes at most `len` bytes).
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// Bytes written to the socket and not yet acknowledged (`SIOCOUTQ`).
fn unacked(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one c_int through the pointer we own.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(queued.max(0) as u64)
}

/// Marks a socket as the agent's own so outbound capture never loops it back.
pub fn set_agent_mark(socket: &socket2::Socket) -> io::Result<()> {
    socket.set_mark(AGENT_SOCKET_MARK)
}

/// A TCP socket that may bind an address the namespace does not have (the client's, for
/// source-address preservation): `IP_TRANSPARENT` / `IPV6_TRANSPARENT` (CAP_NET_ADMIN), the
/// mark the pod's reply rule matches, and `SO_REUSEADDR` so a port a closed connection of the
/// same client still holds in TIME_WAIT can be bound again (connect() still refuses an
/// address pair in use). Create it inside the pod's namespace.
pub fn transparent_socket(ipv6: bool) -> io::Result<socket2::Socket> {
    let domain = if ipv6 {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    // Non-blocking from creation; TCP_NODELAY and keepalive come once it is connected
    // (`MeshContext::socket_options`).
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM.nonblocking(), None)?;
    if ipv6 {
        let on: libc::c_int = 1;
        // SAFETY: a valid socket fd; `on` is a readable c_int of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_IPV6,
                libc::IPV6_TRANSPARENT,
                (&on as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    } else {
        socket.set_ip_transparent(true)?;
    }
    socket.set_mark(AGENT_TRANSPARENT_MARK)?;
    socket.set_reuse_address(true)?;
    Ok(socket)
}

/// The destination iptables' REDIRECT recorded, when capture was done that way
/// (`SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST`, both 80).
pub fn so_original_dst(fd: BorrowedFd<'_>, ipv6: bool) -> io::Result<SocketAddr> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let level = if ipv6 { libc::SOL_IPV6 } else { libc::SOL_IP };
    // SAFETY: valid fd for the borrow; storage/len are writable and sized as passed.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            level,
            SO_ORIGINAL_DST,
            (&mut storage as *mut libc::sockaddr_storage).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (family says so), which fits in storage.
            let sin: libc::sockaddr_in =
                unsafe { *(&storage as *const libc::sockaddr_storage).cast() };
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 (family says so), which fits in storage.
            let sin6: libc::sockaddr_in6 =
                unsafe { *(&storage as *const libc::sockaddr_storage).cast() };
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                0,
                0,
            )))
        }
        family => Err(io::Error::other(format!(
            "SO_ORIGINAL_DST returned address family {family}"
        ))),
    }
}

/// TCP keepalive for every socket the agent accepts or opens (upstream's `KEEPALIVE_*`
/// settings): a peer that vanished without a FIN or RST is noticed, and middleboxes that
/// drop idle flows (cloud load balancers, conntrack) keep them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe (`TCP_KEEPIDLE`).
    pub time: std::time::Duration,
    /// Between probes (`TCP_KEEPINTVL`).
    pub interval: std::time::Duration,
    /// Unanswered probes before the connection is dropped (`TCP_KEEPCNT`).
    pub retries: u32,
}

impl Default for Keepalive {
    /// Upstream ztunnel's defaults: 180 s, 180 s, 9 probes.
    fn default() -> Self {
        Self {
            time: std::time::Duration::from_secs(180),
            interval: std::time::Duration::from_secs(180),
            retries: 9,
        }
    }
}

impl Keepalive {
    /// Turns keepalive on for `socket` with these timings.
    pub fn apply(&self, socket: &impl std::os::fd::AsFd) -> io::Result<()> {
        let params = socket2::TcpKeepalive::new()
            .with_time(self.time)
            .with_interval(self.interval)
            .with_retries(self.retries);
        socket2::SockRef::from(socket).set_tcp_keepalive(&params)
    }
}

/// The options every connection's socket gets: `TCP_NODELAY` (small writes such as a
/// CONNECT's 200 or a request's reply go out at once instead of waiting up to 40 ms for the
/// peer's delayed ACK) and, unless off, TCP keepalive. Set on a listener before it listens,
/// they are every accepted socket's from the start: Linux copies the listener's
/// `TCP_NODELAY` and keepalive settings into each socket it accepts, which saves four of
/// five setsockopt calls per accepted connection (one getsockopt checks them).
pub fn connection_options(
    socket: &impl std::os::fd::AsFd,
    keepalive: Option<&Keepalive>,
) -> io::Result<()> {
    socket2::SockRef::from(socket).set_nodelay(true)?;
    match keepalive {
        Some(keepalive) => keepalive.apply(socket),
        None => Ok(()),
    }
}

/// The `epoll_event.u64` of the watched socket and of its peer in an [`EndWatch`].
const WATCHED: u64 = 0;
const PEER: u64 = 1;

/// How a kernel-relayed direction's watch ended well.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Watched {
    /// The peer's FIN, and nothing left to read.
    Fin,
    /// The peer's FIN, with payload left on the socket for the agent (a direction the
    /// program handed back leaves it there; otherwise the kernel did what it should not).
    Payload,
}

/// Watches a TCP socket whose received bytes the kernel relays, for the end of that
/// direction: its peer's FIN, or an error on it or on the socket its bytes go to. An epoll
/// instance of its own, registered with the runtime, wakes only for those, never for the
/// data the kernel moves. (Not for readable data either: the kernel signals it after every
/// batch its program handles, relayed or not.)
pub struct EndWatch {
    epoll: tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>,
}

impl EndWatch {
    /// Watches `socket` for its peer's FIN and for errors, and `to` (where its bytes go) for
    /// errors and a hang-up.
    pub fn new(socket: BorrowedFd<'_>, to: BorrowedFd<'_>) -> io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: epoll_create1 with a valid flag; the returned fd is checked below.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: epoll_create1 succeeded: the fd is new and owned by nobody else.
        let epoll = unsafe { std::os::fd::OwnedFd::from_raw_fd(epfd) };
        // The FIN is RDHUP; errors and a full hang-up are reported whatever the mask.
        for (fd, events, data) in [(socket, libc::EPOLLRDHUP as u32, WATCHED), (to, 0, PEER)] {
            let mut event = libc::epoll_event { events, u64: data };
            // SAFETY: both fds are valid for the call; `event` is a valid epoll_event we
            // own.
            let rc = unsafe {
                libc::epoll_ctl(
                    epoll.as_raw_fd(),
                    libc::EPOLL_CTL_ADD,
                    fd.as_raw_fd(),
                    &mut event,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the same fd until the
        // AsyncFd is dropped.
        let epoll = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(epoll, tokio::io::Interest::READABLE)
        }
        .map_err(io::Error::from)?;
        Ok(Self { epoll })
    }

    /// Waits for the end: `socket`'s FIN (with or without payload left on it), the error on
    /// `socket`, or an error if `to` failed or closed first (its bytes would have nowhere to
    /// go). Cancel-safe.
    pub async fn wait(&self, socket: BorrowedFd<'_>, to: BorrowedFd<'_>) -> io::Result<Watched> {
        loop {
            let mut guard = self.epoll.readable().await?;
            let mut ready = [libc::epoll_event { events: 0, u64: 0 }; 2];
            // SAFETY: the epoll fd is valid; `ready` holds the 2 events asked for; a zero
            // timeout never blocks.
            let n = unsafe { libc::epoll_wait(self.epoll.as_raw_fd(), ready.as_mut_ptr(), 2, 0) };
            if n <= 0 {
                guard.clear_ready();
                continue;
            }
            if ready[..n as usize].iter().any(|e| e.u64 == PEER) {
                let error = socket2::SockRef::from(&to).take_error()?;
                return Err(error.unwrap_or_else(|| {
                    io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "the socket the kernel relays to closed",
                    )
                }));
            }
            let mut byte = [0u8; 1];
            // SAFETY: the socket fd is valid; the buffer is one writable byte we own. A
            // peek: handed-back payload stays for the agent to read.
            let read = unsafe {
                libc::recv(
                    socket.as_raw_fd(),
                    byte.as_mut_ptr().cast(),
                    1,
                    libc::MSG_DONTWAIT | libc::MSG_PEEK,
                )
            };
            match read {
                0 => return Ok(Watched::Fin),
                n if n > 0 => return Ok(Watched::Payload),
                _ => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::WouldBlock {
                        return Err(e);
                    }
                    guard.clear_ready();
                }
            }
        }
    }
}
