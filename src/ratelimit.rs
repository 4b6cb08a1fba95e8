//! Request and token rate limits per project or key (GCRA), and their `x-ratelimit-*` headers.
//!
//! Why GCRA (the generic cell rate algorithm) rather than a window or a crate: a scope's whole
//! state is one number, its *theoretical arrival time* (TAT: when the bucket would be full again
//! if nothing more came), so admission is O(1) in time and memory and exact to the nanosecond; it
//! is a token bucket without a refill task and without the boundary double burst of fixed
//! windows (a full minute's allowance at 0:59 and another at 1:00). The one number is updated
//! with a compare-exchange loop here ([`MemoryStore`]), or by a Lua script in Redis when the
//! limits must hold across a fleet ([`redis::RedisStore`], an [`AsyncRateStore`]: see
//! [`RateLimiter::acquire_async`]).
//!
//! Each rule has up to two cells, requests (cost 1 per call) and tokens (cost = input + output
//! tokens), each with burst = one minute's allowance: `requests_per_minute = 600` lets 600
//! through at once, then one every 100 ms. A cell's *emission interval* is `60 s / limit`, rounded
//! up to the nanosecond (so the bucket never refills faster than the limit); its burst window is
//! `limit × interval`, so exactly `limit` fit into a full bucket. A call is admitted when its
//! new TAT, `max(TAT, now) + cost × interval`, is at most `now + burst`.
//!
//! A call falls under every rule that applies to it (its project's and its key's) and takes from
//! all their cells or from none: cells are taken one by one and, when one refuses, the ones
//! already taken are given back. That never admits more than a limit; a call racing with one that
//! is rolled back may be refused for capacity that comes back a moment later (conservative).
//!
//! Tokens are charged at admission with an estimate and corrected when the call ends
//! ([`Admission::settle`]): `(actual − estimate) × interval` is added to the tokens TAT. A debt is
//! kept in full, even past the burst window (the tokens were spent: later calls wait for it). A
//! refund never lowers the TAT below `now`: a TAT at or before `now` already means "full", so
//! going lower would let the next minute take more than its allowance.
//!
//! A call whose estimate alone is more than a rule's whole minute of tokens could never fit. It
//! is admitted only into a *full* bucket (and leaves it in debt for the excess), otherwise refused
//! with `retry_after` = the time until the bucket is full. Refusing it for good would stop calls
//! whose estimate (a generous `max_tokens`) is far above what they will use; retrying it after a
//! fixed delay would loop forever. The price: under steady traffic on that scope the bucket may
//! rarely be full, so such a call waits for a quiet moment.

pub mod redis;

use std::fmt::{self, Write as _};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::http::{HeaderMap, HeaderName, HeaderValue};

/// Nanoseconds in a minute, the period every limit is expressed in.
const MINUTE_NS: u64 = 60_000_000_000;

/// Calls under at most this many rules use stack buffers (no allocation on the request path).
const INLINE_RULES: usize = 4;

/// One configured limit, as parsed from a `[[rate_limits]]` entry. Which calls it applies to
/// (a project, a key) is the caller's business: rules are referred to by their index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateRule {
    /// Calls per minute, with a burst of one minute's allowance. `Some(0)` refuses every call.
    pub requests_per_minute: Option<u64>,
    /// Input + output tokens per minute, with a burst of one minute's allowance.
    /// `Some(0)` refuses every call.
    pub tokens_per_minute: Option<u64>,
}

/// The two dimensions a rule limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dim {
    Requests,
    Tokens,
}

impl Dim {
    fn name(self) -> &'static str {
        match self {
            Dim::Requests => "requests",
            Dim::Tokens => "tokens",
        }
    }
}

/// Cell index of a rule's dimension in a [`RateStore`]: `2 × rule` (requests), `2 × rule + 1`
/// (tokens).
fn cell_of(rule: usize, dim: Dim) -> usize {
    match dim {
        Dim::Requests => rule * 2,
        Dim::Tokens => rule * 2 + 1,
    }
}

/// One dimension of a rule, compiled for GCRA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Limit {
    /// A limit of 0: nothing passes.
    Blocked,
    /// `limit` per minute.
    Rate {
        limit: u64,
        /// Emission interval: 60 s / limit, rounded up, at least 1 ns.
        interval_ns: u64,
        /// Burst window: `limit × interval_ns`.
        burst_ns: u64,
    },
}

impl Limit {
    fn new(per_minute: u64) -> Self {
        if per_minute == 0 {
            return Limit::Blocked;
        }
        let interval_ns = MINUTE_NS.div_ceil(per_minute);
        Limit::Rate {
            limit: per_minute,
            interval_ns,
            burst_ns: per_minute.saturating_mul(interval_ns),
        }
    }
}

/// A rule compiled: one optional [`Limit`] per dimension.
#[derive(Debug, Clone, Copy)]
struct Compiled {
    requests: Option<Limit>,
    tokens: Option<Limit>,
}

impl Compiled {
    fn get(&self, dim: Dim) -> Option<Limit> {
        match dim {
            Dim::Requests => self.requests,
            Dim::Tokens => self.tokens,
        }
    }
}

/// One cost to take from one cell, all in nanoseconds of TAT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Take {
    /// Which cell: `2 × rule` for requests, `2 × rule + 1` for tokens.
    pub cell: usize,
    /// How far the take moves the cell's TAT: `cost × interval`.
    pub increment_ns: u64,
    /// The cell's burst window: how far ahead of now its TAT may be after a take.
    pub burst_ns: u64,
}

/// A refused [`RateStore::acquire`]: which take failed and how long until it would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Denied {
    /// Index into the `takes` slice of the take that was refused.
    pub index: usize,
    /// Nanoseconds until that take alone would be admitted.
    pub wait_ns: u64,
}

/// Where the cells' TATs live, answering without blocking: the in-memory [`MemoryStore`]. A
/// store behind a network round trip implements [`AsyncRateStore`] instead (the Redis one runs
/// [`gcra`] in a Lua script over every key of a call at once).
///
/// Times are nanoseconds on the caller's clock (`now_ns`). A store with a clock of its own (a
/// fleet-wide one) may use that instead: everything it reports back is relative to the `now` it
/// used (how far a TAT is ahead of it), never an absolute time.
pub trait RateStore: Send + Sync {
    /// Takes every one of `takes` or none of them. On success, `ahead[i]` is how far ahead of
    /// now cell `takes[i].cell`'s TAT is after the take; on refusal, how far it is without this
    /// call (the current state), and the error names the refused take.
    ///
    /// `ahead` has at least `takes.len()` elements.
    fn acquire(&self, takes: &[Take], now_ns: u64, ahead: &mut [u64]) -> Result<(), Denied>;

    /// Moves `cell`'s TAT by `delta_ns`: a positive delta is a debt kept in full; a negative one
    /// is a refund that never moves the TAT below `now_ns` (a full bucket) nor raises it.
    fn adjust(&self, cell: usize, delta_ns: i64, now_ns: u64);

    /// How far ahead of now `cell`'s TAT is (0 when its bucket is full), taking nothing.
    fn peek(&self, cell: usize, now_ns: u64) -> u64;
}

/// Why an [`AsyncRateStore`] could not answer. The limiter then decides with its local
/// [`MemoryStore`] (fail open to per-replica limits); the store counts and logs the failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The store is known to be down and is being probed in the background: not even tried.
    #[error("the shared rate-limit store is unavailable")]
    Unavailable,
    /// The store was tried and failed (connection, timeout, script error).
    #[error("the shared rate-limit store failed: {0}")]
    Failed(String),
}

