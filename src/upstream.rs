//! The HTTP client that carries calls to bedrock-mantle: HTTP/1.1 over rustls, with a pool of
//! kept-alive connections, each call's connection driven by the call's own task.
//!
//! reqwest (still used for webhooks and the Projects API) cost a proxy more than it gave: per
//! call it parsed the URL three times, ran redirect and retry layers the proxy does not use,
//! and boxed the bodies twice. hyper's pooled client, which replaced it, runs every
//! connection as a task of its own and hands the answer over through a channel: each stream
//! event woke that task, was decoded there, and crossed to the call's task. Here the call's
//! task writes the request and reads the answer itself ([`conn`]); the wire format is in
//! [`wire`] (httparse's head parser, as in hyper). HTTP/1.1 only, as nginx speaks upstream:
//! one call per connection at a time, connections reused.

mod conn;
mod wire;

/// The response parser, for the fuzz target and the property tests; not an API.
#[doc(hidden)]
pub mod fuzzing {
    pub use super::wire::{Framing, WireError};
    pub use axum::http::Method;

    use super::wire::{Decoder, Step, parse_head};
    use bytes::BytesMut;

    /// An answer as the client read it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Answer {
        pub status: u16,
        /// Header names and values, in the order the parsed head lists them.
        pub headers: Vec<(String, Vec<u8>)>,
        pub framing: Framing,
        pub keep_alive: bool,
        /// The body decoded until it ended, broke off or the input ran out.
        pub body: Vec<u8>,
        pub end: End,
    }

    /// How the body ended.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum End {
        /// Its framing says it is whole.
        Complete,
        /// The input ran out first (the upstream closed the connection short).
        Truncated,
        /// Its chunked framing is malformed.
        Malformed(WireError),
    }

    /// Reads an answer to `method` arriving in `pieces` as the client does: the head parsed
    /// once it is whole, then the body decoded as its bytes come, framing settled after each
    /// piece of data. `Ok(None)`: the head never completed.
    ///
    /// # Errors
    /// When the head is malformed.
    pub fn read_in_pieces<'a>(
        pieces: impl IntoIterator<Item = &'a [u8]>,
        method: &Method,
    ) -> Result<Option<Answer>, WireError> {
        let mut buf = BytesMut::new();
        let mut read: Option<(Answer, Decoder)> = None;
        for piece in pieces {
            buf.extend_from_slice(piece);
            if read.is_none() {
                let Some(head) = parse_head(&mut buf, method)? else {
                    continue;
                };
                let answer = Answer {
                    status: head.parts.status.as_u16(),
                    headers: head
                        .parts
                        .headers
                        .iter()
                        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                        .collect(),
                    framing: head.framing,
                    keep_alive: head.keep_alive,
                    body: Vec::new(),
                    end: End::Truncated,
                };
                read = Some((answer, Decoder::new(head.framing)));
            }
            let Some((answer, decoder)) = read.as_mut() else {
                continue;
            };
            loop {
                match decoder.step(&mut buf) {
                    Err(err) => {
                        answer.end = End::Malformed(err);
                        return Ok(read.map(|(answer, _)| answer));
                    }
                    Ok(Step::Data(data)) => {
                        answer.body.extend_from_slice(&data);
                        // As the client does: an error here is found again by the next step.
                        let _ = decoder.settle(&mut buf);
                    }
                    Ok(Step::NeedMore) => break,
                    Ok(Step::Done) => {
                        answer.end = End::Complete;
                        return Ok(read.map(|(answer, _)| answer));
                    }
                }
            }
        }
        Ok(read.map(|(mut answer, mut decoder)| {
            if decoder.eof().is_ok() {
                answer.end = End::Complete;
            }
            answer
        }))
    }
}

use std::sync::Arc;
use std::time::Duration;

use axum::http::{Request, Response};
use bytes::Bytes;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

