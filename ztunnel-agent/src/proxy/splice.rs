//! Relay between two TCP sockets (plain passthrough). Each direction copies small moves
//! through a buffer, one per runtime thread (a read and a write), and once a move fills
//! that buffer (bulk) moves bytes socket -> pipe -> socket with splice(2), so bulk payload
//! never enters userspace, though the agent is woken for every chunk. A connection that
//! never moves bulk never makes a pipe: a pipe's creation, sizing and release cost more than
//! a short connection's copies. Where the kernel relay is on (`redirect::KernelRelay`),
//! a connection that shows itself interactive is then handed to it at a point where
//! nothing is in flight: from there the kernel sends what one socket receives out of the
//! other, and the agent only waits for each direction's end.
//!
//! Either way half-closes propagate in order (the FIN goes out only once every byte before
//! it has), an error either way resets both sides, and each direction's bytes are counted as
//! having reached the destination socket: splice counts as it goes, the kernel relay from
//! the sockets' own totals every few seconds and when the direction ends.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::connection::Meter;
use crate::metrics::PassthroughRelay;
use crate::redirect::{Engaged, Engagement, KernelRelay};
use crate::socket::{tcp_totals, tcp_written_exact, EndWatch, Watched};
use ztunnel_common::RELAY_BOUND;

/// How much one splice call moves at most (the pipe is sized to match).
const CHUNK: usize = 256 * 1024;

/// Pipes made, and copied moves the destination took only part of: the tests check the
/// paths they name were taken.
#[cfg(test)]
static PIPES_MADE: AtomicU64 = AtomicU64::new(0);
#[cfg(test)]
static RESTS_KEPT: AtomicU64 = AtomicU64::new(0);
/// Copy reads that found the source socket empty.
#[cfg(test)]
static EMPTY_READS: AtomicU64 = AtomicU64::new(0);

/// A non-blocking pipe: (read end, write end).
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: pipe2 writes two fds into the array we pass; flags are valid.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    #[cfg(test)]
    PIPES_MADE.fetch_add(1, Ordering::Relaxed);
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
/// A move of less than this much is small. One this large marks the connection as bulk,
/// which stays spliced: splice moves bulk with less CPU per byte than the kernel relay,
/// whose per-packet work pays off only in latency and request rate. Also the size of the
/// stack buffer small moves are copied through: a read that fills it is bulk's first move.
const SMALL_MOVE: usize = 16 * 1024;

/// What the two spliced directions of one connection share (one task polls both).
struct Splicing<'r> {
    /// Where the connection may be handed once interactive (None: spliced to the end).
    relay: Option<&'r KernelRelay>,
    /// Per direction: its last read emptied the source socket (found it empty, or took all
    /// it held), and neither its pipe nor a copied move's unwritten rest holds a byte:
    /// no byte of it is in flight and no packet of its source is half read (the kernel
    /// relay takes packets whole, so a half-read one would be sent again).
    drained: [AtomicBool; 2],
    /// Per direction: ended (EOF passed on).
    ended: [AtomicBool; 2],
    small_moves: AtomicU32,
    bulk: AtomicBool,
}

impl Splicing<'_> {
    fn new(relay: Option<&KernelRelay>) -> Splicing<'_> {
        Splicing {
            relay,
            drained: Default::default(),
            ended: Default::default(),
            small_moves: AtomicU32::new(0),
            bulk: AtomicBool::new(false),
        }
    }

    /// Whether the connection is handed to the kernel now: only while both directions are
    /// drained and open.
    fn engage_now(&self) -> bool {
        let both = |flags: &[AtomicBool; 2], want: bool| {
            flags.iter().all(|f| f.load(Ordering::Relaxed) == want)
        };
        self.relay.is_some()
            && !self.bulk.load(Ordering::Relaxed)
            && self.small_moves.load(Ordering::Relaxed) >= ENGAGE_AFTER_SMALL
            && both(&self.drained, true)
            && both(&self.ended, false)
    }

    fn moved(&self, n: usize) {
        if n >= SMALL_MOVE {
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

thread_local! {
    /// The buffer small moves are copied through, one per runtime thread: zeroed once,
    /// not on every read (a copy holds it only within one synchronous call).
    static COPY_BUF: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0; SMALL_MOVE].into_boxed_slice());
}

/// One copied move: how much was read (0: EOF), what `to` could not take yet, and whether
/// the read emptied the source (see [`read_emptying`]).
struct Copied {
    read: usize,
    rest: Vec<u8>,
    emptied: bool,
}

