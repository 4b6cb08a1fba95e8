//! HTTP/1 request framing that hyper hides: refusing requests whose length is ambiguous.
//!
//! hyper 1.x reads a request carrying both `Content-Length` and `Transfer-Encoding: chunked`
//! as chunked: it removes the `Content-Length` from the headers it hands over (or never adds
//! it, when it comes second) and only remembers, privately, to close the connection after the
//! answer (`Server::parse` in hyper's `proto/h1/role.rs`). Of two equal `Content-Length`
//! lines it keeps one. Such a request looks exactly like a well-formed one to any service, and
//! hyper has no setting to refuse it; yet a front end that trusted the other header would see
//! a different request boundary (request smuggling).
//!
//! So each accepted connection is wrapped in [`Inspected`], which reads the request heads as
//! they pass on their way to hyper, and the app is wrapped in [`Guarded`], which answers the
//! request whose head was refused with 400 `ambiguous_length` and closes the connection.
//!
//! A head hyper's own parser refuses (malformed, or over its limits) never reaches the app:
//! hyper answers it with a bare status line (400, 414 or 431, no body) and closes the
//! connection. [`Inspected`] writes the OpenAI-shaped answer every other refusal has in its
//! place ([`bare_refusal`]): only once its tracker has stopped, so the normal path pays one
//! branch per write.
//!
//! Hand-written because nothing off the shelf does this, and it must follow the byte stream
//! exactly as hyper frames it to know where each head starts: heads are parsed with httparse,
//! the parser hyper uses, with the same (default) settings and header limit; bodies are
//! skipped by their `Content-Length` or walked through hyper's chunked grammar (its
//! `proto/h1/decode.rs`). Whatever hyper would refuse stops the inspection: hyper then closes
//! the connection itself. The cost on the normal path is one more parse of each head (without
//! a copy when it arrives in one read) and a subtraction per read of a sized body.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::response::{IntoResponse, Response};
use futures_util::future::{Either, Ready, ready as ready_future};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tower::Service;

use crate::error::{Ambiguity, ProxyError};

/// The longest answer taken for hyper's bare refusal (status line, `connection`,
/// `content-length: 0`, `date`: about 120 bytes).
const MAX_BARE_ANSWER: usize = 256;

/// The largest request head: hyper's default read buffer limit, set explicitly in
/// [`crate::serve`] so that a head too long to inspect is always one hyper refuses (431).
pub const MAX_HEAD_BYTES: usize = 8192 + 4096 * 100;

/// Most header lines in a head: hyper's default; a head with more is refused by hyper (431).
const MAX_HEADERS: usize = 100;

/// What the inspection of one connection found, shared by [`Inspected`] and [`Guarded`] (and
/// read by the connection's timers).
#[derive(Debug)]
pub struct Heads {
    /// When the connection was accepted.
    accepted: Instant,
    /// Requests handed to the app so far.
    served: AtomicU64,
    /// The first refused head: its number on the connection (from 1) and why. Nothing after
    /// it matters: its answer closes the connection.
    refused: OnceLock<(u64, Ambiguity)>,
    /// When the HTTP/1 head being received began, in milliseconds after `accepted`, plus one;
    /// 0 while no head is partly received.
    head_started: AtomicU64,
}

impl Heads {
    /// The heads of a connection accepted at `accepted`.
    #[must_use]
    pub fn new(accepted: Instant) -> Self {
        Self {
            accepted,
            served: AtomicU64::new(0),
            refused: OnceLock::new(),
            head_started: AtomicU64::new(0),
        }
    }

    /// When the connection was accepted.
    #[must_use]
    pub fn accepted(&self) -> Instant {
        self.accepted
    }

    /// How long after accept the HTTP/1 head being received began; `None` while no head is
    /// partly received (and always over HTTP/2).
    #[must_use]
    pub fn head_started(&self) -> Option<Duration> {
        match self.head_started.load(Ordering::Acquire) {
            0 => None,
            ms => Some(Duration::from_millis(ms - 1)),
        }
    }

    fn note_head_pending(&self, pending: bool) {
        let ms = if pending {
            u64::try_from(self.accepted.elapsed().as_millis())
                .unwrap_or(u64::MAX - 1)
                .saturating_add(1)
        } else {
            0
        };
        self.head_started.store(ms, Ordering::Release);
    }
}

