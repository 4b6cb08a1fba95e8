//! The forwarding handler: classify, authenticate, attribute, forward, relay.

pub mod endpoint;
pub mod facts;
pub mod headers;
pub mod relay;

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, header, request};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;

use crate::attribution;
use crate::budget::{OutputFrom, Reckoning};
use crate::call::{Call, Outcome};
use crate::error::ProxyError;
use crate::meter::Usage;
use crate::meter::stream::{BodyMeter, Kind};
use crate::server::ClientLink;
use crate::state::{AppState, Key, Project, ProjectIdx, Snapshot};
use crate::upstream::UpstreamClient;
use endpoint::Endpoint;
use facts::RequestFacts;
use relay::RelayBody;

/// Longest header value accepted (the OpenAI SDKs send a few hundred bytes at most).
const MAX_HEADER_VALUE: usize = 8 * 1024;

static X_MANTLEGATE_PROJECT: HeaderName = HeaderName::from_static("x-mantlegate-project");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static OPENAI_PROJECT: HeaderName = HeaderName::from_static("openai-project");

/// Handles every call that is not one of mantlegate's own endpoints.
pub async fn handle(State(state): State<Arc<AppState>>, mut req: Request) -> Response {
    let link = req.extensions_mut().remove::<ClientLink>();
    // The snapshot at arrival; a reload acknowledged before the call is forwarded is taken up
    // then (see `forward`), and the call keeps the one it was admitted under to the end.
    let snap = state.snapshot.load_full();
    let mut call = Call::new(
        Instant::now(),
        req.method().clone(),
        req.uri().clone(),
        state.clone(),
        snap.clone(),
    );
    match forward(&state, &snap, req, &mut call).await {
        Ok(upstream) => {
            let Upstream {
                mut parts,
                body,
                meter,
                sent,
            } = upstream;
            let head = Instant::now();
            call.status = parts.status.as_u16();
            if let Some(id) = parts.headers.get(&X_REQUEST_ID) {
                // A copy: the value is a slice of the upstream's read buffer, which the call
                // would otherwise keep whole for as long as it lasts.
                call.request_id = HeaderValue::from_bytes(id.as_bytes()).ok();
            } else {
                let id = call.request_id().clone();
                parts.headers.insert(X_REQUEST_ID.clone(), id);
            }
            if meter.rewrites() {
                // The relayed stream differs from the upstream's in length.
                parts.headers.remove(header::CONTENT_LENGTH);
            }
            if let Some(rate) = &call.rate {
                rate.headers.apply(&mut parts.headers);
            }
            let success = parts.status.is_success();
            let snap = call.snapshot().clone();
            call.overhead = Some(sent.duration_since(call.started()) + head.elapsed());
            let deadline =
                tokio::time::Instant::from_std(call.started()) + snap.upstream.total_timeout;
            let relay = RelayBody::new(
                body,
                meter,
                call,
                success,
                snap.upstream.idle_timeout,
                deadline,
                link,
            );
            Response::from_parts(parts, Body::new(relay))
        }
        Err(err) => {
            call.status = err.status().as_u16();
            call.error_code = Some(err.code());
            let outcome = if matches!(err, ProxyError::ClientGone) {
                Outcome::ClientDisconnect
            } else if err.is_rejection() {
                Outcome::Rejected
            } else {
                Outcome::UpstreamError
            };
            let id = call.request_id().clone();
            call.commit(outcome);
            let mut response = err.into_response();
            response.headers_mut().insert(X_REQUEST_ID.clone(), id);
            response
        }
    }
}

/// The upstream's answer, ready to relay.
struct Upstream {
    parts: axum::http::response::Parts,
    body: crate::upstream::UpstreamBody,
    meter: BodyMeter,
    sent: Instant,
}

/// Who a call is and where it goes, under one snapshot.
struct Caller<'s, 'p> {
    route: Option<&'s crate::state::Route>,
    /// The path after the route prefix and the API base.
    rest: &'p str,
    key: &'s Key,
    endpoint: Endpoint,
    project: ProjectIdx,
    /// The stored response the call deletes or builds on (`previous_response_id`), to be
    /// billed first if pending.
    uses: Option<String>,
}

