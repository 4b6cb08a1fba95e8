//! The benchmark's fake bedrock-mantle: answers chat completions and responses, streamed and
//! not, from pre-rendered templates, so that it costs next to nothing per call.
//!
//! ```text
//! bench-upstream [--listen 127.0.0.1:0] [--events 20] [--event-delay-ms 0] [--burst]
//! ```
//! Prints `listening on ADDR` once bound. Answers, for any path ending in:
//! - `/chat/completions`: a `chat.completion` JSON (~800 bytes) with `usage`; with
//!   `"stream": true`, `--events` content chunks, a `finish_reason` chunk, the usage-only chunk
//!   (`"choices":[]`) when `stream_options.include_usage` is true, then `data: [DONE]`.
//! - `/responses`: a `response` JSON (~1.2 KB) with `usage`; streamed: `response.created`,
//!   `response.in_progress`, `output_item.added`, `content_part.added`, `--events`
//!   `response.output_text.delta` events, `output_text.done`, `content_part.done`,
//!   `output_item.done` and `response.completed` carrying `response.usage`.
//!
//! Ids (`chatcmpl-`, `resp_`, `msg_`, `x-request-id: req_`) are unique per call, as upstream.
//! Each stream event is its own body frame and its own write (the upstream generates tokens one
//! at a time, so a proxy reads and writes per event, not per response). `--burst` instead
//! hands all events to the connection at once (one write per stream, as a fast upstream that
//! had the whole answer would). `--event-delay-ms` spaces events in time: the slow mode of the
//! memory scenario.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use memchr::memmem;
use tokio::net::TcpListener;

/// Stands for a per-call id in templates; 24 characters, replaced by 24 hex digits.
const ID_MARK: &str = "@@@@@@@@@@@@@@@@@@@@@@@@";
const MODEL: &str = "openai.gpt-oss-120b";
const CREATED: u64 = 1_764_250_000;
/// The assistant's answer, cut into `--events` deltas when streamed.
const ANSWER: &str = "A reverse proxy in front of a model endpoint should be invisible: it \
    forwards each call, reads the token usage from the answer as it passes, and records what \
    the call cost against the right project. Keeping that work off the response path (a queue \
    to a background writer, no copies of the body, no parsing beyond the fields it needs) is \
    what lets it add well under a millisecond to every call while still metering all of them.";

struct Args {
    listen: SocketAddr,
    events: usize,
    event_delay: Duration,
    burst: bool,
}

const USAGE: &str =
    "usage: bench-upstream [--listen ADDR] [--events N] [--event-delay-ms MS] [--burst]";

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        listen: "127.0.0.1:0".parse()?,
        events: 20,
        event_delay: Duration::ZERO,
        burst: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => args.listen = value()?.parse().context("--listen")?,
            "--events" => args.events = value()?.parse().context("--events")?,
            "--event-delay-ms" => {
                args.event_delay = Duration::from_millis(value()?.parse().context("--delay")?);
            }
            "--burst" => args.burst = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => anyhow::bail!("unknown argument {other}; {USAGE}"),
        }
    }
    anyhow::ensure!(args.events >= 1, "--events must be at least 1");
    Ok(args)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    // One thread: the harness pins this process to the load generator's core.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    println!("listening on {}", listener.local_addr()?);
    let app = Arc::new(App::new(args.events, args.event_delay, args.burst));
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(err) => {
                // Out of descriptors and the like: keep serving the open connections.
                eprintln!("accept failed: {err}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(app.handle(req).await) }
            });
            // Connection errors (a client gone mid-answer) end that connection only.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// A rendered answer with the places where the per-call id goes.
struct Template {
    bytes: Vec<u8>,
    id_at: Vec<usize>,
    /// End offset of each event (streams), so one buffer is cut into per-event frames.
    event_ends: Vec<usize>,
}

impl Template {
    fn new(events: &[String]) -> Self {
        let mut bytes = Vec::new();
        let mut event_ends = Vec::with_capacity(events.len());
        for e in events {
            bytes.extend_from_slice(e.as_bytes());
            event_ends.push(bytes.len());
        }
        let id_at = memmem::find_iter(&bytes, ID_MARK.as_bytes()).collect();
        Self {
            bytes,
            id_at,
            event_ends,
        }
    }

