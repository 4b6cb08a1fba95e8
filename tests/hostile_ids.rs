//! Response ids as an attacker writes them: escaped, double-escaped, another project's, and
//! background responses whose result is seen in every way there is, each billed once.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;

const BACKGROUND: &str = r#"{"model":"openai.gpt-oss-120b","input":"hi","background":true}"#;
const BACKGROUND_STREAM: &str =
    r#"{"model":"openai.gpt-oss-120b","input":"hi","background":true,"stream":true}"#;

/// `resp_bg1`'s reported usage (1000 in, 500 out) at the test prices, in pico-dollars.
const BG1_COST: i64 = 450_000_000;

/// Sends a request with the path exactly as written (no client library would) and returns
/// the status and the `error.code` of the answer.
async fn raw(proxy: &Proxy, method: &str, path: &str, key: &str, body: &str) -> (u16, String) {
    raw_with(proxy, method, path, key, "", body).await
}

/// [`raw`] with extra header lines (each ending in `\r\n`).
async fn raw_with(
    proxy: &Proxy,
    method: &str,
    path: &str,
    key: &str,
    headers: &str,
    body: &str,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: proxy\r\nauthorization: Bearer {key}\r\n{headers}content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(proxy.addr())
        .await
        .expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .expect("answered within 10 s")
        .expect("read");
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let code = text
        .split_once("\r\n\r\n")
        .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(body).ok())
        .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
        .unwrap_or_default();
    (status, code)
}

/// A GET through the proxy that must answer 200; its body is read whole.
async fn get_ok(proxy: &Proxy, path: &str, key: &str) {
    let r = send(proxy, reqwest::Method::GET, path, key, None).await;
    assert_eq!(r.status(), 200, "GET {path}");
    r.bytes().await.expect("body");
}

async fn send(
    proxy: &Proxy,
    method: reqwest::Method,
    path: &str,
    key: &str,
    body: Option<&'static str>,
) -> reqwest::Response {
    let mut request = client()
        .request(method, format!("{}{path}", proxy.url))
        .bearer_auth(key);
    if let Some(body) = body {
        request = request
            .header("content-type", "application/json")
            .body(body);
    }
    request.send().await.expect("send")
}

/// Creates background response `resp_bg1` with `key` and waits until its record is written.
async fn create_background(proxy: &Proxy, key: &str) {
    let r = send(
        proxy,
        reqwest::Method::POST,
        "/v1/responses",
        key,
        Some(BACKGROUND),
    )
    .await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["id"], "resp_bg1");
    assert_eq!(body["status"], "queued");
    proxy.wait_for_records(1).await;
}

fn pending_count(proxy: &Proxy) -> i64 {
    rusqlite::Connection::open(&proxy.db)
        .expect("open")
        .query_row("SELECT COUNT(*) FROM pending_background", [], |r| r.get(0))
        .expect("count")
}

/// `(method, path and query, OpenAI-Project)` of each upstream request.
fn seen(up: &FakeUpstream) -> Vec<(String, String, String)> {
    up.requests()
        .into_iter()
        .map(|r| {
            let project = r
                .headers
                .get("openai-project")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned();
            (r.method.to_string(), r.uri, project)
        })
        .collect()
}

fn triple(method: &str, uri: &str, project: &str) -> (String, String, String) {
    (method.to_owned(), uri.to_owned(), project.to_owned())
}

/// Asserts the row is the one that bills `resp_bg1`'s reported usage.
fn assert_bills_bg1(row: &serde_json::Value) {
    assert_eq!(row["usage_source"], "reported", "{row:#}");
    assert_eq!(row["input_tokens"], 1000, "{row:#}");
    assert_eq!(row["output_tokens"], 500, "{row:#}");
    assert_eq!(row["cost_pico"], BG1_COST, "{row:#}");
    assert_eq!(row["upstream_response_id"], "resp_bg1", "{row:#}");
    assert_eq!(row["model"], "openai.gpt-oss-120b", "{row:#}");
    assert_eq!(row["project_id"], "proj_chat", "{row:#}");
}

