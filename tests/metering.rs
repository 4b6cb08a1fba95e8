//! Usage capture, cost and the ledger, through the proxy, for both APIs, streamed and not.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;

async fn post(proxy: &Proxy, key: &str, path: &str, body: &str) -> reqwest::Response {
    client()
        .post(format!("{}{path}", proxy.url))
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.to_owned())
        .send()
        .await
        .expect("send")
}

#[tokio::test]
async fn chat_json_usage_and_exact_cost_reach_the_ledger() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let r = post(&proxy, CHAT_KEY, "/v1/chat/completions", CHAT_BODY).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.expect("body");
    proxy.wait_for_records(1).await;
    let rec = &proxy.records()[0];
    assert_eq!(rec["input_tokens"], 1_000_000);
    assert_eq!(rec["cached_input_tokens"], 250_000);
    assert_eq!(rec["output_tokens"], 200_000);
    assert_eq!(rec["reasoning_tokens"], 50_000);
    assert_eq!(rec["usage_source"], "reported");
    // 750k × 0.15 + 250k × 0.075 + 200k × 0.60, per million: $0.25125.
    assert_eq!(rec["cost_pico"], 251_250_000_000_i64);
    assert_eq!(rec["project_id"], "proj_chat");
    assert_eq!(rec["key_name"], "chatbot-backend");
    assert_eq!(rec["tags"], r#"{"Team":"CX"}"#);
    assert_eq!(rec["api"], "chat.completions");
    assert_eq!(rec["outcome"], "forwarded");
}

#[tokio::test]
async fn streamed_chat_without_include_usage_is_metered_and_the_client_sees_its_own_stream() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let body = r#"{"model":"openai.gpt-oss-120b","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = post(&proxy, CHAT_KEY, "/v1/chat/completions", body).await;
    let got = r.bytes().await.expect("body");
    // Exactly the stream a client without include_usage gets: no usage-only chunk.
    assert_eq!(got, chat_events().concat().as_bytes());
    // Upstream was asked for usage.
    let sent: serde_json::Value = serde_json::from_slice(&up.single().body).expect("json");
    assert_eq!(sent["stream_options"]["include_usage"], true);
    assert_eq!(sent["messages"][0]["content"], "hi");
    proxy.wait_for_records(1).await;
    let rec = &proxy.records()[0];
    assert_eq!(rec["usage_source"], "reported");
    assert_eq!(
        (rec["input_tokens"].as_i64(), rec["output_tokens"].as_i64()),
        (Some(11), Some(4))
    );
    assert_eq!(rec["cost_pico"], 4_050_000);
    assert_eq!(rec["stream"], 1);
}

#[tokio::test]
async fn streamed_chat_with_include_usage_is_relayed_untouched() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let body = r#"{"model":"openai.gpt-oss-120b","stream":true,"stream_options":{"include_usage":true},"messages":[]}"#;
    let r = post(&proxy, CHAT_KEY, "/v1/chat/completions", body).await;
    let got = r.bytes().await.expect("body");
    assert_eq!(got, chat_events_with_usage().concat().as_bytes());
    assert_eq!(up.single().body, body.as_bytes(), "forwarded byte for byte");
    proxy.wait_for_records(1).await;
    assert_eq!(proxy.records()[0]["output_tokens"], 4);
}

#[tokio::test]
async fn responses_stream_and_json_are_metered() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let r = post(
        &proxy,
        CHAT_KEY,
        "/v1/responses",
        r#"{"model":"openai.gpt-oss-120b","stream":true,"input":"hi"}"#,
    )
    .await;
    assert_eq!(
        r.bytes().await.expect("body"),
        responses_events().concat().as_bytes()
    );
    let r = post(
        &proxy,
        CHAT_KEY,
        "/v1/responses",
        r#"{"model":"openai.gpt-oss-120b","input":"hi"}"#,
    )
    .await;
    r.bytes().await.expect("body");
    proxy.wait_for_records(2).await;
    let recs = proxy.records();
    assert_eq!(
        (
            recs[0]["input_tokens"].as_i64(),
            recs[0]["output_tokens"].as_i64()
        ),
        (Some(3), Some(4))
    );
    assert_eq!(recs[0]["upstream_response_id"], "resp_1");
    assert_eq!(recs[1]["input_tokens"], 100);
    assert_eq!(recs[1]["cached_input_tokens"], 40);
    assert_eq!(recs[1]["reasoning_tokens"], 5);
    // 60 × 0.15 + 40 × 0.075 + 20 × 0.60, per million.
    assert_eq!(recs[1]["cost_pico"], 24_000_000);
    assert_eq!(recs[1]["upstream_response_id"], "resp_fg1");
}

