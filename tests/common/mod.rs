//! Test harness: a recording fake upstream and the real proxy, both on port 0.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

pub mod binary;
pub mod pg;
pub mod services;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;
use tokio::sync::{Notify, oneshot};

use mantlegate::config::Config;
use mantlegate::ledger::sqlite::{self, Reader, SqliteStore};
use mantlegate::ledger::{Ledger, LedgerStats};
use mantlegate::reload::Reloader;
use mantlegate::secret::Secret;
use mantlegate::state::{AppState, Snapshot};

/// What the fake upstream received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    /// Path and query.
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Controls shared between a test and its fake upstream.
#[derive(Default)]
pub struct Controls {
    /// Requests in arrival order.
    pub requests: Mutex<Vec<Recorded>>,
    /// When set, streams send their first event, then wait for `release` before the rest.
    pub gate: AtomicBool,
    pub release: Notify,
    /// Set once the last event of a stream has been handed to the server.
    pub last_event_sent: AtomicBool,
    /// Notified when a stream body is dropped before its end (the proxy hung up).
    pub stream_abandoned: Notify,
    /// Notified (all waiters) whenever a request has been recorded.
    pub received: Notify,
}

/// Notifies `stream_abandoned` when dropped before `finished` is set.
struct StreamGuard {
    controls: Arc<Controls>,
    finished: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.controls.stream_abandoned.notify_one();
        }
    }
}

/// A fake bedrock-mantle that records every request. Behaviour by request:
/// - header `x-test-status: N`: answers N with an OpenAI-shaped error body;
/// - header `x-test-head-delay-ms: N`: waits N ms before answering;
/// - header `x-test-event-gap-ms: N`: N ms between stream events (default 0);
/// - `stream: true` in the body: an SSE stream of 5 chat chunks (or responses events) and the end;
/// - otherwise: a JSON body echoing what was asked.
///
/// JSON answers carry a unique `x-request-id`, or the request's own when it sent one.
pub struct FakeUpstream {
    pub url: String,
    pub controls: Arc<Controls>,
}

impl FakeUpstream {
    pub async fn start() -> Self {
        let controls = Arc::new(Controls::default());
        let app = Router::new()
            .fallback(fake_handler)
            .with_state(controls.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            url: format!("http://{addr}"),
            controls,
        }
    }

    /// Everything received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.controls.requests.lock().expect("lock").clone()
    }

    /// The only request received.
    pub fn single(&self) -> Recorded {
        let all = self.requests();
        assert_eq!(
            all.len(),
            1,
            "expected exactly one upstream request: {all:?}"
        );
        all.into_iter().next().expect("one")
    }
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.to_str().ok()?.parse().ok()
}