    /// The answer with `id` in every id slot, one frame per event.
    fn render(&self, id: &[u8; 24]) -> Vec<Bytes> {
        let mut buf = BytesMut::from(&self.bytes[..]);
        for &at in &self.id_at {
            buf[at..at + 24].copy_from_slice(id);
        }
        let mut whole = buf.freeze();
        let mut start = 0;
        self.event_ends
            .iter()
            .map(|&end| {
                let frame = whole.split_to(end - start);
                start = end;
                frame
            })
            .collect()
    }
}

struct App {
    next_id: AtomicU64,
    event_delay: Duration,
    burst: bool,
    chat_json: Template,
    chat_stream: Template,
    chat_stream_usage: Template,
    responses_json: Template,
    responses_stream: Template,
}

impl App {
    fn new(events: usize, event_delay: Duration, burst: bool) -> Self {
        let deltas = split_answer(events);
        Self {
            next_id: AtomicU64::new(0),
            event_delay,
            burst,
            chat_json: Template::new(&[chat_json()]),
            chat_stream: Template::new(&chat_events(&deltas, false)),
            chat_stream_usage: Template::new(&chat_events(&deltas, true)),
            responses_json: Template::new(&[responses_object("completed")]),
            responses_stream: Template::new(&responses_events(&deltas)),
        }
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<Reply> {
        let (parts, body) = req.into_parts();
        let Ok(body) = body
            .collect()
            .await
            .map(http_body_util::Collected::to_bytes)
        else {
            return error(
                StatusCode::BAD_REQUEST,
                "the request body could not be read",
            );
        };
        let path = parts.uri.path();
        let chat = path.ends_with("/chat/completions");
        if parts.method != hyper::Method::POST || !(chat || path.ends_with("/responses")) {
            return error(StatusCode::NOT_FOUND, "unknown endpoint");
        }
        let stream = json_true(&body, b"\"stream\"");
        let template = match (chat, stream) {
            (true, false) => &self.chat_json,
            (true, true) if json_true(&body, b"\"include_usage\"") => &self.chat_stream_usage,
            (true, true) => &self.chat_stream,
            (false, false) => &self.responses_json,
            (false, true) => &self.responses_stream,
        };
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let id = hex24(n);
        let frames = template.render(&id);
        let mut request_id = [0u8; 28];
        request_id[..4].copy_from_slice(b"req_");
        request_id[4..].copy_from_slice(&id);
        let mut response = if stream {
            let mut r = Response::new(Reply::events(frames, self.event_delay, self.burst));
            let h = r.headers_mut();
            h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        } else {
            let mut r = Response::new(Reply::full(frames.into_iter().next().unwrap_or_default()));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        };
        if let Ok(v) = HeaderValue::from_bytes(&request_id) {
            response.headers_mut().insert("x-request-id", v);
        }
        response
    }
}

/// Whether `key` is followed by `: true` somewhere in `body` (a fake needs no full parse).
fn json_true(body: &[u8], key: &[u8]) -> bool {
    memmem::find_iter(body, key).any(|at| {
        let rest = body[at + key.len()..].trim_ascii_start();
        rest.strip_prefix(b":")
            .is_some_and(|v| v.trim_ascii_start().starts_with(b"true"))
    })
}

fn hex24(n: u64) -> [u8; 24] {
    // Mixed so that ids do not share long prefixes, like real ones.
    let mixed = u128::from(n.wrapping_mul(0x9E37_79B9_7F4A_7C15)) << 32 | u128::from(n);
    let text = format!("{mixed:024x}");
    let mut out = [b'0'; 24];
    out.copy_from_slice(&text.as_bytes()[text.len() - 24..]);
    out
}

/// `ANSWER` cut at word boundaries into `n` deltas whose concatenation is `ANSWER`.
fn split_answer(n: usize) -> Vec<String> {
    let words: Vec<&str> = ANSWER.split_inclusive(' ').collect();
    let per = words.len().div_ceil(n).max(1);
    let mut deltas: Vec<String> = words.chunks(per).map(<[&str]>::concat).collect();
    while deltas.len() < n {
        deltas.push(String::new());
    }
    deltas
}

fn chat_usage() -> &'static str {
    r#"{"prompt_tokens":87,"completion_tokens":143,"total_tokens":230,"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":61}}"#
}

