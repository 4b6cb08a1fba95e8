//! Budget alert webhooks: every alert waits in the ledger's outbox until its endpoint answers
//! 2xx, one request at a time, retried with exponential backoff for a day.
//!
//! A call that crosses a threshold only queues the alert in memory ([`Alerts::announce`]);
//! the dispatcher ([`deliver_outbox`], one task per server) writes it to the outbox and
//! delivers it. In a fleet the refresh that claims a threshold puts the alert in the shared
//! outbox in the same transaction. Every attempt carries the alert's id as `Idempotency-Key`
//! and the same body; it must be answered 2xx within `[alerts] webhook_timeout` (redirects are
//! not followed: a 3xx is a failure). A failure is logged once, counted in
//! `mantlegate_webhook_failures_total` by reason, and retried after [`retry_delay`]; after a
//! failure the endpoint also rests (a growing pause, whichever alert is next), and an alert not
//! delivered [`GIVE_UP_AFTER`] after it was raised is given up with an error line. The outbox
//! lets one attempt run at a time, so a hung endpoint holds at most one connection, and a row is
//! never attempted by two replicas at once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{Notify, mpsc};

use crate::budget::Alert;
use crate::ledger::outbox::{Claim, Entry, Outbox};
use crate::state::AppState;

/// Delay before the first retry of an alert; doubled after each further failure.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest delay between two attempts at an alert.
pub const MAX_RETRY_DELAY: Duration = Duration::from_mins(10);
/// An alert not delivered this long after it was raised is given up (an error line).
pub const GIVE_UP_AFTER: Duration = Duration::from_hours(24);
/// Longest wait between two looks at the outbox: rows another replica queued, a webhook a
/// reload set, alerts to give up.
const POLL: Duration = Duration::from_secs(5);
/// A claim's lease lasts the attempt's timeout plus this (time to record the outcome): a
/// replica that dies mid-attempt holds the endpoint no longer.
const LEASE_MARGIN: Duration = Duration::from_secs(30);
/// How often alerts past [`GIVE_UP_AFTER`] are looked for.
const EXPIRE_EVERY: Duration = Duration::from_mins(1);
/// After a storage error, the next look at the outbox comes this much later.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// How long a stopping server waits for the dispatcher to put the alerts it holds into the
/// outbox.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// The delay before the next attempt at an alert that has failed `failures` times (counted
/// from 1): 1 s, 2 s, 4 s ... at most [`MAX_RETRY_DELAY`].
#[must_use]
pub fn retry_delay(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    FIRST_RETRY
        .saturating_mul(1 << doublings)
        .min(MAX_RETRY_DELAY)
}

/// The configured endpoint: its URL, which may carry a token, and its host, the only part
/// that is ever logged (`Debug` shows the host alone).
#[derive(Clone)]
pub struct Webhook {
    url: reqwest::Url,
    host: String,
}

impl Webhook {
    /// `url` when it is an http(s) URL with a host.
    #[must_use]
    pub fn parse(url: &str) -> Option<Self> {
        let url = reqwest::Url::parse(url).ok()?;
        if !matches!(url.scheme(), "http" | "https") {
            return None;
        }
        let host = url.host_str().filter(|h| !h.is_empty())?;
        let host = match url.port() {
            Some(port) => format!("{host}:{port}"),
            None => host.to_owned(),
        };
        Some(Self { url, host })
    }

    /// Host (and port, when the URL names one): what logs say of the endpoint.
    #[must_use]
    pub fn host(&self) -> &str {
        &self.host
    }
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// Alerts raised and not yet in the outbox. Calls queue them here without waiting; the
/// dispatcher writes them to the ledger, off the request path. Cheap to clone.
#[derive(Clone)]
pub struct Alerts {
    inner: Arc<Queue>,
}

struct Queue {
    // Unbounded, yet bounded by the config: each threshold of each budget fires once a month.
    tx: mpsc::UnboundedSender<Entry>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Entry>>>,
    /// Rows were put in the outbox directly (a fleet claim): look now.
    wake: Notify,
}

impl Default for Alerts {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Self {
            inner: Arc::new(Queue {
                tx,
                rx: Mutex::new(Some(rx)),
                wake: Notify::new(),
            }),
        }
    }
}