/// Route, key, endpoint and project of a call under `snap`, and the ownership of the stored
/// response its path names; each is set on `call` as found. Run at arrival, and again on the
/// new snapshot when a reload came while the body arrived (`again`).
async fn identify<'s, 'p>(
    state: &AppState,
    snap: &'s Snapshot,
    parts: &request::Parts,
    path: &'p str,
    call: &mut Call,
    again: bool,
) -> Result<Caller<'s, 'p>, ProxyError> {
    let route = snap.route_for(path);
    call.route = route.map(|r| r.prefix.clone());
    let after_route = route.map_or(path, |r| &path[r.prefix.len()..]);
    let rest =
        endpoint::api_rest(after_route).ok_or_else(|| endpoint::unknown(&parts.method, path))?;
    // Authenticate before classifying, so a probe of an unforwarded path is logged with its key.
    let credential = attribution::credential(&parts.headers)?;
    let key = attribution::authenticate(snap, credential)?;
    call.key = Some(key.name.clone());
    call.key_fp = Some(key.fingerprint.clone());
    let endpoint = Endpoint::classify(&parts.method, rest, path)?;
    call.endpoint = Some(endpoint);

    // A stored response this call deletes or builds on: if it is a background response not
    // yet billed, it is fetched (and billed) first, or its usage would never be seen.
    let mut deletes = None;
    let requested = requested_project(&parts.headers)?;
    let mut project = attribution::resolve(snap, key, route, requested)?;
    if let Some(id) = endpoint.response_id(rest) {
        let id = endpoint::response_id(id)?;
        call.target_response = Some(id.to_owned());
        project = project_of_response(state, snap, key, route, id, project).await?;
        if !again && matches!(endpoint, Endpoint::GetResponse | Endpoint::CancelResponse) {
            note_fleet_pending(state, id).await;
        }
        if endpoint == Endpoint::DeleteResponse {
            deletes = Some(id.to_owned());
        }
    }
    call.project = Some(project);
    Ok(Caller {
        route,
        rest,
        key,
        endpoint,
        project,
        uses: deletes,
    })
}

/// Everything between arrival and the upstream's response head, one phase after another.
///
/// The call is identified under `arrival`, the snapshot current when its head came; once its
/// body is in, a reload acknowledged meanwhile is in force for it: it is authenticated,
/// attributed and admitted again under the new snapshot (a key disabled, expired or removed,
/// a grant removed, refuses it), which it then carries to its settlement.
async fn forward(
    state: &AppState,
    arrival: &Arc<Snapshot>,
    req: Request,
    call: &mut Call,
) -> Result<Upstream, ProxyError> {
    // Declared first: the caller found under a reloaded snapshot borrows from it to the end.
    let mut reloaded = None;
    let (parts, body) = req.into_parts();
    let canonical = screen(&parts, parts.uri.path(), call)?;
    let path = &*canonical;
    let who = identify(state, arrival, &parts, path, call, false).await?;
    if who.endpoint == Endpoint::GetResponse && asks_stream(parts.uri.query()) {
        call.stream = true;
    }
    let mut body = receive_body(arrival, body, &parts, who.endpoint, call).await?;
    let (snap, mut who) =
        take_up_reload(state, arrival, &mut reloaded, &parts, path, who, call).await?;
    let credentials = credentials(state, snap, who.key, &parts.headers)?;
    let asked = read_facts(state, snap, &mut who, &mut body, call).await?;
    let project = &snap.projects[who.project];
    admit(snap, who.key, project, who.endpoint, asked.max_output, call).await?;
    if let Some(id) = &who.uses {
        let authorization = credentials.authorization.as_ref();
        settle_before_use(state, snap, call, id, authorization, credentials.signer).await;
    }
    let uri = upstream_uri(&snap.upstream, call.model.as_deref(), who.rest, &parts)?;
    let outgoing = upstream_request(
        parts.method,
        uri,
        &parts.headers,
        credentials,
        project,
        body,
    );
    let sent = Instant::now();
    let response = send_with_retries(&snap.upstream, &state.upstream, &outgoing, call).await?;
    Ok(answer(
        state,
        response,
        who.endpoint,
        project,
        asked.inject_usage,
        sent,
        call,
    ))
}

/// The checks made before anything is looked up, on `sent`, the path as sent (that of
/// `parts`), and on its canonical form, which is returned: every decision after (route,
/// endpoint, response id) and the upstream's path use that form, so that nothing can read the
/// path differently from the upstream.
fn screen<'p>(
    parts: &request::Parts,
    sent: &'p str,
    call: &mut Call,
) -> Result<Cow<'p, str>, ProxyError> {
    // mantlegate's own API: a path there that is none of its endpoints is no API call either,
    // and leaves no ledger record (probes of the admin API are not anyone's spend).
    if endpoint::is_admin(sent) {
        call.unrecorded = true;
        return Err(endpoint::unknown(&parts.method, sent));
    }
    let canonical = endpoint::canonical_path(sent)?;
    if endpoint::is_admin(&canonical) {
        call.unrecorded = true;
        return Err(endpoint::unknown(&parts.method, sent));
    }
    if let Some((name, _)) = parts
        .headers
        .iter()
        .find(|(_, v)| v.len() > MAX_HEADER_VALUE)
    {
        return Err(ProxyError::HeaderTooLarge(name.as_str().to_owned()));
    }
    Ok(canonical)
}

