//! Bad clients: truncated and odd bodies, slowloris, hang-ups at every stage, smuggling,
//! header injection and path tricks, driven over raw TCP where an HTTP client would tidy up.

mod common;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Upper bound for anything a test waits on.
const LIMIT: Duration = Duration::from_secs(10);

const CHAT_STREAM: &str =
    r#"{"model":"openai.gpt-oss-120b","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
const RESPONSES_STREAM: &str = r#"{"model":"openai.gpt-oss-120b","stream":true,"input":"hi"}"#;

/// A raw HTTP/1.1 answer.
#[derive(Debug)]
struct RawAnswer {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl RawAnswer {
    fn error_code(&self) -> String {
        let v: serde_json::Value = serde_json::from_slice(&self.body)
            .unwrap_or_else(|_| panic!("JSON error body: {self:?}"));
        v["error"]["code"].as_str().unwrap_or("").to_owned()
    }

    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_owned())
        })
    }
}

async fn connect(proxy: &Proxy) -> TcpStream {
    let conn = TcpStream::connect(proxy.addr()).await.expect("connect");
    conn.set_nodelay(true).expect("nodelay");
    conn
}

/// Reads one answer (head, then a `content-length`, chunked or close-delimited body);
/// `None` when the connection closes before a complete head.
async fn read_answer(conn: &mut TcpStream) -> Option<RawAnswer> {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(at) = memchr::memmem::find(&buf, b"\r\n\r\n") {
            break at + 4;
        }
        if read_more(conn, &mut buf).await == 0 {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let mut answer = RawAnswer {
        status,
        head,
        body: Vec::new(),
    };
    let mut rest = buf[head_end..].to_vec();
    if let Some(len) = answer
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        while rest.len() < len {
            if read_more(conn, &mut rest).await == 0 {
                break;
            }
        }
        answer.body = rest;
    } else if answer
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"))
    {
        loop {
            if let Some(body) = dechunk(&rest) {
                answer.body = body;
                break;
            }
            if read_more(conn, &mut rest).await == 0 {
                answer.body = rest;
                break;
            }
        }
    } else {
        while read_more(conn, &mut rest).await > 0 {}
        answer.body = rest;
    }
    Some(answer)
}

/// Reads what is there into `buf`; 0 at the end of the connection (or on an error).
async fn read_more(conn: &mut TcpStream, buf: &mut Vec<u8>) -> usize {
    let mut chunk = vec![0u8; 16 * 1024];
    let n = tokio::time::timeout(LIMIT, conn.read(&mut chunk))
        .await
        .expect("the proxy answered within the limit")
        .unwrap_or(0);
    buf.extend_from_slice(&chunk[..n]);
    n
}

/// The body of a complete chunked encoding, or `None` while it is incomplete.
fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line = memchr::memmem::find(data, b"\r\n")?;
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..line]).ok()?.trim(), 16).ok()?;
        if size == 0 {
            return data[line + 2..].starts_with(b"\r\n").then_some(out);
        }
        let chunk = data.get(line + 2..line + 2 + size)?;
        out.extend_from_slice(chunk);
        data = data.get(line + 4 + size..)?;
    }
}

/// Sends `request` on a new connection and reads the answer.
async fn exchange(proxy: &Proxy, request: &[u8]) -> Option<RawAnswer> {
    let mut conn = connect(proxy).await;
    conn.write_all(request).await.expect("write");
    read_answer(&mut conn).await
}

fn post_head(path: &str, extra: &str, length: usize) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nhost: proxy\r\nauthorization: Bearer {CHAT_KEY}\r\ncontent-type: application/json\r\ncontent-length: {length}\r\n{extra}\r\n"
    )
}

/// A whole `POST` with `body`.
fn post_raw(path: &str, extra: &str, body: &str) -> Vec<u8> {
    let mut r = post_head(path, extra, body.len()).into_bytes();
    r.extend_from_slice(body.as_bytes());
    r
}

