//! Zero-copy relay between two TCP sockets (plain passthrough): each direction moves bytes
//! socket -> pipe -> socket with splice(2), so payload never enters userspace. Half-closes
//! propagate; byte counts are exact.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

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

/// Moves `from` to `to` until EOF, then shuts `to`'s write side down.
async fn one_way(from: &TcpStream, to: &TcpStream) -> io::Result<u64> {
    let (pipe_r, pipe_w) = pipe()?;
    let mut total = 0u64;
    loop {
        // Fill the pipe from the source socket.
        from.readable().await?;
        let moved = from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), pipe_w.as_raw_fd(), CHUNK)
        });
        let mut in_pipe = match moved {
            Ok(0) => {
                socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
                return Ok(total);
            }
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        // Drain it into the destination socket.
        while in_pipe > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(pipe_r.as_raw_fd(), to.as_raw_fd(), in_pipe)
            }) {
                Ok(n) => {
                    in_pipe -= n;
                    total += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Relays both ways until both sides have ended; returns (bytes a->b, bytes b->a) and the
/// error that ended the relay early, if any.
pub async fn bidirectional(a: &TcpStream, b: &TcpStream) -> (u64, u64, Option<io::Error>) {
    let (ab, ba) = tokio::join!(one_way(a, b), one_way(b, a));
    match (ab, ba) {
        (Ok(ab), Ok(ba)) => (ab, ba, None),
        (Err(e), Ok(ba)) => (0, ba, Some(e)),
        (Ok(ab), Err(e)) => (ab, 0, Some(e)),
        (Err(e), Err(_)) => (0, 0, Some(e)),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn splices_both_ways_with_half_close_and_counts() {
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
        let relay = tokio::spawn(async move {
            let (client_side, _) = front.accept().await.expect("accept");
            let server_side = TcpStream::connect(back_addr).await.expect("connect");
            bidirectional(&client_side, &server_side).await
        });
        let mut client = TcpStream::connect(front_addr).await.expect("client");
        let (mut server, _) = back.accept().await.expect("server");
        let payload: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
        let sent = payload.clone();
        let (mut cr, mut cw) = client.split();
        let write = async {
            cw.write_all(&sent).await.expect("write");
            cw.shutdown().await.expect("half-close");
        };
        let serve = async {
            let mut got = Vec::new();
            server
                .read_to_end(&mut got)
                .await
                .expect("server reads to EOF");
            server.write_all(b"done").await.expect("reply");
            server.shutdown().await.expect("close");
            got
        };
        let read = async {
            let mut reply = Vec::new();
            cr.read_to_end(&mut reply).await.expect("client reads");
            reply
        };
        let ((), got, reply) = tokio::join!(write, serve, read);
        assert_eq!(got, payload);
        assert_eq!(reply, b"done");
        let (ab, ba, err) = relay.await.expect("relay");
        assert!(err.is_none(), "{err:?}");
        assert_eq!((ab, ba), (5_000_000, 4));
    }
}