fn assert_free(row: &serde_json::Value) {
    assert_eq!(row["usage_source"], "none", "{row:#}");
    assert_eq!(row["input_tokens"], 0, "{row:#}");
    assert_eq!(row["output_tokens"], 0, "{row:#}");
    assert_eq!(row["cost_pico"], 0, "{row:#}");
}

#[tokio::test]
async fn an_escaped_id_bills_the_background_response_and_clears_it_from_pending() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    create_background(&proxy, CHAT_KEY).await;
    assert_eq!(pending_count(&proxy), 1);
    let (status, _) = raw(&proxy, "GET", "/v1/responses/%72esp_bg1", CHAT_KEY, "").await;
    assert_eq!(status, 200);
    // The upstream gets the canonical id, in the creating project.
    assert_eq!(
        seen(&up),
        [
            triple("POST", "/v1/responses", "proj_chat"),
            triple("GET", "/v1/responses/resp_bg1", "proj_chat"),
        ]
    );
    proxy.wait_for_records(2).await;
    let rows = proxy.records();
    assert_eq!(rows.len(), 2);
    assert_free(&rows[0]);
    assert_bills_bg1(&rows[1]);
    assert_eq!(pending_count(&proxy), 0);
    // Seen finished again, under the plain id: free.
    get_ok(&proxy, "/v1/responses/resp_bg1", CHAT_KEY).await;
    proxy.wait_for_records(3).await;
    assert_free(&proxy.records()[2]);
}

#[tokio::test]
async fn another_projects_response_is_not_found_however_its_id_is_written() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    // Created in Search (the search key's first project); the chat key may not use Search.
    create_background(&proxy, SEARCH_KEY).await;
    let attempts = [
        ("GET", "/v1/responses/%72esp_bg1", ""),
        ("GET", "/v1/responses/resp%5Fbg1", ""),
        ("GET", "/v1/responses/resp_bg1", ""),
        ("DELETE", "/v1/responses/%72esp_bg1", ""),
        ("POST", "/v1/responses/%72esp_bg1/cancel", ""),
        ("GET", "/v1/responses/%72esp_bg1/input_items", ""),
        (
            "POST",
            "/v1/responses",
            r#"{"model":"openai.gpt-oss-120b","input":"more","previous_response_id":"resp_bg1"}"#,
        ),
        (
            "POST",
            "/v1/responses",
            r#"{"model":"openai.gpt-oss-120b","input":"more","previous_response_id":"resp\u005fbg1"}"#,
        ),
        (
            "POST",
            "/v1/responses/input_tokens",
            r#"{"model":"openai.gpt-oss-120b","input":"more","previous_response_id":"resp_bg1"}"#,
        ),
    ];
    for (method, path, body) in attempts {
        assert_eq!(
            raw(&proxy, method, path, CHAT_KEY, body).await,
            (404, "response_not_found".to_owned()),
            "{method} {path} {body}"
        );
    }
    assert_eq!(
        seen(&up),
        [triple("POST", "/v1/responses", "proj_search")],
        "nothing of another project's response is forwarded"
    );
    proxy.wait_for_records(1 + attempts.len() as u64).await;
    let rows = proxy.records();
    assert_eq!(rows.len(), 1 + attempts.len());
    for row in &rows[1..] {
        assert_eq!(row["status"], 404, "{row:#}");
        assert_eq!(row["outcome"], "rejected", "{row:#}");
        assert_eq!(row["error_code"], "response_not_found", "{row:#}");
        assert_eq!(row["key_name"], "chatbot-backend", "{row:#}");
    }
    assert_eq!(pending_count(&proxy), 1, "still pending: nobody saw it");

    // The search key, naming Chatbot, builds on it: the call goes where the response lives.
    let (status, _) = raw_with(
        &proxy,
        "POST",
        "/v1/responses",
        SEARCH_KEY,
        "openai-project: proj_chat\r\n",
        r#"{"model":"openai.gpt-oss-120b","input":"more","previous_response_id":"resp\u005fbg1"}"#,
    )
    .await;
    assert_eq!(status, 200);
    let last = up.requests().pop().expect("forwarded");
    assert_eq!(last.uri, "/v1/responses");
    assert_eq!(last.headers["openai-project"], "proj_search");
}