/// The request body, read whole (within `max_body_bytes` and `request_body_timeout` of
/// `snap`) when the endpoint forwards one; empty, nothing read and nothing sent upstream, when
/// it does not.
async fn receive_body(
    snap: &Snapshot,
    body: Body,
    parts: &request::Parts,
    endpoint: Endpoint,
    call: &mut Call,
) -> Result<Bytes, ProxyError> {
    let body = if endpoint.forwards_body() {
        let within = (call.started(), snap.connections.request_body_timeout);
        read_body(body, snap.max_body_bytes, parts, within).await?
    } else {
        Bytes::new()
    };
    call.request_bytes = body.len();
    Ok(body)
}

/// The snapshot the call runs under from here on, and who the call is under it: `arrival`
/// and `who` as they are when no reload came while the body arrived (one load and a pointer
/// comparison), else the new snapshot, kept in `reloaded`, and the call identified again
/// under it ([`Call::rebase`], [`identify`]).
///
/// # Errors
/// Those of [`identify`], and 404 when the reload moved a route so that the path means
/// another endpoint now.
async fn take_up_reload<'s, 'p>(
    state: &AppState,
    arrival: &'s Arc<Snapshot>,
    reloaded: &'s mut Option<Arc<Snapshot>>,
    parts: &request::Parts,
    path: &'p str,
    who: Caller<'s, 'p>,
    call: &mut Call,
) -> Result<(&'s Snapshot, Caller<'s, 'p>), ProxyError> {
    // The fast path: one load and a pointer comparison.
    let current = state.snapshot.load();
    if Arc::ptr_eq(&*current, arrival) {
        return Ok((&**arrival, who));
    }
    let current = arc_swap::Guard::into_inner(current);
    call.rebase(current.clone());
    let snap: &'s Snapshot = reloaded.insert(current);
    let again = identify(state, snap, parts, path, call, true).await?;
    if again.endpoint != who.endpoint {
        // The reload moved a route so that the path means another endpoint now.
        return Err(endpoint::unknown(&parts.method, path));
    }
    Ok((snap, again))
}

/// How a call is authorized upstream.
struct Credentials<'a> {
    /// The `Authorization` header sent (None: SigV4 signs each attempt instead).
    authorization: Option<HeaderValue>,
    signer: Option<&'a crate::sigv4::Signer>,
}

/// How a call made with `key` is authorized upstream. A pass-through key is the caller's own
/// Bedrock API key: it goes upstream as sent, never signed. Otherwise SigV4 (when configured)
/// or mantlegate's own API key.
///
/// # Errors
/// 401 `invalid_api_key` for a pass-through key that is not valid header text, and
/// `upstream_key_missing` when no upstream key is configured.
fn credentials<'a>(
    state: &'a AppState,
    snap: &Snapshot,
    key: &Key,
    headers: &HeaderMap,
) -> Result<Credentials<'a>, ProxyError> {
    let signer = if key.passthrough {
        None
    } else {
        state.signer.as_ref()
    };
    let authorization = if key.passthrough {
        let credential = attribution::credential(headers)?;
        let mut v = HeaderValue::from_str(&format!("Bearer {credential}")).map_err(|_| {
            ProxyError::InvalidApiKey("the API key is not valid header text".into())
        })?;
        v.set_sensitive(true);
        Some(v)
    } else if signer.is_some() {
        None
    } else {
        Some(
            snap.upstream
                .authorization
                .as_ref()
                .ok_or(ProxyError::UpstreamKeyMissing)?
                .expose()
                .clone(),
        )
    };
    Ok(Credentials {
        authorization,
        signer,
    })
}

/// What a call's body asks for beyond what is set on the call.
struct Asked {
    /// `include_usage` was spliced in: the usage chunk is cut from the relayed stream.
    inject_usage: bool,
    /// The output cap the upstream honours ([`RequestFacts::output_cap`]).
    max_output: Option<u64>,
}