/// The future of an [`AsyncRateStore`] operation.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// A rate store behind a network round trip (Redis): the same operations as [`RateStore`], but
/// `acquire` and `peek` are awaited instead of blocking a runtime worker, and `adjust` is fire
/// and forget (it is sent in the background, after the response). Used by
/// [`RateLimiter::acquire_async`]; a limiter built without one never pays for it.
///
/// The outer `Result` is the store's health: on `Err` nothing was taken from it and the limiter
/// decides with its local [`MemoryStore`] instead. The inner one is the GCRA answer, exactly as
/// [`RateStore::acquire`]'s. A store with a clock of its own (the Redis server's) ignores
/// `now_ns`: what it reports is relative to its own now.
pub trait AsyncRateStore: Send + Sync {
    /// [`RateStore::acquire`], awaited.
    fn acquire<'a>(
        &'a self,
        takes: &'a [Take],
        now_ns: u64,
        ahead: &'a mut [u64],
    ) -> StoreFuture<'a, Result<(), Denied>>;

    /// [`RateStore::adjust`], without waiting: the change is applied in the background, or
    /// dropped (and counted) when the store is down. Must not block.
    fn adjust(&self, cell: usize, delta_ns: i64, now_ns: u64);

    /// [`RateStore::peek`], awaited.
    fn peek(&self, cell: usize, now_ns: u64) -> StoreFuture<'_, u64>;
}

/// One GCRA step: the cell's new TAT if a take of `increment_ns` fits at `now_ns`, else how long
/// until it would. An increment larger than the burst window only fits into a full bucket
/// (`tat <= now`).
pub fn gcra(tat: u64, now_ns: u64, increment_ns: u64, burst_ns: u64) -> Result<u64, u64> {
    if increment_ns > burst_ns {
        return if tat <= now_ns {
            Ok(now_ns.saturating_add(increment_ns))
        } else {
            Err(tat - now_ns)
        };
    }
    let new_tat = tat.max(now_ns).saturating_add(increment_ns);
    // The earliest `now` at which the new TAT is within the burst window.
    let allowed_at = new_tat.saturating_sub(burst_ns);
    if allowed_at <= now_ns {
        Ok(new_tat)
    } else {
        Err(allowed_at - now_ns)
    }
}

/// A TAT on a cache line of its own: cells of different rules are hit by different calls.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Tat(AtomicU64);

/// The default [`RateStore`]: one atomic TAT per cell, in this process, lock-free.
#[derive(Debug)]
pub struct MemoryStore {
    /// Nanoseconds on the caller's clock; 0 (or any time at or before now) is a full bucket.
    cells: Box<[Tat]>,
    /// Per cell: whether [`follow`](Self::follow) has set it from a shared store's answer.
    followed: Box<[AtomicBool]>,
}

impl MemoryStore {
    /// A store of `cells` full buckets.
    #[must_use]
    pub fn new(cells: usize) -> Self {
        Self {
            cells: (0..cells).map(|_| Tat::default()).collect(),
            followed: (0..cells).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// Runs one GCRA step on `cell` with a compare-exchange loop.
    fn take(&self, take: &Take, now_ns: u64) -> Result<u64, u64> {
        let Some(Tat(cell)) = self.cells.get(take.cell) else {
            // A cell this store does not have limits nothing.
            return Ok(now_ns);
        };
        let mut current = cell.load(Ordering::Acquire);
        loop {
            let new_tat = gcra(current, now_ns, take.increment_ns, take.burst_ns)?;
            match cell.compare_exchange_weak(current, new_tat, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Ok(new_tat),
                Err(actual) => current = actual,
            }
        }
    }

    /// Moves `cell`'s TAT up to `tat` if it is behind.
    fn raise(&self, cell: usize, tat: u64) {
        if let Some(Tat(current)) = self.cells.get(cell) {
            current.fetch_max(tat, Ordering::AcqRel);
        }
    }

    /// Takes a shared store's answer for `cell` (its TAT there, on this store's clock), so that
    /// this store, should it have to decide alone, goes on from what the fleet admitted. The
    /// first answer replaces the cell's starting state; later ones only move it up (answers to
    /// concurrent calls may arrive out of order; a refund there is not taken here: the
    /// fallback stays on the safe side).
    fn follow(&self, cell: usize, tat: u64) {
        let Some(Tat(current)) = self.cells.get(cell) else {
            return;
        };
        let first = self
            .followed
            .get(cell)
            .is_some_and(|f| !f.swap(true, Ordering::AcqRel));
        if first {
            current.store(tat, Ordering::Release);
        } else {
            current.fetch_max(tat, Ordering::AcqRel);
        }
    }

    fn load(&self, cell: usize) -> u64 {
        self.cells
            .get(cell)
            .map_or(0, |Tat(tat)| tat.load(Ordering::Acquire))
    }
}

impl RateStore for MemoryStore {
    fn acquire(&self, takes: &[Take], now_ns: u64, ahead: &mut [u64]) -> Result<(), Denied> {
        for (i, take) in takes.iter().enumerate() {
            match self.take(take, now_ns) {
                Ok(new_tat) => ahead[i] = new_tat.saturating_sub(now_ns),
                Err(wait_ns) => {
                    // Give back what this call took, so a refused call leaves no trace.
                    for taken in &takes[..i] {
                        let back = i64::try_from(taken.increment_ns).unwrap_or(i64::MAX);
                        self.adjust(taken.cell, -back, now_ns);
                    }
                    for (slot, take) in ahead.iter_mut().zip(takes) {
                        *slot = self.peek(take.cell, now_ns);
                    }
                    return Err(Denied { index: i, wait_ns });
                }
            }
        }
        Ok(())
    }

    fn adjust(&self, cell: usize, delta_ns: i64, now_ns: u64) {
        let Some(Tat(tat)) = self.cells.get(cell) else {
            return;
        };
        if delta_ns == 0 {
            return;
        }
        // `fetch_update` retries the closure on contention; `None` leaves the TAT as it is.
        let _ = tat.fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
            if delta_ns > 0 {
                Some(current.saturating_add(delta_ns.unsigned_abs()))
            } else if current <= now_ns {
                // Already full: a refund cannot make it fuller.
                None
            } else {
                Some(current.saturating_sub(delta_ns.unsigned_abs()).max(now_ns))
            }
        });
    }

    fn peek(&self, cell: usize, now_ns: u64) -> u64 {
        self.load(cell).saturating_sub(now_ns)
    }
}

/// The `x-ratelimit-*` values of the most constraining rule (lowest remaining ratio) for each
/// dimension; `None` where no rule of the call limits that dimension.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateHeaders {
    /// `x-ratelimit-limit-requests`: calls per minute.
    pub limit_requests: Option<u64>,
    /// `x-ratelimit-remaining-requests`: calls that would pass right now.
    pub remaining_requests: Option<u64>,
    /// `x-ratelimit-reset-requests`: time until the request allowance is full again.
    pub reset_requests: Option<Duration>,
    /// `x-ratelimit-limit-tokens`: tokens per minute.
    pub limit_tokens: Option<u64>,
    /// `x-ratelimit-remaining-tokens`: tokens that would pass right now.
    pub remaining_tokens: Option<u64>,
    /// `x-ratelimit-reset-tokens`: time until the token allowance is full again.
    pub reset_tokens: Option<Duration>,
}

impl RateHeaders {
    /// Writes those of the six `x-ratelimit-*` headers that have a value, resets formatted by
    /// [`format_reset`]; replaces any already there.
    pub fn apply(&self, headers: &mut HeaderMap) {
        let numbers = [
            ("x-ratelimit-limit-requests", self.limit_requests),
            ("x-ratelimit-remaining-requests", self.remaining_requests),
            ("x-ratelimit-limit-tokens", self.limit_tokens),
            ("x-ratelimit-remaining-tokens", self.remaining_tokens),
        ];
        for (name, value) in numbers {
            if let Some(value) = value {
                headers.insert(HeaderName::from_static(name), HeaderValue::from(value));
            }
        }
        let resets = [
            ("x-ratelimit-reset-requests", self.reset_requests),
            ("x-ratelimit-reset-tokens", self.reset_tokens),
        ];
        for (name, value) in resets {
            if let Some(value) = value
                && let Ok(value) = HeaderValue::try_from(format_reset(value))
            {
                headers.insert(HeaderName::from_static(name), value);
            }
        }
    }