/// Asserts that the proxy still answers after the attack.
async fn assert_serving(proxy: &Proxy) {
    proxy.assert_healthy().await;
}

// --- Bodies ---

#[tokio::test]
async fn truncated_body_is_refused_and_never_forwarded() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let mut conn = connect(&proxy).await;
    let body = CHAT_BODY.as_bytes();
    conn.write_all(post_head("/v1/chat/completions", "", body.len() + 100).as_bytes())
        .await
        .expect("write");
    conn.write_all(body).await.expect("write");
    // The client says it is done sending, but keeps listening.
    conn.shutdown().await.expect("half-close");
    let answer = read_answer(&mut conn).await;
    if let Some(answer) = &answer {
        assert_eq!(answer.status, 400, "{answer:?}");
        assert_eq!(answer.error_code(), "invalid_body");
    }
    proxy.wait_for_records(1).await;
    let records = proxy.records();
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["error_code"], "invalid_body", "{records:#?}");
    assert!(
        up.requests().is_empty(),
        "a truncated body is never forwarded"
    );
    assert_serving(&proxy).await;
}

#[tokio::test]
async fn text_plain_with_a_json_body_is_accepted_and_forwarded_as_sent() {
    // mantlegate checks that the body is one JSON object, whatever it is labelled: the
    // label goes upstream unchanged and bedrock-mantle judges it.
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    for content_type in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let mut request = client()
            .post(format!("{}/v1/chat/completions", proxy.url))
            .bearer_auth(CHAT_KEY)
            .body(CHAT_BODY);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        let r = request.send().await.expect("send");
        assert_eq!(r.status(), 200, "{content_type:?}");
        r.bytes().await.expect("body");
        let sent = up.requests().pop().expect("forwarded");
        assert_eq!(
            sent.headers
                .get("content-type")
                .map(|v| v.to_str().expect("ascii")),
            content_type
        );
        assert_eq!(sent.body, CHAT_BODY.as_bytes(), "byte for byte");
    }
}

#[tokio::test]
async fn ten_megabytes_of_json_nesting_is_400_invalid_json() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config_tuned(&up.url, "max_body_bytes = 16777216", "", "")).await;
    let depth = 10 * 1000 * 1000;
    let top = "[".repeat(depth);
    let inside = format!(
        r#"{{"model":"openai.gpt-oss-120b","stream":true,"messages":{}"#,
        "[".repeat(depth)
    );
    let objects = r#"{"a":"#.repeat(depth / 5);
    for body in [top, inside, objects] {
        let r = client()
            .post(format!("{}/v1/chat/completions", proxy.url))
            .bearer_auth(CHAT_KEY)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 400);
        assert_eq!(error_of(r).await["code"], "invalid_json");
    }
    assert!(up.requests().is_empty());
    assert_serving(&proxy).await;
}

#[tokio::test]
async fn invalid_utf8_is_400_invalid_json() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    for body in [
        &b"{\"model\":\"openai.gpt-oss-120b\",\"messages\":[{\"role\":\"user\",\"content\":\"\xff\xfe\"}]}"[..],
        &b"{\"model\":\"openai.gpt-oss-120b\",\"x\xc3\":1}"[..],
        &b"\xef\xbb\xbf{\"model\":\"openai.gpt-oss-120b\"}"[..],
        &b"{\"model\":\"\xed\xa0\x80\"}"[..],
    ] {
        let r = client()
            .post(format!("{}/v1/chat/completions", proxy.url))
            .bearer_auth(CHAT_KEY)
            .header("content-type", "application/json")
            .body(body.to_vec())
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 400, "{}", String::from_utf8_lossy(body));
        assert_eq!(error_of(r).await["code"], "invalid_json");
    }
    assert!(up.requests().is_empty());
}

// --- Slowloris ---

