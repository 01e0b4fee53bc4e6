//! Copying both ways. Each direction starts with a small buffer that doubles whenever a read
//! fills it, up to 256 KiB: idle connections stay cheap, bulk transfers make few large
//! syscalls (and, through HBONE, large HTTP/2 DATA frames). A buffer is reused for every read;
//! nothing is allocated per read. A half-close is propagated as soon as one side ends.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// First buffer size.
const INITIAL: usize = 1024;
/// Largest buffer size.
const MAX: usize = 256 * 1024;

/// One direction's state: a reusable buffer holding `buf[pos..cap]` not yet written.
struct Direction {
    buf: Vec<u8>,
    pos: usize,
    cap: usize,
    total: u64,
    eof: bool,
    done: bool,
    unflushed: bool,
}

impl Direction {
    fn new() -> Self {
        Self {
            buf: vec![0u8; INITIAL],
            pos: 0,
            cap: 0,
            total: 0,
            eof: false,
            done: false,
            unflushed: false,
        }
    }

    /// Moves bytes from `from` to `to` until `from` ends (then shuts `to` down) or either
    /// side would block.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.pos == self.cap && !self.eof {
                // A read that filled the whole buffer means more is coming: grow (the buffer
                // is empty here, so nothing is moved).
                if self.cap == self.buf.len() && self.buf.len() < MAX {
                    self.buf.resize(self.buf.len() * 2, 0);
                }
                let mut rb = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *from).poll_read(cx, &mut rb) {
                    Poll::Pending => {
                        // Nothing to read now: push out what was written before waiting.
                        if self.unflushed {
                            ready!(Pin::new(&mut *to).poll_flush(cx))?;
                            self.unflushed = false;
                        }
                        return Poll::Pending;
                    }
                    Poll::Ready(result) => result?,
                }
                let n = rb.filled().len();
                if n == 0 {
                    self.eof = true;
                } else {
                    self.pos = 0;
                    self.cap = n;
                }
            }
            while self.pos < self.cap {
                let n = ready!(Pin::new(&mut *to).poll_write(cx, &self.buf[self.pos..self.cap]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.total += n as u64;
                self.unflushed = true;
            }
            if self.eof {
                ready!(Pin::new(&mut *to).poll_flush(cx))?;
                ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Copies both ways until both sides have ended; returns (bytes a->b, bytes b->a) and the
/// error that ended the copy early, if any. One future drives both directions: no locks,
/// no extra tasks.
pub async fn bidirectional<A, B>(mut a: A, mut b: B) -> (u64, u64, Option<io::Error>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ab, mut ba) = (Direction::new(), Direction::new());
    let result = poll_fn(|cx| {
        let forward = ab.poll_copy(cx, &mut a, &mut b)?;
        let backward = ba.poll_copy(cx, &mut b, &mut a)?;
        if forward.is_ready() && backward.is_ready() {
            Poll::Ready(Ok::<(), io::Error>(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    (ab.total, ba.total, result.err())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn copies_both_ways_with_half_close_and_counts() {
        let (client, proxy_a) = tokio::io::duplex(64 * 1024);
        let (proxy_b, server) = tokio::io::duplex(64 * 1024);
        let relay = tokio::spawn(bidirectional(proxy_a, proxy_b));
        let (mut cr, mut cw) = tokio::io::split(client);
        let (mut sr, mut sw) = tokio::io::split(server);
        let up: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let sent = up.clone();
        let writer = tokio::spawn(async move {
            cw.write_all(&sent).await.expect("write");
            cw.shutdown().await.expect("half-close");
        });
        let mut got = Vec::new();
        sr.read_to_end(&mut got).await.expect("server reads to EOF");
        assert_eq!(got, up, "upstream intact, EOF propagated");
        sw.write_all(b"reply after half-close")
            .await
            .expect("reply");
        sw.shutdown().await.expect("close");
        let mut reply = Vec::new();
        cr.read_to_end(&mut reply).await.expect("client reads");
        assert_eq!(reply, b"reply after half-close");
        writer.await.expect("writer");
        let (ab, ba, err) = relay.await.expect("relay");
        assert!(err.is_none());
        assert_eq!((ab, ba), (3_000_000, 22));
    }
}
