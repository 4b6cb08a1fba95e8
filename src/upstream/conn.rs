//! Upstream connections: TCP or TLS streams opened within the connect timeout, kept alive in
//! a pool between calls, and the response body read from one in the call's own task.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;

use super::Error;
use super::wire::{Decoder, Framing, Step};

/// Room made in a read buffer when it has less than [`MIN_READ`] left: the size of a fresh
/// buffer. Frames are slices of it, so one that the client has not taken keeps its buffer
/// whole; a fresh one is made only when the last is (nearly) full, so that the small reads of
/// a stream share one.
pub(super) const READ_SIZE: usize = 8 * 1024;

/// The least room a read is given in the buffer it shares with earlier reads.
const MIN_READ: usize = 1024;

/// Most idle connections kept; more are closed as they come back.
const MAX_IDLE: usize = 512;

/// A connection to the upstream: plain TCP, or TLS over it.
pub(super) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Self::Plain(s) => s.is_write_vectored(),
            Self::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Where a connection goes: the pool's key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Target {
    pub https: bool,
    pub authority: axum::http::uri::Authority,
}

/// An open connection and what has been read from it but not yet consumed.
pub(super) struct Conn {
    pub stream: Stream,
    pub buf: BytesMut,
    pub target: Target,
    /// Came from the pool: the upstream may have closed it while it was idle.
    pub reused: bool,
}

impl Conn {
    pub fn new(stream: Stream, target: Target) -> Self {
        Self {
            stream,
            buf: BytesMut::with_capacity(READ_SIZE),
            target,
            reused: false,
        }
    }

    /// Writes the request head and body (in one `writev` when the stream takes it).
    pub async fn write_request(&mut self, head: &[u8], body: &[u8]) -> io::Result<()> {
        let mut all = [IoSlice::new(head), IoSlice::new(body)];
        // An empty slice left in the list would read as a write of nothing.
        let mut bufs = &mut all[..if body.is_empty() { 1 } else { 2 }];
        while !bufs.is_empty() {
            let n = self.stream.write_vectored(bufs).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut bufs, n);
        }
        self.stream.flush().await
    }

    /// Whether an idle connection is still open: the upstream has neither closed it nor
    /// sent anything unasked. Reads without waiting.
    fn still_open(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        let mut byte = [0u8; 1];
        let mut probe = ReadBuf::new(&mut byte);
        matches!(
            Pin::new(&mut self.stream).poll_read(&mut cx, &mut probe),
            Poll::Pending
        )
    }
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// Idle connections, most recently used last (reused first: its socket is warm).
pub(super) struct Pool {
    idle: Mutex<Vec<Idle>>,
    idle_timeout: Duration,
    reaper_started: AtomicBool,
}

impl Pool {
    pub fn new(idle_timeout: Duration) -> Self {
        Self {
            idle: Mutex::new(Vec::new()),
            idle_timeout,
            reaper_started: AtomicBool::new(false),
        }
    }

    /// An idle connection to `target` that is still open, if there is one.
    pub fn checkout(&self, target: &Target) -> Option<Conn> {
        loop {
            let idle = {
                let mut list = self
                    .idle
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let at = list.iter().rposition(|i| i.conn.target == *target)?;
                list.remove(at)
            };
            let mut conn = idle.conn;
            if idle.since.elapsed() < self.idle_timeout && conn.still_open() {
                conn.reused = true;
                return Some(conn);
            }
        }
    }

    /// Keeps a connection whose last answer was read whole, for the next call.
    fn checkin(&self, conn: Conn) {
        let mut list = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if list.len() < MAX_IDLE {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Closes idle connections that timed out or that the upstream closed.
    pub fn reap(&self) {
        let mut list = self
            .idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let timeout = self.idle_timeout;
        list.retain_mut(|i| i.since.elapsed() < timeout && i.conn.still_open());
    }

    /// Starts the task that reaps idle connections (once, from the first connect, which
    /// runs on the runtime), so that sockets the upstream closed do not linger in
    /// `CLOSE_WAIT` while no call comes. It holds the pool weakly and ends with it.
    pub fn start_reaper(self: &Arc<Self>) {
        if self.reaper_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool: Weak<Self> = Arc::downgrade(self);
        let period = (self.idle_timeout / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match pool.upgrade() {
                    Some(pool) => pool.reap(),
                    None => return,
                }
            }
        });
    }

    #[cfg(test)]
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map_or(0, |l| l.len())
    }
}

/// A response body, read off the upstream connection by whoever polls it (the call's own
/// task): frames are slices of the read buffer. Read whole, the connection goes back to the
/// pool; dropped before that, it is closed.
pub struct UpstreamBody {
    conn: Option<Conn>,
    decoder: Decoder,
    keep_alive: bool,
    pool: Arc<Pool>,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("decoder", &self.decoder)
            .field("keep_alive", &self.keep_alive)
            .finish_non_exhaustive()
    }
}

impl UpstreamBody {
    pub(super) fn new(conn: Conn, framing: Framing, keep_alive: bool, pool: Arc<Pool>) -> Self {
        let mut body = Self {
            conn: Some(conn),
            decoder: Decoder::new(framing),
            keep_alive,
            pool,
        };
        if body.decoder.is_done() {
            // Nothing to read (hyper never polls a body that says it has ended).
            body.release();
        }
        body
    }

    /// The body is read whole: the connection can carry the next call, unless the upstream
    /// said otherwise or sent more than was asked.
    fn release(&mut self) {
        if let Some(conn) = self.conn.take()
            && self.keep_alive
            && conn.buf.is_empty()
        {
            self.pool.checkin(conn);
        }
    }

    fn fail(&mut self, err: Error) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        self.conn = None;
        Poll::Ready(Some(Err(err)))
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.step(&mut conn.buf) {
                Err(err) => return this.fail(Error::malformed(err)),
                Ok(Step::Data(data)) => {
                    // Framing already read past this data (a chunked body's last chunk and
                    // end): the body ends with this frame, and the connection is free now.
                    // An error in it is found again by the next step.
                    if this.decoder.settle(&mut conn.buf).unwrap_or(false) && this.decoder.is_done()
                    {
                        this.release();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Ok(Step::Done) => {
                    this.release();
                    return Poll::Ready(None);
                }
                Ok(Step::NeedMore) => {
                    if conn.buf.capacity() - conn.buf.len() < MIN_READ {
                        conn.buf.reserve(READ_SIZE);
                    }
                    match tokio_util::io::poll_read_buf(
                        Pin::new(&mut conn.stream),
                        cx,
                        &mut conn.buf,
                    ) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Err(err)) => {
                            return this.fail(Error::truncated(Some(&err)));
                        }
                        Poll::Ready(Ok(0)) => {
                            // Read until close, or cut short.
                            this.keep_alive = false;
                            if this.decoder.eof().is_err() {
                                return this.fail(Error::truncated(None));
                            }
                            this.conn = None;
                            return Poll::Ready(None);
                        }
                        Poll::Ready(Ok(_)) => {}
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        self.decoder
            .remaining()
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}
