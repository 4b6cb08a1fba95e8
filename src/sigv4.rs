//! AWS SigV4 for upstream calls: credentials from the standard AWS chain, cached and refreshed
//! ahead of expiry, and the signature of each request sent to bedrock-mantle.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use arc_swap::ArcSwapOption;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::provider::error::CredentialsError;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_sigv4::http_request::{
    PayloadChecksumKind, SignableBody, SignableRequest, SigningSettings, sign as sigv4_sign,
};
use aws_sigv4::sign::v4;
use aws_smithy_runtime_api::client::identity::Identity;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, header};
use futures_util::FutureExt as _;
use futures_util::future::{BoxFuture, Shared};

/// The signing name of bedrock-mantle (signing as `bedrock` is refused with 401).
pub const SERVICE: &str = "bedrock-mantle";

/// Request headers signed when present, besides `host` (from the URL) and the `x-amz-*` ones
/// that signing adds. Only headers that reach bedrock-mantle exactly as mantlegate sets them
/// may be signed: a hop or the HTTP client may change the others (`user-agent`,
/// `x-stainless-*`, `x-forwarded-*`, `via`, `cookie`...), and a changed signed header is a
/// 401 `InvalidSignature`.
const SIGNED_HEADERS: [HeaderName; 2] = [
    header::CONTENT_TYPE,
    HeaderName::from_static("openai-project"),
];

const X_AMZ_SECURITY_TOKEN: HeaderName = HeaderName::from_static("x-amz-security-token");

/// Credentials are refreshed in the background from this long before they expire (or from
/// half their remaining life, if that is shorter): calls go on with the old ones meanwhile.
const REFRESH_AHEAD: Duration = Duration::from_mins(5);
/// Credentials this close to expiry (or a tenth of their remaining life) are no longer used:
/// a call waits for new ones, so that none arrives upstream with expired credentials.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);
/// Credentials without an expiry (static keys) are re-read this often, so that a rotated
/// shared credentials file is picked up (the AWS SDKs' default too).
const STATIC_REFRESH: Duration = Duration::from_mins(15);
/// After a failed background refresh, the next one waits this long.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);
/// Longest wait for the credential chain (IMDS, STS...) before giving up on a load.
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Signs upstream calls with SigV4 for `bedrock-mantle`. Cheap to clone and share (two
/// `Arc`s); clones share one credential cache. Its `Debug` shows the region, never credentials.
#[derive(Clone)]
pub struct Signer {
    region: Arc<str>,
    cache: Arc<CredentialsCache>,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("service", &SERVICE)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Builds the standard AWS credential chain (environment, shared profile, web identity,
    /// container and instance roles: `aws_config::defaults(BehaviorVersion::latest())`), with
    /// `region` for the chain's own calls (STS) and for signing. Loads no credentials yet:
    /// see [`Signer::preload`].
    pub async fn from_environment(region: String) -> anyhow::Result<Self> {
        let config = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region.clone()))
            .load()
            .await;
        // This is the bare chain: aws-config's caching lives in the SDK clients' identity
        // cache, which signing outside an SDK client does not go through. `CredentialsCache`
        // caches instead.
        let provider = config
            .credentials_provider()
            .context("the AWS configuration has no credentials provider")?;
        Ok(Self::with_provider(provider, region))
    }

    /// Signs with credentials from `provider` (cached here), for tests and custom setups.
    #[must_use]
    pub fn with_provider(provider: SharedCredentialsProvider, region: String) -> Self {
        Self {
            region: region.into(),
            cache: Arc::new(CredentialsCache::new(provider)),
        }
    }

    /// The region signatures are made for.
    #[must_use]
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Loads credentials now, so that a missing or broken credential source shows at startup
    /// rather than on the first call.
    pub async fn preload(&self) -> anyhow::Result<()> {
        self.cache.get(SystemTime::now()).await.map(drop)
    }

    /// Signs an outgoing request in place: sets `authorization`, `x-amz-date`,
    /// `x-amz-content-sha256` (hex SHA-256 of `body`) and, when the credentials carry a
    /// session token, `x-amz-security-token` (removed otherwise). `headers` are those that
    /// will be sent; the host is taken from `url`. Of the others, only `content-type` and
    /// `openai-project` are signed; the rest are left as they are, unsigned.
    ///
    /// Credentials come from the cache: no lock is held across an await, and only a call
    /// that finds no usable credentials waits for the chain.
    pub async fn sign(
        &self,
        method: &Method,
        url: &str,
        headers: &mut HeaderMap,
        body: &[u8],
    ) -> anyhow::Result<()> {
        let now = SystemTime::now();
        let entry = self.cache.get(now).await?;
        let scope = Scope {
            identity: &entry.identity,
            region: &self.region,
            service: SERVICE,
            time: now,
            content_sha256_header: true,
        };
        sign_headers(&scope, &SIGNED_HEADERS, method, url, headers, body)
    }
}