async fn fake_handler(State(controls): State<Arc<Controls>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let recorded = Recorded {
        method: parts.method.clone(),
        uri: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body: body.clone(),
    };
    controls.requests.lock().expect("lock").push(recorded);
    controls.received.notify_waiters();

    if let Some(ms) = header_u64(&parts.headers, "x-test-head-delay-ms") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    if let Some(status) = header_u64(&parts.headers, "x-test-status") {
        let status = StatusCode::from_u16(u16::try_from(status).expect("u16")).expect("status");
        return Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .header("x-request-id", "req_upstream_error")
            .body(Body::from(
                r#"{"error":{"message":"upstream says no","type":"invalid_request_error","param":null,"code":"upstream_code"}}"#,
            ))
            .expect("response");
    }
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let stream = json["stream"].as_bool() == Some(true);
    let path = parts.uri.path().to_owned();
    if stream {
        let gap =
            Duration::from_millis(header_u64(&parts.headers, "x-test-event-gap-ms").unwrap_or(0));
        let events = if path.ends_with("/responses") && json["background"] == true {
            background_events(BACKGROUND_STREAM_ID)
        } else if path.ends_with("/responses") {
            responses_events()
        } else if json["stream_options"]["include_usage"] == true {
            chat_events_with_usage()
        } else {
            chat_events()
        };
        return sse(controls, events, gap);
    }
    if let Some(answer) = background_answer(&controls, &parts, &path) {
        return answer;
    }
    if path.ends_with("/responses") && parts.method == Method::POST {
        let background = json["background"] == true;
        let object = if background {
            serde_json::json!({"id": "resp_bg1", "object": "response", "status": "queued", "background": true, "usage": null})
        } else {
            serde_json::json!({"id": "resp_fg1", "object": "response", "status": "completed", "background": false,
                "usage": {"input_tokens": 100, "input_tokens_details": {"cached_tokens": 40}, "output_tokens": 20,
                          "output_tokens_details": {"reasoning_tokens": 5}, "total_tokens": 120}})
        };
        return json_response(&parts.headers, &object);
    }
    if path.ends_with("/responses/resp_bg1") && parts.method == Method::GET {
        return json_response(
            &parts.headers,
            &serde_json::json!({"id": "resp_bg1", "object": "response", "status": "completed",
            "background": true, "usage": {"input_tokens": 1000, "output_tokens": 500, "total_tokens": 1500}}),
        );
    }
    if path.ends_with("/chat/completions")
        && let Some(n) = json["max_tokens"].as_u64()
    {
        // Uses its whole output allowance: the worst case a budget reserves for.
        return json_response(
            &parts.headers,
            &serde_json::json!({"id": "chatcmpl-2", "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n}}),
        );
    }
    if path.ends_with("/chat/completions") {
        return json_response(
            &parts.headers,
            &serde_json::json!({"id": "chatcmpl-1", "object": "chat.completion", "model": json["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1_000_000, "completion_tokens": 200_000, "total_tokens": 1_200_000,
                      "prompt_tokens_details": {"cached_tokens": 250_000},
                      "completion_tokens_details": {"reasoning_tokens": 50_000}}}),
        );
    }
    let echo = serde_json::json!({
        "object": "echo",
        "method": parts.method.as_str(),
        "path": path,
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
    });
    Response::builder()
        .header("content-type", "application/json")
        .header("x-request-id", "req_upstream_1")
        .header("x-amzn-requestid", "req_upstream_1")
        .body(Body::from(echo.to_string()))
        .expect("response")
}

/// The id of the background response a streamed `background: true` create starts.
pub const BACKGROUND_STREAM_ID: &str = "resp_bgs";

/// The usage the fake reports for finished background response `id` (`resp_bg*`).
pub fn background_usage(id: &str) -> serde_json::Value {
    if id == "resp_bg1" {
        serde_json::json!({"input_tokens": 1000, "output_tokens": 500, "total_tokens": 1500})
    } else {
        serde_json::json!({"input_tokens": 30, "output_tokens": 40, "total_tokens": 70})
    }
}

/// The usage in the answer to a cancel of background response `id`.
pub fn cancelled_usage() -> serde_json::Value {
    serde_json::json!({"input_tokens": 1000, "output_tokens": 120, "total_tokens": 1120})
}

/// The events of background response `id`, `sequence_number` 0 to 5: created, four deltas,
/// completed with [`background_usage`].
pub fn background_events(id: &str) -> Vec<String> {
    let mut out = vec![format!(
        "event: response.created\ndata: {}",
        serde_json::json!({"type": "response.created", "sequence_number": 0, "response":
            {"id": id, "object": "response", "status": "in_progress", "background": true, "usage": null}})
    )];
    for i in 1..5 {
        out.push(format!(
            "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"sequence_number\":{i},\"delta\":\"w{i} \"}}"
        ));
    }
    out.push(format!(
        "event: response.completed\ndata: {}",
        serde_json::json!({"type": "response.completed", "sequence_number": 5, "response":
            {"id": id, "object": "response", "status": "completed", "background": true, "usage": background_usage(id)}})
    ));
    out.into_iter().map(|e| format!("{e}\n\n")).collect()
}

/// Answers about background responses `resp_bg*` other than a plain GET of `resp_bg1`: their
/// events replayed (`GET ?stream=true`, after `starting_after` when given), a plain GET of the
/// others, and a cancel (status `cancelled` with [`cancelled_usage`], or none with header
/// `x-test-no-usage`).
fn background_answer(
    controls: &Arc<Controls>,
    parts: &axum::http::request::Parts,
    path: &str,
) -> Option<Response> {
    let rest = path.split("/responses/").nth(1)?;
    let mut segments = rest.split('/');
    let id = segments.next().filter(|id| id.starts_with("resp_bg"))?;
    let query: Vec<&str> = parts.uri.query().unwrap_or("").split('&').collect();
    match (&parts.method, segments.next()) {
        (&Method::GET, None) if query.contains(&"stream=true") => {
            let after = query
                .iter()
                .find_map(|q| q.strip_prefix("starting_after="))
                .and_then(|n| n.parse::<usize>().ok());
            let events = background_events(id)
                .into_iter()
                .enumerate()
                .filter(|(i, _)| after.is_none_or(|n| *i > n))
                .map(|(_, e)| e)
                .collect();
            Some(sse(controls.clone(), events, Duration::ZERO))
        }
        (&Method::GET, None) if id != "resp_bg1" => Some(json_response(
            &parts.headers,
            &serde_json::json!({
            "id": id, "object": "response", "status": "completed", "background": true,
            "usage": background_usage(id)}),
        )),
        // `x-test-no-usage`: cancelled before it ran, nothing to report yet.
        (&Method::POST, Some("cancel")) => Some(json_response(
            &parts.headers,
            &serde_json::json!({
            "id": id, "object": "response", "status": "cancelled", "background": true,
            "usage": if parts.headers.contains_key("x-test-no-usage") {
                serde_json::Value::Null
            } else {
                cancelled_usage()
            }}),
        )),
        _ => None,
    }
}

fn json_response(request: &HeaderMap, v: &serde_json::Value) -> Response {
    // Unique, as bedrock-mantle's are; but the client's own `x-request-id` when it sent one,
    // as a gateway in front of the upstream may answer.
    let id = request
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map_or_else(
            || format!("req_upstream_{:016x}", rand::random::<u64>()),
            str::to_owned,
        );
    Response::builder()
        .header("content-type", "application/json")
        .header("x-request-id", &id)
        .header("x-amzn-requestid", &id)
        .body(Body::from(v.to_string()))
        .expect("response")
}

/// The chat stream with the usage-only chunk before `[DONE]`, as sent when asked for.
pub fn chat_events_with_usage() -> Vec<String> {
    let mut events = chat_events();
    let done = events.pop().expect("[DONE]");
    events.push("data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"created\":1,\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":4,\"total_tokens\":15}}\n\n".to_owned());
    events.push(done);
    events
}

pub fn chat_events() -> Vec<String> {
    let mut events: Vec<String> = (0..4)
        .map(|i| {
            format!(
                r#"{{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{{"index":0,"delta":{{"content":"w{i} "}},"finish_reason":null}}]}}"#
            )
        })
        .collect();
    events.push(r#"{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#.to_owned());
    events.push("[DONE]".to_owned());
    events
        .into_iter()
        .map(|e| format!("data: {e}\n\n"))
        .collect()
}

pub fn responses_events() -> Vec<String> {
    let mut out = vec![
        r#"event: response.created
data: {"type":"response.created","sequence_number":0,"response":{"id":"resp_1","object":"response","status":"in_progress","usage":null}}"#.to_owned(),
    ];
    for i in 1..5 {
        out.push(format!(
            "event: response.output_text.delta\ndata: {{\"type\":\"response.output_text.delta\",\"sequence_number\":{i},\"delta\":\"w{i} \"}}"
        ));
    }
    out.push(r#"event: response.completed
data: {"type":"response.completed","sequence_number":5,"response":{"id":"resp_1","object":"response","status":"completed","usage":{"input_tokens":3,"output_tokens":4,"total_tokens":7}}}"#.to_owned());
    out.into_iter().map(|e| format!("{e}\n\n")).collect()
}

fn sse(controls: Arc<Controls>, events: Vec<String>, gap: Duration) -> Response {
    let last = events.len() - 1;
    let guard = Arc::new(Mutex::new(StreamGuard {
        controls: controls.clone(),
        finished: false,
    }));
    let stream = futures_util::stream::iter(events.into_iter().enumerate()).then(move |(i, e)| {
        let controls = controls.clone();
        let guard = guard.clone();
        async move {
            if i > 0 {
                if i == 1 && controls.gate.load(Ordering::SeqCst) {
                    controls.release.notified().await;
                }
                if !gap.is_zero() {
                    tokio::time::sleep(gap).await;
                }
            }
            if i == last {
                controls.last_event_sent.store(true, Ordering::SeqCst);
                guard.lock().expect("lock").finished = true;
            }
            Ok::<_, std::convert::Infallible>(Bytes::from(e))
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(Body::from_stream(stream))
        .expect("response")
}

/// Lowercase hex SHA-256.
pub fn sha(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The standard test config around `upstream`; `extra` is appended verbatim.
pub fn config(upstream: &str, on_missing: &str, extra: &str) -> String {
    format!(
        r#"
[server]
max_body_bytes = 4096

[upstream]
base_url = "{upstream}"
response_timeout = "1s"
[[upstream.model_prefixes]]
model = "openai.gpt-5*"
prefix = "/openai/v1"

[attribution]
on_missing = "{on_missing}"
default_project = "Shared"

[[projects]]
name = "Chatbot"
id = "proj_chat"
tags = {{ Team = "CX" }}
[[projects]]
name = "Search"
id = "proj_search"
[[projects]]
name = "Shared"
id = "proj_shared"

[[keys]]
name = "chatbot-backend"
sha256 = "{chat}"
projects = ["Chatbot"]
[[keys]]
name = "search-team"
sha256 = "{search}"
projects = ["Search", "Chatbot"]
[[keys]]
name = "bare"
sha256 = "{bare}"
projects = []

[[routes]]
prefix = "/searchapp"
project = "Search"

[pricing]
builtin = false

[[prices]]
model = "openai.gpt-oss-120b"
input_per_million = "0.15"
cached_input_per_million = "0.075"
output_per_million = "0.60"

[metrics]
tag_labels = ["Team"]
{extra}
"#,
        chat = sha(CHAT_KEY),
        search = sha(SEARCH_KEY),
        bare = sha(BARE_KEY),
    )
}

pub const CHAT_KEY: &str = "mg-test-chat";
pub const SEARCH_KEY: &str = "mg-test-search";
pub const BARE_KEY: &str = "mg-test-bare";
pub const UPSTREAM_KEY: &str = "bedrock-api-key-upstream-secret";
pub const ADMIN_TOKEN: &str = "test-admin-token";

/// A running proxy with its own ledger; dropping it stops the server.
pub struct Proxy {
    pub url: String,
    /// The SQLite ledger file.
    pub db: std::path::PathBuf,
    pub stats: Arc<LedgerStats>,
    _dir: tempfile::TempDir,
    _stop: oneshot::Sender<()>,
}

impl Proxy {
    /// Stops this proxy and starts a new one with `config_text` on the same ledger file, as a
    /// restart would (wait for the records first: what is queued may not be written).
    pub async fn restart(self, config_text: &str) -> Self {
        let Self {
            _dir: dir,
            _stop: stop,
            ..
        } = self;
        drop(stop);
        let config = Config::from_toml(config_text).expect("valid test config");
        let snapshot = Snapshot::build(&config, Some(UPSTREAM_KEY)).expect("snapshot");
        let state = AppState::new(snapshot, config.upstream.connect_timeout).expect("state");
        start(state, dir).await
    }

    /// Waits (up to 10 s) until at least `n` records are committed to the ledger.
    pub async fn wait_for_records(&self, n: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let notified = self.stats.committed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let written = self.stats.written.load(Ordering::SeqCst);
            if written >= n {
                return;
            }
            assert!(
                tokio::time::timeout_at(deadline, notified).await.is_ok(),
                "only {written} of {n} ledger records were written within 10 s"
            );
        }
    }

    /// All ledger rows as JSON objects, in order.
    pub fn records(&self) -> Vec<serde_json::Value> {
        let conn = rusqlite::Connection::open(&self.db).expect("open ledger");
        let mut stmt = conn
            .prepare("SELECT call_id, ts_ms, request_id, key_name, route, project_name, project_id, tags, api, model, stream, status, outcome, error_code, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens, usage_source, cost_pico, upstream_response_id FROM calls ORDER BY id")
            .expect("prepare");
        let names: Vec<String> = stmt.column_names().map(str::to_owned).collect();
        stmt.query_map([], |row| {
            let mut obj = serde_json::Map::new();
            for (i, name) in names.iter().enumerate() {
                let v: rusqlite::types::Value = row.get(i)?;
                let j = match v {
                    rusqlite::types::Value::Integer(n) => n.into(),
                    rusqlite::types::Value::Real(f) => f.into(),
                    rusqlite::types::Value::Text(t) => t.into(),
                    rusqlite::types::Value::Null | rusqlite::types::Value::Blob(_) => {
                        serde_json::Value::Null
                    }
                };
                obj.insert(name.clone(), j);
            }
            Ok(serde_json::Value::Object(obj))
        })
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
    }
}

pub async fn spawn_proxy(config_text: &str) -> Proxy {
    spawn_proxy_with_key(config_text, Some(UPSTREAM_KEY)).await
}

pub async fn spawn_proxy_with_key(config_text: &str, upstream_key: Option<&str>) -> Proxy {
    let config = Config::from_toml(config_text).expect("valid test config");
    let snapshot = Snapshot::build(&config, upstream_key).expect("snapshot");
    let state = AppState::new(snapshot, config.upstream.connect_timeout).expect("state");
    let dir = tempfile::tempdir().expect("tempdir");
    start(state, dir).await
}

/// A proxy whose config lives in a file, with the reloader `serve` would run on it.
/// The upstream key comes from the file `upstream.key` beside it.
pub async fn spawn_proxy_from_file(
    config_text: &str,
) -> (Proxy, Arc<Reloader>, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("mantlegate.toml");
    std::fs::write(dir.path().join("upstream.key"), UPSTREAM_KEY).expect("write key");
    std::fs::write(&path, config_text).expect("write config");
    let config = Config::load(&path).expect("valid test config");
    let key = mantlegate::reload::upstream_key(&config).expect("key");
    let snapshot = Snapshot::build(&config, key.as_deref()).expect("snapshot");
    let state = AppState::new(snapshot, config.upstream.connect_timeout).expect("state");
    // The reloader takes the state as `serve` gives it: with the ledger reader.
    let (proxy, state) = start_with_state(state, dir).await;
    let reloader = Arc::new(Reloader::new(&path, state));
    (proxy, reloader, path)
}

async fn start(state: AppState, dir: tempfile::TempDir) -> Proxy {
    start_with_state(state, dir).await.0
}

/// Starts a proxy on `state`, returning the state as the server runs it.
async fn start_with_state(mut state: AppState, dir: tempfile::TempDir) -> (Proxy, AppState) {
    let db = dir.path().join("ledger.db");
    let store = SqliteStore::open(&db).expect("ledger");
    let reader = Reader::new(sqlite::open_read_only(&db).expect("reader"));
    let (ledger, _writer) = Ledger::start(Box::new(store), 10_000).expect("writer");
    let ledger_stats = ledger.stats.clone();
    state.ledger = Some(ledger);
    state.outbox = Arc::new(sqlite::SqliteOutbox::open(&db).expect("outbox"));
    state
        .responses
        .seed_from_ledger(&reader)
        .expect("pending background responses");
    state.reader = Some(Arc::new(reader));
    state.admin_token = Some(Arc::new(Secret::new(ADMIN_TOKEN.to_owned())));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(mantlegate::serve(
        listener,
        state.clone(),
        async move {
            let _ = stopped.await;
        },
        Duration::from_secs(1),
    ));
    let proxy = Proxy {
        url: format!("http://{addr}"),
        db,
        stats: ledger_stats,
        _dir: dir,
        _stop: stop,
    };
    (proxy, state)
}

/// A client that never retries and never pools across tests.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder().build().expect("client")
}

/// The `error` object of an OpenAI-shaped error response, checked for shape.
pub async fn error_of(response: reqwest::Response) -> serde_json::Value {
    let bytes = response.bytes().await.expect("body");
    let body: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON error body");
    let error = body["error"].clone();
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(error["type"].is_string(), "{body}");
    assert!(error.get("param").is_some(), "{body}");
    assert!(error["code"].is_string(), "{body}");
    error
}

pub const CHAT_BODY: &str =
    r#"{"model":"openai.gpt-oss-120b","messages":[{"role":"user","content":"hi"}]}"#;

// ---- The fault-injecting upstream and helpers of the attack tests (faults, bad_clients, load).

/// What a [`FaultUpstream`] does with one request.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Reads the request and never answers: waits for the proxy to hang up.
    Stall,
    /// Answers `head` (status line and headers, without the blank line) and `body`, then
    /// closes the connection. `connection: close` is added to the head.
    Answer { head: String, body: Vec<u8> },
    /// A chunked answer: `head`, then each piece as one chunk, then `end` (a `Reset` or a
    /// `Finish` after [`FaultUpstream::release`] when `hold` is set).
    Stream {
        head: String,
        pieces: Vec<Vec<u8>>,
        end: StreamEnd,
        hold: bool,
    },
    /// A chunked answer sending `piece` every `every`, for ever (until the proxy hangs up).
    Endless {
        head: String,
        piece: Vec<u8>,
        every: Duration,
    },
    /// Answers `head` and `first` (raw bytes, framing included), waits for
    /// [`FaultUpstream::release`] (noting a hang-up of the proxy meanwhile, and then stopping),
    /// sends `rest` (raw too), closes its side when `close` is set, and notes how the proxy
    /// then closed the connection ([`FaultUpstream::wait_closed`]).
    Held {
        head: String,
        first: Vec<u8>,
        rest: Vec<u8>,
        close: bool,
    },
}

/// How a [`Fault::Stream`] ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamEnd {
    /// The terminating chunk: a complete answer.
    Finish,
    /// Nothing more, connection kept open: waits for the proxy to hang up.
    Stall,
    /// The connection is aborted with a TCP RST.
    Reset,
}

impl Fault {
    /// A JSON answer with `status` (e.g. `"200 OK"`), extra header lines and `body`.
    pub fn json(status: &str, headers: &str, body: &str) -> Self {
        Self::Answer {
            head: format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{headers}",
                body.len()
            ),
            body: body.as_bytes().to_vec(),
        }
    }

    /// An SSE stream of `pieces` that ends with `end`.
    pub fn sse(pieces: Vec<Vec<u8>>, end: StreamEnd) -> Self {
        Self::Stream {
            head: SSE_HEAD.to_owned(),
            pieces,
            end,
            hold: false,
        }
    }

    /// An SSE stream of `pieces` that waits for [`FaultUpstream::release`] before its `end`.
    pub fn sse_held(pieces: Vec<Vec<u8>>, end: StreamEnd) -> Self {
        Self::Stream {
            head: SSE_HEAD.to_owned(),
            pieces,
            end,
            hold: true,
        }
    }
}

/// The head of a chunked SSE answer.
pub const SSE_HEAD: &str =
    "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n";

/// One request as a [`FaultUpstream`] read it.
#[derive(Debug, Clone)]
pub struct RawRecorded {
    /// Request line and headers, as text.
    pub head: String,
    pub body: Vec<u8>,
}

#[derive(Default)]
struct FaultState {
    requests: Mutex<Vec<RawRecorded>>,
    /// When the proxy hung up on an answer that was waiting (stall, endless, stalled stream).
    hung_up: Mutex<Vec<std::time::Instant>>,
    /// For each [`Fault::Held`] answer sent whole: whether the proxy closed the connection
    /// having read everything (a FIN, `true`) or with bytes left unread (a reset, `false`).
    closed: Mutex<Vec<bool>>,
    changed: Notify,
    release: Notify,
}

/// A raw-TCP fake bedrock-mantle that misbehaves on purpose. The n-th request (counted from 0)
/// gets `plan[min(n, plan.len() - 1)]`; every answer closes its connection.
pub struct FaultUpstream {
    pub url: String,
    state: Arc<FaultState>,
    plan: Arc<Vec<Fault>>,
}

impl FaultUpstream {
    pub async fn start(plan: Vec<Fault>) -> Self {
        assert!(!plan.is_empty(), "a plan needs at least one fault");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(FaultState::default());
        let plan = Arc::new(plan);
        let (st, pl) = (state.clone(), plan.clone());
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                tokio::spawn(fault_conn(conn, st.clone(), pl.clone()));
            }
        });
        Self {
            url: format!("http://{addr}"),
            state,
            plan,
        }
    }

    /// Requests received so far.
    pub fn requests(&self) -> Vec<RawRecorded> {
        self.state.requests.lock().expect("lock").clone()
    }

    /// Number of requests (attempts) received so far.
    pub fn attempts(&self) -> usize {
        self.state.requests.lock().expect("lock").len()
    }

    /// Waits (up to `within`) until the proxy has hung up on `n` waiting answers; returns when
    /// the n-th hang-up was seen.
    pub async fn wait_hung_up(&self, n: usize, within: Duration) -> std::time::Instant {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.state.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(at) = self.state.hung_up.lock().expect("lock").get(n - 1) {
                return *at;
            }
            assert!(
                tokio::time::timeout_at(deadline, notified).await.is_ok(),
                "the proxy did not hang up on the upstream within {within:?}"
            );
        }
    }

    /// Hang-ups seen so far.
    pub fn hang_ups(&self) -> usize {
        self.state.hung_up.lock().expect("lock").len()
    }

    /// Waits (up to `within`) until `n` requests have arrived.
    pub async fn wait_requests(&self, n: usize, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.state.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.attempts() >= n {
                return;
            }
            assert!(
                tokio::time::timeout_at(deadline, notified).await.is_ok(),
                "{} of {n} upstream requests arrived within {within:?}",
                self.attempts()
            );
        }
    }

    /// Whether the proxy hangs up on `n` waiting answers within `within`: `false` when it did
    /// not by then (a bounded wait for something that must not happen).
    pub async fn hangs_up_within(&self, n: usize, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.state.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.hang_ups() >= n {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }

    /// Waits (up to `within`) until the proxy has closed `n` connections whose
    /// [`Fault::Held`] answer was sent whole; returns, for each, whether it read everything
    /// first (closed with a FIN rather than a reset).
    pub async fn wait_closed(&self, n: usize, within: Duration) -> Vec<bool> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let notified = self.state.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let closed = self.state.closed.lock().expect("lock").clone();
            if closed.len() >= n {
                return closed;
            }
            assert!(
                tokio::time::timeout_at(deadline, notified).await.is_ok(),
                "the proxy closed {} of {n} answered connections within {within:?}",
                closed.len()
            );
        }
    }

    /// Lets one held stream ([`Fault::sse_held`]) go on to its end.
    pub fn release(&self) {
        self.state.release.notify_one();
    }

    /// The plan this upstream follows.
    pub fn plan(&self) -> &[Fault] {
        &self.plan
    }
}