#[tokio::test]
async fn ids_outside_the_id_alphabet_are_400_invalid_path_and_never_forwarded() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let attempts = [
        ("GET", "/v1/responses/resp%2Fbg1", ""),
        ("GET", "/v1/responses/resp%2fbg1/input_items", ""),
        ("GET", "/v1/responses/..", ""),
        ("GET", "/v1/responses/%2e%2e", ""),
        ("DELETE", "/v1/responses/..", ""),
        ("GET", "/v1/responses/resp_bg1%00", ""),
        ("GET", "/v1/responses/%00", ""),
        ("GET", "/v1/responses/r%C3%A9sp_1", ""),
        ("GET", "/v1/responses/resp%E2%80%8B_1", ""),
        ("GET", "/v1/responses/resp.1", ""),
        ("GET", "/v1/responses/resp%20bg1", ""),
        ("POST", "/v1/responses/resp%3Bx/cancel", ""),
        (
            "POST",
            "/v1/responses",
            r#"{"model":"openai.gpt-oss-120b","input":"x","previous_response_id":"../resp_1"}"#,
        ),
        (
            "POST",
            "/v1/responses",
            r#"{"model":"openai.gpt-oss-120b","input":"x","previous_response_id":"%72esp_1"}"#,
        ),
        (
            "POST",
            "/v1/responses",
            r#"{"model":"openai.gpt-oss-120b","input":"x","previous_response_id":"r\u00e9sp"}"#,
        ),
        (
            "POST",
            "/v1/responses",
            r#"{"model":"openai.gpt-oss-120b","input":"x","previous_response_id":""}"#,
        ),
    ];
    for (method, path, body) in attempts {
        assert_eq!(
            raw(&proxy, method, path, CHAT_KEY, body).await,
            (400, "invalid_path".to_owned()),
            "{method} {path} {body}"
        );
    }
    assert!(up.requests().is_empty(), "never forwarded");
    proxy.wait_for_records(attempts.len() as u64).await;
    let rows = proxy.records();
    assert_eq!(rows.len(), attempts.len());
    for row in &rows {
        assert_eq!(row["status"], 400, "{row:#}");
        assert_eq!(row["outcome"], "rejected", "{row:#}");
        assert_eq!(row["error_code"], "invalid_path", "{row:#}");
    }
}

#[tokio::test]
async fn double_escapes_and_non_canonical_utf8_are_400_invalid_path() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let paths = [
        "/v1/responses/%2572esp_bg1",
        "/v1/%252e%252e/organization/projects",
        "/v1/responses/resp_bg1%252Fcancel",
        "/v1/%25",
        "/v1/responses/%C0%AF",
        "/v1/%C0%AE%C0%AE/organization/projects",
        "/v1/responses/%E0%80%AF",
        "/v1/responses/%F0%80%80%AF",
        "/v1/responses/%ED%A0%80",
        "/v1/responses/%C3",
        "/v1/responses/%80",
        "/v1/responses/%zz",
    ];
    for path in paths {
        assert_eq!(
            raw(&proxy, "GET", path, CHAT_KEY, "").await,
            (400, "invalid_path".to_owned()),
            "{path}"
        );
    }
    assert!(up.requests().is_empty(), "never forwarded");
    proxy.wait_for_records(paths.len() as u64).await;
    let rows = proxy.records();
    assert_eq!(rows.len(), paths.len());
    assert!(
        rows.iter()
            .all(|r| r["error_code"] == "invalid_path" && r["status"] == 400),
        "{rows:#?}"
    );
}

#[tokio::test]
async fn a_replay_of_a_finished_background_response_is_billed_once() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    create_background(&proxy, CHAT_KEY).await;
    for _ in 0..2 {
        let r = send(
            &proxy,
            reqwest::Method::GET,
            "/v1/responses/resp_bg1?stream=true",
            CHAT_KEY,
            None,
        )
        .await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let body = r.bytes().await.expect("body");
        assert_eq!(body, background_events("resp_bg1").concat().as_bytes());
    }
    assert_eq!(
        seen(&up),
        [
            triple("POST", "/v1/responses", "proj_chat"),
            triple("GET", "/v1/responses/resp_bg1?stream=true", "proj_chat"),
            triple("GET", "/v1/responses/resp_bg1?stream=true", "proj_chat"),
        ]
    );
    proxy.wait_for_records(3).await;
    let rows = proxy.records();
    assert_free(&rows[0]);
    assert_bills_bg1(&rows[1]);
    assert_eq!(rows[1]["stream"], 1);
    assert_free(&rows[2]);
    assert_eq!(pending_count(&proxy), 0);
}

