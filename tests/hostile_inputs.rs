//! Bodies and requests built to slip past governance or leak: decoy output caps against block
//! budgets, `/metrics` without a token, numbers a re-serialization would change.

mod common;

use std::time::Duration;

use common::*;
use proptest::prelude::*;
use proptest::sample::Index;

use mantlegate::proxy::facts::{RequestFacts, include_usage_edit, with_include_usage};

/// Prices of a dear test model (so a 100,000-token cap reserves about a dollar), and of one
/// whose price row states its output ceiling. A $2.50 block budget then holds two such calls.
const PRICEY: &str = r#"
[[prices]]
model = "test.pricey"
input_per_million = "1"
output_per_million = "10"

[[prices]]
model = "test.ceiling"
input_per_million = "1"
output_per_million = "10"
max_output_tokens = 100000

[[budgets]]
name = "chatbot-block"
project = "Chatbot"
monthly_usd = "2.50"
action = "block"
"#;

/// What [`open_streams`] saw.
struct Opened {
    /// Streams admitted (200, first event read, still open).
    admitted: Vec<reqwest::Response>,
    /// The `error` objects of the refusals.
    refused: Vec<serde_json::Value>,
}

/// Opens `n` streamed calls to `path` with `body` one after another, each held open by the
/// fake upstream's gate, so that every admitted call keeps its reservation while the next
/// one asks for admission.
async fn open_streams(proxy: &Proxy, path: &str, body: &str, n: usize) -> Opened {
    let mut opened = Opened {
        admitted: Vec::new(),
        refused: Vec::new(),
    };
    for _ in 0..n {
        let mut r = client()
            .post(format!("{}{path}", proxy.url))
            .bearer_auth(CHAT_KEY)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("send");
        match r.status().as_u16() {
            200 => {
                let first = tokio::time::timeout(Duration::from_secs(10), r.chunk())
                    .await
                    .expect("first event within 10 s")
                    .expect("chunk")
                    .expect("a first event");
                assert!(!first.is_empty());
                opened.admitted.push(r);
            }
            429 => opened.refused.push(error_of(r).await),
            other => panic!("unexpected status {other}"),
        }
    }
    opened
}

/// Lets the admitted streams finish, one after another, reading each to its end.
async fn finish(up: &FakeUpstream, admitted: Vec<reqwest::Response>) {
    for mut r in admitted {
        up.controls.release.notify_one();
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            while r.chunk().await.expect("chunk").is_some() {}
        });
        end.await.expect("the stream ends within 10 s");
    }
}

/// Runs `n = 5` held streams of `body` against the $2.50 budget and checks that exactly the
/// two an honest reservation of `output_tokens` allows were admitted: statuses, refusal
/// messages, what the upstream received, and the ledger rows.
async fn budget_admits_two(path: &str, body: &str, output_tokens: u64, cost_pico: i64) {
    let up = FakeUpstream::start().await;
    up.controls
        .gate
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let proxy = spawn_proxy(&config(&up.url, "reject", PRICEY)).await;
    let opened = open_streams(&proxy, path, body, 5).await;
    assert_eq!(
        (opened.admitted.len(), opened.refused.len()),
        (2, 3),
        "the budget holds exactly two calls reserving {output_tokens} output tokens each"
    );
    for e in &opened.refused {
        assert_eq!(e["code"], "budget_exceeded");
        assert_eq!(e["type"], "rate_limit_error");
        let msg = e["message"].as_str().expect("message");
        assert!(
            msg.contains("chatbot-block")
                && msg.contains(&format!("{output_tokens} output tokens ("))
                && msg.contains("$2.5"),
            "{msg}"
        );
    }
    finish(&up, opened.admitted).await;
    let sent = up.requests();
    assert_eq!(sent.len(), 2, "refused calls never reach the upstream");
    for s in &sent {
        assert!(s.uri.ends_with(path), "{}", s.uri);
    }
    proxy.wait_for_records(5).await;
    let records = proxy.records();
    let forwarded: Vec<_> = records
        .iter()
        .filter(|r| r["outcome"] == "forwarded")
        .collect();
    assert_eq!(forwarded.len(), 2, "{records:#?}");
    for r in forwarded {
        assert_eq!(r["status"], 200);
        assert_eq!(r["project_name"], "Chatbot");
        assert_eq!(r["cost_pico"], cost_pico, "{r}");
    }
    let rejected: Vec<_> = records
        .iter()
        .filter(|r| r["outcome"] == "rejected")
        .collect();
    assert_eq!(rejected.len(), 3, "{records:#?}");
    for r in rejected {
        assert_eq!(r["status"], 429);
        assert_eq!(r["error_code"], "budget_exceeded");
        assert!(r["cost_pico"].is_null() || r["cost_pico"] == 0, "{r}");
    }
}

