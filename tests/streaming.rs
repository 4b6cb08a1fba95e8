//! Streams are relayed event by event, unchanged, and never buffered.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;

fn stream_request(proxy: &Proxy, path: &str, body: &'static str) -> reqwest::RequestBuilder {
    client()
        .post(format!("{}{path}", proxy.url))
        .bearer_auth(CHAT_KEY)
        .header("content-type", "application/json")
        .body(body)
}

const CHAT_STREAM: &str =
    r#"{"model":"openai.gpt-oss-120b","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
const RESPONSES_STREAM: &str = r#"{"model":"openai.gpt-oss-120b","stream":true,"input":"hi"}"#;

#[tokio::test]
async fn first_event_arrives_before_the_upstream_sends_the_rest() {
    let up = FakeUpstream::start().await;
    up.controls.gate.store(true, Ordering::SeqCst);
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let r = stream_request(&proxy, "/v1/chat/completions", CHAT_STREAM)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    assert_eq!(r.headers()["x-mantlegate-project"], "proj_chat");
    let mut body = r.bytes_stream();
    // The upstream is holding every event but the first until released: if the proxy
    // buffered, this read would never complete.
    let first = tokio::time::timeout(Duration::from_secs(10), body.next())
        .await
        .expect("first event relayed while the upstream holds the rest")
        .expect("a chunk")
        .expect("no error");
    assert!(first.starts_with(b"data: {"), "{first:?}");
    assert!(!up.controls.last_event_sent.load(Ordering::SeqCst));
    up.controls.release.notify_one();
    let mut rest = Vec::new();
    while let Some(chunk) = body.next().await {
        rest.extend_from_slice(&chunk.expect("chunk"));
    }
    let mut all = first.to_vec();
    all.extend_from_slice(&rest);
    assert_eq!(
        all,
        chat_events().concat().into_bytes(),
        "relayed byte for byte"
    );
}

#[tokio::test]
async fn events_200ms_apart_reach_the_client_as_they_are_sent() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let r = stream_request(&proxy, "/v1/responses", RESPONSES_STREAM)
        .header("x-test-event-gap-ms", "200")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let first = body.next().await.expect("chunk").expect("ok");
    assert!(first.starts_with(b"event: response.created"));
    // Five more events, 200 ms apart, are still to be sent by the upstream.
    assert!(!up.controls.last_event_sent.load(Ordering::SeqCst));
    let mut all = first.to_vec();
    while let Some(chunk) = body.next().await {
        all.extend_from_slice(&chunk.expect("chunk"));
    }
    assert!(up.controls.last_event_sent.load(Ordering::SeqCst));
    assert_eq!(all, responses_events().concat().into_bytes());
}

#[tokio::test]
async fn client_hang_up_drops_the_upstream_stream() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let r = stream_request(&proxy, "/v1/chat/completions", CHAT_STREAM)
        .header("x-test-event-gap-ms", "300")
        .send()
        .await
        .expect("send");
    let mut body = r.bytes_stream();
    body.next().await.expect("chunk").expect("ok");
    let abandoned = up.controls.stream_abandoned.notified();
    drop(body);
    // Five more events, 300 ms apart: the upstream stream must be dropped well before its end.
    tokio::time::timeout(Duration::from_secs(10), abandoned)
        .await
        .expect("the proxy dropped the upstream stream after the client left");
    assert!(!up.controls.last_event_sent.load(Ordering::SeqCst));
}