#[tokio::test]
async fn a_client_that_hangs_up_mid_stream_gets_an_estimated_record() {
    let up = FakeUpstream::start().await;
    up.controls.gate.store(true, Ordering::SeqCst);
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let body = r#"{"model":"openai.gpt-oss-120b","stream":true,"messages":[{"role":"user","content":"hello there"}]}"#;
    let r = post(&proxy, CHAT_KEY, "/v1/chat/completions", body).await;
    let mut stream = r.bytes_stream();
    stream.next().await.expect("first event").expect("ok");
    drop(stream);
    proxy.wait_for_records(1).await;
    let rec = &proxy.records()[0];
    assert_eq!(rec["outcome"], "client_disconnect");
    assert_eq!(rec["usage_source"], "estimated");
    assert_eq!(rec["output_tokens"], 1, "one content event was relayed");
    assert!(rec["input_tokens"].as_i64().is_some_and(|n| n > 0));
    up.controls.release.notify_one();
}

#[tokio::test]
async fn an_unpriced_model_has_unknown_cost_never_zero() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let r = post(
        &proxy,
        CHAT_KEY,
        "/v1/chat/completions",
        r#"{"model":"acme.unpriced-1","messages":[]}"#,
    )
    .await;
    r.bytes().await.expect("body");
    proxy.wait_for_records(1).await;
    let rec = &proxy.records()[0];
    assert!(rec["cost_pico"].is_null(), "{rec}");
    assert_eq!(rec["input_tokens"], 1_000_000);
    let metrics = proxy.metrics_text().await;
    assert!(metrics.contains("mantlegate_unpriced_requests_total{project=\"Chatbot\",model=\"acme.unpriced-1\",api=\"chat.completions\"} 1"), "{metrics}");
}

#[tokio::test]
async fn rejected_calls_are_recorded_too() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let r = post(&proxy, "mg-nope", "/v1/chat/completions", CHAT_BODY).await;
    assert_eq!(r.status(), 401);
    proxy.wait_for_records(1).await;
    let rec = &proxy.records()[0];
    assert_eq!(rec["outcome"], "rejected");
    assert_eq!(rec["error_code"], "invalid_api_key");
    assert_eq!(rec["usage_source"], "none");
    assert_eq!(rec["cost_pico"], 0);
}

#[tokio::test]
async fn stored_responses_are_reached_under_the_project_that_created_them() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    // search-team may use Search and Chatbot; it creates under Chatbot.
    let r = client()
        .post(format!("{}/v1/responses", proxy.url))
        .bearer_auth(SEARCH_KEY)
        .header("OpenAI-Project", "proj_chat")
        .body(r#"{"model":"openai.gpt-oss-120b","input":"hi"}"#)
        .send()
        .await
        .expect("send");
    r.bytes().await.expect("body");
    // Without a header search-team would resolve to Search; the GET goes to Chatbot anyway.
    let r = client()
        .get(format!("{}/v1/responses/resp_fg1", proxy.url))
        .bearer_auth(SEARCH_KEY)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-mantlegate-project"], "proj_chat");
    // The bare key, through the Search route, may not use Chatbot: 404 as if it did not exist.
    let r = client()
        .delete(format!("{}/searchapp/v1/responses/resp_fg1", proxy.url))
        .bearer_auth(BARE_KEY)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 404);
    assert_eq!(error_of(r).await["code"], "response_not_found");
    let got: Vec<(String, String)> = up
        .requests()
        .iter()
        .map(|r| {
            (
                r.uri.clone(),
                r.headers["openai-project"]
                    .to_str()
                    .expect("text")
                    .to_owned(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("/v1/responses".to_owned(), "proj_chat".to_owned()),
            ("/v1/responses/resp_fg1".to_owned(), "proj_chat".to_owned())
        ]
    );
}

#[tokio::test]
async fn background_responses_are_metered_once_when_seen_finished() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let r = post(
        &proxy,
        CHAT_KEY,
        "/v1/responses",
        r#"{"model":"openai.gpt-oss-120b","input":"hi","background":true}"#,
    )
    .await;
    r.bytes().await.expect("body");
    for _ in 0..2 {
        let r = client()
            .get(format!("{}/v1/responses/resp_bg1", proxy.url))
            .bearer_auth(CHAT_KEY)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
    }
    proxy.wait_for_records(3).await;
    let recs = proxy.records();
    assert_eq!(
        recs[0]["usage_source"], "none",
        "created: usage comes later"
    );
    assert_eq!(recs[1]["usage_source"], "reported");
    assert_eq!(recs[1]["input_tokens"], 1000);
    assert_eq!(recs[1]["cost_pico"], 450_000_000);
    assert_eq!(recs[2]["usage_source"], "none", "metered once");
    let conn = rusqlite::Connection::open(&proxy.db).expect("open");
    let pending: i64 = conn
        .query_row("SELECT COUNT(*) FROM pending_background", [], |r| r.get(0))
        .expect("count");
    assert_eq!(pending, 0);
}

