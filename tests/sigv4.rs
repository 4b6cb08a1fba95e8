//! SigV4 upstream auth: a fake bedrock-mantle that verifies signatures on its own, credential
//! refresh, the standard chain from the environment, and regions from base URLs.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider, future};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};

use mantlegate::sigv4::{SERVICE, Signer, region_from_url};

const AKID: &str = "AKIDEXAMPLE";
const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
const TOKEN: &str = "FwoGZXIvYXdzEXAMPLE//session+token/with=odd+chars";

// ---------------------------------------------------------------------------------------------
// An independent SigV4 verifier (the server side of the protocol), written from AWS's
// specification rather than with aws-sigv4, so that it checks the signer instead of mirroring it.

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    inner.update(data);
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// RFC 3986 percent-encoding of everything but the unreserved characters (and `/` if asked).
fn uri_encode(data: &[u8], keep_slash: bool) -> String {
    let mut out = String::new();
    for &b in data {
        if b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'.' | b'_' | b'~')
            || (keep_slash && b == b'/')
        {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// What a verifier knows: access key id -> (secret, session token).
type Keys = HashMap<String, (String, Option<String>)>;

/// A request as the server received it.
struct Received<'a> {
    method: &'a Method,
    path_and_query: &'a str,
    headers: &'a HeaderMap,
    body: &'a [u8],
}

/// Checks a received request's SigV4 signature for `region`/`service`; `Err` says why not.
#[expect(
    clippy::too_many_lines,
    reason = "one straight walk through the specification"
)]
fn verify(keys: &Keys, region: &str, service: &str, request: &Received<'_>) -> Result<(), String> {
    let Received {
        method,
        path_and_query,
        headers,
        body,
    } = *request;
    let authorization = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .ok_or("no authorization")?;
    let rest = authorization
        .strip_prefix("AWS4-HMAC-SHA256 ")
        .ok_or("not AWS4-HMAC-SHA256")?;
    let mut fields = HashMap::new();
    for part in rest.split(", ") {
        let (k, v) = part.split_once('=').ok_or("malformed authorization")?;
        fields.insert(k, v);
    }
    let credential = fields.get("Credential").ok_or("no Credential")?;
    let signed_headers = *fields.get("SignedHeaders").ok_or("no SignedHeaders")?;
    let signature = *fields.get("Signature").ok_or("no Signature")?;
    let scope: Vec<&str> = credential.split('/').collect();
    let [akid, date, cred_region, cred_service, "aws4_request"] = scope[..] else {
        return Err(format!("malformed credential scope {credential}"));
    };
    let (secret, token) = keys
        .get(akid)
        .ok_or_else(|| format!("unknown key {akid}"))?;
    if cred_region != region || cred_service != service {
        return Err(format!("scope {cred_region}/{cred_service}"));
    }
    let amz_date = headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .ok_or("no x-amz-date")?;
    if !amz_date.starts_with(date) {
        return Err("x-amz-date is not the credential's date".into());
    }
    let signed: Vec<&str> = signed_headers.split(';').collect();
    for required in ["host", "x-amz-date"] {
        if !signed.contains(&required) {
            return Err(format!("{required} is not signed"));
        }
    }
    match (token, headers.get("x-amz-security-token")) {
        (Some(token), Some(sent)) if sent == token.as_str() => {
            if !signed.contains(&"x-amz-security-token") {
                return Err("the session token is not signed".into());
            }
        }
        (None, None) => {}
        _ => return Err("wrong or missing x-amz-security-token".into()),
    }
    let payload_hash = match headers.get("x-amz-content-sha256") {
        Some(sent) => {
            let actual = sha256_hex(body);
            if sent != actual.as_str() {
                return Err("x-amz-content-sha256 is not the body's hash".into());
            }
            actual
        }
        None => sha256_hex(body),
    };

    let (path, query) = path_and_query
        .split_once('?')
        .unwrap_or((path_and_query, ""));
    // Services other than S3 encode the (already encoded) path once more.
    let canonical_uri = uri_encode(path.as_bytes(), true);
    let mut params: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                uri_encode(&percent_decode(k), false),
                uri_encode(&percent_decode(v), false),
            )
        })
        .collect();
    params.sort();
    let canonical_query = params
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut canonical_headers = String::new();
    for name in &signed {
        let values: Vec<String> = headers
            .get_all(*name)
            .iter()
            .map(|v| {
                let v = v.to_str().unwrap_or_default();
                v.split_whitespace().collect::<Vec<_>>().join(" ")
            })
            .collect();
        if values.is_empty() {
            return Err(format!("signed header {name} is missing"));
        }
        let _ = writeln!(canonical_headers, "{name}:{}", values.join(","));
    }
    let canonical_request = format!(
        "{method}\n{canonical_uri}\n{canonical_query}\n{canonical_headers}\n{signed_headers}\n{payload_hash}"
    );
    let string_to_sign = format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{date}/{region}/{service}/aws4_request\n{}",
        sha256_hex(canonical_request.as_bytes())
    );
    let mut key = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    for part in [region, service, "aws4_request"] {
        key = hmac(&key, part.as_bytes());
    }
    let expected = hex::encode(hmac(&key, string_to_sign.as_bytes()));
    if expected == signature {
        Ok(())
    } else {
        Err(format!(
            "signature mismatch; canonical request:\n{canonical_request}"
        ))
    }
}