#[tokio::test]
async fn a_resumed_stream_bills_the_response_and_a_later_get_does_not() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    create_background(&proxy, CHAT_KEY).await;
    let r = send(
        &proxy,
        reqwest::Method::GET,
        "/v1/responses/%72esp_bg1?stream=true&starting_after=3",
        CHAT_KEY,
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    let body = r.bytes().await.expect("body");
    assert_eq!(body, background_events("resp_bg1")[4..].concat().as_bytes());
    get_ok(&proxy, "/v1/responses/resp_bg1", CHAT_KEY).await;
    assert_eq!(
        seen(&up),
        [
            triple("POST", "/v1/responses", "proj_chat"),
            triple(
                "GET",
                "/v1/responses/resp_bg1?stream=true&starting_after=3",
                "proj_chat"
            ),
            triple("GET", "/v1/responses/resp_bg1", "proj_chat"),
        ]
    );
    proxy.wait_for_records(3).await;
    let rows = proxy.records();
    assert_bills_bg1(&rows[1]);
    assert_free(&rows[2]);
    assert_eq!(pending_count(&proxy), 0);
}

#[tokio::test]
async fn an_abandoned_background_stream_is_billed_by_the_later_get_with_reported_usage() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let r = client()
        .post(format!("{}/v1/responses", proxy.url))
        .bearer_auth(CHAT_KEY)
        .header("content-type", "application/json")
        .header("x-test-event-gap-ms", "300")
        .body(BACKGROUND_STREAM)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let mut body = r.bytes_stream();
    let first = body.next().await.expect("chunk").expect("ok");
    assert!(first.starts_with(b"event: response.created"), "{first:?}");
    let abandoned = up.controls.stream_abandoned.notified();
    drop(body);
    tokio::time::timeout(Duration::from_secs(10), abandoned)
        .await
        .expect("the proxy left the upstream stream after the client did");
    proxy.wait_for_records(1).await;
    let created = &proxy.records()[0];
    assert_eq!(created["outcome"], "client_disconnect", "{created:#}");
    assert_eq!(created["upstream_response_id"], BACKGROUND_STREAM_ID);
    assert_free(created);
    assert_eq!(pending_count(&proxy), 1, "its usage is still to come");

    get_ok(&proxy, "/v1/responses/resp_bgs", CHAT_KEY).await;
    assert_eq!(
        seen(&up),
        [
            triple("POST", "/v1/responses", "proj_chat"),
            triple("GET", "/v1/responses/resp_bgs", "proj_chat"),
        ]
    );
    proxy.wait_for_records(2).await;
    let rows = proxy.records();
    let get = &rows[1];
    assert_eq!(get["usage_source"], "reported", "{get:#}");
    assert_eq!(get["input_tokens"], 30, "{get:#}");
    assert_eq!(get["output_tokens"], 40, "{get:#}");
    // 30 × 0.15 + 40 × 0.60 dollars per million tokens.
    assert_eq!(get["cost_pico"], 28_500_000, "{get:#}");
    assert_eq!(get["upstream_response_id"], BACKGROUND_STREAM_ID);
    assert_eq!(get["model"], "openai.gpt-oss-120b");
    assert_eq!(pending_count(&proxy), 0);
}

