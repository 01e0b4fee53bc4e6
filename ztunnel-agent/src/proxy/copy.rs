//! Copying between a socket and an HBONE stream, both ways, without copying in userspace: a
//! read from the socket becomes the HTTP/2 DATA payload as it is (no copy into a frame
//! buffer), and a received DATA payload is written to the socket as it is (no copy into a
//! relay buffer). (Plain TCP passthrough moves bytes in the kernel: see `splice`.)
//!
//! Reads start small and double whenever a read fills the buffer, up to 256 KiB: an idle
//! connection holds no read buffer, bulk transfers make few large syscalls and large DATA
//! frames. The read buffer is taken back for the next read once HTTP/2 has written the
//! previous chunk; a new one is allocated only while that chunk is still queued. A half-close is propagated as
//! soon as one side ends (END_STREAM one way, shutdown(SHUT_WR) the other).

use std::future::poll_fn;
use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite};

use super::connection::Meter;
use crate::drain::DeadlineReached;

/// First buffer size.
const INITIAL: usize = 1024;
/// Largest buffer size.
const MAX: usize = 256 * 1024;

/// A connection whose grown read buffer saw no data for this long gives it back.
const SHRINK_AFTER: Duration = Duration::from_secs(2);

/// Socket to HBONE stream: reads become DATA frames, within HTTP/2 flow control.
struct ToStream {
    buf: BytesMut,
    /// Read size: doubles whenever a read fills it, up to [`MAX`].
    size: usize,
    /// Read from the socket, not yet handed to HTTP/2.
    pending: Bytes,
    done: bool,
    /// Armed while the buffer is larger than [`INITIAL`] and the socket is quiet: when it
    /// fires, the buffer a burst grew is freed, so an idle connection costs little again.
    shrink: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl ToStream {
    fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            size: INITIAL,
            pending: Bytes::new(),
            done: false,
            shrink: None,
        }
    }

    /// The socket is quiet: arm (or re-arm) the shrink timer while the buffer is grown, and
    /// shrink once it fires.
    fn quiet(&mut self, cx: &mut Context<'_>) {
        if self.size <= INITIAL {
            // An idle connection holds no buffer (the next read allocates one): most of a
            // node's connections are idle at any moment.
            if self.buf.is_empty() {
                self.buf = BytesMut::new();
            }
            return;
        }
        let deadline = tokio::time::Instant::now() + SHRINK_AFTER;
        let timer = self
            .shrink
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.as_mut().poll(cx).is_ready() {
            // Fired without a read in between: give the memory back.
            self.shrink = None;
            self.size = INITIAL;
            if self.buf.is_empty() {
                self.buf = BytesMut::new();
            }
        }
    }

    /// This direction has ended: its buffer (up to [`MAX`] after a burst) is not kept for
    /// the rest of the connection.
    fn finish(&mut self) {
        self.done = true;
        self.buf = BytesMut::new();
        self.shrink = None;
    }

    /// Data arrived: the quiet period is over.
    fn busy(&mut self) {
        if let Some(timer) = self.shrink.as_mut() {
            timer
                .as_mut()
                .reset(tokio::time::Instant::now() + SHRINK_AFTER);
        }
    }

    fn poll_copy<R>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut SendStream<Bytes>,
        meter: &Meter,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            while !self.pending.is_empty() {
                // Ask for what is pending; send what the peer's window allows now.
                to.reserve_capacity(self.pending.len());
                let mut capacity = to.capacity();
                if capacity == 0 {
                    capacity = match ready!(to.poll_capacity(cx)) {
                        Some(Ok(n)) => n,
                        Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                        None => return Poll::Ready(Err(why_closed(cx, to))),
                    };
                }
                let chunk = self.pending.split_to(capacity.min(self.pending.len()));
                let n = chunk.len();
                to.send_data(chunk, false).map_err(h2_io)?;
                meter.add(n);
            }
            // Takes the previous chunk's memory back once HTTP/2 has released it.
            self.buf.reserve(self.size);
            let n = match tokio_util::io::poll_read_buf(Pin::new(&mut *from), cx, &mut self.buf) {
                Poll::Ready(read) => read?,
                // The socket is quiet: notice the peer resetting the stream (or the connection
                // dying) now, not at the application's next write.
                Poll::Pending => match to.poll_reset(cx) {
                    Poll::Pending => {
                        self.quiet(cx);
                        return Poll::Pending;
                    }
                    // "No more, thanks": stop sending, without error.
                    Poll::Ready(Ok(reason)) if reason == h2::Reason::NO_ERROR => {
                        self.finish();
                        return Poll::Ready(Ok(()));
                    }
                    Poll::Ready(Ok(reason)) => return Poll::Ready(Err(reset(reason))),
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                },
            };
            if n == 0 {
                // Half-close: END_STREAM on an empty DATA frame.
                to.send_data(Bytes::new(), true).map_err(h2_io)?;
                self.finish();
                return Poll::Ready(Ok(()));
            }
            if n >= self.size && self.size < MAX {
                self.size *= 2;
            }
            self.busy();
            self.pending = self.buf.split().freeze();
        }
    }
}

