//! One error type for the request path, rendered as OpenAI's `{"error":{...}}` body.

use std::fmt;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Serialize;

use crate::budget::{Exceeded, OutputFrom, Reckoning};
use crate::ratelimit::Limited;

fn rate_message(l: &Limited) -> String {
    l.to_string()
}

fn budget_message(e: &Exceeded, r: &Reckoning) -> String {
    if e.spend_usd >= e.limit_usd {
        return format!(
            "budget `{}` is spent for this month: ${} of ${}. Ask your platform team to raise it, or wait for the next month",
            e.name, e.spend_usd, e.limit_usd
        );
    }
    let output_from = match r.output_from {
        OutputFrom::Cap(member) => format!("the call's {member}"),
        OutputFrom::Ceiling => {
            "the call sets no output cap: the model's max_output_tokens in its price row".to_owned()
        }
        OutputFrom::Default => {
            "the call sets no output cap: [limits] default_max_output_tokens".to_owned()
        }
    };
    let derivation = match r.prices {
        Some((input, output)) => format!(
            "{} output tokens ({output_from}) × ${} per million output tokens + about {} input tokens (the {}-byte body at ~4 bytes a token) × ${} per million input tokens",
            r.output_tokens,
            output.normalize(),
            r.input_tokens,
            r.body_bytes,
            input.normalize()
        ),
        None => format!("{} output tokens ({output_from})", r.output_tokens),
    };
    format!(
        "budget `{}` cannot hold this call's reservation: the most the call may cost, reserved until it ends, is ${} = {derivation}, and only ${} of the ${} budget is left this month (${} spent, ${} held by calls in flight). Send a lower output cap (chat: max_completion_tokens or max_tokens; Responses: max_output_tokens) so the reservation fits, ask your platform team to raise the budget, or wait for the next month",
        e.name, e.reserve_usd, e.left_usd, e.limit_usd, e.spend_usd, e.held_usd
    )
}

/// Why a request's length is ambiguous (found by [`crate::framing`], which refuses it with
/// [`ProxyError::AmbiguousLength`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ambiguity {
    /// Both `Content-Length` and `Transfer-Encoding: chunked`.
    LengthAndChunked,
    /// `Content-Length` more than once (hyper refuses differing values itself).
    TwoLengths,
}

impl fmt::Display for Ambiguity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::LengthAndChunked => {
                "the request carries both Content-Length and Transfer-Encoding: chunked"
            }
            Self::TwoLengths => "the request carries Content-Length more than once",
        })
    }
}

