//! The embedded simulated bedrock-mantle upstream used by `mantlegate demo`, `simulate` and tests.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{OriginalUri, Path, Request, State};
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::time::Instant;

/// Options of the simulated upstream.
#[derive(Clone, Debug)]
pub struct SimOptions {
    /// Delay between two SSE events; background responses complete after three of them.
    pub event_delay: Duration,
}

impl Default for SimOptions {
    fn default() -> Self {
        Self {
            event_delay: Duration::from_millis(30),
        }
    }
}

/// Builds the simulated upstream: the same API under `/v1` and `/openai/v1`, with bedrock-mantle's
/// per-model route check, bearer or `x-api-key` auth, and project-scoped stored responses.
pub fn router(opts: SimOptions) -> Router {
    let v1 = Sim {
        opts,
        route: RoutePrefix::V1,
        store: Arc::default(),
    };
    let openai = Sim {
        route: RoutePrefix::OpenAi,
        ..v1.clone()
    };
    Router::new()
        .nest("/v1", api(v1))
        .nest("/openai/v1", api(openai))
        .fallback(invalid_url)
        .layer(middleware::from_fn(envelope))
}

fn api(sim: Sim) -> Router {
    Router::new()
        .route("/chat/completions", post(chat_completions))
        .route("/responses", post(create_response))
        .route("/responses/input_tokens", post(input_tokens))
        .route("/responses/{id}", get(get_response).delete(delete_response))
        .route("/responses/{id}/cancel", post(cancel_response))
        .route("/responses/{id}/input_items", get(list_input_items))
        .route("/models", get(list_models))
        .route("/models/{id}", get(get_model))
        .method_not_allowed_fallback(invalid_url)
        .with_state(sim)
}

/// Which of the two bedrock-mantle prefixes a request arrived on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RoutePrefix {
    V1,
    OpenAi,
}

/// Per-prefix handler state; the store is shared by both prefixes.
#[derive(Clone)]
struct Sim {
    opts: SimOptions,
    route: RoutePrefix,
    store: Arc<Mutex<HashMap<String, Stored>>>,
}

impl Sim {
    fn delay(&self) -> Duration {
        self.opts.event_delay
    }

    fn check_route(&self, model: &str) -> Result<(), SimError> {
        let wanted = if model.starts_with("openai.gpt-5") || model.starts_with("google.gemma-4") {
            RoutePrefix::OpenAi
        } else {
            RoutePrefix::V1
        };
        if wanted == self.route {
            Ok(())
        } else {
            Err(SimError::validation(format!(
                "model `{model}` isn't supported on this route"
            )))
        }
    }

    /// Runs `f` on the stored response `id` if it exists and belongs to `project`.
    fn with_stored<T>(
        &self,
        id: &str,
        project: &str,
        f: impl FnOnce(&mut Stored) -> T,
    ) -> Result<T, SimError> {
        let mut store = self.store.lock().unwrap_or_else(PoisonError::into_inner);
        match store.get_mut(id) {
            Some(stored) if stored.project == project => Ok(f(stored)),
            _ => Err(SimError::response_not_found(id)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Envelope: auth, request id, project echo

/// Rejects unauthenticated requests and stamps `x-request-id` and `x-simulated-project` on every
/// response, errors included.
async fn envelope(req: Request, next: Next) -> Response {
    let project = req
        .headers()
        .get("openai-project")
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("default"));
    let mut resp = if is_authorized(req.headers()) {
        next.run(req).await
    } else {
        SimError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            "Missing or invalid credentials: send `Authorization: Bearer <key>` or `x-api-key`.",
        )
        .into_response()
    };
    let headers = resp.headers_mut();
    if let Ok(id) = HeaderValue::from_str(&hex_id("req_")) {
        headers.insert("x-amzn-requestid", id.clone());
        headers.insert("x-request-id", id);
    }
    headers.insert("x-simulated-project", project);
    resp
}

fn is_authorized(headers: &HeaderMap) -> bool {
    let bearer = headers
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|token| !token.trim().is_empty());
    let api_key = headers.get("x-api-key").is_some_and(|v| !v.is_empty());
    bearer || api_key
}

fn project_of(headers: &HeaderMap) -> String {
    headers.get("openai-project").map_or_else(
        || "default".to_owned(),
        |v| String::from_utf8_lossy(v.as_bytes()).into_owned(),
    )
}

// ---------------------------------------------------------------------------------------------
// Errors

/// An OpenAI-shaped error: `{"error":{message,type,param,code}}` with a status.
#[derive(Debug)]
struct SimError {
    status: StatusCode,
    kind: &'static str,
    code: Option<&'static str>,
    message: String,
}

impl SimError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code,
            message: message.into(),
        }
    }

    fn validation(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("validation_error"),
            message,
        )
    }

    fn response_not_found(id: &str) -> Self {
        let message = format!("Response with id '{id}' not found.");
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            Some("not_found"),
            message,
        )
    }
}