/// Sends `head` one byte every 100 ms; returns when the proxy closed the connection (with
/// the time it took) or `None` after `for_at_most`.
async fn slowloris(proxy: &Proxy, for_at_most: Duration) -> Option<Duration> {
    let mut conn = connect(proxy).await;
    let started = Instant::now();
    let header = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\nauthorization: Bearer {CHAT_KEY}\r\nx-slow: "
    );
    let mut bytes = header
        .into_bytes()
        .into_iter()
        .chain(std::iter::repeat(b'a'));
    let mut sink = [0u8; 1024];
    while started.elapsed() < for_at_most {
        let byte = bytes.next().expect("endless");
        if conn.write_all(&[byte]).await.is_err() {
            return Some(started.elapsed());
        }
        // One byte per 100 ms is the attack itself; the read notices the proxy closing.
        // Any read result (data, end or error) means the proxy answered or closed.
        if tokio::time::timeout(Duration::from_millis(100), conn.read(&mut sink))
            .await
            .is_ok()
        {
            return Some(started.elapsed());
        }
    }
    None
}

#[tokio::test]
async fn slowloris_clients_do_not_stop_others_being_served() {
    let up = FakeUpstream::start().await;
    let proxy = std::sync::Arc::new(spawn_proxy(&config(&up.url, "reject", "")).await);
    let attackers: Vec<_> = (0..50)
        .map(|_| {
            let proxy = proxy.clone();
            tokio::spawn(async move { slowloris(&proxy, Duration::from_secs(3)).await })
        })
        .collect();
    for i in 0..20 {
        let started = Instant::now();
        let r = tokio::time::timeout(
            LIMIT,
            client()
                .post(format!("{}/v1/chat/completions", proxy.url))
                .bearer_auth(CHAT_KEY)
                .body(CHAT_BODY)
                .send(),
        )
        .await
        .expect("served while slowloris clients hold connections")
        .expect("send");
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "call {i} took {:?}",
            started.elapsed()
        );
    }
    proxy.wait_for_records(20).await;
    for a in attackers {
        a.await.expect("attacker");
    }
}

#[tokio::test]
async fn slowloris_connections_are_closed_by_a_header_read_timeout() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let closed = slowloris(&proxy, Duration::from_secs(40)).await;
    assert!(
        closed.is_some(),
        "a connection still sending its headers after 40 s was never closed"
    );
}

// --- Hang-ups at every stage ---

/// The record of the only call, which must be a client disconnect.
async fn assert_one_disconnect(proxy: &Proxy) -> serde_json::Value {
    proxy.wait_for_records(1).await;
    let records = proxy.records();
    assert_eq!(records.len(), 1, "{records:#?}");
    assert_eq!(records[0]["outcome"], "client_disconnect", "{records:#?}");
    records[0].clone()
}

#[tokio::test]
async fn hang_up_before_the_headers_are_done_reaches_nothing() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let mut conn = connect(&proxy).await;
    conn.write_all(
        format!("POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\nauthorization: Bearer {CHAT_KEY}\r\ncontent-le")
            .as_bytes(),
    )
    .await
    .expect("write");
    drop(conn);
    // No request was ever complete: nothing to forward and nothing to bill. A call after it
    // is the only one the upstream and the ledger see.
    let r = proxy.chat(CHAT_KEY).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.expect("body");
    proxy.wait_for_records(1).await;
    let records = proxy.records();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["outcome"], "forwarded");
    assert_eq!(up.requests().len(), 1);
}

#[tokio::test]
async fn hang_up_mid_body_is_recorded_as_a_client_disconnect() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let mut conn = connect(&proxy).await;
    let body = CHAT_BODY.as_bytes();
    conn.write_all(post_head("/v1/chat/completions", "", body.len()).as_bytes())
        .await
        .expect("write");
    conn.write_all(&body[..body.len() / 2])
        .await
        .expect("write");
    drop(conn);
    let record = assert_one_disconnect(&proxy).await;
    assert!(up.requests().is_empty(), "{record}");
    assert_serving(&proxy).await;
}