/// Reads a JSON body's facts ([`RequestFacts::parse`]) onto the call: model, stream,
/// background and output cap. A `previous_response_id` is under the same ownership rule as
/// a path's response id, and becomes the stored response the call uses; a streamed chat call
/// that did not ask for usage gets `include_usage` spliced into `body`. Bodies of other
/// endpoints are not read.
async fn read_facts(
    state: &AppState,
    snap: &Snapshot,
    who: &mut Caller<'_, '_>,
    body: &mut Bytes,
    call: &mut Call,
) -> Result<Asked, ProxyError> {
    let mut asked = Asked {
        inject_usage: false,
        max_output: None,
    };
    let mut model = None;
    if who.endpoint.has_json_body() {
        let facts = RequestFacts::parse(body).map_err(ProxyError::InvalidJson)?;
        if let Some(previous) = &facts.previous_response_id {
            // Building on a stored response is using it: the same ownership rule as a GET.
            let id = endpoint::response_id(previous)?;
            who.project =
                project_of_response(state, snap, who.key, who.route, id, who.project).await?;
            call.project = Some(who.project);
            who.uses = Some(id.to_owned());
        }
        call.stream = facts.stream;
        call.background = facts.background;
        asked.max_output = facts.output_cap(who.endpoint);
        asked.inject_usage =
            who.endpoint == Endpoint::ChatCompletions && facts.stream && !facts.include_usage;
        if asked.inject_usage {
            let rewritten =
                facts::with_include_usage(body, &facts).map_err(ProxyError::InvalidJson)?;
            model = facts.model.map(std::borrow::Cow::into_owned);
            *body = rewritten;
        } else {
            model = facts.model.map(std::borrow::Cow::into_owned);
        }
    }
    call.model = model;
    Ok(asked)
}

/// The upstream URI of a call: the upstream's base path, the prefix of `model`
/// ([`Upstream::prefix_for`](crate::state::Upstream::prefix_for)) and `rest`, with the
/// client's query.
fn upstream_uri(
    up: &crate::state::Upstream,
    model: Option<&str>,
    rest: &str,
    parts: &request::Parts,
) -> Result<Uri, ProxyError> {
    let prefix = up.prefix_for(model);
    let base_path = &up.origin.base_path;
    let mut path = String::with_capacity(base_path.len() + prefix.len() + rest.len());
    path.push_str(base_path);
    path.push_str(prefix);
    path.push_str(rest);
    // The client's path and query passed hyper's parser already; a prefix from config is
    // checked at load. This cannot fail on what reaches here, but is not unwrapped.
    up.origin
        .uri(&path, parts.uri.query())
        .map_err(|_| endpoint::unknown(&parts.method, parts.uri.path()))
}

/// What goes upstream: the client's method, the client headers [`headers::copy_upstream`]
/// lets through, mantlegate's `Authorization` (or the signer that signs each attempt) and the
/// project's `OpenAI-Project`, and the body as it is (moved, not copied).
fn upstream_request<'a>(
    method: Method,
    uri: Uri,
    client_headers: &HeaderMap,
    credentials: Credentials<'a>,
    project: &Project,
    body: Bytes,
) -> Outgoing<'a> {
    let mut upstream_headers = HeaderMap::with_capacity(client_headers.len() + 2);
    headers::copy_upstream(client_headers, &mut upstream_headers);
    if let Some(authorization) = credentials.authorization {
        upstream_headers.insert(header::AUTHORIZATION, authorization);
    }
    upstream_headers.insert(OPENAI_PROJECT.clone(), project.id_header.clone());
    let mut request = axum::http::Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = upstream_headers;
    Outgoing {
        request,
        signer: credentials.signer,
    }
}

/// The upstream's answer made ready to relay: its status noted on the call, the headers that
/// must not cross back stripped, `x-mantlegate-project` set, and how its body is metered
/// chosen ([`meter_kind`]).
fn answer(
    state: &AppState,
    response: axum::http::Response<crate::upstream::UpstreamBody>,
    endpoint: Endpoint,
    project: &Project,
    inject_usage: bool,
    sent: Instant,
    call: &mut Call,
) -> Upstream {
    call.upstream_status = Some(response.status().as_u16());
    let (mut parts, body) = response.into_parts();
    headers::strip_response(&mut parts.headers);
    parts
        .headers
        .insert(X_MANTLEGATE_PROJECT.clone(), project.id_header.clone());
    let kind = meter_kind(
        state,
        endpoint,
        &parts,
        inject_usage,
        call.stream,
        call.target_response.as_deref(),
    );
    Upstream {
        parts,
        body,
        meter: BodyMeter::new(kind, call.request_bytes),
        sent,
    }
}