/// The chat stream's usage (11 in, 4 out) at test.pricey's prices, in picodollars.
const CHAT_COST: i64 = 11 * 1_000_000 + 4 * 10_000_000;
/// The responses stream's usage (3 in, 4 out).
const RESPONSES_COST: i64 = 3 * 1_000_000 + 4 * 10_000_000;

#[tokio::test]
async fn a_responses_cap_on_a_chat_call_does_not_shrink_its_reservation() {
    budget_admits_two(
        "/v1/chat/completions",
        r#"{"model":"test.pricey","stream":true,"max_tokens":100000,"max_output_tokens":1,"messages":[{"role":"user","content":"hi"}]}"#,
        100_000,
        CHAT_COST,
    )
    .await;
}

#[tokio::test]
async fn a_chat_cap_on_a_responses_call_does_not_shrink_its_reservation() {
    budget_admits_two(
        "/v1/responses",
        r#"{"model":"test.pricey","stream":true,"max_output_tokens":100000,"max_tokens":1,"max_completion_tokens":1,"input":"hi"}"#,
        100_000,
        RESPONSES_COST,
    )
    .await;
}

#[tokio::test]
async fn a_nested_decoy_cap_is_not_the_calls_cap() {
    budget_admits_two(
        "/v1/chat/completions",
        r#"{"model":"test.pricey","stream":true,"metadata":{"max_tokens":1,"max_completion_tokens":1},"max_tokens":100000,"messages":[{"role":"user","content":"hi"}]}"#,
        100_000,
        CHAT_COST,
    )
    .await;
}

#[tokio::test]
async fn of_duplicate_caps_the_last_one_counts_as_the_upstream_reads_it() {
    budget_admits_two(
        "/v1/chat/completions",
        r#"{"model":"test.pricey","stream":true,"max_completion_tokens":1,"max_completion_tokens":100000,"messages":[{"role":"user","content":"hi"}]}"#,
        100_000,
        CHAT_COST,
    )
    .await;
}

#[tokio::test]
async fn without_a_cap_the_price_rows_output_ceiling_is_reserved() {
    // test.ceiling's row says 100000: not the 4096 default_max_output_tokens.
    budget_admits_two(
        "/v1/chat/completions",
        r#"{"model":"test.ceiling","stream":true,"messages":[{"role":"user","content":"hi"}]}"#,
        100_000,
        CHAT_COST,
    )
    .await;
}

#[tokio::test]
async fn an_honest_small_cap_is_reserved_as_sent() {
    // 1,000 output tokens reserve about a cent: all five fit in the budget.
    let up = FakeUpstream::start().await;
    up.controls
        .gate
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let proxy = spawn_proxy(&config(&up.url, "reject", PRICEY)).await;
    let body =
        r#"{"model":"test.ceiling","stream":true,"max_completion_tokens":1000,"messages":[]}"#;
    let opened = open_streams(&proxy, "/v1/chat/completions", body, 5).await;
    assert_eq!((opened.admitted.len(), opened.refused.len()), (5, 0));
    finish(&up, opened.admitted).await;
    assert_eq!(up.requests().len(), 5);
    proxy.wait_for_records(5).await;
    assert!(
        proxy
            .records()
            .iter()
            .all(|r| r["outcome"] == "forwarded" && r["cost_pico"] == CHAT_COST)
    );
}

#[tokio::test]
async fn an_absurd_cap_is_refused_by_a_block_budget_without_a_panic() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", PRICEY)).await;
    for cap in [
        "18446744073709551615",
        "18446744073709551617",
        "1e300",
        r#""99999999999999999999""#,
    ] {
        let body = format!(r#"{{"model":"test.pricey","max_tokens":{cap},"messages":[]}}"#);
        let r = proxy.chat_body(CHAT_KEY, body).await;
        assert_eq!(r.status(), 429, "{cap}");
        let e = error_of(r).await;
        assert_eq!(e["code"], "budget_exceeded");
        assert!(
            e["message"].as_str().expect("message").contains(&format!(
                "{} output tokens (the call's max_completion_tokens or max_tokens)",
                u64::MAX
            )),
            "{e}"
        );
    }
    assert!(up.requests().is_empty());
    proxy.assert_healthy().await;
}

// ---- /metrics

async fn get_metrics(url: &str, token: Option<&str>) -> reqwest::Response {
    let mut req = client().get(format!("{url}/metrics"));
    if let Some(token) = token {
        req = req.bearer_auth(token);
    }
    req.send().await.expect("send")
}