#[tokio::test]
async fn the_answer_to_a_cancel_is_metered_once() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    create_background(&proxy, CHAT_KEY).await;
    let r = send(
        &proxy,
        reqwest::Method::POST,
        "/v1/responses/resp_bg1/cancel",
        CHAT_KEY,
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["status"], "cancelled");
    let r = send(
        &proxy,
        reqwest::Method::POST,
        "/v1/responses/%72esp_bg1/cancel",
        CHAT_KEY,
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    r.bytes().await.expect("body");
    assert_eq!(
        seen(&up),
        [
            triple("POST", "/v1/responses", "proj_chat"),
            triple("POST", "/v1/responses/resp_bg1/cancel", "proj_chat"),
            triple("POST", "/v1/responses/resp_bg1/cancel", "proj_chat"),
        ]
    );
    proxy.wait_for_records(3).await;
    let rows = proxy.records();
    let cancel = &rows[1];
    assert_eq!(cancel["usage_source"], "reported", "{cancel:#}");
    assert_eq!(cancel["input_tokens"], 1000);
    assert_eq!(cancel["output_tokens"], 120);
    // 1000 × 0.15 + 120 × 0.60 dollars per million tokens.
    assert_eq!(cancel["cost_pico"], 222_000_000);
    assert_eq!(cancel["upstream_response_id"], "resp_bg1");
    assert_free(&rows[2]);
    assert_eq!(pending_count(&proxy), 0);
}

#[tokio::test]
async fn an_answer_without_usage_leaves_the_response_pending_for_one_with_it() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    create_background(&proxy, CHAT_KEY).await;
    let r = client()
        .post(format!("{}/v1/responses/resp_bg1/cancel", proxy.url))
        .bearer_auth(CHAT_KEY)
        .header("x-test-no-usage", "1")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.expect("json");
    assert_eq!(body["status"], "cancelled");
    assert!(body["usage"].is_null());
    proxy.wait_for_records(2).await;
    assert_free(&proxy.records()[1]);
    assert_eq!(pending_count(&proxy), 1, "its usage is still to come");
    get_ok(&proxy, "/v1/responses/resp_bg1", CHAT_KEY).await;
    assert_eq!(
        seen(&up),
        [
            triple("POST", "/v1/responses", "proj_chat"),
            triple("POST", "/v1/responses/resp_bg1/cancel", "proj_chat"),
            triple("GET", "/v1/responses/resp_bg1", "proj_chat"),
        ]
    );
    proxy.wait_for_records(3).await;
    assert_bills_bg1(&proxy.records()[2]);
    assert_eq!(pending_count(&proxy), 0);
}

#[tokio::test]
async fn a_pending_response_deleted_or_built_on_is_fetched_and_billed_first() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    create_background(&proxy, CHAT_KEY).await;
    // Built on before anyone saw it finished: mantlegate fetches it, and bills it, first.
    let (status, _) = raw(
        &proxy,
        "POST",
        "/v1/responses",
        CHAT_KEY,
        r#"{"model":"openai.gpt-oss-120b","input":"repeat it","previous_response_id":"resp_bg1"}"#,
    )
    .await;
    assert_eq!(status, 200);
    // Deleted: no longer pending, so nothing is fetched.
    let (status, _) = raw(&proxy, "DELETE", "/v1/responses/%72esp_bg1", CHAT_KEY, "").await;
    assert_eq!(status, 200);
    assert_eq!(
        seen(&up),
        [
            triple("POST", "/v1/responses", "proj_chat"),
            triple("GET", "/v1/responses/resp_bg1", "proj_chat"),
            triple("POST", "/v1/responses", "proj_chat"),
            triple("DELETE", "/v1/responses/resp_bg1", "proj_chat"),
        ]
    );
    proxy.wait_for_records(4).await;
    let rows = proxy.records();
    assert_eq!(rows.len(), 4, "{rows:#?}");
    assert_bills_bg1(&rows[1]);
    assert_eq!(rows[2]["upstream_response_id"], "resp_fg1");
    assert_eq!(rows[2]["usage_source"], "reported");
    assert_free(&rows[3]);
    assert_eq!(pending_count(&proxy), 0);

    // A second background response, deleted unseen: fetched and billed before the delete.
    create_background(&proxy, CHAT_KEY).await;
    proxy.wait_for_records(5).await;
    let (status, _) = raw(&proxy, "DELETE", "/v1/responses/resp_bg1", CHAT_KEY, "").await;
    assert_eq!(status, 200);
    let tail: Vec<_> = seen(&up).into_iter().skip(4).collect();
    assert_eq!(
        tail,
        [
            triple("POST", "/v1/responses", "proj_chat"),
            triple("GET", "/v1/responses/resp_bg1", "proj_chat"),
            triple("DELETE", "/v1/responses/resp_bg1", "proj_chat"),
        ]
    );
    proxy.wait_for_records(7).await;
    let rows = proxy.records();
    assert_bills_bg1(&rows[5]);
    assert_free(&rows[6]);
    assert_eq!(pending_count(&proxy), 0);
}

