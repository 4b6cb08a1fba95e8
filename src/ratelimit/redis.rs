//! The Redis rate-limit store: the GCRA of every replica in one versioned Lua script, on the server's clock.
//!
//! `[limits] store = "redis://..."` makes the fleet share its rate limits: each call's cells
//! (its project's and its key's, requests and tokens) are taken in **one** round trip, by the
//! script `mantlegate_rl_v1` ([`SCRIPT`]), all or nothing, atomically (Redis runs one script at
//! a time). The script reads the Redis server's `TIME`, so the replicas' clocks never matter.
//! It is sent as `EVALSHA` of its SHA-1 and loaded (`SCRIPT LOAD`) when Redis answers
//! `NOSCRIPT` (after a restart or a failover): the code that runs is always exactly the text
//! compiled into this binary.
//!
//! **Keys** name the rule, not its position in the config, so they are the same on every
//! replica and across reloads: `mantlegate:rl:{v1}:project:CustomerChatbot-Prod:requests:600`
//! ([`cell_keys`]). A rule whose limit changes gets a new key, i.e. a full bucket (as a new
//! in-memory limiter would). Every key expires 120 s (twice the one-minute window) after its
//! TAT. The `{v1}` hash tag puts all of a version's keys in one Redis Cluster slot, so a call's
//! project and key cells may be taken by one script; this client speaks to a standalone Redis
//! or Valkey (or a managed primary endpoint), not to a cluster.
//!
//! **Versions**: the script and the key prefix carry the same version, and the script refuses
//! any key outside its prefix. A mantlegate with other semantics ships `mantlegate_rl_v2` over
//! `mantlegate:rl:{v2}:`: during a rolling upgrade the old and the new replicas count apart
//! (each side holds the limit; the fleet at most twice it, until the upgrade ends), and never
//! apply two semantics to one counter.
//!
//! **Failure** (Redis unreachable, slower than [`RedisOptions::timeout`], or answering an
//! error): fail open. The call is decided by the limiter's in-memory store, i.e. the limits hold
//! per replica, never off. That store never starts full: it follows every answer of Redis (a
//! cell's TAT seen here) and starts empty, so an outage goes on from the fleet's last known
//! budget and N replicas admit at most N times a limit per minute of it; [`RedisStats::fallbacks`] counts those calls, one `error` line marks
//! the outage, a `warn` line each minute it lasts, an `info` line its end. While down, calls do
//! not wait for Redis: it is probed in the background every [`RedisOptions::retry_every`], and
//! used again once it answers. Settling a call admitted by Redis (the token correction) is sent
//! in the background after the call; if that fails the estimate stays charged.

use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{Client, Script};
use tokio::runtime::Handle;

use super::{AsyncRateStore, Denied, RateLimiter, RateRule, StoreError, StoreFuture, Take};

/// The version of the script and of the keys it owns.
pub const VERSION: &str = "v1";

/// The script's name: its first line, its `ping` answer, and its error prefix.
pub const SCRIPT_NAME: &str = "mantlegate_rl_v1";

/// Every key of this version starts with this; the script touches no other.
pub const KEY_PREFIX: &str = "mantlegate:rl:{v1}:";

/// The Lua source of `mantlegate_rl_v1` (its header documents the protocol).
pub const SCRIPT: &str = include_str!("redis_v1.lua");

/// Increments, bursts and deltas sent to the script are clamped to this many nanoseconds
/// (about 13 days) so that they stay exact in Lua's doubles.
const MAX_NS: u64 = 1 << 50;

/// How often a long outage is logged again.
const WARN_EVERY: Duration = Duration::from_mins(1);

/// What a rule limits: a project or a key, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// A `[[rate_limits]]` entry with `project = "..."`.
    Project,
    /// A `[[rate_limits]]` entry with `key = "..."`.
    Key,
}

impl Scope {
    fn name(self) -> &'static str {
        match self {
            Scope::Project => "project",
            Scope::Key => "key",
        }
    }
}

/// A rule's identity, the same on every replica: what it limits and how much. Build one per
/// `[[rate_limits]]` entry, in config order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleIdentity<'a> {
    /// A project's limit or a key's.
    pub scope: Scope,
    /// The project's or the key's name.
    pub name: &'a str,
    /// The limits.
    pub rule: RateRule,
}

