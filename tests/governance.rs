//! Budgets that hold under concurrency, alerts once per threshold, and rate limits with the
//! OpenAI headers, through the real router.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use common::*;
use tokio::sync::Notify;

/// A chat call that uses exactly `max_tokens` output tokens at the fake upstream.
fn capped(max_tokens: u64) -> String {
    format!(
        r#"{{"model":"openai.gpt-oss-120b","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"hi"}}]}}"#
    )
}

#[tokio::test]
async fn fifty_concurrent_calls_against_a_budget_with_room_for_ten() {
    let up = FakeUpstream::start().await;
    // Each call reserves and costs about $0.06 (100k output tokens at $0.60 per million).
    let extra = r#"
[[budgets]]
name = "chatbot-monthly"
project = "Chatbot"
monthly_usd = "0.61"
action = "block"
"#;
    let proxy = Arc::new(spawn_proxy(&config(&up.url, "reject", extra)).await);
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let r = proxy.chat_body(CHAT_KEY, capped(100_000)).await;
                let status = r.status().as_u16();
                let code = if status == 429 {
                    assert_eq!(r.headers()["x-should-retry"], "false");
                    Some(error_of(r).await)
                } else {
                    r.bytes().await.expect("body");
                    None
                };
                (status, code)
            })
        })
        .collect();
    let mut ok = 0;
    for c in calls {
        match c.await.expect("join") {
            (200, None) => ok += 1,
            (429, Some(e)) => {
                assert_eq!(e["code"], "budget_exceeded");
                let msg = e["message"].as_str().expect("message");
                assert!(
                    msg.contains("chatbot-monthly") && msg.contains("0.61"),
                    "{msg}"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(ok, 10, "exactly the calls the budget has room for");
    proxy.wait_for_records(50).await;
    let spent: i64 = proxy
        .records()
        .iter()
        .filter_map(|r| r["cost_pico"].as_i64())
        .sum();
    assert!(
        spent <= 610_000_000_000,
        "recorded spend {spent} stays within the limit"
    );
    let r = client()
        .get(format!("{}/admin/v1/budgets", proxy.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    let body: serde_json::Value =
        serde_json::from_slice(&r.bytes().await.expect("body")).expect("json");
    let b = &body["data"][0];
    assert_eq!(b["name"], "chatbot-monthly");
    assert_eq!(b["limit_usd"], "0.61");
    assert_eq!(b["spend_usd"], "0.600015");
    assert_eq!(b["reserved_usd"], "0");
    let metrics = proxy.metrics_text().await;
    assert!(
        metrics.contains("mantlegate_budget_limit_usd{budget=\"chatbot-monthly\"} 0.61"),
        "{metrics}"
    );
}

/// Records webhook POSTs.
#[derive(Default)]
struct Hooks {
    events: Mutex<Vec<serde_json::Value>>,
    arrived: Notify,
}

async fn hook(State(h): State<Arc<Hooks>>, body: axum::body::Bytes) -> &'static str {
    h.events
        .lock()
        .expect("lock")
        .push(serde_json::from_slice(&body).expect("json"));
    h.arrived.notify_waiters();
    "ok"
}

#[tokio::test]
async fn each_alert_threshold_fires_exactly_once_to_the_webhook() {
    let hooks = Arc::new(Hooks::default());
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(hooks.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let hook_url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    let up = FakeUpstream::start().await;
    let extra = format!(
        r#"
[alerts]
webhook_url = "{hook_url}"

[[budgets]]
name = "cx-team"
tag = {{ Team = "CX" }}
monthly_usd = "0.60"
alert_at = [0.5, 0.8, 1.0]
"#
    );
    let proxy = spawn_proxy(&config(&up.url, "reject", &extra)).await;
    // 12 calls of about $0.06, one after another: crosses 50 %, 80 % and 100 % once each.
    for _ in 0..12 {
        let r = proxy.chat_body(CHAT_KEY, capped(100_000)).await;
        assert_eq!(r.status(), 200, "alert budgets never refuse");
        r.bytes().await.expect("body");
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let arrived = hooks.arrived.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        if hooks.events.lock().expect("lock").len() >= 3 {
            break;
        }
        assert!(
            tokio::time::timeout_at(deadline, arrived).await.is_ok(),
            "webhooks did not arrive"
        );
    }
    let events = hooks.events.lock().expect("lock").clone();
    let fractions: Vec<f64> = events
        .iter()
        .map(|e| e["fraction"].as_f64().expect("fraction"))
        .collect();
    assert_eq!(fractions.len(), 3, "{events:?}");
    let mut sorted = fractions.clone();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(sorted, [0.5, 0.8, 1.0]);
    for e in &events {
        assert_eq!(e["budget"], "cx-team");
        assert_eq!(e["limit_usd"], "0.6");
        assert!(
            e["forecast_usd"].is_string() && e["scope"] == "tag Team=CX",
            "{e}"
        );
    }
}

#[tokio::test]
async fn request_rate_limits_answer_429_with_openai_headers() {
    let up = FakeUpstream::start().await;
    let extra = r#"
[[rate_limits]]
key = "chatbot-backend"
requests_per_minute = 5
"#;
    let proxy = Arc::new(spawn_proxy(&config(&up.url, "reject", extra)).await);
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let r = proxy.chat(CHAT_KEY).await;
                let headers = r.headers().clone();
                let status = r.status().as_u16();
                let body = r.bytes().await.expect("body");
                (status, headers, body)
            })
        })
        .collect();
    let mut ok = 0;
    let mut limited = 0;
    for c in calls {
        let (status, headers, body) = c.await.expect("join");
        assert_eq!(headers["x-ratelimit-limit-requests"], "5");
        assert!(headers.contains_key("x-ratelimit-remaining-requests"));
        assert!(headers.contains_key("x-ratelimit-reset-requests"));
        match status {
            200 => ok += 1,
            429 => {
                limited += 1;
                let retry: u64 = headers["retry-after"]
                    .to_str()
                    .expect("text")
                    .parse()
                    .expect("seconds");
                assert!((1..=60).contains(&retry), "{retry}");
                assert_eq!(headers["x-ratelimit-remaining-requests"], "0");
                let v: serde_json::Value = serde_json::from_slice(&body).expect("json");
                assert_eq!(v["error"]["code"], "rate_limit_exceeded");
                assert!(
                    !headers.contains_key("x-should-retry"),
                    "the SDKs may retry after the delay"
                );
            }
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!((ok, limited), (5, 7));
    assert_eq!(
        up.requests().len(),
        5,
        "limited calls never reach the upstream"
    );
    // Another key is not limited by chatbot-backend's rule.
    let r = proxy.chat(SEARCH_KEY).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn token_rate_limits_count_estimates_and_correct_them() {
    let up = FakeUpstream::start().await;
    let extra = r#"
[[rate_limits]]
project = "Chatbot"
tokens_per_minute = 1000
"#;
    let proxy = spawn_proxy(&config(&up.url, "reject", extra)).await;
    // Estimated at 600 output tokens + input: the first fits, the second does not.
    let r = proxy.chat_body(CHAT_KEY, capped(600)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-ratelimit-limit-tokens"], "1000");
    r.bytes().await.expect("body");
    let r = proxy.chat_body(CHAT_KEY, capped(600)).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("x-ratelimit-reset-tokens"));
    assert_eq!(error_of(r).await["code"], "rate_limit_exceeded");
    // A small call still fits in what is left.
    let r = proxy.chat_body(CHAT_KEY, capped(100)).await;
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn a_reservation_that_does_not_fit_is_explained_not_called_spent() {
    let up = FakeUpstream::start().await;
    // $0.0001 holds no call's worst case: 4096 output tokens at $0.60 per million alone
    // are $0.0024576.
    let extra = r#"
[limits]
default_max_output_tokens = 4096
[[budgets]]
name = "tiny"
project = "Chatbot"
monthly_usd = "0.0001"
action = "block"
"#;
    let proxy = spawn_proxy(&config(&up.url, "reject", extra)).await;
    let r = proxy.chat_body(CHAT_KEY, CHAT_BODY).await;
    assert_eq!(r.status(), 429);
    let e = error_of(r).await;
    assert_eq!(e["code"], "budget_exceeded", "the code is unchanged");
    assert_eq!(e["type"], "rate_limit_error");
    let msg = e["message"].as_str().expect("message");
    let input_tokens = CHAT_BODY.len() / 4;
    for needle in [
        "budget `tiny`".to_owned(),
        "reservation".to_owned(),
        "4096 output tokens (the call sets no output cap: [limits] default_max_output_tokens)"
            .to_owned(),
        "× $0.6 per million output tokens".to_owned(),
        format!(
            "about {input_tokens} input tokens (the {}-byte body",
            CHAT_BODY.len()
        ),
        "× $0.15 per million input tokens".to_owned(),
        "only $0.0001 of the $0.0001 budget is left".to_owned(),
        "lower output cap".to_owned(),
    ] {
        assert!(msg.contains(&needle), "{needle:?} missing in: {msg}");
    }
    // The worst case: 4096 × 0.60 + input × 0.15, per million.
    let worst = (rust_decimal::Decimal::from(4096) * rust_decimal::Decimal::new(60, 2)
        + rust_decimal::Decimal::from(input_tokens) * rust_decimal::Decimal::new(15, 2))
        / rust_decimal::Decimal::from(1_000_000);
    assert!(
        msg.contains(&format!(
            "reserved until it ends, is ${} = ",
            worst.normalize()
        )),
        "{msg}"
    );
    assert!(!msg.contains("is spent"), "nothing was spent: {msg}");

    // The call's own cap is named when it sets one, and a cap that fits is admitted.
    let r = proxy.chat_body(CHAT_KEY, capped(1000)).await;
    let e = error_of(r).await;
    let msg = e["message"].as_str().expect("message");
    assert!(
        msg.contains("1000 output tokens (the call's max_completion_tokens or max_tokens)"),
        "{msg}"
    );
    let r = proxy.chat_body(CHAT_KEY, capped(10)).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.expect("body");
    assert_eq!(
        up.requests().len(),
        1,
        "refused calls never reach the upstream"
    );
}
