//! Hostile clients at the connection level: silent and idle sockets, slow bodies, a full
//! connection table, HTTP/2 floods, and shutdown with a client that ignores pings.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The standard test config with `lines` added to `[server]`.
fn tuned(up: &str, lines: &str) -> String {
    config_tuned(up, lines, "", "")
}

/// Reads (and throws away) until the server closes the connection; returns when it did, or
/// panics past `within`. A reset counts as closed.
async fn wait_closed(conn: &mut TcpStream, within: Duration) -> Instant {
    let mut sink = vec![0u8; 16 * 1024];
    tokio::time::timeout(within, async {
        loop {
            match conn.read(&mut sink).await {
                Ok(0) | Err(_) => return Instant::now(),
                Ok(_) => {}
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the server kept the connection open past {within:?}"))
}

async fn connect(proxy: &Proxy) -> TcpStream {
    TcpStream::connect(proxy.addr()).await.expect("connect")
}

/// Reads one HTTP/1.1 response with a `content-length` body: (head, body).
async fn read_response(conn: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let read = async {
        loop {
            if let Some(at) = memchr::memmem::find(&buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..at + 4]).into_owned();
                let length = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .find(|(n, _)| n.trim().eq_ignore_ascii_case("content-length"))
                    .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                if buf.len() >= at + 4 + length {
                    return (head, buf[at + 4..at + 4 + length].to_vec());
                }
            }
            let n = conn.read(&mut chunk).await.expect("read");
            assert!(
                n > 0,
                "closed mid-response: {}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("a response within 10 s")
}

/// The value of a counter or gauge line `series` in `/metrics` (0 when absent).
async fn metric(proxy: &Proxy, series: &str) -> u64 {
    let text = proxy.metrics_text().await;
    assert!(text.contains("# EOF"), "not a metrics page: {text}");
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0, |v| v.trim().parse().expect("a number"))
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
}

// ---- HTTP/2 frames, by hand: what a hostile client sends is not what a library lets it.

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame length");
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK block for `GET /healthz` (static-table method and scheme, literal path and
/// authority, no Huffman).
fn healthz_block() -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x04, 8];
    block.extend_from_slice(b"/healthz");
    block.extend_from_slice(&[0x01, 9]);
    block.extend_from_slice(b"127.0.0.1");
    block
}

/// The preface, an empty SETTINGS and the ACK of the server's.
fn h2_start() -> Vec<u8> {
    let mut out = PREFACE.to_vec();
    out.extend(frame(SETTINGS, 0, 0, &[]));
    out.extend(frame(SETTINGS, ACK, 0, &[]));
    out
}

/// Reads one frame: (type, flags, stream, payload); `None` at the end of the connection.
async fn read_frame(conn: &mut TcpStream) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    conn.read_exact(&mut head).await.ok()?;
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    conn.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], stream, payload))
}

/// Reads frames until stream `stream` ends (a frame with `END_STREAM`); never answers a ping.
async fn read_until_stream_ends(conn: &mut TcpStream, stream: u32) {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let (kind, flags, id, _) = read_frame(conn).await.expect("a frame");
            if id == stream && matches!(kind, HEADERS | DATA) && flags & END_STREAM != 0 {
                return;
            }
        }
    })
    .await
    .expect("the stream ended within 10 s");
}

/// Reads frames to the end of the connection; returns whether a GOAWAY came, and when it ended.
async fn goaway_then_closed(conn: &mut TcpStream, within: Duration) -> (bool, Instant) {
    tokio::time::timeout(within, async {
        let mut goaway = false;
        while let Some((kind, ..)) = read_frame(conn).await {
            goaway |= kind == GOAWAY;
        }
        (goaway, Instant::now())
    })
    .await
    .unwrap_or_else(|_| panic!("the server kept the HTTP/2 connection open past {within:?}"))
}

#[tokio::test]
async fn a_silent_socket_is_closed_after_header_read_timeout() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&tuned(&up.url, "header_read_timeout = \"300ms\"")).await;
    let started = Instant::now();
    let mut conn = connect(&proxy).await;
    let closed = wait_closed(&mut conn, Duration::from_secs(5)).await;
    let after = closed - started;
    assert!(
        after >= Duration::from_millis(250),
        "closed after {after:?}"
    );
    // Half a head is no better than nothing: the clock runs from accept.
    let started = Instant::now();
    let mut conn = connect(&proxy).await;
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: a\r\n")
        .await
        .expect("write");
    let closed = wait_closed(&mut conn, Duration::from_secs(5)).await;
    assert!(closed - started >= Duration::from_millis(250));
    proxy.assert_healthy().await;
    assert!(up.requests().is_empty());
    assert_eq!(
        metric(
            &proxy,
            "mantlegate_client_connections_closed_total{reason=\"header_read_timeout\"}"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn an_http2_preface_alone_is_closed_after_header_read_timeout() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&tuned(&up.url, "header_read_timeout = \"300ms\"")).await;
    let started = Instant::now();
    let mut conn = connect(&proxy).await;
    conn.write_all(PREFACE).await.expect("write");
    let closed = wait_closed(&mut conn, Duration::from_secs(5)).await;
    assert!(closed - started >= Duration::from_millis(250));
}