impl Default for Heads {
    fn default() -> Self {
        Self::new(Instant::now())
    }
}

/// A client connection whose request heads are read on their way to hyper.
#[derive(Debug)]
pub struct Inspected<IO> {
    io: IO,
    tracker: Tracker,
    heads: Arc<Heads>,
    peer: SocketAddr,
    rewrite: Rewrite,
    /// Whether `heads` says a head is partly received.
    head_pending: bool,
}

/// Where the rewriting of hyper's bare refusal is.
#[derive(Debug, Default)]
enum Rewrite {
    /// Watching hyper's writes (once the tracker has stopped) for its bare refusal.
    #[default]
    Watching,
    /// Writing `answer` (`at` bytes of it are out) in place of hyper's `claimed` bytes.
    Writing {
        answer: Vec<u8>,
        at: usize,
        claimed: usize,
    },
    /// Written: hyper closes the connection after it.
    Done,
}

impl<IO> Inspected<IO> {
    /// Wraps `io`, a connection from `peer`; `heads` is given to the [`Guarded`] app serving
    /// the same connection.
    pub fn new(io: IO, heads: Arc<Heads>, peer: SocketAddr) -> Self {
        Self {
            io,
            tracker: Tracker::default(),
            heads,
            peer,
            rewrite: Rewrite::Watching,
            head_pending: false,
        }
    }
}

