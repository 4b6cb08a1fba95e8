//! Every metric, its name and labels, in one place. Labels are bounded: project, model, api,
//! status class, error code and the tags listed in `[metrics] tag_labels`; never a key, a path
//! or a user.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::budget::Budgets;
use crate::ledger::LedgerStats;
use crate::meter::Usage;

/// Tag label pairs of a project, precomputed per config (`tag_<Name>` = value).
pub type TagLabels = Vec<(Arc<str>, Arc<str>)>;

/// Labels of a finished call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    /// Project name (`""` when the call resolved to none).
    pub project: Arc<str>,
    /// Model, bounded (see `model_label` in the proxy).
    pub model: Arc<str>,
    /// API family.
    pub api: &'static str,
    /// `2xx`, `4xx`, `5xx`...
    pub status_class: &'static str,
    /// `forwarded`, `rejected`, `upstream_error`, `client_disconnect`, `client_stalled`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    project: Arc<str>,
    model: Arc<str>,
    api: &'static str,
    r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CostLabels {
    project: Arc<str>,
    model: Arc<str>,
    api: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    project: Arc<str>,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabels {
    api: &'static str,
    stream: &'static str,
}

/// The label set of a metric that has none, in a `Family` so that it shows only once set.
type NoLabels = [(&'static str, &'static str); 0];

/// The registry and handles.
pub struct Metrics {
    registry: Registry,
    requests: Family<(CallLabels, TagLabels), Counter>,
    tokens: Family<(TokenLabels, TagLabels), Counter>,
    cost: Family<(CostLabels, TagLabels), Counter<f64, AtomicU64>>,
    rejected: Family<CodeLabels, Counter>,
    upstream_errors: Family<CodeLabels, Counter>,
    unpriced: Family<CostLabels, Counter>,
    duration: Family<ApiLabels, Histogram>,
    ttfb: Family<ApiLabels, Histogram>,
    overhead: Histogram,
    ledger_queue: Gauge,
    ledger_written: Gauge,
    ledger_dropped: Gauge,
    ledger_errors: Gauge,
    in_flight: Gauge,
    connections_open: Gauge,
    connections_closed: Family<ReasonLabels, Counter>,
    budget_limit: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    budget_spend: Family<BudgetLabels, Gauge<f64, AtomicU64>>,
    reloads: Counter,
    reload_failures: Counter,
    webhook_failures: Family<ReasonLabels, Counter>,
    webhook_deliveries: Counter,
    webhook_given_up: Counter,
    /// Shared rate-limit store: up, fallback calls, settles dropped, outages. Families
    /// without labels, so that nothing shows without a store.
    rate_store: [Family<NoLabels, Gauge>; 4],
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BudgetLabels {
    budget: String,
}

/// Facts of one finished call for the metrics.
pub struct Observation<'a> {
    /// Project name (`None`: the call resolved to none).
    pub project: Option<&'a Arc<str>>,
    /// Model label, bounded (see `model_label` in the proxy); `""` for none.
    pub model: &'a str,
    /// API family.
    pub api: &'static str,
    /// `2xx`, `4xx`, `5xx`...
    pub status_class: &'static str,
    /// `forwarded`, `rejected`, `upstream_error`, `client_disconnect`, `client_stalled`.
    pub outcome: &'static str,
    /// The project's tag labels.
    pub tags: &'a TagLabels,
    /// The project's memo of metric handles (`None`: look every series up).
    pub handles: Option<&'a HandleCache>,
    /// Error code when refused or failed.
    pub code: Option<&'static str>,
    /// Usage, when the call had any.
    pub usage: Option<Usage>,
    /// Cost in USD (`None`: unpriced).
    pub cost_usd: Option<f64>,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Total duration.
    pub duration: Duration,
    /// Time to first byte.
    pub ttfb: Option<Duration>,
    /// mantlegate's own share of the duration.
    pub overhead: Option<Duration>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    ]
    .into_iter()
}

