//! An upstream whose answers are framed ambiguously, cut short, stalled or malformed, over
//! HTTP/1.1 and HTTP/2: the client can always tell an incomplete answer from a whole one, and
//! the ledger says why; a client that leaves a non-streamed answer early is still billed what
//! the upstream reports.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Upper bound for anything a test waits on.
const LIMIT: Duration = Duration::from_secs(10);

/// A non-streamed chat answer whose usage comes last, as bedrock-mantle's does.
const ANSWER: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"openai.gpt-oss-120b","choices":[{"index":0,"message":{"role":"assistant","content":"a long answer, written out in full"},"finish_reason":"stop"}],"usage":{"prompt_tokens":3000,"completion_tokens":8000,"total_tokens":11000}}"#;

/// How much of [`ANSWER`] comes before a pause: everything up to its usage.
fn first_part() -> &'static str {
    &ANSWER[..ANSWER.find(r#","usage""#).expect("usage")]
}

fn json_head(framing: &str) -> String {
    format!("HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n{framing}")
}

/// Quick timeouts for tests; the idle timeout as given.
fn tuned(upstream_url: &str, idle: &str) -> String {
    config_tuned(
        upstream_url,
        "",
        &format!("retry_backoff = \"10ms\"\nidle_timeout = \"{idle}\""),
        "",
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Http1,
    Http2,
}

/// The one request every test sends, as the upstream must have received it.
fn assert_upstream_got_the_call(up: &FaultUpstream) {
    let requests = up.requests();
    assert_eq!(requests.len(), 1, "one attempt, never retried");
    assert!(
        requests[0]
            .head
            .starts_with("POST /v1/chat/completions HTTP/1.1\r\n"),
        "{}",
        requests[0].head
    );
    assert_eq!(requests[0].body, CHAT_BODY.as_bytes());
}

// --- A raw HTTP/1.1 client: sees exactly how the answer is framed and how it ends. ---

struct Raw {
    conn: tokio::net::TcpStream,
    got: Vec<u8>,
}

/// The head of an answer: status, headers (names lowercase), and where the body starts.
struct RawHead {
    status: u16,
    headers: Vec<(String, String)>,
    body_at: usize,
}

impl RawHead {
    fn get(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn chunked(&self) -> bool {
        self.get("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    }
}

impl Raw {
    /// Sends the standard non-streamed chat call to `proxy`.
    async fn call(proxy: &Proxy) -> Self {
        let mut conn = tokio::net::TcpStream::connect(proxy.addr())
            .await
            .expect("connect");
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {CHAT_KEY}\r\n\
             content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{CHAT_BODY}",
            proxy.addr(),
            CHAT_BODY.len()
        );
        conn.write_all(request.as_bytes()).await.expect("write");
        Self {
            conn,
            got: Vec::new(),
        }
    }

    fn head(&self) -> Option<RawHead> {
        let end = memchr::memmem::find(&self.got, b"\r\n\r\n")?;
        let text = String::from_utf8_lossy(&self.got[..end]).into_owned();
        let mut lines = text.split("\r\n");
        let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        Some(RawHead {
            status,
            headers,
            body_at: end + 4,
        })
    }

    /// The body as the client decodes it, and whether it was terminated (its last chunk, or
    /// its whole content-length).
    fn body(&self) -> (Vec<u8>, bool) {
        let head = self.head().expect("a head");
        let raw = &self.got[head.body_at..];
        if head.chunked() {
            dechunk(raw)
        } else {
            let length: Option<usize> = head.get("content-length").and_then(|v| v.parse().ok());
            (raw.to_vec(), length.is_some_and(|n| raw.len() >= n))
        }
    }

    /// Reads until the head and at least `n` body bytes have come.
    async fn read_body_bytes(&mut self, n: usize) {
        let mut chunk = [0u8; 4096];
        while self.head().is_none() || self.body().0.len() < n {
            let read = tokio::time::timeout(LIMIT, self.conn.read(&mut chunk))
                .await
                .expect("the answer progressed within the limit")
                .expect("read");
            assert!(
                read > 0,
                "closed early: {}",
                String::from_utf8_lossy(&self.got)
            );
            self.got.extend_from_slice(&chunk[..read]);
        }
    }

    /// Reads until the proxy closes the connection.
    async fn read_to_close(&mut self) {
        let mut chunk = [0u8; 4096];
        loop {
            match tokio::time::timeout(LIMIT, self.conn.read(&mut chunk))
                .await
                .expect("the proxy closed the connection within the limit")
            {
                Ok(0) | Err(_) => return,
                Ok(n) => self.got.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn request_id(&self) -> String {
        self.head()
            .and_then(|h| h.get("x-request-id").map(str::to_owned))
            .expect("x-request-id")
    }
}

/// Decodes as much of a chunked body as is there; whether its terminating chunk came.
fn dechunk(mut raw: &[u8]) -> (Vec<u8>, bool) {
    let mut body = Vec::new();
    loop {
        let Some(line_end) = memchr::memmem::find(raw, b"\r\n") else {
            return (body, false);
        };
        let size = std::str::from_utf8(&raw[..line_end])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .expect("a chunk size from the proxy");
        if size == 0 {
            return (body, raw[line_end..].starts_with(b"\r\n\r\n"));
        }
        let data = &raw[line_end + 2..];
        if data.len() < size {
            body.extend_from_slice(data);
            return (body, false);
        }
        body.extend_from_slice(&data[..size]);
        raw = data.get(size + 2..).unwrap_or_default();
    }
}

// --- An HTTP/2 client (prior knowledge, cleartext). ---

fn h2_client() -> reqwest::Client {
    reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client")
}

async fn h2_call(proxy: &Proxy) -> reqwest::Response {
    tokio::time::timeout(
        LIMIT,
        h2_client()
            .post(format!("{}/v1/chat/completions", proxy.url))
            .bearer_auth(CHAT_KEY)
            .header("content-type", "application/json")
            .body(CHAT_BODY)
            .send(),
    )
    .await
    .expect("the proxy answered within the limit")
    .expect("send")
}

/// Reads an HTTP/2 body until `n` bytes have come.
async fn h2_read_bytes(
    stream: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    got: &mut Vec<u8>,
    n: usize,
) {
    while got.len() < n {
        let chunk = tokio::time::timeout(LIMIT, stream.next())
            .await
            .expect("the body progressed within the limit")
            .expect("more body")
            .expect("no error yet");
        got.extend_from_slice(&chunk);
    }
}

/// Reads an HTTP/2 body to its end: the error it ended in, if it did.
async fn h2_read_to_end(
    stream: &mut (impl futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Unpin),
    got: &mut Vec<u8>,
) -> Option<reqwest::Error> {
    loop {
        match tokio::time::timeout(LIMIT, stream.next())
            .await
            .expect("the body ended within the limit")
        {
            None => return None,
            Some(Ok(chunk)) => got.extend_from_slice(&chunk),
            Some(Err(err)) => return Some(err),
        }
    }
}

fn h2_id(r: &reqwest::Response) -> String {
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    r.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned()
}

/// What the client saw of an incomplete answer: the status, the body up to the break, and
/// whether it could tell the answer broke off.
struct Seen {
    status: u16,
    body: Vec<u8>,
    broken: bool,
    request_id: String,
}

/// Sends the call over `proto`, reads until `first` body bytes came, lets the upstream go
/// on (`release`), and reads to the end.
async fn call_through_a_break(
    proxy: &Proxy,
    up: &FaultUpstream,
    proto: Proto,
    first: usize,
    release: bool,
) -> Seen {
    match proto {
        Proto::Http1 => {
            let mut raw = Raw::call(proxy).await;
            raw.read_body_bytes(first).await;
            if release {
                up.release();
            }
            raw.read_to_close().await;
            let head = raw.head().expect("head");
            let (body, terminated) = raw.body();
            assert!(
                !(head.chunked() && head.get("content-length").is_some()),
                "never both framings"
            );
            Seen {
                status: head.status,
                body,
                broken: !terminated,
                request_id: raw.request_id(),
            }
        }
        Proto::Http2 => {
            let r = h2_call(proxy).await;
            let status = r.status().as_u16();
            let request_id = h2_id(&r);
            let mut stream = r.bytes_stream();
            let mut body = Vec::new();
            h2_read_bytes(&mut stream, &mut body, first).await;
            if release {
                up.release();
            }
            let err = h2_read_to_end(&mut stream, &mut body).await;
            if let Some(err) = &err {
                // A stream reset (RST_STREAM), not the connection failing.
                let text = format!("{err:?}");
                assert!(text.contains("Reset(StreamId"), "{text}");
            }
            Seen {
                status,
                body,
                broken: err.is_some(),
                request_id,
            }
        }
    }
}

#[tokio::test]
async fn length_beside_chunked_is_read_as_chunked_and_relayed_with_one_framing() {
    let (a, b) = ANSWER.split_at(50);
    let mut body = chunked(a.as_bytes());
    body.extend_from_slice(&chunked(b.as_bytes()));
    body.extend_from_slice(b"0\r\n\r\n");
    for proto in [Proto::Http1, Proto::Http2] {
        let up = FaultUpstream::start(vec![Fault::Answer {
            head: json_head("content-length: 5\r\ntransfer-encoding: chunked\r\n"),
            body: body.clone(),
        }])
        .await;
        let proxy = spawn_proxy(&tuned(&up.url, "2m")).await;
        let (status, got, id) = match proto {
            Proto::Http1 => {
                let mut raw = Raw::call(&proxy).await;
                raw.read_to_close().await;
                let head = raw.head().expect("head");
                assert!(
                    !(head.chunked() && head.get("content-length").is_some()),
                    "{:?}",
                    head.headers
                );
                assert_ne!(head.get("content-length"), Some("5"), "{:?}", head.headers);
                let (got, terminated) = raw.body();
                assert!(terminated, "a whole answer, properly ended");
                (head.status, got, raw.request_id())
            }
            Proto::Http2 => {
                let r = h2_call(&proxy).await;
                assert_ne!(
                    r.headers()
                        .get("content-length")
                        .map(reqwest::header::HeaderValue::as_bytes),
                    Some(&b"5"[..])
                );
                let id = h2_id(&r);
                let status = r.status().as_u16();
                let got = tokio::time::timeout(LIMIT, r.bytes())
                    .await
                    .expect("within the limit")
                    .expect("a whole body, no stream reset");
                (status, got.to_vec(), id)
            }
        };
        assert_eq!(status, 200, "{proto:?}");
        assert_eq!(
            String::from_utf8_lossy(&got),
            ANSWER,
            "{proto:?}: the whole chunked body"
        );
        let record = proxy.record_of(1, &id).await;
        assert_eq!(record["outcome"], "forwarded", "{proto:?} {record}");
        assert_eq!(record["status"], 200);
        assert!(record["error_code"].is_null(), "{record}");
        assert_eq!(record["usage_source"], "reported");
        assert_eq!(record["input_tokens"], 3000);
        assert_eq!(record["output_tokens"], 8000);
        assert_upstream_got_the_call(&up);
        proxy.assert_healthy().await;
    }
}

#[tokio::test]
async fn an_answer_cut_short_of_its_length_reaches_the_client_cut_short() {
    let first = first_part();
    for proto in [Proto::Http1, Proto::Http2] {
        let up = FaultUpstream::start(vec![Fault::Held {
            head: json_head(&format!("content-length: {}\r\n", ANSWER.len())),
            first: first.as_bytes().to_vec(),
            rest: Vec::new(),
            close: true,
        }])
        .await;
        let proxy = spawn_proxy(&tuned(&up.url, "2m")).await;
        let seen = call_through_a_break(&proxy, &up, proto, first.len(), true).await;
        assert_eq!(seen.status, 200, "{proto:?}");
        assert_eq!(seen.body, first.as_bytes(), "{proto:?}: all that came");
        assert!(
            seen.broken,
            "{proto:?}: the client sees the answer cut short"
        );
        let record = proxy.record_of(1, &seen.request_id).await;
        assert_eq!(record["outcome"], "upstream_error", "{proto:?} {record}");
        assert_eq!(record["error_code"], "upstream_truncated", "{record}");
        assert_eq!(record["status"], 200);
        assert_eq!(record["usage_source"], "estimated", "{record}");
        assert_upstream_got_the_call(&up);
        assert_eq!(up.wait_closed(1, LIMIT).await.len(), 1);
        proxy.assert_healthy().await;
    }
}

#[tokio::test]
async fn a_chunked_answer_stalled_past_idle_timeout_reaches_the_client_broken() {
    let first = first_part();
    for proto in [Proto::Http1, Proto::Http2] {
        let up = FaultUpstream::start(vec![Fault::Stream {
            head: json_head("transfer-encoding: chunked\r\n"),
            pieces: vec![first.as_bytes().to_vec()],
            end: StreamEnd::Stall,
            hold: false,
        }])
        .await;
        let proxy = spawn_proxy(&tuned(&up.url, "300ms")).await;
        let started = Instant::now();
        let seen = call_through_a_break(&proxy, &up, proto, first.len(), false).await;
        let waited = started.elapsed();
        assert_eq!(seen.status, 200, "{proto:?}");
        assert_eq!(seen.body, first.as_bytes(), "{proto:?}");
        assert!(seen.broken, "{proto:?}: no terminating chunk, no clean end");
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        // The stalled upstream is let go.
        up.wait_hung_up(1, LIMIT).await;
        let record = proxy.record_of(1, &seen.request_id).await;
        assert_eq!(record["outcome"], "upstream_error", "{proto:?} {record}");
        assert_eq!(record["error_code"], "upstream_stalled", "{record}");
        assert_eq!(record["status"], 200);
        assert_eq!(record["usage_source"], "estimated", "{record}");
        assert_upstream_got_the_call(&up);
        proxy.assert_healthy().await;
    }
}

#[tokio::test]
async fn a_malformed_chunk_reaches_the_client_as_a_broken_answer() {
    let first = first_part();
    for proto in [Proto::Http1, Proto::Http2] {
        let up = FaultUpstream::start(vec![Fault::Held {
            head: json_head("transfer-encoding: chunked\r\n"),
            first: chunked(first.as_bytes()),
            // Five bytes announced, eight sent before the line end.
            rest: b"5\r\n,\"usage\r\n".to_vec(),
            close: false,
        }])
        .await;
        let proxy = spawn_proxy(&tuned(&up.url, "2m")).await;
        let seen = call_through_a_break(&proxy, &up, proto, first.len(), true).await;
        assert_eq!(seen.status, 200, "{proto:?}");
        assert!(
            seen.body.starts_with(first.as_bytes()) && seen.body.len() <= first.len() + 5,
            "{proto:?}: {}",
            String::from_utf8_lossy(&seen.body)
        );
        assert!(seen.broken, "{proto:?}: the client sees the answer broken");
        let record = proxy.record_of(1, &seen.request_id).await;
        assert_eq!(record["outcome"], "upstream_error", "{proto:?} {record}");
        assert_eq!(record["error_code"], "upstream_malformed_chunk", "{record}");
        assert_eq!(record["status"], 200);
        assert_upstream_got_the_call(&up);
        // The proxy closes the connection that carried the malformed answer.
        assert_eq!(up.wait_closed(1, LIMIT).await.len(), 1);
        proxy.assert_healthy().await;
    }
}

#[tokio::test]
async fn a_client_that_leaves_a_non_streamed_answer_is_billed_its_reported_usage() {
    let first = first_part();
    for proto in [Proto::Http1, Proto::Http2] {
        let up = FaultUpstream::start(vec![Fault::Held {
            head: json_head(&format!("content-length: {}\r\n", ANSWER.len())),
            first: first.as_bytes().to_vec(),
            rest: ANSWER.as_bytes()[first.len()..].to_vec(),
            close: false,
        }])
        .await;
        let proxy = spawn_proxy(&tuned(&up.url, "2m")).await;
        let id = match proto {
            Proto::Http1 => {
                let mut raw = Raw::call(&proxy).await;
                raw.read_body_bytes(first.len()).await;
                assert_eq!(raw.head().expect("head").status, 200);
                let id = raw.request_id();
                drop(raw);
                id
            }
            Proto::Http2 => {
                let r = h2_call(&proxy).await;
                assert_eq!(r.status(), 200);
                let id = h2_id(&r);
                let mut stream = r.bytes_stream();
                h2_read_bytes(&mut stream, &mut Vec::new(), first.len()).await;
                // Dropping the body resets the stream.
                drop(stream);
                id
            }
        };
        // The client is gone; the proxy must not drop the upstream call with it.
        assert!(
            !up.hangs_up_within(1, Duration::from_secs(1)).await,
            "{proto:?}: the proxy hung up on the upstream before the usage came"
        );
        up.release();
        assert_eq!(
            up.wait_closed(1, LIMIT).await,
            [true],
            "{proto:?}: the answer was read to its end before the connection closed"
        );
        let record = proxy.record_of(1, &id).await;
        assert_eq!(record["outcome"], "client_disconnect", "{proto:?} {record}");
        assert_eq!(record["status"], 200);
        assert_eq!(record["usage_source"], "reported", "{proto:?} {record}");
        assert_eq!(record["input_tokens"], 3000);
        assert_eq!(record["output_tokens"], 8000);
        assert_eq!(proxy.records().len(), 1, "{proto:?}: committed once");
        assert_upstream_got_the_call(&up);
        proxy.assert_healthy().await;
    }
}