#[tokio::test]
async fn the_cost_report_sums_the_records_exactly() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    for (key, body) in [
        (CHAT_KEY, CHAT_BODY),
        (CHAT_KEY, r#"{"model":"openai.gpt-oss-120b","input":"x"}"#),
        (SEARCH_KEY, CHAT_BODY),
        (SEARCH_KEY, r#"{"model":"acme.unpriced-1","messages":[]}"#),
    ] {
        let path = if body.contains("input") {
            "/v1/responses"
        } else {
            "/v1/chat/completions"
        };
        post(&proxy, key, path, body)
            .await
            .bytes()
            .await
            .expect("body");
    }
    proxy.wait_for_records(4).await;
    let records = proxy.records();
    let total_pico: i64 = records.iter().filter_map(|r| r["cost_pico"].as_i64()).sum();
    let r = client()
        .get(format!(
            "{}/admin/v1/costs?group_by=project,model&format=json",
            proxy.url
        ))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let report: serde_json::Value =
        serde_json::from_slice(&r.bytes().await.expect("body")).expect("json");
    let total: rust_decimal::Decimal = report["total"]["cost_usd"]
        .as_str()
        .expect("string cost")
        .parse()
        .expect("decimal");
    assert_eq!(
        total,
        rust_decimal::Decimal::from_i128_with_scale(i128::from(total_pico), 12)
    );
    let rows_sum: rust_decimal::Decimal = report["rows"]
        .as_array()
        .expect("rows")
        .iter()
        .filter_map(|r| r["cost_usd"].as_str())
        .map(|c| c.parse::<rust_decimal::Decimal>().expect("decimal"))
        .sum();
    assert_eq!(rows_sum, total);
    assert_eq!(report["total"]["requests"], 4);
    assert_eq!(report["total"]["unpriced_requests"], 1);
    // Without the admin token: 401.
    let r = client()
        .get(format!("{}/admin/v1/costs", proxy.url))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
}

/// GET an admin endpoint with the admin token; the body as text.
async fn admin_get(proxy: &Proxy, path_and_query: &str) -> String {
    let r = client()
        .get(format!("{}{path_and_query}", proxy.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200, "{path_and_query}");
    r.text().await.expect("body")
}

/// A chat call of a model no price row matches.
const UNPRICED: &str = r#"{"model":"acme.unpriced-1","messages":[]}"#;

#[tokio::test]
async fn unpriced_calls_are_an_unknown_cost_in_reports_never_zero() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    // Chatbot: one priced call and two unpriced ones. Search: only an unpriced one.
    for (key, body) in [
        (CHAT_KEY, CHAT_BODY),
        (CHAT_KEY, UNPRICED),
        (CHAT_KEY, UNPRICED),
        (SEARCH_KEY, UNPRICED),
    ] {
        let r = post(&proxy, key, "/v1/chat/completions", body).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
    }
    proxy.wait_for_records(4).await;
    let priced_pico: i64 = proxy
        .records()
        .iter()
        .filter_map(|r| r["cost_pico"].as_i64())
        .sum();
    assert!(priced_pico > 0);
    let priced = rust_decimal::Decimal::from_i128_with_scale(i128::from(priced_pico), 12)
        .normalize()
        .to_string();

    let json: serde_json::Value = serde_json::from_str(
        &admin_get(&proxy, "/admin/v1/costs?group_by=project&format=json").await,
    )
    .expect("json");
    let row = |name: &str| {
        json["rows"]
            .as_array()
            .expect("rows")
            .iter()
            .find(|r| r["project"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name} row in {json}"))
    };
    let search = row("Search");
    assert!(
        search["cost_usd"].is_null(),
        "all unpriced: unknown, not $0: {search}"
    );
    assert_eq!(search["unpriced_requests"], 1);
    let chatbot = row("Chatbot");
    assert_eq!(
        chatbot["cost_usd"],
        priced.as_str(),
        "the priced part: {chatbot}"
    );
    assert_eq!(chatbot["unpriced_requests"], 2);
    assert_eq!(json["total"]["cost_usd"], priced.as_str());
    assert_eq!(json["total"]["unpriced_requests"], 3);

    let csv = admin_get(&proxy, "/admin/v1/costs?group_by=project&format=csv").await;
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(
        lines[0],
        "project,requests,input_tokens,cached_input_tokens,output_tokens,reasoning_tokens,cost_usd,unpriced_requests"
    );
    let search_line = lines
        .iter()
        .find(|l| l.starts_with("Search,"))
        .expect("Search");
    assert!(
        search_line.ends_with(",,1"),
        "empty cost, 1 unpriced: {search_line}"
    );
    let chat_line = lines
        .iter()
        .find(|l| l.starts_with("Chatbot,"))
        .expect("Chatbot");
    assert!(chat_line.ends_with(&format!(",{priced},2")), "{chat_line}");

    assert_unknown_in_focus_table_and_projects(&proxy, &priced).await;
}

/// The rest of [`unpriced_calls_are_an_unknown_cost_in_reports_never_zero`]: Search has only
/// an unpriced call, Chatbot a priced one costing `priced` and two unpriced ones.
async fn assert_unknown_in_focus_table_and_projects(proxy: &Proxy, priced: &str) {
    let focus = admin_get(proxy, "/admin/v1/costs?group_by=project&format=focus").await;
    let lines: Vec<Vec<&str>> = focus.lines().map(|l| l.split(',').collect()).collect();
    let col = |name: &str| lines[0].iter().position(|h| *h == name).expect(name);
    let search_line = lines
        .iter()
        .find(|l| l[col("ResourceName")] == "Search")
        .expect("Search");
    for column in ["BilledCost", "EffectiveCost", "ListCost", "ContractedCost"] {
        assert_eq!(search_line[col(column)], "", "{column}: never a silent $0");
    }
    assert_eq!(search_line[col("x_UnpricedRequests")], "1");
    let chat_line = lines
        .iter()
        .find(|l| l[col("ResourceName")] == "Chatbot")
        .expect("Chatbot");
    assert_eq!(chat_line[col("BilledCost")], priced);
    assert_eq!(chat_line[col("x_UnpricedRequests")], "2");

    let table = admin_get(proxy, "/admin/v1/costs?group_by=project&format=table").await;
    let search_line = table
        .lines()
        .find(|l| l.starts_with("Search"))
        .expect("Search");
    assert!(search_line.contains(" unknown "), "{table}");
    assert!(table.contains("note: 3 requests had no price"), "{table}");

    let projects: serde_json::Value =
        serde_json::from_str(&admin_get(proxy, "/admin/v1/projects").await).expect("json");
    let search = projects["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|p| p["name"] == "Search")
        .expect("Search");
    assert!(search["month_to_date_usd"].is_null(), "{search}");
    assert_eq!(search["month_to_date_unpriced_requests"], 1);
}

#[tokio::test]
async fn admin_keys_lists_every_key_with_its_last_use_and_never_its_hash() {
    let up = FakeUpstream::start().await;
    let extra = format!(
        r#"
[[keys]]
name = "old-laptop"
sha256 = "{}"
projects = ["Search"]
expires_at = "2020-01-01T00:00:00Z"
[[keys]]
name = "intern"
sha256 = "{}"
disabled = true
"#,
        sha("mg-test-old"),
        sha("mg-test-intern")
    );
    let proxy = spawn_proxy(&config(&up.url, "reject", &extra)).await;
    let r = post(&proxy, CHAT_KEY, "/v1/chat/completions", CHAT_BODY).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.expect("body");
    proxy.wait_for_records(1).await;
    let call_ms = proxy.records()[0]["ts_ms"].as_i64().expect("ts");

    let text = admin_get(&proxy, "/admin/v1/keys").await;
    for secret in [
        CHAT_KEY,
        SEARCH_KEY,
        BARE_KEY,
        "mg-test-old",
        "mg-test-intern",
    ] {
        assert!(!text.contains(secret), "a secret in {text}");
        assert!(!text.contains(&sha(secret)), "a SHA-256 in {text}");
    }
    let body: serde_json::Value = serde_json::from_str(&text).expect("json");
    let keys = body["data"].as_array().expect("data");
    let names: Vec<&str> = keys
        .iter()
        .map(|k| k["name"].as_str().expect("name"))
        .collect();
    assert_eq!(
        names,
        [
            "bare",
            "chatbot-backend",
            "intern",
            "old-laptop",
            "search-team"
        ],
        "every entry, by name"
    );
    let key = |name: &str| keys.iter().find(|k| k["name"] == name).expect(name);
    let chat = key("chatbot-backend");
    assert_eq!(chat["projects"], serde_json::json!(["Chatbot"]));
    assert_eq!(chat["state"], "active");
    assert_eq!(chat["disabled"], false);
    assert!(chat["expires_at"].is_null());
    assert_eq!(chat["fingerprint"], &sha(CHAT_KEY)[..12]);
    let last: jiff::Timestamp = chat["last_used"]
        .as_str()
        .expect("last use from the ledger")
        .parse()
        .expect("RFC 3339");
    assert_eq!(last.as_millisecond(), call_ms);
    let search = key("search-team");
    assert_eq!(search["projects"], serde_json::json!(["Search", "Chatbot"]));
    assert!(search["last_used"].is_null(), "never used: {search}");
    let old = key("old-laptop");
    assert_eq!(old["state"], "expired");
    assert_eq!(old["expires_at"], "2020-01-01T00:00:00Z");
    let intern = key("intern");
    assert_eq!(
        (&intern["state"], &intern["disabled"]),
        (&"disabled".into(), &true.into())
    );
    assert_eq!(intern["projects"], serde_json::json!([]));

    // The admin token is required.
    let r = client()
        .get(format!("{}/admin/v1/keys", proxy.url))
        .bearer_auth(CHAT_KEY)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    assert_eq!(error_of(r).await["code"], "invalid_admin_token");
}

#[tokio::test]
async fn metrics_count_requests_tokens_and_cost() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    post(&proxy, CHAT_KEY, "/v1/chat/completions", CHAT_BODY)
        .await
        .bytes()
        .await
        .expect("body");
    post(&proxy, "mg-bad", "/v1/chat/completions", CHAT_BODY)
        .await
        .bytes()
        .await
        .expect("body");
    proxy.wait_for_records(2).await;
    let text = client()
        .get(format!("{}/metrics", proxy.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    for needle in [
        "mantlegate_requests_total{project=\"Chatbot\",model=\"openai.gpt-oss-120b\",api=\"chat.completions\",status_class=\"2xx\",outcome=\"forwarded\",tag_Team=\"CX\"} 1",
        "mantlegate_tokens_total{project=\"Chatbot\",model=\"openai.gpt-oss-120b\",api=\"chat.completions\",type=\"cached_input\",tag_Team=\"CX\"} 250000",
        "mantlegate_cost_usd_total{project=\"Chatbot\",model=\"openai.gpt-oss-120b\",api=\"chat.completions\",tag_Team=\"CX\"} 0.25125",
        "mantlegate_rejected_requests_total{project=\"\",code=\"invalid_api_key\"} 1",
        "mantlegate_ledger_queue_depth",
        "mantlegate_overhead_seconds_bucket",
        "mantlegate_time_to_first_byte_seconds_bucket",
    ] {
        assert!(text.contains(needle), "{needle} missing from\n{text}");
    }
    assert!(
        !text.contains(CHAT_KEY) && !text.contains("chatbot-backend"),
        "no key in metrics"
    );
    let _ = Duration::ZERO;
}

/// A client that sends its own `x-request-id`, behind an upstream (or gateway) that answers
/// with the same id: each call is a row of its own, known by mantlegate's call id, counted in
/// the daily roll-up and the budget.
#[tokio::test]
async fn forty_calls_with_one_client_request_id_are_forty_calls_in_the_ledger() {
    const CLIENT_ID: &str = "client-chosen-id-1";
    let up = FakeUpstream::start().await;
    let extra = r#"
[[budgets]]
name = "chatbot-monthly"
project = "Chatbot"
monthly_usd = "1000"
action = "block"
"#;
    let proxy = std::sync::Arc::new(spawn_proxy(&config(&up.url, "reject", extra)).await);
    let calls: Vec<_> = (0..40)
        .map(|_| {
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let r = client()
                    .post(format!("{}/v1/chat/completions", proxy.url))
                    .bearer_auth(CHAT_KEY)
                    .header("x-request-id", CLIENT_ID)
                    .body(CHAT_BODY)
                    .send()
                    .await
                    .expect("send");
                let status = r.status().as_u16();
                let id = r.headers()["x-request-id"].to_str().expect("id").to_owned();
                r.bytes().await.expect("body");
                (status, id)
            })
        })
        .collect();
    for c in calls {
        // The id the client sees is the upstream's, here its own echoed back (README).
        assert_eq!(c.await.expect("join"), (200, CLIENT_ID.to_owned()));
    }
    let upstream = up.requests();
    assert_eq!(upstream.len(), 40);
    for r in &upstream {
        assert_eq!(r.headers["x-request-id"], CLIENT_ID, "forwarded as sent");
    }
    proxy.wait_for_records(40).await;
    let records = proxy.records();
    assert_eq!(records.len(), 40);
    let cost = records[0]["cost_pico"].as_i64().expect("priced");
    for r in &records {
        assert_eq!(r["request_id"], CLIENT_ID);
        assert_eq!(r["cost_pico"], cost);
    }
    let conn = rusqlite::Connection::open(&proxy.db).expect("open ledger");
    let (ids, requests, daily_cost): (i64, i64, i64) = conn
        .query_row(
            "SELECT (SELECT COUNT(DISTINCT call_id) FROM calls WHERE call_id LIKE 'mg\\_%' ESCAPE '\\'),
                (SELECT SUM(requests) FROM daily), (SELECT SUM(cost_pico) FROM daily)",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .expect("ledger");
    assert_eq!((ids, requests, daily_cost), (40, 40, 40 * cost));
    let r = client()
        .get(format!("{}/admin/v1/budgets", proxy.url))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .expect("send");
    let body: serde_json::Value =
        serde_json::from_slice(&r.bytes().await.expect("body")).expect("json");
    assert_eq!(
        body["data"][0]["spend_usd"],
        mantlegate::pricing::from_pico(40 * cost)
            .normalize()
            .to_string()
    );
}

/// Without an id from the upstream, the client's `x-request-id` is the call id its ledger row
/// and access line carry.
#[tokio::test]
async fn without_an_upstream_request_id_the_client_sees_the_call_id() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    // The fake upstream's streams carry no x-request-id.
    let r = post(
        &proxy,
        CHAT_KEY,
        "/v1/chat/completions",
        r#"{"model":"openai.gpt-oss-120b","stream":true,"messages":[]}"#,
    )
    .await;
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().expect("id").to_owned();
    r.bytes().await.expect("body");
    assert!(
        id.len() == 35 && id.starts_with("mg_") && id[3..].bytes().all(|b| b.is_ascii_hexdigit()),
        "{id}"
    );
    let rec = proxy.record_of(1, &id).await;
    assert_eq!(rec["call_id"], id.as_str());
}