/// Admission control: the calls in flight (counted only now that the body is in, so that
/// bodies still arriving never keep other calls out), the rate limits of the project and the
/// key, then the budgets the project falls under, each taking the call's estimate, corrected
/// when the call ends: input from the body size, output from the cap the upstream honours for
/// the API ([`RequestFacts::output_cap`]), else the model's ceiling (its price row's
/// `max_output_tokens`), else `default_max_output_tokens`. A cap is taken as sent, never
/// lowered to the ceiling: a cap above it is the upstream's to refuse. With a shared
/// rate-limit store (`[limits] store`) the limits cost one Redis round trip, awaited.
async fn admit(
    snap: &Snapshot,
    key: &Key,
    project: &Project,
    endpoint: Endpoint,
    max_output: Option<u64>,
    call: &mut Call,
) -> Result<(), ProxyError> {
    if !call.enter_in_flight(snap.max_in_flight) {
        // Refused at once: an unbounded queue would only turn overload into timeouts.
        return Err(ProxyError::Overloaded(snap.max_in_flight));
    }
    let generates = matches!(
        endpoint,
        Endpoint::ChatCompletions | Endpoint::CreateResponse
    );
    let rate_limited = !project.rate_rules.is_empty() || !key.rate_rules.is_empty();
    let budgeted = generates && !project.budgets.is_empty();
    if !rate_limited && !budgeted {
        return Ok(());
    }
    let price = call.model.as_deref().and_then(|m| snap.prices.lookup(m));
    let (output, output_from) = match (generates, max_output) {
        (false, _) => (0, OutputFrom::Default),
        (true, Some(cap)) => {
            let member = if endpoint == Endpoint::CreateResponse {
                "max_output_tokens"
            } else {
                "max_completion_tokens or max_tokens"
            };
            (cap, OutputFrom::Cap(member))
        }
        (true, None) => match price.and_then(|p| p.max_output_tokens) {
            Some(ceiling) => (ceiling, OutputFrom::Ceiling),
            None => (snap.default_max_output_tokens, OutputFrom::Default),
        },
    };
    let estimate = Usage {
        input: (call.request_bytes / 4) as u64,
        cached_input: 0,
        output,
        reasoning: 0,
    };
    if rate_limited {
        let mut rules = project.rate_rules.clone();
        rules.extend_from_slice(&key.rate_rules);
        let tokens = if generates {
            // A cap can be any u64: saturate rather than wrap.
            estimate.input.saturating_add(estimate.output)
        } else {
            0
        };
        // In memory: the lock-free call, no await point. Shared: one awaited round trip.
        let rates = &snap.limiter;
        let outcome = if rates.is_shared() {
            rates.acquire_async(&rules, tokens, Instant::now()).await
        } else {
            rates.acquire(&rules, tokens, Instant::now())
        };
        match outcome {
            Ok(admission) => call.rate = Some(admission),
            Err(limited) => return Err(ProxyError::RateLimited(Box::new(limited))),
        }
    }
    if budgeted {
        // An unpriced model reserves nothing (its cost is unknown, and recorded as unpriced);
        // a priced call whose worst case does not fit in picodollars (an absurd cap) reserves
        // the most there is, which no block budget admits.
        let reserve = price.map_or(0, |price| {
            crate::pricing::to_pico(crate::pricing::cost(price, &estimate)).unwrap_or(i64::MAX)
        });
        let now_ms = jiff::Timestamp::now().as_millisecond();
        match snap.budgets.admit(&project.budgets, reserve, now_ms) {
            Ok(reservation) => call.reservation = Some(reservation),
            Err(exceeded) => {
                return Err(ProxyError::BudgetExceeded {
                    exceeded: Box::new(exceeded),
                    reckoning: Box::new(Reckoning {
                        output_tokens: estimate.output,
                        output_from,
                        input_tokens: estimate.input,
                        body_bytes: call.request_bytes,
                        prices: price.map(|p| (p.input_per_million, p.output_per_million)),
                    }),
                });
            }
        }
    }
    Ok(())
}

