//! The per-call context: facts gathered along the request path, committed exactly once.
//!
//! A [`Call`] is created when a request arrives and travels with it: through attribution,
//! into the relayed response body, until the body ends. It is committed once: explicitly
//! when the call ends (success, rejection, upstream failure) or, when the client goes away
//! first, by its `Drop` (outcome `client_disconnect`). That one commit writes the access log.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{HeaderValue, Method, Uri};

use crate::proxy::endpoint::Api;

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded and relayed to the end (whatever status the upstream answered).
    Forwarded,
    /// Refused by mantlegate before reaching the upstream.
    Rejected,
    /// The upstream could not be reached, timed out, or broke off mid-answer.
    UpstreamError,
    /// The client went away before the answer was complete.
    ClientDisconnect,
}

impl Outcome {
    /// Stable lowercase name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Rejected => "rejected",
            Self::UpstreamError => "upstream_error",
            Self::ClientDisconnect => "client_disconnect",
        }
    }
}

/// Everything known about one call; see the module docs.
#[derive(Debug)]
pub struct Call {
    started: Instant,
    /// HTTP method.
    pub method: Method,
    /// Request URI (cheap to clone: shares the request's bytes).
    pub uri: Uri,
    /// The id the client sees in `x-request-id`.
    pub request_id: Option<HeaderValue>,
    /// Route prefix the call came through.
    pub route: Option<Arc<str>>,
    /// Name of the caller's key.
    pub key: Option<Arc<str>>,
    /// Project name and id.
    pub project: Option<(Arc<str>, Arc<str>)>,
    /// API family.
    pub api: Option<Api>,
    /// Model named in the body.
    pub model: Option<String>,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Status sent to the client.
    pub status: u16,
    /// Status received from the upstream.
    pub upstream_status: Option<u16>,
    /// Time from arrival to the first body byte from the upstream.
    pub ttfb: Option<Duration>,
    /// Error code, when mantlegate refused or failed the call.
    pub error_code: Option<&'static str>,
    committed: bool,
}

impl Call {
    /// Starts the context of a call that arrived at `started`.
    #[must_use]
    pub fn new(started: Instant, method: Method, uri: Uri) -> Self {
        Self {
            started,
            method,
            uri,
            request_id: None,
            route: None,
            key: None,
            project: None,
            api: None,
            model: None,
            stream: false,
            status: 0,
            upstream_status: None,
            ttfb: None,
            error_code: None,
            committed: false,
        }
    }

    /// The client-visible request id, minted on first use when the upstream gave none.
    pub fn request_id(&mut self) -> &HeaderValue {
        self.request_id.get_or_insert_with(new_request_id)
    }

    /// Notes the first body byte.
    pub fn mark_first_byte(&mut self) {
        if self.ttfb.is_none() {
            self.ttfb = Some(self.started.elapsed());
        }
    }

    /// Commits the call with its outcome. Later commits (and the drop) do nothing.
    pub fn commit(&mut self, outcome: Outcome) {
        if self.committed {
            return;
        }
        self.committed = true;
        if self.request_id.is_none() {
            self.request_id = Some(new_request_id());
        }
        self.log(outcome);
    }

    fn log(&self, outcome: Outcome) {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let (project, project_id) = match &self.project {
            Some((name, id)) => (Some(&**name), Some(&**id)),
            None => (None, None),
        };
        tracing::info!(
            target: "mantlegate::access",
            request_id = self.request_id.as_ref().and_then(|v| v.to_str().ok()),
            method = %self.method,
            path = self.uri.path(),
            route = self.route.as_deref(),
            key = self.key.as_deref(),
            project,
            project_id,
            api = self.api.map(Api::as_str),
            model = self.model.as_deref(),
            stream = self.stream,
            status = self.status,
            upstream_status = self.upstream_status,
            duration_ms = ms(self.started.elapsed()),
            ttfb_ms = self.ttfb.map(ms),
            outcome = outcome.as_str(),
            error_code = self.error_code,
            "access"
        );
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // Not committed by now means the request future or the response body was dropped
        // before the end: the client hung up.
        self.commit(Outcome::ClientDisconnect);
    }
}

/// `mg_` followed by 24 random hex digits.
fn new_request_id() -> HeaderValue {
    let n: u128 = rand::random();
    let id = format!("mg_{:024x}", n >> 32);
    HeaderValue::from_str(&id).unwrap_or_else(|_| HeaderValue::from_static("mg_unknown"))
}
