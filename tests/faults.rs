//! A misbehaving upstream: refused, stalled, reset, malformed, huge, endless, lying, failing.
//! For each: what the client gets, that the proxy stays healthy, and the call's ledger record.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

const CHAT_STREAM: &str =
    r#"{"model":"openai.gpt-oss-120b","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
const CHAT_STREAM_USAGE: &str = r#"{"model":"openai.gpt-oss-120b","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"hi"}]}"#;
const RESPONSES_STREAM: &str = r#"{"model":"openai.gpt-oss-120b","stream":true,"input":"hi"}"#;
const RESPONSES_BODY: &str = r#"{"model":"openai.gpt-oss-120b","input":"hi"}"#;

/// Upper bound for anything a test waits on.
const LIMIT: Duration = Duration::from_secs(10);

/// `[upstream]` lines: quick timeouts and retries for tests.
fn tuned(upstream_url: &str, upstream: &str) -> String {
    config_tuned(
        upstream_url,
        "",
        &format!("retry_backoff = \"10ms\"\n{upstream}"),
        "",
    )
}

async fn post(proxy: &Proxy, path: &str, body: &str) -> reqwest::Response {
    tokio::time::timeout(
        LIMIT,
        client()
            .post(format!("{}{path}", proxy.url))
            .bearer_auth(CHAT_KEY)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send(),
    )
    .await
    .expect("the proxy answered within the limit")
    .expect("send")
}

fn request_id(r: &reqwest::Response) -> String {
    r.headers()["x-request-id"]
        .to_str()
        .expect("ascii id")
        .to_owned()
}

/// Reads a body to its end; the error, when it ended in one instead of a clean end.
async fn read_body(r: reqwest::Response) -> (Vec<u8>, Option<String>) {
    let mut body = r.bytes_stream();
    let mut all = Vec::new();
    loop {
        match tokio::time::timeout(LIMIT, body.next())
            .await
            .expect("the body progressed within the limit")
        {
            None => return (all, None),
            Some(Ok(chunk)) => all.extend_from_slice(&chunk),
            Some(Err(err)) => return (all, Some(format!("{err:?}"))),
        }
    }
}

fn bytes_of(events: &[String]) -> Vec<Vec<u8>> {
    events.iter().map(|e| e.as_bytes().to_vec()).collect()
}

// --- The access log, captured from this process's tracing (for the `retries` field). ---

#[derive(Clone)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn captured_log() -> &'static Captured {
    static LOG: OnceLock<Captured> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Captured(Arc::new(Mutex::new(Vec::new())));
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one global subscriber");
        let access = log.clone();
        mantlegate::logging::set_access_sink(Box::new(move |line| {
            access.0.lock().expect("lock").extend_from_slice(line);
        }));
        log
    })
}

/// The access log line of `request_id` (call after its ledger record exists: the line is
/// written first).
fn access_line(request_id: &str) -> serde_json::Value {
    let text = String::from_utf8_lossy(&captured_log().0.lock().expect("lock")).into_owned();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "access" && v["request_id"] == request_id)
        .unwrap_or_else(|| panic!("no access line for {request_id}"))
}

/// A usage source that is never a silent zero: estimated with some tokens, or missing.
fn assert_not_silent_zero(record: &serde_json::Value) {
    match record["usage_source"].as_str() {
        Some("estimated") => assert!(
            record["input_tokens"].as_i64() > Some(0) || record["output_tokens"].as_i64() > Some(0),
            "an estimate of nothing: {record}"
        ),
        Some("missing") => {}
        other => panic!("usage must be estimated or missing, got {other:?}: {record}"),
    }
}

// --- Connection faults ---

#[tokio::test]
async fn refused_connection_is_retried_then_502() {
    captured_log();
    // A port that was just free: nothing listens there.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", closed.local_addr().expect("addr"));
    drop(closed);
    let proxy = spawn_proxy(&tuned(&url, "retries = 2")).await;
    let r = post(&proxy, "/v1/chat/completions", CHAT_BODY).await;
    assert_eq!(r.status(), 502);
    let id = request_id(&r);
    let e = error_of(r).await;
    assert_eq!(e["code"], "upstream_unavailable");
    let record = proxy.record_of(1, &id).await;
    assert_eq!(record["outcome"], "upstream_error");
    assert_eq!(record["error_code"], "upstream_unavailable");
    assert_eq!(record["status"], 502);
    assert_eq!(access_line(&id)["retries"], 2, "two retries, then 502");
    proxy.assert_healthy().await;
}