/// Checks a 401 of `/metrics`: OpenAI-shaped, and nothing of what the metrics hold.
async fn assert_metrics_refused(r: reqwest::Response) {
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    let bytes = r.bytes().await.expect("body");
    let text = String::from_utf8_lossy(&bytes).into_owned();
    for secret in [
        "Chatbot",
        "proj_chat",
        "Search",
        "mantlegate_",
        "cost",
        "usd",
        "openai.gpt",
    ] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    let body: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(body["error"]["code"], "invalid_admin_token");
    assert_eq!(body["error"]["type"], "invalid_request_error");
}

#[tokio::test]
async fn metrics_on_the_app_port_need_the_admin_token() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let r = proxy.chat(CHAT_KEY).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.expect("body");
    proxy.wait_for_records(1).await;

    assert_metrics_refused(get_metrics(&proxy.url, None).await).await;
    assert_metrics_refused(get_metrics(&proxy.url, Some("not-the-token")).await).await;
    // A caller's API key is not a metrics token.
    assert_metrics_refused(get_metrics(&proxy.url, Some(CHAT_KEY)).await).await;
    let r = client()
        .get(format!("{}/metrics", proxy.url))
        .header("authorization", format!("Basic {ADMIN_TOKEN}"))
        .send()
        .await
        .expect("send");
    assert_metrics_refused(r).await;

    let r = get_metrics(&proxy.url, Some(ADMIN_TOKEN)).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("text");
    assert!(
        text.contains("mantlegate_requests_total{project=\"Chatbot\","),
        "{text}"
    );
    // The refusals went to no upstream and made no ledger rows.
    assert_eq!(up.requests().len(), 1);
    assert_eq!(proxy.records().len(), 1);
}

#[tokio::test]
async fn the_metrics_token_and_the_metrics_listener_through_the_binary() {
    const METRICS_ENV: &str = "MANTLEGATE_TEST_HOSTILE_METRICS_TOKEN";
    const ADMIN_ENV: &str = "MANTLEGATE_TEST_HOSTILE_ADMIN_TOKEN";
    const METRICS_TOKEN: &str = "metrics-scraper-token-5e1f";
    let up = FakeUpstream::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let extra = format!(
        r#"
token_env = "{METRICS_ENV}"

[admin]
token_env = "{ADMIN_ENV}"

[ledger]
path = "{}"
"#,
        dir.path().join("ledger.db").display()
    );
    let text = config_tuned(&up.url, r#"metrics_listen = "127.0.0.1:0""#, "", &extra);
    // `extra` continues `[metrics]`, the standard config's last table.
    assert!(text.contains("tag_labels = [\"Team\"]\n\ntoken_env"));
    let path = dir.path().join("mantlegate.toml");
    std::fs::write(&path, &text).expect("write");
    let (child, mut lines, url) = common::binary::serve_file(
        &path,
        "info",
        &[(METRICS_ENV, METRICS_TOKEN), (ADMIN_ENV, ADMIN_TOKEN)],
    )
    .await;
    let metrics_url = loop {
        let line = tokio::time::timeout(Duration::from_secs(10), lines.recv())
            .await
            .expect("a metrics listening line")
            .expect("log line");
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
            && v["message"] == "metrics listening"
        {
            break format!("http://{}", v["addr"].as_str().expect("addr"));
        }
    };
    let r = client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(CHAT_KEY)
        .body(CHAT_BODY)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    r.bytes().await.expect("body");

    // The app port: a token or nothing.
    assert_metrics_refused(get_metrics(&url, None).await).await;
    assert_metrics_refused(get_metrics(&url, Some("metrics-scraper-token")).await).await;
    for token in [METRICS_TOKEN, ADMIN_TOKEN] {
        let r = get_metrics(&url, Some(token)).await;
        assert_eq!(r.status(), 200);
        let text = r.text().await.expect("text");
        assert!(text.contains("project=\"Chatbot\""), "{text}");
    }
    // The metrics token opens nothing else.
    let r = client()
        .get(format!("{url}/admin/v1/budgets"))
        .bearer_auth(METRICS_TOKEN)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 401);
    // The private listener asks for nothing.
    let r = get_metrics(&metrics_url, None).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.expect("text");
    assert!(text.contains("project=\"Chatbot\""), "{text}");
    assert_eq!(up.requests().len(), 1);

    let logs = common::binary::stop(child, lines).await.join("\n");
    assert!(!logs.contains(METRICS_TOKEN) && !logs.contains(ADMIN_TOKEN));
}

