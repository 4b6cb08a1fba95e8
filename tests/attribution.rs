//! Every attribution rule, through the real router, against a recording fake upstream.

mod common;

use common::*;

async fn chat(
    proxy: &Proxy,
    path: &str,
    key: Option<&str>,
    project: Option<&str>,
) -> reqwest::Response {
    let mut req = client()
        .post(format!("{}{path}", proxy.url))
        .header("content-type", "application/json")
        .body(CHAT_BODY);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(p) = project {
        req = req.header("OpenAI-Project", p);
    }
    req.send().await.expect("send")
}

fn project_sent(up: &FakeUpstream) -> String {
    let r = up.single();
    r.headers["openai-project"]
        .to_str()
        .expect("text")
        .to_owned()
}

#[tokio::test]
async fn missing_or_unknown_key_is_401_and_never_forwarded() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "default", "")).await;
    for key in [None, Some("mg-not-a-key")] {
        let r = chat(&proxy, "/v1/chat/completions", key, None).await;
        assert_eq!(r.status(), 401);
        assert!(r.headers().contains_key("x-request-id"));
        assert_eq!(error_of(r).await["code"], "invalid_api_key");
    }
    // x-api-key works as well as Authorization.
    let r = client()
        .post(format!("{}/v1/chat/completions", proxy.url))
        .header("x-api-key", CHAT_KEY)
        .body(CHAT_BODY)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(
        up.requests().len(),
        1,
        "only the authenticated call is forwarded"
    );
}

#[tokio::test]
async fn key_default_project_is_used_without_a_header() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let r = chat(&proxy, "/v1/chat/completions", Some(SEARCH_KEY), None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-mantlegate-project"], "proj_search");
    assert_eq!(project_sent(&up), "proj_search");
}

#[tokio::test]
async fn header_by_id_or_name_any_case_within_the_keys_projects() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let r = chat(
        &proxy,
        "/v1/chat/completions",
        Some(SEARCH_KEY),
        Some("proj_chat"),
    )
    .await;
    assert_eq!(r.status(), 200);
    let r = client()
        .post(format!("{}/v1/chat/completions", proxy.url))
        .bearer_auth(SEARCH_KEY)
        .header("openai-project", "Chatbot")
        .body(CHAT_BODY)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let sent: Vec<String> = up
        .requests()
        .iter()
        .map(|r| {
            r.headers["openai-project"]
                .to_str()
                .expect("text")
                .to_owned()
        })
        .collect();
    assert_eq!(sent, ["proj_chat", "proj_chat"]);
}

#[tokio::test]
async fn header_outside_the_keys_projects_is_403_naming_key_and_choices() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "default", "")).await;
    for project in ["proj_search", "proj_unknown", "Shared"] {
        let r = chat(
            &proxy,
            "/v1/chat/completions",
            Some(CHAT_KEY),
            Some(project),
        )
        .await;
        assert_eq!(r.status(), 403, "{project}");
        let e = error_of(r).await;
        assert_eq!(e["code"], "project_forbidden");
        let msg = e["message"].as_str().expect("message");
        assert!(
            msg.contains("chatbot-backend") && msg.contains("Chatbot"),
            "{msg}"
        );
    }
    // A key with no projects may not pick one by header either.
    let r = chat(
        &proxy,
        "/v1/chat/completions",
        Some(BARE_KEY),
        Some("proj_chat"),
    )
    .await;
    assert_eq!(r.status(), 403);
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn route_attributes_and_is_checked_against_the_key() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    // A key with no projects of its own gets the route's project.
    let r = chat(
        &proxy,
        "/searchapp/v1/chat/completions",
        Some(BARE_KEY),
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-mantlegate-project"], "proj_search");
    // The upstream path drops the route prefix.
    assert_eq!(up.single().uri, "/v1/chat/completions");
    // A key whose list lacks the route's project is refused.
    let r = chat(
        &proxy,
        "/searchapp/v1/chat/completions",
        Some(CHAT_KEY),
        None,
    )
    .await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_of(r).await["code"], "project_forbidden");
    // Through a route the header may only name the route's project.
    let r = chat(
        &proxy,
        "/searchapp/v1/chat/completions",
        Some(SEARCH_KEY),
        Some("proj_chat"),
    )
    .await;
    assert_eq!(r.status(), 403);
    let r = chat(
        &proxy,
        "/searchapp/v1/chat/completions",
        Some(SEARCH_KEY),
        Some("proj_search"),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(up.requests().len(), 2);
}

#[tokio::test]
async fn no_project_is_rejected_or_defaulted_by_policy() {
    let up = FakeUpstream::start().await;
    let reject = spawn_proxy(&config(&up.url, "reject", "")).await;
    let r = chat(&reject, "/v1/chat/completions", Some(BARE_KEY), None).await;
    assert_eq!(r.status(), 400);
    assert_eq!(r.headers()["x-should-retry"], "false");
    let e = error_of(r).await;
    assert_eq!(e["code"], "project_required");
    assert!(up.requests().is_empty());

    let default = spawn_proxy(&config(&up.url, "default", "")).await;
    let r = chat(&default, "/v1/chat/completions", Some(BARE_KEY), None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-mantlegate-project"], "proj_shared");
    assert_eq!(project_sent(&up), "proj_shared");
}

#[tokio::test]
async fn a_key_without_projects_is_told_what_the_operator_must_do() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let r = chat(&proxy, "/v1/chat/completions", Some(BARE_KEY), None).await;
    assert_eq!(r.status(), 400);
    let e = error_of(r).await;
    assert_eq!(e["code"], "project_required");
    let msg = e["message"].as_str().expect("message");
    for needle in [
        "key `bare` has no project",
        "grant the key a project",
        "[[keys]] entry",
        "`/searchapp/v1` (Search)",
    ] {
        assert!(msg.contains(needle), "{needle:?} missing in: {msg}");
    }
    assert!(
        !msg.contains("Send the `OpenAI-Project` header"),
        "the header cannot help this key: {msg}"
    );
    // Why the header cannot help: naming a project is refused for a key granted none, and
    // that refusal says what the operator must do too.
    let r = chat(
        &proxy,
        "/v1/chat/completions",
        Some(BARE_KEY),
        Some("Search"),
    )
    .await;
    assert_eq!(r.status(), 403);
    let e = error_of(r).await;
    assert_eq!(e["code"], "project_forbidden");
    assert!(
        e["message"]
            .as_str()
            .expect("message")
            .contains("[[keys]] entry"),
        "{e}"
    );
    // Through the route it names, the same key works.
    let r = chat(
        &proxy,
        "/searchapp/v1/chat/completions",
        Some(BARE_KEY),
        None,
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(project_sent(&up), "proj_search");
}
