//! Live reloads and the bill: a reload is in force for every call forwarded after it, and
//! budgets carry across reloads exactly (calls in flight, calls staged, budgets added).

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The test config with the upstream key read from `upstream.key` beside it (as
/// `spawn_proxy_from_file` writes it), `marker` a tag value of Chatbot that reloads change.
fn file_config(up: &str, marker: &str, extra: &str) -> String {
    config(up, "reject", extra)
        .replace(
            "tags = { Team = \"CX\" }",
            &format!("tags = {{ Team = \"CX\", Version = \"{marker}\" }}"),
        )
        .replace(
            "response_timeout = \"1s\"",
            "response_timeout = \"5s\"\napi_key_file = \"upstream.key\"",
        )
}

/// A chat call that uses exactly `max_tokens` output tokens at the fake upstream.
fn capped(max_tokens: u64) -> String {
    format!(
        r#"{{"model":"openai.gpt-oss-120b","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"hi"}}]}}"#
    )
}

const STREAM_BODY: &str =
    r#"{"model":"openai.gpt-oss-120b","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;

/// A block budget on Chatbot.
fn block_budget(limit: &str) -> String {
    format!(
        "[[budgets]]\nname = \"chatbot-monthly\"\nproject = \"Chatbot\"\nmonthly_usd = \"{limit}\"\naction = \"block\"\n"
    )
}

/// A request whose head the proxy has taken in (it asked for the body with
/// `100 Continue`, so its handler is running) and whose body is still to come.
struct Staged {
    conn: TcpStream,
    body: Vec<u8>,
}

/// Sends a chat call's head with `expect: 100-continue` and waits for the proxy to ask for
/// the body.
async fn stage(proxy: &Proxy, key: &str, project: Option<&str>, body: &str) -> Staged {
    let mut conn = TcpStream::connect(proxy.addr()).await.expect("connect");
    let project = project.map_or(String::new(), |p| format!("openai-project: {p}\r\n"));
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: a\r\nauthorization: Bearer {key}\r\n{project}content-type: application/json\r\ncontent-length: {}\r\nexpect: 100-continue\r\nconnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await.expect("head");
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .expect("the proxy asks for the body within 10 s")
            .expect("read");
        assert!(n > 0, "closed before asking for the body: {got:?}");
        got.extend_from_slice(&buf[..n]);
    }
    let interim = String::from_utf8_lossy(&got);
    assert!(interim.starts_with("HTTP/1.1 100 "), "{interim}");
    Staged {
        conn,
        body: body.as_bytes().to_vec(),
    }
}

impl Staged {
    /// Sends the body; returns the status and the body of the answer.
    async fn finish(mut self) -> (u16, Vec<u8>) {
        self.conn.write_all(&self.body).await.expect("body");
        let mut all = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), self.conn.read_to_end(&mut all))
            .await
            .expect("answered within 10 s")
            .expect("read");
        let split = all
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a whole head");
        let head = String::from_utf8_lossy(&all[..split]).into_owned();
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        (status, all[split + 4..].to_vec())
    }
}

/// The OpenAI error code in an answer body (with content-length, as errors are sent).
fn code_of(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("JSON error");
    v["error"]["code"].as_str().expect("code").to_owned()
}

/// Stages a call, swaps in `reloaded` with a reload, finishes the call: it is refused with
/// `status` and `code`, nothing reaches the upstream, and its ledger row says so.
async fn refused_after_reload(
    key: &str,
    project: Option<&str>,
    next_config: impl Fn(&str) -> String,
    status: u16,
    code: &str,
    key_name: &str,
) {
    let up = FakeUpstream::start().await;
    let (proxy, reloader, path) = spawn_proxy_from_file(&file_config(&up.url, "v0", "")).await;
    // The key works before the reload.
    let staged = stage(&proxy, key, project, CHAT_BODY).await;
    std::fs::write(&path, next_config(&up.url)).expect("write");
    assert!(reloader.reload("test"), "the new config is valid");
    let (got, body) = staged.finish().await;
    assert_eq!(got, status, "{}", String::from_utf8_lossy(&body));
    assert_eq!(code_of(&body), code);
    assert!(up.requests().is_empty(), "nothing was forwarded");
    proxy.wait_for_records(1).await;
    let rows = proxy.records();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["status"], i64::from(status));
    assert_eq!(rows[0]["error_code"], code);
    assert_eq!(rows[0]["outcome"], "rejected");
    assert_eq!(rows[0]["key_name"], key_name);
    assert_eq!(rows[0]["cost_pico"], 0, "{}", rows[0]);
    assert!(
        rows[0]["model"].is_null(),
        "refused before its body was parsed: {}",
        rows[0]
    );
}