#[tokio::test]
async fn stall_before_the_head_is_a_504_after_response_timeout() {
    let up = FaultUpstream::start(vec![Fault::Stall]).await;
    let proxy = spawn_proxy(&tuned(&up.url, "response_timeout = \"300ms\"")).await;
    let started = Instant::now();
    let r = post(&proxy, "/v1/chat/completions", CHAT_BODY).await;
    let waited = started.elapsed();
    assert_eq!(r.status(), 504);
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    let id = request_id(&r);
    assert_eq!(error_of(r).await["code"], "upstream_timeout");
    // The stalled upstream call is dropped, and a timeout is not retried.
    up.wait_hung_up(1, LIMIT).await;
    assert_eq!(up.attempts(), 1);
    let record = proxy.record_of(1, &id).await;
    assert_eq!(record["outcome"], "upstream_error");
    assert_eq!(record["error_code"], "upstream_timeout");
    assert_eq!(record["status"], 504);
    proxy.assert_healthy().await;
}

#[tokio::test]
async fn stall_mid_stream_breaks_the_answer_off_after_idle_timeout() {
    for (path, body, events) in [
        ("/v1/chat/completions", CHAT_STREAM, chat_events()),
        ("/v1/responses", RESPONSES_STREAM, responses_events()),
    ] {
        let sent = bytes_of(&events[..2]);
        let up = FaultUpstream::start(vec![Fault::sse(sent.clone(), StreamEnd::Stall)]).await;
        let proxy = spawn_proxy(&tuned(&up.url, "idle_timeout = \"300ms\"")).await;
        let started = Instant::now();
        let r = post(&proxy, path, body).await;
        assert_eq!(r.status(), 200, "{path}");
        let id = request_id(&r);
        let (got, error) = read_body(r).await;
        let waited = started.elapsed();
        assert!(
            error.is_some(),
            "{path}: the stream breaks off, never a clean end"
        );
        assert_eq!(got, sent.concat(), "{path}: what was sent, then the break");
        assert!(waited >= Duration::from_millis(300), "{path}: {waited:?}");
        up.wait_hung_up(1, LIMIT).await;
        let record = proxy.record_of(1, &id).await;
        assert_eq!(record["outcome"], "upstream_error", "{path}");
        assert_eq!(record["error_code"], "upstream_stalled", "{path}");
        assert_not_silent_zero(&record);
        proxy.assert_healthy().await;
    }
}

#[tokio::test]
async fn reset_mid_stream_truncates_the_answer_and_is_not_retried() {
    for (path, body, events) in [
        ("/v1/chat/completions", CHAT_STREAM, chat_events()),
        ("/v1/chat/completions", CHAT_STREAM_USAGE, chat_events()),
        ("/v1/responses", RESPONSES_STREAM, responses_events()),
    ] {
        let sent = bytes_of(&events[..2]);
        let up = FaultUpstream::start(vec![Fault::sse_held(sent.clone(), StreamEnd::Reset)]).await;
        let proxy = spawn_proxy(&tuned(&up.url, "retries = 2")).await;
        let r = post(&proxy, path, body).await;
        assert_eq!(r.status(), 200, "{path}");
        let id = request_id(&r);
        let mut stream = r.bytes_stream();
        let mut got = Vec::new();
        // Everything sent before the reset reaches the client first...
        while got.len() < sent.concat().len() {
            let chunk = tokio::time::timeout(LIMIT, stream.next())
                .await
                .expect("events relayed")
                .expect("a chunk")
                .expect("no error yet");
            got.extend_from_slice(&chunk);
        }
        assert_eq!(got, sent.concat(), "{path}");
        up.release();
        // ...then the answer breaks off: never a clean end that would pass for a whole stream.
        let end = tokio::time::timeout(LIMIT, stream.next())
            .await
            .expect("the break reached the client");
        assert!(
            matches!(end, Some(Err(_))),
            "{path} {body}: expected a broken body after the upstream reset, got {end:?}"
        );
        let record = proxy.record_of(1, &id).await;
        assert_eq!(record["outcome"], "upstream_error", "{path} {body}");
        assert_not_silent_zero(&record);
        assert_eq!(up.attempts(), 1, "never retried after the first byte");
        proxy.assert_healthy().await;
    }
}

