//! Load and crash: 1,000 concurrent streams, every one exact and recorded once; SIGKILL under
//! load loses no call that completed before the durability window.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use bytes::Bytes;
use common::binary::serve_file;
use common::*;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use tokio::sync::{Notify, watch};

const CHAT_STREAM: &str =
    r#"{"model":"openai.gpt-oss-120b","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
const RESPONSES_STREAM: &str = r#"{"model":"openai.gpt-oss-120b","stream":true,"input":"hi"}"#;

const CALLS: usize = 1000;

/// A fake upstream whose streams send their first event, then hold the rest until the gate
/// opens: so every call is in flight through the proxy at the same time.
async fn gated_upstream(gate: watch::Receiver<bool>) -> String {
    let app = axum::Router::new().fallback(gated).with_state(gate);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

async fn gated(State(gate): State<watch::Receiver<bool>>, req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let events = if path.ends_with("/responses") {
        responses_events()
    } else if json["stream_options"]["include_usage"] == true {
        chat_events_with_usage()
    } else {
        chat_events()
    };
    let stream = futures_util::stream::iter(events.into_iter().enumerate()).then(move |(i, e)| {
        let mut gate = gate.clone();
        async move {
            if i == 1 {
                let _ = gate.wait_for(|open| *open).await;
            }
            Ok::<_, std::convert::Infallible>(Bytes::from(e))
        }
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .expect("response")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams_are_exact_and_recorded_once() {
    let started = Instant::now();
    let (open, gate) = watch::channel(false);
    let up = gated_upstream(gate).await;
    // Opening 1,000 upstream connections at once on a small debug build takes a while: the
    // head timeout is not what this test is about.
    let proxy = spawn_proxy(&config_tuned(&up, "", "response_timeout = \"20s\"", "")).await;
    let open = Arc::new(open);
    let arrived = Arc::new(AtomicUsize::new(0));
    let c = client();
    let calls: Vec<_> = (0..CALLS)
        .map(|i| {
            let (c, url, open, arrived) =
                (c.clone(), proxy.url.clone(), open.clone(), arrived.clone());
            tokio::spawn(async move {
                let (path, body, expected) = if i % 2 == 0 {
                    ("/v1/chat/completions", CHAT_STREAM, chat_events().concat())
                } else {
                    (
                        "/v1/responses",
                        RESPONSES_STREAM,
                        responses_events().concat(),
                    )
                };
                let r = c
                    .post(format!("{url}{path}"))
                    .bearer_auth(CHAT_KEY)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .expect("send");
                assert_eq!(r.status(), 200);
                let id = r.headers()["x-request-id"].to_str().expect("id").to_owned();
                let mut stream = r.bytes_stream();
                let mut got = stream.next().await.expect("first").expect("ok").to_vec();
                // Every call has its first event: open the gate for all of them at once.
                if arrived.fetch_add(1, Ordering::SeqCst) + 1 == CALLS {
                    open.send_replace(true);
                }
                while let Some(chunk) = stream.next().await {
                    got.extend_from_slice(&chunk.expect("chunk"));
                }
                assert_eq!(
                    String::from_utf8_lossy(&got),
                    expected,
                    "call {i} ({path}) relayed exactly"
                );
                id
            })
        })
        .collect();
    let ids = tokio::time::timeout(Duration::from_secs(30), async {
        let mut ids = Vec::with_capacity(CALLS);
        for call in calls {
            ids.push(call.await.expect("call"));
        }
        ids
    })
    .await
    .expect("1,000 streams within 30 s");
    let relayed = started.elapsed();

    proxy.wait_for_records(CALLS as u64).await;
    let records = proxy.records();
    assert_eq!(records.len(), CALLS, "one ledger record per call, exactly");
    let mut recorded: Vec<&str> = records
        .iter()
        .map(|r| r["request_id"].as_str().expect("id"))
        .collect();
    recorded.sort_unstable();
    recorded.dedup();
    assert_eq!(recorded.len(), CALLS, "no call recorded twice");
    for id in &ids {
        assert!(
            recorded.binary_search(&id.as_str()).is_ok(),
            "{id} recorded"
        );
    }
    for r in &records {
        assert_eq!(r["outcome"], "forwarded", "{r}");
        assert_eq!(r["usage_source"], "reported", "{r}");
    }
    let chat = records
        .iter()
        .filter(|r| r["api"] == "chat.completions")
        .count();
    assert_eq!(chat, CALLS / 2);
    report(&format!(
        "{CALLS} concurrent streams relayed in {relayed:?}, all recorded in {:?}; peak RSS (VmHWM) of the test process: {} MiB",
        started.elapsed(),
        peak_rss_kib() / 1024
    ));
}

// --- Crash: the real binary, SIGKILL under load. ---

/// Loops on streaming calls until `stop` or a failure, noting each call received whole.
async fn load_client(
    url: String,
    completed: Arc<Mutex<Vec<(String, Instant)>>>,
    progress: Arc<Notify>,
    stop: Arc<AtomicBool>,
) {
    let expected = chat_events().concat();
    let c = client();
    while !stop.load(Ordering::SeqCst) {
        let Ok(r) = c
            .post(format!("{url}/v1/chat/completions"))
            .bearer_auth(CHAT_KEY)
            .header("content-type", "application/json")
            .body(CHAT_STREAM)
            .send()
            .await
        else {
            break;
        };
        let id = r.headers()["x-request-id"].to_str().expect("id").to_owned();
        match r.bytes().await {
            Ok(body) if body == expected.as_bytes() => {
                completed.lock().expect("lock").push((id, Instant::now()));
                progress.notify_waiters();
            }
            _ => break,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_call_completed_before_the_durability_window() {
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let db = dir.path().join("ledger.db");
    let config_path = dir.path().join("mantlegate.toml");
    std::fs::write(
        &config_path,
        config(
            &up.url,
            "reject",
            &format!("[ledger]\npath = {:?}\n", db.display().to_string()),
        ),
    )
    .expect("write config");
    let (mut child, _lines, url) = serve_file(&config_path, "info", &[]).await;

    // 8 clients loop on streaming calls; each notes the calls it received whole.
    let completed: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Notify::new());
    let clients: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(load_client(
                url.clone(),
                completed.clone(),
                progress.clone(),
                stop.clone(),
            ))
        })
        .collect();
    // At least 50 calls complete under load...
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let notified = progress.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if completed.lock().expect("lock").len() >= 50 {
                break;
            }
            notified.await;
        }
    })
    .await
    .expect("50 calls completed within 30 s");
    // ...and the load goes on past the 1 s durability window before the kill (its duration is
    // the test's behaviour, not a synchronisation).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let killed_at = Instant::now();
    child.start_kill().expect("SIGKILL");
    let status = child.wait().await.expect("wait");
    assert!(!status.success(), "killed: {status:?}");
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        tokio::time::timeout(Duration::from_secs(10), c)
            .await
            .expect("clients stop once the proxy is gone")
            .expect("client");
    }

    // Restart on the same ledger: it opens (recovering the WAL) and serves.
    let (mut again, _lines2, url2) = serve_file(&config_path, "info", &[]).await;
    let r = client()
        .get(format!("{url2}/healthz"))
        .send()
        .await
        .expect("healthz");
    assert_eq!(r.status(), 200);
    let conn = rusqlite::Connection::open(&db).expect("open ledger");
    let mut stmt = conn
        .prepare("SELECT request_id FROM calls")
        .expect("prepare");
    let in_ledger: std::collections::HashSet<String> = stmt
        .query_map([], |row| row.get(0))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    let completed = completed.lock().expect("lock").clone();
    let window = Duration::from_secs(1);
    let counted: Vec<&String> = completed
        .iter()
        .filter(|(_, at)| *at + window <= killed_at)
        .map(|(id, _)| id)
        .collect();
    report(&format!(
        "completed {} calls, {} of them at least 1 s before SIGKILL; {} records in the ledger after restart",
        completed.len(),
        counted.len(),
        in_ledger.len()
    ));
    assert!(
        counted.len() >= 50,
        "too little load to mean anything: {} calls",
        counted.len()
    );
    let lost: Vec<&&String> = counted
        .iter()
        .filter(|id| !in_ledger.contains(**id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} completed calls missing from the ledger after SIGKILL: {lost:?}",
        lost.len()
    );
    again.start_kill().expect("kill");
    let _ = again.wait().await;
}