/// Everything mantlegate itself refuses or fails with. Upstream errors are relayed, not wrapped.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// No credential, or no key with that SHA-256.
    #[error("{0}")]
    InvalidApiKey(std::borrow::Cow<'static, str>),
    /// The call asked for, or came through a route to, a project its key may not use.
    #[error("{0}")]
    ProjectForbidden(String),
    /// The call resolves to no project and the policy is to reject it.
    #[error("{0}")]
    ProjectRequired(String),
    /// A stored response that does not exist for this key (it belongs to another project).
    #[error("no response with id `{0}` exists for this key")]
    ResponseNotFound(String),
    /// The path is not one of the forwarded endpoints.
    #[error(
        "{method} {path} is not an endpoint mantlegate forwards: use /v1/chat/completions, /v1/responses (and its sub-resources) or /v1/models"
    )]
    UnknownEndpoint {
        /// HTTP method of the call.
        method: String,
        /// Path of the call, as received.
        path: String,
    },
    /// The path has dot segments, empty segments or escapes that could hide where it leads.
    #[error(
        "the path `{0}` is not in normal form: send it without `//`, `.`/`..` segments, backslashes or control characters, with each character percent-escaped at most once (no `%25`), no escaped `/`, and escapes that are valid UTF-8"
    )]
    InvalidPath(String),
    /// A response id (in the path or `previous_response_id`) outside the id alphabet.
    #[error(
        "`{0}` is not a response id: ids are 1 to 256 letters, digits, `_` and `-` (such as resp_123), as the create call returned them"
    )]
    InvalidResponseId(String),
    /// A rate limit of the call's project or key is reached.
    #[error("{}", rate_message(.0))]
    RateLimited(Box<Limited>),
    /// A block budget the call falls under is spent, or cannot hold the call's reservation.
    #[error("{}", budget_message(exceeded, reckoning))]
    BudgetExceeded {
        /// The budget that refused.
        exceeded: Box<Exceeded>,
        /// How the call's reservation was reckoned.
        reckoning: Box<Reckoning>,
    },
    /// The body is not valid JSON.
    #[error("the request body is not valid JSON: {0}")]
    InvalidJson(String),
    /// The body is larger than `server.max_body_bytes`.
    #[error(
        "the request body is larger than the {0} bytes this proxy accepts (server.max_body_bytes)"
    )]
    RequestTooLarge(usize),
    /// The client went away while sending its request.
    #[error("the request body ended before its declared length: the client closed the connection")]
    ClientGone,
    /// A request header value is longer than mantlegate accepts.
    #[error("the `{0}` header is longer than the 8 KiB mantlegate accepts")]
    HeaderTooLarge(String),
    /// The request's length is ambiguous: `Content-Length` with `Transfer-Encoding: chunked`,
    /// or twice (a request smuggling pattern). Refused below the app, see [`crate::framing`].
    #[error(
        "{0}, so its length is ambiguous (a request smuggling pattern): send one Content-Length, or Transfer-Encoding: chunked alone"
    )]
    AmbiguousLength(Ambiguity),
    /// hyper's parser refused the request head (request line, a header, or framing such as
    /// differing `Content-Length`s). Refused below the app, see [`crate::framing`].
    #[error(
        "the request is not valid HTTP/1.1: its request line, a header or its framing (Content-Length, Transfer-Encoding) could not be parsed. Nothing was forwarded, and the connection is closed"
    )]
    MalformedRequest,
    /// The request head is over hyper's limits (100 header lines, about 400 KiB).
    #[error(
        "the request's headers are larger than mantlegate accepts (at most 100 header lines and 400 KiB in all). Nothing was forwarded, and the connection is closed"
    )]
    HeadTooLarge,
    /// The request target is over hyper's limit.
    #[error(
        "the request's URI is longer than the 64 KiB mantlegate accepts. Nothing was forwarded, and the connection is closed"
    )]
    UriTooLong,
    /// The body could not be read from the client.
    #[error("the request body could not be read: {0}")]
    BadBody(String),
    /// The upstream could not be reached.
    #[error("bedrock-mantle could not be reached: {0}")]
    UpstreamUnavailable(String),
    /// The upstream sent no response head in time.
    #[error("bedrock-mantle sent no response within {}s (upstream.response_timeout)", .0.as_secs_f64())]
    UpstreamTimeout(Duration),
    /// No upstream credential is configured.
    #[error(
        "mantlegate has no upstream API key: set the environment variable named by upstream.api_key_env"
    )]
    UpstreamKeyMissing,
    /// SigV4 mode: no AWS credentials could be had (the detail goes to the log only: it can
    /// name profiles, role ARNs and files).
    #[error("mantlegate has no AWS credentials for bedrock-mantle right now; retry shortly")]
    UpstreamCredentials(String),
    /// The request body did not arrive whole within `server.request_body_timeout`.
    #[error("the request body did not arrive whole within {}s (server.request_body_timeout); send it at once, or retry on a faster link", .0.as_secs_f64())]
    RequestTimeout(Duration),
    /// Too many calls in flight (`server.max_in_flight`).
    #[error("mantlegate is at its limit of {0} calls in flight; retry shortly")]
    Overloaded(usize),
    /// The shared ledger could not say, in time, which project owns a stored response the call
    /// names: the call is refused rather than forwarded under a project that may not own it.
    /// (The detail goes to the log only.)
    #[error(
        "mantlegate could not check who owns this stored response: its ledger did not answer in time. Nothing was forwarded; retry shortly"
    )]
    LedgerUnavailable(String),
    /// A bug: the request could not be handled.
    #[error("mantlegate failed to handle this request; it has been logged")]
    Internal,
}