pub use conn::UpstreamBody;
use conn::{Conn, Pool, Stream, Target};
pub(crate) use wire::connection_lists;

/// How long an idle connection is kept: under the 60 s after which load balancers commonly
/// close one, so that the upstream rarely closes a connection as it is being reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a call could not be sent or its answer read. The message names the failure (refused,
/// timed out, TLS, malformed answer), never the request's headers or body.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

/// What went wrong, as far as the caller acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ErrorKind {
    /// No connection was made.
    Connect,
    /// Sending the request or reading the answer's head failed.
    Exchange,
    /// The body ended (closed, reset, unreadable) before its framing said it was complete.
    Truncated,
    /// The body's chunked framing is malformed.
    Malformed,
}

impl Error {
    /// No connection could be made: nothing of the call reached the upstream.
    #[must_use]
    pub fn is_connect(&self) -> bool {
        self.kind == ErrorKind::Connect
    }

    /// The error code of a body that broke off: `upstream_malformed_chunk` when its chunked
    /// framing is malformed, `upstream_truncated` when it ended short of its framing.
    #[must_use]
    pub fn body_code(&self) -> &'static str {
        match self.kind {
            ErrorKind::Malformed => "upstream_malformed_chunk",
            _ => "upstream_truncated",
        }
    }

    fn connect(err: &std::io::Error) -> Self {
        Self {
            kind: ErrorKind::Connect,
            message: format!("connection failed: {err}"),
        }
    }

    fn io(what: &str, err: &std::io::Error) -> Self {
        let what = if err.kind() == std::io::ErrorKind::TimedOut {
            "connection timed out"
        } else {
            what
        };
        Self {
            kind: ErrorKind::Exchange,
            message: format!("{what}: {err}"),
        }
    }

    fn protocol(what: &str) -> Self {
        Self {
            kind: ErrorKind::Exchange,
            message: what.to_owned(),
        }
    }

    /// The body broke off: `err` while reading it, or (`None`) the upstream closed it short.
    fn truncated(err: Option<&std::io::Error>) -> Self {
        Self {
            kind: ErrorKind::Truncated,
            message: match err {
                Some(err) => format!("reading the answer failed before it was complete: {err}"),
                None => {
                    "the upstream closed the connection before the answer was complete".to_owned()
                }
            },
        }
    }

    fn malformed(err: wire::WireError) -> Self {
        Self {
            kind: ErrorKind::Malformed,
            message: err.0.to_owned(),
        }
    }
}

/// The upstream client; cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct UpstreamClient {
    tls: tokio_rustls::TlsConnector,
    connect_timeout: Duration,
    pool: Arc<Pool>,
}

impl std::fmt::Debug for UpstreamClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamClient")
            .field("connect_timeout", &self.connect_timeout)
            .finish_non_exhaustive()
    }
}

/// Builds the client: TLS verified against the platform's roots, as reqwest did; no Nagle
/// delay; idle connections kept [`IDLE_TIMEOUT`].
///
/// # Errors
/// When the TLS setup fails (no usable root store).
pub fn client(connect_timeout: Duration) -> anyhow::Result<UpstreamClient> {
    use rustls_platform_verifier::BuilderVerifierExt as _;
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_platform_verifier()?
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(UpstreamClient {
        tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        connect_timeout,
        pool: Arc::new(Pool::new(IDLE_TIMEOUT)),
    })
}

