//! The per-call context: facts gathered along the request path, committed exactly once.
//!
//! A [`Call`] is created when a request arrives and travels with it: through attribution,
//! into the relayed response body, until the body ends. It is committed once: explicitly
//! when the call ends (success, rejection, upstream failure) or, when the client goes away
//! first, by its `Drop` (outcome `client_disconnect`). That one commit prices the call, queues
//! its ledger record, updates the metrics and writes the access log line. It never awaits.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderValue, Method, Uri};

use crate::budget::Reservation;
use crate::ledger::{Background, Record};
use crate::meter::stream::Metered;
use crate::meter::{Usage, UsageSource};
use crate::metrics::{Observation, status_class};
use crate::pricing;
use crate::proxy::endpoint::Endpoint;
use crate::ratelimit::Admission;
use crate::state::{AppState, PendingBackground, ProjectIdx, Snapshot};

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
    /// The client stopped reading the answer: nothing of it taken for `server.idle_timeout`
    /// while mantlegate had more to send, so mantlegate gave up on it.
    ClientStalled,
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
            Self::ClientStalled => "client_stalled",
        }
    }
}

/// Everything known about one call; see the module docs.
#[expect(
    clippy::struct_excessive_bools,
    reason = "independent facts of the call (asked for a stream, for a background response...), not a state machine"
)]
pub struct Call {
    started: Instant,
    wall_ms: i64,
    state: Arc<AppState>,
    snap: Arc<Snapshot>,
    /// Its count in `state.in_flight`, once admitted ([`Call::enter_in_flight`]).
    in_flight: Option<InFlightSlot>,
    /// HTTP method.
    pub method: Method,
    /// Request path and query (a copy, see [`own_path`]).
    pub uri: Uri,
    /// mantlegate's own id for the call: its identity in the ledger, whatever ids the client
    /// or the upstream send.
    id: String,
    /// The id the client sees in `x-request-id`.
    pub request_id: Option<HeaderValue>,
    /// Route prefix the call came through.
    pub route: Option<Arc<str>>,
    /// Name of the caller's key.
    pub key: Option<Arc<str>>,
    /// The key's fingerprint.
    pub key_fp: Option<Arc<str>>,
    /// The project billed.
    pub project: Option<ProjectIdx>,
    /// The endpoint called.
    pub endpoint: Option<Endpoint>,
    /// Model named in the body.
    pub model: Option<String>,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Whether the client asked for a background response (`"background": true`).
    pub background: bool,
    /// Not an API call at all (an unknown path under `/admin`): logged, never recorded.
    pub unrecorded: bool,
    /// Size of the request body, for estimates.
    pub request_bytes: usize,
    /// Status sent to the client.
    pub status: u16,
    /// Status received from the upstream.
    pub upstream_status: Option<u16>,
    /// mantlegate's own time: before sending upstream and after the response head came back.
    pub overhead: Option<Duration>,
    /// Time from arrival to the first body byte from the upstream.
    pub ttfb: Option<Duration>,
    /// Error code, when mantlegate refused or failed the call.
    pub error_code: Option<&'static str>,
    /// What the body meter found (set by the relay before it commits).
    pub metered: Option<Metered>,
    /// The response id a `GET`, `DELETE`, `cancel` or `input_items` call names, canonical
    /// ([`crate::proxy::endpoint::response_id`]).
    pub target_response: Option<String>,
    /// Upstream attempts retried before the answer.
    pub retries: u32,
    /// What the rate limiter granted, corrected with the real tokens at the end.
    pub rate: Option<Admission>,
    /// What the budgets reserved, replaced by the real cost at the end.
    pub reservation: Option<Reservation>,
    committed: bool,
}

impl Call {
    /// Starts the context of a call that arrived at `started`, under `snap`. It is not counted
    /// in flight until [`Call::enter_in_flight`].
    #[must_use]
    pub fn new(
        started: Instant,
        method: Method,
        uri: Uri,
        state: Arc<AppState>,
        snap: Arc<Snapshot>,
    ) -> Self {
        let wall_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        Self {
            started,
            id: crate::ledger::new_call_id(wall_ms),
            wall_ms,
            state,
            snap,
            in_flight: None,
            method,
            uri: own_path(uri),
            request_id: None,
            route: None,
            key: None,
            key_fp: None,
            project: None,
            endpoint: None,
            model: None,
            stream: false,
            background: false,
            unrecorded: false,
            request_bytes: 0,
            status: 0,
            upstream_status: None,
            overhead: None,
            ttfb: None,
            error_code: None,
            metered: None,
            target_response: None,
            rate: None,
            retries: 0,
            reservation: None,
            committed: false,
        }
    }

