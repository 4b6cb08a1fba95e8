//! What reaches the upstream and what comes back: URLs, headers, bodies, errors.

mod common;

use common::*;

#[tokio::test]
async fn headers_are_cleaned_and_set_and_the_body_is_byte_for_byte() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    // Odd spacing and key order must survive: the body is never re-serialized.
    let body = "{ \"model\" : \"openai.gpt-oss-120b\",\n  \"messages\":[{\"role\":\"user\",\"content\":\"h\\u00e9\"}] }";
    let r = client()
        .post(format!("{}/v1/chat/completions?trace=1&x=a%20b", proxy.url))
        .bearer_auth(CHAT_KEY)
        .header("x-api-key", CHAT_KEY)
        .header("OpenAI-Organization", "org_123")
        .header("cookie", "session=abc")
        .header("x-forwarded-for", "10.1.2.3")
        .header("x-forwarded-proto", "https")
        .header("user-agent", "OpenAI/Python 1.99.0")
        .header("x-stainless-lang", "python")
        .header("accept", "application/json")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-mantlegate-project"], "proj_chat");
    // The upstream's request id reaches the client unchanged.
    let id = r.headers()["x-request-id"].to_str().expect("id");
    assert!(id.starts_with("req_upstream_"), "{id}");
    assert_eq!(r.headers()["x-amzn-requestid"], id);

    let got = up.single();
    assert_eq!(got.uri, "/v1/chat/completions?trace=1&x=a%20b");
    assert_eq!(got.body, body.as_bytes());
    let h = &got.headers;
    assert_eq!(h["authorization"], format!("Bearer {UPSTREAM_KEY}"));
    assert_eq!(h.get_all("authorization").iter().count(), 1);
    assert_eq!(h["openai-project"], "proj_chat");
    for gone in [
        "x-api-key",
        "openai-organization",
        "cookie",
        "x-forwarded-for",
        "x-forwarded-proto",
    ] {
        assert!(!h.contains_key(gone), "{gone} reached the upstream");
    }
    assert_eq!(h["user-agent"], "OpenAI/Python 1.99.0");
    assert_eq!(h["x-stainless-lang"], "python");
    assert_eq!(h["accept"], "application/json");
    assert_eq!(h["content-type"], "application/json");
    // The client's key appears nowhere upstream.
    for (_, v) in h {
        assert!(
            !v.as_bytes()
                .windows(CHAT_KEY.len())
                .any(|w| w == CHAT_KEY.as_bytes())
        );
    }
}