/// HBONE stream to socket: each DATA payload is written as it came; the window is given back
/// as bytes reach the socket, so a slow reader slows the sender.
struct FromStream {
    pending: Bytes,
    eof: bool,
    done: bool,
}

impl FromStream {
    fn new() -> Self {
        Self {
            pending: Bytes::new(),
            eof: false,
            done: false,
        }
    }

    fn poll_copy<W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut RecvStream,
        to: &mut W,
        meter: &Meter,
    ) -> Poll<io::Result<()>>
    where
        W: AsyncWrite + Unpin,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            while !self.pending.is_empty() {
                let n = ready!(Pin::new(&mut *to).poll_write(cx, &self.pending))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pending.advance(n);
                meter.add(n);
                from.flow_control().release_capacity(n).map_err(h2_io)?;
            }
            if self.eof {
                ready!(Pin::new(&mut *to).poll_flush(cx))?;
                ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            match from.poll_data(cx) {
                Poll::Pending => {
                    ready!(Pin::new(&mut *to).poll_flush(cx))?;
                    return Poll::Pending;
                }
                Poll::Ready(Some(Ok(data))) => self.pending = data,
                // The peer ended the stream with a reset that is not an error (as hyper and
                // upstream ztunnel read it): the end of its data.
                Poll::Ready(Some(Err(e)))
                    if e.is_reset()
                        && e.is_remote()
                        && matches!(
                            e.reason(),
                            Some(h2::Reason::NO_ERROR | h2::Reason::CANCEL)
                        ) =>
                {
                    self.eof = true
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_io(e))),
                Poll::Ready(None) => self.eof = true,
            }
        }
    }
}

/// An HTTP/2 error as the relay reports it: a peer's reset names its reason, whichever
/// direction noticed it.
fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        e.into_io().unwrap_or_else(|| io::ErrorKind::Other.into())
    } else if let Some(reason) = e.reason().filter(|_| e.is_reset() && e.is_remote()) {
        reset(reason)
    } else {
        io::Error::other(e)
    }
}

fn reset(reason: h2::Reason) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        format!("HBONE stream reset by the peer: {reason}"),
    )
}

/// Why a stream can take no more data: the peer's reset reason, or the connection's error.
fn why_closed(cx: &mut Context<'_>, to: &mut SendStream<Bytes>) -> io::Error {
    match to.poll_reset(cx) {
        Poll::Ready(Ok(reason)) => reset(reason),
        Poll::Ready(Err(e)) => h2_io(e),
        Poll::Pending => io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed"),
    }
}