#[tokio::test]
async fn a_key_disabled_while_its_body_arrives_is_refused() {
    refused_after_reload(
        CHAT_KEY,
        None,
        |up| {
            file_config(up, "v1", "").replace(
                "projects = [\"Chatbot\"]\n",
                "projects = [\"Chatbot\"]\ndisabled = true\n",
            )
        },
        401,
        "invalid_api_key",
        "chatbot-backend",
    )
    .await;
}

#[tokio::test]
async fn a_key_expired_by_a_reload_while_its_body_arrives_is_refused() {
    refused_after_reload(
        CHAT_KEY,
        None,
        |up| {
            file_config(up, "v1", "").replace(
                "projects = [\"Chatbot\"]\n",
                "projects = [\"Chatbot\"]\nexpires_at = \"2020-01-01T00:00:00Z\"\n",
            )
        },
        401,
        "invalid_api_key",
        "chatbot-backend",
    )
    .await;
}

#[tokio::test]
async fn a_key_removed_while_its_body_arrives_is_refused() {
    refused_after_reload(
        CHAT_KEY,
        None,
        |up| file_config(up, "v1", "").replace(&sha(CHAT_KEY), &sha("mg-another-key")),
        401,
        "invalid_api_key",
        "chatbot-backend",
    )
    .await;
}

#[tokio::test]
async fn a_grant_removed_while_the_body_arrives_is_refused() {
    refused_after_reload(
        SEARCH_KEY,
        Some("proj_chat"),
        |up| {
            file_config(up, "v1", "").replace(
                "projects = [\"Search\", \"Chatbot\"]",
                "projects = [\"Search\"]",
            )
        },
        403,
        "project_forbidden",
        "search-team",
    )
    .await;
}