    /// A call mantlegate makes itself on behalf of this one (same key, route and project),
    /// with a record of its own, counted in flight while it lasts.
    #[must_use]
    pub fn sibling(&self, method: Method, uri: Uri) -> Self {
        let mut call = Self::new(
            Instant::now(),
            method,
            uri,
            self.state.clone(),
            self.snap.clone(),
        );
        call.route.clone_from(&self.route);
        call.key.clone_from(&self.key);
        call.key_fp.clone_from(&self.key_fp);
        call.project = self.project;
        // It runs because this call was admitted: counted, never refused.
        call.enter_in_flight(usize::MAX);
        call
    }

    /// Counts the call in `state.in_flight` until it is dropped; false when that makes more
    /// than `max` calls in flight (the call is to be refused).
    pub fn enter_in_flight(&mut self, max: usize) -> bool {
        if self.in_flight.is_some() {
            return true;
        }
        let counter = &self.state.in_flight;
        let now = counter.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
        self.in_flight = Some(InFlightSlot(counter.clone()));
        now <= max
    }

    /// Moves the call, not admitted yet, to `snap` (a reload came before it was forwarded):
    /// what it was attributed to under the old snapshot is found again under the new one.
    pub fn rebase(&mut self, snap: Arc<Snapshot>) {
        self.snap = snap;
        // An index into the old snapshot's projects means nothing in the new one.
        self.project = None;
    }

    /// The snapshot this call runs under.
    #[must_use]
    pub fn snapshot(&self) -> &Arc<Snapshot> {
        &self.snap
    }

    /// The client-visible request id; when the upstream gave none, the call id.
    pub fn request_id(&mut self) -> &HeaderValue {
        self.request_id
            .get_or_insert_with(|| header_value(&self.id))
    }