#[tokio::test]
async fn past_max_in_flight_calls_are_refused_at_once_and_never_queued() {
    let first = chat_events()[0].clone().into_bytes();
    let up = FaultUpstream::start(vec![Fault::sse(vec![first.clone()], StreamEnd::Stall)]).await;
    let proxy = spawn_proxy(&config_tuned(&up.url, "max_in_flight = 5", "", "")).await;
    let call = || {
        client()
            .post(format!("{}/v1/chat/completions", proxy.url))
            .bearer_auth(CHAT_KEY)
            .header("content-type", "application/json")
            .body(CHAT_STREAM)
            .send()
    };
    // Five streams in flight, each holding its slot.
    let mut held = Vec::new();
    for _ in 0..5 {
        let r = call().await.expect("send");
        assert_eq!(r.status(), 200);
        let mut body = r.bytes_stream();
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("first event")
            .expect("chunk")
            .expect("ok");
        assert_eq!(chunk, first);
        held.push(body);
    }
    let started = Instant::now();
    let r = call().await.expect("send");
    assert_eq!(r.status(), 503);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once, not queued"
    );
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    let id = r.headers()["x-request-id"].to_str().expect("id").to_owned();
    assert_eq!(error_of(r).await["code"], "overloaded");
    assert_eq!(
        up.attempts(),
        5,
        "the sixth call never reached the upstream"
    );
    proxy.assert_healthy().await;
    drop(held);
    up.wait_hung_up(5, Duration::from_secs(10)).await;
    let record = proxy.record_of(6, &id).await;
    assert_eq!(record["outcome"], "rejected");
    assert_eq!(record["error_code"], "overloaded");
    assert_eq!(record["status"], 503);
}