impl UpstreamClient {
    /// Sends `req` (its URI absolute: scheme and authority say where) and reads the answer's
    /// head; the body is read as it is polled. Borrowed: a caller that may send the same
    /// request again (retries) keeps it without copying its headers for each attempt. A kept-alive connection is used when one is
    /// idle; if sending on it fails (the upstream closed it as it was taken), the request is
    /// sent once more on a new connection.
    ///
    /// # Errors
    /// When no connection could be made ([`Error::is_connect`]), sending or reading failed,
    /// or the answer is not valid HTTP/1.1.
    pub async fn request(&self, req: &Request<Bytes>) -> Result<Response<UpstreamBody>, Error> {
        let (method, uri, headers, body) = (req.method(), req.uri(), req.headers(), req.body());
        let target = Target {
            https: uri.scheme() == Some(&axum::http::uri::Scheme::HTTPS),
            authority: uri
                .authority()
                .cloned()
                .ok_or_else(|| Error::protocol("the upstream URL has no host"))?,
        };
        let body_len =
            (!body.is_empty() || wire::announces_empty_body(method)).then_some(body.len());
        let mut request_head = Vec::with_capacity(256 + headers.len() * 64);
        wire::encode_request(&mut request_head, method, uri, headers, body_len);

        let mut conn = match self.pool.checkout(&target) {
            Some(conn) => conn,
            None => self.connect(target.clone()).await?,
        };
        if let Err(err) = conn.write_request(&request_head, body).await {
            if !conn.reused {
                return Err(Error::io("sending the request failed", &err));
            }
            conn = self.connect(target).await?;
            conn.write_request(&request_head, body)
                .await
                .map_err(|err| Error::io("sending the request failed", &err))?;
        }
        let head = loop {
            if let Some(head) =
                wire::parse_head(&mut conn.buf, method).map_err(|e| Error::protocol(e.0))?
            {
                break head;
            }
            if conn.buf.len() >= wire::MAX_HEAD_BYTES {
                return Err(Error::protocol("the upstream's answer head is too large"));
            }
            conn.buf.reserve(conn::READ_SIZE);
            let read = conn
                .stream
                .read_buf(&mut conn.buf)
                .await
                .map_err(|err| Error::io("reading the answer failed", &err))?;
            if read == 0 {
                return Err(Error::protocol(if conn.reused {
                    "the upstream closed a kept-alive connection without answering"
                } else {
                    "the upstream closed the connection without answering"
                }));
            }
        };
        let body = UpstreamBody::new(conn, head.framing, head.keep_alive, self.pool.clone());
        Ok(Response::from_parts(head.parts, body))
    }

    /// Opens a connection to `target` within the connect timeout (TLS handshake included).
    async fn connect(&self, target: Target) -> Result<Conn, Error> {
        self.pool.start_reaper();
        let https = target.https;
        let host = target.authority.host();
        // An IPv6 literal comes bracketed in a URL, and bare to the resolver and to TLS.
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host)
            .to_owned();
        let port = target
            .authority
            .port_u16()
            .unwrap_or(if https { 443 } else { 80 });
        let open = async {
            let tcp = TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| Error::connect(&e))?;
            tcp.set_nodelay(true).map_err(|e| Error::connect(&e))?;
            if !https {
                return Ok(Stream::Plain(tcp));
            }
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|_| Error::protocol("the upstream host is not a valid TLS name"))?;
            let tls = self
                .tls
                .connect(name, tcp)
                .await
                .map_err(|e| Error::connect(&e))?;
            Ok(Stream::Tls(Box::new(tls)))
        };
        match tokio::time::timeout(self.connect_timeout, open).await {
            Ok(stream) => Ok(Conn::new(stream?, target)),
            Err(_) => Err(Error {
                kind: ErrorKind::Connect,
                message: format!(
                    "connection timed out: no connection within {:?}",
                    self.connect_timeout
                ),
            }),
        }
    }
}

/// Where calls go: the scheme and host of `upstream.base_url`, parsed once, and its path.
#[derive(Debug, Clone)]
pub struct Origin {
    scheme: axum::http::uri::Scheme,
    authority: axum::http::uri::Authority,
    /// The base URL's path prefix (`""` for none), without a trailing `/`.
    pub base_path: String,
}