impl Alerts {
    /// Announces a crossed threshold: one `warn` line and, with a `webhook`, the alert queued
    /// for delivery. Never blocks, never awaits.
    pub fn announce(&self, webhook: Option<&Webhook>, alert: &Alert, now_ms: i64) {
        let entry = webhook.map(|_| entry(alert, now_ms));
        log_crossed(alert, entry.as_ref().map(|e| e.id.as_str()));
        if let Some(entry) = entry {
            // Fails only once the dispatcher is gone with its server: nothing to deliver then.
            let _ = self.inner.tx.send(entry);
        }
    }

    /// Tells the dispatcher the outbox has new rows (put there by a fleet claim).
    pub fn wake(&self) {
        self.inner.wake.notify_one();
    }

    fn take_receiver(&self) -> Option<mpsc::UnboundedReceiver<Entry>> {
        self.inner.rx.lock().ok()?.take()
    }
}

/// The webhook body: the alert and its id.
#[derive(Serialize)]
struct Event<'a> {
    id: &'a str,
    #[serde(flatten)]
    alert: &'a Alert,
}

/// The outbox entry of `alert`, raised at `now_ms`: a new id (`mga_`, the time, 80 random
/// bits) and the body every attempt sends, `{"id", ...the alert}`.
#[must_use]
pub fn entry(alert: &Alert, now_ms: i64) -> Entry {
    let call_id = crate::ledger::new_call_id(now_ms);
    let id = format!("mga_{}", call_id.trim_start_matches("mg_"));
    let body = serde_json::to_string(&Event { id: &id, alert }).unwrap_or_default();
    Entry {
        id,
        created_ms: now_ms,
        body,
    }
}

/// The `warn` line of a crossed threshold, with the id its webhook deliveries carry.
pub fn log_crossed(alert: &Alert, alert_id: Option<&str>) {
    tracing::warn!(
        budget = %alert.budget,
        scope = %alert.scope,
        fraction = alert.fraction,
        spend_usd = %alert.spend_usd,
        limit_usd = %alert.limit_usd,
        forecast_usd = %alert.forecast_usd,
        alert_id,
        "budget threshold crossed"
    );
}

/// Why an attempt failed: the `reason` label of `mantlegate_webhook_failures_total`.
#[derive(Debug)]
enum Failure {
    /// No answer within `webhook_timeout` (connecting included).
    Timeout,
    /// The connection could not be made.
    Connect(String),
    /// An answer other than 2xx.
    Status(u16),
    /// The connection broke before an answer.
    Transport(String),
}

impl Failure {
    fn reason(&self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connect(_) => "connect",
            Self::Status(_) => "status",
            Self::Transport(_) => "transport",
        }
    }
}