/// The region in a bedrock-mantle URL's host name
/// (`https://bedrock-mantle.us-east-1.api.aws/v1` -> `us-east-1`).
#[must_use]
pub fn region_from_url(url: &str) -> Option<String> {
    let url = reqwest::Url::parse(url).ok()?;
    let host = url.host_str()?;
    let host = host.strip_suffix('.').unwrap_or(host);
    let region = host
        .strip_prefix("bedrock-mantle.")?
        .strip_suffix(".api.aws")?;
    let valid = !region.is_empty()
        && !region.starts_with('-')
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    valid.then(|| region.to_owned())
}

/// What a signature is made for and with.
struct Scope<'a> {
    identity: &'a Identity,
    region: &'a str,
    service: &'a str,
    time: SystemTime,
    /// Send the body's hash as `x-amz-content-sha256` (and sign it).
    content_sha256_header: bool,
}

/// Signs a request in place, signing `host` and the headers named in `signed` (all their
/// values; a header whose value is not visible ASCII is left unsigned rather than failing).
fn sign_headers(
    scope: &Scope<'_>,
    signed: &[HeaderName],
    method: &Method,
    url: &str,
    headers: &mut HeaderMap,
    body: &[u8],
) -> anyhow::Result<()> {
    // Sign the URL as the HTTP client will send it: reqwest parses it the same way, which
    // lowercases the host, drops a default port and percent-encodes what needs it.
    let url = reqwest::Url::parse(url).context("the upstream URL is not valid")?;
    let mut settings = SigningSettings::default();
    settings.payload_checksum_kind = if scope.content_sha256_header {
        PayloadChecksumKind::XAmzSha256
    } else {
        PayloadChecksumKind::NoHeader
    };
    let params = v4::SigningParams::builder()
        .identity(scope.identity)
        .region(scope.region)
        .name(scope.service)
        .time(scope.time)
        .settings(settings)
        .build()
        .context("incomplete signing parameters")?
        .into();
    let instructions = {
        let mut to_sign: Vec<(&str, &str)> = Vec::with_capacity(signed.len() + 2);
        for name in signed {
            let start = to_sign.len();
            for value in headers.get_all(name) {
                if let Ok(value) = value.to_str() {
                    to_sign.push((name.as_str(), value));
                } else {
                    to_sign.truncate(start);
                    break;
                }
            }
        }
        let request = SignableRequest::new(
            method.as_str(),
            url.as_str(),
            to_sign.into_iter(),
            SignableBody::Bytes(body),
        )
        .context("cannot sign this request")?;
        sigv4_sign(request, &params)
            .context("cannot sign this request")?
            .into_parts()
            .0
    };
    // A token left from elsewhere must not ride along with credentials that have none.
    headers.remove(X_AMZ_SECURITY_TOKEN);
    for added in instructions.into_parts().0 {
        let mut value =
            HeaderValue::from_str(added.value()).context("signing produced an invalid header")?;
        // The signature is as good as the credential for the next few minutes.
        value.set_sensitive(added.sensitive() || added.name() == "authorization");
        // aws-sigv4's names are lowercase constants (`authorization`, `x-amz-*`), which
        // `from_static` takes without allocating.
        headers.insert(HeaderName::from_static(added.name()), value);
    }
    Ok(())
}