    /// Whether any rule limited the call (no header would be written otherwise).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.limit_requests.is_none() && self.limit_tokens.is_none()
    }

    fn set(&mut self, dim: Dim, limit: u64, remaining: u64, reset: Duration) {
        let (l, r, t) = match dim {
            Dim::Requests => (
                &mut self.limit_requests,
                &mut self.remaining_requests,
                &mut self.reset_requests,
            ),
            Dim::Tokens => (
                &mut self.limit_tokens,
                &mut self.remaining_tokens,
                &mut self.reset_tokens,
            ),
        };
        // Most constraining = lowest remaining/limit; ties go to the later reset.
        let replace = match (*l, *r) {
            (Some(old_limit), Some(old_remaining)) => {
                let new = u128::from(remaining) * u128::from(old_limit);
                let old = u128::from(old_remaining) * u128::from(limit);
                new < old || (new == old && Some(reset) > *t)
            }
            _ => true,
        };
        if replace {
            *l = Some(limit);
            *r = Some(remaining);
            *t = Some(reset);
        }
    }
}

/// A duration the way OpenAI writes `x-ratelimit-reset-*` (Go's `Duration.String`), rounded
/// up to the millisecond so that a client never comes back early: `0s`, `120ms`, `1s`,
/// `1.5s`, `6m0s`, `1h2m3s`.
#[must_use]
pub fn format_reset(d: Duration) -> String {
    let ms = d.as_nanos().div_ceil(1_000_000);
    if ms == 0 {
        return "0s".to_owned();
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (hours, rest) = (ms / 3_600_000, ms % 3_600_000);
    let (minutes, rest) = (rest / 60_000, rest % 60_000);
    let (seconds, millis) = (rest / 1000, rest % 1000);
    let mut out = String::new();
    // Writing to a String cannot fail.
    if hours > 0 {
        let _ = write!(out, "{hours}h{minutes}m");
    } else if minutes > 0 {
        let _ = write!(out, "{minutes}m");
    }
    let _ = write!(out, "{seconds}");
    if millis > 0 {
        let fraction = format!("{millis:03}");
        out.push('.');
        out.push_str(fraction.trim_end_matches('0'));
    }
    out.push('s');
    out
}

/// Shared by a [`RateLimiter`] and its outstanding [`Admission`]s.
struct Inner {
    rules: Box<[Compiled]>,
    /// The store of [`RateLimiter::acquire`]; with a shared store, the local fallback.
    store: Arc<dyn RateStore>,
    /// With a shared store, the local fallback again, as its concrete type: every answer of the
    /// shared store is mirrored into it ([`MemoryStore::raise`]).
    mirror: Option<Arc<MemoryStore>>,
    /// The fleet-wide store of [`RateLimiter::acquire_async`], if any.
    shared: Option<Arc<dyn AsyncRateStore>>,
    /// Time zero of the nanosecond clock the store sees.
    base: Instant,
}

impl Inner {
    fn now_ns(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The header values of one cell whose TAT is `ahead_ns` ahead of now.
    fn observe(&self, headers: &mut RateHeaders, cell: usize, ahead_ns: u64) {
        let dim = if cell.is_multiple_of(2) {
            Dim::Requests
        } else {
            Dim::Tokens
        };
        match self.rules.get(cell / 2).and_then(|r| r.get(dim)) {
            Some(Limit::Rate {
                limit,
                interval_ns,
                burst_ns,
            }) => {
                let remaining = (burst_ns.saturating_sub(ahead_ns) / interval_ns).min(limit);
                headers.set(dim, limit, remaining, Duration::from_nanos(ahead_ns));
            }
            Some(Limit::Blocked) => {
                headers.set(dim, 0, 0, Duration::from_nanos(MINUTE_NS));
            }
            None => {}
        }
    }
}

/// The rate limits of one configuration: cheap to clone (a handle), `Send + Sync`, lock-free
/// on the request path (no map lookup, no allocation for calls under up to four rules).
///
/// Built once per set of `[[rate_limits]]`: a new limiter starts with every bucket full, so
/// keep the old one across a reload that leaves the rules unchanged. (With a shared store the
/// state is in the store, keyed by each rule's identity: a new limiter over the same rules
/// finds it there.)
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
}

impl fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("rules", &self.inner.rules)
            .field("shared", &self.inner.shared.is_some())
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// A limiter for `rules` (referred to by index in [`acquire`](Self::acquire)), every bucket
    /// full, state in this process.
    #[must_use]
    pub fn new(rules: Vec<RateRule>) -> Self {
        let store = Arc::new(MemoryStore::new(rules.len() * 2));
        Self::with_store(rules, store)
    }

    /// A limiter for `rules` whose state lives in `store` (cells `2 × rule` for requests and
    /// `2 × rule + 1` for tokens).
    #[must_use]
    pub fn with_store(rules: Vec<RateRule>, store: Arc<dyn RateStore>) -> Self {
        Self::build(rules, store, None, None)
    }

    /// A limiter for `rules` whose state lives in the fleet-wide `shared` store (same cell
    /// numbering as [`with_store`](Self::with_store)), with an in-memory store of its own as the
    /// fallback while `shared` fails: admit with [`acquire_async`](Self::acquire_async).
    ///
    /// The fallback never starts full: each of its buckets follows the shared store's answers
    /// (a cell's TAT there, seen here) and starts *empty* (refilling at the rule's rate) until
    /// the first one. So when the shared store fails, each replica goes on from the budget the
    /// fleet had left at its last answer, or from nothing: over N replicas at most N times a
    /// limit passes in any minute of an outage, never N times a limit on top of what the fleet
    /// had already admitted.
    #[must_use]
    pub fn with_shared_store(rules: Vec<RateRule>, shared: Arc<dyn AsyncRateStore>) -> Self {
        let local = Arc::new(MemoryStore::new(rules.len() * 2));
        let limiter = Self::build(rules, local.clone(), Some(shared), Some(local.clone()));
        let now_ns = limiter.inner.now_ns(Instant::now());
        for (rule, compiled) in limiter.inner.rules.iter().enumerate() {
            for dim in [Dim::Requests, Dim::Tokens] {
                if let Some(Limit::Rate { burst_ns, .. }) = compiled.get(dim) {
                    local.raise(cell_of(rule, dim), now_ns.saturating_add(burst_ns));
                }
            }
        }
        limiter
    }

    fn build(
        rules: Vec<RateRule>,
        store: Arc<dyn RateStore>,
        shared: Option<Arc<dyn AsyncRateStore>>,
        mirror: Option<Arc<MemoryStore>>,
    ) -> Self {
        let rules = rules
            .into_iter()
            .map(|r| Compiled {
                requests: r.requests_per_minute.map(Limit::new),
                tokens: r.tokens_per_minute.map(Limit::new),
            })
            .collect();
        Self {
            inner: Arc::new(Inner {
                rules,
                store,
                mirror,
                shared,
                base: Instant::now(),
            }),
        }
    }

    /// Whether this limiter has a shared store, i.e. must be asked with
    /// [`acquire_async`](Self::acquire_async) for its limits to hold across the fleet.
    #[must_use]
    pub fn is_shared(&self) -> bool {
        self.inner.shared.is_some()
    }

    /// Admit a call under the rules `rules` (indices) with an estimated token count at `now`.
    ///
    /// All or nothing: on `Ok` the call has taken one request and `est_tokens` tokens from every
    /// rule; on `Err` it has taken nothing. Indices out of range, and repeats, are ignored. With
    /// no rule, the call is admitted and the headers are empty.
    ///
    /// Never blocks: with a shared store this consults only the local fallback store (limits
    /// per replica); use [`acquire_async`](Self::acquire_async) there.
    #[expect(
        clippy::result_large_err,
        reason = "`Admission` is as large: boxing `Limited` would allocate on refusal and save nothing"
    )]
    pub fn acquire(
        &self,
        rules: &[usize],
        est_tokens: u64,
        now: Instant,
    ) -> Result<Admission, Limited> {
        if rules.len() <= INLINE_RULES {
            let mut takes = [Take::default(); 2 * INLINE_RULES];
            let mut ahead = [0; 2 * INLINE_RULES];
            self.acquire_in(rules, est_tokens, now, &mut takes, &mut ahead)
        } else {
            let mut takes = vec![Take::default(); 2 * rules.len()];
            let mut ahead = vec![0; 2 * rules.len()];
            self.acquire_in(rules, est_tokens, now, &mut takes, &mut ahead)
        }
    }

    /// [`acquire`](Self::acquire) against the shared store, when the limiter has one: one
    /// round trip, awaited (a runtime worker is never blocked), all of the call's cells taken
    /// atomically on the store's clock.
    ///
    /// Without a shared store this is [`acquire`](Self::acquire), with no await point and no
    /// allocation. When the shared store fails (or is known to be down), the call is decided
    /// by the local in-memory store instead: the limits then hold per replica (fail open, see
    /// [`redis`]); its admission settles against the store that admitted it.
    pub async fn acquire_async(
        &self,
        rules: &[usize],
        est_tokens: u64,
        now: Instant,
    ) -> Result<Admission, Limited> {
        let Some(shared) = &self.inner.shared else {
            return self.acquire(rules, est_tokens, now);
        };
        if rules.len() <= INLINE_RULES {
            let mut takes = [Take::default(); 2 * INLINE_RULES];
            let mut ahead = [0; 2 * INLINE_RULES];
            self.acquire_shared_in(shared, rules, est_tokens, now, &mut takes, &mut ahead)
                .await
        } else {
            let mut takes = vec![Take::default(); 2 * rules.len()];
            let mut ahead = vec![0; 2 * rules.len()];
            self.acquire_shared_in(shared, rules, est_tokens, now, &mut takes, &mut ahead)
                .await
        }
    }

    /// The current state of rule `rule` at `now`, taking nothing (for admin views and tests).
    /// With a shared store, this is the local fallback's state: see
    /// [`status_async`](Self::status_async).
    #[must_use]
    pub fn status(&self, rule: usize, now: Instant) -> RateHeaders {
        let inner = &self.inner;
        let now_ns = inner.now_ns(now);
        let mut headers = RateHeaders::default();
        for dim in [Dim::Requests, Dim::Tokens] {
            let cell = cell_of(rule, dim);
            inner.observe(&mut headers, cell, inner.store.peek(cell, now_ns));
        }
        headers
    }

    /// [`status`](Self::status) from the shared store when there is one (the local fallback's
    /// state if it fails).
    pub async fn status_async(&self, rule: usize, now: Instant) -> RateHeaders {
        let inner = &self.inner;
        let Some(shared) = &inner.shared else {
            return self.status(rule, now);
        };
        let now_ns = inner.now_ns(now);
        let mut headers = RateHeaders::default();
        for dim in [Dim::Requests, Dim::Tokens] {
            let cell = cell_of(rule, dim);
            if inner.rules.get(rule).and_then(|r| r.get(dim)).is_none() {
                continue;
            }
            let ahead = match shared.peek(cell, now_ns).await {
                Ok(ahead) => ahead,
                Err(_) => inner.store.peek(cell, now_ns),
            };
            inner.observe(&mut headers, cell, ahead);
        }
        headers
    }

    /// [`acquire`](Self::acquire) with buffers of at least `2 × rules.len()` elements.
    #[expect(clippy::result_large_err, reason = "see `acquire`")]
    fn acquire_in(
        &self,
        rules: &[usize],
        est_tokens: u64,
        now: Instant,
        takes: &mut [Take],
        ahead: &mut [u64],
    ) -> Result<Admission, Limited> {
        let inner = &self.inner;
        let now_ns = inner.now_ns(now);
        let (n, settle) = self.plan(rules, est_tokens, takes)?;
        let (takes, ahead) = (&takes[..n], &mut ahead[..n]);
        let outcome = inner.store.acquire(takes, now_ns, ahead);
        self.conclude(takes, ahead, outcome, est_tokens, settle, false)
    }

    /// [`acquire_async`](Self::acquire_async) with a shared store and buffers of at least
    /// `2 × rules.len()` elements.
    async fn acquire_shared_in(
        &self,
        shared: &Arc<dyn AsyncRateStore>,
        rules: &[usize],
        est_tokens: u64,
        now: Instant,
        takes: &mut [Take],
        ahead: &mut [u64],
    ) -> Result<Admission, Limited> {
        let inner = &self.inner;
        let now_ns = inner.now_ns(now);
        let (n, settle) = self.plan(rules, est_tokens, takes)?;
        let (takes, ahead) = (&takes[..n], &mut ahead[..n]);
        if takes.is_empty() {
            return self.conclude(takes, ahead, Ok(()), est_tokens, settle, false);
        }
        if let Ok(outcome) = shared.acquire(takes, now_ns, ahead).await {
            if let Some(mirror) = &inner.mirror {
                // `ahead` is on the shared store's clock, relative to its now: taken as ours.
                for (take, &ahead) in takes.iter().zip(ahead.iter()) {
                    mirror.follow(take.cell, now_ns.saturating_add(ahead));
                }
            }
            self.conclude(takes, ahead, outcome, est_tokens, settle, true)
        } else {
            // The store counted and logged its failure: decide here, per replica.
            let outcome = inner.store.acquire(takes, now_ns, ahead);
            self.conclude(takes, ahead, outcome, est_tokens, settle, false)
        }
    }

    /// The takes of a call under `rules` into `takes` (at least `2 × rules.len()` long): how
    /// many, and the rules whose tokens must be settled. Refuses at once under a limit of 0.
    #[inline]
    #[expect(clippy::result_large_err, reason = "see `acquire`")]
    fn plan(
        &self,
        rules: &[usize],
        est_tokens: u64,
        takes: &mut [Take],
    ) -> Result<(usize, RuleList), Limited> {
        let inner = &self.inner;
        let mut n = 0;
        let mut settle = RuleList::default();
        for (pos, &rule) in rules.iter().enumerate() {
            if rules[..pos].contains(&rule) {
                continue;
            }
            let Some(compiled) = inner.rules.get(rule) else {
                continue;
            };
            for (dim, cost) in [(Dim::Requests, 1), (Dim::Tokens, est_tokens)] {
                match compiled.get(dim) {
                    None => {}
                    Some(Limit::Blocked) => return Err(self.blocked(rule, dim)),
                    Some(Limit::Rate {
                        interval_ns,
                        burst_ns,
                        ..
                    }) => {
                        takes[n] = Take {
                            cell: cell_of(rule, dim),
                            increment_ns: interval_ns.saturating_mul(cost),
                            burst_ns,
                        };
                        n += 1;
                        if dim == Dim::Tokens {
                            settle.push(rule);
                        }
                    }
                }
            }
        }
        Ok((n, settle))
    }

    /// The answer to a call from its store's: the admission and its headers, or the refusal
    /// with the wait that lets one retry pass every cell. `shared`: which store took it (and
    /// will be settled).
    #[inline]
    #[expect(clippy::result_large_err, reason = "see `acquire`")]
    fn conclude(
        &self,
        takes: &[Take],
        ahead: &[u64],
        outcome: Result<(), Denied>,
        est_tokens: u64,
        settle: RuleList,
        shared: bool,
    ) -> Result<Admission, Limited> {
        let inner = &self.inner;
        let mut headers = RateHeaders::default();
        match outcome {
            Ok(()) => {
                for (take, &ahead) in takes.iter().zip(ahead.iter()) {
                    inner.observe(&mut headers, take.cell, ahead);
                }
                Ok(Admission {
                    inner: Arc::clone(inner),
                    est_tokens,
                    rules: settle,
                    shared,
                    headers,
                })
            }
            Err(denied) => {
                // Wait for the slowest cell, so that one retry can pass them all.
                let refused_cell = takes.get(denied.index).map_or(usize::MAX, |t| t.cell);
                let (mut wait_ns, mut which_cell) = (denied.wait_ns, refused_cell);
                for (take, &ahead) in takes.iter().zip(ahead.iter()) {
                    inner.observe(&mut headers, take.cell, ahead);
                    // `ahead` is the TAT on a clock whose now is 0.
                    if let Err(wait) = gcra(ahead, 0, take.increment_ns, take.burst_ns)
                        && wait > wait_ns
                    {
                        (wait_ns, which_cell) = (wait, take.cell);
                    }
                }
                let dim = if which_cell.is_multiple_of(2) {
                    Dim::Requests
                } else {
                    Dim::Tokens
                };
                let oversized = takes
                    .iter()
                    .any(|t| t.cell == which_cell && t.increment_ns > t.burst_ns);
                Err(Limited {
                    retry_after: Duration::from_nanos(wait_ns),
                    headers,
                    which: dim.name(),
                    oversized,
                })
            }
        }
    }

    /// The refusal of a call under a rule whose `dim` limit is 0.
    fn blocked(&self, rule: usize, dim: Dim) -> Limited {
        let mut headers = RateHeaders::default();
        self.inner.observe(&mut headers, cell_of(rule, dim), 0);
        Limited {
            retry_after: Duration::from_nanos(MINUTE_NS),
            headers,
            which: dim.name(),
            oversized: false,
        }
    }
}