impl IntoResponse for SimError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message, "type": self.kind, "param": null, "code": self.code,
        }});
        (self.status, Json(body)).into_response()
    }
}

async fn invalid_url(method: Method, OriginalUri(uri): OriginalUri) -> SimError {
    let message = format!("Invalid URL ({method} {})", uri.path());
    SimError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        None,
        message,
    )
}

/// Parses a JSON body the way bedrock-mantle (an axum service) reports failures.
fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, SimError> {
    serde_json::from_slice(body).map_err(|err| {
        SimError::validation(format!(
            "Failed to deserialize the JSON body into the target type: {err}"
        ))
    })
}

// ---------------------------------------------------------------------------------------------
// Deterministic reply and usage

/// The canned answer, cut to the token budget (one word is one token here).
struct Reply {
    words: Vec<String>,
    truncated: bool,
}

impl Reply {
    fn new(model: &str, max_tokens: Option<u64>) -> Self {
        let sentence = format!(
            "Hello from the simulated bedrock-mantle! This is {model} answering your request \
             with a short deterministic reply."
        );
        let mut words: Vec<String> = sentence.split_whitespace().map(str::to_owned).collect();
        let cap = max_tokens.map_or(usize::MAX, |m| usize::try_from(m).unwrap_or(usize::MAX));
        let truncated = words.len() > cap;
        words.truncate(cap);
        Self { words, truncated }
    }

    fn text(&self) -> String {
        self.words.join(" ")
    }

    /// Stream deltas; their concatenation is exactly [`Reply::text`].
    fn deltas(&self) -> impl Iterator<Item = String> + '_ {
        let mut iter = self.words.iter();
        let first = iter.next().cloned();
        first.into_iter().chain(iter.map(|w| format!(" {w}")))
    }
}

#[derive(Clone, Copy, Debug)]
struct Usage {
    input: u64,
    cached: u64,
    output: u64,
    reasoning: u64,
}

impl Usage {
    /// Input ≈ chars/4 + 8; long prompts get half of it (in 128-token blocks) from the cache;
    /// gpt-oss models spend 8 reasoning tokens, counted inside the output tokens.
    fn new(prompt_chars: usize, model: &str, reply: &Reply) -> Self {
        let input = u64::try_from(prompt_chars / 4)
            .unwrap_or(u64::MAX)
            .saturating_add(8);
        let cached = if input >= 1024 {
            input / 2 / 128 * 128
        } else {
            0
        };
        let reasoning = if model.starts_with("openai.gpt-oss") {
            8
        } else {
            0
        };
        let words = u64::try_from(reply.words.len()).unwrap_or(u64::MAX);
        Self {
            input,
            cached,
            output: words + reasoning,
            reasoning,
        }
    }

    fn total(self) -> u64 {
        self.input + self.output
    }