#[tokio::test]
async fn model_prefixes_route_posts_and_others_use_the_default() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let c = client();
    let post = |path: &str, body: &'static str| {
        c.post(format!("{}{path}", proxy.url))
            .bearer_auth(CHAT_KEY)
            .body(body)
            .send()
    };
    assert_eq!(
        post("/v1/responses", r#"{"model":"openai.gpt-5.4","input":"x"}"#)
            .await
            .expect("send")
            .status(),
        200
    );
    assert_eq!(
        post(
            "/v1/chat/completions",
            r#"{"model":"openai.gpt-oss-20b","messages":[]}"#
        )
        .await
        .expect("send")
        .status(),
        200
    );
    assert_eq!(
        post(
            "/v1/responses/input_tokens",
            r#"{"model":"openai.gpt-5.5","input":"x"}"#
        )
        .await
        .expect("send")
        .status(),
        200
    );
    let get = |path: &str| {
        c.get(format!("{}{path}", proxy.url))
            .bearer_auth(CHAT_KEY)
            .send()
    };
    for path in [
        "/v1/models",
        "/v1/models/openai.gpt-oss-120b",
        "/v1/responses/resp_1",
        "/v1/responses/resp_1/input_items?limit=2",
    ] {
        assert_eq!(get(path).await.expect("send").status(), 200, "{path}");
    }
    let r = c
        .delete(format!("{}/v1/responses/resp_1", proxy.url))
        .bearer_auth(CHAT_KEY)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let r = c
        .post(format!("{}/v1/responses/resp_1/cancel", proxy.url))
        .bearer_auth(CHAT_KEY)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);

    let seen: Vec<(String, String)> = up
        .requests()
        .iter()
        .map(|r| (r.method.to_string(), r.uri.clone()))
        .collect();
    let expected = [
        ("POST", "/openai/v1/responses"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/openai/v1/responses/input_tokens"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/openai.gpt-oss-120b"),
        ("GET", "/v1/responses/resp_1"),
        ("GET", "/v1/responses/resp_1/input_items?limit=2"),
        ("DELETE", "/v1/responses/resp_1"),
        ("POST", "/v1/responses/resp_1/cancel"),
    ];
    let expected: Vec<(String, String)> = expected
        .iter()
        .map(|(m, p)| ((*m).to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(seen, expected);
    assert!(
        up.requests()
            .iter()
            .all(|r| r.headers["openai-project"] == "proj_chat")
    );
}

#[tokio::test]
async fn base_url_path_prefix_is_kept() {
    let up = FakeUpstream::start().await;
    let text = config(&format!("{}/gateway", up.url), "reject", "");
    let proxy = spawn_proxy(&text).await;
    let r = client()
        .get(format!("{}/v1/models", proxy.url))
        .bearer_auth(CHAT_KEY)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    assert_eq!(up.single().uri, "/gateway/v1/models");
}

/// The OpenAI SDKs' `BedrockOpenAI` clients call bedrock-mantle under `/openai/v1` by default:
/// the same endpoints answer there, through routes too, the upstream prefix still chosen by the
/// model.
#[tokio::test]
async fn the_openai_v1_root_serves_the_same_endpoints() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let c = client();
    let cases = [
        (
            "POST",
            "/openai/v1/chat/completions",
            CHAT_KEY,
            r#"{"model":"openai.gpt-oss-20b","messages":[]}"#,
            "/v1/chat/completions",
            "proj_chat",
        ),
        (
            "POST",
            "/openai/v1/responses",
            CHAT_KEY,
            r#"{"model":"openai.gpt-5.4","input":"x"}"#,
            "/openai/v1/responses",
            "proj_chat",
        ),
        (
            "GET",
            "/openai/v1/models",
            CHAT_KEY,
            "",
            "/v1/models",
            "proj_chat",
        ),
        (
            "GET",
            "/openai/v1/responses/resp_1/input_items?limit=2",
            CHAT_KEY,
            "",
            "/v1/responses/resp_1/input_items?limit=2",
            "proj_chat",
        ),
        (
            "POST",
            "/searchapp/openai/v1/chat/completions",
            BARE_KEY,
            r#"{"model":"openai.gpt-oss-20b","messages":[]}"#,
            "/v1/chat/completions",
            "proj_search",
        ),
    ];
    for (method, path, key, body, _, project) in cases {
        let r = c
            .request(
                method.parse().expect("method"),
                format!("{}{path}", proxy.url),
            )
            .bearer_auth(key)
            .body(body)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 200, "{method} {path}");
        assert_eq!(r.headers()["x-mantlegate-project"], project, "{path}");
    }
    let seen: Vec<(String, String, String)> = up
        .requests()
        .iter()
        .map(|r| {
            (
                r.method.to_string(),
                r.uri.clone(),
                r.headers["openai-project"]
                    .to_str()
                    .expect("ascii")
                    .to_owned(),
            )
        })
        .collect();
    let expected: Vec<(String, String, String)> = cases
        .iter()
        .map(|(m, _, _, _, upstream, project)| {
            (
                (*m).to_owned(),
                (*upstream).to_owned(),
                (*project).to_owned(),
            )
        })
        .collect();
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn everything_else_is_unknown_endpoint_and_never_forwarded() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let c = client();
    for (method, path) in [
        ("GET", "/v1/organization/projects"),
        ("POST", "/v1/organization/projects"),
        ("POST", "/v1/organization/projects/proj_chat/archive"),
        ("GET", "/v1/data_retention"),
        ("POST", "/v1/embeddings"),
        ("GET", "/v1/chat/completions"),
        ("GET", "/"),
        ("GET", "/searchapp/v1/organization/projects"),
        ("PUT", "/v1/responses/resp_1"),
        // The second API root (the SDKs' Bedrock clients') forwards no more than the first.
        ("GET", "/openai/v1/organization/projects"),
        ("POST", "/openai/v1/embeddings"),
        ("GET", "/openai/models"),
        ("GET", "/openai/v2/models"),
        ("GET", "/openaiv1/models"),
        ("POST", "/anthropic/v1/messages"),
    ] {
        let r = c
            .request(
                method.parse().expect("method"),
                format!("{}{path}", proxy.url),
            )
            .bearer_auth(CHAT_KEY)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 404, "{method} {path}");
        assert_eq!(error_of(r).await["code"], "unknown_endpoint");
    }
    // Dot segments cannot smuggle a call to the Projects API. (Sent raw: clients normalise.)
    for path in [
        "/searchapp/../v1/organization/projects",
        "/v1/%2e%2e/v1/organization/projects",
    ] {
        let status = raw_status(&proxy.url, &format!("GET {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {CHAT_KEY}\r\nconnection: close\r\n\r\n")).await;
        assert_eq!(status, 400, "{path}");
    }
    assert!(up.requests().is_empty());
}

