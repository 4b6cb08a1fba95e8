//! HTTP/1.1 on the wire to bedrock-mantle: the request head written, the response head read
//! and the response body's framing decoded. Pure functions over buffers, no I/O.
//!
//! Why not hyper's client: it runs each upstream connection as a task of its own and hands
//! the body to the call's task through a channel, so every stream event crosses tasks twice
//! and the connection's task is woken for each. Decoding here, in the call's own task,
//! straight out of the read buffer, the body's frames are slices of what was read (no copy)
//! and a stream event costs one read and no wake-up. The parsing itself is httparse's, as in
//! hyper.

use std::io::Write as _;

use axum::http::header::{self, HeaderMap, HeaderName, HeaderValue};
use axum::http::{Method, StatusCode, Uri, Version};
use bytes::{Buf, Bytes, BytesMut};

/// Most response headers read (hyper's default too).
const MAX_HEADERS: usize = 100;

/// Longest response head accepted, interim (1xx) heads included.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// Longest chunk-size line, and most trailer bytes, accepted in a chunked body.
const MAX_CHUNK_LINE: usize = 4 * 1024;
const MAX_TRAILER_BYTES: usize = 16 * 1024;

/// What is wrong with what the upstream sent. Says nothing of the request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub &'static str);

/// Writes the request head: request line, `host` (unless the headers carry one), the
/// headers, and `content-length` when there is a body to announce.
pub fn encode_request(
    out: &mut Vec<u8>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body_len: Option<usize>,
) {
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(
        uri.path_and_query()
            .map_or("/", axum::http::uri::PathAndQuery::as_str)
            .as_bytes(),
    );
    out.extend_from_slice(b" HTTP/1.1\r\n");
    if !headers.contains_key(header::HOST)
        && let Some(authority) = uri.authority()
    {
        out.extend_from_slice(b"host: ");
        out.extend_from_slice(authority.as_str().as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in headers {
        // The framing is this client's to say: the body is sent whole, with its length.
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(len) = body_len {
        // Writing to a Vec cannot fail.
        let _ = write!(out, "content-length: {len}\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Whether a request with this method and an empty body still announces `content-length: 0`
/// (a POST without one is refused by some servers with 411).
#[must_use]
pub fn announces_empty_body(method: &Method) -> bool {
    matches!(*method, Method::POST | Method::PUT | Method::PATCH)
}

/// How the response body is delimited (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (HEAD, 204, 304) or `content-length: 0`.
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub parts: axum::http::response::Parts,
    pub framing: Framing,
    /// The connection may carry another request once this body is read.
    pub keep_alive: bool,
}

/// Parses the response head at the start of `buf`, consuming it (and any interim 1xx heads
/// before it). `Ok(None)`: incomplete, read more.
///
/// # Errors
/// When the head is malformed, has too many headers, or frames its body ambiguously.
pub fn parse_head(buf: &mut BytesMut, method: &Method) -> Result<Option<Head>, WireError> {
    // httparse fills the slots it uses: leaving them uninitialised saves zeroing 3 KiB per
    // answer (hyper's server does the same).
    let parser = httparse::ParserConfig::default();
    loop {
        let mut headers = [const { std::mem::MaybeUninit::uninit() }; MAX_HEADERS];
        let mut res = httparse::Response::new(&mut []);
        let len = match parser.parse_response_with_uninit_headers(&mut res, buf, &mut headers) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(WireError("the upstream answered with too many headers"));
            }
            Err(_) => return Err(WireError("the upstream's answer is not valid HTTP/1.1")),
        };
        let code = res.code.unwrap_or_default();
        let status = StatusCode::from_u16(code)
            .map_err(|_| WireError("the upstream answered with an invalid status"))?;
        if status.is_informational() {
            if status == StatusCode::SWITCHING_PROTOCOLS {
                return Err(WireError("the upstream switched protocols unasked"));
            }
            // An interim answer (100 Continue, 103 Early Hints): the real one follows.
            buf.advance(len);
            continue;
        }
        let version = if res.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        // Header values become slices of the head (a reference count each, not a copy).
        let base = buf.as_ptr() as usize;
        let count = res.headers.len();
        // Offsets as 32 bits (see `offset`): half the bytes to clear.
        let mut spans = [(0u32, 0u32, 0u32, 0u32); MAX_HEADERS];
        for (span, h) in spans.iter_mut().zip(res.headers.iter()) {
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            *span = (
                offset(name),
                offset(name + h.name.len()),
                offset(value),
                offset(value + h.value.len()),
            );
        }
        let head = buf.split_to(len).freeze();
        let mut map = HeaderMap::with_capacity(count);
        for &(ns, ne, vs, ve) in &spans[..count] {
            let (ns, ne, vs, ve) = (ns as usize, ne as usize, vs as usize, ve as usize);
            let too_large = || WireError("the upstream's answer head is too large");
            let name = HeaderName::from_bytes(head.get(ns..ne).ok_or_else(too_large)?)
                .map_err(|_| WireError("the upstream sent an invalid header name"))?;
            if ve > head.len() {
                return Err(too_large());
            }
            let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
                .map_err(|_| WireError("the upstream sent an invalid header value"))?;
            map.append(name, value);
        }
        let (framing, reusable) = framing(&map, status, method)?;
        if map.contains_key(header::TRANSFER_ENCODING) {
            // The transfer coding frames the body, and the length beside it means nothing
            // (RFC 9112 §6.3): passed on, it would frame the relayed body wrongly.
            map.remove(header::CONTENT_LENGTH);
        }
        let keep_alive =
            reusable && version == Version::HTTP_11 && !connection_lists(&map, "close");
        let (mut parts, ()) = axum::http::Response::new(()).into_parts();
        parts.status = status;
        parts.version = version;
        parts.headers = map;
        return Ok(Some(Head {
            parts,
            framing,
            keep_alive,
        }));
    }
}

/// An offset into a response head. The client stops reading a head once it holds
/// [`MAX_HEAD_BYTES`], so a head is at most that plus one read and always fits; saturating
/// (then refusing the head) rather than wrapping keeps a bug from going unnoticed.
fn offset(at: usize) -> u32 {
    u32::try_from(at).unwrap_or(u32::MAX)
}

/// The body's framing, and whether the connection may be reused after it.
fn framing(
    headers: &HeaderMap,
    status: StatusCode,
    method: &Method,
) -> Result<(Framing, bool), WireError> {
    if *method == Method::HEAD
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        return Ok((Framing::Empty, true));
    }
    if headers.contains_key(header::TRANSFER_ENCODING) {
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|t| !t.is_empty());
        let chunked = last.is_some_and(|t| t.eq_ignore_ascii_case("chunked"));
        // With a content-length beside it, the message was framed by whoever added the
        // transfer-encoding: read it by that, then close (RFC 9112 §6.3, point 3).
        let reusable = chunked && !headers.contains_key(header::CONTENT_LENGTH);
        return Ok((
            if chunked {
                Framing::Chunked
            } else {
                Framing::Close
            },
            reusable,
        ));
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for part in value.as_bytes().split(|&b| b == b',') {
            let n = parse_decimal(part.trim_ascii())
                .ok_or(WireError("the upstream sent an invalid content-length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(WireError("the upstream sent conflicting content-lengths"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) => (Framing::Empty, true),
        Some(n) => (Framing::Length(n), true),
        None => (Framing::Close, false),
    })
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// Whether a `connection` header lists `token` (`close`, or a header name that is hop-by-hop
/// on this message).
#[must_use]
pub fn connection_lists(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// One step of decoding a body.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    /// Body bytes, split off the read buffer.
    Data(Bytes),
    /// The buffer holds no more of the body: read more.
    NeedMore,
    /// The body is complete.
    Done,
}

/// Decodes a response body out of the connection's read buffer, incrementally: bytes split
/// between reads anywhere are handled, and data is never copied.
#[derive(Debug)]
pub struct Decoder {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Length(u64),
    Close,
    ChunkSize,
    ChunkData(u64),
    ChunkEnd,
    Trailers(usize),
    Done,
}

impl Decoder {
    #[must_use]
    pub fn new(framing: Framing) -> Self {
        let state = match framing {
            Framing::Empty => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Close => State::Close,
        };
        Self { state }
    }

    /// The whole body has been decoded.
    #[must_use]
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Body bytes still to come, when the framing says: the rest of a content-length, or 0
    /// once the body is complete.
    #[must_use]
    pub fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// The next piece of the body in `buf`.
    ///
    /// # Errors
    /// When the chunked framing is malformed.
    pub fn step(&mut self, buf: &mut BytesMut) -> Result<Step, WireError> {
        loop {
            match self.state {
                State::Done => return Ok(Step::Done),
                State::Length(n) | State::ChunkData(n) if n > 0 => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let take = usize::try_from(n).map_or(buf.len(), |n| n.min(buf.len()));
                    let left = n - take as u64;
                    self.state = match self.state {
                        State::Length(_) if left == 0 => State::Done,
                        State::Length(_) => State::Length(left),
                        _ if left == 0 => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                    return Ok(Step::Data(buf.split_to(take).freeze()));
                }
                State::Close => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    return Ok(Step::Data(buf.split().freeze()));
                }
                _ => {
                    if !self.settle(buf)? {
                        return Ok(Step::NeedMore);
                    }
                }
            }
        }
    }

    /// Goes through framing (chunk sizes and ends, trailers) that `buf` holds, up to the
    /// next data or the end, so that a body whose last chunk has been read reports its end
    /// with that chunk. `Ok(false)`: the framing needs more bytes.
    ///
    /// # Errors
    /// When the chunked framing is malformed.
    pub fn settle(&mut self, buf: &mut BytesMut) -> Result<bool, WireError> {
        loop {
            match self.state {
                State::Length(0) => self.state = State::Done,
                State::ChunkData(0) => self.state = State::ChunkEnd,
                State::Done | State::Length(_) | State::ChunkData(_) | State::Close => {
                    return Ok(true);
                }
                State::ChunkEnd => match buf.first() {
                    None => return Ok(false),
                    Some(b'\n') => {
                        buf.advance(1);
                        self.state = State::ChunkSize;
                    }
                    Some(b'\r') => match buf.get(1) {
                        None => return Ok(false),
                        Some(b'\n') => {
                            buf.advance(2);
                            self.state = State::ChunkSize;
                        }
                        Some(_) => {
                            return Err(WireError("a chunk of the upstream's answer is malformed"));
                        }
                    },
                    Some(_) => {
                        return Err(WireError("a chunk of the upstream's answer is malformed"));
                    }
                },
                State::ChunkSize => {
                    let Some((len, taken)) = line_at(buf, MAX_CHUNK_LINE)? else {
                        return Ok(false);
                    };
                    let size = chunk_size(&buf[..len])?;
                    buf.advance(taken);
                    self.state = if size == 0 {
                        State::Trailers(0)
                    } else {
                        State::ChunkData(size)
                    };
                }
                State::Trailers(seen) => {
                    let Some((len, taken)) = line_at(buf, MAX_TRAILER_BYTES.saturating_sub(seen))?
                    else {
                        return Ok(false);
                    };
                    buf.advance(taken);
                    // Trailers are read past, not relayed: OpenAI's APIs send none.
                    self.state = if len == 0 {
                        State::Done
                    } else {
                        State::Trailers(seen + taken)
                    };
                }
            }
        }
    }

    /// The upstream closed the connection: fine for a body read until close, or one already
    /// complete; otherwise the answer was cut short.
    ///
    /// # Errors
    /// When the body was not complete.
    pub fn eof(&mut self) -> Result<(), WireError> {
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(WireError(
                "the upstream closed the connection before the answer was complete",
            )),
        }
    }
}

/// The line at the front of `buf`: its length without its `\r\n` (or `\n`), and the bytes it
/// takes with it; `None` when its end has not been read yet. Read in place: no split of the
/// buffer (a reference count each) for a few bytes of framing.
fn line_at(buf: &[u8], max: usize) -> Result<Option<(usize, usize)>, WireError> {
    const LONG: WireError = WireError("a chunk header of the upstream's answer is too long");
    let Some(end) = memchr::memchr(b'\n', buf) else {
        return if buf.len() > max { Err(LONG) } else { Ok(None) };
    };
    if end > max {
        return Err(LONG);
    }
    let len = if end > 0 && buf[end - 1] == b'\r' {
        end - 1
    } else {
        end
    };
    Ok(Some((len, end + 1)))
}

/// The size in a chunk-size line (hex digits, then optional extensions after `;`).
fn chunk_size(line: &[u8]) -> Result<u64, WireError> {
    const BAD: WireError = WireError("a chunk size in the upstream's answer is malformed");
    let digits = line
        .iter()
        .position(|b| !b.is_ascii_hexdigit())
        .unwrap_or(line.len());
    if digits == 0 || digits > 15 {
        return Err(BAD);
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest.starts_with(b";")) {
        return Err(BAD);
    }
    let mut n = 0u64;
    for &d in &line[..digits] {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => d - b'A' + 10,
        };
        n = n * 16 + u64::from(v);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<Option<Head>, WireError> {
        parse_head(&mut BytesMut::from(raw), &Method::POST)
    }

    #[test]
    fn the_request_head_carries_host_and_length_and_never_the_clients_framing() {
        let uri: Uri = "http://127.0.0.1:9/v1/chat/completions?x=1"
            .parse()
            .expect("uri");
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        headers.insert("content-length", HeaderValue::from_static("999"));
        let mut out = Vec::new();
        encode_request(&mut out, &Method::POST, &uri, &headers, Some(12));
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "POST /v1/chat/completions?x=1 HTTP/1.1\r\nhost: 127.0.0.1:9\r\n\
             content-type: application/json\r\ncontent-length: 12\r\n\r\n"
        );
        headers.insert("host", HeaderValue::from_static("signed.example"));
        let mut out = Vec::new();
        encode_request(&mut out, &Method::GET, &uri, &headers, None);
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.starts_with("GET /v1/chat/completions?x=1 HTTP/1.1\r\n"));
        assert!(text.contains("\r\nhost: signed.example\r\n") && !text.contains("127.0.0.1"));
        assert!(!text.contains("content-length") && text.ends_with("\r\n\r\n"));
    }

    #[test]
    fn a_head_is_parsed_whole_or_not_at_all() {
        let raw = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-request-id: r1\r\n\
                   transfer-encoding: chunked\r\n\r\n5\r\nhello";
        for cut in 0..raw.find("\r\n\r\n").expect("end") + 4 {
            assert!(
                head(&raw[..cut]).expect("valid prefix").is_none(),
                "cut at {cut}"
            );
        }
        let mut buf = BytesMut::from(raw);
        let h = parse_head(&mut buf, &Method::POST)
            .expect("ok")
            .expect("complete");
        assert_eq!(h.parts.status, StatusCode::OK);
        assert_eq!(h.parts.headers["x-request-id"], "r1");
        assert_eq!(h.framing, Framing::Chunked);
        assert!(h.keep_alive);
        assert_eq!(
            &buf[..],
            b"5\r\nhello",
            "the body's bytes stay in the buffer"
        );
    }

    #[test]
    fn interim_answers_are_skipped_and_a_switch_is_refused() {
        let h = head("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nlink: x\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\n{}")
            .expect("ok")
            .expect("complete");
        assert_eq!(h.parts.status, StatusCode::CREATED);
        assert!(!h.parts.headers.contains_key("link"));
        assert_eq!(h.framing, Framing::Length(2));
        assert!(head("HTTP/1.1 101 Switching\r\n\r\n").is_err());
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let f = |raw: &str| head(raw).expect("ok").expect("complete");
        let h = f("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Empty, true));
        let h = f("HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Empty, true));
        let h = f("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        let h = f("HTTP/1.1 200 OK\r\ncontent-length: 7, 7\r\nconnection: close\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(7), false));
        let h = f("HTTP/1.0 200 OK\r\ncontent-length: 7\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(7), false));
        let h =
            f("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\ncontent-length: 7\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        assert!(
            !h.parts.headers.contains_key("content-length"),
            "the length beside a transfer coding is dropped"
        );
        let h = f("HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        assert!(!h.parts.headers.contains_key("content-length"));
        let h = f("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n");
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: 7\r\ncontent-length: 8\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n").is_err());
        assert!(head("HTTP/1.1 abc OK\r\n\r\n").is_err());
        let head_answer = parse_head(
            &mut BytesMut::from("HTTP/1.1 200 OK\r\ncontent-length: 7\r\n\r\n"),
            &Method::HEAD,
        )
        .expect("ok")
        .expect("complete");
        assert_eq!(head_answer.framing, Framing::Empty);
    }

    #[test]
    fn too_many_headers_is_an_error_not_a_panic() {
        let mut raw = String::from("HTTP/1.1 200 OK\r\n");
        for i in 0..=MAX_HEADERS {
            raw.push_str("x-h");
            raw.push_str(&i.to_string());
            raw.push_str(": v\r\n");
        }
        raw.push_str("\r\n");
        assert!(head(&raw).is_err());
    }

    /// Feeds `wire` to a decoder in pieces of `piece` bytes; returns the body and whether
    /// it ended before the input ran out.
    fn decode_in_pieces(
        framing: Framing,
        wire: &[u8],
        piece: usize,
    ) -> Result<(Vec<u8>, bool), WireError> {
        let mut dec = Decoder::new(framing);
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        for part in wire.chunks(piece.max(1)) {
            buf.extend_from_slice(part);
            loop {
                match dec.step(&mut buf)? {
                    Step::Data(d) => body.extend_from_slice(&d),
                    Step::NeedMore => break,
                    Step::Done => return Ok((body, true)),
                }
            }
        }
        Ok((body, dec.is_done()))
    }

    #[test]
    fn chunked_bodies_decode_split_at_every_byte() {
        let wire = b"5\r\nhello\r\n1;ext=1\r\n \r\nA\r\n0123456789\r\n0\r\nx-trailer: t\r\n\r\n";
        for piece in 1..=wire.len() {
            let (body, done) = decode_in_pieces(Framing::Chunked, wire, piece).expect("valid");
            assert_eq!(body, b"hello 0123456789", "pieces of {piece}");
            assert!(done, "pieces of {piece}");
        }
        // Bare `\n` line ends are read as well.
        let (body, done) = decode_in_pieces(Framing::Chunked, b"3\nabc\n0\n\n", 1).expect("valid");
        assert_eq!((body.as_slice(), done), (&b"abc"[..], true));
    }

    #[test]
    fn the_end_of_a_chunked_body_is_known_with_its_last_chunk() {
        let mut dec = Decoder::new(Framing::Chunked);
        let mut buf = BytesMut::from(&b"2\r\nhi\r\n0\r\n\r\n"[..]);
        assert_eq!(
            dec.step(&mut buf).expect("ok"),
            Step::Data(Bytes::from_static(b"hi"))
        );
        assert!(!dec.is_done());
        assert!(dec.settle(&mut buf).expect("ok"));
        assert!(dec.is_done());
        assert!(buf.is_empty());
    }

    #[test]
    fn malformed_chunks_are_errors() {
        for wire in [
            &b"zz\r\n"[..],
            b"5\r\nhelloX\r\n",
            b"1234567890123456\r\n",
            b"5 x\r\n",
            b"\r\n",
        ] {
            assert!(
                decode_in_pieces(Framing::Chunked, wire, wire.len()).is_err(),
                "{wire:?}"
            );
        }
        let long = vec![b'1'; MAX_CHUNK_LINE + 2];
        assert!(decode_in_pieces(Framing::Chunked, &long, 100).is_err());
        let mut trailers = b"0\r\n".to_vec();
        for _ in 0..2000 {
            trailers.extend_from_slice(b"x-t: 0123456789\r\n");
        }
        assert!(decode_in_pieces(Framing::Chunked, &trailers, 512).is_err());
        // Trailers that take the limit and one byte past it with their last line end: an
        // error, never an arithmetic overflow, however the bytes are split.
        let mut trailers = b"0\r\nx-t: ".to_vec();
        trailers.resize(3 + MAX_TRAILER_BYTES - 5, b'a');
        trailers.extend_from_slice(b"\r\nabc\n\r\n");
        for piece in [1, 7, 64, trailers.len()] {
            assert!(
                decode_in_pieces(Framing::Chunked, &trailers, piece).is_err(),
                "{piece}"
            );
        }
    }

    #[test]
    fn length_and_close_bodies_decode_and_eof_says_whether_they_were_whole() {
        for piece in 1..=5 {
            let (body, done) = decode_in_pieces(Framing::Length(5), b"hello", piece).expect("ok");
            assert_eq!((body.as_slice(), done), (&b"hello"[..], true));
        }
        let mut dec = Decoder::new(Framing::Length(5));
        assert_eq!(dec.remaining(), Some(5));
        let mut buf = BytesMut::from(&b"hel"[..]);
        assert!(matches!(dec.step(&mut buf), Ok(Step::Data(_))));
        assert_eq!(dec.remaining(), Some(2), "what the size hint says is left");
        assert_eq!(Decoder::new(Framing::Chunked).remaining(), None);
        assert!(dec.eof().is_err(), "a body cut short is an error");
        let mut dec = Decoder::new(Framing::Close);
        let mut buf = BytesMut::from(&b"all of it"[..]);
        assert_eq!(
            dec.step(&mut buf).expect("ok"),
            Step::Data(Bytes::from_static(b"all of it"))
        );
        assert_eq!(dec.step(&mut buf).expect("ok"), Step::NeedMore);
        assert!(dec.eof().is_ok());
        assert!(dec.is_done());
        assert!(Decoder::new(Framing::Empty).is_done());
    }
}