// --- Lying bodies ---

#[tokio::test]
async fn malformed_sse_is_relayed_as_is_and_metered_without_a_silent_zero() {
    let malformed: Vec<Vec<u8>> = vec![
        b": a comment\n\n".to_vec(),
        b"garbage line without a colon\n\n".to_vec(),
        b"data: not json at all\n\n".to_vec(),
        b"event: error\ndata: \"{\\\"type\\\":\\\"error\\\",\\\"message\\\":\\\"boom\\\"}\"\n\n"
            .to_vec(),
        b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\n".to_vec(),
        b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"x\"}\n\n".to_vec(),
        b"data: {\"usage\": {\"prompt_tokens\": \"many\"}, \"choices\": []}\n\n".to_vec(),
        b"data: {truncated\n\n".to_vec(),
        b"\xff\xfe\x00 binary \x01\r\n\r\n".to_vec(),
        b"data: [DONE]\n\n".to_vec(),
        b"data: after the end without a blank line".to_vec(),
    ];
    for (path, body) in [
        ("/v1/chat/completions", CHAT_STREAM),
        ("/v1/chat/completions", CHAT_STREAM_USAGE),
        ("/v1/responses", RESPONSES_STREAM),
    ] {
        let up = FaultUpstream::start(vec![Fault::sse(malformed.clone(), StreamEnd::Finish)]).await;
        let proxy = spawn_proxy(&tuned(&up.url, "")).await;
        let r = post(&proxy, path, body).await;
        assert_eq!(r.status(), 200);
        let id = request_id(&r);
        let (got, error) = read_body(r).await;
        assert_eq!(error, None, "{path} {body}");
        assert_eq!(
            got,
            malformed.concat(),
            "{path} {body}: relayed byte for byte"
        );
        let record = proxy.record_of(1, &id).await;
        assert_eq!(record["outcome"], "forwarded", "{path} {body}");
        assert_not_silent_zero(&record);
        proxy.assert_healthy().await;
    }
}

#[tokio::test]
async fn a_ten_megabyte_event_is_relayed_intact() {
    let content = "x".repeat(10 * 1024 * 1024);
    let huge = format!(
        "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{content}\"}},\"finish_reason\":null}}]}}\n\n"
    );
    drop(content);
    let mut upstream_events = chat_events_with_usage();
    upstream_events.insert(1, huge.clone());
    // What the client asked for: the stream without the usage chunk mantlegate asked for.
    let mut expected_events = chat_events();
    expected_events.insert(1, huge.clone());
    let expected = expected_events.concat().into_bytes();
    let pieces = bytes_of(&upstream_events);
    drop((huge, upstream_events, expected_events));

    let before = peak_rss_kib();
    let up = FaultUpstream::start(vec![Fault::sse(pieces, StreamEnd::Finish)]).await;
    let proxy = spawn_proxy(&tuned(&up.url, "")).await;
    let r = post(&proxy, "/v1/chat/completions", CHAT_STREAM).await;
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let (got, error) = read_body(r).await;
    assert_eq!(error, None);
    assert!(
        got == expected,
        "the 10 MB event arrives intact, usage chunk removed"
    );
    drop(got);
    let record = proxy.record_of(1, &id).await;
    assert_eq!(record["outcome"], "forwarded");
    assert_eq!(record["usage_source"], "reported");
    assert_eq!(record["input_tokens"], 11);
    assert_eq!(record["output_tokens"], 4);
    let grown_mib = peak_rss_kib().saturating_sub(before) / 1024;
    report(&format!(
        "peak RSS grew by {grown_mib} MiB around a 10 MiB event"
    ));
    // The test itself holds the event several times over (upstream plan, expected bytes, the
    // received body); the proxy must add a small multiple of one event, never a blow-up.
    assert!(grown_mib < 200, "peak RSS grew by {grown_mib} MiB");
    proxy.assert_healthy().await;
}