/// Hang-up to upstream drop, measured `rounds` times; returns the measurements.
async fn measure_hang_up(
    rounds: usize,
    plan: Fault,
    path: &str,
    body: &str,
    read_first: &[u8],
) -> Vec<Duration> {
    let mut figures = Vec::new();
    for _ in 0..rounds {
        let up = FaultUpstream::start(vec![plan.clone()]).await;
        let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
        let mut conn = connect(&proxy).await;
        conn.write_all(&post_raw(path, "", body))
            .await
            .expect("write");
        up.wait_requests(1, LIMIT).await;
        if !read_first.is_empty() {
            // Read until the relayed events are in: the call is mid-stream.
            let mut got = Vec::new();
            let mut chunk = [0u8; 8192];
            while memchr::memmem::find(&got, read_first).is_none() {
                let n = tokio::time::timeout(LIMIT, conn.read(&mut chunk))
                    .await
                    .expect("events relayed")
                    .expect("read");
                assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&got));
                got.extend_from_slice(&chunk[..n]);
            }
        }
        let hung_up = Instant::now();
        drop(conn);
        let dropped = up.wait_hung_up(1, LIMIT).await;
        figures.push(dropped.saturating_duration_since(hung_up));
        let record = assert_one_disconnect(&proxy).await;
        if !read_first.is_empty() {
            assert_eq!(record["status"], 200, "{record}");
            assert!(
                matches!(
                    record["usage_source"].as_str(),
                    Some("estimated" | "missing")
                ),
                "{record}"
            );
        }
        assert_serving(&proxy).await;
    }
    figures
}

fn assert_fast(stage: &str, figures: &[Duration]) {
    let max = figures.iter().max().copied().unwrap_or_default();
    report(&format!(
        "{stage}: hang-up to upstream drop {figures:?} (max {max:?})"
    ));
    assert!(
        max <= Duration::from_millis(100),
        "{stage}: the upstream call was dropped {max:?} after the client hung up"
    );
}

#[tokio::test]
async fn hang_up_while_the_upstream_stalls_drops_the_upstream_call_at_once() {
    let figures = measure_hang_up(5, Fault::Stall, "/v1/chat/completions", CHAT_BODY, b"").await;
    assert_fast("before the response head", &figures);
}

#[tokio::test]
async fn hang_up_mid_stream_drops_the_upstream_call_at_once() {
    for (path, body, events) in [
        ("/v1/chat/completions", CHAT_STREAM, chat_events()),
        ("/v1/responses", RESPONSES_STREAM, responses_events()),
    ] {
        let sent: Vec<Vec<u8>> = events[..2].iter().map(|e| e.as_bytes().to_vec()).collect();
        let plan = Fault::sse(sent.clone(), StreamEnd::Stall);
        let figures = measure_hang_up(5, plan, path, body, &sent[1]).await;
        assert_fast(&format!("mid-stream {path}"), &figures);
    }
}

// --- Smuggling and header injection ---

/// Reads the answer to a refused request: 400 `code`, OpenAI-shaped, after which the proxy
/// closes the connection.
async fn assert_refused_then_closed(conn: &mut TcpStream, code: &str, what: &str) {
    assert_refused_with(conn, 400, code, what).await;
}

/// Sends `request` on a new connection and asserts it is refused with `status` and `code`,
/// then closed.
async fn assert_refused_alone(proxy: &Proxy, request: &[u8], status: u16, code: &str, what: &str) {
    let mut conn = connect(proxy).await;
    conn.write_all(request).await.expect("write");
    assert_refused_with(&mut conn, status, code, what).await;
}