/// The Redis key of one cell, e.g. `mantlegate:rl:{v1}:project:CustomerChatbot-Prod:requests:600`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CellKey(Arc<str>);

impl CellKey {
    /// The key.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CellKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The identities of `[[rate_limits]]` entries, in config order (rule `i` = entry `i`, as in
/// the limiter). An entry names a project or a key (validation makes it exactly one).
#[must_use]
pub fn rule_identities(entries: &[crate::config::RateLimitConfig]) -> Vec<RuleIdentity<'_>> {
    entries
        .iter()
        .map(|entry| {
            let (scope, name) = match (&entry.project, &entry.key) {
                (Some(project), _) => (Scope::Project, project.as_str()),
                (None, Some(key)) => (Scope::Key, key.as_str()),
                (None, None) => (Scope::Project, ""),
            };
            RuleIdentity {
                scope,
                name,
                rule: RateRule {
                    requests_per_minute: entry.requests_per_minute,
                    tokens_per_minute: entry.tokens_per_minute,
                },
            }
        })
        .collect()
}

/// The keys of the cells of `rules` (indexed like a limiter's: `2 × rule` requests, `2 × rule +
/// 1` tokens; `None` for a dimension the rule does not limit).
///
/// `KEY_PREFIX` + scope + name + dimension + limit; a name is kept as it is except for bytes
/// outside `A-Z a-z 0-9 . _ -`, written `%XX`, so no name can pass for another. Two entries with
/// the same identity (the same limit on the same project, twice) are two cells, as they are in
/// memory: the second gets `:2`, the third `:3`.
#[must_use]
pub fn cell_keys(rules: &[RuleIdentity<'_>]) -> Vec<Option<CellKey>> {
    let mut keys: Vec<Option<CellKey>> = Vec::with_capacity(rules.len() * 2);
    for r in rules {
        for (dim, limit) in [
            ("requests", r.rule.requests_per_minute),
            ("tokens", r.rule.tokens_per_minute),
        ] {
            let key = limit.map(|limit| {
                let base = format!(
                    "{KEY_PREFIX}{}:{}:{dim}:{limit}",
                    r.scope.name(),
                    encode_name(r.name)
                );
                let mut key = base.clone();
                let mut n = 1;
                while keys.iter().flatten().any(|k| k.as_str() == key) {
                    n += 1;
                    key = format!("{base}:{n}");
                }
                CellKey(key.into())
            });
            keys.push(key);
        }
    }
    keys
}

/// `name` with every byte outside `A-Z a-z 0-9 . _ -` written `%XX`.
fn encode_name(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-') {
            out.push(char::from(b));
        } else {
            // Writing to a String cannot fail.
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Timeouts of a [`RedisBackend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedisOptions {
    /// The longest a call waits for Redis before it is decided locally; Redis is then
    /// considered down until a background probe succeeds. Default 100 ms.
    pub timeout: Duration,
    /// How often a down Redis is probed (connection and script). Default 1 s.
    pub retry_every: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_millis(100),
            retry_every: Duration::from_secs(1),
        }
    }
}

/// The health of a [`RedisBackend`], for metrics: read at scrape time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RedisStats {
    /// Whether Redis answered the last time it was asked.
    pub up: bool,
    /// Calls decided by the in-memory fallback (per replica) because Redis failed or was down.
    pub fallbacks: u64,
    /// Token corrections (settles) not applied because Redis failed or was down.
    pub adjusts_dropped: u64,
    /// Times Redis went from up to down.
    pub outages: u64,
}

/// One connection to Redis (multiplexed, reconnecting) and its health, for the whole process:
/// build it once at start and make a [`RedisStore`] of it for each set of rules (each reload).
#[derive(Clone)]
pub struct RedisBackend {
    inner: Arc<Backend>,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("url", &self.inner.url)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

struct Backend {
    /// The URL, password hidden.
    url: String,
    conn: ConnectionManager,
    script: Script,
    options: RedisOptions,
    /// Where settles and probes run.
    runtime: Handle,
    /// Time zero of the `*_ns` fields.
    base: Instant,
    down: AtomicBool,
    probing: AtomicBool,
    /// When the next probe may start (ns since `base`).
    retry_at_ns: AtomicU64,
    /// When the outage was last logged (ns since `base`).
    warned_at_ns: AtomicU64,
    fallbacks: AtomicU64,
    adjusts_dropped: AtomicU64,
    outages: AtomicU64,
}

impl RedisBackend {
    /// A backend for `url`, connecting in the background: it fails on a malformed URL (or one
    /// this build cannot serve), never because Redis is down. Must be called inside a Tokio
    /// runtime, which then runs its connection, probes and settles.
    pub fn connect(url: &str, options: RedisOptions) -> Result<Self, StoreError> {
        let runtime = Handle::try_current()
            .map_err(|_| StoreError::Failed("the Redis store needs a Tokio runtime".into()))?;
        let described = crate::config::describe_store_url(url).map_err(StoreError::Failed)?;
        let client = Client::open(url).map_err(|e| StoreError::Failed(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.timeout.max(Duration::from_secs(2))))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| StoreError::Failed(e.to_string()))?;
        let backend = Arc::new(Backend {
            url: described,
            conn,
            script: Script::new(SCRIPT),
            options,
            runtime,
            base: Instant::now(),
            down: AtomicBool::new(false),
            probing: AtomicBool::new(true),
            retry_at_ns: AtomicU64::new(0),
            warned_at_ns: AtomicU64::new(0),
            fallbacks: AtomicU64::new(0),
            adjusts_dropped: AtomicU64::new(0),
            outages: AtomicU64::new(0),
        });
        // Warm the connection and load the script before the first call needs them.
        backend.runtime.spawn(Arc::clone(&backend).probe());
        Ok(Self { inner: backend })
    }

    /// A store over this connection for the cells `keys` (from [`cell_keys`]).
    #[must_use]
    pub fn store(&self, keys: Vec<Option<CellKey>>) -> RedisStore {
        RedisStore {
            backend: Arc::clone(&self.inner),
            keys: keys.into(),
        }
    }

    /// A limiter over `rules` whose state is in Redis (and in memory while Redis fails): the
    /// limiter of a config with `[limits] store`, e.g. of
    /// `rule_identities(&config.rate_limits)`.
    #[must_use]
    pub fn limiter(&self, rules: &[RuleIdentity<'_>]) -> RateLimiter {
        let store = self.store(cell_keys(rules));
        RateLimiter::with_shared_store(rules.iter().map(|r| r.rule).collect(), Arc::new(store))
    }

    /// Asks Redis to run the script's `ping` (connecting and loading it if need be), within
    /// twice the timeout or 2 s, whichever is longer: for a start-up line, and for tests.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let backend = &self.inner;
        match backend
            .call::<String>(&mut backend.invocation("ping"), backend.probe_timeout())
            .await
        {
            Ok(_) => {
                backend.recovered();
                Ok(())
            }
            Err(e) => {
                backend.failed(&e);
                Err(e)
            }
        }
    }

    /// The URL, password hidden.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// Health counters, for metrics.
    #[must_use]
    pub fn stats(&self) -> RedisStats {
        let b = &self.inner;
        RedisStats {
            up: !b.down.load(Ordering::Acquire),
            fallbacks: b.fallbacks.load(Ordering::Relaxed),
            adjusts_dropped: b.adjusts_dropped.load(Ordering::Relaxed),
            outages: b.outages.load(Ordering::Relaxed),
        }
    }
}

impl Backend {
    fn since_base_ns(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn probe_timeout(&self) -> Duration {
        (self.options.timeout * 2).max(Duration::from_secs(2))
    }

    /// A fresh invocation of the script's operation `op`.
    fn invocation(&self, op: &str) -> ::redis::ScriptInvocation<'_> {
        let mut invocation = self.script.prepare_invoke();
        invocation.arg(op);
        invocation
    }

    /// Runs `invocation` (`EVALSHA`, loading the script on `NOSCRIPT`) within `timeout`.
    async fn call<T: ::redis::FromRedisValue>(
        &self,
        invocation: &mut ::redis::ScriptInvocation<'_>,
        timeout: Duration,
    ) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(timeout, invocation.invoke_async::<T>(&mut conn)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(StoreError::Failed(e.to_string())),
            Err(_) => Err(StoreError::Failed(format!(
                "no answer within {} ms",
                timeout.as_millis()
            ))),
        }
    }

    /// Whether to ask Redis now. While it is down: no, and a background probe is started when
    /// one is due.
    fn usable(self: &Arc<Self>) -> bool {
        if !self.down.load(Ordering::Acquire) {
            return true;
        }
        let now = self.since_base_ns();
        if now >= self.retry_at_ns.load(Ordering::Acquire)
            && !self.probing.swap(true, Ordering::AcqRel)
        {
            self.runtime.spawn(Arc::clone(self).probe());
        }
        let warned = self.warned_at_ns.load(Ordering::Relaxed);
        let every = u64::try_from(WARN_EVERY.as_nanos()).unwrap_or(u64::MAX);
        if now.saturating_sub(warned) >= every
            && self
                .warned_at_ns
                .compare_exchange(warned, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                store = %self.url,
                fallbacks = self.fallbacks.load(Ordering::Relaxed),
                "rate-limit store still unreachable: rate limits hold per replica"
            );
        }
        false
    }

    /// Records a failure: Redis is down until a probe succeeds, `retry_every` from now.
    fn failed(&self, error: &StoreError) {
        let retry = u64::try_from(self.options.retry_every.as_nanos()).unwrap_or(u64::MAX);
        let now = self.since_base_ns();
        self.retry_at_ns
            .store(now.saturating_add(retry), Ordering::Release);
        if !self.down.swap(true, Ordering::AcqRel) {
            self.outages.fetch_add(1, Ordering::Relaxed);
            self.warned_at_ns.store(now, Ordering::Relaxed);
            tracing::error!(
                store = %self.url,
                %error,
                "rate-limit store failed: rate limits hold per replica until it answers again"
            );
        }
    }

    /// Records a probe's answer: Redis is up. (Only probes bring it back: calls are not sent
    /// while it is down, and one that was in flight when it went down proves little.)
    fn recovered(&self) {
        if self.down.load(Ordering::Acquire) && self.down.swap(false, Ordering::AcqRel) {
            tracing::info!(
                store = %self.url,
                fallbacks = self.fallbacks.load(Ordering::Relaxed),
                "rate-limit store answers again: rate limits hold across the fleet"
            );
        }
    }

    /// One background probe: the script's `ping`.
    async fn probe(self: Arc<Self>) {
        match self
            .call::<String>(&mut self.invocation("ping"), self.probe_timeout())
            .await
        {
            Ok(_) => self.recovered(),
            Err(e) => self.failed(&e),
        }
        self.probing.store(false, Ordering::Release);
    }
}

/// A [`RedisBackend`]'s view of one set of rules: the [`AsyncRateStore`] of a
/// [`RateLimiter::with_shared_store`](super::RateLimiter::with_shared_store).
#[derive(Clone)]
pub struct RedisStore {
    backend: Arc<Backend>,
    /// Key of each cell; a cell without one limits nothing.
    keys: Arc<[Option<CellKey>]>,
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("url", &self.backend.url)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    fn key(&self, cell: usize) -> Option<&CellKey> {
        self.keys.get(cell).and_then(Option::as_ref)
    }

    /// The call's failure: counted, and Redis marked down.
    fn fallback(&self, error: StoreError) -> StoreError {
        self.backend.fallbacks.fetch_add(1, Ordering::Relaxed);
        if matches!(error, StoreError::Failed(_)) {
            self.backend.failed(&error);
        }
        error
    }

    async fn acquire_in(
        &self,
        takes: &[Take],
        ahead: &mut [u64],
    ) -> Result<Result<(), Denied>, StoreError> {
        if !self.backend.usable() {
            return Err(self.fallback(StoreError::Unavailable));
        }
        let mut invocation = self.backend.invocation("acquire");
        // Positions in `takes` of the cells that have a key; the others limit nothing.
        let mut sent = Vec::with_capacity(takes.len());
        for (i, take) in takes.iter().enumerate() {
            ahead[i] = 0;
            if let Some(key) = self.key(take.cell) {
                invocation
                    .key(key.as_str())
                    .arg(take.increment_ns.min(MAX_NS))
                    .arg(take.burst_ns.min(MAX_NS));
                sent.push(i);
            }
        }
        if sent.is_empty() {
            return Ok(Ok(()));
        }
        let reply: Vec<i64> = self
            .backend
            .call(&mut invocation, self.backend.options.timeout)
            .await
            .map_err(|e| self.fallback(e))?;
        let (Some(&status), Some(&index), Some(&wait), Some(values)) =
            (reply.first(), reply.get(1), reply.get(2), reply.get(3..))
        else {
            return Err(self.fallback(StoreError::Failed(format!(
                "{SCRIPT_NAME} answered {} values to acquire",
                reply.len()
            ))));
        };
        if values.len() != sent.len() {
            return Err(self.fallback(StoreError::Failed(format!(
                "{SCRIPT_NAME} answered {} cells for {}",
                values.len(),
                sent.len()
            ))));
        }
        for (&i, &value) in sent.iter().zip(values) {
            ahead[i] = u64::try_from(value).unwrap_or(0);
        }
        if status == 1 {
            return Ok(Ok(()));
        }
        let index = usize::try_from(index)
            .ok()
            .and_then(|k| sent.get(k).copied())
            .unwrap_or(0);
        Ok(Err(Denied {
            index,
            wait_ns: u64::try_from(wait).unwrap_or(0),
        }))
    }

    async fn peek_in(&self, cell: usize) -> Result<u64, StoreError> {
        let Some(key) = self.key(cell) else {
            return Ok(0);
        };
        if !self.backend.usable() {
            return Err(StoreError::Unavailable);
        }
        let mut invocation = self.backend.invocation("peek");
        invocation.key(key.as_str());
        let reply: Vec<i64> = match self
            .backend
            .call(&mut invocation, self.backend.options.timeout)
            .await
        {
            Ok(reply) => reply,
            Err(e) => {
                self.backend.failed(&e);
                return Err(e);
            }
        };
        Ok(reply
            .first()
            .and_then(|&v| u64::try_from(v).ok())
            .unwrap_or(0))
    }
}

impl AsyncRateStore for RedisStore {
    fn acquire<'a>(
        &'a self,
        takes: &'a [Take],
        _now_ns: u64,
        ahead: &'a mut [u64],
    ) -> StoreFuture<'a, Result<(), Denied>> {
        Box::pin(self.acquire_in(takes, ahead))
    }

    fn adjust(&self, cell: usize, delta_ns: i64, _now_ns: u64) {
        let Some(key) = self.key(cell) else {
            return;
        };
        if delta_ns == 0 {
            return;
        }
        let backend = Arc::clone(&self.backend);
        if !backend.usable() {
            backend.adjusts_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let max = i64::try_from(MAX_NS).unwrap_or(i64::MAX);
        let delta = delta_ns.clamp(-max, max);
        let key = key.clone();
        self.backend.runtime.spawn(async move {
            let mut invocation = backend.invocation("adjust");
            invocation.key(key.as_str()).arg(delta);
            match backend
                .call::<i64>(&mut invocation, backend.options.timeout)
                .await
            {
                Ok(_) => {}
                Err(e) => {
                    backend.adjusts_dropped.fetch_add(1, Ordering::Relaxed);
                    backend.failed(&e);
                }
            }
        });
    }

    fn peek(&self, cell: usize, _now_ns: u64) -> StoreFuture<'_, u64> {
        Box::pin(self.peek_in(cell))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(scope: Scope, name: &str, rpm: Option<u64>, tpm: Option<u64>) -> RuleIdentity<'_> {
        RuleIdentity {
            scope,
            name,
            rule: RateRule {
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
            },
        }
    }

    fn strs(keys: &[Option<CellKey>]) -> Vec<Option<&str>> {
        keys.iter()
            .map(|k| k.as_ref().map(CellKey::as_str))
            .collect()
    }

    #[test]
    fn keys_name_the_rule_not_its_index() {
        let keys = cell_keys(&[
            id(
                Scope::Project,
                "CustomerChatbot-Prod",
                Some(600),
                Some(200_000),
            ),
            id(Scope::Key, "ci-bot", None, Some(5000)),
        ]);
        assert_eq!(
            strs(&keys),
            [
                Some("mantlegate:rl:{v1}:project:CustomerChatbot-Prod:requests:600"),
                Some("mantlegate:rl:{v1}:project:CustomerChatbot-Prod:tokens:200000"),
                None,
                Some("mantlegate:rl:{v1}:key:ci-bot:tokens:5000"),
            ]
        );
        // Reordered config: each rule keeps its keys.
        let reordered = cell_keys(&[
            id(Scope::Key, "ci-bot", None, Some(5000)),
            id(
                Scope::Project,
                "CustomerChatbot-Prod",
                Some(600),
                Some(200_000),
            ),
        ]);
        assert_eq!(reordered[1], keys[3]);
        assert_eq!(reordered[2], keys[0]);
    }

    #[test]
    fn names_cannot_pass_for_one_another() {
        let keys = cell_keys(&[
            id(Scope::Project, "a:requests:1", Some(5), None),
            id(Scope::Project, "a", Some(1), None),
            id(Scope::Project, "team {x} ü", Some(5), None),
        ]);
        assert_eq!(
            strs(&keys),
            [
                Some("mantlegate:rl:{v1}:project:a%3Arequests%3A1:requests:5"),
                None,
                Some("mantlegate:rl:{v1}:project:a:requests:1"),
                None,
                Some("mantlegate:rl:{v1}:project:team%20%7Bx%7D%20%C3%BC:requests:5"),
                None,
            ]
        );
        for key in keys.iter().flatten() {
            assert!(key.as_str().starts_with(KEY_PREFIX));
        }
    }

    #[test]
    fn the_same_limit_twice_is_two_cells() {
        let keys = cell_keys(&[
            id(Scope::Project, "p", Some(600), None),
            id(Scope::Project, "p", Some(600), None),
            id(Scope::Key, "p", Some(600), None),
            id(Scope::Project, "p", Some(600), None),
        ]);
        assert_eq!(
            strs(&keys),
            [
                Some("mantlegate:rl:{v1}:project:p:requests:600"),
                None,
                Some("mantlegate:rl:{v1}:project:p:requests:600:2"),
                None,
                Some("mantlegate:rl:{v1}:key:p:requests:600"),
                None,
                Some("mantlegate:rl:{v1}:project:p:requests:600:3"),
                None,
            ]
        );
    }

    #[test]
    fn identities_come_from_the_config_entries_in_order() {
        let entries = [
            crate::config::RateLimitConfig {
                project: Some("CustomerChatbot-Prod".into()),
                key: None,
                requests_per_minute: Some(600),
                tokens_per_minute: None,
            },
            crate::config::RateLimitConfig {
                project: None,
                key: Some("ci-bot".into()),
                requests_per_minute: None,
                tokens_per_minute: Some(5000),
            },
        ];
        let ids = rule_identities(&entries);
        assert_eq!(
            ids,
            [
                id(Scope::Project, "CustomerChatbot-Prod", Some(600), None),
                id(Scope::Key, "ci-bot", None, Some(5000)),
            ]
        );
        assert_eq!(
            strs(&cell_keys(&ids)),
            [
                Some("mantlegate:rl:{v1}:project:CustomerChatbot-Prod:requests:600"),
                None,
                None,
                Some("mantlegate:rl:{v1}:key:ci-bot:tokens:5000"),
            ]
        );
    }

    #[test]
    fn the_script_is_named_and_versioned() {
        assert!(SCRIPT.starts_with(&format!("-- {SCRIPT_NAME}:")));
        assert!(SCRIPT.contains(&format!("local NAME = '{SCRIPT_NAME}'")));
        assert!(SCRIPT.contains(&format!("local PREFIX = '{KEY_PREFIX}'")));
        assert!(SCRIPT_NAME.ends_with(VERSION));
        assert!(KEY_PREFIX.contains(&format!("{{{VERSION}}}")));
    }
}