    fn chat_json(self) -> Value {
        json!({
            "prompt_tokens": self.input,
            "completion_tokens": self.output,
            "total_tokens": self.total(),
            "prompt_tokens_details": {"cached_tokens": self.cached},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning},
        })
    }

    fn responses_json(self) -> Value {
        json!({
            "input_tokens": self.input,
            "input_tokens_details": {"cached_tokens": self.cached},
            "output_tokens": self.output,
            "output_tokens_details": {"reasoning_tokens": self.reasoning},
            "total_tokens": self.total(),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Chat Completions

#[derive(Deserialize)]
struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ChatMessage {
    content: Option<Value>,
}

#[derive(Deserialize)]
struct StreamOptions {
    include_usage: Option<bool>,
}

async fn chat_completions(State(sim): State<Sim>, body: Bytes) -> Result<Response, SimError> {
    let req: ChatRequest = parse_body(&body)?;
    sim.check_route(&req.model)?;
    let prompt_chars: usize = req
        .messages
        .iter()
        .filter_map(|m| m.content.as_ref())
        .map(text_len)
        .sum();
    let reply = Reply::new(&req.model, req.max_completion_tokens.or(req.max_tokens));
    let usage = Usage::new(prompt_chars, &req.model, &reply);
    let finish_reason = if reply.truncated { "length" } else { "stop" };
    let (id, created) = (hex_id("chatcmpl-"), unix_now());

    if !req.stream.unwrap_or(false) {
        return Ok(Json(json!({
            "id": id, "object": "chat.completion", "created": created, "model": req.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": reply.text(), "refusal": null},
                "logprobs": null,
                "finish_reason": finish_reason,
            }],
            "usage": usage.chat_json(),
        }))
        .into_response());
    }

    let include_usage = req
        .stream_options
        .and_then(|o| o.include_usage)
        .unwrap_or(false);
    let chunk = |choices: Value, usage: Option<Value>| {
        let mut chunk = json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": req.model,
            "choices": choices,
        });
        if include_usage {
            chunk["usage"] = usage.unwrap_or(Value::Null);
        }
        Bytes::from(format!("data: {chunk}\n\n"))
    };
    let mut events: Vec<Bytes> = reply
        .deltas()
        .enumerate()
        .map(|(i, delta)| {
            let delta = if i == 0 {
                json!({"role": "assistant", "content": delta})
            } else {
                json!({"content": delta})
            };
            chunk(
                json!([{"index": 0, "delta": delta, "finish_reason": null}]),
                None,
            )
        })
        .collect();
    events.push(chunk(
        json!([{"index": 0, "delta": {}, "finish_reason": finish_reason}]),
        None,
    ));
    if include_usage {
        events.push(chunk(json!([]), Some(usage.chat_json())));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    Ok(sse(events, sim.delay()))
}

/// Characters of text in a message content: a string, or an array of parts with `text`.
fn text_len(content: &Value) -> usize {
    match content {
        Value::String(s) => s.chars().count(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .map(|t| t.chars().count())
            .sum(),
        _ => 0,
    }
}

/// A `text/event-stream` response sending each event as its own body frame, `delay` apart.
fn sse(events: Vec<Bytes>, delay: Duration) -> Response {
    let stream = futures_util::stream::unfold(
        (events.into_iter(), true),
        move |(mut it, first)| async move {
            let event = it.next()?;
            if !first {
                tokio::time::sleep(delay).await;
            }
            Some((Ok::<_, Infallible>(event), (it, false)))
        },
    );
    let headers = [
        (CONTENT_TYPE, "text/event-stream"),
        (CACHE_CONTROL, "no-cache"),
    ];
    (headers, Body::from_stream(stream)).into_response()
}

// ---------------------------------------------------------------------------------------------
// Responses

#[derive(Deserialize)]
struct ResponsesRequest {
    model: String,
    input: Option<Value>,
    instructions: Option<String>,
    stream: Option<bool>,
    max_output_tokens: Option<u64>,
    background: Option<bool>,
    store: Option<bool>,
    metadata: Option<Value>,
}

/// Everything needed to render a response object at any point of its life.
struct ResponseRun {
    id: String,
    msg_id: String,
    created_at: u64,
    model: String,
    instructions: Option<String>,
    max_output_tokens: Option<u64>,
    background: bool,
    store: bool,
    metadata: Value,
    reply: Reply,
    usage: Usage,
}

impl ResponseRun {
    fn terminal_status(&self) -> &'static str {
        if self.reply.truncated {
            "incomplete"
        } else {
            "completed"
        }
    }

    fn text_part(&self) -> Value {
        json!({"type": "output_text", "text": self.reply.text(), "annotations": [], "logprobs": []})
    }

    fn message(&self, status: &str, content: &Value) -> Value {
        json!({
            "type": "message", "id": self.msg_id, "status": status, "role": "assistant",
            "content": content,
        })
    }

    /// The response object in `status`; output and usage are only present once it is terminal.
    fn object(&self, status: &str) -> Value {
        let done = matches!(status, "completed" | "incomplete");
        let output = if done {
            json!([self.message(status, &json!([self.text_part()]))])
        } else {
            json!([])
        };
        let incomplete_details = if status == "incomplete" {
            json!({"reason": "max_output_tokens"})
        } else {
            Value::Null
        };
        json!({
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "background": self.background, "error": null, "incomplete_details": incomplete_details,
            "instructions": self.instructions, "max_output_tokens": self.max_output_tokens,
            "metadata": self.metadata, "model": self.model, "output": output,
            "parallel_tool_calls": true, "previous_response_id": null,
            "reasoning": {"effort": null, "summary": null}, "service_tier": "default",
            "store": self.store, "temperature": 1.0, "text": {"format": {"type": "text"}},
            "tool_choice": "auto", "tools": [], "top_p": 1.0, "truncation": "disabled",
            "usage": if done { self.usage.responses_json() } else { Value::Null },
            "user": null,
        })
    }

    /// The full event sequence of a streamed run, `sequence_number` rising from 0.
    fn events(&self) -> Vec<Bytes> {
        let (item, part) = (self.msg_id.as_str(), self.text_part());
        let empty_part =
            json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []});
        let status = self.terminal_status();
        let mut payloads = vec![
            (
                "response.created",
                json!({"response": self.object("in_progress")}),
            ),
            (
                "response.in_progress",
                json!({"response": self.object("in_progress")}),
            ),
            (
                "response.output_item.added",
                json!({"output_index": 0, "item": self.message("in_progress", &json!([]))}),
            ),
            (
                "response.content_part.added",
                json!({"item_id": item, "output_index": 0, "content_index": 0, "part": empty_part}),
            ),
        ];
        payloads.extend(self.reply.deltas().map(|delta| {
            let data = json!({
                "item_id": item, "output_index": 0, "content_index": 0, "delta": delta, "logprobs": [],
            });
            ("response.output_text.delta", data)
        }));
        payloads.extend([
            (
                "response.output_text.done",
                json!({
                    "item_id": item, "output_index": 0, "content_index": 0,
                    "text": self.reply.text(), "logprobs": [],
                }),
            ),
            (
                "response.content_part.done",
                json!({"item_id": item, "output_index": 0, "content_index": 0, "part": part}),
            ),
            (
                "response.output_item.done",
                json!({"output_index": 0, "item": self.message(status, &json!([part]))}),
            ),
            (
                if self.reply.truncated {
                    "response.incomplete"
                } else {
                    "response.completed"
                },
                json!({"response": self.object(status)}),
            ),
        ]);
        payloads
            .into_iter()
            .enumerate()
            .map(|(seq, (kind, mut data))| {
                data["type"] = json!(kind);
                data["sequence_number"] = json!(seq);
                Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
            })
            .collect()
    }
}

