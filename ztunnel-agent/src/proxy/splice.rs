//! Zero-copy relay between two TCP sockets (plain passthrough). Where the kernel relay is on
//! (`redirect::KernelRelay`) a direction's bytes never reach the agent: the kernel sends
//! what one socket receives out of the other, and the agent only waits for that direction's
//! end. Otherwise each direction moves bytes socket -> pipe -> socket with splice(2), so
//! payload never enters userspace either, but the agent is woken for every chunk.
//!
//! Either way half-closes propagate in order (the FIN goes out only once every byte before
//! it has), an error either way resets both sides, and each direction's bytes are counted as
//! having reached the destination socket: splice counts as it goes, the kernel relay from
//! the sockets' own totals when the direction ends.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::connection::Meter;
use crate::redirect::{Engaged, KernelRelay};
use crate::socket::tcp_totals;

/// How much one splice call moves at most (the pipe is sized to match).
const CHUNK: usize = 256 * 1024;

/// A non-blocking pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array we pass; flags are valid.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both fds are new and owned by nobody else.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // A larger pipe means fewer calls; failing to grow it only costs speed.
    // SAFETY: fcntl on a valid pipe fd with an integer argument.
    unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
    Ok((r, w))
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are valid for the duration of the call; null offsets mean "use the
    // file position", which is what sockets and pipes require.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A spliced connection is handed to the kernel relay once it has shown itself
/// interactive: this many small moves (both directions together), none large.
const ENGAGE_AFTER_SMALL: u32 = 8;
/// A move of at most this much is small. One larger marks the connection as bulk, which
/// stays spliced: splice moves bulk with less CPU per byte than the kernel relay, whose
/// per-packet work pays off only in latency and request rate.
const SMALL_MOVE: usize = 16 * 1024;

/// What the two spliced directions of one connection share (one task polls both).
struct Splicing<'r> {
    /// Where the connection may be handed once interactive (None: spliced to the end).
    relay: Option<&'r KernelRelay>,
    /// Per direction: waiting for its source with an empty pipe (nothing in flight).
    idle: [AtomicBool; 2],
    /// Per direction: ended (EOF passed on).
    ended: [AtomicBool; 2],
    small_moves: AtomicU32,
    bulk: AtomicBool,
}