/// Sends the request, retrying (before anything reached the client) on connection failures
/// and on 429/503 answers, at most `retries` more times, with exponential backoff and
/// jitter, honouring the upstream's `retry-after` when it is no longer than
/// `retry_max_delay` (a longer one is relayed to the client instead).
async fn send_with_retries(
    up: &crate::state::Upstream,
    client: &UpstreamClient,
    outgoing: &Outgoing<'_>,
    call: &mut Call,
) -> Result<axum::http::Response<crate::upstream::UpstreamBody>, ProxyError> {
    let deadline = tokio::time::Instant::from_std(call.started()) + up.total_timeout;
    let mut attempt = 0u32;
    loop {
        // A fresh signature for every attempt: SigV4 refuses stale ones.
        let signed = outgoing.signed().await?;
        let current = signed.as_ref().unwrap_or(&outgoing.request);
        let timeout = up.response_timeout;
        let outcome = tokio::time::timeout(timeout, client.request(current)).await;
        let retry_after = match &outcome {
            Err(_) => return Err(ProxyError::UpstreamTimeout(timeout)),
            Ok(Err(err)) if err.is_connect() => Some(None),
            Ok(Err(err)) => return Err(upstream_error(err)),
            Ok(Ok(r)) if matches!(r.status().as_u16(), 429 | 503) => Some(retry_after(r.headers())),
            Ok(Ok(_)) => None,
        };
        let delay = retry_after.and_then(|asked| {
            let backoff = up.retry_backoff.saturating_mul(1 << attempt.min(16));
            // Full jitter between half and all of the backoff spreads out synchronized clients.
            let jitter = backoff.mul_f64(0.5 + rand::random::<f64>() / 2.0);
            match asked {
                Some(a) if a > up.retry_max_delay => None,
                Some(a) => Some(a.max(jitter)),
                None => Some(jitter.min(up.retry_max_delay)),
            }
        });
        match delay {
            Some(delay)
                if attempt < up.retries && tokio::time::Instant::now() + delay < deadline =>
            {
                call.retries += 1;
                tracing::debug!(
                    attempt,
                    delay_ms = delay.as_millis(),
                    "retrying upstream call"
                );
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            _ => {
                return match outcome {
                    Ok(Ok(r)) => Ok(r),
                    Ok(Err(err)) => Err(upstream_error(&err)),
                    Err(_) => Err(ProxyError::UpstreamTimeout(timeout)),
                };
            }
        }
    }
}

/// What is sent upstream: the request as it goes without SigV4 (every attempt sends it as it
/// is, no copy), and the signer when there is one. The client sets `host` and
/// `content-length` (from the body's exact size).
struct Outgoing<'a> {
    /// An empty body when the endpoint forwards none.
    request: axum::http::Request<Bytes>,
    signer: Option<&'a crate::sigv4::Signer>,
}

impl Outgoing<'_> {
    /// One attempt's signed copy of the request, or `None` when it goes unsigned.
    async fn signed(&self) -> Result<Option<axum::http::Request<Bytes>>, ProxyError> {
        let Some(signer) = self.signer else {
            return Ok(None);
        };
        let base = &self.request;
        let mut headers = base.headers().clone();
        signer
            .sign(
                base.method(),
                &base.uri().to_string(),
                &mut headers,
                base.body(),
            )
            .await
            .map_err(|err| ProxyError::UpstreamCredentials(format!("{err:#}")))?;
        // Bytes: a reference count, not a copy.
        let mut request = axum::http::Request::new(base.body().clone());
        *request.method_mut() = base.method().clone();
        *request.uri_mut() = base.uri().clone();
        *request.headers_mut() = headers;
        Ok(Some(request))
    }
}

/// `retry-after` in seconds (an HTTP date is not honoured: backoff applies instead).
fn retry_after(headers: &HeaderMap) -> Option<std::time::Duration> {
    let ms = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|ms| std::time::Duration::from_secs_f64((ms / 1000.0).clamp(0.0, 86_400.0)));
    ms.or_else(|| {
        headers
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(std::time::Duration::from_secs)
    })
}

/// Largest answer read when fetching a pending background response before it is used.
const MAX_SETTLE_BODY: usize = 16 * 1024 * 1024;