impl<IO: AsyncWrite + Unpin> Inspected<IO> {
    /// Writes the OpenAI-shaped answer in place of hyper's bare refusal, when `bufs` is that
    /// refusal (or it is being written); `None` when `bufs` is to be written as it is.
    fn poll_rewrite(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Option<Poll<io::Result<usize>>> {
        if let Rewrite::Watching = self.rewrite {
            let total: usize = bufs.iter().map(|b| b.len()).sum();
            let first = bufs.iter().find(|b| !b.is_empty());
            if total > MAX_BARE_ANSWER || !first.is_some_and(|b| b.starts_with(b"HTTP/1.1 4")) {
                return None;
            }
            let written = bufs.iter().fold(Vec::with_capacity(total), |mut all, b| {
                all.extend_from_slice(b);
                all
            });
            let error = match (bare_refusal(&written)?, self.heads.refused.get()) {
                // Differing lengths: hyper refused the head the tracker found ambiguous.
                (ProxyError::MalformedRequest, Some(&(_, ambiguity))) => {
                    ProxyError::AmbiguousLength(ambiguity)
                }
                (error, _) => error,
            };
            // Below the level of calls, as the ambiguous-length refusal: no ledger record,
            // this one log line.
            tracing::warn!(peer = %self.peer, code = error.code(), "refused a request head hyper could not parse");
            self.rewrite = Rewrite::Writing {
                answer: refusal_answer(&error),
                at: 0,
                claimed: total,
            };
        }
        let Rewrite::Writing {
            answer,
            at,
            claimed,
        } = &mut self.rewrite
        else {
            return None;
        };
        while *at < answer.len() {
            match Pin::new(&mut self.io).poll_write(cx, &answer[*at..]) {
                Poll::Ready(Ok(0)) => {
                    return Some(Poll::Ready(Err(io::ErrorKind::WriteZero.into())));
                }
                Poll::Ready(Ok(n)) => *at += n,
                Poll::Ready(Err(err)) => return Some(Poll::Ready(Err(err))),
                // hyper writes the same bytes again when woken; they are taken as written
                // once the answer is out.
                Poll::Pending => return Some(Poll::Pending),
            }
        }
        let claimed = *claimed;
        self.rewrite = Rewrite::Done;
        Some(Poll::Ready(Ok(claimed)))
    }
}

/// The error hyper's write `written` announces, when it is hyper's automatic answer to a head
/// its parser refused (`Server::on_error` in hyper's `proto/h1/role.rs`): a status line of 400,
/// 414 or 431 and no header but `connection`, `content-length: 0` and `date`. No answer of
/// mantlegate's looks like that: its errors have a JSON body, and relayed answers keep the
/// upstream's headers.
fn bare_refusal(written: &[u8]) -> Option<ProxyError> {
    let mut headers = [httparse::EMPTY_HEADER; 4];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(written) {
        Ok(httparse::Status::Complete(len)) if len == written.len() => {}
        _ => return None,
    }
    let bare = response.headers.iter().all(|h| {
        if h.name.eq_ignore_ascii_case("content-length") {
            h.value == b"0"
        } else {
            h.name.eq_ignore_ascii_case("connection") || h.name.eq_ignore_ascii_case("date")
        }
    });
    if !bare || response.version != Some(1) {
        return None;
    }
    match response.code? {
        400 => Some(ProxyError::MalformedRequest),
        414 => Some(ProxyError::UriTooLong),
        431 => Some(ProxyError::HeadTooLarge),
        _ => None,
    }
}

/// The whole answer to a refused head: the error's status and JSON body, and the connection
/// closed after it.
fn refusal_answer(error: &ProxyError) -> Vec<u8> {
    let body = error.body();
    let status = error.status();
    let mut answer = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-should-retry: false\r\nconnection: close\r\n\r\n",
        status.as_str(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes();
    answer.extend_from_slice(&body);
    answer
}

impl<IO: AsyncRead + Unpin> AsyncRead for Inspected<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        if let Some(refused) = this.tracker.feed(&buf.filled()[before..]) {
            // Set once: the tracker stops at the first refused head.
            let _ = this.heads.refused.set(refused);
        }
        // Only where a head starts or ends: most reads change nothing here.
        let pending = this.tracker.head_pending();
        if pending != this.head_pending {
            this.head_pending = pending;
            this.heads.note_head_pending(pending);
        }
        Poll::Ready(Ok(()))
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Inspected<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.tracker.state == State::Off
            && let Some(poll) = this.poll_rewrite(cx, &[io::IoSlice::new(buf)])
        {
            return poll;
        }
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.tracker.state == State::Off
            && let Some(poll) = this.poll_rewrite(cx, bufs)
        {
            return poll;
        }
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        // hyper writes head and body with one writev when it may.
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// The app as one connection serves it: the request whose head [`Inspected`] refused is
/// answered 400 `ambiguous_length` (with `connection: close`, so hyper ends the connection
/// after it) and never reaches the app; every other request goes to the app.
#[derive(Clone)]
pub struct Guarded<A = Router> {
    app: A,
    heads: Arc<Heads>,
    peer: SocketAddr,
}

impl<A> Guarded<A> {
    /// Serves `app` on the connection from `peer` whose heads are `heads`.
    pub fn new(app: A, heads: Arc<Heads>, peer: SocketAddr) -> Self {
        Self { app, heads, peer }
    }
}

impl<A, B> Service<Request<B>> for Guarded<A>
where
    A: Service<Request<B>, Response = Response, Error = Infallible>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Either<Ready<Result<Response, Infallible>>, A::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.app.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // HTTP/1 hands requests over one at a time, in the order of their heads. (Over HTTP/2
        // nothing is ever refused here: its framing has no such ambiguity.)
        let number = self.heads.served.fetch_add(1, Ordering::Relaxed) + 1;
        match self.heads.refused.get() {
            Some(&(head, ambiguity)) if head == number => {
                // Below the level of calls (like hyper's own framing refusals): no ledger
                // record, this one log line.
                tracing::warn!(peer = %self.peer, %ambiguity, "refused a request with an ambiguous length");
                Either::Left(ready_future(Ok(
                    ProxyError::AmbiguousLength(ambiguity).into_response()
                )))
            }
            _ => Either::Right(self.app.call(req)),
        }
    }
}

/// Follows the requests of one HTTP/1 connection through its bytes, as hyper frames them.
#[derive(Debug, Default)]
struct Tracker {
    state: State,
    /// The start of a head split across reads (empty otherwise).
    partial: Vec<u8>,
    /// Heads seen so far.
    heads: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum State {
    /// Expecting a request head.
    #[default]
    Head,
    /// In a body with this many bytes left.
    Sized(u64),
    /// In a chunked body.
    Chunked(Chunk),
    /// Not followed any further: the bytes are not HTTP/1 (the HTTP/2 preface), hyper refuses
    /// what came (and closes the connection), or a head was refused (and its answer closes it).
    Off,
}

/// Where a chunked body is, in the grammar of hyper's `ChunkedState` (`proto/h1/decode.rs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// The first hex digit of a size line.
    Start,
    Size(u64),
    /// Spaces or tabs after the size.
    SizeLws(u64),
    /// A `;` extension, up to the CR.
    Extension(u64),
    SizeLf(u64),
    /// Chunk data, this many bytes left.
    Data(u64),
    DataCr,
    DataLf,
    /// The start of a trailer line, or the CR of the final blank line.
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
}