fn example_keys(token: Option<&str>) -> Keys {
    HashMap::from([(
        AKID.to_owned(),
        (SECRET.to_owned(), token.map(str::to_owned)),
    )])
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (name, value) in pairs {
        map.append(*name, HeaderValue::from_static(value));
    }
    map
}

/// The verifier accepts AWS's own signed vectors, and refuses them altered: it is a fair judge.
/// Values from smithy-lang/smithy-rs
/// `aws/rust-runtime/aws-sigv4/aws-signing-test-suite/v4/{get-vanilla-query-order-key-case,
/// post-x-www-form-urlencoded,get-vanilla-with-session-token}/header-signed-request.txt`.
#[test]
fn the_verifier_accepts_aws_test_vectors() {
    let prefix = "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request";
    let query_order = headers(&[
        ("host", "example.amazonaws.com"),
        ("x-amz-date", "20150830T123600Z"),
    ]);
    let mut signed = query_order.clone();
    signed.insert(
        "authorization",
        HeaderValue::from_str(&format!("{prefix}, SignedHeaders=host;x-amz-date, Signature=b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500")).unwrap(),
    );
    let keys = example_keys(None);
    let check = |path_and_query: &str, headers: &HeaderMap| {
        let received = Received {
            method: &Method::GET,
            path_and_query,
            headers,
            body: b"",
        };
        verify(&keys, "us-east-1", "service", &received)
    };
    check("/?Param2=value2&Param1=value1", &signed).unwrap();
    assert!(check("/?Param2=value2&Param1=value9", &signed).is_err());

    let mut form = headers(&[
        ("content-type", "application/x-www-form-urlencoded"),
        ("host", "example.amazonaws.com"),
        ("content-length", "13"),
        ("x-amz-date", "20150830T123600Z"),
        (
            "x-amz-content-sha256",
            "9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e",
        ),
    ]);
    form.insert(
        "authorization",
        HeaderValue::from_str(&format!("{prefix}, SignedHeaders=content-length;content-type;host;x-amz-content-sha256;x-amz-date, Signature=d3875051da38690788ef43de4db0d8f280229d82040bfac253562e56c3f20e0b")).unwrap(),
    );
    let post = |body: &[u8]| {
        let received = Received {
            method: &Method::POST,
            path_and_query: "/",
            headers: &form,
            body,
        };
        verify(&keys, "us-east-1", "service", &received)
    };
    post(b"Param1=value1").unwrap();
    assert!(post(b"Param1=value2").is_err());

    let token = "6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267";
    let mut with_token = query_order;
    with_token.insert("x-amz-security-token", HeaderValue::from_static(token));
    with_token.insert(
        "authorization",
        HeaderValue::from_str(&format!("{prefix}, SignedHeaders=host;x-amz-date;x-amz-security-token, Signature=07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8")).unwrap(),
    );
    let received = Received {
        method: &Method::GET,
        path_and_query: "/",
        headers: &with_token,
        body: b"",
    };
    verify(
        &example_keys(Some(token)),
        "us-east-1",
        "service",
        &received,
    )
    .unwrap();
}

// ---------------------------------------------------------------------------------------------
// A fake bedrock-mantle that verifies every call.

struct Verifying {
    keys: Keys,
    /// Requests refused, with why.
    refusals: std::sync::Mutex<Vec<String>>,
}