#[tokio::test]
async fn http2_settings_without_a_stream_are_closed_with_goaway_after_header_read_timeout() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&tuned(&up.url, "header_read_timeout = \"300ms\"")).await;
    let started = Instant::now();
    let mut conn = connect(&proxy).await;
    conn.write_all(&h2_start()).await.expect("write");
    // Even pings keep nothing open: only a stream with complete headers counts.
    conn.write_all(&frame(PING, 0, 0, &[0; 8]))
        .await
        .expect("ping");
    let (goaway, closed) = goaway_then_closed(&mut conn, Duration::from_secs(5)).await;
    assert!(goaway, "closed with GOAWAY");
    assert!(closed - started >= Duration::from_millis(250));
    // A stream begun but whose headers never end is not one either.
    let mut conn = connect(&proxy).await;
    conn.write_all(&h2_start()).await.expect("write");
    conn.write_all(&frame(HEADERS, 0, 1, &healthz_block()[..4]))
        .await
        .expect("headers");
    wait_closed(&mut conn, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn an_idle_http1_keep_alive_connection_is_closed_after_idle_timeout_not_before() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&tuned(
        &up.url,
        "header_read_timeout = \"300ms\"\nidle_timeout = \"1s\"",
    ))
    .await;
    let mut conn = connect(&proxy).await;
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .expect("write");
    let (head, _) = read_response(&mut conn).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let answered = Instant::now();
    let closed = wait_closed(&mut conn, Duration::from_secs(5)).await;
    let idle = closed - answered;
    // Idle, not a slow head: header_read_timeout (300 ms) does not apply between requests.
    assert!(idle >= Duration::from_millis(700), "closed after {idle:?}");
}

#[tokio::test]
async fn a_slow_head_on_a_keep_alive_connection_is_cut_after_header_read_timeout() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&tuned(
        &up.url,
        "header_read_timeout = \"300ms\"\nidle_timeout = \"10s\"",
    ))
    .await;
    let mut conn = connect(&proxy).await;
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .expect("write");
    let (head, _) = read_response(&mut conn).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let started = Instant::now();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost")
        .await
        .expect("write");
    let closed = wait_closed(&mut conn, Duration::from_secs(5)).await;
    let after = closed - started;
    assert!(
        after >= Duration::from_millis(250) && after < Duration::from_secs(5),
        "closed after {after:?}"
    );
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_with_goaway_after_idle_timeout() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&tuned(
        &up.url,
        "header_read_timeout = \"5s\"\nidle_timeout = \"600ms\"",
    ))
    .await;
    let mut conn = connect(&proxy).await;
    let mut hello = h2_start();
    hello.extend(frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &healthz_block(),
    ));
    conn.write_all(&hello).await.expect("write");
    read_until_stream_ends(&mut conn, 1).await;
    let answered = Instant::now();
    let (goaway, closed) = goaway_then_closed(&mut conn, Duration::from_secs(5)).await;
    assert!(goaway, "closed with GOAWAY");
    let idle = closed - answered;
    assert!(idle >= Duration::from_millis(450), "closed after {idle:?}");
}

/// A request head with `content-length: 100`, then only `{`.
fn slow_head(expect_continue: bool) -> String {
    format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\nauthorization: Bearer {CHAT_KEY}\r\ncontent-type: application/json\r\ncontent-length: 100\r\n{}\r\n",
        if expect_continue {
            "expect: 100-continue\r\n"
        } else {
            ""
        }
    )
}

