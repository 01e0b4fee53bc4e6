//! Sockets opened from inside a pod's network namespace, by a thread that has entered it.
//! The test process is in the cgroup the agent's programs attach to, so these connections
//! are what an application in the pod would do.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