#[tokio::test]
async fn two_gets_at_once_bill_the_response_once() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    create_background(&proxy, CHAT_KEY).await;
    // The upstream holds both heads: both calls are past their checks before either ends.
    let get = |path: &'static str| {
        client()
            .get(format!("{}{path}", proxy.url))
            .bearer_auth(CHAT_KEY)
            .header("x-test-head-delay-ms", "300")
            .send()
    };
    let (a, b) = tokio::join!(
        get("/v1/responses/resp_bg1"),
        get("/v1/responses/%72esp_bg1")
    );
    for r in [a, b] {
        let r = r.expect("send");
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
    }
    let mut gets: Vec<_> = seen(&up).into_iter().skip(1).collect();
    gets.sort();
    assert_eq!(
        gets,
        [
            triple("GET", "/v1/responses/resp_bg1", "proj_chat"),
            triple("GET", "/v1/responses/resp_bg1", "proj_chat"),
        ]
    );
    proxy.wait_for_records(3).await;
    let rows = proxy.records();
    let billed: Vec<_> = rows[1..]
        .iter()
        .filter(|r| r["usage_source"] == "reported")
        .collect();
    assert_eq!(billed.len(), 1, "{rows:#?}");
    assert_bills_bg1(billed[0]);
    assert_eq!(
        rows[1..]
            .iter()
            .filter(|r| r["usage_source"] == "none")
            .count(),
        1
    );
    assert_eq!(pending_count(&proxy), 0);
}

#[tokio::test]
async fn a_poll_after_a_restart_bills_the_pending_response_once() {
    let up = FakeUpstream::start().await;
    let text = config(&up.url, "reject", "");
    let proxy = spawn_proxy(&text).await;
    create_background(&proxy, CHAT_KEY).await;
    let proxy = proxy.restart(&text).await;
    for _ in 0..2 {
        get_ok(&proxy, "/v1/responses/resp_bg1", CHAT_KEY).await;
    }
    assert_eq!(
        seen(&up),
        [
            triple("POST", "/v1/responses", "proj_chat"),
            triple("GET", "/v1/responses/resp_bg1", "proj_chat"),
            triple("GET", "/v1/responses/resp_bg1", "proj_chat"),
        ]
    );
    // The new process's own count: two records, after the one from before the restart.
    proxy.wait_for_records(2).await;
    let rows = proxy.records();
    assert_eq!(rows.len(), 3);
    assert_free(&rows[0]);
    assert_bills_bg1(&rows[1]);
    assert_free(&rows[2]);
    assert_eq!(pending_count(&proxy), 0);
}

#[tokio::test]
async fn unknown_admin_paths_are_404_and_leave_no_ledger_row() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    for (method, path) in [
        ("GET", "/admin"),
        ("GET", "/admin/"),
        ("GET", "/admin/v1/nothing"),
        ("GET", "/admin/v2/costs"),
        ("POST", "/admin/v1/costs/x"),
        ("DELETE", "/admin/v1/keys/1"),
        ("GET", "/%61dmin/v1/nothing"),
    ] {
        for key in [ADMIN_TOKEN, CHAT_KEY] {
            assert_eq!(
                raw(&proxy, method, path, key, "").await,
                (404, "unknown_endpoint".to_owned()),
                "{method} {path}"
            );
        }
    }
    // One API call after them: the ledger's only row.
    let r = proxy.chat(CHAT_KEY).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.expect("body");
    assert_eq!(
        seen(&up),
        [triple("POST", "/v1/chat/completions", "proj_chat")]
    );
    proxy.wait_for_records(1).await;
    let rows = proxy.records();
    assert_eq!(rows.len(), 1, "{rows:#?}");
    assert_eq!(rows[0]["api"], "chat.completions");
}