/// An error and its causes, without the URL (it may carry a token).
fn describe(err: reqwest::Error) -> String {
    let err = err.without_url();
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// One attempt: POST the body with its key; only a 2xx answer within `timeout` delivers it.
/// The answer's body is not read.
async fn send(
    client: &reqwest::Client,
    hook: &Webhook,
    timeout: Duration,
    entry: &Entry,
) -> Result<(), Failure> {
    let response = client
        .post(hook.url.clone())
        .timeout(timeout)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", &entry.id)
        .body(entry.body.clone())
        .send()
        .await;
    match response {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(Failure::Status(r.status().as_u16())),
        Err(e) if e.is_timeout() => Err(Failure::Timeout),
        Err(e) if e.is_connect() => Err(Failure::Connect(describe(e))),
        Err(e) => Err(Failure::Transport(describe(e))),
    }
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// How long to wait for something due at `at_ms`, at most [`POLL`].
fn until(at_ms: i64, now_ms: i64) -> Duration {
    Duration::from_millis(u64::try_from(at_ms.saturating_sub(now_ms)).unwrap_or(0)).min(POLL)
}

/// Delivers the outbox for as long as the server runs: started by [`crate::serve`], which
/// resolves `stop` when it stops; the alerts still in memory are then written to the outbox
/// (within [`STOP_TIMEOUT`]), for the next start to deliver.
pub async fn deliver_outbox(state: AppState, stop: impl std::future::Future<Output = ()>) {
    let Some(mut rx) = state.alerts.take_receiver() else {
        return;
    };
    let mut d = Dispatcher {
        owner: format!("{:016x}", rand::random::<u64>()),
        state,
        queued: Vec::new(),
        store_ok: true,
        endpoint: None,
        endpoint_failures: 0,
        rest_until_ms: 0,
        expired_at: None,
    };
    if let Err(err) = d.store(|o| o.release_stale()).await {
        d.store_failed(&err);
    }
    let queue = d.state.alerts.inner.clone();
    tokio::pin!(stop);
    loop {
        while let Ok(e) = rx.try_recv() {
            d.queued.push(e);
        }
        let wait = tokio::select! {
            wait = d.round() => wait,
            () = &mut stop => break,
        };
        tokio::select! {
            Some(e) = rx.recv() => d.queued.push(e),
            () = queue.wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
            () = &mut stop => break,
        }
    }
    while let Ok(e) = rx.try_recv() {
        d.queued.push(e);
    }
    d.save_at_stop().await;
}

/// The dispatcher's state between rounds.
struct Dispatcher {
    state: AppState,
    /// Names this dispatcher's leases.
    owner: String,
    /// Alerts taken from the queue, not yet in the outbox.
    queued: Vec<Entry>,
    /// Whether the outbox answered last time (its failures are logged once).
    store_ok: bool,
    /// The endpoint the failures below are about (a reload may change it).
    endpoint: Option<String>,
    /// Failed attempts at the endpoint in a row.
    endpoint_failures: u32,
    /// After a failure, no attempt before this (Unix ms).
    rest_until_ms: i64,
    /// When alerts to give up were last looked for.
    expired_at: Option<tokio::time::Instant>,
}

impl Dispatcher {
    /// Runs `f` on the outbox from a blocking thread.
    async fn store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Outbox) -> anyhow::Result<T> + Send + 'static,
    ) -> anyhow::Result<T> {
        let outbox = self.state.outbox.clone();
        tokio::task::spawn_blocking(move || f(&*outbox)).await?
    }

    fn store_failed(&mut self, err: &anyhow::Error) {
        if self.store_ok {
            self.store_ok = false;
            tracing::warn!(error = %format!("{err:#}"), "cannot reach the webhook outbox in the ledger: alerts wait in memory and are delivered once it answers");
        }
    }

    fn store_answered(&mut self) {
        if !self.store_ok {
            self.store_ok = true;
            tracing::info!("webhook outbox reachable again");
        }
    }

    /// Puts the queued alerts in the outbox, gives up the expired ones, and makes the next
    /// attempt when one is due; returns how long to wait before the next round.
    async fn round(&mut self) -> Duration {
        if !self.queued.is_empty() {
            let entries = self.queued.clone();
            match self.store(move |o| o.add(&entries)).await {
                Ok(()) => {
                    self.queued.clear();
                    self.store_answered();
                }
                Err(err) => {
                    self.store_failed(&err);
                    return STORE_RETRY;
                }
            }
        }
        let snap = self.state.snapshot.load_full();
        let now = now_ms();
        if self
            .expired_at
            .is_none_or(|at| at.elapsed() >= EXPIRE_EVERY)
        {
            self.expire(&snap, now).await;
        }
        let Some(hook) = snap.alert_webhook.clone() else {
            return POLL;
        };
        if self.endpoint.as_deref() != Some(hook.url.as_str()) {
            // A new endpoint owes nothing to the old one's failures.
            self.endpoint = Some(hook.url.to_string());
            self.endpoint_failures = 0;
            self.rest_until_ms = 0;
        }
        if now < self.rest_until_ms {
            return until(self.rest_until_ms, now);
        }
        let timeout = snap.alert_timeout;
        let lease_until = now.saturating_add(ms(timeout + LEASE_MARGIN));
        let owner = self.owner.clone();
        let claim = match self.store(move |o| o.claim(&owner, now, lease_until)).await {
            Ok(claim) => claim,
            Err(err) => {
                self.store_failed(&err);
                return STORE_RETRY;
            }
        };
        self.store_answered();
        match claim {
            Claim::Row { entry, attempt } => {
                self.attempt(&hook, timeout, entry, attempt).await;
                Duration::ZERO
            }
            // Never a busy loop on a lease that ends now.
            Claim::Busy { until_ms } => until(until_ms, now).max(Duration::from_millis(10)),
            Claim::Idle { next_ms } => next_ms.map_or(POLL, |at| until(at, now)),
        }
    }

    /// Gives up the alerts raised more than [`GIVE_UP_AFTER`] ago (an error line each).
    async fn expire(&mut self, snap: &crate::state::Snapshot, now: i64) {
        let before = now - ms(GIVE_UP_AFTER);
        match self.store(move |o| o.expire(before, now)).await {
            Ok(gone) => {
                self.expired_at = Some(tokio::time::Instant::now());
                self.store_answered();
                for e in gone {
                    self.state.metrics.webhook_given_up();
                    tracing::error!(
                        alert_id = %e.id,
                        host = snap.alert_webhook.as_ref().map(Webhook::host),
                        body = %e.body,
                        "budget alert webhook given up: not delivered within 24 h"
                    );
                }
            }
            Err(err) => self.store_failed(&err),
        }
    }

    /// Attempts `entry` (attempt number `attempt`) and records the outcome in the outbox.
    async fn attempt(&mut self, hook: &Webhook, timeout: Duration, entry: Entry, attempt: u32) {
        let outcome = send(&self.state.client, hook, timeout, &entry).await;
        let now = now_ms();
        let id = entry.id;
        match outcome {
            Ok(()) => {
                self.endpoint_failures = 0;
                self.rest_until_ms = 0;
                self.state.metrics.webhook_delivered();
                tracing::info!(alert_id = %id, host = %hook.host(), attempt, "budget alert delivered");
                let done = id.clone();
                if let Err(err) = self.store(move |o| o.delivered(&done)).await {
                    tracing::warn!(alert_id = %id, error = %format!("{err:#}"), "budget alert delivered but still in the webhook outbox: it may be sent again, with the same Idempotency-Key");
                }
            }
            Err(failure) => {
                self.state.metrics.webhook_failed(failure.reason());
                self.endpoint_failures = self.endpoint_failures.saturating_add(1);
                self.rest_until_ms = now.saturating_add(ms(retry_delay(self.endpoint_failures)));
                let delay = retry_delay(attempt);
                let next = now.saturating_add(ms(delay));
                let (status, error) = match &failure {
                    Failure::Status(s) => (Some(*s), None),
                    Failure::Connect(e) | Failure::Transport(e) => (None, Some(e.as_str())),
                    Failure::Timeout => (None, None),
                };
                tracing::warn!(
                    alert_id = %id,
                    host = %hook.host(),
                    attempt,
                    reason = failure.reason(),
                    status,
                    error,
                    retry_in_ms = ms(delay),
                    "budget alert webhook failed"
                );
                let owner = self.owner.clone();
                if let Err(err) = self.store(move |o| o.failed(&id, &owner, next)).await {
                    // The lease ends on its own; the alert is retried then.
                    self.store_failed(&err);
                }
            }
        }
    }

    /// At stop: the alerts still in memory go to the outbox for the next start, or, if it
    /// cannot take them, into the log whole.
    async fn save_at_stop(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        let entries = std::mem::take(&mut self.queued);
        let saving = entries.clone();
        let saved = tokio::time::timeout(STOP_TIMEOUT, self.store(move |o| o.add(&saving))).await;
        if !matches!(saved, Ok(Ok(()))) {
            for e in entries {
                tracing::error!(alert_id = %e.id, body = %e.body, "budget alert not delivered: the webhook outbox could not take it at shutdown");
            }
        }
    }
}