/// Credentials as cached, with when to refresh them.
struct Entry {
    identity: Identity,
    /// From then on, a call starts a background refresh and still uses these.
    refresh_at: SystemTime,
    /// From then on, these are not used: a call waits for new ones. `None`: never expire.
    usable_until: Option<SystemTime>,
}

impl Entry {
    fn new(credentials: aws_credential_types::Credentials, now: SystemTime) -> Self {
        let expiry = credentials.expiry();
        let (refresh_at, usable_until) = match expiry {
            Some(expiry) => {
                let left = expiry.duration_since(now).unwrap_or_default();
                (
                    before(expiry, REFRESH_AHEAD.min(left / 2)),
                    Some(before(expiry, EXPIRY_MARGIN.min(left / 10))),
                )
            }
            None => (now + STATIC_REFRESH, None),
        };
        Self {
            identity: credentials.into(),
            refresh_at,
            usable_until,
        }
    }

    fn usable(&self, now: SystemTime) -> bool {
        self.usable_until.is_none_or(|until| now < until)
    }
}

fn before(t: SystemTime, d: Duration) -> SystemTime {
    t.checked_sub(d).unwrap_or(t)
}

type LoadResult = Result<Arc<Entry>, Arc<CredentialsError>>;
/// One load of the chain, awaited by every call that needs it (single flight).
type Load = Shared<BoxFuture<'static, LoadResult>>;

/// Caches what a credentials provider returns and refreshes it before it expires.
///
/// The fast path is one atomic load (`ArcSwapOption`). A refresh is a single shared load
/// future: the mutex around it is only held to take or install it, never across an await.
/// Ahead of expiry the load runs in a background task while calls keep the current
/// credentials; only a call that finds none usable (first call, or the refresh kept failing
/// until the margin) awaits it.
struct CredentialsCache {
    provider: SharedCredentialsProvider,
    current: ArcSwapOption<Entry>,
    loading: Mutex<Option<Load>>,
}

impl CredentialsCache {
    fn new(provider: SharedCredentialsProvider) -> Self {
        Self {
            provider,
            current: ArcSwapOption::empty(),
            loading: Mutex::new(None),
        }
    }

    /// Usable credentials at `now`: cached ones, or freshly loaded ones.
    async fn get(self: &Arc<Self>, now: SystemTime) -> anyhow::Result<Arc<Entry>> {
        if let Some(entry) = self.current.load_full()
            && entry.usable(now)
        {
            if now >= entry.refresh_at {
                // Refresh ahead: the load runs in its own task while this call goes on with
                // the current credentials.
                drop(self.load(now));
            }
            return Ok(entry);
        }
        self.load(now)
            .await
            .map_err(|err| anyhow::Error::new(err).context("no AWS credentials"))
    }