/// Asserts that `conn` gets an OpenAI-shaped refusal with `status` and `code`, then is closed.
async fn assert_refused_with(conn: &mut TcpStream, status: u16, code: &str, what: &str) {
    let answer = read_answer(conn)
        .await
        .unwrap_or_else(|| panic!("{what}: no answer"));
    assert_eq!(answer.status, status, "{what}: {answer:?}");
    assert_eq!(
        answer.header("content-type").as_deref(),
        Some("application/json"),
        "{what}"
    );
    assert_eq!(
        answer.header("x-should-retry").as_deref(),
        Some("false"),
        "{what}"
    );
    let v: serde_json::Value = serde_json::from_slice(&answer.body).expect("JSON error body");
    assert_eq!(v["error"]["code"], code, "{what}: {v}");
    assert_eq!(v["error"]["type"], "invalid_request_error", "{what}: {v}");
    assert!(v["error"]["param"].is_null(), "{what}: {v}");
    assert!(v["error"]["message"].is_string(), "{what}: {v}");
    assert_eq!(
        answer.header("connection").as_deref(),
        Some("close"),
        "{what}"
    );
    assert_closed(conn, what).await;
}

/// Asserts that the proxy closes `conn` without sending anything more.
async fn assert_closed(conn: &mut TcpStream, what: &str) {
    let mut rest = Vec::new();
    assert_eq!(
        read_more(conn, &mut rest).await,
        0,
        "{what}: the connection stays open: {}",
        String::from_utf8_lossy(&rest)
    );
}

/// A chunked call (the body in two chunks, one with an extension, then a trailer).
fn chunked_call(extra: &str) -> Vec<u8> {
    let body = CHAT_BODY.as_bytes();
    let mut r = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\nauthorization: Bearer {CHAT_KEY}\r\ncontent-type: application/json\r\n{extra}transfer-encoding: chunked\r\n\r\n"
    )
    .into_bytes();
    r.extend_from_slice(&chunked(&body[..10]));
    r.extend_from_slice(format!("{:x};note=1\r\n", body.len() - 10).as_bytes());
    r.extend_from_slice(&body[10..]);
    r.extend_from_slice(b"\r\n0\r\nx-trailer: 1\r\n\r\n");
    r
}

#[tokio::test]
async fn content_length_with_chunked_is_refused_and_never_forwarded() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let length = format!("content-length: {}\r\n", CHAT_BODY.len());
    let first = chunked_call(&length);
    let call = chunked_call("");
    let head_end = memchr::memmem::find(&call, b"\r\n\r\n").expect("head end") + 2;
    let second = [&call[..head_end], length.as_bytes(), &call[head_end..]].concat();
    for (what, mut request) in [
        ("content-length, then chunked", first),
        ("chunked, then content-length", second),
    ] {
        // A well-formed call after it on the same connection is never read: where it would
        // start is the very thing in doubt.
        request.extend_from_slice(&post_raw("/v1/chat/completions", "", CHAT_BODY));
        let mut conn = connect(&proxy).await;
        conn.write_all(&request).await.expect("write");
        assert_refused_then_closed(&mut conn, "ambiguous_length", what).await;
    }
    assert!(up.requests().is_empty(), "never forwarded");
    assert_serving(&proxy).await;
}

#[tokio::test]
async fn two_content_lengths_are_refused_and_never_forwarded() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let n = CHAT_BODY.len();
    // Equal lengths hyper would accept (keeping one): mantlegate refuses them.
    let mut request = post_raw(
        "/v1/chat/completions",
        &format!("Content-Length: {n}\r\n"),
        CHAT_BODY,
    );
    request.extend_from_slice(&post_raw("/v1/chat/completions", "", CHAT_BODY));
    let mut conn = connect(&proxy).await;
    conn.write_all(&request).await.expect("write");
    assert_refused_then_closed(&mut conn, "ambiguous_length", "two equal lengths").await;
    // Differing lengths, or two in one line, hyper's parser refuses before mantlegate sees
    // the request: hyper's bare 400 is rewritten with the error body, and the connection
    // closed.
    for (what, lengths, code) in [
        (
            "two differing lengths",
            format!("content-length: {n}\r\ncontent-length: {}\r\n", n + 1),
            "ambiguous_length",
        ),
        (
            "a listed length",
            format!("content-length: {n}, {n}\r\n"),
            "malformed_request",
        ),
    ] {
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\nauthorization: Bearer {CHAT_KEY}\r\n{lengths}\r\n{CHAT_BODY}"
        );
        assert_refused_alone(&proxy, request.as_bytes(), 400, code, what).await;
    }
    assert!(up.requests().is_empty(), "never forwarded");
    assert_serving(&proxy).await;
}