/// What a complete head says about its request.
enum Verdict {
    Refuse(Ambiguity),
    /// Accepted (by us; hyper may still refuse it, with [`State::Off`] after it): what follows.
    Next(State),
}

impl Tracker {
    /// Whether a head has begun and is not complete yet.
    fn head_pending(&self) -> bool {
        self.state == State::Head && !self.partial.is_empty()
    }

    /// Follows `bytes`, the next bytes read from the client. Returns the number and reason of
    /// a head refused among them (after which the tracker is off).
    fn feed(&mut self, mut bytes: &[u8]) -> Option<(u64, Ambiguity)> {
        while !bytes.is_empty() {
            match self.state {
                State::Off => return None,
                State::Head => {
                    let (used, verdict) = self.head(bytes);
                    bytes = &bytes[used..];
                    match verdict {
                        Some(Verdict::Refuse(ambiguity)) => {
                            self.state = State::Off;
                            return Some((self.heads, ambiguity));
                        }
                        Some(Verdict::Next(next)) => self.state = next,
                        None => {}
                    }
                }
                State::Sized(left) => {
                    let (rest, left) = skip(bytes, left);
                    bytes = rest;
                    self.state = if left == 0 {
                        State::Head
                    } else {
                        State::Sized(left)
                    };
                }
                State::Chunked(Chunk::Data(left)) => {
                    let (rest, left) = skip(bytes, left);
                    bytes = rest;
                    self.state = State::Chunked(if left == 0 {
                        Chunk::DataCr
                    } else {
                        Chunk::Data(left)
                    });
                }
                State::Chunked(chunk) => {
                    self.state = chunk.step(bytes[0]);
                    bytes = &bytes[1..];
                }
            }
        }
        None
    }

    /// Reads the head at the start of `bytes` (continuing a split one): how many bytes of
    /// `bytes` it used and, once the head is complete, its verdict.
    fn head(&mut self, bytes: &[u8]) -> (usize, Option<Verdict>) {
        let (parsed, before) = if self.partial.is_empty() {
            (parse_head(bytes), 0)
        } else {
            let before = self.partial.len();
            self.partial.extend_from_slice(bytes);
            // A head can only end with a line feed: no need to parse it again before one.
            if memchr::memchr(b'\n', bytes).is_none() {
                (Parsed::Partial, before)
            } else {
                (parse_head(&self.partial), before)
            }
        };
        match parsed {
            Parsed::Complete(len, verdict) => {
                self.heads += 1;
                self.partial = Vec::new();
                (len.saturating_sub(before), Some(verdict))
            }
            Parsed::Partial => {
                if before == 0 {
                    self.partial.extend_from_slice(bytes);
                }
                if self.partial.len() >= MAX_HEAD_BYTES {
                    // hyper refuses a head this long (431).
                    self.partial = Vec::new();
                    self.state = State::Off;
                }
                (bytes.len(), None)
            }
            Parsed::Invalid => {
                // hyper refuses it (400), or it is the HTTP/2 preface.
                self.partial = Vec::new();
                self.state = State::Off;
                (bytes.len(), None)
            }
        }
    }
}

/// Skips up to `left` bytes of `bytes`: what remains of both.
fn skip(bytes: &[u8], left: u64) -> (&[u8], u64) {
    let n = usize::try_from(left).map_or(bytes.len(), |left| left.min(bytes.len()));
    (&bytes[n..], left - n as u64)
}