/// Rules of an admission whose tokens must be settled; inline for the usual one or two.
#[derive(Debug, Clone)]
enum RuleList {
    Inline {
        len: usize,
        rules: [usize; INLINE_RULES],
    },
    Heap(Vec<usize>),
}

impl Default for RuleList {
    fn default() -> Self {
        RuleList::Inline {
            len: 0,
            rules: [0; INLINE_RULES],
        }
    }
}

impl RuleList {
    fn push(&mut self, rule: usize) {
        match self {
            RuleList::Inline { len, rules } if *len < INLINE_RULES => {
                rules[*len] = rule;
                *len += 1;
            }
            RuleList::Inline { len, rules } => {
                let mut heap = rules[..*len].to_vec();
                heap.push(rule);
                *self = RuleList::Heap(heap);
            }
            RuleList::Heap(heap) => heap.push(rule),
        }
    }

    fn as_slice(&self) -> &[usize] {
        match self {
            RuleList::Inline { len, rules } => &rules[..*len],
            RuleList::Heap(heap) => heap,
        }
    }
}

/// An admitted call: holds what it took until [`settle`](Self::settle). Dropped without
/// settling, the token estimate stays charged (right when the real count is unknown).
#[must_use = "settle the admission with the call's real token count when it ends"]
pub struct Admission {
    inner: Arc<Inner>,
    est_tokens: u64,
    /// Rules with a token limit, charged `est_tokens` each.
    rules: RuleList,
    /// Admitted by the shared store (settled there), not by the local one.
    shared: bool,
    /// The `x-ratelimit-*` values right after admission, for the response.
    pub headers: RateHeaders,
}