    /// mantlegate's own id for the call, as the ledger records it.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.id
    }

    /// When the call arrived.
    #[must_use]
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Notes the first body byte.
    pub fn mark_first_byte(&mut self) {
        if self.ttfb.is_none() {
            self.ttfb = Some(self.started.elapsed());
        }
    }

    /// Whether the call has been committed.
    #[must_use]
    pub fn is_committed(&self) -> bool {
        self.committed
    }

    /// Commits the call with its outcome. Later commits (and the drop) do nothing.
    pub fn commit(&mut self, outcome: Outcome) {
        if self.committed {
            return;
        }
        self.committed = true;
        if self.request_id.is_none() {
            self.request_id = Some(header_value(&self.id));
        }
        let duration = self.started.elapsed();
        let metered = self.metered.take().unwrap_or_default();
        let (usage, source, background) = self.settle_usage(&metered);
        let price = self
            .model
            .as_deref()
            .and_then(|m| self.snap.prices.lookup(m));
        let priced = price.is_some();
        let cost = if source == UsageSource::None {
            Some(rust_decimal::Decimal::ZERO)
        } else {
            price.map(|p| pricing::cost(p, &usage))
        };
        let bill = Bill {
            outcome,
            duration,
            usage,
            source,
            cost,
            priced,
            // The id the call named, canonical, before any the answer names: the pending and
            // ownership indexes know a response by the former.
            response_id: self.target_response.clone().or(metered.response_id),
        };
        self.index_response(&bill, background.as_ref());
        self.settle_admission(&bill);
        self.log(&bill);
        self.observe(&bill);
        self.write(bill, background);
    }

    /// Corrects the rate limiter and the budgets with what the call really used and cost, and
    /// announces the budget thresholds crossed (their webhook deliveries are queued, never
    /// awaited).
    fn settle_admission(&mut self, bill: &Bill) {
        if let Some(rate) = self.rate.take() {
            rate.settle(bill.usage.input + bill.usage.output, Instant::now());
        }
        let cost = bill.cost.and_then(pricing::to_pico);
        let reservation = match (self.reservation.take(), self.project) {
            (Some(r), _) => r,
            // Not admitted against budgets (a background response's GET), yet it costs.
            (None, Some(p)) if cost.is_some_and(|c| c > 0) => {
                let applicable = &self.snap.projects[p].budgets;
                if applicable.is_empty() {
                    return;
                }
                self.snap.budgets.unreserved(applicable)
            }
            (None, _) => return,
        };
        let now_ms = jiff::Timestamp::now().as_millisecond();
        for alert in reservation.settle(cost, now_ms) {
            self.state
                .alerts
                .announce(self.snap.alert_webhook.as_ref(), &alert, now_ms);
        }
    }

    /// Remembers which project a new Responses object lives in (and, for background ones,
    /// that their usage is still to come).
    fn index_response(&self, bill: &Bill, background: Option<&Background>) {
        let (Some(id), Some(p)) = (&bill.response_id, self.project) else {
            return;
        };
        if self.endpoint != Some(Endpoint::CreateResponse) {
            return;
        }
        let project = &self.snap.projects[p];
        self.state
            .responses
            .record_owner(id.clone(), project.id.clone());
        if background == Some(&Background::Pending) {
            self.state.responses.add_pending(
                id.clone(),
                PendingBackground {
                    project_id: project.id.clone(),
                    model: self.model.clone(),
                },
            );
        }
    }

    fn request_id_str(&self) -> &str {
        self.request_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    /// The access log line: one per call, written here and nowhere else
    /// ([`crate::logging::access`]).
    fn log(&self, bill: &Bill) {
        let project = self.project.map(|p| &self.snap.projects[p]);
        crate::logging::access(|line| {
            line.str("request_id", self.request_id_str());
            line.str("call_id", &self.id);
            line.str("method", self.method.as_str());
            line.str("path", self.uri.path());
            line.opt_str("route", self.route.as_deref());
            line.opt_str("key", self.key.as_deref());
            line.opt_str("project", project.map(|p| &*p.name));
            line.opt_str("project_id", project.map(|p| &*p.id));
            line.opt_str("api", self.endpoint.map(|e| e.api().as_str()));
            line.opt_str("model", self.model.as_deref());
            line.value("stream", self.stream);
            line.value("status", self.status);
            line.opt_value("upstream_status", self.upstream_status);
            line.value("duration_ms", ms(bill.duration));
            line.opt_value("ttfb_ms", self.ttfb.map(ms));
            line.str("outcome", bill.outcome.as_str());
            line.opt_str("error_code", self.error_code);
            line.value("input_tokens", bill.usage.input);
            line.value("cached_input_tokens", bill.usage.cached_input);
            line.value("output_tokens", bill.usage.output);
            line.value("reasoning_tokens", bill.usage.reasoning);
            line.str("usage_source", bill.source.as_str());
            if let Some(cost) = bill.cost {
                // Exact decimal text, as the ledger has it.
                line.str("cost_usd", &cost.normalize().to_string());
            }
            line.opt_str("response_id", bill.response_id.as_deref());
            line.value("retries", self.retries);
        });
    }

    fn observe(&self, bill: &Bill) {
        let project = self.project.map(|p| &self.snap.projects[p]);
        // A model name is a label only when it is known (priced, or answered by the upstream),
        // so junk names in bodies cannot multiply the series.
        let model_label = match (&self.model, bill.outcome) {
            (_, Outcome::Rejected) | (None, _) => "",
            (Some(m), _) if bill.priced || self.upstream_status.is_some_and(|s| s < 300) => m,
            _ => "other",
        };
        self.state.metrics.observe(&Observation {
            project: project.map(|p| &p.name),
            model: model_label,
            api: self.endpoint.map_or("", |e| e.api().as_str()),
            status_class: status_class(self.status),
            outcome: bill.outcome.as_str(),
            tags: project.map_or(&self.snap.no_tags, |p| &p.metric_tags),
            handles: project.map(|p| &p.metric_handles),
            code: self.error_code,
            usage: (bill.source != UsageSource::None).then_some(bill.usage),
            cost_usd: bill
                .cost
                .map(|c| rust_decimal::prelude::ToPrimitive::to_f64(&c).unwrap_or(0.0)),
            stream: self.stream,
            duration: bill.duration,
            ttfb: self.ttfb,
            overhead: self.overhead,
        });
    }

    fn write(&mut self, bill: Bill, background: Option<Background>) {
        let Some(ledger) = &self.state.ledger else {
            return;
        };
        if self.unrecorded {
            return;
        }
        let project = self.project.map(|p| &self.snap.projects[p]);
        ledger.record(Record {
            call_id: std::mem::take(&mut self.id),
            ts_ms: self.wall_ms,
            request_id: self.request_id_str().to_owned(),
            key: self.key.clone(),
            key_fp: self.key_fp.clone(),
            route: self.route.clone(),
            project: project.map(|p| p.name.clone()),
            project_id: project.map(|p| p.id.clone()),
            tags: project.map(|p| p.tags_json.clone()),
            api: self.endpoint.map(|e| e.api().as_str()),
            model: self.model.take(),
            stream: self.stream,
            status: self.status,
            outcome: bill.outcome.as_str(),
            error_code: self.error_code,
            usage: bill.usage,
            usage_source: bill.source,
            cost_pico: bill.cost.and_then(pricing::to_pico),
            duration_ms: ms(bill.duration),
            ttfb_ms: self.ttfb.map(ms),
            upstream_response_id: bill.response_id,
            background,
            budget_months: project.map_or_else(Vec::new, |p| {
                p.budgets
                    .iter()
                    .map(|&i| {
                        let b = &self.snap.budgets.list[i];
                        let month = crate::budget::Month::containing(self.wall_ms, &b.tz).label();
                        (Arc::from(b.name.as_str()), Arc::from(month))
                    })
                    .collect()
            }),
        });
    }

    /// The usage this call is billed for.
    ///
    /// A background response is billed once, by the first answer that shows it finished with
    /// its usage: a GET of it (JSON, or its events replayed or resumed with `stream=true`) or
    /// the answer to its cancel. That answer takes the response out of the pending index
    /// (atomically: of two such answers at once, one takes it) and carries its usage; in a
    /// fleet the ledger's write takes it from the shared pending table too, once for all
    /// replicas. Any other answer about a stored response is free. A call creating a
    /// background response that did not see it finish (a queued answer, or a stream the
    /// client or upstream left before its terminal event, which the response outlives) bills
    /// nothing and leaves it pending.
    fn settle_usage(&mut self, m: &Metered) -> (Usage, UsageSource, Option<Background>) {
        let none = (Usage::default(), UsageSource::None, None);
        let Some(source) = m.source else {
            return none;
        };
        let finished = m
            .response_status
            .as_deref()
            .is_some_and(crate::meter::usage::is_terminal);
        match self.endpoint {
            Some(Endpoint::GetResponse | Endpoint::CancelResponse) => {
                // Only the final figures settle it: a terminal answer without usage (or a
                // replay resumed past its terminal event) leaves it pending for one that has.
                let settled = match (&self.target_response, finished, source) {
                    (Some(id), true, UsageSource::Reported) => {
                        self.state.responses.take_pending(id)
                    }
                    _ => None,
                };
                let Some(pending) = settled else {
                    return none;
                };
                if self.model.is_none() {
                    self.model = pending.model;
                }
                (m.usage, source, Some(Background::Settled))
            }
            Some(Endpoint::CreateResponse)
                if (m.background || self.background) && !finished && m.response_id.is_some() =>
            {
                // Usage comes later, with the answer that sees it finished.
                (
                    Usage::default(),
                    UsageSource::None,
                    Some(Background::Pending),
                )
            }
            _ => (m.usage, source, None),
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // Not committed by now means the request future or the response body was dropped
        // before the end: the client hung up.
        self.commit(Outcome::ClientDisconnect);
    }
}

/// `uri`'s path and query in an allocation of their own. A parsed request URI shares the buffer
/// its head was read into (hyper's 8 KiB read buffer), which a call kept for the whole length
/// of a stream would otherwise keep too.
fn own_path(uri: Uri) -> Uri {
    uri.path_and_query()
        .and_then(|pq| {
            Uri::from_maybe_shared(bytes::Bytes::copy_from_slice(pq.as_str().as_bytes())).ok()
        })
        .unwrap_or(uri)
}

/// One call counted in flight (`server.max_in_flight`) until it is dropped.
pub struct InFlightSlot(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for InFlightSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// What a finished call used and cost.
struct Bill {
    outcome: Outcome,
    duration: Duration,
    usage: Usage,
    source: UsageSource,
    /// `None`: the model has no price.
    cost: Option<rust_decimal::Decimal>,
    priced: bool,
    response_id: Option<String>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A call id as a header value (it is ASCII letters and digits).
fn header_value(call_id: &str) -> HeaderValue {
    HeaderValue::from_str(call_id).unwrap_or_else(|_| HeaderValue::from_static("mg_unknown"))
}