fn overhead_buckets() -> impl Iterator<Item = f64> {
    // 10 µs to 100 ms: mantlegate's own time per call.
    [
        0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.1,
    ]
    .into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric.
    #[must_use]
    #[expect(clippy::too_many_lines, reason = "one registration after another")]
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mantlegate");
        let requests = Family::default();
        registry.register("requests", "Calls handled, by outcome", requests.clone());
        let tokens = Family::default();
        registry.register(
            "tokens",
            "Tokens used, by type (input, cached_input, output, reasoning)",
            tokens.clone(),
        );
        let cost = Family::default();
        registry.register("cost_usd", "Cost of calls in USD", cost.clone());
        let rejected = Family::default();
        registry.register(
            "rejected_requests",
            "Calls refused by mantlegate, by error code",
            rejected.clone(),
        );
        let upstream_errors = Family::default();
        registry.register(
            "upstream_errors",
            "Calls that failed upstream (unreachable, timeout, broken stream)",
            upstream_errors.clone(),
        );
        let unpriced = Family::default();
        registry.register(
            "unpriced_requests",
            "Calls whose model has no price: cost unknown",
            unpriced.clone(),
        );
        let duration: Family<ApiLabels, Histogram> =
            Family::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register(
            "request_duration_seconds",
            "Total call duration",
            duration.clone(),
        );
        let ttfb: Family<ApiLabels, Histogram> =
            Family::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register(
            "time_to_first_byte_seconds",
            "Time from arrival to the first body byte from bedrock-mantle",
            ttfb.clone(),
        );
        let overhead = Histogram::new(overhead_buckets());
        registry.register(
            "overhead_seconds",
            "mantlegate's own time per call (total minus time waiting on bedrock-mantle)",
            overhead.clone(),
        );
        let ledger_queue = Gauge::default();
        registry.register(
            "ledger_queue_depth",
            "Ledger records waiting to be written",
            ledger_queue.clone(),
        );
        let ledger_written = Gauge::default();
        registry.register(
            "ledger_records_written",
            "Ledger records committed since start",
            ledger_written.clone(),
        );
        let ledger_dropped = Gauge::default();
        registry.register(
            "ledger_records_dropped",
            "Ledger records refused because the queue was full",
            ledger_dropped.clone(),
        );
        let ledger_errors = Gauge::default();
        registry.register(
            "ledger_write_errors",
            "Failed ledger batch writes (each is retried)",
            ledger_errors.clone(),
        );
        let in_flight = Gauge::default();
        registry.register("in_flight_requests", "Calls in progress", in_flight.clone());
        let connections_open = Gauge::default();
        registry.register(
            "client_connections",
            "Client connections open",
            connections_open.clone(),
        );
        let connections_closed = Family::default();
        registry.register(
            "client_connections_closed",
            "Client connections mantlegate closed, by reason: header_read_timeout, idle_timeout, evicted (the longest idle, for a new one past max_connections), refused (past max_connections, none idle), client_stalled (every answer in progress given up on: the client read none of it for idle_timeout), shutdown",
            connections_closed.clone(),
        );
        let reloads = Counter::default();
        registry.register("config_reloads", "Config reloads taken", reloads.clone());
        let rate_store: [Family<NoLabels, Gauge>; 4] = Default::default();
        for (family, (name, help)) in rate_store.iter().zip([
            (
                "rate_limit_store_up",
                "Whether the shared rate-limit store (Redis) answered when last asked",
            ),
            (
                "rate_limit_store_fallback_calls",
                "Calls whose rate limits were decided per replica because the shared store failed",
            ),
            (
                "rate_limit_store_settles_dropped",
                "Token corrections not applied because the shared store failed",
            ),
            (
                "rate_limit_store_outages",
                "Times the shared rate-limit store went from answering to failing",
            ),
        ]) {
            registry.register(name, help, family.clone());
        }
        let reload_failures = Counter::default();
        registry.register(
            "config_reload_failures",
            "Config reloads refused (invalid config; the old one stays)",
            reload_failures.clone(),
        );
        let budget_limit = Family::default();
        registry.register(
            "budget_limit_usd",
            "Monthly limit of each budget",
            budget_limit.clone(),
        );
        let budget_spend = Family::default();
        registry.register(
            "budget_spend_usd",
            "Month-to-date spend of each budget",
            budget_spend.clone(),
        );
        let webhook_failures = Family::default();
        registry.register(
            "webhook_failures",
            "Failed budget alert webhook attempts (each is retried), by reason: timeout, connect, status (an answer other than 2xx, redirects included), transport",
            webhook_failures.clone(),
        );
        let webhook_deliveries = Counter::default();
        registry.register(
            "webhook_deliveries",
            "Budget alerts their webhook took (answered 2xx)",
            webhook_deliveries.clone(),
        );
        let webhook_given_up = Counter::default();
        registry.register(
            "webhook_alerts_given_up",
            "Budget alerts given up, not delivered within 24 h",
            webhook_given_up.clone(),
        );
        Self {
            registry,
            requests,
            tokens,
            cost,
            rejected,
            upstream_errors,
            unpriced,
            duration,
            ttfb,
            overhead,
            ledger_queue,
            ledger_written,
            ledger_dropped,
            ledger_errors,
            in_flight,
            connections_open,
            connections_closed,
            budget_limit,
            budget_spend,
            reloads,
            reload_failures,
            webhook_failures,
            webhook_deliveries,
            webhook_given_up,
            rate_store,
        }
    }

    /// Sets the shared rate-limit store's gauges (before a [`render`](Self::render)); never
    /// called without a store, so none of them shows then.
    pub fn observe_rate_store(&self, stats: &crate::ratelimit::redis::RedisStats) {
        let get = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        let values = [
            i64::from(stats.up),
            get(stats.fallbacks),
            get(stats.adjusts_dropped),
            get(stats.outages),
        ];
        for (family, value) in self.rate_store.iter().zip(values) {
            family.get_or_create(&[]).set(value);
        }
    }

    /// Counts a client connection opened (`true`) or ended (`false`).
    pub fn connection(&self, opened: bool) {
        if opened {
            self.connections_open.inc();
        } else {
            self.connections_open.dec();
        }
    }

    /// Counts a client connection mantlegate closed, and why (a fixed word).
    pub fn connection_closed(&self, reason: &'static str) {
        self.connections_closed
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts `n` client connections mantlegate closed for `reason`.
    pub fn connection_closed_n(&self, reason: &'static str, n: usize) {
        self.connections_closed
            .get_or_create(&ReasonLabels { reason })
            .inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }

    /// Counts a config reload, taken or refused.
    pub fn reloaded(&self, ok: bool) {
        if ok {
            self.reloads.inc();
        } else {
            self.reload_failures.inc();
        }
    }

    /// Counts a failed budget alert webhook attempt, and why (a fixed word).
    pub fn webhook_failed(&self, reason: &'static str) {
        self.webhook_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a budget alert its webhook took.
    pub fn webhook_delivered(&self) {
        self.webhook_deliveries.inc();
    }

    /// Counts a budget alert given up.
    pub fn webhook_given_up(&self) {
        self.webhook_given_up.inc();
    }

    /// Records a finished call.
    pub fn observe(&self, o: &Observation<'_>) {
        match o.handles.and_then(|cache| cache.handles(self, o)) {
            Some(h) => self.count(&h, o),
            // No memo (no project, or a project with too many kinds): looked up this once.
            None => self.count(&CallHandles::resolve(self, o), o),
        }
        let project = || o.project.cloned().unwrap_or_else(|| Arc::from(""));
        if let Some(code) = o.code {
            let labels = CodeLabels {
                project: project(),
                code,
            };
            if o.outcome == "rejected" {
                self.rejected.get_or_create(&labels).inc();
            } else {
                self.upstream_errors.get_or_create(&labels).inc();
            }
        } else if o.outcome == "upstream_error" {
            self.upstream_errors
                .get_or_create(&CodeLabels {
                    project: project(),
                    code: "upstream_stream_error",
                })
                .inc();
        }
        if let Some(t) = o.overhead {
            self.overhead.observe(t.as_secs_f64());
        }
    }

    /// Counts a call in the series of its kind; those it has not used yet are created now.
    fn count(&self, h: &CallHandles, o: &Observation<'_>) {
        h.requests.inc();
        if let Some(u) = o.usage {
            for (i, n) in usage_counts(&u).into_iter().enumerate() {
                if n > 0 {
                    h.tokens[i]
                        .get_or_init(|| self.token_counter(o, TOKEN_TYPES[i]))
                        .inc_by(n);
                }
            }
            match o.cost_usd {
                Some(c) => {
                    h.cost.get_or_init(|| self.cost_counter(o)).inc_by(c);
                }
                None => {
                    h.unpriced.get_or_init(|| self.unpriced_counter(o)).inc();
                }
            }
        }
        h.duration.observe(o.duration.as_secs_f64());
        if let Some(t) = o.ttfb {
            h.ttfb
                .get_or_init(|| self.ttfb.get_or_create_owned(&api_labels(o)))
                .observe(t.as_secs_f64());
        }
    }

    fn token_counter(&self, o: &Observation<'_>, kind: &'static str) -> Counter {
        self.tokens.get_or_create_owned(&(
            TokenLabels {
                project: o.project.cloned().unwrap_or_else(|| Arc::from("")),
                model: Arc::from(o.model),
                api: o.api,
                r#type: kind,
            },
            o.tags.clone(),
        ))
    }

    fn cost_counter(&self, o: &Observation<'_>) -> Counter<f64, AtomicU64> {
        self.cost
            .get_or_create_owned(&(cost_labels(o), o.tags.clone()))
    }

    fn unpriced_counter(&self, o: &Observation<'_>) -> Counter {
        self.unpriced.get_or_create_owned(&cost_labels(o))
    }

    /// The Prometheus text exposition, with ledger gauges read now.
    #[must_use]
    pub fn render(
        &self,
        ledger: Option<&LedgerStats>,
        budgets: &Budgets,
        in_flight: usize,
    ) -> String {
        self.in_flight
            .set(i64::try_from(in_flight).unwrap_or(i64::MAX));
        for b in &budgets.list {
            let labels = BudgetLabels {
                budget: b.name.clone(),
            };
            let to_f64 = |pico: i64| {
                rust_decimal::prelude::ToPrimitive::to_f64(&crate::pricing::from_pico(pico))
                    .unwrap_or(0.0)
            };
            self.budget_limit
                .get_or_create(&labels)
                .set(to_f64(b.limit_pico));
            self.budget_spend
                .get_or_create(&labels)
                .set(to_f64(b.spent_pico()));
        }
        if let Some(s) = ledger {
            let get = |a: &AtomicU64| i64::try_from(a.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
            self.ledger_queue.set(get(&s.queued));
            self.ledger_written.set(get(&s.written));
            self.ledger_dropped.set(get(&s.dropped));
            self.ledger_errors.set(get(&s.write_errors));
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The `type` label of each count [`usage_counts`] gives, in its order.
const TOKEN_TYPES: [&str; 4] = ["input", "cached_input", "output", "reasoning"];

fn usage_counts(u: &Usage) -> [u64; 4] {
    [u.input, u.cached_input, u.output, u.reasoning]
}

fn call_labels(o: &Observation<'_>) -> CallLabels {
    CallLabels {
        project: o.project.cloned().unwrap_or_else(|| Arc::from("")),
        model: Arc::from(o.model),
        api: o.api,
        status_class: o.status_class,
        outcome: o.outcome,
    }
}

fn cost_labels(o: &Observation<'_>) -> CostLabels {
    CostLabels {
        project: o.project.cloned().unwrap_or_else(|| Arc::from("")),
        model: Arc::from(o.model),
        api: o.api,
    }
}

fn api_labels(o: &Observation<'_>) -> ApiLabels {
    ApiLabels {
        api: o.api,
        stream: if o.stream { "true" } else { "false" },
    }
}

/// Kinds of call a project keeps handles for; past it, calls are looked up every time
/// (model labels are bounded, so a project sees few kinds).
const MAX_CACHED_KINDS: usize = 64;

/// One project's memo of its series' handles, per kind of call (model, api, status class,
/// outcome, stream). Looking a series up in its `Family` hashes every label (with the
/// project's tags) and clones them into a key, for each of the half-dozen series a call
/// touches; with the memo a call finds all of them with one short scan. It lives in the
/// project of a config snapshot, so a reload (new names or tags) starts a new one. The
/// handles share their values with the registry's series; a series a call kind has not used
/// yet (say `reasoning` tokens) is created on first use, as before.
#[derive(Default)]
pub struct HandleCache(arc_swap::ArcSwap<Vec<Arc<CallHandles>>>);

impl std::fmt::Debug for HandleCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HandleCache({} kinds)", self.0.load().len())
    }
}

impl HandleCache {
    fn handles(&self, metrics: &Metrics, o: &Observation<'_>) -> Option<Arc<CallHandles>> {
        if let Some(h) = self.0.load().iter().find(|h| h.is_for(o)) {
            return Some(h.clone());
        }
        let current = self.0.load_full();
        if current.len() >= MAX_CACHED_KINDS {
            return None;
        }
        let h = Arc::new(CallHandles::resolve(metrics, o));
        let mut kept = h.clone();
        self.0.rcu(|list| {
            if let Some(other) = list.iter().find(|x| x.is_for(o)) {
                // Another call added this kind meanwhile: use its handles (the same series).
                kept = other.clone();
                return Arc::clone(list);
            }
            let mut next = Vec::with_capacity(list.len() + 1);
            next.extend(list.iter().cloned());
            next.push(h.clone());
            Arc::new(next)
        });
        Some(kept)
    }
}

/// The series one kind of call updates.
pub struct CallHandles {
    model: Box<str>,
    api: &'static str,
    status_class: &'static str,
    outcome: &'static str,
    stream: bool,
    requests: Counter,
    tokens: [OnceLock<Counter>; 4],
    cost: OnceLock<Counter<f64, AtomicU64>>,
    unpriced: OnceLock<Counter>,
    duration: Histogram,
    ttfb: OnceLock<Histogram>,
}

impl CallHandles {
    fn resolve(metrics: &Metrics, o: &Observation<'_>) -> Self {
        Self {
            model: o.model.into(),
            api: o.api,
            status_class: o.status_class,
            outcome: o.outcome,
            stream: o.stream,
            requests: metrics
                .requests
                .get_or_create_owned(&(call_labels(o), o.tags.clone())),
            tokens: Default::default(),
            cost: OnceLock::new(),
            unpriced: OnceLock::new(),
            duration: metrics.duration.get_or_create_owned(&api_labels(o)),
            ttfb: OnceLock::new(),
        }
    }

    fn is_for(&self, o: &Observation<'_>) -> bool {
        self.api == o.api
            && self.status_class == o.status_class
            && self.outcome == o.outcome
            && self.stream == o.stream
            && *self.model == *o.model
    }
}

/// `2xx`, `4xx`...
#[must_use]
pub fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn observation<'a>(
        project: &'a Arc<str>,
        tags: &'a TagLabels,
        handles: Option<&'a HandleCache>,
        step: u64,
    ) -> Observation<'a> {
        // The kinds and facts vary with the step: usage or none, priced or not, reasoning
        // tokens only later, a time to first byte only sometimes.
        let usage = (step % 4 != 3).then_some(Usage {
            input: 10 + step,
            cached_input: step % 2,
            output: 5,
            reasoning: if step > 4 { step } else { 0 },
        });
        Observation {
            project: Some(project),
            model: if step.is_multiple_of(3) { "m-a" } else { "m-b" },
            api: "chat.completions",
            status_class: "2xx",
            outcome: "forwarded",
            tags,
            handles,
            code: None,
            usage,
            cost_usd: (step % 5 != 1).then_some(0.25),
            stream: step.is_multiple_of(2),
            duration: Duration::from_millis(3 * step),
            ttfb: step.is_multiple_of(2).then(|| Duration::from_millis(step)),
            overhead: Some(Duration::from_micros(20)),
        }
    }

    #[test]
    fn calls_counted_through_the_memo_show_as_when_every_series_is_looked_up() {
        let project: Arc<str> = Arc::from("P");
        let tags: TagLabels = vec![(Arc::from("tag_Team"), Arc::from("search"))];
        let (memo, plain) = (Metrics::new(), Metrics::new());
        let cache = HandleCache::default();
        for step in 0..12 {
            memo.observe(&observation(&project, &tags, Some(&cache), step));
            plain.observe(&observation(&project, &tags, None, step));
        }
        let budgets = Budgets::default();
        let text = memo.render(None, &budgets, 0);
        // The same series with the same values (a family lists its series in hash order).
        let sorted = |t: &str| {
            let mut lines: Vec<String> = t.lines().map(str::to_owned).collect();
            lines.sort();
            lines
        };
        assert_eq!(sorted(&text), sorted(&plain.render(None, &budgets, 0)));
        // The figures, worked out by hand from `observation`.
        let series = |name: &str, model: &str, extra: &str, value: &str| {
            let line = format!(
                "mantlegate_{name}{{project=\"P\",model=\"{model}\",api=\"chat.completions\",{extra}}} {value}"
            );
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        };
        let tag = "tag_Team=\"search\"";
        let done = format!("status_class=\"2xx\",outcome=\"forwarded\",{tag}");
        series("requests_total", "m-a", &done, "4");
        series("requests_total", "m-b", &done, "8");
        for (model, kind, n) in [
            ("m-a", "input", "45"),
            ("m-a", "cached_input", "1"),
            ("m-a", "output", "15"),
            ("m-a", "reasoning", "15"),
            ("m-b", "input", "90"),
            ("m-b", "cached_input", "2"),
            ("m-b", "output", "30"),
            ("m-b", "reasoning", "23"),
        ] {
            series("tokens_total", model, &format!("type=\"{kind}\",{tag}"), n);
        }
        series("cost_usd_total", "m-a", tag, "0.5");
        series("cost_usd_total", "m-b", tag, "1.25");
        // Two models, two stream values: four kinds remembered.
        assert_eq!(cache.0.load().len(), 4);
    }
}