impl fmt::Debug for Admission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission")
            .field("est_tokens", &self.est_tokens)
            .field("rules", &self.rules.as_slice())
            .field("shared", &self.shared)
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

impl Admission {
    /// Corrects the token estimate with the call's real input + output tokens, once, when the
    /// call ends: more than estimated is a debt later calls wait for; less is given back, at
    /// most up to a full bucket.
    pub fn settle(self, actual_tokens: u64, now: Instant) {
        let inner = &self.inner;
        let now_ns = inner.now_ns(now);
        let delta_tokens = i128::from(actual_tokens) - i128::from(self.est_tokens);
        if delta_tokens == 0 {
            return;
        }
        for &rule in self.rules.as_slice() {
            if let Some(Limit::Rate { interval_ns, .. }) =
                inner.rules.get(rule).and_then(|r| r.tokens)
            {
                let delta_ns = delta_tokens.saturating_mul(i128::from(interval_ns));
                let delta_ns = i64::try_from(delta_ns).unwrap_or(if delta_ns < 0 {
                    i64::MIN
                } else {
                    i64::MAX
                });
                let cell = cell_of(rule, Dim::Tokens);
                match (&inner.shared, self.shared) {
                    (Some(shared), true) => {
                        shared.adjust(cell, delta_ns, now_ns);
                        // A debt is mirrored too (a refund is not: the fallback stays on the
                        // safe side of what the shared store holds).
                        if let (Some(mirror), true) = (&inner.mirror, delta_ns > 0) {
                            mirror.adjust(cell, delta_ns, now_ns);
                        }
                    }
                    _ => inner.store.adjust(cell, delta_ns, now_ns),
                }
            }
        }
    }
}

/// A refused call: answer 429 `rate_limit_exceeded` with [`apply`](Self::apply)'s headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// How long until the call would pass every rule (if nothing else takes the room first).
    pub retry_after: Duration,
    /// The `x-ratelimit-*` values at refusal (nothing was taken).
    pub headers: RateHeaders,
    /// The dimension that refused for longest: `"requests"` or `"tokens"`.
    pub which: &'static str,
    /// The call's token estimate alone is more than a rule's minute allowance: it waits for a
    /// full bucket.
    oversized: bool,
}

impl Limited {
    /// Writes `retry-after` (whole seconds, rounded up, at least 1), `retry-after-ms` (read
    /// first by the OpenAI SDKs) and the `x-ratelimit-*` headers.
    pub fn apply(&self, headers: &mut HeaderMap) {
        let ms = self.retry_after.as_nanos().div_ceil(1_000_000).max(1);
        let secs = ms.div_ceil(1000);
        headers.insert(
            HeaderName::from_static("retry-after"),
            HeaderValue::from(u64::try_from(secs).unwrap_or(u64::MAX)),
        );
        headers.insert(
            HeaderName::from_static("retry-after-ms"),
            HeaderValue::from(u64::try_from(ms).unwrap_or(u64::MAX)),
        );
        self.headers.apply(headers);
    }
}

/// The message of the 429 body, e.g. `rate limit reached for requests per minute: limit 600,
/// remaining 0; try again in 100ms`.
impl fmt::Display for Limited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (limit, remaining) = if self.which == "tokens" {
            (self.headers.limit_tokens, self.headers.remaining_tokens)
        } else {
            (self.headers.limit_requests, self.headers.remaining_requests)
        };
        write!(f, "rate limit reached for {} per minute", self.which)?;
        if let (Some(limit), Some(remaining)) = (limit, remaining) {
            write!(f, ": limit {limit}, remaining {remaining}")?;
        }
        if self.oversized {
            write!(
                f,
                "; the call's estimated tokens exceed the whole per-minute limit, so it is admitted only when the limit is untouched"
            )?;
        }
        write!(f, "; try again in {}", format_reset(self.retry_after))
    }
}