#[tokio::test]
async fn a_stream_that_never_ends_is_broken_off_at_total_timeout() {
    let piece = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"x\"}}]}\n\n".to_vec();
    let up = FaultUpstream::start(vec![Fault::Endless {
        head: SSE_HEAD.to_owned(),
        piece: piece.clone(),
        every: Duration::from_millis(50),
    }])
    .await;
    let proxy = spawn_proxy(&tuned(
        &up.url,
        "idle_timeout = \"5s\"\ntotal_timeout = \"1s\"",
    ))
    .await;
    let started = Instant::now();
    let r = post(&proxy, "/v1/chat/completions", CHAT_STREAM_USAGE).await;
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let (got, error) = read_body(r).await;
    let took = started.elapsed();
    assert!(error.is_some(), "broken off, never a clean end");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(
        !got.is_empty() && got.len() % piece.len() == 0,
        "whole events only"
    );
    up.wait_hung_up(1, LIMIT).await;
    let record = proxy.record_of(1, &id).await;
    assert_eq!(record["outcome"], "upstream_error");
    assert_eq!(record["error_code"], "upstream_total_timeout");
    assert_not_silent_zero(&record);
    proxy.assert_healthy().await;
}

#[tokio::test]
async fn invalid_json_in_a_200_answer_is_relayed_and_never_billed_as_zero() {
    let deep = "[".repeat(1_000_000);
    let bodies = [
        r#"{"id":"chatcmpl-1","object":"chat.completion","usage":{"prompt_tokens":"#,
        "not json at all",
        r#"{"usage":{"prompt_tokens":-5,"completion_tokens":"many"}}"#,
        r#"{"usage":null,"choices":[]}"#,
        &deep,
    ];
    for (path, request) in [
        ("/v1/chat/completions", CHAT_BODY),
        ("/v1/responses", RESPONSES_BODY),
    ] {
        for answer in bodies {
            let up = FaultUpstream::start(vec![Fault::json("200 OK", "", answer)]).await;
            let proxy = spawn_proxy(&tuned(&up.url, "")).await;
            let r = post(&proxy, path, request).await;
            assert_eq!(r.status(), 200);
            let id = request_id(&r);
            let (got, error) = read_body(r).await;
            assert_eq!(error, None);
            let shown = &answer[..answer.len().min(60)];
            assert!(
                got == answer.as_bytes(),
                "{path} {shown}: relayed unchanged"
            );
            let record = proxy.record_of(1, &id).await;
            assert_eq!(record["outcome"], "forwarded", "{path} {shown}");
            assert_not_silent_zero(&record);
            proxy.assert_healthy().await;
        }
    }
}

#[tokio::test]
async fn a_stream_sent_as_text_plain_is_relayed_and_metered() {
    // The client asked for usage itself: nothing of the stream is mantlegate's to change.
    let events = chat_events_with_usage();
    let up = FaultUpstream::start(vec![Fault::Stream {
        head: "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n"
            .to_owned(),
        pieces: bytes_of(&events),
        end: StreamEnd::Finish,
        hold: false,
    }])
    .await;
    let proxy = spawn_proxy(&tuned(&up.url, "")).await;
    let r = post(&proxy, "/v1/chat/completions", CHAT_STREAM_USAGE).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/plain");
    let id = request_id(&r);
    let (got, error) = read_body(r).await;
    assert_eq!(error, None);
    assert_eq!(got, events.concat().into_bytes());
    let record = proxy.record_of(1, &id).await;
    assert_eq!(record["outcome"], "forwarded");
    if record["usage_source"] == "reported" {
        assert_eq!(record["input_tokens"], 11);
        assert_eq!(record["output_tokens"], 4);
    } else {
        assert_not_silent_zero(&record);
    }
    proxy.assert_healthy().await;
}