/// Sends raw bytes and returns the status code of the answer.
async fn raw_status(url: &str, request: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.expect("read");
    let text = String::from_utf8_lossy(&buf);
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status line")
}

#[tokio::test]
async fn malformed_json_and_oversize_bodies_are_refused_before_the_upstream() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    let c = client();
    for body in ["{\"model\":", "", "[1]", "{\"model\":\"m\"} extra"] {
        let r = c
            .post(format!("{}/v1/chat/completions", proxy.url))
            .bearer_auth(CHAT_KEY)
            .body(body)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 400, "{body:?}");
        assert_eq!(error_of(r).await["code"], "invalid_json");
    }
    // The test config sets max_body_bytes = 4096.
    let big = format!("{{\"model\":\"m\",\"pad\":\"{}\"}}", "x".repeat(5000));
    let r = c
        .post(format!("{}/v1/responses", proxy.url))
        .bearer_auth(CHAT_KEY)
        .body(big.clone())
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 413);
    assert_eq!(error_of(r).await["code"], "request_too_large");
    // Without a Content-Length (chunked), the limit holds as well.
    let chunks = futures_util::stream::iter(
        big.into_bytes()
            .chunks(1000)
            .map(|c| Ok::<_, std::io::Error>(c.to_vec()))
            .collect::<Vec<_>>(),
    );
    let r = c
        .post(format!("{}/v1/responses", proxy.url))
        .bearer_auth(CHAT_KEY)
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 413);
    assert!(up.requests().is_empty());
}

#[tokio::test]
async fn upstream_errors_pass_through_with_status_and_body() {
    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    for status in [400_u16, 404, 429, 500, 503] {
        let r = client()
            .post(format!("{}/v1/chat/completions", proxy.url))
            .bearer_auth(CHAT_KEY)
            .header("x-test-status", status.to_string())
            .body(CHAT_BODY)
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), status);
        assert_eq!(r.headers()["x-request-id"], "req_upstream_error");
        assert_eq!(error_of(r).await["code"], "upstream_code");
    }
}

#[tokio::test]
async fn unreachable_upstream_is_502_and_slow_head_is_504() {
    // A port with nothing listening: bind, note it, close.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let proxy = spawn_proxy(&config(&format!("http://{dead}"), "reject", "")).await;
    let r = proxy.chat(CHAT_KEY).await;
    assert_eq!(r.status(), 502);
    assert_eq!(error_of(r).await["code"], "upstream_unavailable");

    let up = FakeUpstream::start().await;
    let proxy = spawn_proxy(&config(&up.url, "reject", "")).await;
    // The test config's response_timeout is 1s.
    let r = client()
        .post(format!("{}/v1/chat/completions", proxy.url))
        .bearer_auth(CHAT_KEY)
        .header("x-test-head-delay-ms", "3000")
        .body(CHAT_BODY)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 504);
    let e = error_of(r).await;
    assert_eq!(e["code"], "upstream_timeout");
}

#[tokio::test]
async fn health_and_readiness() {
    let up = FakeUpstream::start().await;
    let ready = spawn_proxy(&config(&up.url, "reject", "")).await;
    let r = client()
        .get(format!("{}/healthz", ready.url))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);
    let r = client()
        .get(format!("{}/readyz", ready.url))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200);

    let keyless = spawn_proxy_with_key(&config(&up.url, "reject", ""), None).await;
    let r = client()
        .get(format!("{}/readyz", keyless.url))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 503);
    let r = keyless.chat(CHAT_KEY).await;
    assert_eq!(r.status(), 503);
    assert_eq!(error_of(r).await["code"], "upstream_key_missing");
    assert!(up.requests().is_empty());
}
