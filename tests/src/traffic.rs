//! Sockets opened from inside a pod's network namespace, by a thread that has entered it.
//! The test process is in the cgroup the agent's programs attach to, so these connections
//! are what an application in the pod would do.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A single-threaded tokio runtime, for a thread that has entered a pod's namespace (every
/// socket its tasks open is then the pod's).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Runs `f` on a new thread inside the network namespace at `netns`.
pub fn in_netns<T: Send + 'static>(netns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = File::open(netns).unwrap_or_else(|e| panic!("open {}: {e}", netns.display()));
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd changes only this new thread's namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("thread in netns panicked")
}

/// What a client saw.
#[derive(Debug)]
pub struct Exchange {
    /// `getpeername()` of the connected socket.
    pub peer: SocketAddr,
    /// `getsockname()`.
    pub local: SocketAddr,
    /// What the server answered.
    pub response: String,
}

/// Connects from inside `netns` to `dst`, sends `payload`, half-closes, reads the answer.
pub fn exchange(netns: &Path, dst: SocketAddr, payload: &str) -> std::io::Result<Exchange> {
    let payload = payload.to_string();
    in_netns(netns, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let peer = s.peer_addr()?;
        let local = s.local_addr()?;
        s.write_all(payload.as_bytes())?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut response = String::new();
        s.read_to_string(&mut response)?;
        Ok(Exchange {
            peer,
            local,
            response,
        })
    })
}

/// A connection the test server accepted.
#[derive(Clone, Debug)]
pub struct Accepted {
    /// Local address of the accepted socket.
    pub local: SocketAddr,
    /// Peer address.
    pub peer: SocketAddr,
}

/// A TCP server in a pod that answers `hello <payload>` and records what it accepted.
pub struct Server {
    /// Connections seen so far.
    pub accepted: Arc<Mutex<Vec<Accepted>>>,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl Server {
    /// Starts listening on `addr` inside `netns` (the thread stays in the namespace).
    pub fn start(netns: PathBuf, addr: SocketAddr) -> Self {
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let seen = accepted.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let file = File::open(&netns).expect("open netns");
            // SAFETY: setns on a valid namespace fd changes only this thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns");
            let listener = TcpListener::bind(addr).expect("bind test server");
            ready_tx.send(()).expect("signal ready");
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let (Ok(local), Ok(peer)) = (conn.local_addr(), conn.peer_addr()) else {
                    continue;
                };
                seen.lock().expect("lock").push(Accepted { local, peer });
                std::thread::spawn(move || {
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
                    let mut got = Vec::new();
                    let _ = conn.read_to_end(&mut got);
                    let _ = conn
                        .write_all(format!("hello {}", String::from_utf8_lossy(&got)).as_bytes());
                });
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(5))
            .expect("test server did not start");
        Self { accepted, addr }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> Vec<Accepted> {
        self.accepted.lock().expect("lock").clone()
    }
}

/// A deterministic byte stream: `len` bytes, different for each `seed`.
pub fn pattern(seed: u8, offset: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let n = offset + i as u64;
        *b = (n.wrapping_mul(2654435761) >> 13) as u8 ^ seed;
    }
}

/// Where an FNV-1a hash starts (its offset basis).
pub const FNV1A_START: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a: `h` (a hash so far, [`FNV1A_START`] at first) extended over `bytes`.
pub fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// FNV-1a over everything read from `r` until EOF; returns (bytes, hash).
pub fn drain_hash(r: &mut impl Read) -> (u64, u64) {
    let mut buf = vec![0u8; 256 * 1024];
    let (mut n, mut h) = (0u64, FNV1A_START);
    loop {
        let k = r.read(&mut buf).expect("read");
        if k == 0 {
            return (n, h);
        }
        h = fnv1a(h, &buf[..k]);
        n += k as u64;
    }
}

/// Writes `len` bytes of `pattern(seed)` to `w`; returns their hash.
pub fn send_pattern(w: &mut impl Write, seed: u8, len: u64) -> u64 {
    let mut buf = vec![0u8; 256 * 1024];
    let (mut sent, mut h) = (0u64, FNV1A_START);
    while sent < len {
        let k = (len - sent).min(buf.len() as u64) as usize;
        pattern(seed, sent, &mut buf[..k]);
        h = fnv1a(h, &buf[..k]);
        w.write_all(&buf[..k]).expect("write");
        sent += k as u64;
    }
    h
}