#[tokio::test]
async fn a_stream_sent_as_text_plain_still_hides_the_injected_usage_chunk() {
    let up = FaultUpstream::start(vec![Fault::Stream {
        head: "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n"
            .to_owned(),
        pieces: bytes_of(&chat_events_with_usage()),
        end: StreamEnd::Finish,
        hold: false,
    }])
    .await;
    let proxy = spawn_proxy(&tuned(&up.url, "")).await;
    let r = post(&proxy, "/v1/chat/completions", CHAT_STREAM).await;
    assert_eq!(r.status(), 200);
    let id = request_id(&r);
    let (got, _) = read_body(r).await;
    assert_eq!(
        String::from_utf8_lossy(&got),
        chat_events().concat(),
        "the client gets the stream it asked for"
    );
    let record = proxy.record_of(1, &id).await;
    assert_eq!(record["usage_source"], "reported");
    assert_eq!(record["input_tokens"], 11);
}

// --- Upstream errors and retries ---

#[tokio::test]
async fn upstream_5xx_is_relayed_with_and_without_a_body() {
    let error_body = r#"{"error":{"message":"upstream broke","type":"server_error","param":null,"code":"boom"}}"#;
    let cases: Vec<(Fault, u16, &[u8])> = vec![
        (
            Fault::json("500 Internal Server Error", "", error_body),
            500,
            error_body.as_bytes(),
        ),
        (
            // No length: the body runs to the end of the connection.
            Fault::Answer {
                head: "HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/html\r\n"
                    .to_owned(),
                body: b"<html>oops</html>".to_vec(),
            },
            500,
            b"<html>oops</html>",
        ),
        (
            Fault::Answer {
                head: "HTTP/1.1 504 Gateway Timeout\r\n".to_owned(),
                body: Vec::new(),
            },
            504,
            b"",
        ),
    ];
    for (fault, status, body) in cases {
        let up = FaultUpstream::start(vec![fault]).await;
        let proxy = spawn_proxy(&tuned(&up.url, "retries = 2")).await;
        let r = post(&proxy, "/v1/chat/completions", CHAT_BODY).await;
        assert_eq!(r.status(), status);
        let id = request_id(&r);
        let (got, error) = read_body(r).await;
        assert_eq!(error, None, "{status}");
        assert_eq!(got, body, "{status}: relayed as sent");
        assert_eq!(up.attempts(), 1, "{status} is not retried");
        let record = proxy.record_of(1, &id).await;
        assert_eq!(record["outcome"], "forwarded", "{status}");
        assert_eq!(record["status"], status);
        proxy.assert_healthy().await;
    }
}

#[tokio::test]
async fn an_empty_answer_is_recorded_as_forwarded() {
    for status in ["200 OK", "502 Bad Gateway"] {
        let up = FaultUpstream::start(vec![Fault::json(status, "", "")]).await;
        let proxy = spawn_proxy(&tuned(&up.url, "")).await;
        let r = post(&proxy, "/v1/chat/completions", CHAT_BODY).await;
        let code = r.status().as_u16();
        assert_eq!(status[..3].parse::<u16>().ok(), Some(code));
        let id = request_id(&r);
        let (got, error) = read_body(r).await;
        assert_eq!((got.len(), error), (0, None), "{status}");
        let record = proxy.record_of(1, &id).await;
        assert_eq!(
            record["outcome"], "forwarded",
            "{status}: the client got it all"
        );
    }
}

fn ok_answer() -> Fault {
    Fault::json(
        "200 OK",
        "",
        r#"{"id":"chatcmpl-9","object":"chat.completion","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#,
    )
}

fn busy(status: &str, headers: &str) -> Fault {
    Fault::json(
        status,
        headers,
        r#"{"error":{"message":"busy","type":"rate_limit_error","param":null,"code":"busy"}}"#,
    )
}