/// `GET /admin/v1/budgets`' entry for `name`.
async fn budget_status(proxy: &Proxy, name: &str) -> serde_json::Value {
    let r = client()
        .get(format!("{}/admin/v1/budgets", proxy.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let body: serde_json::Value =
        serde_json::from_slice(&r.bytes().await.expect("body")).expect("json");
    body["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|b| b["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no budget {name}: {body}"))
}

/// The ledger's spend of every row, in pico-dollars, and as the admin API writes USD.
fn ledger_spend(proxy: &Proxy) -> (i64, String) {
    let pico: i64 = proxy
        .records()
        .iter()
        .filter_map(|r| r["cost_pico"].as_i64())
        .sum();
    (
        pico,
        mantlegate::pricing::from_pico(pico).normalize().to_string(),
    )
}

#[tokio::test]
async fn streams_in_flight_across_a_reload_settle_into_the_continuing_budget() {
    let up = FakeUpstream::start().await;
    up.controls.gate.store(true, Ordering::SeqCst);
    let budget = "[[budgets]]\nname = \"chatbot-monthly\"\nproject = \"Chatbot\"\nmonthly_usd = \"100\"\naction = \"alert\"\n";
    let (proxy, reloader, path) = spawn_proxy_from_file(&file_config(&up.url, "v0", budget)).await;
    let proxy = Arc::new(proxy);
    // Ten streams, each holding its first event until the gate opens.
    let mut streams = Vec::new();
    for _ in 0..10 {
        let mut r = proxy.chat_body(CHAT_KEY, STREAM_BODY).await;
        assert_eq!(r.status(), 200);
        let first = tokio::time::timeout(Duration::from_secs(10), r.chunk())
            .await
            .expect("first event within 10 s")
            .expect("read");
        assert!(first.is_some(), "a first event");
        streams.push(r);
    }
    let held = budget_status(&proxy, "chatbot-monthly").await;
    assert_ne!(held["reserved_usd"], "0", "the streams hold reservations");
    std::fs::write(&path, file_config(&up.url, "v1", budget)).expect("write");
    assert!(reloader.reload("test"));
    // Open the gate: every stream waiting at it, or about to, goes on.
    up.controls.gate.store(false, Ordering::SeqCst);
    let drained = tokio::spawn(async move {
        for mut r in streams {
            while r.chunk().await.expect("read").is_some() {}
        }
    });
    tokio::pin!(drained);
    let mut done = false;
    for _ in 0..100 {
        up.controls.release.notify_waiters();
        if let Ok(joined) = tokio::time::timeout(Duration::from_millis(100), &mut drained).await {
            joined.expect("streams");
            done = true;
            break;
        }
    }
    assert!(done, "the streams ended within 10 s");
    assert_eq!(up.requests().len(), 10);
    proxy.wait_for_records(10).await;
    let (pico, usd) = ledger_spend(&proxy);
    assert!(pico > 0, "the streams cost something");
    let status = budget_status(&proxy, "chatbot-monthly").await;
    assert_eq!(status["reserved_usd"], "0", "nothing in flight: {status}");
    assert_eq!(status["spend_usd"], usd.as_str(), "{status}");
}

#[tokio::test]
async fn calls_staged_across_a_reload_cannot_take_a_block_budget_past_its_limit() {
    let up = FakeUpstream::start().await;
    // Each call reserves and costs about $0.06: room for ten.
    let budget = block_budget("0.61");
    let (proxy, reloader, path) = spawn_proxy_from_file(&file_config(&up.url, "v0", &budget)).await;
    let proxy = Arc::new(proxy);
    let body = capped(100_000);
    let mut staged = Vec::new();
    for _ in 0..10 {
        staged.push(stage(&proxy, CHAT_KEY, None, &body).await);
    }
    std::fs::write(&path, file_config(&up.url, "v1", &budget)).expect("write");
    assert!(reloader.reload("test"));
    let mut calls = Vec::new();
    for s in staged {
        calls.push(tokio::spawn(async move { s.finish().await.0 }));
    }
    for _ in 0..10 {
        let (proxy, body) = (proxy.clone(), body.clone());
        calls.push(tokio::spawn(async move {
            let r = proxy.chat_body(CHAT_KEY, body).await;
            let status = r.status().as_u16();
            r.bytes().await.expect("body");
            status
        }));
    }
    let mut admitted = 0;
    for c in calls {
        match c.await.expect("join") {
            200 => admitted += 1,
            429 => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(admitted, 10, "the calls the budget has room for");
    assert_eq!(up.requests().len(), 10);
    proxy.wait_for_records(20).await;
    let (pico, _) = ledger_spend(&proxy);
    // The limit and at most one call's reservation ($0.0600040) beyond it.
    assert!(pico <= 670_004_000_000, "spent {pico} pico-dollars");
    let status = budget_status(&proxy, "chatbot-monthly").await;
    assert_eq!(status["reserved_usd"], "0");
    assert_eq!(status["spend_usd"], ledger_spend(&proxy).1.as_str());
}

/// Makes `n` calls of about $0.06 each on Chatbot, all answered 200.
async fn spend(proxy: &Proxy, n: usize) {
    for _ in 0..n {
        let r = proxy.chat_body(CHAT_KEY, capped(100_000)).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
    }
}

#[tokio::test]
async fn a_budget_added_by_reload_starts_from_the_ledgers_spend() {
    let up = FakeUpstream::start().await;
    let (proxy, reloader, path) = spawn_proxy_from_file(&file_config(&up.url, "v0", "")).await;
    spend(&proxy, 3).await;
    proxy.wait_for_records(3).await;
    let (_, usd) = ledger_spend(&proxy);
    assert_eq!(usd, "0.1800045");
    std::fs::write(&path, file_config(&up.url, "v1", &block_budget("0.1"))).expect("write");
    assert!(reloader.reload("test"));
    let status = budget_status(&proxy, "chatbot-monthly").await;
    assert_eq!(status["spend_usd"], "0.1800045", "{status}");
    assert_eq!(status["percent"], "180", "{status}");
    let r = proxy.chat_body(CHAT_KEY, capped(10)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(error_of(r).await["code"], "budget_exceeded");
    assert_eq!(up.requests().len(), 3, "the refused call was not forwarded");
    proxy.wait_for_records(4).await;
    let rows = proxy.records();
    assert_eq!(rows[3]["status"], 429);
    assert_eq!(rows[3]["error_code"], "budget_exceeded");
}

#[tokio::test]
async fn a_budget_removed_then_readded_is_reseeded_from_the_ledger() {
    let up = FakeUpstream::start().await;
    let budget = block_budget("0.5");
    let (proxy, reloader, path) = spawn_proxy_from_file(&file_config(&up.url, "v0", &budget)).await;
    spend(&proxy, 2).await;
    // A config read half-written: everything but its budgets.
    std::fs::write(&path, file_config(&up.url, "v0", "")).expect("write");
    assert!(reloader.reload("test"));
    spend(&proxy, 3).await;
    proxy.wait_for_records(5).await;
    std::fs::write(&path, file_config(&up.url, "v0", &budget)).expect("write");
    assert!(reloader.reload("test"));
    let status = budget_status(&proxy, "chatbot-monthly").await;
    let (_, usd) = ledger_spend(&proxy);
    assert_eq!(usd, "0.3000075");
    assert_eq!(status["spend_usd"], usd.as_str(), "{status}");
    assert_eq!(status["reserved_usd"], "0");
    // $0.30 spent: a call that may cost $0.24 does not fit in $0.50.
    let r = proxy.chat_body(CHAT_KEY, capped(400_000)).await;
    assert_eq!(r.status(), 429);
    assert_eq!(error_of(r).await["code"], "budget_exceeded");
    assert_eq!(up.requests().len(), 5);
}