impl Splicing<'_> {
    fn new(relay: Option<&KernelRelay>) -> Splicing<'_> {
        Splicing {
            relay,
            idle: Default::default(),
            ended: Default::default(),
            small_moves: AtomicU32::new(0),
            bulk: AtomicBool::new(false),
        }
    }

    /// Whether direction `i`, idle itself, hands the connection to the kernel now: only
    /// while the other direction is idle too, so no byte is in either pipe.
    fn engage_now(&self, i: usize) -> bool {
        let other = 1 - i;
        self.relay.is_some()
            && !self.bulk.load(Ordering::Relaxed)
            && self.small_moves.load(Ordering::Relaxed) >= ENGAGE_AFTER_SMALL
            && self.idle[other].load(Ordering::Relaxed)
            && !self.ended[other].load(Ordering::Relaxed)
    }

    fn moved(&self, n: usize) {
        if n > SMALL_MOVE {
            self.bulk.store(true, Ordering::Relaxed);
        } else {
            self.small_moves.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// How a spliced direction stopped.
enum Spliced {
    /// EOF passed on (`to`'s write side shut down).
    Ended,
    /// Both directions idle and the connection interactive: the kernel relay takes over.
    Engage,
}

/// Moves `from` to `to` (direction `i` of `shared`) until EOF, then shuts `to`'s write side
/// down; counts what reaches `to` in `meter` as it goes. Stops early, between moves, when
/// the connection is to be handed to the kernel relay.
async fn one_way(
    i: usize,
    from: &TcpStream,
    to: &TcpStream,
    meter: &Meter,
    shared: &Splicing<'_>,
) -> io::Result<Spliced> {
    let (pipe_r, pipe_w) = pipe()?;
    loop {
        if shared.engage_now(i) {
            return Ok(Spliced::Engage);
        }
        // Fill the pipe from the source socket.
        shared.idle[i].store(true, Ordering::Relaxed);
        from.readable().await?;
        shared.idle[i].store(false, Ordering::Relaxed);
        let moved = from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), pipe_w.as_raw_fd(), CHUNK)
        });
        let mut in_pipe = match moved {
            Ok(0) => {
                socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
                shared.ended[i].store(true, Ordering::Relaxed);
                return Ok(Spliced::Ended);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        shared.moved(in_pipe);
        // Drain it into the destination socket.
        while in_pipe > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe_r.as_raw_fd(), to.as_raw_fd(), in_pipe)
            }) {
                Ok(n) => {
                    in_pipe -= n;
                    meter.add(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Splices both ways until both have ended (false) or until the connection is to be handed
/// to the kernel relay (true), with both pipes empty.
async fn splice_both(
    a: &TcpStream,
    b: &TcpStream,
    ab: &Meter,
    ba: &Meter,
    relay: Option<&KernelRelay>,
) -> io::Result<bool> {
    let shared = Splicing::new(relay);
    let mut forth = std::pin::pin!(one_way(0, a, b, ab, &shared));
    let mut back = std::pin::pin!(one_way(1, b, a, ba, &shared));
    let (mut forth_done, mut back_done) = (false, false);
    while !(forth_done && back_done) {
        let stopped = tokio::select! {
            stopped = &mut forth, if !forth_done => { forth_done = true; stopped? }
            stopped = &mut back, if !back_done => { back_done = true; stopped? }
        };
        if let Spliced::Engage = stopped {
            // The other direction is idle (waiting for its source, pipe empty): dropping it
            // loses nothing.
            return Ok(true);
        }
    }
    Ok(false)
}

/// Relays both ways until both sides have ended, counting bytes a->b in `ab` and b->a in
/// `ba`. A clean end one way (EOF) is a half-close and the other way goes on; an error
/// either way (a peer's reset) or the drain `deadline` ends the relay at once and is
/// returned, and both sockets are set to reset when closed: the failure reaches the other
/// application as it would on a direct connection, and neither socket lingers in CLOSE_WAIT
/// or FIN_WAIT2.
///
/// The connection starts spliced. With `relay`, once it shows itself interactive (small
/// moves, no bulk) the kernel takes over every direction it accepts.
pub async fn bidirectional(
    a: TcpStream,
    b: TcpStream,
    ab: &Meter,
    ba: &Meter,
    deadline: impl std::future::Future<Output = crate::drain::DeadlineReached>,
    relay: Option<&KernelRelay>,
) -> Result<(), io::Error> {
    let mut deadline = std::pin::pin!(deadline);
    let engage = end_both(
        &a,
        &b,
        deadline.as_mut(),
        splice_both(&a, &b, ab, ba, relay),
    )
    .await;
    let relay = match (engage, relay) {
        (Ok(true), Some(relay)) => relay,
        (ended, _) => {
            crate::metrics::global().passthrough_relay("splice");
            return ended.map(|_| ());
        }
    };
    // Each way's count from here on (taken before the kernel starts writing).
    let (ab_kernel, ba_kernel) = (KernelMeter::new(ab, &b)?, KernelMeter::new(ba, &a)?);
    let engaged = relay.engage(a.as_fd(), b.as_fd());
    crate::metrics::global().passthrough_relay(match engaged {
        Engaged::Both => "kernel",
        Engaged::First => "kernel_one_way",
        Engaged::Neither => "splice",
    });
    match engaged {
        Engaged::Both => {
            // Out of the runtime's poller: the kernel relay's data wakes nobody (each
            // direction's end is watched on its own, see `kernel_one_way`).
            let (a, b) = (a.into_std()?, b.into_std()?);
            let both = async {
                tokio::try_join!(
                    kernel_one_way(a.as_fd(), b.as_fd(), &ab_kernel),
                    kernel_one_way(b.as_fd(), a.as_fd(), &ba_kernel)
                )
            };
            let relayed = end_both(&a, &b, deadline, both).await;
            // The last count of a direction cut short by the other's failure.
            let _ = (ab_kernel.count(b.as_fd()), ba_kernel.count(a.as_fd()));
            relayed.map(|_| ())
        }
        Engaged::First => {
            let spliced = Splicing::new(None);
            let both = async {
                tokio::try_join!(kernel_one_way(a.as_fd(), b.as_fd(), &ab_kernel), async {
                    one_way(1, &b, &a, ba, &spliced).await.map(|_| ())
                })
            };
            let relayed = end_both(&a, &b, deadline, both).await;
            let _ = ab_kernel.count(b.as_fd());
            relayed.map(|_| ())
        }
        Engaged::Neither => {
            let both = splice_both(&a, &b, ab, ba, None);
            end_both(&a, &b, deadline, both).await.map(|_| ())
        }
    }
}

/// Runs `both` directions to their end unless the drain `deadline` comes first; a failure
/// sets both sockets to reset when closed.
async fn end_both<T>(
    a: &impl AsFd,
    b: &impl AsFd,
    deadline: impl std::future::Future<Output = crate::drain::DeadlineReached>,
    both: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    let relayed = tokio::select! {
        // The drain deadline ends it as an error (both ends reset, see above).
        biased;
        reached = deadline => Err(io::Error::other(reached)),
        relayed = both => relayed,
    };
    if relayed.is_err() {
        super::reset_on_close(a);
        super::reset_on_close(b);
    }
    relayed
}

/// What has been written to `socket` so far, by the kernel's count: the base a kernel
/// relayed direction's count starts from.
fn written(socket: &impl AsFd) -> io::Result<u64> {
    Ok(tcp_totals(socket.as_fd())?.written)
}

/// One kernel-relayed direction's count: what its destination socket has taken since the
/// kernel began, added to the direction's [`Meter`] as it is learnt.
struct KernelMeter<'m> {
    meter: &'m Meter,
    /// What the agent moved this way spliced, before the kernel took over.
    spliced: u64,
    /// What the destination socket had been written by then.
    to_base: u64,
    counted: AtomicU64,
    /// The direction ended cleanly, its count exact (`to`'s FIN is not a byte).
    settled: AtomicBool,
}

impl<'m> KernelMeter<'m> {
    fn new(meter: &'m Meter, to: &impl AsFd) -> io::Result<Self> {
        Ok(Self {
            meter,
            spliced: meter.get(),
            to_base: written(to)?,
            counted: AtomicU64::new(0),
            settled: AtomicBool::new(false),
        })
    }

    /// Brings the count up to what `to` (the destination socket) has taken; returns it.
    fn count(&self, to: BorrowedFd<'_>) -> io::Result<u64> {
        if self.settled.load(Ordering::Relaxed) {
            return Ok(self.counted.load(Ordering::Relaxed));
        }
        let moved = tcp_totals(to)?.written.saturating_sub(self.to_base);
        let before = self.counted.fetch_max(moved, Ordering::Relaxed);
        self.meter.add(moved.saturating_sub(before) as usize);
        Ok(moved)
    }
}

/// Waits for the end of one direction the kernel relays (`from`'s EOF), lets `to` take every
/// byte `from` received, then shuts `to`'s write side down. Counts in `meter` as it learns;
/// a failure leaves the last count to the caller (the other direction may fail first).
async fn kernel_one_way(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    meter: &KernelMeter<'_>,
) -> io::Result<()> {
    let count = |to| meter.count(to);
    let ended = wait_for_end(from, || {
        // A failure here shows again, and ends the direction, when it ends.
        let _ = count(to);
    })
    .await;
    ended?;
    // What the kernel relayed: all `from` received (the kernel counts the FIN as one byte)
    // but what the agent spliced before.
    let received = tcp_totals(from)?
        .received
        .saturating_sub(1)
        .saturating_sub(meter.spliced);
    // The program has handed every byte to `to` by now, but `to` may still be taking them
    // from the kernel's queue: the FIN must not overtake them.
    let mut pause = Duration::from_millis(1);
    loop {
        if count(to)? >= received {
            break;
        }
        if let Some(e) = socket2::SockRef::from(&to).take_error()? {
            return Err(e);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    meter.settled.store(true, Ordering::Relaxed);
    socket2::SockRef::from(&to).shutdown(std::net::Shutdown::Write)
}

/// How often a kernel-relayed direction's byte count is brought up to date while it lasts
/// (the metrics of a long-lived connection move as it goes, as spliced ones do).
const COUNT_EVERY: Duration = Duration::from_secs(5);

/// Waits until `socket` (whose received bytes the kernel relays) reports its peer's FIN
/// (Ok) or an error, calling `tick` every [`COUNT_EVERY`] meanwhile. Watched through an
/// epoll instance of its own that wakes only for the end, never for the data the kernel
/// moves.
async fn wait_for_end(socket: BorrowedFd<'_>, mut tick: impl FnMut()) -> io::Result<()> {
    // SAFETY: epoll_create1 with a valid flag; the returned fd is checked below.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if epfd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: epoll_create1 succeeded: the fd is new and owned by nobody else.
    let epoll = unsafe { OwnedFd::from_raw_fd(epfd) };
    // The peer's FIN (RDHUP); errors and a full hang-up are always reported.
    let mut event = libc::epoll_event {
        events: libc::EPOLLRDHUP as u32,
        u64: 0,
    };
    // SAFETY: both fds are valid for the call; `event` is a valid epoll_event we own.
    let rc = unsafe {
        libc::epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            socket.as_raw_fd(),
            &mut event,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and the same fd until the
    // AsyncFd is dropped.
    let watch = unsafe { AsyncFd::register_with_interest(epoll, Interest::READABLE) }
        .map_err(io::Error::from)?;
    loop {
        let mut guard = match tokio::time::timeout(COUNT_EVERY, watch.readable()).await {
            Ok(guard) => guard?,
            Err(_) => {
                tick();
                continue;
            }
        };
        let mut ready = libc::epoll_event { events: 0, u64: 0 };
        // SAFETY: the epoll fd is valid; one event fits in `ready`; a zero timeout never
        // blocks.
        let n = unsafe { libc::epoll_wait(watch.as_raw_fd(), &mut ready, 1, 0) };
        if n <= 0 {
            guard.clear_ready();
            continue;
        }
        let mut byte = [0u8; 1];
        // SAFETY: the socket fd is valid; the buffer is one writable byte we own.
        let read = unsafe {
            libc::recv(
                socket.as_raw_fd(),
                byte.as_mut_ptr().cast(),
                1,
                libc::MSG_DONTWAIT,
            )
        };
        match read {
            0 => return Ok(()),
            n if n > 0 => {
                // The program relays every byte; one reaching the agent means the kernel
                // behaves otherwise than the relay was built for. Refuse rather than reorder.
                return Err(io::Error::other(
                    "the kernel relay handed payload to the agent; set ZTUNNEL_KERNEL_RELAY=false and report this kernel",
                ));
            }
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// The kernel relay tests count on a process-wide metric: one at a time.
    static KERNEL_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// The four sockets of a relayed connection on loopback: the client, the relay's two
    /// (accepted from the client, connected to the server) and the server.
    async fn sockets() -> (TcpStream, TcpStream, TcpStream, TcpStream) {
        let front = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let back = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let (front_addr, back_addr) = (
            front.local_addr().expect("a"),
            back.local_addr().expect("b"),
        );
        let client = TcpStream::connect(front_addr).await.expect("client");
        let (client_side, _) = front.accept().await.expect("accept");
        let server_side = TcpStream::connect(back_addr).await.expect("connect");
        let (server, _) = back.accept().await.expect("server");
        (client, client_side, server_side, server)
    }

    /// A client -> relay -> server connection: the client sends 5 MB and half-closes, the
    /// server reads to EOF, answers "done" and closes; returns what the relay counted each
    /// way and how it ended.
    async fn relay_one(relay: Option<&KernelRelay>) -> (u64, u64, Option<io::Error>) {
        let (mut client, client_side, server_side, mut server) = sockets().await;
        // Bytes already waiting on both of the relay's sockets before it starts.
        client.write_all(b"early").await.expect("early write");
        server.write_all(b"hello ").await.expect("early reply");
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (ab, ba) = (Meter::default(), Meter::default());
        let relaying = bidirectional(
            client_side,
            server_side,
            &ab,
            &ba,
            std::future::pending(),
            relay,
        );
        let payload: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
        let sent = payload.clone();
        // Ten small exchanges (an interactive connection), then a bulk upload and a
        // half-close, answered once the server has seen the client's EOF.
        let talk = async {
            let mut hello = [0u8; 6];
            client.read_exact(&mut hello).await.expect("early reply");
            assert_eq!(&hello, b"hello ");
            for _ in 0..10 {
                client.write_all(b"ping").await.expect("ping");
                let mut pong = [0u8; 4];
                client.read_exact(&mut pong).await.expect("pong");
                assert_eq!(&pong, b"pong");
            }
            client.write_all(&sent).await.expect("write");
            client.shutdown().await.expect("half-close");
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.expect("client reads");
            reply
        };
        let serve = async {
            let mut early = [0u8; 5];
            server.read_exact(&mut early).await.expect("early bytes");
            assert_eq!(&early, b"early");
            for _ in 0..10 {
                let mut ping = [0u8; 4];
                server.read_exact(&mut ping).await.expect("ping");
                assert_eq!(&ping, b"ping");
                server.write_all(b"pong").await.expect("pong");
            }
            let mut got = Vec::new();
            server
                .read_to_end(&mut got)
                .await
                .expect("server reads to EOF");
            server.write_all(b"done").await.expect("reply");
            server.shutdown().await.expect("close");
            got
        };
        let (reply, got, relayed) = tokio::join!(talk, serve, relaying);
        assert!(got == payload, "payload arrived intact and in order");
        assert_eq!(reply, b"done");
        (ab.get(), ba.get(), relayed.err())
    }

    #[tokio::test]
    async fn splices_both_ways_with_half_close_and_counts() {
        let (ab, ba, err) = relay_one(None).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!((ab, ba), (5_000_045, 50));
    }

    #[tokio::test]
    async fn kernel_relays_both_ways_with_half_close_and_counts() {
        let _one_at_a_time = KERNEL_TESTS.lock().await;
        let (_ebpf, relay) = crate::redirect::relay_testing::relay();
        let kernel = || crate::metrics::global().passthrough_relays("kernel");
        let before = kernel();
        let (ab, ba, err) = relay_one(Some(&relay)).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!((ab, ba), (5_000_045, 50));
        assert_eq!(kernel() - before, 1, "the kernel took both ways");
    }

    #[tokio::test]
    async fn kernel_relay_passes_a_reset_on_to_the_client() {
        let _one_at_a_time = KERNEL_TESTS.lock().await;
        let (_ebpf, relay) = crate::redirect::relay_testing::relay();
        let kernel = || crate::metrics::global().passthrough_relays("kernel");
        let before = kernel();
        let (mut client, client_side, server_side, mut server) = sockets().await;
        let (ab, ba) = (Meter::default(), Meter::default());
        let relaying = bidirectional(
            client_side,
            server_side,
            &ab,
            &ba,
            std::future::pending(),
            Some(&relay),
        );
        let talk = async {
            for _ in 0..10 {
                client.write_all(b"ping").await.expect("ping");
                let mut pong = [0u8; 4];
                client.read_exact(&mut pong).await.expect("pong");
            }
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await
        };
        let serve = async {
            for _ in 0..10 {
                let mut ping = [0u8; 4];
                server.read_exact(&mut ping).await.expect("ping");
                server.write_all(b"pong").await.expect("pong");
            }
            // Give the relay its turn to hand the connection over, then reset.
            tokio::time::sleep(Duration::from_millis(50)).await;
            crate::proxy::reset_on_close(&server);
            drop(server);
        };
        let (read, (), relayed) = tokio::join!(talk, serve, relaying);
        assert_eq!(kernel() - before, 1, "the kernel had the connection");
        assert_eq!(
            read.map_err(|e| e.kind()).err(),
            Some(io::ErrorKind::ConnectionReset),
            "the client sees the server's reset"
        );
        assert!(relayed.is_err(), "the relay ends in error");
        assert_eq!((ab.get(), ba.get()), (40, 40));
    }
}