#[tokio::test]
async fn throttling_then_success_is_retried_and_the_client_sees_200() {
    captured_log();
    for (plan, attempts) in [
        (
            vec![
                busy("429 Too Many Requests", ""),
                busy("503 Service Unavailable", ""),
                ok_answer(),
            ],
            3,
        ),
        (vec![busy("503 Service Unavailable", ""), ok_answer()], 2),
    ] {
        let up = FaultUpstream::start(plan).await;
        let proxy = spawn_proxy(&tuned(&up.url, "retries = 2")).await;
        let r = post(&proxy, "/v1/chat/completions", CHAT_BODY).await;
        assert_eq!(r.status(), 200);
        let id = request_id(&r);
        let (got, _) = read_body(r).await;
        assert!(got.starts_with(br#"{"id":"chatcmpl-9""#));
        assert_eq!(up.attempts(), attempts);
        let sent = up.requests();
        assert!(
            sent.iter().all(|r| r.body == sent[0].body),
            "every attempt carries the same body"
        );
        let record = proxy.record_of(1, &id).await;
        assert_eq!(record["outcome"], "forwarded");
        assert_eq!(record["status"], 200);
        assert_eq!(record["usage_source"], "reported");
        assert_eq!(record["input_tokens"], 7);
        assert_eq!(access_line(&id)["retries"], attempts - 1);
        proxy.assert_healthy().await;
    }
}

#[tokio::test]
async fn retry_after_within_retry_max_delay_is_honoured() {
    let up = FaultUpstream::start(vec![
        busy("429 Too Many Requests", "retry-after: 1\r\n"),
        ok_answer(),
    ])
    .await;
    let proxy = spawn_proxy(&tuned(&up.url, "retries = 2\nretry_max_delay = \"5s\"")).await;
    let started = Instant::now();
    let r = post(&proxy, "/v1/chat/completions", CHAT_BODY).await;
    assert_eq!(r.status(), 200);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "waited as asked"
    );
    assert_eq!(up.attempts(), 2);
}

#[tokio::test]
async fn retry_after_beyond_retry_max_delay_is_relayed_at_once() {
    let up = FaultUpstream::start(vec![
        busy("429 Too Many Requests", "retry-after: 100\r\n"),
        ok_answer(),
    ])
    .await;
    let proxy = spawn_proxy(&tuned(&up.url, "retries = 2\nretry_max_delay = \"2s\"")).await;
    let started = Instant::now();
    let r = post(&proxy, "/v1/chat/completions", CHAT_BODY).await;
    assert_eq!(r.status(), 429);
    assert!(started.elapsed() < Duration::from_secs(2), "not waited for");
    assert_eq!(r.headers()["retry-after"], "100", "relayed for the client");
    let id = request_id(&r);
    let (got, _) = read_body(r).await;
    assert!(got.ends_with(br#""code":"busy"}}"#), "the upstream's body");
    assert_eq!(up.attempts(), 1);
    let record = proxy.record_of(1, &id).await;
    assert_eq!(record["status"], 429);
    assert_eq!(record["outcome"], "forwarded");
    proxy.assert_healthy().await;
}

#[tokio::test]
async fn throttling_past_the_retry_budget_relays_the_last_answer() {
    let up = FaultUpstream::start(vec![busy("503 Service Unavailable", "")]).await;
    let proxy = spawn_proxy(&tuned(&up.url, "retries = 2")).await;
    let r = post(&proxy, "/v1/chat/completions", CHAT_BODY).await;
    assert_eq!(r.status(), 503);
    let id = request_id(&r);
    let (got, _) = read_body(r).await;
    assert!(got.ends_with(br#""code":"busy"}}"#), "the upstream's body");
    assert_eq!(up.attempts(), 3, "one attempt and two retries");
    let record = proxy.record_of(1, &id).await;
    assert_eq!(record["status"], 503);

    let up = FaultUpstream::start(vec![busy("503 Service Unavailable", ""), ok_answer()]).await;
    let proxy = spawn_proxy(&tuned(&up.url, "retries = 0")).await;
    let r = post(&proxy, "/v1/chat/completions", CHAT_BODY).await;
    assert_eq!(r.status(), 503, "retries = 0: no retry");
    assert_eq!(up.attempts(), 1);
    proxy.assert_healthy().await;
}