    fn slot(&self) -> MutexGuard<'_, Option<Load>> {
        // The slot is only ever replaced whole, so a panic elsewhere cannot leave it torn.
        self.loading.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The load in flight, or a new one. A new load runs in its own task, so that it finishes
    /// (and is logged if it fails) even when every call waiting for it is cancelled.
    fn load(self: &Arc<Self>, now: SystemTime) -> Load {
        let mut slot = self.slot();
        if let Some(load) = slot.as_ref() {
            return load.clone();
        }
        let cache = Arc::clone(self);
        let load = async move {
            let result = cache.fetch(now).await;
            *cache.slot() = None;
            result
        }
        .boxed()
        .shared();
        *slot = Some(load.clone());
        drop(slot);
        // Without a runtime (never in mantlegate) the callers drive the load themselves.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let driven = load.clone();
            runtime.spawn(async move {
                if let Err(err) = driven.await {
                    let err = anyhow::Error::new(err);
                    tracing::warn!(error = format!("{err:#}"), "loading AWS credentials failed");
                }
            });
        }
        load
    }

    /// Asks the provider, and caches what it returns.
    async fn fetch(&self, now: SystemTime) -> LoadResult {
        let provided =
            match tokio::time::timeout(LOAD_TIMEOUT, self.provider.provide_credentials()).await {
                Ok(result) => result,
                Err(_) => self
                    .provider
                    .fallback_on_interrupt()
                    .ok_or_else(|| CredentialsError::provider_timed_out(LOAD_TIMEOUT)),
            };
        match provided {
            Ok(credentials) => {
                let entry = Arc::new(Entry::new(credentials, now));
                tracing::debug!(refresh_at = ?entry.refresh_at, "loaded AWS credentials");
                self.current.store(Some(Arc::clone(&entry)));
                Ok(entry)
            }
            Err(err) => {
                // Keep the current credentials while they last, and wait before trying again.
                // Only one load runs at a time, so nothing else writes `current` meanwhile.
                if let Some(entry) = self.current.load_full()
                    && entry.usable(now)
                {
                    self.current.store(Some(Arc::new(Entry {
                        identity: entry.identity.clone(),
                        refresh_at: now + RETRY_AFTER_FAILURE,
                        usable_until: entry.usable_until,
                    })));
                }
                Err(Arc::new(err))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use aws_credential_types::Credentials;
    use aws_credential_types::provider::future;

    use super::*;

    const AKID: &str = "AKIDEXAMPLE";
    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    /// 2015-08-30T12:36:00Z, the time of every vector in the suite.
    #[expect(clippy::duration_suboptimal_units, reason = "a Unix timestamp")]
    fn vector_time() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_440_938_160)
    }

    struct Vector {
        name: &'static str,
        method: Method,
        url: &'static str,
        headers: &'static [(&'static str, &'static str)],
        body: &'static [u8],
        session_token: Option<&'static str>,
        sign_body: bool,
        /// The `Authorization` header of the vector's `header-signed-request.txt`, after
        /// `Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, `.
        authorization: &'static str,
    }

    const STS_TOKEN: &str = "AQoDYXdzEPT//////////wEXAMPLEtc764bNrC9SAPBSM22wDOk4x4HIZ8j4FZTwdQWLWsKWHGBuFqwAeMicRXmxfpSPfIeoIYRqTflfKD8YUuwthAx7mSEI/qkPpKPi/kMcGdQrmGdeehM4IC1NtBmUpp2wUE8phUZampKsburEDy0KPkyQDYwT7WZ0wq5VSXDvp75YU9HFvlRd8Tx6q6fE8YQcHNVXAkiY9q6d+xo0rKwT38xVqr7ZD0u0iPPkUL64lIZbqBAz+scqKmlzm8FDrypNC9Yjc8fPOLn9FX9KSYvKTr4rvx3iSIlTJabIQwj2ICCR/oLxBA==";

    /// AWS's SigV4 test suite, as shipped with aws-sigv4 in smithy-lang/smithy-rs:
    /// `aws/rust-runtime/aws-sigv4/aws-signing-test-suite/v4/<name>/` (`request.txt`,
    /// `context.json`, `header-signed-request.txt`). Credentials AKIDEXAMPLE, region
    /// us-east-1, service `service`, time 20150830T123600Z. get-vanilla, post-vanilla and
    /// get-vanilla-query-order-key-case carry the same signatures in the original
    /// aws-sig-v4-test-suite (`<name>.authz`).
    const VECTORS: [Vector; 11] = [
        Vector {
            name: "get-vanilla",
            method: Method::GET,
            url: "https://example.amazonaws.com/",
            headers: &[],
            body: b"",
            session_token: None,
            sign_body: false,
            authorization: "SignedHeaders=host;x-amz-date, Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        },
        Vector {
            name: "post-vanilla",
            method: Method::POST,
            url: "https://example.amazonaws.com/",
            headers: &[],
            body: b"",
            session_token: None,
            sign_body: false,
            authorization: "SignedHeaders=host;x-amz-date, Signature=5da7c1a2acd57cee7505fc6676e4e544621c30862966e37dddb68e92efbe5d6b",
        },
        Vector {
            name: "get-vanilla-query-order-key-case",
            method: Method::GET,
            url: "https://example.amazonaws.com/?Param2=value2&Param1=value1",
            headers: &[],
            body: b"",
            session_token: None,
            sign_body: false,
            authorization: "SignedHeaders=host;x-amz-date, Signature=b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
        },
        Vector {
            name: "get-vanilla-query-order-encoded",
            method: Method::GET,
            url: "https://example.amazonaws.com/?Param-3=Value3&Param=Value2&%E1%88%B4=Value1",
            headers: &[],
            body: b"",
            session_token: None,
            sign_body: false,
            authorization: "SignedHeaders=host;x-amz-date, Signature=371d3713e185cc334048618a97f809c9ffe339c62934c032af5a0e595648fcac",
        },
        Vector {
            name: "get-vanilla-query-unreserved",
            method: Method::GET,
            url: "https://example.amazonaws.com/?-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz=-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
            headers: &[],
            body: b"",
            session_token: None,
            sign_body: false,
            authorization: "SignedHeaders=host;x-amz-date, Signature=9c3e54bfcdf0b19771a7f523ee5669cdf59bc7cc0884027167c21bb143a40197",
        },
        Vector {
            name: "get-header-value-trim",
            method: Method::GET,
            url: "https://example.amazonaws.com/",
            headers: &[("my-header1", " value1"), ("my-header2", " \"a   b   c\"")],
            body: b"",
            session_token: None,
            sign_body: false,
            authorization: "SignedHeaders=host;my-header1;my-header2;x-amz-date, Signature=acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
        },
        Vector {
            name: "post-header-key-sort",
            method: Method::POST,
            url: "https://example.amazonaws.com/",
            headers: &[("my-header1", "value1")],
            body: b"",
            session_token: None,
            sign_body: false,
            authorization: "SignedHeaders=host;my-header1;x-amz-date, Signature=c5410059b04c1ee005303aed430f6e6645f61f4dc9e1461ec8f8916fdf18852c",
        },
        Vector {
            name: "post-x-www-form-urlencoded",
            method: Method::POST,
            url: "https://example.amazonaws.com/",
            headers: &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("content-length", "13"),
            ],
            body: b"Param1=value1",
            session_token: None,
            sign_body: true,
            authorization: "SignedHeaders=content-length;content-type;host;x-amz-content-sha256;x-amz-date, Signature=d3875051da38690788ef43de4db0d8f280229d82040bfac253562e56c3f20e0b",
        },
        Vector {
            name: "post-x-www-form-urlencoded-parameters",
            method: Method::POST,
            url: "https://example.amazonaws.com/",
            headers: &[
                (
                    "content-type",
                    "application/x-www-form-urlencoded; charset=utf-8",
                ),
                ("content-length", "13"),
            ],
            body: b"Param1=value1",
            session_token: None,
            sign_body: true,
            authorization: "SignedHeaders=content-length;content-type;host;x-amz-content-sha256;x-amz-date, Signature=328d1b9eaadca9f5818ef05e8392801e091653bafec24fcab71e7344e7f51422",
        },
        Vector {
            name: "get-vanilla-with-session-token",
            method: Method::GET,
            url: "https://example.amazonaws.com/",
            headers: &[],
            body: b"",
            session_token: Some("6e86291e8372ff2a2260956d9b8aae1d763fbf315fa00fa31553b73ebf194267"),
            sign_body: false,
            authorization: "SignedHeaders=host;x-amz-date;x-amz-security-token, Signature=07ec1639c89043aa0e3e2de82b96708f198cceab042d4a97044c66dd9f74e7f8",
        },
        Vector {
            name: "post-sts-header-before",
            method: Method::POST,
            url: "https://example.amazonaws.com/",
            headers: &[],
            body: b"",
            session_token: Some(STS_TOKEN),
            sign_body: false,
            authorization: "SignedHeaders=host;x-amz-date;x-amz-security-token, Signature=85d96828115b5dc0cfc3bd16ad9e210dd772bbebba041836c64533a82be05ead",
        },
    ];

    #[test]
    fn aws_test_suite_vectors() {
        for vector in &VECTORS {
            let identity: Identity = Credentials::new(
                AKID,
                SECRET,
                vector.session_token.map(str::to_owned),
                None,
                "vector",
            )
            .into();
            let scope = Scope {
                identity: &identity,
                region: "us-east-1",
                service: "service",
                time: vector_time(),
                content_sha256_header: vector.sign_body,
            };
            let mut headers = HeaderMap::new();
            let mut signed = Vec::new();
            for (name, value) in vector.headers {
                let name = HeaderName::from_static(name);
                headers.append(name.clone(), HeaderValue::from_static(value));
                if !signed.contains(&name) {
                    signed.push(name);
                }
            }
            sign_headers(
                &scope,
                &signed,
                &vector.method,
                vector.url,
                &mut headers,
                vector.body,
            )
            .unwrap();
            let expected = format!(
                "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, {}",
                vector.authorization
            );
            assert_eq!(
                headers[header::AUTHORIZATION],
                expected.as_str(),
                "{}",
                vector.name
            );
            assert_eq!(headers["x-amz-date"], "20150830T123600Z", "{}", vector.name);
            assert_eq!(
                headers
                    .get("x-amz-security-token")
                    .map(|v| v.to_str().unwrap()),
                vector.session_token,
                "{}",
                vector.name
            );
            assert_eq!(
                headers.contains_key("x-amz-content-sha256"),
                vector.sign_body,
                "{}",
                vector.name
            );
            assert!(headers[header::AUTHORIZATION].is_sensitive());
        }
    }

    #[test]
    fn only_the_listed_headers_are_signed_and_stale_tokens_go() {
        let identity: Identity = Credentials::new(AKID, SECRET, None, None, "test").into();
        let scope = Scope {
            identity: &identity,
            region: "us-east-1",
            service: SERVICE,
            time: vector_time(),
            content_sha256_header: true,
        };
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("content-type", "application/json"),
            ("openai-project", "proj_1"),
            ("user-agent", "OpenAI/Python 2.0"),
            ("x-stainless-retry-count", "0"),
            ("x-forwarded-for", "10.0.0.1"),
            ("via", "1.1 cdn"),
            ("cookie", "a=b"),
            ("x-amz-security-token", "left-over"),
            ("authorization", "Bearer old"),
        ] {
            headers.insert(name, HeaderValue::from_static(value));
        }
        sign_headers(
            &scope,
            &SIGNED_HEADERS,
            &Method::POST,
            "https://bedrock-mantle.us-east-1.api.aws/v1/chat/completions",
            &mut headers,
            b"{}",
        )
        .unwrap();
        let authorization = headers[header::AUTHORIZATION].to_str().unwrap();
        assert!(authorization.contains(
            "/20150830/us-east-1/bedrock-mantle/aws4_request, SignedHeaders=content-type;host;openai-project;x-amz-content-sha256;x-amz-date, "
        ));
        assert!(!headers.contains_key("x-amz-security-token"));
        assert_eq!(
            headers["x-amz-content-sha256"],
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
        // Unsigned headers are left as they were.
        assert_eq!(headers["x-stainless-retry-count"], "0");
        assert_eq!(headers["user-agent"], "OpenAI/Python 2.0");
    }

    #[test]
    fn a_header_that_is_not_text_is_left_unsigned() {
        let identity: Identity = Credentials::new(AKID, SECRET, None, None, "test").into();
        let scope = Scope {
            identity: &identity,
            region: "us-east-1",
            service: SERVICE,
            time: vector_time(),
            content_sha256_header: true,
        };
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            HeaderValue::from_bytes(b"application/json; x=\xe9").unwrap(),
        );
        headers.insert("openai-project", HeaderValue::from_static("proj_1"));
        sign_headers(
            &scope,
            &SIGNED_HEADERS,
            &Method::POST,
            "https://bedrock-mantle.us-east-1.api.aws/v1/responses",
            &mut headers,
            b"{}",
        )
        .unwrap();
        assert!(
            headers[header::AUTHORIZATION]
                .to_str()
                .unwrap()
                .contains("SignedHeaders=host;openai-project;x-amz-content-sha256;x-amz-date,")
        );
    }

    /// A provider that hands out numbered credentials, each valid for `lifetime` from the
    /// test clock's `now`, and counts calls; `fail` makes it fail instead.
    #[derive(Debug)]
    struct Numbered {
        calls: Arc<AtomicUsize>,
        now: Arc<Mutex<SystemTime>>,
        lifetime: Option<Duration>,
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    impl ProvideCredentials for Numbered {
        fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if self.fail.load(Ordering::SeqCst) {
                return future::ProvideCredentials::ready(Err(CredentialsError::not_loaded(
                    "test failure",
                )));
            }
            let expiry = self.lifetime.map(|l| *self.now.lock().unwrap() + l);
            future::ProvideCredentials::ready(Ok(Credentials::new(
                format!("AKID{n}"),
                SECRET,
                Some(format!("token{n}")),
                expiry,
                "numbered",
            )))
        }
    }

    struct Harness {
        cache: Arc<CredentialsCache>,
        calls: Arc<AtomicUsize>,
        now: Arc<Mutex<SystemTime>>,
        fail: Arc<std::sync::atomic::AtomicBool>,
    }

    impl Harness {
        fn new(lifetime: Option<Duration>) -> Self {
            let calls = Arc::new(AtomicUsize::new(0));
            let now = Arc::new(Mutex::new(vector_time()));
            let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let provider = SharedCredentialsProvider::new(Numbered {
                calls: Arc::clone(&calls),
                now: Arc::clone(&now),
                lifetime,
                fail: Arc::clone(&fail),
            });
            Self {
                cache: Arc::new(CredentialsCache::new(provider)),
                calls,
                now,
                fail,
            }
        }

        fn advance(&self, by: Duration) {
            *self.now.lock().unwrap() += by;
        }

        /// The access key id the cache hands out now.
        async fn key(&self) -> String {
            let now = *self.now.lock().unwrap();
            let entry = self.cache.get(now).await.unwrap();
            entry
                .identity
                .data::<Credentials>()
                .unwrap()
                .access_key_id()
                .to_owned()
        }

        /// Waits for the background refresh in flight, if any.
        async fn settle(&self) {
            let load = self.cache.slot().clone();
            if let Some(load) = load {
                let _ = load.await;
            }
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    #[tokio::test]
    async fn expiring_credentials_are_refreshed_in_the_background_before_expiry() {
        let h = Harness::new(Some(Duration::from_hours(1)));
        assert_eq!(h.key().await, "AKID1");
        h.advance(Duration::from_mins(54));
        assert_eq!(h.key().await, "AKID1");
        h.settle().await;
        assert_eq!(h.calls(), 1, "cached until 5 minutes before expiry");
        h.advance(Duration::from_mins(2));
        // In the refresh window: this call still gets the current credentials...
        assert_eq!(h.key().await, "AKID1");
        h.settle().await;
        // ...and the next one the refreshed ones.
        assert_eq!(h.calls(), 2);
        assert_eq!(h.key().await, "AKID2");
        assert_eq!(h.calls(), 2);
    }

    #[tokio::test]
    async fn expired_credentials_are_never_used() {
        let h = Harness::new(Some(Duration::from_hours(1)));
        assert_eq!(h.key().await, "AKID1");
        // Idle until past expiry (less the margin): the next call waits for new ones.
        h.advance(Duration::from_hours(1) - Duration::from_secs(9));
        assert_eq!(h.key().await, "AKID2");
        assert_eq!(h.calls(), 2);
    }

    #[tokio::test]
    async fn static_credentials_are_reread_every_15_minutes() {
        let h = Harness::new(None);
        assert_eq!(h.key().await, "AKID1");
        h.advance(Duration::from_mins(14));
        assert_eq!(h.key().await, "AKID1");
        h.settle().await;
        assert_eq!(h.calls(), 1);
        h.advance(Duration::from_mins(2));
        assert_eq!(h.key().await, "AKID1");
        h.settle().await;
        assert_eq!(h.key().await, "AKID2");
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_the_credentials_and_backs_off() {
        let h = Harness::new(Some(Duration::from_hours(1)));
        assert_eq!(h.key().await, "AKID1");
        h.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        h.advance(Duration::from_mins(56));
        assert_eq!(h.key().await, "AKID1");
        h.settle().await;
        assert_eq!(h.calls(), 2);
        // Within the back-off no new attempt is made.
        h.advance(Duration::from_secs(5));
        assert_eq!(h.key().await, "AKID1");
        h.settle().await;
        assert_eq!(h.calls(), 2);
        // After it, one is.
        h.fail.store(false, std::sync::atomic::Ordering::SeqCst);
        h.advance(Duration::from_secs(6));
        assert_eq!(h.key().await, "AKID1");
        h.settle().await;
        assert_eq!(h.calls(), 3);
        assert_eq!(h.key().await, "AKID3");
    }

    #[tokio::test]
    async fn no_credentials_is_an_error_and_the_next_call_tries_again() {
        let h = Harness::new(Some(Duration::from_hours(1)));
        h.fail.store(true, std::sync::atomic::Ordering::SeqCst);
        let now = *h.now.lock().unwrap();
        let err = h.cache.get(now).await.err().unwrap();
        assert!(format!("{err:#}").contains("test failure"), "{err:#}");
        h.fail.store(false, std::sync::atomic::Ordering::SeqCst);
        assert_eq!(h.key().await, "AKID2");
    }

    /// A provider whose every call waits for `release`: shows that concurrent calls share one load.
    #[derive(Debug)]
    struct Gated {
        calls: Arc<AtomicUsize>,
        release: Arc<tokio::sync::Notify>,
    }

    impl ProvideCredentials for Gated {
        fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            self.calls.fetch_add(1, Ordering::SeqCst);
            future::ProvideCredentials::new(async move {
                self.release.notified().await;
                Ok(Credentials::new(AKID, SECRET, None, None, "gated"))
            })
        }
    }

    fn gated() -> (
        Arc<CredentialsCache>,
        Arc<AtomicUsize>,
        Arc<tokio::sync::Notify>,
    ) {
        let calls = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let cache = Arc::new(CredentialsCache::new(SharedCredentialsProvider::new(
            Gated {
                calls: Arc::clone(&calls),
                release: Arc::clone(&release),
            },
        )));
        (cache, calls, release)
    }

    #[tokio::test]
    async fn concurrent_calls_share_one_load() {
        let (cache, calls, release) = gated();
        let now = vector_time();
        let waiters: Vec<_> = (0..8)
            .map(|_| {
                let cache = Arc::clone(&cache);
                tokio::spawn(async move { cache.get(now).await.map(drop) })
            })
            .collect();
        // Let every waiter reach the shared load before the provider answers.
        while cache.slot().is_none() {
            tokio::task::yield_now().await;
        }
        for _ in 0..8 {
            tokio::task::yield_now().await;
        }
        release.notify_one();
        for waiter in waiters {
            waiter.await.unwrap().unwrap();
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(cache.slot().is_none(), "the finished load is cleared");
    }

    #[tokio::test]
    async fn a_load_finishes_even_when_its_callers_give_up() {
        let (cache, calls, release) = gated();
        let now = vector_time();
        let waiter = tokio::spawn({
            let cache = Arc::clone(&cache);
            async move { cache.get(now).await.map(drop) }
        });
        while cache.slot().is_none() {
            tokio::task::yield_now().await;
        }
        // The only caller hangs up (a client disconnect) before the provider answers.
        waiter.abort();
        assert!(waiter.await.unwrap_err().is_cancelled());
        release.notify_one();
        // The load's own task finishes it (the test runtime has one thread: yielding runs it).
        for _ in 0..100 {
            if cache.current.load().is_some() {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert!(cache.current.load().is_some(), "the load was not finished");
        assert!(cache.slot().is_none());
        cache.get(now).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn debug_shows_no_secret() {
        let provider = SharedCredentialsProvider::new(Credentials::new(
            AKID,
            SECRET,
            Some("session-secret".into()),
            None,
            "test",
        ));
        let signer = Signer::with_provider(provider, "us-east-1".into());
        let shown = format!("{signer:?}");
        assert!(shown.contains("us-east-1"), "{shown}");
        assert!(
            !shown.contains(SECRET) && !shown.contains("session-secret"),
            "{shown}"
        );
    }
}
