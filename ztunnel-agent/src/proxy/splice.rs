//! Zero-copy relay between two TCP sockets (plain passthrough): each direction moves bytes
//! socket -> pipe -> socket with splice(2), so payload never enters userspace. Half-closes
//! propagate; every splice into the destination socket is counted at once, so a direction
//! that fails keeps the count of what it moved.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

use super::connection::Meter;

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

/// Moves `from` to `to` until EOF, then shuts `to`'s write side down; counts what reaches
/// `to` in `meter` as it goes.
async fn one_way(from: &TcpStream, to: &TcpStream, meter: &Meter) -> io::Result<()> {
    let (pipe_r, pipe_w) = pipe()?;
    loop {
        // Fill the pipe from the source socket.
        from.readable().await?;
        let moved = from.try_io(Interest::READABLE, || {
            splice(from.as_raw_fd(), pipe_w.as_raw_fd(), CHUNK)
        });
        let mut in_pipe = match moved {
            Ok(0) => {
                socket2::SockRef::from(to).shutdown(std::net::Shutdown::Write)?;
                return Ok(());
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
                    meter.add(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Relays both ways until both sides have ended, counting bytes a->b in `ab` and b->a in
/// `ba` as they move. A clean end one way (EOF) is a half-close and the other way goes on;
/// an error either way (a peer's reset) or the drain `deadline` ends the relay at once and
/// is returned, and both
/// sockets are set to reset when closed: the failure reaches the other application as it
/// would on a direct connection, and neither socket lingers in CLOSE_WAIT or FIN_WAIT2.
pub async fn bidirectional(
    a: &TcpStream,
    b: &TcpStream,
    ab: &Meter,
    ba: &Meter,
    deadline: impl std::future::Future<Output = crate::drain::DeadlineReached>,
) -> Result<(), io::Error> {
    let relayed = tokio::select! {
        // The drain deadline ends it as an error (both ends reset, see above).
        biased;
        reached = deadline => Err(io::Error::other(reached)),
        relayed = async { tokio::try_join!(one_way(a, b, ab), one_way(b, a, ba)) } => relayed.map(|_| ()),
    };
    if relayed.is_err() {
        super::reset_on_close(a);
        super::reset_on_close(b);
    }
    relayed
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
            let (ab, ba) = (Meter::default(), Meter::default());
            let err = bidirectional(&client_side, &server_side, &ab, &ba, std::future::pending())
                .await
                .err();
            (ab.get(), ba.get(), err)
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