/// Fetches pending background response `id` before the call deletes it or builds on it
/// (`previous_response_id`), so that its usage is billed (once, as any answer that shows it
/// finished bills it) on a record of its own. Nothing happens for a response not pending;
/// a failure is recorded on that record and the call goes on.
async fn settle_before_use(
    state: &AppState,
    snap: &Snapshot,
    call: &Call,
    id: &str,
    authorization: Option<&HeaderValue>,
    signer: Option<&crate::sigv4::Signer>,
) {
    note_fleet_pending(state, id).await;
    if !state.responses.is_pending(id) {
        return;
    }
    let (Some(project), up) = (call.project.map(|p| &snap.projects[p]), &snap.upstream) else {
        return;
    };
    let path = format!(
        "{}{}/responses/{id}",
        up.origin.base_path, up.default_prefix
    );
    let Ok(uri) = up.origin.uri(&path, None) else {
        return;
    };
    let mut side = call.sibling(axum::http::Method::GET, uri.clone());
    side.endpoint = Some(Endpoint::GetResponse);
    side.target_response = Some(id.to_owned());
    let mut headers = HeaderMap::with_capacity(2);
    if let Some(authorization) = authorization {
        headers.insert(header::AUTHORIZATION, authorization.clone());
    }
    headers.insert(OPENAI_PROJECT.clone(), project.id_header.clone());
    let mut request = axum::http::Request::new(Bytes::new());
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    let outgoing = Outgoing { request, signer };
    let answer = match send_with_retries(up, &state.upstream, &outgoing, &mut side).await {
        Ok(response) => response,
        Err(err) => {
            side.status = err.status().as_u16();
            side.error_code = Some(err.code());
            side.commit(Outcome::UpstreamError);
            return;
        }
    };
    side.upstream_status = Some(answer.status().as_u16());
    side.status = answer.status().as_u16();
    let success = answer.status().is_success();
    let deadline = tokio::time::Instant::from_std(side.started()) + up.total_timeout;
    let body = http_body_util::Limited::new(answer.into_body(), MAX_SETTLE_BODY).collect();
    match tokio::time::timeout_at(deadline, body).await {
        Ok(Ok(collected)) => {
            let mut meter = BodyMeter::new(Kind::ResponseJson, 0);
            meter.observe(&collected.to_bytes());
            side.metered = Some(meter.result(success, true));
            side.commit(Outcome::Forwarded);
        }
        _ => side.commit(Outcome::UpstreamError),
    }
}

/// The project a call naming stored response `id` goes to: the one that created it, when this
/// key may use it (`current` when the ledger answered that the response is unknown).
///
/// # Errors
/// 404 `response_not_found` when another project, which this key may not use, created it:
/// to this key it does not exist. 503 `ledger_unavailable` when the ledger could not say who
/// created it within [`OWNER_LOOKUP_TIMEOUT`]: forwarding then might hand one project's
/// response to another's key.
async fn project_of_response(
    state: &AppState,
    snap: &Snapshot,
    key: &Key,
    route: Option<&crate::state::Route>,
    id: &str,
    current: ProjectIdx,
) -> Result<ProjectIdx, ProxyError> {
    let owner = match tokio::time::timeout(OWNER_LOOKUP_TIMEOUT, owner_of_response(state, snap, id))
        .await
    {
        Ok(Ok(owner)) => owner,
        Ok(Err(err)) => {
            tracing::warn!(error = %format!("{err:#}"), "ledger lookup of a response's owner failed");
            return Err(ProxyError::LedgerUnavailable(format!("{err:#}")));
        }
        Err(_) => {
            tracing::warn!(
                timeout = ?OWNER_LOOKUP_TIMEOUT,
                "ledger lookup of a response's owner timed out"
            );
            return Err(ProxyError::LedgerUnavailable(
                "owner lookup timed out".into(),
            ));
        }
    };
    match owner {
        Some(owner) if attribution::may_use(snap, key, route, owner) => Ok(owner),
        Some(_) => Err(ProxyError::ResponseNotFound(id.to_owned())),
        None => Ok(current),
    }
}

