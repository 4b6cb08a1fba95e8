//! Operating it: key expiry, disabling, rotation and pass-through; live reload under load.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use common::*;

fn keys_extra(entries: &str) -> String {
    entries.to_owned()
}

#[tokio::test]
async fn expired_and_disabled_keys_get_401_saying_which() {
    let up = FakeUpstream::start().await;
    let extra = keys_extra(&format!(
        r#"
[[keys]]
name = "old-laptop"
sha256 = "{}"
projects = ["Chatbot"]
expires_at = "2020-01-01T00:00:00Z"
[[keys]]
name = "revoked"
sha256 = "{}"
projects = ["Chatbot"]
disabled = true
[[keys]]
name = "future"
sha256 = "{}"
projects = ["Chatbot"]
expires_at = "2999-01-01T00:00:00Z"
"#,
        sha("mg-expired"),
        sha("mg-disabled"),
        sha("mg-future")
    ));
    let proxy = spawn_proxy(&config(&up.url, "reject", &extra)).await;
    for (key, word) in [("mg-expired", "expired"), ("mg-disabled", "disabled")] {
        let r = proxy.chat(key).await;
        assert_eq!(r.status(), 401);
        let e = error_of(r).await;
        assert_eq!(e["code"], "invalid_api_key");
        let msg = e["message"].as_str().expect("message");
        assert!(msg.contains(word), "{msg}");
        assert!(
            !msg.contains("chatbot-backend") && !msg.contains("future"),
            "no other keys named: {msg}"
        );
    }
    let r = proxy.chat("mg-future").await;
    assert_eq!(r.status(), 200);
    assert_eq!(up.requests().len(), 1);
}

#[tokio::test]
async fn rotation_keeps_both_secrets_working_under_one_name() {
    let up = FakeUpstream::start().await;
    let extra = format!(
        r#"
[[keys]]
name = "chatbot-backend"
sha256 = "{}"
projects = ["Chatbot"]
"#,
        sha("mg-test-chat-NEW")
    );
    let proxy = spawn_proxy(&config(&up.url, "reject", &extra)).await;
    for key in [CHAT_KEY, "mg-test-chat-NEW"] {
        let r = proxy.chat(key).await;
        assert_eq!(r.status(), 200);
        r.bytes().await.expect("body");
    }
    proxy.wait_for_records(2).await;
    let records = proxy.records();
    assert!(records.iter().all(|r| r["key_name"] == "chatbot-backend"));
}

#[tokio::test]
async fn passthrough_keys_reach_the_upstream_as_sent_with_the_project_enforced() {
    let up = FakeUpstream::start().await;
    let own = "bedrock-api-key-of-the-caller";
    let extra = format!(
        r#"
[[keys]]
name = "team-own-bedrock-key"
sha256 = "{}"
projects = ["Search"]
passthrough = true
"#,
        sha(own)
    );
    let proxy = spawn_proxy(&config(&up.url, "reject", &extra)).await;
    let r = proxy.chat(own).await;
    assert_eq!(r.status(), 200);
    let got = up.single();
    assert_eq!(got.headers["authorization"], format!("Bearer {own}"));
    assert_eq!(got.headers["openai-project"], "proj_search");
    let r = client()
        .post(format!("{}/v1/chat/completions", proxy.url))
        .bearer_auth(own)
        .header("OpenAI-Project", "proj_chat")
        .body(CHAT_BODY)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 403, "the project is still enforced");
}

/// The test config with the upstream key read from `upstream.key` beside it, and a version
/// marker (a tag value) that changes with every reload.
fn versioned(up: &str, version: usize, extra: &str) -> String {
    config(up, "reject", extra)
        .replace(
            "tags = { Team = \"CX\" }",
            &format!("tags = {{ Team = \"CX\", Version = \"v{version}\" }}"),
        )
        .replace(
            "response_timeout = \"1s\"",
            "response_timeout = \"5s\"\napi_key_file = \"upstream.key\"",
        )
}

#[tokio::test]
async fn reload_under_load_fails_no_call_and_refuses_invalid_configs() {
    let up = FakeUpstream::start().await;
    let (proxy, reloader, path) = spawn_proxy_from_file(&versioned(&up.url, 0, "")).await;
    let proxy = Arc::new(proxy);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..4)
        .map(|_| {
            let (proxy, stop, done) = (proxy.clone(), stop.clone(), done.clone());
            tokio::spawn(async move {
                let c = client();
                while !stop.load(Ordering::SeqCst) {
                    let r = c
                        .post(format!("{}/v1/chat/completions", proxy.url))
                        .bearer_auth(CHAT_KEY)
                        .body(CHAT_BODY)
                        .send()
                        .await
                        .expect("no connection is dropped");
                    assert_eq!(r.status(), 200, "a call both configs allow never fails");
                    r.bytes().await.expect("body");
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    // Ten reloads, each adding a key that only the new config knows.
    for version in 1..=10 {
        let extra = format!(
            "[[keys]]\nname = \"added-v{version}\"\nsha256 = \"{}\"\nprojects = [\"Search\"]\n",
            sha(&format!("mg-v{version}"))
        );
        std::fs::write(&path, versioned(&up.url, version, &extra)).expect("write");
        assert!(reloader.reload("test"), "version {version} is valid");
        let r = proxy.chat(&format!("mg-v{version}")).await;
        assert_eq!(
            r.status(),
            200,
            "the new key of version {version} works at once"
        );
        assert_eq!(r.headers()["x-mantlegate-project"], "proj_search");
    }
    // An invalid config is refused; the running one stays.
    std::fs::write(
        &path,
        versioned(
            &up.url,
            11,
            "[[keys]]\nname = \"broken\"\nsha256 = \"nothex\"\n",
        ),
    )
    .expect("write");
    assert!(!reloader.reload("test"));
    let r = proxy.chat("mg-v10").await;
    assert_eq!(r.status(), 200, "version 10 still serves");
    stop.store(true, Ordering::SeqCst);
    for l in load {
        l.await.expect("load task");
    }
    assert!(done.load(Ordering::SeqCst) > 0);
    let metrics = proxy.metrics_text().await;
    assert!(
        metrics.contains("mantlegate_config_reloads_total 10"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mantlegate_config_reload_failures_total 1"),
        "{metrics}"
    );
    after_the_last_reload_rows_carry_its_tags(&proxy, done.load(Ordering::SeqCst)).await;
}

/// A call made after the last reload carries its tags into the ledger, and every call of
/// the reload test (`load_calls` of them from the load) has its row.
async fn after_the_last_reload_rows_carry_its_tags(proxy: &Proxy, load_calls: usize) {
    // The call is found by its request ID: calls the load began before a
    // reload may be written after it, so "the last row" proves nothing.
    let r = proxy.chat(CHAT_KEY).await;
    assert_eq!(r.status(), 200);
    let id = r.headers()["x-request-id"].to_str().expect("id").to_owned();
    r.bytes().await.expect("body");
    // The load's calls, the ten new keys' calls, the one after the refused
    // reload and this one: every call has its row.
    let calls = load_calls as u64 + 12;
    let after = proxy.record_of(calls, &id).await;
    assert_eq!(proxy.records().len() as u64, calls, "one row per call");
    assert_eq!(after["key_name"], "chatbot-backend");
    assert!(
        after["tags"]
            .as_str()
            .expect("tags")
            .contains("\"Version\":\"v10\""),
        "{after}"
    );
}