#[tokio::test]
async fn only_the_ambiguous_request_of_a_connection_is_refused() {
    // Well-formed calls before it on the same connection, sized and chunked, pipelined, are
    // served: the proxy follows each request's framing to find the next head.
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let mut request = post_raw("/v1/chat/completions", "", CHAT_BODY);
    request.extend_from_slice(&chunked_call(""));
    request.extend_from_slice(&chunked_call(&format!(
        "content-length: {}\r\n",
        CHAT_BODY.len()
    )));
    let mut conn = connect(&proxy).await;
    conn.write_all(&request).await.expect("write");
    // Pipelined answers share reads: take all until the proxy closes the connection.
    let mut all = Vec::new();
    while read_more(&mut conn, &mut all).await > 0 {}
    let text = String::from_utf8_lossy(&all);
    let statuses: Vec<&str> = text
        .match_indices("HTTP/1.1 ")
        .map(|(at, _)| &text[at + 9..at + 12])
        .collect();
    assert_eq!(statuses, ["200", "200", "400"], "{text}");
    let last = &text[text.rfind("HTTP/1.1 ").expect("answer")..];
    assert!(last.contains("\r\nconnection: close\r\n"), "{last}");
    let body = &last[last.find("\r\n\r\n").expect("head end") + 4..];
    let v: serde_json::Value = serde_json::from_str(body).expect("JSON error body");
    assert_eq!(v["error"]["code"], "ambiguous_length", "{v}");
    let sent = up.requests();
    assert_eq!(sent.len(), 2);
    assert!(sent.iter().all(|r| r.body == CHAT_BODY.as_bytes()));
    // The refusal is below the level of calls (as hyper's own framing refusals): a call after
    // it is the third record.
    assert_serving(&proxy).await;
    let r = proxy.chat(CHAT_KEY).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.expect("body");
    proxy.wait_for_records(3).await;
    let records = proxy.records();
    assert_eq!(records.len(), 3, "{records:#?}");
    assert!(
        records.iter().all(|r| r["outcome"] == "forwarded"),
        "{records:#?}"
    );
}

#[tokio::test]
async fn a_smuggled_second_request_never_reaches_the_upstream() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let smuggled = post_raw(
        "/v1/chat/completions",
        "",
        r#"{"model":"smuggled","messages":[]}"#,
    );
    // A front end trusting Content-Length would see one request whose body ends where the
    // smuggled one starts; one trusting chunked would see two requests.
    let mut chunked_body = chunked(CHAT_BODY.as_bytes());
    chunked_body.extend_from_slice(b"0\r\n\r\n");
    let mut request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: proxy\r\nauthorization: Bearer {CHAT_KEY}\r\ncontent-length: {}\r\ntransfer-encoding: chunked\r\n\r\n",
        chunked_body.len() + smuggled.len()
    )
    .into_bytes();
    request.extend_from_slice(&chunked_body);
    request.extend_from_slice(&smuggled);
    let mut conn = connect(&proxy).await;
    conn.write_all(&request).await.expect("write");
    while read_answer(&mut conn).await.is_some() {}
    assert_serving(&proxy).await;
    let bodies: Vec<String> = up
        .requests()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    // The request carrying both lengths is refused whole: nothing of it is forwarded.
    assert!(bodies.is_empty(), "{bodies:?}");
}