/// Copies between `socket` and an HBONE stream until both directions have ended, counting
/// bytes socket->stream in `up` and stream->socket in `down` as they move; returns the error
/// that ended it early, if any, or the drain deadline's (the stream is then reset with
/// CONNECT_ERROR; the caller resets the socket, see [`super::reset_on_close`]).
pub async fn tunnel<S>(
    mut socket: S,
    mut send: SendStream<Bytes>,
    mut recv: RecvStream,
    up: &Meter,
    down: &Meter,
    deadline: impl std::future::Future<Output = DeadlineReached>,
) -> Result<(), io::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut to_stream, mut from_stream) = (ToStream::new(), FromStream::new());
    let mut deadline = std::pin::pin!(deadline);
    let relayed = poll_fn(|cx| {
        // The drain deadline ends it as an error: both ends are then reset, so neither
        // application mistakes the cut for the end of the data.
        if let Poll::Ready(reached) = deadline.as_mut().poll(cx) {
            return Poll::Ready(Err(io::Error::other(reached)));
        }
        let forward = to_stream.poll_copy(cx, &mut socket, &mut send, up)?;
        let backward = from_stream.poll_copy(cx, &mut recv, &mut socket, down)?;
        if forward.is_ready() && backward.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    if relayed.is_err() {
        // RFC 9113 8.5: a proxy whose TCP connection fails resets the stream with
        // CONNECT_ERROR, and the other proxy then resets its TCP connection, so the failure
        // reaches the far application (no-op if the peer already reset the stream).
        send.send_reset(h2::Reason::CONNECT_ERROR);
    }
    relayed
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// [`tunnel`] with its own meters: (bytes up, bytes down, the error).
    async fn counted<S>(
        socket: S,
        send: SendStream<Bytes>,
        recv: RecvStream,
    ) -> (u64, u64, Option<io::Error>)
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let (up, down) = (Meter::default(), Meter::default());
        let err = tunnel(socket, send, recv, &up, &down, std::future::pending())
            .await
            .err();
        (up.get(), down.get(), err)
    }

    /// An HTTP/2 CONNECT stream pair over an in-memory pipe: (client side, server side).
    async fn h2_pair() -> (
        (SendStream<Bytes>, RecvStream),
        (SendStream<Bytes>, RecvStream),
    ) {
        let (c, s) = tokio::io::duplex(256 * 1024);
        let server = tokio::spawn(async move {
            let mut conn = h2::server::handshake(s).await.expect("server handshake");
            let (req, mut respond) = conn.accept().await.expect("a stream").expect("ok");
            let send = respond
                .send_response(http::Response::new(()), false)
                .expect("200");
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            (send, req.into_body())
        });
        let (client, conn) = h2::client::handshake(c).await.expect("client handshake");
        tokio::spawn(conn);
        let mut client = client.ready().await.expect("ready");
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri("10.0.0.1:80")
            .body(())
            .expect("request");
        let (response, send) = client.send_request(req, false).expect("send");
        let server_side = server.await.expect("server");
        let recv = response.await.expect("response").into_body();
        ((send, recv), server_side)
    }

    #[tokio::test]
    async fn tunnel_copies_both_ways_with_half_close_and_counts() {
        let ((csend, crecv), (ssend, srecv)) = h2_pair().await;
        // client app <-> [tunnel] <-h2-> [tunnel] <-> server app
        let (client_app, client_proxy) = tokio::io::duplex(64 * 1024);
        let (server_proxy, server_app) = tokio::io::duplex(64 * 1024);
        let a = tokio::spawn(counted(client_proxy, csend, crecv));
        let b = tokio::spawn(counted(server_proxy, ssend, srecv));
        let (mut cr, mut cw) = tokio::io::split(client_app);
        let (mut sr, mut sw) = tokio::io::split(server_app);
        // More than the 64 KiB default windows: flow control must give capacity back.
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 253) as u8).collect();
        let sent = up.clone();
        let writer = tokio::spawn(async move {
            cw.write_all(&sent).await.expect("write");
            cw.shutdown().await.expect("half-close");
        });
        let mut got = Vec::new();
        sr.read_to_end(&mut got).await.expect("server reads to EOF");
        assert!(got == up, "upstream intact, EOF propagated");
        sw.write_all(b"reply after half-close")
            .await
            .expect("reply");
        sw.shutdown().await.expect("close");
        let mut reply = Vec::new();
        cr.read_to_end(&mut reply).await.expect("client reads");
        assert_eq!(reply, b"reply after half-close");
        writer.await.expect("writer");
        let (a_up, a_down, a_err) = a.await.expect("client tunnel");
        let (b_up, b_down, b_err) = b.await.expect("server tunnel");
        assert!(a_err.is_none() && b_err.is_none(), "{a_err:?} {b_err:?}");
        assert_eq!((a_up, a_down), (3_000_000, 22));
        assert_eq!((b_up, b_down), (22, 3_000_000));
    }

    #[tokio::test]
    async fn tunnel_ends_with_an_error_when_the_peer_resets() {
        let ((csend, crecv), (mut ssend, srecv)) = h2_pair().await;
        let (client_app, client_proxy) = tokio::io::duplex(1024);
        let a = tokio::spawn(counted(client_proxy, csend, crecv));
        // More than the 64 KiB window the peer never gives back: the sender waits for
        // capacity when the reset comes.
        let (_app_read, mut app_write) = tokio::io::split(client_app);
        tokio::spawn(async move {
            let _ = app_write.write_all(&[1u8; 200 * 1024]).await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        ssend.send_reset(h2::Reason::CONNECT_ERROR);
        let (up, _, err) = tokio::time::timeout(std::time::Duration::from_secs(5), a)
            .await
            .expect("the tunnel ends")
            .expect("task");
        assert!(up < 200 * 1024, "flow control held the rest back: {up}");
        let err = err.expect("a reset stream is an error");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        assert!(
            err.to_string().contains("reset by the peer: "),
            "the reason is named: {err}"
        );
        drop(srecv);
    }

    #[tokio::test]
    async fn a_reset_after_end_stream_is_noticed_while_the_socket_is_quiet() {
        let ((csend, crecv), (mut ssend, srecv)) = h2_pair().await;
        let (mut client_app, client_proxy) = tokio::io::duplex(1024);
        let a = tokio::spawn(counted(client_proxy, csend, crecv));
        ssend
            .send_data(Bytes::from_static(b"done"), true)
            .expect("data");
        let mut got = Vec::new();
        client_app
            .read_to_end(&mut got)
            .await
            .expect("EOF after the data");
        assert_eq!(got, b"done");
        // The client application stays quiet; the peer gives up on the stream.
        ssend.send_reset(h2::Reason::CONNECT_ERROR);
        drop(srecv);
        let (up, down, err) = tokio::time::timeout(std::time::Duration::from_secs(5), a)
            .await
            .expect("the tunnel ends without the application writing")
            .expect("task");
        assert_eq!((up, down), (0, 4));
        let err = err.expect("a CONNECT_ERROR reset is an error");
        assert_eq!(err.kind(), io::ErrorKind::ConnectionReset, "{err}");
        assert!(err.to_string().contains("reset by the peer: "), "{err}");
    }

    #[tokio::test]
    async fn a_no_error_reset_ends_the_tunnel_cleanly() {
        let ((csend, crecv), (mut ssend, srecv)) = h2_pair().await;
        let (mut client_app, client_proxy) = tokio::io::duplex(1024);
        let a = tokio::spawn(counted(client_proxy, csend, crecv));
        ssend
            .send_data(Bytes::from_static(b"all"), false)
            .expect("data");
        let mut got = [0u8; 3];
        client_app.read_exact(&mut got).await.expect("data first");
        assert_eq!(&got, b"all");
        // A reset discards what its sender still had queued: sent only once the data arrived.
        ssend.send_reset(h2::Reason::NO_ERROR);
        drop(srecv);
        let mut rest = Vec::new();
        client_app.read_to_end(&mut rest).await.expect("EOF");
        assert!(rest.is_empty());
        let (_, down, err) = tokio::time::timeout(std::time::Duration::from_secs(5), a)
            .await
            .expect("the tunnel ends")
            .expect("task");
        assert_eq!(down, 3);
        assert!(err.is_none(), "NO_ERROR is not an error: {err:?}");
    }
}