/// Reads what `from` holds (up to [`SMALL_MOVE`]) and writes it to `to` at once. Not async,
/// so the buffer is never part of a connection's future.
fn copy_once(from: &TcpStream, to: &TcpStream) -> io::Result<Copied> {
    COPY_BUF.with_borrow_mut(|buf| {
        let (read, emptied) = read_emptying(from, buf)?;
        if read == 0 {
            return Ok(Copied {
                read,
                rest: Vec::new(),
                emptied,
            });
        }
        let taken = match to.try_write(&buf[..read]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        Ok(Copied {
            read,
            rest: buf[taken..read].to_vec(),
            emptied,
        })
    })
}

/// Reads from `from` into `buf`: how much, and whether the read emptied the socket. A TCP
/// read that leaves room in `buf` took all the socket held, so `from`'s readiness is
/// cleared then, as tokio's own `poll_read` does: the next `readable()` waits for new data
/// instead of returning at once for a read that finds nothing (one recv(2) of three per
/// small move). Clearing is safe against data arriving meanwhile: tokio clears only the
/// readiness event the read was made under, never a newer one. (TCP urgent data, which
/// stops a read short at its mark, is not provided for, as in tokio's reads.)
fn read_emptying(from: &TcpStream, buf: &mut [u8]) -> io::Result<(usize, bool)> {
    let mut read = 0;
    // `try_io` clears the readiness when its closure says WouldBlock: said here after a
    // read that emptied the socket, with the count kept aside.
    match from.try_io(Interest::READABLE, || {
        read = io::Read::read(&mut &*socket2::SockRef::from(from), buf)?;
        if read > 0 && read < buf.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(read)
    }) {
        Ok(n) => Ok((n, false)),
        #[cfg(test)]
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && read == 0 => {
            EMPTY_READS.fetch_add(1, Ordering::Relaxed);
            Err(e)
        }
        // Said by us after a read (the socket's own WouldBlock leaves `read` at 0).
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && read > 0 => Ok((read, true)),
        Err(e) => Err(e),
    }
}

/// Writes `len` bytes to `to` with `write` (given what is left, it returns what it wrote),
/// waiting for `to` to take them; counts each write in `meter`.
async fn write_out(
    to: &TcpStream,
    meter: &Meter,
    mut len: usize,
    mut write: impl FnMut(usize) -> io::Result<usize>,
) -> io::Result<()> {
    while len > 0 {
        to.writable().await?;
        match to.try_io(Interest::WRITABLE, || write(len)) {
            Ok(n) => {
                len -= n;
                meter.add(n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Moves `from` to `to` (direction `i` of `shared`) until EOF, then shuts `to`'s write side
/// down; counts what reaches `to` in `meter` as it goes. Small moves are copied (see
/// [`copy_once`]); from the first move that fills the copy buffer on, the direction is
/// spliced through a pipe made then. Stops early, when its source is drained and the other
/// direction's too, if the connection is to be handed to the kernel relay.
async fn one_way(
    i: usize,
    from: &TcpStream,
    to: &TcpStream,
    meter: &Meter,
    shared: &Splicing<'_>,
) -> io::Result<Spliced> {
    let mut pipe: Option<(OwnedFd, OwnedFd)> = None;
    // No pipe could be made (the fd limit): this direction copies to its end.
    let mut copy_only = false;
    loop {
        from.readable().await?;
        let moved = match &pipe {
            // Fill the pipe from the source socket. (A short splice does not show the
            // socket emptied: the pipe may have run out of slots first.)
            Some((_, pipe_w)) => from
                .try_io(Interest::READABLE, || {
                    splice(from.as_raw_fd(), pipe_w.as_raw_fd(), CHUNK)
                })
                .map(|read| Copied {
                    read,
                    rest: Vec::new(),
                    emptied: false,
                }),
            None => copy_once(from, to),
        };
        let Copied {
            read: n,
            rest,
            emptied,
        } = match moved {
            Ok(Copied { read: 0, .. }) => {
                socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
                shared.ended[i].store(true, Ordering::Relaxed);
                return Ok(Spliced::Ended);
            }
            Ok(moved) => moved,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Copied {
                read: 0,
                rest: Vec::new(),
                emptied: true,
            },
            Err(e) => return Err(e),
        };
        // Drained: the source was emptied and nothing read is still on its way (a pipe's
        // bytes and a copied move's rest are written out below, before the next read).
        shared.drained[i].store(emptied && rest.is_empty(), Ordering::Relaxed);
        if n > 0 {
            shared.moved(n);
            match &pipe {
                // Drain the pipe into the destination socket.
                Some((pipe_r, _)) => {
                    // Boxed, as the rest below: a write that waits is the rare case, and
                    // every connection's future, idle ones included, would be sized for it.
                    Box::pin(write_out(to, meter, n, |left| {
                        splice(pipe_r.as_raw_fd(), to.as_raw_fd(), left)
                    }))
                    .await?;
                }
                None => {
                    // Copied: `to` took all but `rest` already.
                    meter.add(n - rest.len());
                    if !rest.is_empty() {
                        #[cfg(test)]
                        RESTS_KEPT.fetch_add(1, Ordering::Relaxed);
                        Box::pin(write_out(to, meter, rest.len(), |left| {
                            socket2::SockRef::from(to)
                                .send_with_flags(&rest[rest.len() - left..], libc::MSG_NOSIGNAL)
                        }))
                        .await?;
                        // Written out: drained if the read emptied the source (its
                        // readiness is cleared, so no read comes to say so until new data).
                        shared.drained[i].store(emptied, Ordering::Relaxed);
                    }
                    if n >= SMALL_MOVE && !copy_only {
                        // Bulk: spliced from now on. Without a pipe (the fd limit reached),
                        // copying goes on: slower, never failed.
                        pipe = self::pipe().ok();
                        copy_only = pipe.is_none();
                    }
                }
            }
        }
        // Checked once this move is counted: the kernel's count starts from the meter.
        if shared.engage_now() {
            return Ok(Spliced::Engage);
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
            // The other direction is drained (waiting for its source, pipe empty): dropping
            // it loses nothing.
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
///
/// Not `async fn`: the connection's count (see [`RelayCount`]) is taken when the relay is
/// made, so a relay dropped before its first poll (a select that finds the connection
/// already revoked) is counted too.
pub fn bidirectional<'r>(
    a: TcpStream,
    b: TcpStream,
    ab: &'r Meter,
    ba: &'r Meter,
    deadline: impl std::future::Future<Output = crate::drain::DeadlineReached> + 'r,
    relay: Option<&'r KernelRelay>,
) -> impl std::future::Future<Output = io::Result<()>> + 'r {
    let counted = RelayCount { spliced: true };
    relay_and_count(a, b, (ab, ba), deadline, relay, counted)
}

async fn relay_and_count(
    a: TcpStream,
    b: TcpStream,
    (ab, ba): (&Meter, &Meter),
    deadline: impl std::future::Future<Output = crate::drain::DeadlineReached>,
    relay: Option<&KernelRelay>,
    mut counted: RelayCount,
) -> io::Result<()> {
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
        (ended, _) => return ended.map(|_| ()),
    };
    // Where each way's kernel count starts: what it moved spliced and what its destination
    // had been written (taken before the kernel starts writing).
    // Read exactly: the agent's last write's ACK may be on its way, and a base low by it
    // would count its bytes again.
    let starts = tcp_written_exact(b.as_fd()).and_then(|b_base| {
        Ok((
            (ab.get(), b_base),
            (ba.get(), tcp_written_exact(a.as_fd())?),
        ))
    });
    let (ab_start, ba_start) = match starts {
        Ok(starts) => starts,
        Err(e) => {
            super::reset_on_close(&a);
            super::reset_on_close(&b);
            return Err(e);
        }
    };
    // Kept until the relay's future below is gone (it borrows it): the program's accounting
    // outlives every use of the sockets, also when the relay is cut short.
    let engagement = relay.engage(a.as_fd(), b.as_fd());
    counted.engaged(&engagement.engaged);
    // Boxed: the kernel relay's state (end watches, meters) is larger than the splice
    // phase's, and every connection, idle ones included, starts spliced: unboxed, each would
    // be sized for it.
    Box::pin(relay_engaged(
        &engagement,
        (a, ab, ab_start),
        (b, ba, ba_start),
        deadline,
        relay,
    ))
    .await
}

/// Counts its connection in `ztunnel_passthrough_connections_total` once: under the kernel
/// relay when handed over (so a long-lived relayed connection shows while it lasts), else as
/// spliced when dropped. It lives as long as the relay, so a relay cut short (a policy
/// revocation, the drain overdue: the outer selects drop it, never finish it) still counts.
struct RelayCount {
    /// Not counted yet: counted as spliced when dropped.
    spliced: bool,
}

impl RelayCount {
    /// Counts the hand-over's outcome now; a connection the kernel refused whole stays to be
    /// counted as spliced.
    fn engaged(&mut self, engaged: &Engaged) {
        let relay = match engaged {
            Engaged::Both => PassthroughRelay::Kernel,
            Engaged::First => PassthroughRelay::KernelOneWay,
            Engaged::Neither => return,
        };
        crate::metrics::global().passthrough_relay(relay);
        self.spliced = false;
    }
}

impl Drop for RelayCount {
    fn drop(&mut self) {
        if self.spliced {
            crate::metrics::global().passthrough_relay(PassthroughRelay::Splice);
        }
    }
}

/// Relays a connection after its hand-over to the kernel relay (`engagement` says what the
/// kernel took): each way's socket, meter, and where its kernel count starts.
async fn relay_engaged(
    engagement: &Engagement<'_>,
    (a, ab, ab_start): (TcpStream, &Meter, (u64, u64)),
    (b, ba, ba_start): (TcpStream, &Meter, (u64, u64)),
    deadline: impl std::future::Future<Output = crate::drain::DeadlineReached>,
    relay: &KernelRelay,
) -> io::Result<()> {
    let [a_cookie, b_cookie] = engagement.cookies;
    match engagement.engaged {
        Engaged::Both => {
            // Out of the runtime's poller: the kernel relay's data wakes nobody (each
            // direction's end is watched on its own, see `kernel_one_way`).
            let a = a.into_std().inspect_err(|_| super::reset_on_close(&b))?;
            let b = b.into_std().inspect_err(|_| super::reset_on_close(&a))?;
            // Declared after the sockets, so dropped first: a relay cut short (policy,
            // drain) still counts what the kernel moved.
            let ab_kernel = KernelMeter::new(ab, b.as_fd(), ab_start);
            let ba_kernel = KernelMeter::new(ba, a.as_fd(), ba_start);
            let both = async {
                tokio::try_join!(
                    kernel_one_way((a.as_fd(), a_cookie), &ab_kernel, relay),
                    kernel_one_way((b.as_fd(), b_cookie), &ba_kernel, relay)
                )
            };
            end_both(&a, &b, deadline, both).await.map(|_| ())
        }
        Engaged::First => {
            let ab_kernel = KernelMeter::new(ab, b.as_fd(), ab_start);
            let spliced = Splicing::new(None);
            let both = async {
                tokio::try_join!(
                    kernel_one_way((a.as_fd(), a_cookie), &ab_kernel, relay),
                    async { one_way(1, &b, &a, ba, &spliced).await.map(|_| ()) }
                )
            };
            end_both(&a, &b, deadline, both).await.map(|_| ())
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

/// One kernel-relayed direction's count: what its destination socket has taken since the
/// kernel began, added to the direction's [`Meter`] as it is learnt, and once more when
/// dropped (a relay cut short by the other direction, a policy or the drain).
struct KernelMeter<'m> {
    meter: &'m Meter,
    /// The destination socket.
    to: BorrowedFd<'m>,
    /// What the agent moved this way spliced, before the kernel took over.
    spliced: u64,
    /// What the destination socket had been written by then.
    to_base: u64,
    counted: AtomicU64,
    /// The direction ended cleanly, its count exact (`to`'s FIN is not a byte).
    settled: AtomicBool,
}

impl<'m> KernelMeter<'m> {
    /// `start`: (what was spliced this way, what `to` had been written) at the hand-over.
    fn new(meter: &'m Meter, to: BorrowedFd<'m>, (spliced, to_base): (u64, u64)) -> Self {
        Self {
            meter,
            to,
            spliced,
            to_base,
            counted: AtomicU64::new(0),
            settled: AtomicBool::new(false),
        }
    }

    /// Ends the kernel's count at `moved` (a direction handed back to the agent, once the
    /// destination has taken that much); the agent counts the rest as it moves it.
    fn settle(&self, moved: u64) {
        let before = self.counted.fetch_max(moved, Ordering::Relaxed);
        self.meter.add(moved.saturating_sub(before) as usize);
        self.settled.store(true, Ordering::Relaxed);
    }

    /// Brings the count up to what the destination has taken; returns it.
    fn count(&self) -> io::Result<u64> {
        if self.settled.load(Ordering::Relaxed) {
            return Ok(self.counted.load(Ordering::Relaxed));
        }
        let moved = tcp_totals(self.to)?.written.saturating_sub(self.to_base);
        let before = self.counted.fetch_max(moved, Ordering::Relaxed);
        self.meter.add(moved.saturating_sub(before) as usize);
        Ok(moved)
    }
}

impl Drop for KernelMeter<'_> {
    fn drop(&mut self) {
        // The socket is still open (it outlives this meter); a failure here has nothing
        // left to report to.
        let _ = self.count();
    }
}

/// How often a kernel-relayed direction's count is brought up to date and its allowance
/// renewed while it moves bytes: at [`RELAY_BOUND`] per look, a direction that keeps its
/// destination up stays in the kernel up to about 40 MB of charge a second. Also how soon
/// a busy direction handed back is noticed (after a quiet spell, up to [`LOOK_QUIET`]).
const LOOK_BUSY: Duration = Duration::from_millis(100);
/// ... and while it is quiet (the looks space out from [`LOOK_BUSY`] up to this): a burst
/// after a quiet spell has [`RELAY_BOUND`] until the next look.
const LOOK_QUIET: Duration = Duration::from_millis(800);

/// Waits for the end of one direction the kernel relays (`from`'s EOF), lets the
/// destination take every byte `from` received, then shuts its write side down. Ends in
/// error if either socket fails first (the destination's failure too: `from`'s bytes
/// would have nowhere to go). While it lasts, the direction's allowance is renewed each time
/// its destination is seen to have taken what was relayed; a direction the program handed
/// back (it outran its destination by more than [`RELAY_BOUND`]) is moved on by the agent
/// (see [`taken_back`]).
async fn kernel_one_way(
    (from, from_cookie): (BorrowedFd<'_>, u64),
    meter: &KernelMeter<'_>,
    relay: &KernelRelay,
) -> io::Result<()> {
    let to = meter.to;
    let watch = EndWatch::new(from, to)?;
    // The accounting as last seen, and what the direction may charge by now (renewed from
    // a drained snapshot's charge plus the bound; the first allowance is the bound alone).
    let mut last_seen: Option<ztunnel_common::RelayFlow> = None;
    let mut allowed = RELAY_BOUND;
    let mut look_after = LOOK_BUSY;
    loop {
        let ended = match tokio::time::timeout(look_after, watch.wait(from, to)).await {
            Ok(ended) => Some(ended?),
            Err(_) => None,
        };
        let seen = relay.flow(from_cookie)?;
        if seen.handed_back != 0 {
            return taken_back((from, from_cookie), meter, relay).await;
        }
        match ended {
            Some(Watched::Fin) => break,
            Some(Watched::Payload) => {
                // The program relays every byte it does not hand back; one reaching the
                // agent otherwise means the kernel behaves otherwise than the relay was
                // built for. Refuse, not reorder.
                return Err(io::Error::other(
                    "the kernel relay handed payload to the agent; set ZTUNNEL_KERNEL_RELAY=false and report this kernel",
                ));
            }
            None => {}
        }
        let moving = last_seen.is_none_or(|last| last.charged != seen.charged);
        look_after = if moving {
            LOOK_BUSY
        } else {
            (look_after * 2).min(LOOK_QUIET)
        };
        if !moving && allowed == seen.charged + RELAY_BOUND {
            // Nothing relayed since the last renewal: nothing to learn.
            continue;
        }
        // A failure here shows again, and ends the direction, when it ends.
        let Ok(taken) = meter.count() else { continue };
        // What the destination has taken for sure: everything relayed by now, or at least
        // everything relayed by the last look (`seen` was read first, so a byte relayed
        // since cannot be mistaken for taken).
        let drained = [Some(seen), last_seen]
            .into_iter()
            .flatten()
            .find(|s| taken >= s.moved);
        last_seen = Some(seen);
        if let Some(drained) = drained {
            let renewed = drained.charged + RELAY_BOUND;
            if renewed > allowed && relay.allow(from_cookie, renewed).is_ok() {
                allowed = renewed;
            }
        }
    }
    // What the kernel relayed: all `from` received (the kernel counts the FIN as one byte)
    // but what the agent spliced before.
    let received = tcp_totals(from)?
        .received
        .saturating_sub(1)
        .saturating_sub(meter.spliced);
    // The program has handed every byte to `to` by now, but `to` may still be taking them
    // from the kernel's queue: the FIN must not overtake them. (A last packet's verdict may
    // still be running as the FIN shows; if it handed the direction back, the agent takes
    // over.)
    if !until_taken(meter, received, || {
        Ok(relay.flow(from_cookie)?.handed_back != 0)
    })
    .await?
    {
        return taken_back((from, from_cookie), meter, relay).await;
    }
    meter.settle(received);
    socket2::SockRef::from(&to).shutdown(std::net::Shutdown::Write)
}

/// Waits until a kernel-relayed direction's destination has taken `bytes` (it may still be
/// taking them from the kernel's queue): true then, false if `give_up` says so first; fails
/// if the destination fails, or `give_up` does.
async fn until_taken(
    meter: &KernelMeter<'_>,
    bytes: u64,
    give_up: impl Fn() -> io::Result<bool>,
) -> io::Result<bool> {
    let mut pause = Duration::from_millis(1);
    while meter.count()? < bytes {
        if let Some(e) = socket2::SockRef::from(&meter.to).take_error()? {
            return Err(e);
        }
        if give_up()? {
            return Ok(false);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    Ok(true)
}

/// Moves the rest of a direction the program handed back: once the destination has taken
/// the `moved` bytes the kernel relayed (nothing may overtake them), the agent copies what
/// waits on `from` and all that follows, to the end. Copied, not spliced: the program still
/// sees `from`'s packets and leaves them where a read finds them, not where splice looks.
async fn taken_back(
    (from, from_cookie): (BorrowedFd<'_>, u64),
    meter: &KernelMeter<'_>,
    relay: &KernelRelay,
) -> io::Result<()> {
    // Read again now that the hand-back is seen: the read that saw it may have copied the
    // entry while the program was updating it (an older `moved`); after the hand-back
    // `moved` never changes.
    let moved = relay.flow(from_cookie)?.moved;
    crate::metrics::global().relay_handback();
    tracing::debug!(
        moved,
        "a kernel-relayed direction outran its destination: the agent moves the rest"
    );
    until_taken(meter, moved, || {
        not_broken(relay, from_cookie).map(|()| false)
    })
    .await?;
    meter.settle(moved);
    // Runtime streams on duplicates: the sockets themselves are out of the runtime's poller
    // (the kernel relay's data must wake nobody), and both directions may be taken back.
    let stream = |fd: BorrowedFd<'_>| {
        TcpStream::from_std(std::net::TcpStream::from(fd.try_clone_to_owned()?))
    };
    let (mut source, destination) = (stream(from)?, stream(meter.to)?);
    let mut broken = std::pin::pin!(broken(relay, from_cookie));
    let mut buf = vec![0u8; TAKEN_BACK_BUFFER];
    // What the agent has copied since the hand-back, and how much of it the program knows.
    let (mut copied, mut published) = (0u64, 0u64);
    let mut eof_pause = Duration::from_millis(1);
    loop {
        let n = tokio::select! {
            n = tokio::io::AsyncReadExt::read(&mut source, &mut buf) => n?,
            e = &mut broken => return Err(e),
        };
        if n == 0 {
            // The end only once every byte `from` received is through: a packet the
            // program handed back can still be queued in the kernel (behind the other
            // direction's bytes waiting to leave this socket) when the FIN is already
            // readable.
            let received = tcp_totals(from)?.received.saturating_sub(1);
            if meter.spliced + moved + copied >= received {
                return socket2::SockRef::from(&destination).shutdown(std::net::Shutdown::Write);
            }
            // Bytes the kernel dropped (a broken direction, a failed socket) never come.
            not_broken(relay, from_cookie)?;
            for socket in [from, meter.to] {
                if let Some(e) = socket2::SockRef::from(&socket).take_error()? {
                    return Err(e);
                }
            }
            tokio::time::sleep(eof_pause).await;
            eof_pause = (eof_pause * 2).min(Duration::from_millis(50));
            continue;
        }
        // A stalled destination must not keep a broken direction from being reset.
        let write = write_out(&destination, meter.meter, n, |left| {
            socket2::SockRef::from(&destination)
                .send_with_flags(&buf[n - left..n], libc::MSG_NOSIGNAL)
        });
        tokio::select! {
            written = write => written?,
            e = &mut broken => return Err(e),
        }
        copied += n as u64;
        if copied - published >= PUBLISH_EVERY {
            // Lets the program leave more on the socket (see `RELAY_PASS_BOUND`); a
            // failure only makes it stricter.
            let _ = relay.set_read(from_cookie, copied);
            published = copied;
        }
    }
}

/// Fails a direction taken back from the kernel relay whose packets the program had to
/// drop: its source kept sending while its packets could not reach the agent (queued behind
/// the other direction's bytes waiting to leave the same socket, its client not reading
/// them, where the kernel counts them against no buffer). The stream is broken: both ends
/// are reset and the log says why.
fn not_broken(relay: &KernelRelay, from_cookie: u64) -> io::Result<()> {
    if relay.flow(from_cookie)?.broken != 0 {
        return Err(io::Error::other(format!(
            "the kernel relay could not hold back this client: it sent more than {} MiB past what reached the agent while not reading what the server sent (ZTUNNEL_KERNEL_RELAY=false keeps such clients under TCP's flow control)",
            ztunnel_common::RELAY_PASS_BOUND >> 20
        )));
    }
    Ok(())
}

/// Resolves with [`not_broken`]'s error once the direction is broken, looking every
/// [`LOOK_BUSY`].
async fn broken(relay: &KernelRelay, from_cookie: u64) -> io::Error {
    loop {
        tokio::time::sleep(LOOK_BUSY).await;
        if let Err(e) = not_broken(relay, from_cookie) {
            return e;
        }
    }
}

/// How often a direction taken back from the kernel relay tells the program what it has
/// read (a sixteenth of [`ztunnel_common::RELAY_PASS_BOUND`]: the program's slack).
const PUBLISH_EVERY: u64 = ztunnel_common::RELAY_PASS_BOUND / 16;

/// The copy buffer of a direction taken back from the kernel relay (one per such
/// direction, for its rest).
const TAKEN_BACK_BUFFER: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// The relay tests count on a process-wide metric (connections by how their bytes
    /// moved): one at a time.
    static RELAY_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    /// A kernel relay test's turn: the relay (with its loaded object) and the lock that
    /// keeps the other kernel relay tests waiting. None: the test skips (see
    /// `relay_testing::relay`).
    struct KernelTurn {
        relay: KernelRelay,
        _ebpf: aya::Ebpf,
        _one_at_a_time: tokio::sync::MutexGuard<'static, ()>,
    }

    async fn kernel_turn() -> Option<KernelTurn> {
        let one_at_a_time = RELAY_TESTS.lock().await;
        let (ebpf, relay) = crate::redirect::relay_testing::relay()?;
        Some(KernelTurn {
            relay,
            _ebpf: ebpf,
            _one_at_a_time: one_at_a_time,
        })
    }

    /// Connections the kernel relay took so far (process-wide).
    fn kernel_count() -> u64 {
        crate::metrics::global().passthrough_relays(PassthroughRelay::Kernel)
    }

    /// The client's side of `n` small exchanges (enough to make a connection interactive).
    async fn pings(client: &mut TcpStream, n: usize) {
        for _ in 0..n {
            client.write_all(b"ping").await.expect("ping");
            let mut pong = [0u8; 4];
            client.read_exact(&mut pong).await.expect("pong");
            assert_eq!(&pong, b"pong");
        }
    }

    /// The server's side of [`pings`].
    async fn pongs(server: &mut TcpStream, n: usize) {
        for _ in 0..n {
            let mut ping = [0u8; 4];
            server.read_exact(&mut ping).await.expect("ping");
            assert_eq!(&ping, b"ping");
            server.write_all(b"pong").await.expect("pong");
        }
    }

    /// Relays the relay's two sockets to the end with meters of its own: (bytes a->b,
    /// bytes b->a, how it ended).
    async fn relay_counted(
        a: TcpStream,
        b: TcpStream,
        relay: Option<&KernelRelay>,
    ) -> (u64, u64, io::Result<()>) {
        let (ab, ba) = (Meter::default(), Meter::default());
        let ended = bidirectional(a, b, &ab, &ba, std::future::pending(), relay).await;
        (ab.get(), ba.get(), ended)
    }

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
        // Bytes already sent both ways before the relay starts.
        client.write_all(b"early").await.expect("early write");
        server.write_all(b"hello ").await.expect("early reply");
        let relaying = relay_counted(client_side, server_side, relay);
        let payload: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
        let sent = payload.clone();
        // Ten small exchanges (an interactive connection), then a bulk upload and a
        // half-close, answered once the server has seen the client's EOF.
        let talk = async {
            let mut hello = [0u8; 6];
            client.read_exact(&mut hello).await.expect("early reply");
            assert_eq!(&hello, b"hello ");
            pings(&mut client, 10).await;
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
            pongs(&mut server, 10).await;
            let mut got = Vec::new();
            server
                .read_to_end(&mut got)
                .await
                .expect("server reads to EOF");
            server.write_all(b"done").await.expect("reply");
            server.shutdown().await.expect("close");
            got
        };
        let (reply, got, (ab, ba, relayed)) = tokio::join!(talk, serve, relaying);
        assert!(got == payload, "payload arrived intact and in order");
        assert_eq!(reply, b"done");
        (ab, ba, relayed.err())
    }

    /// Connections counted as spliced so far (process-wide).
    fn splice_count() -> u64 {
        crate::metrics::global().passthrough_relays(PassthroughRelay::Splice)
    }

    #[tokio::test]
    async fn splices_both_ways_with_half_close_and_counts() {
        let _one_at_a_time = RELAY_TESTS.lock().await;
        let before = splice_count();
        let (ab, ba, err) = relay_one(None).await;
        assert_eq!(splice_count() - before, 1, "counted once, as spliced");
        assert!(err.is_none(), "{err:?}");
        assert_eq!((ab, ba), (5_000_045, 50));
    }

    /// Small request/response exchanges, copied: a read that took all its socket held is
    /// not followed by one that finds it empty (the third syscall of every move, saved).
    #[tokio::test]
    async fn a_small_move_is_one_read() {
        let _one_at_a_time = RELAY_TESTS.lock().await;
        let (mut client, client_side, server_side, mut server) = sockets().await;
        let empty = EMPTY_READS.load(Ordering::Relaxed);
        let relaying = relay_counted(client_side, server_side, None);
        let exchanges = 200;
        let talk = async {
            pings(&mut client, exchanges).await;
            client.shutdown().await.expect("half-close");
        };
        let serve = async {
            pongs(&mut server, exchanges).await;
            server.shutdown().await.expect("close");
        };
        let ((), (), (ab, ba, relayed)) = tokio::join!(talk, serve, relaying);
        relayed.expect("relayed to the end");
        assert_eq!((ab, ba), (4 * 200, 4 * 200));
        // 400 moves; each used to be followed by a read that found nothing. A few may
        // still be (a wake-up for data the previous read already took): a tenth is allowed.
        let empty = EMPTY_READS.load(Ordering::Relaxed) - empty;
        assert!(
            empty <= 40,
            "{empty} reads found the socket empty in 400 moves"
        );
    }

    /// Small writes to a destination that does not read yet: copied moves back up (a
    /// copied move is left half written), what piles up at the client's side then fills the
    /// copy buffer, and the direction turns to splice. Every byte arrives once, in order, and
    /// is counted.
    #[tokio::test]
    async fn copied_moves_a_slow_destination_backs_up_arrive_in_order_and_counted() {
        let _one_at_a_time = RELAY_TESTS.lock().await;
        let (pipes, rests) = (
            PIPES_MADE.load(Ordering::Relaxed),
            RESTS_KEPT.load(Ordering::Relaxed),
        );
        let (mut client, client_side, server_side, mut server) = sockets().await;
        socket2::SockRef::from(&server_side)
            .set_send_buffer_size(4096)
            .expect("small send buffer");
        let relaying = relay_counted(client_side, server_side, None);
        let payload: Vec<u8> = (0..400_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let written = std::cell::Cell::new(0usize);
        let talk = async {
            for chunk in sent.chunks(1000) {
                client.write_all(chunk).await.expect("write");
                written.set(written.get() + chunk.len());
                tokio::time::sleep(Duration::from_micros(50)).await;
            }
            client.shutdown().await.expect("half-close");
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.expect("client reads");
            reply
        };
        let serve = async {
            // Not reading until a copied move was left half written, and until 40 KB more
            // have piled up at the client's side: the relay's next read fills its buffer.
            let give_up = std::time::Instant::now() + Duration::from_secs(30);
            while RESTS_KEPT.load(Ordering::Relaxed) == rests {
                assert!(
                    std::time::Instant::now() < give_up,
                    "the relay's writes never backed up"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let mark = written.get();
            while written.get() < (mark + 40_000).min(payload.len()) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.expect("server reads");
            server.shutdown().await.expect("close");
            got
        };
        let (reply, got, (ab, ba, relayed)) = tokio::join!(talk, serve, relaying);
        assert!(relayed.is_ok(), "{relayed:?}");
        assert!(reply.is_empty());
        assert!(got == payload, "every byte arrived once and in order");
        assert_eq!((ab, ba), (400_000, 0));
        assert!(
            PIPES_MADE.load(Ordering::Relaxed) > pipes,
            "the direction turned to splice"
        );
    }

    /// A relay dropped mid-connection, as a policy revocation or the drain's select drops
    /// it, is still counted, once, as spliced.
    #[tokio::test]
    async fn a_relay_cut_short_is_counted_once_as_spliced() {
        let _one_at_a_time = RELAY_TESTS.lock().await;
        let before = splice_count();
        let (mut client, client_side, server_side, mut server) = sockets().await;
        let (ab, ba) = (Meter::default(), Meter::default());
        let relaying = bidirectional(
            client_side,
            server_side,
            &ab,
            &ba,
            std::future::pending(),
            None,
        );
        let exchange = async {
            client.write_all(b"ping").await.expect("ping");
            let mut ping = [0u8; 4];
            server.read_exact(&mut ping).await.expect("ping arrives");
        };
        tokio::select! {
            ended = relaying => panic!("the relay ended by itself: {ended:?}"),
            () = exchange => {}
        }
        assert_eq!(splice_count() - before, 1);
        assert_eq!(ab.get(), 4);
    }

    #[tokio::test]
    async fn kernel_relays_both_ways_with_half_close_and_counts() {
        let Some(turn) = kernel_turn().await else {
            return;
        };
        let relay = &turn.relay;
        let before = kernel_count();
        let (ab, ba, err) = relay_one(Some(relay)).await;
        assert!(err.is_none(), "{err:?}");
        assert_eq!((ab, ba), (5_000_045, 50));
        assert_eq!(kernel_count() - before, 1, "the kernel took both ways");
    }

    /// A relayed direction whose destination stops reading: the client is held back near
    /// the relay's bound (the kernel gives the relay no flow control of its own), the
    /// direction is handed back to the agent, and once the destination reads again every
    /// byte arrives once, in order, and is counted once.
    #[tokio::test]
    async fn kernel_relay_hands_back_a_direction_its_destination_does_not_keep_up_with() {
        let Some(turn) = kernel_turn().await else {
            return;
        };
        let relay = &turn.relay;
        let (before, taken_back) = (kernel_count(), crate::metrics::global().relay_handbacks());
        let (mut client, client_side, server_side, mut server) = sockets().await;
        let relaying = relay_counted(client_side, server_side, Some(relay));
        let payload: Vec<u8> = (0..96_000_000u32).map(|i| (i % 249) as u8).collect();
        let go = tokio::sync::Notify::new();
        let handed_back_by_then = std::cell::Cell::new(0);
        let talk = async {
            pings(&mut client, 10).await;
            // Pushes until the writes stall for 300 ms (nothing holds it back: all of it).
            let mut pushed = 0;
            while pushed < payload.len() {
                let write = client.write(&payload[pushed..]);
                match tokio::time::timeout(Duration::from_millis(300), write).await {
                    Ok(written) => pushed += written.expect("write"),
                    Err(_) => break,
                }
            }
            // The agent notices the hand-back at its next look.
            let give_up = std::time::Instant::now() + Duration::from_secs(5);
            while crate::metrics::global().relay_handbacks() == taken_back
                && std::time::Instant::now() < give_up
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            handed_back_by_then.set(crate::metrics::global().relay_handbacks() - taken_back);
            go.notify_one();
            client.write_all(&payload[pushed..]).await.expect("write");
            client.shutdown().await.expect("half-close");
            let mut reply = Vec::new();
            client.read_to_end(&mut reply).await.expect("client reads");
            (pushed, reply)
        };
        let serve = async {
            pongs(&mut server, 10).await;
            go.notified().await;
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.expect("server reads");
            server.write_all(b"done").await.expect("reply");
            server.shutdown().await.expect("close");
            got
        };
        let ((pushed, reply), got, (ab, ba, relayed)) =
            tokio::time::timeout(Duration::from_secs(30), async {
                tokio::join!(talk, serve, relaying)
            })
            .await
            .expect("the relay ends");
        assert!(relayed.is_ok(), "{relayed:?}");
        assert_eq!(kernel_count() - before, 1, "the kernel took the connection");
        eprintln!("pushed {pushed} bytes before the client stalled");
        // What TCP holds on the way (the client's send buffer, the relay's two sockets, the
        // server's receive buffer: a few MiB each) plus the relay's bound.
        assert!(
            pushed < 48_000_000,
            "a destination that reads nothing let the client push {pushed} bytes"
        );
        assert_eq!(
            handed_back_by_then.get(),
            1,
            "the client's direction was handed back while the server did not read"
        );
        assert_eq!(
            crate::metrics::global().relay_handbacks() - taken_back,
            1,
            "the server's direction stayed in the kernel"
        );
        assert!(got == payload, "every byte arrived once and in order");
        assert_eq!(reply, b"done");
        assert_eq!(
            (ab, ba),
            (40 + 96_000_000, 40 + 4),
            "each byte counted once"
        );
    }

    /// A client that sends without reading while its server sends too: once both directions
    /// are handed back, the client's packets queue in the kernel where no buffer counts them
    /// (behind the server's bytes waiting for it), so TCP would not hold it back. The
    /// program drops them past its bound (so the kernel holds no more than it) and the agent
    /// resets both ends, saying why; before, 470 MB queued within a tenth of a second.
    #[tokio::test]
    async fn kernel_relay_resets_a_client_that_sends_without_reading_while_its_server_sends() {
        let Some(turn) = kernel_turn().await else {
            return;
        };
        let relay = &turn.relay;
        let (mut client, client_side, server_side, mut server) = sockets().await;
        let relaying = relay_counted(client_side, server_side, Some(relay));
        let chunk = vec![7u8; 1 << 20];
        let talk = async {
            pongs_and_pings(&mut client, &mut server).await;
            // Each side pushes until its writes stall for 300 ms or fail; nobody reads.
            let push = async |socket: &mut TcpStream| {
                let mut pushed = 0usize;
                while pushed < 512 << 20 {
                    let write = socket.write(&chunk);
                    match tokio::time::timeout(Duration::from_millis(300), write).await {
                        Ok(Ok(n)) => pushed += n,
                        Ok(Err(e)) => return (pushed, Some(e.kind())),
                        Err(_) => break,
                    }
                }
                (pushed, None)
            };
            let (server_pushed, _) = push(&mut server).await;
            let (client_pushed, client_failed) = push(&mut client).await;
            (server_pushed, client_pushed, client_failed)
        };
        let ((server_pushed, client_pushed, client_failed), (_, _, relayed)) =
            tokio::time::timeout(Duration::from_secs(30), async {
                tokio::join!(talk, relaying)
            })
            .await
            .expect("the relay ends");
        eprintln!("server pushed {server_pushed}, client pushed {client_pushed}");
        let error = relayed.expect_err("the connection is reset").to_string();
        assert!(error.contains("could not hold back this client"), "{error}");
        // The client's sends past the bound are dropped, not held (it may push many more
        // until the reset, at memory speed); the server's stayed held back by TCP.
        assert!(
            server_pushed < 48 << 20,
            "the server pushed {server_pushed} bytes the client did not read"
        );
        // The reset shows on the client's next write or read (once, whichever comes first).
        let reset = match client_failed {
            Some(kind) => kind,
            None => loop {
                let mut buf = [0u8; 1 << 16];
                match client.read(&mut buf).await {
                    Ok(0) => break io::ErrorKind::UnexpectedEof,
                    Ok(_) => continue,
                    Err(e) => break e.kind(),
                }
            },
        };
        assert!(
            matches!(
                reset,
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "the client sees a reset, not a clean end: {reset:?}"
        );
    }

    /// Ten small exchanges through a relay (the connection becomes interactive).
    async fn pongs_and_pings(client: &mut TcpStream, server: &mut TcpStream) {
        tokio::join!(pings(client, 10), pongs(server, 10));
    }

    #[tokio::test]
    async fn kernel_relay_passes_a_reset_on_to_the_client() {
        let Some(turn) = kernel_turn().await else {
            return;
        };
        let relay = &turn.relay;
        let before = kernel_count();
        let (mut client, client_side, server_side, mut server) = sockets().await;
        let relaying = relay_counted(client_side, server_side, Some(relay));
        let ponged = tokio::sync::Notify::new();
        let talk = async {
            pings(&mut client, 10).await;
            ponged.notify_one();
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await
        };
        let serve = async {
            pongs(&mut server, 10).await;
            // Once the kernel has the connection and the client every pong (the kernel
            // relays asynchronously: a reset must not overtake the last one), reset it.
            ponged.notified().await;
            while kernel_count() == before {
                tokio::task::yield_now().await;
            }
            crate::proxy::reset_on_close(&server);
            drop(server);
        };
        let (read, (), (ab, ba, relayed)) = tokio::join!(talk, serve, relaying);
        assert_eq!(kernel_count() - before, 1, "the kernel had the connection");
        assert_eq!(
            read.map_err(|e| e.kind()).err(),
            Some(io::ErrorKind::ConnectionReset),
            "the client sees the server's reset"
        );
        assert!(relayed.is_err(), "the relay ends in error");
        assert_eq!((ab, ba), (40, 40));
    }

    #[tokio::test]
    async fn kernel_relay_takes_what_both_sockets_already_hold() {
        let Some(turn) = kernel_turn().await else {
            return;
        };
        let relay = &turn.relay;
        let (mut client, client_side, server_side, mut server) = sockets().await;
        client.write_all(b"queued up").await.expect("client write");
        server
            .write_all(b"queued down")
            .await
            .expect("server write");
        // Both arrived at the relay's sockets (nothing read yet): only the kick hands them
        // to the program, since nothing more arrives.
        for (socket, len) in [(&client_side, 9), (&server_side, 11)] {
            while socket.peek(&mut [0u8; 16]).await.expect("peek") < len {
                tokio::task::yield_now().await;
            }
        }
        // Held while the sockets are relayed (dropping it drops the program's accounting).
        let engagement = relay.engage(client_side.as_fd(), server_side.as_fd());
        assert_eq!(engagement.engaged, Engaged::Both);
        let mut up = [0u8; 9];
        let mut down = [0u8; 11];
        tokio::time::timeout(Duration::from_secs(5), async {
            server.read_exact(&mut up).await.expect("server reads");
            client.read_exact(&mut down).await.expect("client reads");
        })
        .await
        .expect("the queued bytes were relayed without more arriving");
        assert_eq!((&up, &down), (b"queued up", b"queued down"));
    }

    #[tokio::test]
    async fn kernel_relay_resets_the_server_when_a_half_closed_client_resets() {
        let Some(turn) = kernel_turn().await else {
            return;
        };
        let relay = &turn.relay;
        let before = kernel_count();
        let (mut client, client_side, server_side, mut server) = sockets().await;
        let relaying = relay_counted(client_side, server_side, Some(relay));
        let talk = async {
            pings(&mut client, 10).await;
            while kernel_count() == before {
                tokio::task::yield_now().await;
            }
            // Done sending; then gone for good (a reset) while the server still sends.
            client.shutdown().await.expect("half-close");
            let mut first = [0u8; 4];
            client
                .read_exact(&mut first)
                .await
                .expect("the stream starts");
            crate::proxy::reset_on_close(&client);
            drop(client);
        };
        let serve = async {
            pongs(&mut server, 10).await;
            let mut rest = Vec::new();
            server
                .read_to_end(&mut rest)
                .await
                .expect("the client's FIN");
            // Streams until the reset reaches it.
            let chunk = vec![7u8; 64 * 1024];
            tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    if let Err(e) = server.write_all(&chunk).await {
                        return e.kind();
                    }
                }
            })
            .await
            .expect("the server learns the client is gone")
        };
        let ((), stopped, (_, _, relayed)) = tokio::join!(talk, serve, relaying);
        assert!(
            matches!(
                stopped,
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            ),
            "{stopped:?}"
        );
        assert!(relayed.is_err(), "the relay ends in error");
    }
}
