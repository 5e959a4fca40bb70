//! Read-ahead under a DR site's TLS layer: rustls asks its reader for at
//! most 4 KiB per call, which on a busy link meant one `recv` (and one TCP
//! window update) per 4 KiB. `ReadAhead` reads the socket in large pieces
//! and hands them out in small ones.
//!
//! The buffer starts small and doubles each time a read fills it, up to its
//! limit: a connection that has not authenticated (a TLS handshake is a
//! few KiB) costs 16 KiB, not 256, and a stream of records soon reads
//! 256 KiB at a time. Writes pass straight through.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub struct ReadAhead<S> {
    inner: S,
    /// Initialized bytes; `pos..end` are read and not yet handed out.
    buf: Vec<u8>,
    pos: usize,
    end: usize,
    max: usize,
    /// The last fill filled `buf`: double it before the next one.
    grow: bool,
}

impl<S> ReadAhead<S> {
    /// Starts with `start` bytes of buffer, grows to at most `max`.
    pub fn new(inner: S, start: usize, max: usize) -> ReadAhead<S> {
        let start = start.clamp(1, max.max(1));
        ReadAhead { inner, buf: vec![0; start], pos: 0, end: 0, max: max.max(start), grow: false }
    }

    /// The current buffer size.
    pub fn capacity(&self) -> usize {
        self.buf.len()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadAhead<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        if me.pos == me.end {
            if me.grow {
                let n = (me.buf.len() * 2).min(me.max);
                me.buf = vec![0; n];
                me.grow = false;
            }
            // A request as big as the buffer gains nothing from it.
            if out.remaining() >= me.buf.len() {
                return Pin::new(&mut me.inner).poll_read(cx, out);
            }
            let mut rb = ReadBuf::new(&mut me.buf);
            ready!(Pin::new(&mut me.inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            me.pos = 0;
            me.end = n;
            me.grow = n == me.buf.len() && n < me.max;
            if n == 0 {
                return Poll::Ready(Ok(())); // end of stream
            }
        }
        let n = (me.end - me.pos).min(out.remaining());
        out.put_slice(&me.buf[me.pos..me.pos + n]);
        me.pos += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadAhead<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// Hands out `data` in reads of at most `chunk` bytes, and records the
    /// size of each read it was asked for.
    struct Source {
        data: Vec<u8>,
        at: usize,
        chunk: usize,
        asked: Vec<usize>,
    }

    impl AsyncRead for Source {
        fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let me = self.get_mut();
            me.asked.push(out.remaining());
            let n = (me.data.len() - me.at).min(out.remaining()).min(me.chunk);
            out.put_slice(&me.data[me.at..me.at + n]);
            me.at += n;
            Poll::Ready(Ok(()))
        }
    }

    fn data(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 + i / 251) as u8).collect()
    }

    #[tokio::test]
    async fn small_reads_get_every_byte_in_order_from_few_large_ones() {
        let d = data(3 << 20);
        let mut r = ReadAhead::new(Source { data: d.clone(), at: 0, chunk: usize::MAX, asked: vec![] }, 16 << 10, 256 << 10);
        let mut got = Vec::new();
        let mut b = [0u8; 4096];
        loop {
            let n = r.read(&mut b[..4096 - got.len() % 7]).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&b[..n]);
        }
        assert!(got == d, "bytes differ");
        // 16, 32, 64, 128 KiB, then 256 KiB reads: about 12 of those for 3 MiB, not 768.
        assert!(r.inner.asked.len() < 20, "{} reads of the source", r.inner.asked.len());
        assert_eq!(r.inner.asked.iter().max(), Some(&(256 << 10)));
        assert_eq!(r.capacity(), 256 << 10);
    }

    /// Answers Pending every other time (waking the reader at once).
    struct Hesitant(Source, bool);

    impl AsyncRead for Hesitant {
        fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
            let me = self.get_mut();
            me.1 = !me.1;
            if me.1 {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            Pin::new(&mut me.0).poll_read(cx, out)
        }
    }

    #[tokio::test]
    async fn pending_reads_lose_and_reorder_nothing() {
        let d = data(1 << 20);
        let src = Source { data: d.clone(), at: 0, chunk: 10_000, asked: vec![] };
        let mut r = ReadAhead::new(Hesitant(src, false), 4096, 64 << 10);
        let mut got = Vec::new();
        let mut b = [0u8; 3000];
        loop {
            let n = r.read(&mut b).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&b[..n]);
        }
        assert!(got == d, "bytes lost or reordered across Pending");
        assert_eq!(r.read(&mut []).await.unwrap(), 0, "an empty read must not wait");
    }

    #[tokio::test]
    async fn a_trickle_keeps_the_buffer_small() {
        // A handshake's worth in small pieces: no read fills the buffer.
        let d = data(6000);
        let mut r = ReadAhead::new(Source { data: d.clone(), at: 0, chunk: 1500, asked: vec![] }, 16 << 10, 256 << 10);
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        assert!(got == d);
        assert_eq!(r.capacity(), 16 << 10);
    }

    #[tokio::test]
    async fn big_requests_bypass_the_buffer_and_eof_is_eof() {
        let d = data(100_000);
        let mut r = ReadAhead::new(Source { data: d.clone(), at: 0, chunk: usize::MAX, asked: vec![] }, 1024, 4096);
        let mut b = vec![0u8; 50_000];
        let n = r.read(&mut b).await.unwrap();
        assert_eq!(n, 50_000);
        assert_eq!(r.inner.asked, vec![50_000], "a big read went through the buffer");
        let mut rest = Vec::new();
        r.read_to_end(&mut rest).await.unwrap();
        assert!(b.iter().chain(rest.iter()).eq(d.iter()));
        assert_eq!(r.read(&mut [0u8; 10]).await.unwrap(), 0);
    }
}