impl Chunk {
    /// The state after `byte` (never called in [`Chunk::Data`], whose bytes are skipped).
    fn step(self, byte: u8) -> State {
        let hex = char::from(byte).to_digit(16).map(u64::from);
        let next = match (self, byte) {
            (Self::Start, _) => match hex {
                Some(digit) => Self::Size(digit),
                None => return State::Off,
            },
            (Self::Size(size), _) if hex.is_some() => {
                match size
                    .checked_mul(16)
                    .zip(hex)
                    .and_then(|(s, d)| s.checked_add(d))
                {
                    Some(size) => Self::Size(size),
                    None => return State::Off,
                }
            }
            (Self::Size(size) | Self::SizeLws(size), b'\t' | b' ') => Self::SizeLws(size),
            (Self::Size(size) | Self::SizeLws(size) | Self::Extension(size), b'\r') => {
                Self::SizeLf(size)
            }
            (Self::Extension(_), b'\n') => return State::Off,
            (Self::Size(size) | Self::SizeLws(size), b';') | (Self::Extension(size), _) => {
                Self::Extension(size)
            }
            (Self::SizeLf(0) | Self::TrailerLf, b'\n') => Self::EndCr,
            (Self::SizeLf(size), b'\n') => Self::Data(size),
            (Self::DataCr, b'\r') => Self::DataLf,
            (Self::DataLf, b'\n') => Self::Start,
            (Self::EndCr, b'\r') => Self::EndLf,
            (Self::Trailer, b'\r') => Self::TrailerLf,
            (Self::EndCr | Self::Trailer, _) => Self::Trailer,
            // The body is complete: the next request's head follows.
            (Self::EndLf, b'\n') => return State::Head,
            _ => return State::Off,
        };
        State::Chunked(next)
    }
}

/// A head parsed from the start of a buffer.
enum Parsed {
    Complete(usize, Verdict),
    Partial,
    /// Not a request head hyper accepts.
    Invalid,
}

fn parse_head(buf: &[u8]) -> Parsed {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(buf) {
        Ok(httparse::Status::Complete(len)) => Parsed::Complete(len, verdict(&request)),
        Ok(httparse::Status::Partial) => Parsed::Partial,
        Err(_) => Parsed::Invalid,
    }
}

/// The longest request target hyper takes (`MAX_URI_LEN` in its `proto/h1/role.rs`); it
/// answers a longer one 414.
const MAX_URI_LEN: usize = (u16::MAX - 1) as usize;

/// The framing of a parsed request, by hyper's rules (`Server::parse`), or its refusal.
fn verdict(request: &httparse::Request<'_, '_>) -> Verdict {
    if request.path.is_some_and(|path| path.len() > MAX_URI_LEN) {
        // hyper refuses it (414).
        return Verdict::Next(State::Off);
    }
    let mut lengths = 0_usize;
    let mut length = None;
    // Whether the last Transfer-Encoding line ends in `chunked` (hyper looks at that one).
    let mut chunked = None;
    for header in request.headers.iter() {
        if header.name.eq_ignore_ascii_case("content-length") {
            lengths += 1;
            if lengths == 1 {
                length = digits(header.value);
            }
        } else if header.name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = Some(ends_in_chunked(header.value));
        }
    }
    match chunked {
        // hyper refuses Transfer-Encoding in HTTP/1.0, and one that does not end in chunked.
        Some(_) if request.version != Some(1) => Verdict::Next(State::Off),
        Some(false) => Verdict::Next(State::Off),
        Some(true) if lengths > 0 => Verdict::Refuse(Ambiguity::LengthAndChunked),
        Some(true) => Verdict::Next(State::Chunked(Chunk::Start)),
        // (Differing ones hyper refuses itself; both end the connection.)
        None if lengths > 1 => Verdict::Refuse(Ambiguity::TwoLengths),
        None => match (lengths, length) {
            (0, _) | (_, Some(0)) => Verdict::Next(State::Head),
            (_, Some(length)) => Verdict::Next(State::Sized(length)),
            // hyper refuses a length that is not all digits.
            (_, None) => Verdict::Next(State::Off),
        },
    }
}