#[tokio::test]
async fn a_slow_body_gets_408_request_timeout_the_connection_closed_and_a_ledger_row() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&tuned(&up.url, "request_body_timeout = \"500ms\"")).await;
    let mut conn = connect(&proxy).await;
    conn.write_all(slow_head(false).as_bytes())
        .await
        .expect("head");
    conn.write_all(b"{").await.expect("body");
    let started = Instant::now();
    let (head, body) = read_response(&mut conn).await;
    assert!(started.elapsed() >= Duration::from_millis(200));
    assert!(head.starts_with("HTTP/1.1 408 "), "{head}");
    assert_eq!(header(&head, "connection"), Some("close"), "{head}");
    assert_eq!(
        header(&head, "content-type"),
        Some("application/json"),
        "{head}"
    );
    let v: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    let error = &v["error"];
    assert_eq!(error["code"], "request_timeout", "{v}");
    assert_eq!(error["type"], "invalid_request_error", "{v}");
    assert!(error["param"].is_null(), "{v}");
    assert!(
        error["message"]
            .as_str()
            .is_some_and(|m| m.contains("server.request_body_timeout")),
        "{v}"
    );
    wait_closed(&mut conn, Duration::from_secs(5)).await;
    let id = header(&head, "x-request-id").expect("x-request-id");
    let record = proxy.record_of(1, id).await;
    assert_eq!(record["status"], 408);
    assert_eq!(record["outcome"], "rejected");
    assert_eq!(record["error_code"], "request_timeout");
    assert_eq!(record["key_name"], "chatbot-backend");
    assert_eq!(record["project_name"], "Chatbot");
    assert!(up.requests().is_empty(), "nothing reached the upstream");
}

#[tokio::test]
async fn bodies_still_arriving_do_not_take_max_in_flight_slots() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&tuned(
        &up.url,
        "max_in_flight = 20\nrequest_body_timeout = \"20s\"",
    ))
    .await;
    let mut slow = Vec::new();
    for _ in 0..21 {
        let mut conn = connect(&proxy).await;
        conn.write_all(slow_head(true).as_bytes())
            .await
            .expect("head");
        // hyper says `100 Continue` when the handler starts reading the body: the call is
        // past every check that comes before its body.
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut byte))
                .await
                .expect("an answer within 10 s")
                .expect("read");
            assert_eq!(n, 1, "closed: {}", String::from_utf8_lossy(&got));
            got.push(byte[0]);
        }
        assert!(
            got.starts_with(b"HTTP/1.1 100 Continue"),
            "{}",
            String::from_utf8_lossy(&got)
        );
        conn.write_all(b"{").await.expect("body");
        slow.push(conn);
    }
    let r = proxy.chat(CHAT_KEY).await;
    assert_eq!(r.status(), 200, "an honest call is served");
    r.bytes().await.expect("body");
    assert_eq!(up.requests().len(), 1);
    assert_eq!(up.single().body, CHAT_BODY.as_bytes());
}

#[tokio::test]
async fn a_full_connection_table_of_silent_sockets_closes_the_oldest_and_healthz_answers() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&tuned(
        &up.url,
        "max_connections = 20\nheader_read_timeout = \"30s\"",
    ))
    .await;
    let mut silent = Vec::new();
    for _ in 0..30 {
        silent.push(connect(&proxy).await);
    }
    proxy.assert_healthy().await;
    let r = proxy.chat(CHAT_KEY).await;
    assert_eq!(r.status(), 200);
    // The longest idle went first.
    wait_closed(&mut silent[0], Duration::from_secs(5)).await;
    wait_closed(&mut silent[9], Duration::from_secs(5)).await;
    let evicted = metric(
        &proxy,
        "mantlegate_client_connections_closed_total{reason=\"evicted\"}",
    )
    .await;
    assert!(evicted >= 10, "{evicted} evicted");
    assert!(metric(&proxy, "mantlegate_client_connections").await <= 21);
}

#[tokio::test]
async fn an_http2_rapid_reset_flood_does_not_take_the_server_down() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&tuned(&up.url, "idle_timeout = \"2s\"")).await;
    let conn = connect(&proxy).await;
    let (mut reader, mut writer) = conn.into_split();
    let drain = tokio::spawn(async move {
        let mut sink = vec![0u8; 16 * 1024];
        while matches!(reader.read(&mut sink).await, Ok(n) if n > 0) {}
    });
    let mut flood = h2_start();
    let block = healthz_block();
    for i in 0..20_000u32 {
        let id = 1 + 2 * i;
        flood.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
        flood.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
    }
    // The server may close the connection part way: that is one way to survive it.
    let _ = writer.write_all(&flood).await;
    proxy.assert_healthy().await;
    let r = proxy.chat(CHAT_KEY).await;
    assert_eq!(r.status(), 200);
    tokio::time::timeout(Duration::from_secs(10), drain)
        .await
        .expect("the flooding connection was closed within 10 s")
        .expect("reader");
}