impl ProxyError {
    /// HTTP status of the error response.
    #[must_use]
    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidApiKey(_) => StatusCode::UNAUTHORIZED,
            Self::ProjectForbidden(_) => StatusCode::FORBIDDEN,
            Self::ProjectRequired(_)
            | Self::InvalidPath(_)
            | Self::InvalidResponseId(_)
            | Self::InvalidJson(_)
            | Self::BadBody(_)
            | Self::AmbiguousLength(_)
            | Self::MalformedRequest
            | Self::ClientGone => StatusCode::BAD_REQUEST,
            Self::HeaderTooLarge(_) | Self::HeadTooLarge => {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            }
            Self::UriTooLong => StatusCode::URI_TOO_LONG,
            Self::UnknownEndpoint { .. } | Self::ResponseNotFound(_) => StatusCode::NOT_FOUND,
            Self::RequestTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::RateLimited(_) | Self::BudgetExceeded { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::UpstreamUnavailable(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::UpstreamKeyMissing
            | Self::Overloaded(_)
            | Self::UpstreamCredentials(_)
            | Self::LedgerUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI `code`: stable, low-cardinality, also the metric label.
    #[must_use]
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidApiKey(_) => "invalid_api_key",
            Self::ProjectForbidden(_) => "project_forbidden",
            Self::ProjectRequired(_) => "project_required",
            Self::UnknownEndpoint { .. } => "unknown_endpoint",
            Self::ResponseNotFound(_) => "response_not_found",
            Self::InvalidPath(_) | Self::InvalidResponseId(_) => "invalid_path",
            Self::InvalidJson(_) => "invalid_json",
            Self::RateLimited(_) => "rate_limit_exceeded",
            Self::BudgetExceeded { .. } => "budget_exceeded",
            Self::RequestTooLarge(_) => "request_too_large",
            Self::RequestTimeout(_) => "request_timeout",
            // The answer may still reach a half-closed client; the ledger records the call as
            // a client disconnect.
            Self::BadBody(_) | Self::ClientGone => "invalid_body",
            Self::HeaderTooLarge(_) | Self::HeadTooLarge => "header_too_large",
            Self::AmbiguousLength(_) => "ambiguous_length",
            Self::MalformedRequest => "malformed_request",
            Self::UriTooLong => "uri_too_long",
            Self::UpstreamUnavailable(_) => "upstream_unavailable",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::UpstreamKeyMissing => "upstream_key_missing",
            Self::UpstreamCredentials(_) => "upstream_credentials_unavailable",
            Self::Overloaded(_) => "overloaded",
            Self::LedgerUnavailable(_) => "ledger_unavailable",
            Self::Internal => "internal_error",
        }
    }

    /// The OpenAI `type`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidApiKey(_) => "authentication_error",
            Self::ProjectForbidden(_) => "permission_error",
            Self::RateLimited(_) | Self::BudgetExceeded { .. } => "rate_limit_error",
            Self::ResponseNotFound(_) => "not_found_error",
            Self::UpstreamUnavailable(_)
            | Self::UpstreamTimeout(_)
            | Self::UpstreamKeyMissing
            | Self::UpstreamCredentials(_) => "upstream_error",
            Self::Internal => "server_error",
            Self::Overloaded(_) | Self::LedgerUnavailable(_) => "service_unavailable_error",
            _ => "invalid_request_error",
        }
    }

    /// Whether the outcome is a rejection of the caller (as opposed to an upstream failure).
    #[must_use]
    pub fn is_rejection(&self) -> bool {
        self.status().is_client_error()
            || matches!(self, Self::Overloaded(_) | Self::LedgerUnavailable(_))
    }

    /// The JSON body: `{"error":{"message","type","param","code"}}`.
    #[must_use]
    pub fn body(&self) -> Bytes {
        error_body(&self.to_string(), self.kind(), None, self.code())
    }
}