impl std::error::Error for Limited {}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(rpm: Option<u64>, tpm: Option<u64>) -> RateRule {
        RateRule {
            requests_per_minute: rpm,
            tokens_per_minute: tpm,
        }
    }

    /// Admits a call that must pass, dropping the admission (the estimate stays charged).
    fn admit(limiter: &RateLimiter, rules: &[usize], est: u64, now: Instant, why: &str) {
        drop(limiter.acquire(rules, est, now).expect(why));
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn burst_of_exactly_the_limit_then_refused() {
        let limiter = RateLimiter::new(vec![rule(Some(600), None)]);
        let t0 = Instant::now();
        for i in 0..600 {
            let a = limiter.acquire(&[0], 0, t0).expect("within burst");
            assert_eq!(a.headers.remaining_requests, Some(599 - i));
        }
        let refused = limiter.acquire(&[0], 0, t0).expect_err("over burst");
        assert_eq!(refused.which, "requests");
        assert_eq!(refused.retry_after, ms(100));
        assert_eq!(refused.headers.remaining_requests, Some(0));
        assert_eq!(refused.headers.reset_requests, Some(Duration::from_mins(1)));
    }

    #[test]
    fn refills_one_call_per_interval() {
        let limiter = RateLimiter::new(vec![rule(Some(600), None)]);
        let t0 = Instant::now();
        for _ in 0..600 {
            admit(&limiter, &[0], 0, t0, "burst");
        }
        let early = limiter
            .acquire(&[0], 0, t0 + ms(99))
            .expect_err("too early");
        assert_eq!(early.retry_after, ms(1));
        admit(&limiter, &[0], 0, t0 + ms(100), "one refilled");
        let again = limiter
            .acquire(&[0], 0, t0 + ms(100))
            .expect_err("only one");
        assert_eq!(again.retry_after, ms(100));
        // A whole minute later the bucket is full again, and no fuller.
        let later = t0 + Duration::from_secs(61);
        for _ in 0..600 {
            admit(&limiter, &[0], 0, later, "full again");
        }
        limiter.acquire(&[0], 0, later).expect_err("no fuller");
    }

    #[test]
    fn interval_rounds_up_so_a_limit_never_refills_early() {
        // 60 s / 7 is not a whole number of nanoseconds.
        let limiter = RateLimiter::new(vec![rule(Some(7), None)]);
        let t0 = Instant::now();
        for _ in 0..7 {
            admit(&limiter, &[0], 0, t0, "burst");
        }
        let refused = limiter.acquire(&[0], 0, t0).expect_err("over");
        assert_eq!(refused.retry_after, Duration::from_nanos(8_571_428_572));
    }

    #[test]
    fn tokens_are_estimated_then_settled_up_and_down() {
        // 6000 tokens per minute: one token every 10 ms.
        let limiter = RateLimiter::new(vec![rule(None, Some(6000))]);
        let t0 = Instant::now();
        let a = limiter.acquire(&[0], 1000, t0).expect("fits");
        assert_eq!(a.headers.remaining_tokens, Some(5000));
        assert_eq!(a.headers.reset_tokens, Some(Duration::from_secs(10)));
        assert_eq!(a.headers.limit_requests, None);
        a.settle(1500, t0);
        assert_eq!(limiter.status(0, t0).remaining_tokens, Some(4500));

        let b = limiter.acquire(&[0], 1000, t0).expect("fits");
        b.settle(200, t0);
        assert_eq!(limiter.status(0, t0).remaining_tokens, Some(4300));

        // Dropped without settling: the estimate stays charged.
        drop(limiter.acquire(&[0], 300, t0).expect("fits"));
        assert_eq!(limiter.status(0, t0).remaining_tokens, Some(4000));

        // Over the remaining room: refused, nothing taken, wait = time for the missing tokens.
        let refused = limiter.acquire(&[0], 4100, t0).expect_err("no room");
        assert_eq!(refused.which, "tokens");
        assert_eq!(refused.retry_after, Duration::from_secs(1));
        assert_eq!(limiter.status(0, t0).remaining_tokens, Some(4000));
    }

    #[test]
    fn a_debt_blocks_until_paid_and_a_refund_stops_at_full() {
        let limiter = RateLimiter::new(vec![rule(None, Some(6000))]);
        let t0 = Instant::now();
        // Estimated 100, used 8000: 2000 tokens of debt beyond the burst.
        limiter
            .acquire(&[0], 100, t0)
            .expect("fits")
            .settle(8000, t0);
        assert_eq!(limiter.status(0, t0).remaining_tokens, Some(0));
        let refused = limiter.acquire(&[0], 0, t0).expect_err("in debt");
        assert_eq!(refused.retry_after, Duration::from_secs(20));
        admit(&limiter, &[0], 0, t0 + Duration::from_secs(20), "debt paid");

        // A refund arriving after the bucket refilled cannot make it fuller than full.
        let t1 = t0 + Duration::from_secs(100);
        let a = limiter.acquire(&[0], 3000, t1).expect("fits");
        let t2 = t1 + Duration::from_mins(1);
        a.settle(0, t2);
        let status = limiter.status(0, t2);
        assert_eq!(status.remaining_tokens, Some(6000));
        assert_eq!(status.reset_tokens, Some(Duration::ZERO));
        admit(&limiter, &[0], 6000, t2, "one full minute");
        limiter.acquire(&[0], 1, t2).expect_err("and no more");

        // A partial refund gives back exactly what was not used.
        let t3 = t2 + Duration::from_mins(1);
        let b = limiter.acquire(&[0], 3000, t3).expect("fits");
        admit(&limiter, &[0], 2000, t3, "fits");
        b.settle(1000, t3 + Duration::from_secs(5));
        // 6000 - 1000 - 2000 used, plus 500 refilled in 5 s.
        assert_eq!(
            limiter
                .status(0, t3 + Duration::from_secs(5))
                .remaining_tokens,
            Some(3500)
        );
    }

    #[test]
    fn an_oversized_estimate_passes_only_into_a_full_bucket() {
        let limiter = RateLimiter::new(vec![rule(None, Some(1000))]);
        let t0 = Instant::now();
        let a = limiter.acquire(&[0], 1500, t0).expect("full bucket");
        assert_eq!(a.headers.remaining_tokens, Some(0));
        // 1500 tokens at 60 ms each: TAT 90 s ahead, 30 s past the burst window, so even a
        // small call waits for the debt: 10 tokens (600 ms) fit once TAT - now <= 59.4 s.
        let small = limiter
            .acquire(&[0], 10, t0 + Duration::from_secs(30))
            .expect_err("in debt");
        assert_eq!(small.retry_after, ms(600));
        let t1 = t0 + ms(30_600);
        admit(&limiter, &[0], 10, t1, "debt paid down");
        // TAT is now 90.6 s: an oversized call waits until then, for a full bucket.
        let big = limiter
            .acquire(&[0], 1500, t1)
            .expect_err("bucket not full");
        assert_eq!(big.which, "tokens");
        assert_eq!(big.retry_after, ms(60_000));
        assert!(
            big.to_string()
                .contains("exceed the whole per-minute limit")
        );
        limiter
            .acquire(&[0], 1500, t0 + ms(90_599))
            .expect_err("almost full");
        admit(&limiter, &[0], 1500, t0 + ms(90_600), "full again");
    }

    #[test]
    fn a_refusal_by_one_rule_leaves_the_others_untouched() {
        // Rule 0: the project's; rule 1: the key's.
        let limiter = RateLimiter::new(vec![
            rule(Some(600), Some(100_000)),
            rule(Some(1), Some(100_000)),
        ]);
        let t0 = Instant::now();
        admit(&limiter, &[0, 1], 100, t0, "both have room");
        let refused = limiter.acquire(&[0, 1], 100, t0).expect_err("key refuses");
        assert_eq!(refused.which, "requests");
        assert_eq!(refused.retry_after, Duration::from_mins(1));
        let project = limiter.status(0, t0);
        assert_eq!(project.remaining_requests, Some(599));
        assert_eq!(project.remaining_tokens, Some(99_900));
        assert_eq!(limiter.status(1, t0).remaining_tokens, Some(99_900));

        // Same with tokens refusing after requests were taken from both rules.
        let limiter = RateLimiter::new(vec![
            rule(Some(600), Some(100_000)),
            rule(Some(600), Some(1000)),
        ]);
        limiter
            .acquire(&[0, 1], 900, t0)
            .expect("room")
            .settle(900, t0);
        let refused = limiter.acquire(&[0, 1], 200, t0).expect_err("key tokens");
        assert_eq!(refused.which, "tokens");
        for rule in [0, 1] {
            assert_eq!(limiter.status(rule, t0).remaining_requests, Some(599));
        }
        assert_eq!(limiter.status(0, t0).remaining_tokens, Some(99_100));
        assert_eq!(limiter.status(1, t0).remaining_tokens, Some(100));
    }

    #[test]
    fn retry_after_covers_every_refusing_rule() {
        let limiter = RateLimiter::new(vec![rule(Some(60), None), rule(Some(6), None)]);
        let t0 = Instant::now();
        for _ in 0..6 {
            admit(&limiter, &[0, 1], 0, t0, "room");
        }
        for _ in 0..54 {
            admit(&limiter, &[0], 0, t0, "room");
        }
        // Rule 0 refuses first (wait 1 s), rule 1 would make the retry wait 10 s.
        let refused = limiter.acquire(&[0, 1], 0, t0).expect_err("both full");
        assert_eq!(refused.retry_after, Duration::from_secs(10));
    }

    #[test]
    fn headers_show_the_most_constraining_rule() {
        let limiter = RateLimiter::new(vec![
            rule(Some(600), Some(200_000)),
            rule(Some(10), Some(1_000_000)),
        ]);
        let t0 = Instant::now();
        let a = limiter.acquire(&[0, 1], 1000, t0).expect("room");
        // Requests: 599/600 vs 9/10 -> rule 1; tokens: 199000/200000 vs 999000/1000000 -> rule 0.
        let h = a.headers;
        assert_eq!(h.limit_requests, Some(10));
        assert_eq!(h.remaining_requests, Some(9));
        assert_eq!(h.reset_requests, Some(Duration::from_secs(6)));
        assert_eq!(h.limit_tokens, Some(200_000));
        assert_eq!(h.remaining_tokens, Some(199_000));
        assert_eq!(h.reset_tokens, Some(ms(300)));

        let mut map = HeaderMap::new();
        h.apply(&mut map);
        let get = |name: &str| {
            map.get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(get("x-ratelimit-limit-requests").as_deref(), Some("10"));
        assert_eq!(get("x-ratelimit-remaining-requests").as_deref(), Some("9"));
        assert_eq!(get("x-ratelimit-reset-requests").as_deref(), Some("6s"));
        assert_eq!(get("x-ratelimit-limit-tokens").as_deref(), Some("200000"));
        assert_eq!(
            get("x-ratelimit-remaining-tokens").as_deref(),
            Some("199000")
        );
        assert_eq!(get("x-ratelimit-reset-tokens").as_deref(), Some("300ms"));

        // Only the dimensions that are refused are written.
        let limiter = RateLimiter::new(vec![rule(Some(600), None)]);
        let mut map = HeaderMap::new();
        limiter
            .acquire(&[0], 5, t0)
            .expect("room")
            .headers
            .apply(&mut map);
        assert_eq!(map.len(), 3);
        assert!(map.get("x-ratelimit-limit-tokens").is_none());
        // No rule: admitted, no headers.
        assert!(
            limiter
                .acquire(&[], 5, t0)
                .expect("free")
                .headers
                .is_empty()
        );
    }

    #[test]
    fn limited_answers_carry_retry_after() {
        let limiter = RateLimiter::new(vec![rule(Some(600), Some(200_000))]);
        let t0 = Instant::now();
        for _ in 0..600 {
            admit(&limiter, &[0], 10, t0, "burst");
        }
        let refused = limiter.acquire(&[0], 10, t0).expect_err("over");
        let mut map = HeaderMap::new();
        refused.apply(&mut map);
        let get = |name: &str| {
            map.get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        assert_eq!(get("retry-after").as_deref(), Some("1"));
        assert_eq!(get("retry-after-ms").as_deref(), Some("100"));
        assert_eq!(get("x-ratelimit-remaining-requests").as_deref(), Some("0"));
        assert_eq!(get("x-ratelimit-reset-requests").as_deref(), Some("1m0s"));
        assert_eq!(
            get("x-ratelimit-remaining-tokens").as_deref(),
            Some("194000")
        );
        assert_eq!(
            refused.to_string(),
            "rate limit reached for requests per minute: limit 600, remaining 0; try again in 100ms"
        );
    }

    #[test]
    fn a_zero_limit_refuses_everything() {
        let limiter = RateLimiter::new(vec![rule(Some(100), Some(0))]);
        let t0 = Instant::now();
        let refused = limiter.acquire(&[0], 0, t0).expect_err("blocked");
        assert_eq!(refused.which, "tokens");
        assert_eq!(refused.retry_after, Duration::from_mins(1));
        assert_eq!(refused.headers.limit_tokens, Some(0));
        assert_eq!(limiter.status(0, t0).remaining_requests, Some(100));
    }

    #[test]
    fn unknown_and_repeated_rules() {
        let limiter = RateLimiter::new(vec![rule(Some(2), None)]);
        let t0 = Instant::now();
        let a = limiter.acquire(&[0, 0, 7], 0, t0).expect("room");
        assert_eq!(a.headers.remaining_requests, Some(1));
        // More rules than the inline buffers hold.
        let many: Vec<usize> = (0..10).map(|i| i % 2).collect();
        let a = limiter.acquire(&many, 0, t0).expect("room");
        assert_eq!(a.headers.remaining_requests, Some(0));
    }

    #[test]
    fn many_rules_settle_through_the_heap_list() {
        let rules = (0..6).map(|_| rule(None, Some(6000))).collect();
        let limiter = RateLimiter::new(rules);
        let t0 = Instant::now();
        let all: Vec<usize> = (0..6).collect();
        limiter
            .acquire(&all, 1000, t0)
            .expect("room")
            .settle(400, t0);
        for r in 0..6 {
            assert_eq!(limiter.status(r, t0).remaining_tokens, Some(5600));
        }
    }

    #[test]
    fn reset_is_formatted_like_openai() {
        let cases = [
            (Duration::ZERO, "0s"),
            (ms(120), "120ms"),
            (Duration::from_nanos(1), "1ms"),
            (Duration::from_nanos(99_000_001), "100ms"),
            (Duration::from_secs(1), "1s"),
            (ms(1500), "1.5s"),
            (ms(8640), "8.64s"),
            (ms(1005), "1.005s"),
            (Duration::from_mins(1), "1m0s"),
            (Duration::from_mins(6), "6m0s"),
            (ms(90_500), "1m30.5s"),
            (Duration::from_hours(1), "1h0m0s"),
            (Duration::from_secs(3723), "1h2m3s"),
        ];
        for (d, want) in cases {
            assert_eq!(format_reset(d), want, "{d:?}");
        }
    }

    #[test]
    fn concurrent_acquires_admit_exactly_the_burst() {
        let limiter = RateLimiter::new(vec![rule(Some(600), None)]);
        let t0 = Instant::now();
        let admitted: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        (0..1000)
                            .filter(|_| limiter.acquire(&[0], 0, t0).is_ok())
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("thread")).sum()
        });
        assert_eq!(admitted, 600);
        assert_eq!(limiter.status(0, t0).remaining_requests, Some(0));
    }

    #[test]
    fn concurrent_rollbacks_never_over_admit_nor_leak() {
        // Two rules and two dimensions: refusals roll back under contention.
        let limiter = RateLimiter::new(vec![
            rule(Some(600), Some(100_000)),
            rule(Some(1000), Some(3000)),
        ]);
        let t0 = Instant::now();
        let admitted: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        (0..1000)
                            .filter(|_| limiter.acquire(&[0, 1], 10, t0).is_ok())
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("thread")).sum()
        });
        assert!(admitted <= 300 && admitted > 0, "{admitted}");
        let admitted = u64::try_from(admitted).expect("small");
        // Whatever was rolled back was given back exactly.
        assert_eq!(
            limiter.status(0, t0).remaining_requests,
            Some(600 - admitted)
        );
        assert_eq!(
            limiter.status(1, t0).remaining_tokens,
            Some(3000 - 10 * admitted)
        );
    }

    /// A shared store for the async path: a [`MemoryStore`] on the caller's clock that can be
    /// made to fail, counting what reaches it.
    struct FlakyShared {
        cells: MemoryStore,
        down: std::sync::atomic::AtomicBool,
        acquires: AtomicU64,
    }

    impl FlakyShared {
        fn new(cells: usize) -> Arc<Self> {
            Arc::new(Self {
                cells: MemoryStore::new(cells),
                down: std::sync::atomic::AtomicBool::new(false),
                acquires: AtomicU64::new(0),
            })
        }

        fn set_down(&self, down: bool) {
            self.down.store(down, Ordering::SeqCst);
        }
    }

    impl AsyncRateStore for FlakyShared {
        fn acquire<'a>(
            &'a self,
            takes: &'a [Take],
            now_ns: u64,
            ahead: &'a mut [u64],
        ) -> StoreFuture<'a, Result<(), Denied>> {
            Box::pin(async move {
                if self.down.load(Ordering::SeqCst) {
                    return Err(StoreError::Failed("down".into()));
                }
                self.acquires.fetch_add(1, Ordering::SeqCst);
                tokio::task::yield_now().await;
                Ok(self.cells.acquire(takes, now_ns, ahead))
            })
        }

        fn adjust(&self, cell: usize, delta_ns: i64, now_ns: u64) {
            if !self.down.load(Ordering::SeqCst) {
                self.cells.adjust(cell, delta_ns, now_ns);
            }
        }

        fn peek(&self, cell: usize, now_ns: u64) -> StoreFuture<'_, u64> {
            Box::pin(async move {
                if self.down.load(Ordering::SeqCst) {
                    return Err(StoreError::Unavailable);
                }
                Ok(self.cells.peek(cell, now_ns))
            })
        }
    }

    #[tokio::test]
    async fn without_a_shared_store_the_async_path_is_the_sync_one() {
        let limiter = RateLimiter::new(vec![rule(Some(2), Some(6000))]);
        assert!(!limiter.is_shared());
        let t0 = Instant::now();
        let a = limiter.acquire_async(&[0], 1000, t0).await.expect("room");
        assert_eq!(a.headers.remaining_requests, Some(1));
        a.settle(500, t0);
        assert_eq!(limiter.status(0, t0).remaining_tokens, Some(5500));
        assert_eq!(limiter.status_async(0, t0).await, limiter.status(0, t0));
        drop(limiter.acquire(&[0], 0, t0).expect("room"));
        let refused = limiter.acquire_async(&[0], 0, t0).await.expect_err("full");
        assert_eq!(refused.retry_after, Duration::from_secs(30));
    }

    #[tokio::test]
    async fn a_shared_store_decides_and_is_settled() {
        let shared = FlakyShared::new(2);
        let limiter =
            RateLimiter::with_shared_store(vec![rule(Some(3), Some(6000))], shared.clone());
        assert!(limiter.is_shared());
        let t0 = Instant::now();
        let a = limiter.acquire_async(&[0], 1000, t0).await.expect("room");
        assert_eq!(a.headers.remaining_tokens, Some(5000));
        a.settle(1500, t0);
        // The shared store took and settled it; the local one followed its answer and the
        // debt (never the refund side): the fallback's state, should the shared store fail.
        assert_eq!(
            limiter.status_async(0, t0).await.remaining_tokens,
            Some(4500)
        );
        assert_eq!(limiter.status(0, t0).remaining_tokens, Some(4500));
        assert_eq!(shared.acquires.load(Ordering::SeqCst), 1);
        for _ in 0..2 {
            drop(limiter.acquire_async(&[0], 0, t0).await.expect("room"));
        }
        let refused = limiter.acquire_async(&[0], 0, t0).await.expect_err("full");
        assert_eq!(refused.which, "requests");
        assert_eq!(refused.retry_after, Duration::from_secs(20));
        // Rules without a limit on anything never reach the store.
        let free = limiter.acquire_async(&[], 10, t0).await.expect("free");
        assert!(free.headers.is_empty());
        assert_eq!(shared.acquires.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn a_shared_store_down_from_the_start_falls_back_to_empty_buckets() {
        let shared = FlakyShared::new(2);
        shared.set_down(true);
        let limiter =
            RateLimiter::with_shared_store(vec![rule(Some(3), Some(6000))], shared.clone());
        let t0 = Instant::now();
        // Nothing known of the fleet: the local buckets start empty, never full.
        limiter
            .acquire_async(&[0], 0, t0)
            .await
            .expect_err("a fresh fallback starts empty");
        let t1 = t0 + Duration::from_secs(21);
        let local = limiter
            .acquire_async(&[0], 1000, t1)
            .await
            .expect("refilled");
        assert_eq!(local.headers.remaining_requests, Some(0));
        // Back up: a call admitted locally settles locally, whatever the shared store is.
        shared.set_down(false);
        local.settle(0, t1);
        assert_eq!(shared.acquires.load(Ordering::SeqCst), 0);
        assert_eq!(
            limiter.status_async(0, t1).await.remaining_requests,
            Some(3)
        );
    }

    #[tokio::test]
    async fn the_fallback_goes_on_from_the_shared_stores_last_answer() {
        let shared = FlakyShared::new(2);
        let limiter =
            RateLimiter::with_shared_store(vec![rule(Some(3), Some(6000))], shared.clone());
        // A minute on, the local buckets would be full; the fleet takes all 3 through Redis.
        let t0 = Instant::now() + Duration::from_mins(2);
        for _ in 0..3 {
            drop(
                limiter
                    .acquire_async(&[0], 0, t0)
                    .await
                    .expect("shared room"),
            );
        }
        shared.set_down(true);
        // The local bucket followed the shared one (its start, empty, replaced by the first
        // answer): empty now, not full.
        limiter
            .acquire_async(&[0], 0, t0)
            .await
            .expect_err("the fleet's minute is spent");
        assert_eq!(limiter.status(0, t0).remaining_requests, Some(0));
        let t1 = t0 + Duration::from_secs(20);
        drop(
            limiter
                .acquire_async(&[0], 0, t1)
                .await
                .expect("one refilled"),
        );
        limiter
            .acquire_async(&[0], 0, t1)
            .await
            .expect_err("only one refilled");
        // A token debt settled through the shared store is mirrored locally too.
        shared.set_down(false);
        let t2 = t0 + Duration::from_mins(2);
        let a = limiter.acquire_async(&[0], 1000, t2).await.expect("shared");
        a.settle(4000, t2);
        shared.set_down(true);
        assert_eq!(limiter.status(0, t2).remaining_tokens, Some(2000));
    }

    #[tokio::test]
    async fn a_zero_limit_refuses_before_asking_the_shared_store() {
        let shared = FlakyShared::new(2);
        let limiter = RateLimiter::with_shared_store(vec![rule(Some(0), None)], shared.clone());
        let refused = limiter
            .acquire_async(&[0], 0, Instant::now())
            .await
            .expect_err("blocked");
        assert_eq!(refused.retry_after, Duration::from_mins(1));
        assert_eq!(shared.acquires.load(Ordering::SeqCst), 0);
    }
}