/// A stored response, visible only to the project that created it.
struct Stored {
    project: String,
    run: ResponseRun,
    input_items: Vec<Value>,
    /// Set for background runs: when they were queued.
    queued_at: Option<Instant>,
    cancelled: bool,
}

impl Stored {
    /// Background runs are `queued` for one event delay, `in_progress` until three, then terminal.
    fn status(&self, delay: Duration) -> &'static str {
        if self.cancelled {
            return "cancelled";
        }
        match self.queued_at.map(|t| t.elapsed()) {
            Some(elapsed) if elapsed < delay => "queued",
            Some(elapsed) if elapsed < delay.saturating_mul(3) => "in_progress",
            _ => self.run.terminal_status(),
        }
    }

    fn view(&self, delay: Duration) -> Value {
        self.run.object(self.status(delay))
    }
}

/// Normalises `input` into message items and counts its characters.
fn input_items(input: Option<&Value>) -> Result<(Vec<Value>, usize), SimError> {
    let items: Vec<Value> = match input {
        None => Vec::new(),
        Some(Value::String(text)) => vec![json!({"role": "user", "content": text})],
        Some(Value::Array(items)) => items.clone(),
        Some(_) => {
            return Err(SimError::validation(
                "`input` must be a string or an array of items",
            ));
        }
    };
    let mut chars = 0;
    let items = items
        .into_iter()
        .map(|mut item| {
            if let Some(text) = item.get("content").and_then(Value::as_str) {
                item["content"] = json!([{"type": "input_text", "text": text}]);
            }
            chars += item.get("content").map_or(0, text_len);
            chars += item.get("output").map_or(0, text_len);
            if item.get("type").is_none() {
                item["type"] = json!("message");
            }
            if item.get("id").is_none() {
                item["id"] = json!(hex_id("msg_"));
            }
            item
        })
        .collect();
    Ok((items, chars))
}