/// A `Content-Length` value as hyper reads it: ASCII digits only, no sign, no overflow.
fn digits(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0_u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// Whether a `Transfer-Encoding` value's last coding is `chunked`, as hyper decides it
/// (`is_chunked_`: the value must be visible ASCII or tabs, as `HeaderValue::to_str` wants).
fn ends_in_chunked(value: &[u8]) -> bool {
    if !value
        .iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
    {
        return false;
    }
    std::str::from_utf8(value).is_ok_and(|s| {
        s.rsplit(',')
            .next()
            .is_some_and(|coding| coding.trim().eq_ignore_ascii_case("chunked"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a tracker finds in `stream` fed in `pieces` split at the given points.
    fn refused_when_split(stream: &[u8], at: &[usize]) -> Option<(u64, Ambiguity)> {
        let mut tracker = Tracker::default();
        let mut found = None;
        let mut from = 0;
        for &to in at.iter().chain([&stream.len()]) {
            if let Some(refused) = tracker.feed(&stream[from..to]) {
                assert!(found.is_none(), "refused twice");
                found = Some(refused);
            }
            from = to;
        }
        found
    }

    /// What a tracker finds in `stream`, the same for every way of reading it: whole, in two
    /// pieces split at every byte, and byte by byte.
    fn refused(stream: &[u8]) -> Option<(u64, Ambiguity)> {
        let whole = refused_when_split(stream, &[]);
        for at in 1..stream.len() {
            assert_eq!(refused_when_split(stream, &[at]), whole, "split at {at}");
        }
        let every: Vec<usize> = (1..stream.len()).collect();
        assert_eq!(refused_when_split(stream, &every), whole, "byte by byte");
        whole
    }

    /// Four well-formed requests whose bodies look like refused heads.
    fn well_formed() -> Vec<u8> {
        let smuggled =
            "POST /x HTTP/1.1\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n";
        let mut s = Vec::new();
        s.extend_from_slice(b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n");
        // hyper skips empty lines before a head.
        s.extend_from_slice(b"\r\n");
        s.extend_from_slice(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{smuggled}",
                smuggled.len()
            )
            .as_bytes(),
        );
        s.extend_from_slice(
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n{:x} ;ext=\"v\"\r\n{smuggled}\r\n0\r\nx-trailer: 1\r\n\r\n",
                smuggled.len()
            )
            .as_bytes(),
        );
        s.extend_from_slice(b"GET /readyz HTTP/1.1\r\ncontent-length: 0\r\n\r\n");
        s
    }

    #[test]
    fn well_formed_requests_are_followed_and_never_refused() {
        let mut stream = well_formed();
        assert_eq!(refused(&stream), None);
        let mut tracker = Tracker::default();
        assert_eq!(tracker.feed(&stream), None);
        assert_eq!((tracker.heads, tracker.state), (4, State::Head));
        // The fifth head is found where it starts, wherever the reads split it.
        stream.extend_from_slice(
            b"POST /v1/responses HTTP/1.1\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n0\r\n\r\n",
        );
        assert_eq!(refused(&stream), Some((5, Ambiguity::LengthAndChunked)));
    }

    #[test]
    fn length_with_chunked_is_refused_in_either_order() {
        for head in [
            "POST / HTTP/1.1\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\ncontent-length: 5\r\ntransfer-encoding: identity\r\ntransfer-encoding: chunked\r\n\r\n",
        ] {
            assert_eq!(
                refused(head.as_bytes()),
                Some((1, Ambiguity::LengthAndChunked)),
                "{head}"
            );
        }
    }

    #[test]
    fn two_lengths_are_refused_equal_or_not() {
        for head in [
            "POST / HTTP/1.1\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\n",
            "POST / HTTP/1.0\r\ncontent-length: 5\r\nContent-Length: 6\r\n\r\n",
        ] {
            assert_eq!(
                refused(head.as_bytes()),
                Some((1, Ambiguity::TwoLengths)),
                "{head}"
            );
        }
    }

    #[test]
    fn what_hyper_refuses_itself_stops_the_tracker() {
        for stream in [
            // The HTTP/2 preface.
            &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
            b"POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\ncontent-length: 5\r\n\r\n",
            b"POST / HTTP/1.0\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length: -5\r\n\r\n",
            b"POST / HTTP/1.1\r\ncontent-length : 5\r\n\r\n",
            // A chunk size that is not hex, and data without its CRLF.
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\nz\r\n",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n1\r\nab",
        ] {
            let mut tracker = Tracker::default();
            assert_eq!(tracker.feed(stream), None);
            assert_eq!(
                tracker.state,
                State::Off,
                "{}",
                String::from_utf8_lossy(stream)
            );
            let after = b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\n";
            assert_eq!(tracker.feed(after), None);
        }
    }

    #[test]
    fn a_head_longer_than_hyper_reads_stops_the_tracker() {
        let mut tracker = Tracker::default();
        assert_eq!(tracker.feed(b"GET / HTTP/1.1\r\nx-big: "), None);
        let filler = vec![b'a'; MAX_HEAD_BYTES];
        assert_eq!(tracker.feed(&filler), None);
        assert_eq!(tracker.state, State::Off);
        assert!(tracker.partial.is_empty());
    }

    #[test]
    fn sizes_and_codings_are_read_as_hyper_reads_them() {
        assert_eq!(digits(b"0"), Some(0));
        assert_eq!(digits(b"18446744073709551615"), Some(u64::MAX));
        for bad in [&b""[..], b"+5", b"5 ", b"5,5", b"18446744073709551616"] {
            assert_eq!(digits(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        assert!(ends_in_chunked(b"chunked"));
        assert!(ends_in_chunked(b"gzip,\tCHUNKED "));
        assert!(!ends_in_chunked(b"chunked, gzip"));
        assert!(!ends_in_chunked(b"chunked\x80"));
    }

    const DATE: &str = "date: Sat, 28 Nov 2026 08:57:57 GMT\r\n";

    #[test]
    fn hyper_s_bare_refusals_are_recognised_and_nothing_else() {
        let bare = |status: &str| {
            format!("HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: 0\r\n{DATE}\r\n")
        };
        let code = |written: &str| bare_refusal(written.as_bytes()).map(|e| e.code());
        // hyper's three automatic answers, as it writes them.
        assert_eq!(code(&bare("400 Bad Request")), Some("malformed_request"));
        assert_eq!(code(&bare("414 URI Too Long")), Some("uri_too_long"));
        assert_eq!(
            code(&bare("431 Request Header Fields Too Large")),
            Some("header_too_large")
        );
        // Anything else is written as it is.
        for (what, written) in [
            ("another status", bare("404 Not Found")),
            ("a body", format!("{}{{}}", bare("400 Bad Request"))),
            (
                "another header",
                format!(
                    "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: 0\r\n{DATE}\r\n"
                ),
            ),
            (
                "a length",
                format!("HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n{DATE}\r\n"),
            ),
            (
                "HTTP/1.0",
                format!("HTTP/1.0 400 Bad Request\r\n{DATE}\r\n"),
            ),
            ("half a head", "HTTP/1.1 400 Bad Request\r\n".to_owned()),
        ] {
            assert_eq!(code(&written), None, "{what}");
        }
    }

    /// Takes at most three bytes per write and is not ready every other time.
    #[derive(Default)]
    struct Trickle {
        out: Vec<u8>,
        ready: bool,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.ready = !self.ready;
            if !self.ready {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(3);
            self.out.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn the_refusal_is_written_whole_through_short_writes_in_place_of_hyper_s() {
        use tokio::io::AsyncWriteExt as _;
        let peer = SocketAddr::from(([127, 0, 0, 1], 9));
        let mut conn = Inspected::new(Trickle::default(), Arc::default(), peer);
        // Before the tracker stops, even hyper's bare answer is written as it is.
        let bare = format!(
            "HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n{DATE}\r\n"
        );
        conn.write_all(bare.as_bytes()).await.expect("write");
        assert_eq!(conn.io.out, bare.as_bytes());
        // A head hyper refuses stops the tracker: its answer is rewritten.
        conn.io.out.clear();
        assert_eq!(conn.tracker.feed(b"GET /\0 HTTP/1.1\r\n\r\n"), None);
        assert_eq!(conn.tracker.state, State::Off);
        let claimed =
            std::future::poll_fn(|cx| Pin::new(&mut conn).poll_write(cx, bare.as_bytes()))
                .await
                .expect("write");
        assert_eq!(claimed, bare.len(), "hyper's bytes are taken as written");
        let out = String::from_utf8(std::mem::take(&mut conn.io.out)).expect("text");
        let (head, body) = out.split_once("\r\n\r\n").expect("a head");
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains("\r\nconnection: close"), "{head}");
        assert!(
            head.contains(&format!("\r\ncontent-length: {}", body.len())),
            "{head}"
        );
        let v: serde_json::Value = serde_json::from_str(body).expect("JSON");
        assert_eq!(v["error"]["code"], "malformed_request");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        // Once written, what follows passes as it is.
        conn.write_all(b"x").await.expect("write");
        assert_eq!(conn.io.out, b"x");
    }
}