/// Runs the dispatcher beside a server: [`crate::serve`] calls [`Running::stop`] when it stops.
pub(crate) struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Starts [`deliver_outbox`] over `state`.
    pub(crate) fn start(state: AppState) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(deliver_outbox(state, async move {
            let _ = stopped.await;
        }));
        Self {
            stop: Some(stop),
            task,
        }
    }

    /// Stops the dispatcher (an attempt in flight is dropped, retried at the next start) and
    /// waits for it to save the alerts it holds.
    pub(crate) async fn stop(mut self) {
        drop(self.stop.take());
        let deadline = STOP_TIMEOUT + Duration::from_secs(1);
        if tokio::time::timeout(deadline, &mut self.task)
            .await
            .is_err()
        {
            self.task.abort();
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_from_one_second_to_ten_minutes() {
        let delays: Vec<u64> = (1..=12).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]);
        assert!(
            retry_delay(1) <= Duration::from_secs(10),
            "first retry within 10 s"
        );
        assert_eq!(retry_delay(0), FIRST_RETRY);
        assert_eq!(retry_delay(u32::MAX), MAX_RETRY_DELAY);
    }

    #[test]
    fn a_day_of_backoff_keeps_retrying_past_the_first_hour() {
        // When each attempt of an alert that never gets through starts, from 0 until
        // GIVE_UP_AFTER.
        let mut starts = vec![Duration::ZERO];
        loop {
            let failures = u32::try_from(starts.len()).expect("few");
            let next = starts[starts.len() - 1] + retry_delay(failures);
            if next >= GIVE_UP_AFTER {
                break;
            }
            starts.push(next);
        }
        let in_first_hour = starts
            .iter()
            .filter(|t| **t <= Duration::from_hours(1))
            .count();
        assert_eq!(
            in_first_hour, 15,
            "the first and 10 retries within 17 min, then one every 10 min"
        );
        assert_eq!(starts[10], Duration::from_secs(1023));
        assert_eq!(starts.len(), 153, "a day of attempts");
        let last = starts[starts.len() - 1];
        assert!(
            last + MAX_RETRY_DELAY >= GIVE_UP_AFTER,
            "the last within 10 min of giving up"
        );
    }

    #[test]
    fn the_webhook_shows_only_its_host() {
        let hook = Webhook::parse("https://user:pass@hooks.example.com:8443/t/SECRET?token=abc")
            .expect("url");
        assert_eq!(hook.host(), "hooks.example.com:8443");
        let debug = format!("{hook:?}");
        assert!(!debug.contains("SECRET") && !debug.contains("abc") && !debug.contains("pass"));
        assert_eq!(
            Webhook::parse("http://hooks.example.com/x")
                .expect("url")
                .host(),
            "hooks.example.com"
        );
        for bad in [
            "ftp://h/x",
            "not a url",
            "mailto:a@b",
            "https://",
            "file:///etc/passwd",
        ] {
            assert!(Webhook::parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn an_entry_carries_its_id_in_the_body() {
        let alert = Alert {
            budget: "b".to_owned(),
            scope: "project p".to_owned(),
            limit_usd: "10".to_owned(),
            spend_usd: "5".to_owned(),
            fraction: 0.5,
            forecast_usd: "12".to_owned(),
            month: "2026-12".to_owned(),
            timezone: "UTC".to_owned(),
        };
        let e = entry(&alert, 1_800_000_000_000);
        assert!(e.id.starts_with("mga_") && e.id.len() == 4 + 32, "{}", e.id);
        assert_ne!(e.id, entry(&alert, 1_800_000_000_000).id);
        let body: serde_json::Value = serde_json::from_str(&e.body).expect("json");
        assert_eq!(body["id"], e.id.as_str());
        assert_eq!(body["budget"], "b");
        assert_eq!(body["fraction"], 0.5);
        assert_eq!(e.created_ms, 1_800_000_000_000);
    }
}