#[tokio::test]
async fn malformed_framing_is_400_and_never_forwarded() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let body = CHAT_BODY;
    let n = body.len();
    let auth = format!("authorization: Bearer {CHAT_KEY}\r\n");
    let cases = [
        (
            "duplicate differing content-length",
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: p\r\n{auth}content-length: {n}\r\ncontent-length: {}\r\n\r\n{body}",
                n + 1
            ),
        ),
        (
            "comma-listed differing content-length",
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: p\r\n{auth}content-length: {n}, {}\r\n\r\n{body}",
                n + 1
            ),
        ),
        (
            "a non-chunked transfer-encoding",
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: p\r\n{auth}transfer-encoding: gzip\r\n\r\n{body}"
            ),
        ),
        (
            "transfer-encoding in HTTP/1.0",
            format!(
                "POST /v1/chat/completions HTTP/1.0\r\nhost: p\r\n{auth}transfer-encoding: chunked\r\n\r\n{n:x}\r\n{body}\r\n0\r\n\r\n"
            ),
        ),
        (
            "a negative content-length",
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: p\r\n{auth}content-length: -1\r\n\r\n{body}"
            ),
        ),
        (
            "a CR inside a header value",
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: p\r\n{auth}x-note: a\rx-injected: b\r\ncontent-length: {n}\r\n\r\n{body}"
            ),
        ),
        (
            "a NUL inside a header value",
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: p\r\n{auth}x-note: a\0b\r\ncontent-length: {n}\r\n\r\n{body}"
            ),
        ),
        (
            "an obsolete folded header line",
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: p\r\n{auth}x-note: a\r\n folded\r\ncontent-length: {n}\r\n\r\n{body}"
            ),
        ),
        (
            "a space before the colon",
            format!(
                "POST /v1/chat/completions HTTP/1.1\r\nhost: p\r\n{auth}content-length : {n}\r\n\r\n{body}"
            ),
        ),
    ];
    for (what, request) in cases {
        // hyper's parser refuses these itself; its bare 400 is rewritten with the error body.
        // Two differing lengths are the ambiguity mantlegate refuses too.
        let code = if what == "duplicate differing content-length" {
            "ambiguous_length"
        } else {
            "malformed_request"
        };
        assert_refused_alone(&proxy, request.as_bytes(), 400, code, what).await;
    }
    assert!(up.requests().is_empty(), "never forwarded");
    assert_serving(&proxy).await;
}

#[tokio::test]
async fn a_huge_header_block_is_refused() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let request = post_raw(
        "/v1/chat/completions",
        &format!("x-big: {}\r\n", "a".repeat(1024 * 1024)),
        CHAT_BODY,
    );
    // The answer may be lost to a reset while the client is still sending; if it comes, it
    // is the OpenAI-shaped 431.
    if let Some(answer) = exchange(&proxy, &request).await {
        assert_eq!(answer.status, 431, "a 1 MiB header: {answer:?}");
        assert_eq!(answer.error_code(), "header_too_large", "a 1 MiB header");
    }
    let many = (0..200).fold(String::new(), |mut all, i| {
        let _ = write!(all, "x-h{i}: v\r\n");
        all
    });
    let request = post_raw("/v1/chat/completions", &many, CHAT_BODY);
    assert_refused_alone(&proxy, &request, 431, "header_too_large", "200 headers").await;
    assert!(up.requests().is_empty(), "never forwarded");
    assert_serving(&proxy).await;
}

#[tokio::test]
async fn a_uri_over_64_kib_is_414_uri_too_long() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let request = format!(
        "GET /v1/models?q={} HTTP/1.1\r\nhost: p\r\nauthorization: Bearer {CHAT_KEY}\r\n\r\n",
        "a".repeat(70 * 1024)
    );
    assert_refused_alone(
        &proxy,
        request.as_bytes(),
        414,
        "uri_too_long",
        "a 70 KiB URI",
    )
    .await;
    assert!(up.requests().is_empty(), "never forwarded");
    assert_serving(&proxy).await;
}