// ---- stream_options spliced, every other byte as sent

/// Sends a streamed chat `body` without `include_usage` and checks that the upstream got
/// exactly `expected`, the client the stream without the usage chunk, and the ledger the usage.
async fn forwards_exactly(body: &str, expected: &str) {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let r = proxy.chat_body(CHAT_KEY, body.to_owned()).await;
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().expect("id").to_owned();
    let relayed = r.bytes().await.expect("body");
    let sent = up.single();
    assert_eq!(
        String::from_utf8_lossy(&sent.body),
        expected,
        "the upstream got the client's bytes with include_usage spliced in"
    );
    assert_eq!(sent.headers["content-length"], expected.len().to_string());
    assert_eq!(relayed, chat_events().concat().into_bytes());
    let rec = proxy.record_of(1, &id).await;
    assert_eq!(rec["outcome"], "forwarded");
    assert_eq!(rec["input_tokens"], 11);
    assert_eq!(rec["output_tokens"], 4);
    assert_eq!(rec["usage_source"], "reported");
}

const MSGS: &str = r#""messages":[{"role":"user","content":"hi"}]"#;

#[tokio::test]
async fn a_body_without_stream_options_keeps_every_byte() {
    let body = format!(
        "{{ \"seed\": 18446744073709551617, \"stream\" : true,\n \"model\":\"openai.gpt-oss-120b\", \"z\": -0.0, \"e\": 1E-7, \"s\": \"\\u00e9\\ud83d\\ude00\\\"}}\", {MSGS} }}"
    );
    let expected = format!(
        "{{ \"seed\": 18446744073709551617, \"stream\" : true,\n \"model\":\"openai.gpt-oss-120b\", \"z\": -0.0, \"e\": 1E-7, \"s\": \"\\u00e9\\ud83d\\ude00\\\"}}\", {MSGS} ,\"stream_options\":{{\"include_usage\":true}}}}"
    );
    forwards_exactly(&body, &expected).await;
}

#[tokio::test]
async fn a_body_with_stream_options_keeps_every_other_byte() {
    // Re-serializing this body (as was done whenever it had stream_options) rounded the seed
    // to 1.8446744073709552e19, dropped the escapes and reordered the members.
    let body = format!(
        r#"{{"stream_options": {{ "include_obfuscation": false }}, "seed": 18446744073709551617, "model":"openai.gpt-oss-120b","stream":true,"n":{deep}1{undeep},"u":"\u0041","z":-0.0,{MSGS}}}"#,
        deep = "[".repeat(64),
        undeep = "]".repeat(64),
    );
    let expected = body.replacen(
        r#"{ "include_obfuscation": false }"#,
        r#"{ "include_obfuscation": false ,"include_usage":true}"#,
        1,
    );
    forwards_exactly(&body, &expected).await;

    let body = format!(
        r#"{{"model":"openai.gpt-oss-120b","stream":true,"stream_options":{{"include_usage":false}},"seed":18446744073709551617,{MSGS}}}"#
    );
    let expected = body.replacen(r#""include_usage":false"#, r#""include_usage":true"#, 1);
    forwards_exactly(&body, &expected).await;

    let body = format!(
        r#"{{"model":"openai.gpt-oss-120b","stream":true,"stream_options":null,"seed":18446744073709551617,{MSGS}}}"#
    );
    let expected = body.replacen("null", r#"{"include_usage":true}"#, 1);
    forwards_exactly(&body, &expected).await;

    // Twice: the upstream reads the last, so the last is the one changed.
    let body = format!(
        r#"{{"model":"openai.gpt-oss-120b","stream":true,"stream_options":{{"include_usage":true}},"stream_options":{{}},"seed":18446744073709551617,{MSGS}}}"#
    );
    let expected = body.replacen(
        r#""stream_options":{}"#,
        r#""stream_options":{"include_usage":true}"#,
        1,
    );
    forwards_exactly(&body, &expected).await;
}

#[tokio::test]
async fn a_number_past_a_double_is_forwarded_as_sent() {
    // 1e400 is out of a double's range: a re-serialization could not write it at all.
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let body = format!(
        r#"{{"model":"openai.gpt-oss-120b","stream":true,"temperature":1e400,"stream_options":{{}},{MSGS}}}"#
    );
    let r = proxy.chat_body(CHAT_KEY, body.clone()).await;
    assert_eq!(r.status(), 200);
    r.bytes().await.expect("body");
    let expected = body.replacen(
        r#""stream_options":{}"#,
        r#""stream_options":{"include_usage":true}"#,
        1,
    );
    assert_eq!(String::from_utf8_lossy(&up.single().body), expected);
    proxy.wait_for_records(1).await;
    assert_eq!(proxy.records()[0]["status"], 200);
}

// ---- the splice, as a property

/// Stands for a place where JSON allows whitespace; replaced by one of [`BLANKS`].
const GAP: char = '\u{1}';
const BLANKS: [&str; 5] = ["", " ", "\n", "\t ", " \r\n "];

fn key() -> impl Strategy<Value = String> {
    prop::sample::select(vec![
        r#""stream_options""#,
        r#""stream_options""#,
        r#""include_usage""#,
        r#""include_usage""#,
        r#""stream\u005foptions""#,
        r#""include\u005fusage""#,
        r#""model""#,
        r#""seed""#,
        r#""a\"b""#,
        r#""}""#,
        r#""é""#,
    ])
    .prop_map(str::to_owned)
}

fn scalar() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "null",
            "true",
            "false",
            "0",
            "-0.0",
            "18446744073709551617",
            "1E-7",
            "-12.5e+3",
            r#""\u00e9\ud83d\ude00""#,
            r#""{\"stream_options\":1}""#,
            r#""\\""#,
            r#""]""#,
        ])
        .prop_map(str::to_owned),
        any::<i64>().prop_map(|n| n.to_string()),
        any::<u64>().prop_map(|n| n.to_string()),
    ]
}