impl Origin {
    /// Parses `base_url` (scheme, host, optional port and path prefix).
    ///
    /// # Errors
    /// When it is not an http(s) URL with a host.
    pub fn parse(base_url: &str) -> anyhow::Result<Self> {
        // The URL crate normalizes (lowercase host, IDNA, default port) once, here.
        let url = reqwest::Url::parse(base_url.trim_end_matches('/'))?;
        let scheme = match url.scheme() {
            "http" => axum::http::uri::Scheme::HTTP,
            "https" => axum::http::uri::Scheme::HTTPS,
            other => anyhow::bail!("upstream scheme `{other}` is not http or https"),
        };
        let host = url
            .host_str()
            .ok_or_else(|| anyhow::anyhow!("the upstream URL has no host"))?;
        let authority = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        Ok(Self {
            scheme,
            authority: authority.parse()?,
            base_path: url.path().trim_end_matches('/').to_owned(),
        })
    }

    /// The URI of a call to `path` (already including the base path) with `query`.
    ///
    /// # Errors
    /// When the path or query holds bytes a URI may not.
    pub fn uri(
        &self,
        path: &str,
        query: Option<&str>,
    ) -> Result<axum::http::Uri, axum::http::Error> {
        let mut pq = String::with_capacity(path.len() + query.map_or(0, |q| q.len() + 1));
        pq.push_str(path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        axum::http::Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_uri_is_the_origin_with_the_path_and_query() {
        let o = Origin::parse("https://Bedrock-Mantle.us-east-1.api.aws/").expect("parse");
        assert_eq!(o.base_path, "");
        let uri = o
            .uri("/openai/v1/responses/resp_1", Some("include=x"))
            .expect("uri");
        assert_eq!(
            uri.to_string(),
            "https://bedrock-mantle.us-east-1.api.aws/openai/v1/responses/resp_1?include=x"
        );
        let o = Origin::parse("http://127.0.0.1:9000/prefix/").expect("parse");
        assert_eq!(o.base_path, "/prefix");
        assert_eq!(
            o.uri("/prefix/v1/chat/completions", None)
                .expect("uri")
                .to_string(),
            "http://127.0.0.1:9000/prefix/v1/chat/completions"
        );
    }

    #[test]
    fn only_http_and_https_upstreams_are_accepted() {
        assert!(Origin::parse("ftp://example.com").is_err());
        assert!(Origin::parse("not a url").is_err());
    }

    #[test]
    fn the_client_builds_with_the_platform_roots() {
        client(Duration::from_secs(1)).expect("client");
    }

    use http_body::Body as _;
    use http_body_util::BodyExt as _;
    use tokio::io::AsyncWriteExt as _;
    use tokio::net::TcpListener;

    /// Bounds a step that would otherwise hang if the client misbehaved; never a wait for
    /// something to happen.
    async fn bounded<T>(step: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), step)
            .await
            .expect("the step did not finish")
    }

    /// Reads one request (head, and body by its content-length) off the upstream's side.
    async fn read_request(sock: &mut TcpStream) -> String {
        let mut buf = Vec::new();
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .map_or(0, |v| v.trim().parse().expect("length"));
                if buf.len() >= end + 4 + len {
                    return String::from_utf8_lossy(&buf).into_owned();
                }
            }
            let mut chunk = [0u8; 4096];
            let n = sock.read(&mut chunk).await.expect("read");
            assert!(n > 0, "the client closed the connection mid-request");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Sends a POST through `c` in a task of its own; the test plays the upstream meanwhile.
    fn send(
        c: &UpstreamClient,
        addr: std::net::SocketAddr,
        body: &'static str,
    ) -> tokio::task::JoinHandle<Result<Response<UpstreamBody>, Error>> {
        let c = c.clone();
        tokio::spawn(async move { c.request(&post(addr, body)).await })
    }

    /// Sends a POST through `c`, takes it on a new connection, answers it with `answer`, and
    /// returns the connection and the answer as the client read it.
    async fn answered(
        c: &UpstreamClient,
        l: &TcpListener,
        answer: &[u8],
    ) -> (TcpStream, Response<UpstreamBody>) {
        let addr = l.local_addr().expect("addr");
        let call = send(c, addr, "{}");
        let (mut sock, _) = accept_call(l).await;
        sock.write_all(answer).await.expect("write");
        let res = bounded(call).await.expect("task").expect("answer");
        (sock, res)
    }