async fn create_response(
    State(sim): State<Sim>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, SimError> {
    let req: ResponsesRequest = parse_body(&body)?;
    sim.check_route(&req.model)?;
    let (items, input_chars) = input_items(req.input.as_ref())?;
    let prompt_chars = input_chars + req.instructions.as_deref().map_or(0, |s| s.chars().count());
    let reply = Reply::new(&req.model, req.max_output_tokens);
    let stream = req.stream.unwrap_or(false);
    let background = req.background.unwrap_or(false);
    let run = ResponseRun {
        id: hex_id("resp_"),
        msg_id: hex_id("msg_"),
        created_at: unix_now(),
        usage: Usage::new(prompt_chars, &req.model, &reply),
        model: req.model,
        instructions: req.instructions,
        max_output_tokens: req.max_output_tokens,
        background,
        store: req.store.unwrap_or(true),
        metadata: req.metadata.unwrap_or_else(|| json!({})),
        reply,
    };
    let resp = if stream {
        sse(run.events(), sim.delay())
    } else if background {
        Json(run.object("queued")).into_response()
    } else {
        Json(run.object(run.terminal_status())).into_response()
    };
    if run.store || background {
        let stored = Stored {
            project: project_of(&headers),
            input_items: items,
            queued_at: (background && !stream).then(Instant::now),
            cancelled: false,
            run,
        };
        let mut store = sim.store.lock().unwrap_or_else(PoisonError::into_inner);
        store.insert(stored.run.id.clone(), stored);
    }
    Ok(resp)
}

async fn get_response(
    State(sim): State<Sim>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, SimError> {
    sim.with_stored(&id, &project_of(&headers), |s| s.view(sim.delay()))
        .map(Json)
}

async fn delete_response(
    State(sim): State<Sim>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, SimError> {
    sim.with_stored(&id, &project_of(&headers), |_| ())?;
    sim.store
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(&id);
    Ok(Json(
        json!({"id": id, "object": "response", "deleted": true}),
    ))
}

async fn cancel_response(
    State(sim): State<Sim>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, SimError> {
    sim.with_stored(&id, &project_of(&headers), |s| {
        if s.queued_at.is_none() {
            return Err(SimError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                "Only responses created with background=true can be cancelled.",
            ));
        }
        if matches!(s.status(sim.delay()), "queued" | "in_progress") {
            s.cancelled = true;
        }
        Ok(s.view(sim.delay()))
    })?
    .map(Json)
}

async fn list_input_items(
    State(sim): State<Sim>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<Value>, SimError> {
    let data = sim.with_stored(&id, &project_of(&headers), |s| s.input_items.clone())?;
    let first_id = data.first().and_then(|i| i.get("id")).cloned();
    let last_id = data.last().and_then(|i| i.get("id")).cloned();
    Ok(Json(json!({
        "object": "list", "data": data, "first_id": first_id, "last_id": last_id, "has_more": false,
    })))
}

#[derive(Deserialize)]
struct InputTokensRequest {
    model: Option<String>,
    input: Option<Value>,
    instructions: Option<String>,
}

async fn input_tokens(State(sim): State<Sim>, body: Bytes) -> Result<Json<Value>, SimError> {
    let req: InputTokensRequest = parse_body(&body)?;
    let model = req.model.unwrap_or_default();
    if !model.is_empty() {
        sim.check_route(&model)?;
    }
    let (_, chars) = input_items(req.input.as_ref())?;
    let chars = chars + req.instructions.as_deref().map_or(0, |s| s.chars().count());
    let usage = Usage::new(
        chars,
        &model,
        &Reply {
            words: Vec::new(),
            truncated: false,
        },
    );
    Ok(Json(
        json!({"object": "response.input_tokens", "input_tokens": usage.input}),
    ))
}

// ---------------------------------------------------------------------------------------------
// Models

const MODELS: [&str; 4] = [
    "openai.gpt-oss-120b",
    "openai.gpt-oss-20b",
    "openai.gpt-5.4",
    "deepseek.v3.2",
];

fn model_object(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 1_754_006_400, "owned_by": "system", "status": "available"})
}

async fn list_models() -> Json<Value> {
    let data: Vec<Value> = MODELS.iter().map(|id| model_object(id)).collect();
    Json(json!({"object": "list", "data": data}))
}

async fn get_model(Path(id): Path<String>) -> Result<Json<Value>, SimError> {
    if MODELS.contains(&id.as_str()) {
        Ok(Json(model_object(&id)))
    } else {
        let message = format!("The model `{id}` does not exist.");
        Err(SimError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            Some("model_not_found"),
            message,
        ))
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers

fn hex_id(prefix: &str) -> String {
    format!(
        "{prefix}{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn app(delay_ms: u64) -> Router {
        router(SimOptions {
            event_delay: Duration::from_millis(delay_ms),
        })
    }

    fn request(method: &str, path: &str, project: Option<&str>, body: Option<Value>) -> Request {
        let mut builder = Request::builder()
            .method(method)
            .uri(path)
            .header(AUTHORIZATION, "Bearer test");
        if let Some(project) = project {
            builder = builder.header("openai-project", project);
        }
        let body = body.map_or_else(Body::empty, |b| Body::from(b.to_string()));
        builder
            .header(CONTENT_TYPE, "application/json")
            .body(body)
            .unwrap()
    }

    async fn send(app: &Router, req: Request) -> (StatusCode, HeaderMap, Value) {
        let resp = app.clone().oneshot(req).await.unwrap();
        let (status, headers) = (resp.status(), resp.headers().clone());
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        (status, headers, serde_json::from_slice(&bytes).unwrap())
    }

    /// Reads a streamed body frame by frame, checking each frame holds exactly one SSE event.
    async fn frames(app: &Router, req: Request) -> Vec<String> {
        let resp = app.clone().oneshot(req).await.unwrap();
        assert_eq!(resp.headers()[CONTENT_TYPE], "text/event-stream");
        let mut body = resp.into_body();
        let mut events = Vec::new();
        while let Some(frame) = body.frame().await {
            let data = frame.unwrap().into_data().unwrap();
            let text = String::from_utf8(data.to_vec()).unwrap();
            assert!(
                text.ends_with("\n\n") && text.matches("\n\n").count() == 1,
                "{text:?}"
            );
            events.push(text);
        }
        events
    }

    fn data(event: &str) -> Value {
        let line = event
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .unwrap();
        serde_json::from_str(line).unwrap()
    }

    fn chat(stream: bool, include_usage: Option<bool>) -> Value {
        let mut body = json!({
            "model": "openai.gpt-oss-120b", "stream": stream,
            "messages": [{"role": "user", "content": "Say hello to the proxy, please."}],
        });
        if let Some(include) = include_usage {
            body["stream_options"] = json!({"include_usage": include});
        }
        body
    }

    #[tokio::test]
    async fn chat_non_stream_usage_is_consistent() {
        let app = app(1);
        let (status, headers, body) = send(
            &app,
            request(
                "POST",
                "/v1/chat/completions",
                None,
                Some(chat(false, None)),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert!(
            headers["x-request-id"]
                .to_str()
                .unwrap()
                .starts_with("req_")
        );
        assert_eq!(headers["x-simulated-project"], "default");
        assert_eq!(body["object"], "chat.completion");
        assert!(body["id"].as_str().unwrap().starts_with("chatcmpl-"));
        assert_eq!(body["choices"][0]["finish_reason"], "stop");
        let usage = &body["usage"];
        let (prompt, completion) = (
            usage["prompt_tokens"].as_u64().unwrap(),
            usage["completion_tokens"].as_u64().unwrap(),
        );
        assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion);
        assert_eq!(prompt, 31 / 4 + 8);
        let words = body["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .split_whitespace()
            .count();
        assert_eq!(completion, words as u64 + 8);
        assert_eq!(usage["completion_tokens_details"]["reasoning_tokens"], 8);
    }

    #[tokio::test]
    async fn chat_max_tokens_truncates_with_length() {
        let app = app(1);
        let mut req = chat(false, None);
        req["model"] = json!("deepseek.v3.2");
        req["max_tokens"] = json!(3);
        let (_, _, body) = send(
            &app,
            request("POST", "/v1/chat/completions", None, Some(req)),
        )
        .await;
        assert_eq!(body["choices"][0]["finish_reason"], "length");
        assert_eq!(body["choices"][0]["message"]["content"], "Hello from the");
        assert_eq!(body["usage"]["completion_tokens"], 3);
    }

    #[tokio::test]
    async fn chat_stream_without_include_usage_has_no_usage() {
        let app = app(1);
        let events = frames(
            &app,
            request("POST", "/v1/chat/completions", None, Some(chat(true, None))),
        )
        .await;
        assert_eq!(events.last().unwrap(), "data: [DONE]\n\n");
        let chunks: Vec<Value> = events[..events.len() - 1].iter().map(|e| data(e)).collect();
        assert!(
            chunks
                .iter()
                .all(|c| c.get("usage").is_none_or(Value::is_null))
        );
        assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(
            chunks.last().unwrap()["choices"][0]["finish_reason"],
            "stop"
        );
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert!(text.starts_with("Hello from the simulated bedrock-mantle!"));
    }

    #[tokio::test]
    async fn chat_stream_usage_chunk_follows_finish_and_precedes_done() {
        let app = app(1);
        let events = frames(
            &app,
            request(
                "POST",
                "/v1/chat/completions",
                None,
                Some(chat(true, Some(true))),
            ),
        )
        .await;
        let n = events.len();
        assert_eq!(events[n - 1], "data: [DONE]\n\n");
        let (finish, usage_chunk) = (data(&events[n - 3]), data(&events[n - 2]));
        assert_eq!(finish["choices"][0]["finish_reason"], "stop");
        assert!(finish["usage"].is_null());
        assert_eq!(usage_chunk["choices"], json!([]));
        let usage = &usage_chunk["usage"];
        assert_eq!(
            usage["total_tokens"],
            usage["prompt_tokens"].as_u64().unwrap() + usage["completion_tokens"].as_u64().unwrap()
        );
        let with_usage = events[..n - 1]
            .iter()
            .filter(|e| !data(e)["usage"].is_null())
            .count();
        assert_eq!(with_usage, 1);
    }

    #[tokio::test]
    async fn responses_stream_ends_with_completed_usage() {
        let app = app(1);
        let body = json!({"model": "openai.gpt-5.4", "input": "Hi there", "instructions": "Be brief", "stream": true});
        let events = frames(
            &app,
            request("POST", "/openai/v1/responses", None, Some(body)),
        )
        .await;
        let payloads: Vec<Value> = events.iter().map(|e| data(e)).collect();
        for (i, (event, payload)) in events.iter().zip(&payloads).enumerate() {
            assert_eq!(payload["sequence_number"], i);
            assert_eq!(
                event.lines().next().unwrap(),
                format!("event: {}", payload["type"].as_str().unwrap())
            );
        }
        assert_eq!(payloads[0]["type"], "response.created");
        assert!(payloads[0]["response"]["usage"].is_null());
        let last = payloads.last().unwrap();
        assert_eq!(last["type"], "response.completed");
        let usage = &last["response"]["usage"];
        assert_eq!(usage["input_tokens"], 16 / 4 + 8);
        assert_eq!(
            usage["total_tokens"],
            usage["input_tokens"].as_u64().unwrap() + usage["output_tokens"].as_u64().unwrap()
        );
        let deltas: String = payloads
            .iter()
            .filter(|p| p["type"] == "response.output_text.delta")
            .map(|p| p["delta"].as_str().unwrap())
            .collect();
        assert_eq!(
            last["response"]["output"][0]["content"][0]["text"],
            deltas.as_str()
        );
        assert!(!events.iter().any(|e| e.contains("[DONE]")));
    }

    #[tokio::test]
    async fn responses_stream_truncation_is_incomplete() {
        let app = app(1);
        let body = json!({"model": "openai.gpt-oss-20b", "input": "Hi", "stream": true, "max_output_tokens": 2});
        let events = frames(&app, request("POST", "/v1/responses", None, Some(body))).await;
        let last = data(events.last().unwrap());
        assert_eq!(last["type"], "response.incomplete");
        assert_eq!(
            last["response"]["incomplete_details"]["reason"],
            "max_output_tokens"
        );
        assert_eq!(last["response"]["usage"]["output_tokens"], 2 + 8);
    }

    #[tokio::test]
    async fn wrong_prefix_is_rejected() {
        let app = app(1);
        for (path, model) in [
            ("/openai/v1/chat/completions", "openai.gpt-oss-120b"),
            ("/v1/responses", "openai.gpt-5.4"),
        ] {
            let body = json!({"model": model, "messages": [], "input": "x"});
            let (status, _, body) = send(&app, request("POST", path, None, Some(body))).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(
                body["error"]["message"],
                format!("model `{model}` isn't supported on this route")
            );
            assert_eq!(body["error"]["code"], "validation_error");
            assert_eq!(body["error"]["type"], "invalid_request_error");
        }
        let body = json!({"model": "google.gemma-4-27b", "input": "x"});
        let (status, _, _) = send(
            &app,
            request("POST", "/openai/v1/responses", None, Some(body)),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn auth_malformed_json_and_unknown_paths() {
        let app = app(1);
        let unauthenticated = Request::post("/v1/chat/completions")
            .body(Body::from("{}"))
            .unwrap();
        let (status, headers, body) = send(&app, unauthenticated).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"]["code"], "invalid_api_key");
        assert!(headers.contains_key("x-request-id"));
        let with_key = Request::get("/v1/models")
            .header("x-api-key", "k")
            .body(Body::empty())
            .unwrap();
        let (status, _, body) = send(&app, with_key).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["data"].as_array().unwrap().len(), 4);

        let bad = request("POST", "/v1/chat/completions", None, None);
        let bad = bad.map(|_| Body::from("{\"model\": 3"));
        let (status, _, body) = send(&app, bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["code"], "validation_error");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("Failed to deserialize the JSON body into the target type: ")
        );

        for (method, path) in [
            ("GET", "/v1/nope"),
            ("GET", "/v1/chat/completions"),
            ("GET", "/v1/models/nope"),
        ] {
            let (status, _, body) = send(&app, request(method, path, None, None)).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
            assert!(body["error"]["message"].is_string());
        }
    }

    #[tokio::test]
    async fn background_response_reaches_completed() {
        // A zero delay makes the queued -> completed transition due at once, without sleeping.
        let app = app(0);
        let body = json!({"model": "openai.gpt-oss-120b", "input": [{"role": "user", "content": "Hi"}], "background": true});
        let (_, _, created) = send(&app, request("POST", "/v1/responses", None, Some(body))).await;
        assert_eq!(created["status"], "queued");
        assert!(created["usage"].is_null());
        let id = created["id"].as_str().unwrap();
        let (status, _, fetched) = send(
            &app,
            request("GET", &format!("/v1/responses/{id}"), None, None),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(fetched["status"], "completed");
        assert!(fetched["usage"]["total_tokens"].as_u64().unwrap() > 0);
        let (_, _, items) = send(
            &app,
            request(
                "GET",
                &format!("/v1/responses/{id}/input_items"),
                None,
                None,
            ),
        )
        .await;
        assert_eq!(
            items["data"][0]["content"][0],
            json!({"type": "input_text", "text": "Hi"})
        );
        assert_eq!(items["first_id"], items["data"][0]["id"]);
        let (_, _, deleted) = send(
            &app,
            request("DELETE", &format!("/v1/responses/{id}"), None, None),
        )
        .await;
        assert_eq!(deleted["deleted"], true);
        let (status, _, _) = send(
            &app,
            request("GET", &format!("/v1/responses/{id}"), None, None),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn background_response_can_be_cancelled() {
        let app = router(SimOptions {
            event_delay: Duration::from_secs(100),
        });
        let body = json!({"model": "openai.gpt-oss-120b", "input": "Hi", "background": true});
        let (_, _, created) = send(&app, request("POST", "/v1/responses", None, Some(body))).await;
        let id = created["id"].as_str().unwrap();
        let (_, _, cancelled) = send(
            &app,
            request("POST", &format!("/v1/responses/{id}/cancel"), None, None),
        )
        .await;
        assert_eq!(cancelled["status"], "cancelled");
        let (_, _, fetched) = send(
            &app,
            request("GET", &format!("/v1/responses/{id}"), None, None),
        )
        .await;
        assert_eq!(fetched["status"], "cancelled");
    }

    #[tokio::test]
    async fn stored_responses_are_project_scoped() {
        let app = app(1);
        let body = json!({"model": "openai.gpt-oss-120b", "input": "Hi"});
        let (_, headers, created) = send(
            &app,
            request("POST", "/v1/responses", Some("proj_a"), Some(body)),
        )
        .await;
        assert_eq!(headers["x-simulated-project"], "proj_a");
        assert_eq!(created["status"], "completed");
        assert_eq!(created["output"][0]["content"][0]["type"], "output_text");
        let path = format!("/v1/responses/{}", created["id"].as_str().unwrap());
        let (status, _, _) = send(&app, request("GET", &path, Some("proj_b"), None)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _, _) = send(&app, request("GET", &path, None, None)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, _, fetched) = send(&app, request("GET", &path, Some("proj_a"), None)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(fetched, created);
    }

    #[tokio::test]
    async fn input_tokens_counts_instructions_and_input() {
        let app = app(1);
        let body = json!({"model": "openai.gpt-oss-120b", "input": "x".repeat(40), "instructions": "y".repeat(8)});
        let (_, _, counted) = send(
            &app,
            request("POST", "/v1/responses/input_tokens", None, Some(body)),
        )
        .await;
        assert_eq!(
            counted,
            json!({"object": "response.input_tokens", "input_tokens": 48 / 4 + 8})
        );
    }

    #[test]
    fn long_prompts_are_partly_cached() {
        let reply = Reply::new("deepseek.v3.2", None);
        let usage = Usage::new(4 * 3000, "deepseek.v3.2", &reply);
        assert_eq!(
            (usage.input, usage.cached, usage.reasoning),
            (3008, 1408, 0)
        );
        assert_eq!(Usage::new(40, "deepseek.v3.2", &reply).cached, 0);
    }
}