fn object_of(value: BoxedStrategy<String>) -> impl Strategy<Value = String> {
    prop::collection::vec((key(), value), 0..5).prop_map(|members| {
        let inside: Vec<String> = members
            .iter()
            .map(|(k, v)| format!("{GAP}{k}{GAP}:{GAP}{v}{GAP}"))
            .collect();
        if inside.is_empty() {
            format!("{{{GAP}}}")
        } else {
            format!("{{{}}}", inside.join(","))
        }
    })
}

fn value() -> BoxedStrategy<String> {
    scalar()
        .prop_recursive(4, 32, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(|items| {
                    let inside: Vec<String> =
                        items.iter().map(|v| format!("{GAP}{v}{GAP}")).collect();
                    format!("[{GAP}{}]", inside.join(","))
                }),
                object_of(inner),
            ]
        })
        .boxed()
}

/// `text` with each gap replaced by a blank picked by `picks` (cycled).
fn fill(text: &str, picks: &[Index]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut n = 0;
    for c in text.chars() {
        if c == GAP {
            let pick = picks.get(n % picks.len().max(1));
            out.push_str(pick.map_or("", |i| BLANKS[i.index(BLANKS.len())]));
            n += 1;
        } else {
            out.push(c);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 512,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn include_usage_is_spliced_and_every_other_byte_kept(
        top in object_of(value()),
        picks in prop::collection::vec(any::<Index>(), 1..16),
        outer in (0..BLANKS.len(), 0..BLANKS.len()),
    ) {
        let body = format!("{}{}{}", BLANKS[outer.0], fill(&top, &picks), BLANKS[outer.1]);
        let facts = RequestFacts::parse(body.as_bytes()).expect("the generator writes JSON");
        let out = with_include_usage(body.as_bytes(), &facts).expect("spliced");

        // One splice, every other byte as sent.
        let edit = include_usage_edit(body.as_bytes()).expect("an edit");
        prop_assert_eq!(&out[..], &edit.apply(body.as_bytes())[..]);
        prop_assert!(edit.start <= edit.end && edit.end <= body.len());
        let removed = &body.as_bytes()[edit.start..edit.end];
        prop_assert!(
            removed.is_empty() || serde_json::from_slice::<serde_json::Value>(removed).is_ok(),
            "only a whole value is replaced: {:?}", String::from_utf8_lossy(removed)
        );
        prop_assert!(edit.insert.contains("true"));

        // Read as the upstream reads it (the last of duplicate members): the same body,
        // with stream_options.include_usage = true.
        let mut expected: serde_json::Value = serde_json::from_str(&body).expect("json");
        let object = expected.as_object_mut().expect("object");
        let options = object
            .entry("stream_options")
            .or_insert_with(|| serde_json::json!({}));
        if !options.is_object() {
            *options = serde_json::json!({});
        }
        options["include_usage"] = serde_json::Value::Bool(true);
        let got: serde_json::Value = serde_json::from_slice(&out).expect("still JSON");
        prop_assert_eq!(got, expected);

        let again = RequestFacts::parse(&out).expect("still valid");
        prop_assert!(again.has_stream_options && again.include_usage);
        prop_assert_eq!(again.model, facts.model);
        prop_assert_eq!(again.max_tokens, facts.max_tokens);
    }
}