async fn check_signature(State(state): State<Arc<Verifying>>, request: Request) -> StatusCode {
    let (parts, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(http_body_util::Collected::to_bytes)
        .unwrap_or_default();
    let path_and_query = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    let received = Received {
        method: &parts.method,
        path_and_query: &path_and_query,
        headers: &parts.headers,
        body: &body,
    };
    match verify(&state.keys, "us-east-1", SERVICE, &received) {
        Ok(()) => StatusCode::OK,
        Err(why) => {
            state.refusals.lock().expect("lock").push(why);
            StatusCode::FORBIDDEN
        }
    }
}

async fn start_verifying_upstream(keys: Keys) -> (String, Arc<Verifying>) {
    let state = Arc::new(Verifying {
        keys,
        refusals: std::sync::Mutex::new(Vec::new()),
    });
    let app = Router::new()
        .fallback(check_signature)
        .with_state(Arc::clone(&state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, state)
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

async fn send(method: Method, url: &str, headers: HeaderMap, body: Bytes) -> u16 {
    client()
        .request(method, url)
        .headers(headers)
        .body(body)
        .send()
        .await
        .expect("send")
        .status()
        .as_u16()
}

fn static_signer(token: Option<&str>) -> Signer {
    let credentials = Credentials::new(AKID, SECRET, token.map(str::to_owned), None, "test");
    Signer::with_provider(
        SharedCredentialsProvider::new(credentials),
        "us-east-1".into(),
    )
}

/// Headers as mantlegate forwards them from an OpenAI SDK, before signing.
fn sdk_headers() -> HeaderMap {
    headers(&[
        ("content-type", "application/json"),
        ("accept", "application/json"),
        ("user-agent", "OpenAI/Python 2.3.0"),
        ("x-stainless-lang", "python"),
        ("x-stainless-retry-count", "0"),
        ("x-stainless-read-timeout", "600"),
        ("openai-project", "proj_5d5ykleja6cwpirysbb7"),
    ])
}

#[tokio::test]
async fn the_fake_upstream_accepts_what_the_signer_signs_and_nothing_altered() {
    let (base, upstream) = start_verifying_upstream(example_keys(Some(TOKEN))).await;
    let signer = static_signer(Some(TOKEN));
    let url = format!("{base}/v1/chat/completions");
    let body = Bytes::from_static(
        br#"{"model":"openai.gpt-oss-120b","messages":[{"role":"user","content":"h\u00e9"}]}"#,
    );
    let mut outgoing = sdk_headers();
    signer
        .sign(&Method::POST, &url, &mut outgoing, &body)
        .await
        .unwrap();
    let authorization = outgoing["authorization"].to_str().unwrap();
    assert!(
        authorization.contains("SignedHeaders=content-type;host;openai-project;x-amz-content-sha256;x-amz-date;x-amz-security-token,"),
        "{authorization}"
    );
    assert_eq!(outgoing["x-amz-security-token"], TOKEN);
    assert_eq!(outgoing["x-amz-content-sha256"], sha256_hex(&body).as_str());

    assert_eq!(
        send(Method::POST, &url, outgoing.clone(), body.clone()).await,
        200,
        "{:?}",
        upstream.refusals.lock().unwrap()
    );

    // Unsigned headers may change on the way: still valid.
    let mut hop = outgoing.clone();
    hop.insert("x-stainless-retry-count", HeaderValue::from_static("1"));
    hop.insert("user-agent", HeaderValue::from_static("something else"));
    hop.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
    hop.insert("via", HeaderValue::from_static("1.1 cdn"));
    hop.remove("accept");
    assert_eq!(send(Method::POST, &url, hop, body.clone()).await, 200);

    // A outgoing header or the body changed after signing: refused.
    let mut project = outgoing.clone();
    project.insert("openai-project", HeaderValue::from_static("proj_other"));
    assert_eq!(send(Method::POST, &url, project, body.clone()).await, 403);
    let mut content_type = outgoing.clone();
    content_type.insert("content-type", HeaderValue::from_static("text/plain"));
    assert_eq!(
        send(Method::POST, &url, content_type, body.clone()).await,
        403
    );
    let other_body = Bytes::from_static(br#"{"model":"openai.gpt-oss-20b","messages":[]}"#);
    assert_eq!(
        send(Method::POST, &url, outgoing.clone(), other_body).await,
        403
    );
    let other_path = format!("{base}/v1/responses");
    assert_eq!(
        send(Method::POST, &other_path, outgoing.clone(), body.clone()).await,
        403
    );
    let refusals = upstream.refusals.lock().unwrap();
    let why: Vec<&str> = refusals
        .iter()
        .map(|r| r.lines().next().unwrap_or_default())
        .collect();
    assert_eq!(
        why,
        [
            "signature mismatch; canonical request:",
            "signature mismatch; canonical request:",
            "x-amz-content-sha256 is not the body's hash",
            "signature mismatch; canonical request:",
        ]
    );
}

#[tokio::test]
async fn queries_get_and_static_credentials_verify_too() {
    let (base, upstream) = start_verifying_upstream(example_keys(None)).await;
    let signer = static_signer(None);
    let url = format!("{base}/v1/organization/projects?limit=20&after=proj_a%20b&before=");
    let mut outgoing = headers(&[("openai-project", "default")]);
    // A stale token must not ride along with credentials that have none.
    outgoing.insert("x-amz-security-token", HeaderValue::from_static("stale"));
    signer
        .sign(&Method::GET, &url, &mut outgoing, b"")
        .await
        .unwrap();
    assert!(!outgoing.contains_key("x-amz-security-token"));
    assert_eq!(
        send(Method::GET, &url, outgoing, Bytes::new()).await,
        200,
        "{:?}",
        upstream.refusals.lock().unwrap()
    );
}

// ---------------------------------------------------------------------------------------------
// Credential refresh.

/// Hands out credentials `AKID1`, `AKID2`... each valid for `lifetime`, counting calls.
#[derive(Debug)]
struct ShortLived {
    calls: Arc<AtomicUsize>,
    lifetime: Duration,
}

impl ProvideCredentials for ShortLived {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        future::ProvideCredentials::ready(Ok(Credentials::new(
            format!("AKID{n}"),
            SECRET,
            Some(format!("token{n}")),
            Some(SystemTime::now() + self.lifetime),
            "short-lived",
        )))
    }
}

fn short_lived_signer(lifetime: Duration) -> (Signer, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let provider = SharedCredentialsProvider::new(ShortLived {
        calls: Arc::clone(&calls),
        lifetime,
    });
    (Signer::with_provider(provider, "us-east-1".into()), calls)
}

/// Signs a request and returns the access key id it was signed with.
async fn signing_key(signer: &Signer) -> String {
    let mut headers = HeaderMap::new();
    signer
        .sign(
            &Method::POST,
            "https://bedrock-mantle.us-east-1.api.aws/v1/responses",
            &mut headers,
            b"{}",
        )
        .await
        .expect("sign");
    let authorization = headers["authorization"].to_str().expect("text");
    let credential = authorization
        .split("Credential=")
        .nth(1)
        .and_then(|c| c.split('/').next())
        .expect("a credential");
    assert_eq!(
        headers["x-amz-security-token"],
        format!("token{}", &credential[4..]).as_str(),
        "token and key come from the same credentials"
    );
    credential.to_owned()
}

// The cache runs on the wall clock (credential expiry is wall-clock time), so these tests let
// real time pass: a bounded poll, not a sleep standing in for synchronisation.

#[tokio::test]
async fn credentials_are_cached_and_refreshed_before_they_expire() {
    let lifetime = Duration::from_secs(2);
    let (signer, calls) = short_lived_signer(lifetime);
    let start = Instant::now();
    assert_eq!(signing_key(&signer).await, "AKID1");
    for _ in 0..20 {
        assert_eq!(signing_key(&signer).await, "AKID1");
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1, "cached");
    // From half their life on, a refresh starts in the background; the first credentials
    // must be replaced before they expire.
    let deadline = start + lifetime + Duration::from_secs(3);
    loop {
        let key = signing_key(&signer).await;
        if key == "AKID2" {
            break;
        }
        assert_eq!(key, "AKID1");
        assert!(Instant::now() < deadline, "no refresh");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        start.elapsed() < lifetime,
        "refreshed only after expiry: {:?}",
        start.elapsed()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2, "one refresh");
}

#[tokio::test]
async fn expired_credentials_are_replaced_before_signing() {
    let lifetime = Duration::from_millis(1500);
    let (signer, calls) = short_lived_signer(lifetime);
    assert_eq!(signing_key(&signer).await, "AKID1");
    // Idle past expiry: nothing refreshed them in the meantime.
    tokio::time::sleep(lifetime + Duration::from_millis(100)).await;
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(signing_key(&signer).await, "AKID2");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

// ---------------------------------------------------------------------------------------------
// The standard chain, from environment variables. Changing this process's environment would
// race with other tests (and needs `unsafe`), so the check runs in a child process.

const CHILD_MARKER: &str = "MANTLEGATE_SIGV4_CHAIN_CHILD";

#[test]
fn the_standard_chain_reads_credentials_from_the_environment() {
    let exe = std::env::current_exe().unwrap();
    let output = std::process::Command::new(exe)
        .args([
            "--exact",
            "chain_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_MARKER, "1")
        .env("AWS_ACCESS_KEY_ID", "AKIDFROMENV")
        .env("AWS_SECRET_ACCESS_KEY", SECRET)
        .env("AWS_SESSION_TOKEN", TOKEN)
        .env("AWS_CONFIG_FILE", "/nonexistent/mantlegate/config")
        .env(
            "AWS_SHARED_CREDENTIALS_FILE",
            "/nonexistent/mantlegate/credentials",
        )
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_WEB_IDENTITY_TOKEN_FILE")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
#[ignore = "run by the_standard_chain_reads_credentials_from_the_environment"]
async fn chain_child() {
    if std::env::var_os(CHILD_MARKER).is_none() {
        return;
    }
    let signer = Signer::from_environment("eu-west-1".into()).await.unwrap();
    signer.preload().await.unwrap();
    let mut headers = HeaderMap::new();
    signer
        .sign(
            &Method::POST,
            "https://bedrock-mantle.eu-west-1.api.aws/v1/chat/completions",
            &mut headers,
            b"{}",
        )
        .await
        .unwrap();
    let authorization = headers["authorization"].to_str().unwrap();
    assert!(
        authorization.contains("Credential=AKIDFROMENV/")
            && authorization.contains("/eu-west-1/bedrock-mantle/aws4_request"),
        "{authorization}"
    );
    assert_eq!(headers["x-amz-security-token"], TOKEN);
}

// ---------------------------------------------------------------------------------------------

#[test]
fn regions_come_from_bedrock_mantle_hosts_only() {
    let cases = [
        (
            "https://bedrock-mantle.us-east-1.api.aws/v1",
            Some("us-east-1"),
        ),
        (
            "https://bedrock-mantle.eu-central-1.api.aws",
            Some("eu-central-1"),
        ),
        (
            "https://BEDROCK-MANTLE.US-WEST-2.API.AWS/openai/v1",
            Some("us-west-2"),
        ),
        (
            "https://bedrock-mantle.us-gov-west-1.api.aws:443/v1",
            Some("us-gov-west-1"),
        ),
        (
            "https://bedrock-mantle.ap-southeast-2.api.aws./v1",
            Some("ap-southeast-2"),
        ),
        (
            "https://bedrock-runtime.us-east-1.amazonaws.com/openai/v1",
            None,
        ),
        ("https://bedrock-mantle.us-east-1.amazonaws.com/v1", None),
        ("https://bedrock-mantle.api.aws/v1", None),
        ("https://bedrock-mantle.a.b.api.aws/v1", None),
        ("https://evil.bedrock-mantle.us-east-1.api.aws/v1", None),
        ("http://127.0.0.1:8080/v1", None),
        ("not a url", None),
    ];
    for (url, region) in cases {
        assert_eq!(region_from_url(url).as_deref(), region, "{url}");
    }
}

#[test]
fn the_signer_is_cheap_to_share_and_hides_its_credentials() {
    fn shareable<T: Clone + Send + Sync + 'static>() {}
    // Signing runs inside axum handlers, whose futures must be `Send`.
    fn send<F: Future + Send>(future: F) -> F {
        future
    }
    shareable::<Signer>();
    let signer = static_signer(Some(TOKEN));
    let shown = format!("{signer:?}");
    assert!(!shown.contains(SECRET) && !shown.contains(TOKEN), "{shown}");
    assert_eq!(signer.clone().region(), "us-east-1");
    let mut headers = HeaderMap::new();
    drop(send(signer.sign(
        &Method::GET,
        "https://a.example/",
        &mut headers,
        b"",
    )));
}