/// Runs `f` on a new thread inside `netns` without waiting for it.
fn spawn_in_netns<T: Send + 'static>(
    netns: &Path,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let file = File::open(netns).unwrap_or_else(|e| panic!("open {}: {e}", netns.display()));
    std::thread::spawn(move || {
        // SAFETY: setns on a valid namespace fd changes only this new thread's namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

/// A server in a pod that reads each connection to its end and answers with the count and
/// FNV-1a hash of what it got (16 bytes, big-endian): proof that a transfer arrived whole.
pub struct HashServer {
    /// Where it listens.
    pub addr: SocketAddr,
}

impl HashServer {
    /// Starts listening on `addr` inside `netns`.
    pub fn start(netns: &Path, addr: SocketAddr) -> Self {
        serve_each(netns, addr, "hash server", |mut conn| {
            let (len, hash) = drain_hash(&mut conn);
            let _ = conn.write_all(&len.to_be_bytes());
            let _ = conn.write_all(&hash.to_be_bytes());
        });
        Self { addr }
    }
}

/// What a finished [`Transfer`] saw.
#[derive(Debug, PartialEq, Eq)]
pub struct Transferred {
    /// Bytes sent and their hash.
    pub sent: (u64, u64),
    /// What the server reported receiving.
    pub echoed: (u64, u64),
}

/// A client thread in a pod that runs until told to stop, publishing a running count: the
/// shape of [`Transfer`], [`Download`] and [`ConnectionStream`].
struct Stoppable<T> {
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
    thread: std::thread::JoinHandle<T>,
}

impl<T: Send + 'static> Stoppable<T> {
    /// Runs `work(stop, count)` on a thread inside `netns`.
    fn spawn(
        netns: &Path,
        work: impl FnOnce(&AtomicBool, &AtomicU64) -> T + Send + 'static,
    ) -> Self {
        let (stop, count) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (flag, counter) = (stop.clone(), count.clone());
        let thread = spawn_in_netns(netns, move || work(&flag, &counter));
        Self {
            stop,
            count,
            thread,
        }
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Tells the thread to stop and returns what it returned.
    fn finish(self, what: &str) -> T {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .unwrap_or_else(|_| panic!("{what} thread panicked"))
    }
}

/// A long transfer to a [`HashServer`]: sends a known pattern in paced chunks until told to
/// finish, then half-closes and reads the server's count and hash.
pub struct Transfer(Stoppable<std::io::Result<Transferred>>);

impl Transfer {
    /// Connects from inside `netns` to `dst` and starts sending.
    pub fn start(netns: &Path, dst: SocketAddr, seed: u8) -> Self {
        Self(Stoppable::spawn(netns, move |stop, progress| {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            let mut buf = vec![0u8; 64 * 1024];
            let (mut total, mut h) = (0u64, FNV1A_START);
            while !stop.load(Ordering::Relaxed) {
                pattern(seed, total, &mut buf);
                h = fnv1a(h, &buf);
                s.write_all(&buf)?;
                total += buf.len() as u64;
                progress.store(total, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
            s.shutdown(std::net::Shutdown::Write)?;
            let mut answer = [0u8; 16];
            s.read_exact(&mut answer)?;
            let word = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8 bytes"));
            Ok(Transferred {
                sent: (total, h),
                echoed: (word(&answer[..8]), word(&answer[8..])),
            })
        }))
    }

    /// Bytes sent so far.
    pub fn sent(&self) -> u64 {
        self.0.count()
    }

    /// Stops sending, half-closes and returns what both ends counted.
    pub fn finish(self) -> std::io::Result<Transferred> {
        self.0.finish("transfer")
    }
}

/// A server in a pod that, on each connection, sends a paced stream (64 KiB every 2 ms)
/// until the client goes away: the response side of a long transfer (a download).
pub struct StreamingServer {
    /// Where it listens.
    pub addr: SocketAddr,
}

impl StreamingServer {
    /// Starts listening on `addr` inside `netns`.
    pub fn start(netns: &Path, addr: SocketAddr) -> Self {
        serve_each(netns, addr, "streaming server", |mut conn| {
            let buf = vec![0x5au8; 64 * 1024];
            while conn.write_all(&buf).is_ok() {
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        Self { addr }
    }
}

/// Listens on `addr` inside `netns` (returning once it listens) and runs `each` on its own
/// thread for every accepted connection.
fn serve_each(netns: &Path, addr: SocketAddr, what: &'static str, each: fn(TcpStream)) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    spawn_in_netns(netns, move || {
        let listener =
            TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {what} on {addr}: {e}"));
        ready_tx.send(()).expect("signal ready");
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            std::thread::spawn(move || each(conn));
        }
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| panic!("{what} did not start"));
}

/// A long download from a [`StreamingServer`]: reads until stopped.
pub struct Download(Stoppable<std::io::Result<u64>>);

impl Download {
    /// Connects from inside `netns` to `dst` and starts reading.
    pub fn start(netns: &Path, dst: SocketAddr) -> Self {
        Self(Stoppable::spawn(netns, move |stop, progress| {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let n = s.read(&mut buf)?;
                if n == 0 {
                    return Err(std::io::Error::other("the download ended early"));
                }
                total += n as u64;
                progress.store(total, Ordering::Relaxed);
            }
            Ok(total)
        }))
    }

    /// Bytes received so far.
    pub fn received(&self) -> u64 {
        self.0.count()
    }

    /// Stops reading and closes; the total received.
    pub fn finish(self) -> std::io::Result<u64> {
        self.0.finish("download")
    }
}

/// A steady stream of new short connections from a pod to a [`Server`], each checked for
/// the right answer, until stopped.
pub struct ConnectionStream(Stoppable<StreamTally>);

/// What a [`ConnectionStream`] saw.
#[derive(Debug, Default)]
pub struct StreamTally {
    /// Connections answered correctly.
    pub ok: u64,
    /// The failures, each with when (since the start) and why.
    pub failed: Vec<(Duration, String)>,
}

impl ConnectionStream {
    /// Starts connecting from inside `netns` to `dst`, one connection after the other.
    pub fn start(netns: &Path, dst: SocketAddr) -> Self {
        Self::paced(netns, dst, Duration::ZERO)
    }

    /// As [`ConnectionStream::start`], waiting `pause` after each connection.
    pub fn paced(netns: &Path, dst: SocketAddr, pause: Duration) -> Self {
        Self(Stoppable::spawn(netns, move |stop, answered| {
            let started = std::time::Instant::now();
            let mut tally = StreamTally::default();
            let one = |n: u64| -> std::io::Result<()> {
                let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                let payload = format!("c{n}");
                s.write_all(payload.as_bytes())?;
                s.shutdown(std::net::Shutdown::Write)?;
                let mut answer = String::new();
                s.read_to_string(&mut answer)?;
                if answer != format!("hello {payload}") {
                    return Err(std::io::Error::other(format!("wrong answer {answer:?}")));
                }
                Ok(())
            };
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                match one(n) {
                    Ok(()) => {
                        tally.ok += 1;
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tally.failed.push((started.elapsed(), e.to_string())),
                }
                if !pause.is_zero() {
                    std::thread::sleep(pause);
                }
            }
            tally
        }))
    }

    /// Waits until `n` more connections than now have been answered (panics after 20 s).
    pub fn wait_for_more(&self, n: u64) {
        let count = || self.0.count();
        let target = count() + n;
        crate::wait_for(
            &format!("{n} more answered connections"),
            Duration::from_secs(20),
            || (count() >= target).then_some(()),
        );
    }

    /// Stops and returns the tally.
    pub fn stop(self) -> StreamTally {
        self.0.finish("connection stream")
    }
}

/// Serves one connection at `addr` inside the network namespace at `netns` with `serve`, on
/// a thread of its own. Returns once the listener is bound; join the handle for `serve`'s
/// result.
pub fn serve_one<T: Send + 'static>(
    netns: PathBuf,
    addr: SocketAddr,
    serve: impl FnOnce(TcpStream) -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        in_netns(&netns, move || {
            let listener = TcpListener::bind(addr).expect("bind");
            ready_tx.send(()).expect("ready");
            let (conn, _) = listener.accept().expect("accept");
            serve(conn)
        })
    });
    ready_rx.recv().expect("server ready");
    handle
}

/// Reads `conn` to its EOF and answers with how many bytes came and their hash (see
/// [`read_count_and_hash`]).
pub fn answer_count_and_hash(conn: &mut TcpStream) {
    let (got, hash) = drain_hash(conn);
    conn.write_all(&got.to_be_bytes()).expect("write count");
    conn.write_all(&hash.to_be_bytes()).expect("write hash");
}

/// Reads the answer of [`answer_count_and_hash`]: (bytes, hash).
pub fn read_count_and_hash(s: &mut impl Read) -> (u64, u64) {
    let mut header = [0u8; 16];
    s.read_exact(&mut header).expect("header");
    let word = |b: &[u8]| u64::from_be_bytes(b.try_into().expect("8 bytes"));
    (word(&header[..8]), word(&header[8..]))
}