fn responses_usage() -> &'static str {
    r#"{"input_tokens":87,"input_tokens_details":{"cached_tokens":0},"output_tokens":143,"output_tokens_details":{"reasoning_tokens":61},"total_tokens":230}"#
}

fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

fn chat_json() -> String {
    format!(
        r#"{{"id":"chatcmpl-{ID_MARK}","object":"chat.completion","created":{CREATED},"model":"{MODEL}","choices":[{{"index":0,"message":{{"role":"assistant","content":{},"refusal":null}},"logprobs":null,"finish_reason":"stop"}}],"usage":{},"system_fingerprint":null,"service_tier":"default"}}"#,
        json_string(ANSWER),
        chat_usage()
    )
}

fn chat_events(deltas: &[String], include_usage: bool) -> Vec<String> {
    let usage_null = if include_usage {
        r#","usage":null"#
    } else {
        ""
    };
    let chunk = |choices: &str, usage: &str| {
        format!(
            "data: {{\"id\":\"chatcmpl-{ID_MARK}\",\"object\":\"chat.completion.chunk\",\"created\":{CREATED},\"model\":\"{MODEL}\",\"choices\":{choices}{usage}}}\n\n"
        )
    };
    let mut events: Vec<String> = deltas
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let role = if i == 0 { r#""role":"assistant","# } else { "" };
            chunk(
                &format!(
                    r#"[{{"index":0,"delta":{{{role}"content":{}}},"logprobs":null,"finish_reason":null}}]"#,
                    json_string(d)
                ),
                usage_null,
            )
        })
        .collect();
    events.push(chunk(
        r#"[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]"#,
        usage_null,
    ));
    if include_usage {
        events.push(chunk("[]", &format!(r#","usage":{}"#, chat_usage())));
    }
    events.push("data: [DONE]\n\n".to_owned());
    events
}

fn message(status: &str, content: &str) -> String {
    format!(
        r#"{{"type":"message","id":"msg_{ID_MARK}","status":"{status}","role":"assistant","content":[{content}]}}"#
    )
}

fn text_part(text: &str) -> String {
    format!(
        r#"{{"type":"output_text","text":{},"annotations":[],"logprobs":[]}}"#,
        json_string(text)
    )
}

fn responses_object(status: &str) -> String {
    let done = status == "completed";
    let output = if done {
        message(status, &text_part(ANSWER))
    } else {
        String::new()
    };
    let usage = if done { responses_usage() } else { "null" };
    format!(
        r#"{{"id":"resp_{ID_MARK}","object":"response","created_at":{CREATED},"status":"{status}","background":false,"error":null,"incomplete_details":null,"instructions":null,"max_output_tokens":null,"metadata":{{}},"model":"{MODEL}","output":[{output}],"parallel_tool_calls":true,"previous_response_id":null,"reasoning":{{"effort":"medium","summary":null}},"service_tier":"default","store":true,"temperature":1.0,"text":{{"format":{{"type":"text"}}}},"tool_choice":"auto","tools":[],"top_p":1.0,"truncation":"disabled","usage":{usage},"user":null}}"#
    )
}

fn responses_events(deltas: &[String]) -> Vec<String> {
    let item = format!("msg_{ID_MARK}");
    let mut payloads: Vec<(&str, String)> = vec![
        (
            "response.created",
            format!(r#""response":{}"#, responses_object("in_progress")),
        ),
        (
            "response.in_progress",
            format!(r#""response":{}"#, responses_object("in_progress")),
        ),
        (
            "response.output_item.added",
            format!(r#""output_index":0,"item":{}"#, message("in_progress", "")),
        ),
        (
            "response.content_part.added",
            format!(
                r#""item_id":"{item}","output_index":0,"content_index":0,"part":{}"#,
                text_part("")
            ),
        ),
    ];
    payloads.extend(deltas.iter().map(|d| {
        (
            "response.output_text.delta",
            format!(
                r#""item_id":"{item}","output_index":0,"content_index":0,"delta":{},"logprobs":[]"#,
                json_string(d)
            ),
        )
    }));
    payloads.extend([
        (
            "response.output_text.done",
            format!(
                r#""item_id":"{item}","output_index":0,"content_index":0,"text":{},"logprobs":[]"#,
                json_string(ANSWER)
            ),
        ),
        (
            "response.content_part.done",
            format!(
                r#""item_id":"{item}","output_index":0,"content_index":0,"part":{}"#,
                text_part(ANSWER)
            ),
        ),
        (
            "response.output_item.done",
            format!(
                r#""output_index":0,"item":{}"#,
                message("completed", &text_part(ANSWER))
            ),
        ),
        (
            "response.completed",
            format!(r#""response":{}"#, responses_object("completed")),
        ),
    ]);
    payloads
        .into_iter()
        .enumerate()
        .map(|(seq, (kind, fields))| {
            format!(
                "event: {kind}\ndata: {{\"type\":\"{kind}\",\"sequence_number\":{seq},{fields}}}\n\n"
            )
        })
        .collect()
}

fn error(status: StatusCode, message: &str) -> Response<Reply> {
    let body = format!(
        r#"{{"error":{{"message":{},"type":"invalid_request_error","param":null,"code":null}}}}"#,
        json_string(message)
    );
    let mut r = Response::new(Reply::full(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// A response body: one buffer, or events sent one frame (and one write) at a time.
struct Reply {
    frames: std::vec::IntoIter<Bytes>,
    /// Remaining length, for `Content-Length` on whole answers.
    len: Option<u64>,
    delay: Duration,
    /// Between events: the pause still running, or `None` when the next event may go.
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Between events without a delay: yielded once already, so that the connection has
    /// written the previous event.
    yielded: bool,
    /// Never yield between events: the connection writes them together.
    burst: bool,
    first: bool,
}

impl Reply {
    fn full(body: Bytes) -> Self {
        Self {
            len: Some(body.len() as u64),
            frames: vec![body].into_iter(),
            delay: Duration::ZERO,
            pause: None,
            yielded: false,
            burst: true,
            first: true,
        }
    }

    fn events(frames: Vec<Bytes>, delay: Duration, burst: bool) -> Self {
        Self {
            frames: frames.into_iter(),
            len: None,
            delay,
            pause: None,
            yielded: false,
            burst,
            first: true,
        }
    }
}

impl http_body::Body for Reply {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if !this.first {
            if this.delay.is_zero() {
                if !this.burst && !this.yielded {
                    // Pending once: hyper flushes what it holds before polling again.
                    this.yielded = true;
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
            } else {
                let delay = this.delay;
                let pause = this
                    .pause
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(delay)));
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.pause = None;
            }
        }
        this.first = false;
        this.yielded = false;
        Poll::Ready(this.frames.next().map(|f| Ok(Frame::data(f))))
    }

    fn is_end_stream(&self) -> bool {
        self.frames.len() == 0
    }

    fn size_hint(&self) -> SizeHint {
        self.len
            .map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_true_flags_with_any_spacing() {
        assert!(json_true(br#"{"stream":true}"#, b"\"stream\""));
        assert!(json_true(br#"{"stream" : true}"#, b"\"stream\""));
        assert!(!json_true(br#"{"stream":false}"#, b"\"stream\""));
        assert!(!json_true(
            br#"{"stream_options":{"include_usage":true}}"#,
            b"\"stream\""
        ));
        assert!(json_true(
            br#"{"stream_options":{"include_usage":true},"stream":true}"#,
            b"\"include_usage\""
        ));
    }

    #[test]
    fn templates_are_json_and_ids_unique() {
        let app = App::new(20, Duration::ZERO, false);
        let body = app.chat_json.render(&hex24(1)).concat();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["usage"]["prompt_tokens"], 87);
        assert!(!String::from_utf8_lossy(&body).contains(ID_MARK));
        let frames = app.chat_stream.render(&hex24(2));
        assert_eq!(frames.len(), 22, "20 content chunks, finish, [DONE]");
        assert_eq!(app.chat_stream_usage.render(&hex24(3)).len(), 23);
        let frames = app.responses_stream.render(&hex24(4));
        assert_eq!(frames.len(), 28);
        let last = String::from_utf8_lossy(&frames[27]).into_owned();
        let data = last.split("data: ").nth(1).unwrap();
        let v: serde_json::Value = serde_json::from_str(data.trim()).unwrap();
        assert_eq!(v["response"]["usage"]["output_tokens"], 143);
        assert_ne!(hex24(1), hex24(2));
    }
}