    /// Takes a call on a new connection: the connection, and the request read off it.
    async fn accept_call(l: &TcpListener) -> (TcpStream, String) {
        let (mut sock, _) = bounded(l.accept()).await.expect("a new connection");
        let req = bounded(read_request(&mut sock)).await;
        (sock, req)
    }

    fn post(addr: std::net::SocketAddr, body: &'static str) -> Request<Bytes> {
        let mut req = Request::new(Bytes::from_static(body.as_bytes()));
        *req.method_mut() = axum::http::Method::POST;
        *req.uri_mut() = format!("http://{addr}/v1/chat/completions")
            .parse()
            .expect("uri");
        req
    }

    async fn listener() -> (TcpListener, std::net::SocketAddr) {
        let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = l.local_addr().expect("addr");
        (l, addr)
    }

    #[tokio::test]
    async fn a_kept_alive_connection_carries_the_next_call() {
        let (l, addr) = listener().await;
        let c = client(Duration::from_secs(5)).expect("client");
        let first = send(&c, addr, "{\"a\":1}");
        let (mut sock, req) = accept_call(&l).await;
        assert!(
            req.starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
            "{req}"
        );
        assert!(req.contains(&format!("host: {addr}\r\n")), "{req}");
        assert!(req.ends_with("content-length: 7\r\n\r\n{\"a\":1}"), "{req}");
        sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-up: 1\r\n\r\n{}")
            .await
            .expect("write");
        let res = bounded(first).await.expect("task").expect("answer");
        assert_eq!(res.headers()["x-up"], "1");
        let body = res.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(&body[..], b"{}");
        assert_eq!(
            c.pool.idle_count(),
            1,
            "read whole, the connection waits for the next call"
        );

        // The second call comes on the same connection: no second accept.
        let second = send(&c, addr, "");
        let req = bounded(read_request(&mut sock)).await;
        assert!(
            req.contains("content-length: 0\r\n"),
            "a POST says its body is empty: {req}"
        );
        sock.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
            .await
            .expect("write");
        let res = bounded(second).await.expect("task").expect("answer");
        assert_eq!(res.status(), 204);
        assert!(res.body().is_end_stream());
        assert_eq!(c.pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_chunked_answer_is_handed_over_as_it_comes_and_ends_with_its_last_chunk() {
        let (l, _) = listener().await;
        let c = client(Duration::from_secs(5)).expect("client");
        let (mut sock, res) = answered(&c, &l, b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n\
              d\r\ndata: first\n\n\r\n").await;
        let mut body = res.into_body();
        let frame = bounded(body.frame()).await.expect("frame").expect("ok");
        assert_eq!(frame.into_data().expect("data"), "data: first\n\n");
        assert!(!body.is_end_stream(), "the rest has not come yet");
        sock.write_all(b"e\r\ndata: second\n\n\r\n0\r\n\r\n")
            .await
            .expect("write");
        let frame = bounded(body.frame()).await.expect("frame").expect("ok");
        assert_eq!(frame.into_data().expect("data"), "data: second\n\n");
        assert!(body.is_end_stream(), "its end came with the last chunk");
        assert_eq!(c.pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn an_idle_connection_the_upstream_closed_is_not_used_again() {
        let (l, addr) = listener().await;
        let c = client(Duration::from_secs(5)).expect("client");
        for round in 0..2 {
            let call = send(&c, addr, "{}");
            let (mut sock, _) = accept_call(&l).await;
            sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                .await
                .expect("write");
            let res = bounded(call).await.expect("task").expect("answer");
            res.into_body().collect().await.expect("body");
            assert_eq!(c.pool.idle_count(), 1, "round {round}");
            // The upstream closes the idle connection; once its FIN is in, the reaper (or
            // the next checkout) drops it, and the next call opens a new one.
            drop(sock);
            bounded(async {
                while c.pool.idle_count() > 0 {
                    c.pool.reap();
                    tokio::task::yield_now().await;
                }
            })
            .await;
        }
    }

    #[tokio::test]
    async fn what_the_upstream_says_or_leaves_unsaid_keeps_a_connection_out_of_the_pool() {
        let (l, addr) = listener().await;
        let c = client(Duration::from_secs(5)).expect("client");
        let answers: [&[u8]; 4] = [
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}HTTP/1.1 200 OK\r\n",
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\n{}",
            b"HTTP/1.1 200 OK\r\n\r\n{}",
        ];
        for answer in answers {
            let call = send(&c, addr, "{}");
            let (mut sock, _) = accept_call(&l).await;
            sock.write_all(answer).await.expect("write");
            let res = bounded(call).await.expect("task").expect("answer");
            let mut body = res.into_body();
            let frame = bounded(body.frame()).await.expect("frame").expect("ok");
            assert_eq!(frame.into_data().expect("data"), "{}");
            // A body read until close ends when the upstream closes.
            drop(sock);
            assert!(bounded(body.frame()).await.is_none());
            assert_eq!(
                c.pool.idle_count(),
                0,
                "{}",
                String::from_utf8_lossy(answer)
            );
        }
    }

    #[tokio::test]
    async fn an_answer_cut_short_is_an_error_and_a_dropped_body_closes_its_connection() {
        let (l, addr) = listener().await;
        let c = client(Duration::from_secs(5)).expect("client");
        let call = send(&c, addr, "{}");
        let (mut sock, _) = accept_call(&l).await;
        sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n{}")
            .await
            .expect("write");
        drop(sock);
        let res = bounded(call).await.expect("task").expect("answer");
        let err = bounded(res.into_body().collect())
            .await
            .expect_err("cut short");
        assert!(
            err.to_string().contains("before the answer was complete"),
            "{err}"
        );

        // A client that leaves mid-answer: the connection is closed, not pooled.
        let (mut sock, res) = answered(
            &c,
            &l,
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n",
        )
        .await;
        let mut body = res.into_body();
        bounded(body.frame()).await.expect("frame").expect("ok");
        drop(body);
        let mut rest = [0u8; 16];
        assert_eq!(
            bounded(sock.read(&mut rest)).await.expect("read"),
            0,
            "closed"
        );
        assert_eq!(c.pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn refused_and_failed_handshakes_are_connect_errors_and_bad_heads_are_not() {
        let c = client(Duration::from_secs(5)).expect("client");
        let (l, addr) = listener().await;
        drop(l);
        let err = c.request(&post(addr, "{}")).await.expect_err("refused");
        assert!(err.is_connect(), "{err}");
        assert!(err.to_string().starts_with("connection failed: "), "{err}");

        // TLS to a server that answers in plain text.
        let (l, addr) = listener().await;
        let server = tokio::spawn(async move {
            let (mut sock, _) = l.accept().await.expect("accept");
            let _ = sock.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
        });
        let mut req = post(addr, "{}");
        *req.uri_mut() = format!("https://{addr}/v1/models").parse().expect("uri");
        let err = bounded(c.request(&req)).await.expect_err("no TLS");
        assert!(err.is_connect(), "{err}");
        server.await.expect("server");

        let (l, addr) = listener().await;
        let call = send(&c, addr, "{}");
        let (mut sock, _) = accept_call(&l).await;
        sock.write_all(b"SMTP ready\r\n\r\n").await.expect("write");
        let err = bounded(call).await.expect("task").expect_err("not HTTP");
        assert!(!err.is_connect(), "the request was sent: {err}");
        assert!(err.to_string().contains("not valid HTTP/1.1"), "{err}");
    }
}