#[tokio::test]
async fn tls_or_garbage_on_the_plain_port_is_400_malformed_request() {
    // The usual mistake: an https:// base_url pointed at the plain HTTP port.
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let client_hello: &[u8] = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03abcdefgh\r\n\r\n";
    for (what, bytes) in [
        ("a TLS ClientHello", client_hello),
        (
            "a request line without a version",
            b"GET /v1/models\r\n\r\n".as_slice(),
        ),
        (
            "a bad method token",
            b"P(ST /v1/models HTTP/1.1\r\nhost: p\r\n\r\n".as_slice(),
        ),
    ] {
        assert_refused_alone(&proxy, bytes, 400, "malformed_request", what).await;
    }
    assert!(up.requests().is_empty(), "never forwarded");
    assert_serving(&proxy).await;
}

#[tokio::test]
async fn an_oversize_header_value_is_refused_and_never_forwarded() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let request = post_raw(
        "/v1/chat/completions",
        &format!("x-big: {}\r\n", "a".repeat(100 * 1024)),
        CHAT_BODY,
    );
    let status = exchange(&proxy, &request).await.map(|a| a.status);
    assert!(
        matches!(status, Some(400 | 431)),
        "a 100 KiB header: {status:?}"
    );
    assert!(up.requests().is_empty(), "never forwarded");
}

// --- Paths ---

#[tokio::test]
async fn path_tricks_are_400_invalid_path_and_never_forwarded() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    for path in [
        "/chatbot/../v1/organization/projects",
        "/searchapp/../v1/organization/projects",
        "/searchapp/v1/../../v1/organization/projects",
        "/v1/chat/../organization/projects",
        "/v1/./organization/projects",
        "/chatbot/%2e%2e/v1/organization/projects",
        "/chatbot/%2E%2E/v1/organization/projects",
        "/chatbot/.%2e/v1/organization/projects",
        "/chatbot/%2e./v1/organization/projects",
        "/chatbot/..%2fv1%2forganization%2fprojects",
        "/chatbot/..%2Fv1/organization/projects",
        "/v1/responses/..%2f..%2forganization%2fprojects",
        "/chatbot/..%5cv1/organization/projects",
        "/chatbot/..\\v1/organization/projects",
        "//v1/organization/projects",
        "/v1//organization/projects",
        "/searchapp//v1/chat/completions",
        "http://proxy/v1/../v1/organization/projects",
    ] {
        for method in ["GET", "POST"] {
            let request = format!(
                "{method} {path} HTTP/1.1\r\nhost: proxy\r\nauthorization: Bearer {CHAT_KEY}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{CHAT_BODY}",
                CHAT_BODY.len()
            );
            let answer = exchange(&proxy, request.as_bytes())
                .await
                .unwrap_or_else(|| panic!("{method} {path}: no answer"));
            assert_eq!(answer.status, 400, "{method} {path}: {answer:?}");
            assert_eq!(answer.error_code(), "invalid_path", "{method} {path}");
        }
    }
    assert!(up.requests().is_empty(), "never forwarded");
    // A double-encoded form is a dot segment to a server that decodes twice: refused too.
    let request = format!(
        "GET /v1/%252e%252e/organization/projects HTTP/1.1\r\nhost: proxy\r\nauthorization: Bearer {CHAT_KEY}\r\nconnection: close\r\n\r\n"
    );
    let answer = exchange(&proxy, request.as_bytes()).await.expect("answer");
    assert_eq!(answer.status, 400);
    assert_eq!(answer.error_code(), "invalid_path");
    assert!(up.requests().is_empty(), "never forwarded");
}