/// The longest a call waits for the ledger to say who owns a stored response (retries of a
/// fleet's not-yet-committed record included) before it is refused with 503.
const OWNER_LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether a query asks for a stream (`stream=true`, as the SDKs send it for a GET that
/// resumes or replays a response's events).
fn asks_stream(query: Option<&str>) -> bool {
    query.is_some_and(|q| q.split('&').any(|pair| pair == "stream=true"))
}

/// What to meter in an answer.
fn meter_kind(
    state: &AppState,
    endpoint: Endpoint,
    parts: &axum::http::response::Parts,
    inject_usage: bool,
    asked_stream: bool,
    target_response: Option<&str>,
) -> Kind {
    if !parts.status.is_success() {
        return Kind::None;
    }
    // A stream is what the client asked for, whatever content-type the upstream labels it with.
    let sse = asked_stream
        || parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
    match endpoint {
        Endpoint::ChatCompletions if sse => Kind::ChatStream {
            strip_usage: inject_usage,
        },
        Endpoint::ChatCompletions => Kind::ChatJson,
        Endpoint::CreateResponse if sse => Kind::ResponsesStream,
        Endpoint::CreateResponse => Kind::ResponseJson,
        // Only an answer about a pending background response can carry usage to meter: the
        // response itself (a GET, a GET replaying or resuming its events) or a cancel's answer.
        Endpoint::GetResponse | Endpoint::CancelResponse
            if target_response.is_some_and(|id| state.responses.is_pending(id)) =>
        {
            if sse {
                Kind::ResponsesStream
            } else {
                Kind::ResponseJson
            }
        }
        _ => Kind::None,
    }
}

/// The project that created a stored response: this process's index first, then the ledger.
/// `Ok(None)`: the ledger answered, and knows no such response (or its project is no longer
/// configured). `Err`: the ledger could not answer.
///
/// In a fleet the response may have been created through another replica a moment ago, its
/// record not committed yet: a miss is asked again, with backoff, until the ledger's
/// one-second commit promise has passed (only ids no replica created pay that wait).
async fn owner_of_response(
    state: &AppState,
    snap: &Snapshot,
    id: &str,
) -> anyhow::Result<Option<ProjectIdx>> {
    if let Some(project_id) = state.responses.owner(id) {
        return Ok(snap.project_by_handle(&project_id));
    }
    let Some(reader) = state.reader.as_ref() else {
        return Ok(None);
    };
    let lookup = || {
        let reader = reader.clone();
        let id = id.to_owned();
        async move {
            match tokio::task::spawn_blocking(move || reader.project_of_response(&id)).await {
                Ok(answer) => answer,
                Err(err) => Err(anyhow::anyhow!("ledger lookup task failed: {err}")),
            }
        }
    };
    let mut project_id = lookup().await?;
    if state.fleet.is_some() {
        for wait_ms in [50, 100, 200, 400, 500] {
            if project_id.is_some() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(wait_ms)).await;
            project_id = lookup().await?;
        }
    }
    Ok(project_id.and_then(|p| snap.project_by_handle(&p)))
}

/// In a fleet, a background response created through another replica is pending in the
/// shared ledger, not in this process: note it here, so that this GET meters it if it sees it
/// finished (the ledger write then takes it, once for the fleet).
async fn note_fleet_pending(state: &AppState, id: &str) {
    let Some(pg) = &state.fleet else {
        return;
    };
    if state.responses.is_pending(id) {
        return;
    }
    let pg = pg.clone();
    let owned = id.to_owned();
    let found = tokio::task::spawn_blocking(move || pg.pending_response(&owned))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    if let Some((project_id, model)) = found {
        state.responses.add_pending(
            id.to_owned(),
            crate::state::PendingBackground {
                project_id: project_id.into(),
                model,
            },
        );
    }
}

/// The `OpenAI-Project` header the client sent, if any.
fn requested_project(headers: &HeaderMap) -> Result<Option<&str>, ProxyError> {
    match headers.get(&OPENAI_PROJECT) {
        None => Ok(None),
        // An empty header is what an SDK sends for `project=""`: no project named.
        Some(v) if v.as_bytes().iter().all(u8::is_ascii_whitespace) => Ok(None),
        Some(v) => v.to_str().map(|s| Some(s.trim())).map_err(|_| {
            ProxyError::ProjectForbidden(
                "the OpenAI-Project header is not valid text; send a project id such as proj_123"
                    .to_owned(),
            )
        }),
    }
}

/// Reads the whole request body, refusing more than `limit` bytes and a body not whole by
/// `within.1` after `within.0`, the head's arrival (`server.request_body_timeout`).
async fn read_body(
    body: Body,
    limit: usize,
    parts: &request::Parts,
    within: (Instant, std::time::Duration),
) -> Result<Bytes, ProxyError> {
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ProxyError::RequestTooLarge(limit));
    }
    let collect = http_body_util::Limited::new(body, limit).collect();
    let deadline = tokio::time::Instant::from_std(within.0) + within.1;
    let Ok(collected) = tokio::time::timeout_at(deadline, collect).await else {
        return Err(ProxyError::RequestTimeout(within.1));
    };
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            Err(ProxyError::RequestTooLarge(limit))
        }
        // The client stopped sending mid-body (hung up): not a bad request, a departure.
        Err(_) => Err(ProxyError::ClientGone),
    }
}

/// Maps a client error to 502. Its message says what failed (refused, timed out, TLS, a
/// malformed answer) and never holds the request's headers or body.
fn upstream_error(err: &crate::upstream::Error) -> ProxyError {
    ProxyError::UpstreamUnavailable(err.to_string())
}