/// Serializes an OpenAI-shaped error body.
#[must_use]
pub fn error_body(message: &str, kind: &str, param: Option<&str>, code: &str) -> Bytes {
    #[derive(Serialize)]
    struct Envelope<'a> {
        error: Inner<'a>,
    }
    #[derive(Serialize)]
    struct Inner<'a> {
        message: &'a str,
        #[serde(rename = "type")]
        kind: &'a str,
        param: Option<&'a str>,
        code: &'a str,
    }
    let envelope = Envelope {
        error: Inner {
            message,
            kind,
            param,
            code,
        },
    };
    // Serializing plain strings cannot fail; an empty body would still be an answer.
    Bytes::from(serde_json::to_vec(&envelope).unwrap_or_default())
}

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), self.body()).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Self::AmbiguousLength(_) | Self::RequestTimeout(_) = self {
            // Where the next request would start is the very thing in doubt (or the rest of a
            // body is still to come): hyper closes the connection after an answer saying so.
            // (HTTP/2 has no such header: hyper drops it, and resets the unfinished stream.)
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        match &self {
            // The SDKs back off and retry by themselves with these.
            Self::RateLimited(limited) => limited.apply(headers),
            Self::Overloaded(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            // A slow link may be faster next time: the SDKs retry 408 by themselves.
            Self::RequestTimeout(_) => {}
            // Retrying cannot fix a refusal; the SDKs honour this header.
            _ if self.is_rejection() => {
                headers.insert("x-should-retry", HeaderValue::from_static("false"));
            }
            _ => {}
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_openai_shaped() {
        let err = ProxyError::InvalidApiKey("no key".into());
        let v: serde_json::Value = serde_json::from_slice(&err.body()).expect("json");
        assert_eq!(v["error"]["message"], "no key");
        assert_eq!(v["error"]["type"], "authentication_error");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        assert!(v["error"]["param"].is_null());
        assert_eq!(err.status(), StatusCode::UNAUTHORIZED);
    }

    fn refusal(spend: &str, left: &str) -> Exceeded {
        Exceeded {
            name: "tiny".into(),
            limit_usd: "0.0001".parse().expect("decimal"),
            spend_usd: spend.parse().expect("decimal"),
            reserve_usd: "0.0024609".parse().expect("decimal"),
            held_usd: rust_decimal::Decimal::ZERO,
            left_usd: left.parse().expect("decimal"),
        }
    }

    #[test]
    fn a_reservation_that_does_not_fit_says_how_it_was_reckoned() {
        let reckoning = Reckoning {
            output_tokens: 4096,
            output_from: OutputFrom::Default,
            input_tokens: 24,
            body_bytes: 97,
            prices: Some(("0.15".parse().expect("in"), "0.60".parse().expect("out"))),
        };
        let msg = budget_message(&refusal("0", "0.0001"), &reckoning);
        assert_eq!(
            msg,
            "budget `tiny` cannot hold this call's reservation: the most the call may cost, reserved until it ends, is $0.0024609 = 4096 output tokens (the call sets no output cap: [limits] default_max_output_tokens) × $0.6 per million output tokens + about 24 input tokens (the 97-byte body at ~4 bytes a token) × $0.15 per million input tokens, and only $0.0001 of the $0.0001 budget is left this month ($0 spent, $0 held by calls in flight). Send a lower output cap (chat: max_completion_tokens or max_tokens; Responses: max_output_tokens) so the reservation fits, ask your platform team to raise the budget, or wait for the next month"
        );
        // Spent: said so, whatever the call would have reserved.
        let msg = budget_message(&refusal("0.0001", "0"), &reckoning);
        assert!(
            msg.starts_with("budget `tiny` is spent for this month: $0.0001 of $0.0001"),
            "{msg}"
        );
    }
}