#[tokio::test]
async fn a_continuation_flood_is_cut_off_with_bounded_memory() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&tuned(&up.url, "header_read_timeout = \"2s\"")).await;
    let before = peak_rss_kib();
    let mut conn = connect(&proxy).await;
    conn.write_all(&h2_start()).await.expect("start");
    conn.write_all(&frame(HEADERS, 0, 1, &healthz_block()))
        .await
        .expect("headers");
    // A literal header repeated: every fragment is valid HPACK on its own.
    let mut fragment = Vec::new();
    while fragment.len() < 16_000 {
        fragment.extend_from_slice(&[0x00, 3, b'x', b'-', b'a', 8]);
        fragment.extend_from_slice(b"aaaaaaaa");
    }
    let continuation = frame(CONTINUATION, 0, 1, &fragment);
    let limit: usize = 512 * 1024 * 1024;
    let mut sent = 0;
    let cut = tokio::time::timeout(Duration::from_secs(20), async {
        while sent < limit {
            if conn.write_all(&continuation).await.is_err() {
                return true;
            }
            sent += continuation.len();
        }
        false
    })
    .await
    .expect("the flood ended within 20 s");
    assert!(
        cut,
        "the server took all {sent} bytes of CONTINUATION frames"
    );
    report(&format!(
        "CONTINUATION flood cut off after {} KiB",
        sent / 1024
    ));
    let grown_mib = peak_rss_kib().saturating_sub(before) / 1024;
    assert!(grown_mib < 128, "peak memory grew by {grown_mib} MiB");
    proxy.assert_healthy().await;
}

#[tokio::test]
async fn a_slow_http2_upload_gets_408_and_holds_no_in_flight_slot() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&tuned(
        &up.url,
        "max_in_flight = 1\nrequest_body_timeout = \"1s\"",
    ))
    .await;
    let tcp = connect(&proxy).await;
    let (client, connection) = h2::client::handshake(tcp).await.expect("handshake");
    tokio::spawn(connection);
    let request = |length: usize| {
        axum::http::Request::post(format!("{}/v1/chat/completions", proxy.url))
            .header("authorization", format!("Bearer {CHAT_KEY}"))
            .header("content-type", "application/json")
            .header("content-length", length)
            .body(())
            .expect("request")
    };
    let mut client = client.ready().await.expect("ready");
    let (slow, mut slow_body) = client.send_request(request(100), false).expect("send");
    slow_body
        .send_data(Bytes::from_static(b"{"), false)
        .expect("data");
    // On the same connection, after it: served while the slow one is still uploading.
    let mut client = client.ready().await.expect("ready");
    let (honest, mut honest_body) = client
        .send_request(request(CHAT_BODY.len()), false)
        .expect("send");
    honest_body
        .send_data(Bytes::from_static(CHAT_BODY.as_bytes()), true)
        .expect("data");
    let honest = tokio::time::timeout(Duration::from_secs(10), honest)
        .await
        .expect("answered")
        .expect("response");
    assert_eq!(honest.status(), 200);
    let slow = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("answered")
        .expect("response");
    assert_eq!(slow.status(), 408);
    let id = slow.headers()["x-request-id"]
        .to_str()
        .expect("id")
        .to_owned();
    let mut body = slow.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        bytes.extend_from_slice(&chunk.expect("chunk"));
    }
    let v: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
    assert_eq!(v["error"]["code"], "request_timeout", "{v}");
    let record = proxy.record_of(2, &id).await;
    assert_eq!(record["status"], 408);
    assert_eq!(record["error_code"], "request_timeout");
    assert_eq!(up.requests().len(), 1, "only the honest call went upstream");
}

#[tokio::test]
async fn shutdown_closes_idle_connections_at_once_even_an_http2_client_ignoring_pings() {
    use mantlegate::config::Config;
    use mantlegate::state::{AppState, Snapshot};
    let up = FakeUpstream::start().await;
    let config = Config::from_toml(&tuned(&up.url, "idle_timeout = \"1h\"")).expect("config");
    let snapshot = Snapshot::build(&config, Some(UPSTREAM_KEY)).expect("snapshot");
    let state = AppState::new(snapshot, config.upstream.connect_timeout).expect("state");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(mantlegate::serve(
        listener,
        state,
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(30),
    ));
    // An HTTP/2 client that has had its answer, and will never answer a ping.
    let mut h2 = TcpStream::connect(addr).await.expect("connect");
    let mut hello = h2_start();
    hello.extend(frame(
        HEADERS,
        END_HEADERS | END_STREAM,
        1,
        &healthz_block(),
    ));
    h2.write_all(&hello).await.expect("write");
    read_until_stream_ends(&mut h2, 1).await;
    // An idle HTTP/1 keep-alive connection.
    let mut h1 = TcpStream::connect(addr).await.expect("connect");
    h1.write_all(b"GET /healthz HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .expect("write");
    let (head, _) = read_response(&mut h1).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    let started = Instant::now();
    stop.send(()).expect("stop");
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("serve returned within 5 s, not at the 30 s drain timeout")
        .expect("task")
        .expect("serve");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(3), "shutdown took {took:?}");
    let (goaway, _) = goaway_then_closed(&mut h2, Duration::from_secs(5)).await;
    assert!(goaway, "the HTTP/2 client was told with GOAWAY");
    wait_closed(&mut h1, Duration::from_secs(5)).await;
}