/// Reads one HTTP/1.1 request (head and `content-length` body) from `conn`.
pub async fn read_raw_request(conn: &mut tokio::net::TcpStream) -> Option<RawRecorded> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(at) = memchr::memmem::find(&buf, b"\r\n\r\n") {
            break at + 4;
        }
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..n]);
    }
    Some(RawRecorded { head, body })
}

async fn fault_conn(
    mut conn: tokio::net::TcpStream,
    state: Arc<FaultState>,
    plan: Arc<Vec<Fault>>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some(request) = read_raw_request(&mut conn).await else {
        return;
    };
    let n = {
        let mut requests = state.requests.lock().expect("lock");
        requests.push(request);
        requests.len() - 1
    };
    state.changed.notify_waiters();
    let fault = plan[n.min(plan.len() - 1)].clone();
    // Waits for the proxy to close its side, then notes when it did.
    let wait_hang_up = |mut conn: tokio::net::TcpStream, state: Arc<FaultState>| async move {
        let mut sink = [0u8; 1024];
        while matches!(conn.read(&mut sink).await, Ok(n) if n > 0) {}
        state
            .hung_up
            .lock()
            .expect("lock")
            .push(std::time::Instant::now());
        state.changed.notify_waiters();
    };
    match fault {
        Fault::Stall => wait_hang_up(conn, state).await,
        Fault::Answer { head, body } => {
            let _ = conn
                .write_all(format!("{head}connection: close\r\n\r\n").as_bytes())
                .await;
            let _ = conn.write_all(&body).await;
            let _ = conn.shutdown().await;
        }
        Fault::Stream {
            head,
            pieces,
            end,
            hold,
        } => {
            if conn
                .write_all(format!("{head}connection: close\r\n\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
            for piece in pieces {
                if conn.write_all(&chunked(&piece)).await.is_err() {
                    return;
                }
            }
            if hold {
                state.release.notified().await;
            }
            match end {
                StreamEnd::Finish => {
                    let _ = conn.write_all(b"0\r\n\r\n").await;
                    let _ = conn.shutdown().await;
                }
                StreamEnd::Stall => wait_hang_up(conn, state).await,
                StreamEnd::Reset => {
                    let _ = conn.set_zero_linger();
                    drop(conn);
                }
            }
        }
        Fault::Held {
            head,
            first,
            rest,
            close,
        } => held_answer(conn, state, &head, &first, &rest, close).await,
        Fault::Endless { head, piece, every } => {
            if conn
                .write_all(format!("{head}connection: close\r\n\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
            let frame = chunked(&piece);
            loop {
                if conn.write_all(&frame).await.is_err() {
                    break;
                }
                // Pacing of the endless stream: behaviour of this upstream, not synchronisation.
                tokio::time::sleep(every).await;
            }
            state
                .hung_up
                .lock()
                .expect("lock")
                .push(std::time::Instant::now());
            state.changed.notify_waiters();
        }
    }
}

/// Plays a [`Fault::Held`] answer on `conn`.
async fn held_answer(
    mut conn: tokio::net::TcpStream,
    state: Arc<FaultState>,
    head: &str,
    first: &[u8],
    rest: &[u8],
    close: bool,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut start = format!("{head}connection: close\r\n\r\n").into_bytes();
    start.extend_from_slice(first);
    if conn.write_all(&start).await.is_err() {
        return;
    }
    let mut sink = [0u8; 1024];
    // The proxy sends nothing more on this connection: a read that returns is a hang-up.
    let hung_up = tokio::select! {
        () = state.release.notified() => false,
        _ = conn.read(&mut sink) => true,
    };
    if hung_up {
        state
            .hung_up
            .lock()
            .expect("lock")
            .push(std::time::Instant::now());
        state.changed.notify_waiters();
        return;
    }
    if conn.write_all(rest).await.is_err() {
        return;
    }
    if close {
        let _ = conn.shutdown().await;
    }
    let clean = loop {
        match conn.read(&mut sink).await {
            Ok(0) => break true,
            Ok(_) => {}
            Err(_) => break false,
        }
    };
    state.closed.lock().expect("lock").push(clean);
    state.changed.notify_waiters();
}

/// `data` as one HTTP/1.1 chunk.
pub fn chunked(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:X}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

/// The standard test config (`on_missing = "reject"`) with lines added to `[server]` and to
/// `[upstream]`; a `max_body_bytes` or `response_timeout` line given replaces the standard one.
pub fn config_tuned(upstream_url: &str, server: &str, upstream: &str, extra: &str) -> String {
    let mut text = config(upstream_url, "reject", extra);
    let server_line = "max_body_bytes = 4096\n";
    let upstream_line = "response_timeout = \"1s\"\n";
    assert!(text.contains(server_line) && text.contains(upstream_line));
    let keep_server = if server.contains("max_body_bytes") {
        ""
    } else {
        server_line
    };
    let keep_upstream = if upstream.contains("response_timeout") {
        ""
    } else {
        upstream_line
    };
    text = text.replacen(server_line, &format!("{keep_server}{server}\n"), 1);
    text.replacen(upstream_line, &format!("{keep_upstream}{upstream}\n"), 1)
}

impl Proxy {
    /// A non-streamed chat call ([`CHAT_BODY`]) with `key`.
    pub async fn chat(&self, key: &str) -> reqwest::Response {
        self.chat_body(key, CHAT_BODY).await
    }

    /// A chat call with `key` and `body`.
    pub async fn chat_body(&self, key: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        client()
            .post(format!("{}/v1/chat/completions", self.url))
            .bearer_auth(key)
            .body(body)
            .send()
            .await
            .expect("send")
    }

    /// The ledger record of the call the client saw as `request_id` (waits for `n` records first).
    pub async fn record_of(&self, n: u64, request_id: &str) -> serde_json::Value {
        self.wait_for_records(n).await;
        let records = self.records();
        records
            .iter()
            .find(|r| r["request_id"] == request_id)
            .cloned()
            .unwrap_or_else(|| panic!("no ledger record for {request_id}: {records:#?}"))
    }

    /// Asserts that `/healthz` answers 200 within 5 s.
    /// The `/metrics` page of the main listener (it needs a token there: the admin one).
    pub async fn metrics_text(&self) -> String {
        client()
            .get(format!("{}/metrics", self.url))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .expect("send")
            .text()
            .await
            .expect("text")
    }

    pub async fn assert_healthy(&self) {
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            client().get(format!("{}/healthz", self.url)).send(),
        )
        .await
        .expect("/healthz answered within 5 s")
        .expect("/healthz");
        assert_eq!(r.status(), 200, "/healthz");
    }

    /// `host:port` of the proxy, for raw TCP clients.
    pub fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }
}

/// Peak resident memory of this process (`VmHWM`), in KiB.
pub fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Prints a measured figure so that it shows in `cargo test` output even when the test passes
/// (written to stderr directly, past the test harness's capture).
pub fn report(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "[figure] {line}");
}
