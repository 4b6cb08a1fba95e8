//! Monthly budgets: month-to-date spend kept current in memory, reservations at admission so
//! concurrent calls cannot slip past a limit, alerts at thresholds, and a month-end forecast.
//!
//! Each budget keeps one atomic `used` = spent + reserved (pico-dollars). Admission adds the
//! call's worst-case cost to `used` only if the result stays within the limit (a single
//! compare-and-swap), so however many calls race at the edge, the sum of what they may spend
//! never exceeds the limit; at the end of the call the reservation is replaced by the real
//! cost. Recorded spend can pass the limit only by the reservation estimate's error (a call
//! that costs more than its reservation: input above the estimate from the body size).
//!
//! A fleet (replicas sharing a `PostgreSQL` ledger) shares the figure: each replica
//! refreshes `spent` from the ledger's `budget_spend` row ([`Budgets::fleet_marks`],
//! [`Budgets::apply_fleet`]) without losing its own spend the writer has not committed yet
//! (`unflushed`), publishes its own reservations, and admits against the other replicas'
//! published reservations too (`others`). Thresholds are then announced by the refresh, once
//! per fleet, not by each replica's calls.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan};
use rust_decimal::Decimal;
use serde::Serialize;

use crate::config::{BudgetAction, Config};
use crate::pricing;

/// Spend of one project and tag set: `(project name, tags, pico-dollars)`.
type SpendRow = (String, std::collections::BTreeMap<String, String>, i64);

/// What a budget counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// One project, by name.
    Project(String),
    /// Every project carrying all these tag values.
    Tags(Vec<(String, String)>),
}

impl Scope {
    /// Whether calls of a project with `name` and `tags` fall under this scope.
    #[must_use]
    pub fn covers(&self, name: &str, tags: &std::collections::BTreeMap<String, String>) -> bool {
        match self {
            Self::Project(p) => p == name,
            Self::Tags(pairs) => pairs.iter().all(|(k, v)| tags.get(k) == Some(v)),
        }
    }

    fn describe(&self) -> String {
        match self {
            Self::Project(p) => format!("project {p}"),
            Self::Tags(pairs) => pairs
                .iter()
                .map(|(k, v)| format!("tag {k}={v}"))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }
}

/// A calendar month in a time zone, as Unix-millisecond bounds `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Month {
    /// First day of the month (local).
    pub first_day: Date,
    /// Start, Unix ms.
    pub start_ms: i64,
    /// End (exclusive), Unix ms.
    pub end_ms: i64,
}

impl Month {
    /// The month containing `at_ms` in `tz`.
    #[must_use]
    pub fn containing(at_ms: i64, tz: &TimeZone) -> Self {
        let at = Timestamp::from_millisecond(at_ms).unwrap_or(Timestamp::UNIX_EPOCH);
        let local = at.to_zoned_datetime(tz.clone()).date();
        let first_day = local.first_of_month();
        let next = first_day.checked_add(1.month()).unwrap_or(first_day);
        let ms = |d: Date| {
            d.to_zoned_datetime(tz.clone())
                .map_or(0, |z| z.timestamp().as_millisecond())
        };
        Self {
            first_day,
            start_ms: ms(first_day),
            end_ms: ms(next),
        }
    }

    /// `YYYY-MM`.
    #[must_use]
    pub fn label(&self) -> String {
        format!("{:04}-{:02}", self.first_day.year(), self.first_day.month())
    }
}

/// One budget's live state.
pub struct Budget {
    /// Name.
    pub name: String,
    /// What it counts.
    pub scope: Scope,
    /// Limit, pico-dollars.
    pub limit_pico: i64,
    /// Whether it refuses calls once spent.
    pub block: bool,
    /// Alert fractions, ascending.
    pub alert_at: Vec<f64>,
    /// Its time zone.
    pub tz: TimeZone,
    tz_name: String,
    /// The live figures: the same object in every snapshot the budget continues in.
    st: Arc<BudgetState>,
}

/// A budget's live figures, kept apart from its config so that a reload which keeps the
/// budget (same name, scope and time zone) keeps the very same figures: calls admitted under
/// the old config settle into what the new one admits against, and nothing is copied.
struct BudgetState {
    month: Mutex<Month>,
    month_end_ms: AtomicI64,
    spent: AtomicI64,
    used: AtomicI64,
    fired: AtomicU64,
    /// This replica's settled spend of the current month that the ledger writer has not
    /// committed yet (so a fleet refresh, which reads committed spend, does not lose it).
    unflushed: AtomicI64,
    /// Other replicas' reservations, as of the last fleet refresh.
    others: AtomicI64,
}

/// A budget refusal: 429 `budget_exceeded`.
#[derive(Debug, Clone)]
pub struct Exceeded {
    /// Budget name.
    pub name: String,
    /// Limit in USD.
    pub limit_usd: Decimal,
    /// Month-to-date spend in USD.
    pub spend_usd: Decimal,
    /// What the refused call would have reserved, in USD.
    pub reserve_usd: Decimal,
    /// What calls in flight held when the call was refused (this replica's and, in a
    /// fleet, the others' as of the last refresh), in USD.
    pub held_usd: Decimal,
    /// What was left of the limit for the call: limit − spend − held, at least 0, in USD.
    pub left_usd: Decimal,
}

/// Where a call's reserved output tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFrom {
    /// The call's own output cap: the body member named.
    Cap(&'static str),
    /// The model's output ceiling, its price row's `max_output_tokens`.
    Ceiling,
    /// `[limits] default_max_output_tokens`: the call set no cap and its price row no ceiling.
    Default,
}

/// How a call's worst-case cost, its budget reservation, was reckoned: output tokens at the
/// output price plus the input estimated from the body at the input price. Carried by a
/// refusal so that its message can say what to change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reckoning {
    /// Output tokens reserved.
    pub output_tokens: u64,
    /// Where that number comes from.
    pub output_from: OutputFrom,
    /// Input tokens estimated from the body (about 4 bytes a token).
    pub input_tokens: u64,
    /// The body's size in bytes.
    pub body_bytes: usize,
    /// The model's prices, USD per million tokens: `(input, output)`; `None` for an unpriced
    /// model (which reserves nothing).
    pub prices: Option<(Decimal, Decimal)>,
}

/// An alert to send: the budget crossed `fraction` of its limit.
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    /// Budget name.
    pub budget: String,
    /// What it counts, in words.
    pub scope: String,
    /// Limit, USD.
    pub limit_usd: String,
    /// Month-to-date spend, USD.
    pub spend_usd: String,
    /// The threshold crossed.
    pub fraction: f64,
    /// Month-end forecast, USD.
    pub forecast_usd: String,
    /// `YYYY-MM` in the budget's time zone.
    pub month: String,
    /// The budget's time zone.
    pub timezone: String,
}

/// The state of a budget for `budgets` and `/admin/v1/budgets`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Name.
    pub name: String,
    /// What it counts.
    pub scope: String,
    /// `block` or `alert`.
    pub action: &'static str,
    /// `YYYY-MM`.
    pub month: String,
    /// Time zone.
    pub timezone: String,
    /// Limit, USD.
    pub limit_usd: String,
    /// Month-to-date spend, USD.
    pub spend_usd: String,
    /// Spend as a percentage of the limit.
    pub percent: String,
    /// Cost reserved by calls in flight on this replica, USD.
    pub reserved_usd: String,
    /// Cost other replicas of the fleet had reserved at the last refresh, USD (0 alone).
    pub other_replicas_reserved_usd: String,
    /// Projected spend at month end, USD.
    pub forecast_usd: String,
    /// How the forecast is made.
    pub forecast_method: &'static str,
}

/// How forecasts are made.
pub const FORECAST_METHOD: &str = "linear: month-to-date spend / elapsed fraction of the month";

/// Whether `spent` has reached `fraction` of `limit`, in exact integer arithmetic (the
/// fraction to a millionth).
fn crossed(spent: i64, limit: i64, fraction: f64) -> bool {
    // Fractions are validated to (0, 10]: the product fits an i64 comfortably.
    #[expect(clippy::cast_possible_truncation, reason = "bounded by validation")]
    let ppm = (fraction * 1_000_000.0).round() as i64;
    i128::from(spent) * 1_000_000 >= i128::from(ppm) * i128::from(limit)
}

fn usd(pico: i64) -> Decimal {
    pricing::from_pico(pico).normalize()
}

impl Budget {
    fn roll(&self, now_ms: i64) {
        if now_ms < self.st.month_end_ms.load(Ordering::Acquire) {
            return;
        }
        let Ok(mut month) = self.st.month.lock() else {
            return;
        };
        if now_ms < month.end_ms {
            return; // another thread rolled it
        }
        let next = Month::containing(now_ms, &self.tz);
        let old = self.st.spent.swap(0, Ordering::AcqRel);
        self.st.used.fetch_sub(old, Ordering::AcqRel);
        self.st.fired.store(0, Ordering::Release);
        self.st.unflushed.store(0, Ordering::Release);
        self.st.others.store(0, Ordering::Release);
        *month = next;
        self.st.month_end_ms.store(next.end_ms, Ordering::Release);
    }

    fn month(&self) -> Month {
        self.st
            .month
            .lock()
            .map_or_else(|e| *e.into_inner(), |m| *m)
    }

    /// Month-to-date spend, pico-dollars.
    #[must_use]
    pub fn spent_pico(&self) -> i64 {
        self.st.spent.load(Ordering::Acquire)
    }

    fn forecast_pico(&self, now_ms: i64) -> i64 {
        let m = self.month();
        let spent = self.spent_pico();
        let total = (m.end_ms - m.start_ms).max(1);
        let elapsed = (now_ms - m.start_ms).clamp(1, total);
        let projected = i128::from(spent) * i128::from(total) / i128::from(elapsed);
        i64::try_from(projected).unwrap_or(i64::MAX)
    }

    /// The budget's status at `now_ms`.
    #[must_use]
    pub fn status(&self, now_ms: i64) -> Status {
        self.roll(now_ms);
        let spent = self.spent_pico();
        let reserved = self.st.used.load(Ordering::Acquire) - spent;
        let others = self.st.others.load(Ordering::Acquire);
        let percent = if self.limit_pico > 0 {
            (Decimal::from(spent) * Decimal::ONE_HUNDRED / Decimal::from(self.limit_pico))
                .round_dp(2)
        } else {
            Decimal::ZERO
        };
        Status {
            name: self.name.clone(),
            scope: self.scope.describe(),
            action: if self.block { "block" } else { "alert" },
            month: self.month().label(),
            timezone: self.tz_name.clone(),
            limit_usd: usd(self.limit_pico).to_string(),
            spend_usd: usd(spent).to_string(),
            percent: percent.normalize().to_string(),
            reserved_usd: usd(reserved.max(0)).to_string(),
            other_replicas_reserved_usd: usd(others.max(0)).to_string(),
            forecast_usd: usd(self.forecast_pico(now_ms)).to_string(),
            forecast_method: FORECAST_METHOD,
        }
    }
}

/// All budgets of a config.
#[derive(Default)]
pub struct Budgets {
    /// In config order.
    pub list: Vec<Arc<Budget>>,
    /// Shared with other replicas (a `PostgreSQL` ledger): thresholds are announced by the
    /// fleet refresh, once for the fleet, not by each call's settlement.
    pub fleet: bool,
}

/// Cost held by an admitted call in each budget it falls under; settled at the end.
#[derive(Debug, Default)]
pub struct Reservation {
    held: Vec<(Arc<BudgetRef>, i64)>,
    /// Settlement leaves threshold alerts to the fleet refresh.
    fleet: bool,
}

/// A budget a reservation points at (the budget itself; a newtype to keep `Debug` short).
pub struct BudgetRef(Arc<Budget>);

impl std::fmt::Debug for BudgetRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.name)
    }
}

impl std::fmt::Debug for Budgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.list.iter().map(|b| &b.name))
            .finish()
    }
}

impl Budgets {
    /// Builds the budgets of a validated config at `now_ms`.
    ///
    /// # Errors
    /// Only on values validation rejects.
    pub fn from_config(config: &Config, now_ms: i64) -> anyhow::Result<Self> {
        let list = config
            .budgets
            .iter()
            .map(|b| {
                let tz = TimeZone::get(&b.timezone)?;
                let limit: Decimal = b.monthly_usd.parse()?;
                let limit_pico = pricing::to_pico(limit)
                    .ok_or_else(|| anyhow::anyhow!("budget {} is too large", b.name))?;
                let scope = match (&b.project, &b.tag) {
                    (Some(p), _) => Scope::Project(p.clone()),
                    (None, Some(t)) => {
                        Scope::Tags(t.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
                    }
                    (None, None) => anyhow::bail!("budget {} has no scope", b.name),
                };
                let mut alert_at = b.alert_at.clone();
                alert_at.sort_by(f64::total_cmp);
                let month = Month::containing(now_ms, &tz);
                Ok(Arc::new(Budget {
                    name: b.name.clone(),
                    scope,
                    limit_pico,
                    block: b.action == BudgetAction::Block,
                    alert_at,
                    tz,
                    tz_name: b.timezone.clone(),
                    st: Arc::new(BudgetState {
                        month_end_ms: AtomicI64::new(month.end_ms),
                        month: Mutex::new(month),
                        spent: AtomicI64::new(0),
                        used: AtomicI64::new(0),
                        fired: AtomicU64::new(0),
                        unflushed: AtomicI64::new(0),
                        others: AtomicI64::new(0),
                    }),
                }))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self {
            list,
            fleet: config.ledger.url.is_some(),
        })
    }

    /// Indices of the budgets the calls of a project with `name` and `tags` fall under.
    #[must_use]
    pub fn applicable(
        &self,
        name: &str,
        tags: &std::collections::BTreeMap<String, String>,
    ) -> Vec<usize> {
        self.list
            .iter()
            .enumerate()
            .filter(|(_, b)| b.scope.covers(name, tags))
            .map(|(i, _)| i)
            .collect()
    }

    /// Seeds month-to-date spend (e.g. from the ledger at start): `spent(budget)` gives the
    /// pico-dollars already spent in its current month.
    pub fn seed(&self, spent: impl FnMut(&Budget, &Month) -> i64) {
        self.seed_only(&vec![true; self.list.len()], spent);
    }

    /// Seeds the budgets whose entry in `which` is true (as [`Budgets::seed`]), in order.
    pub fn seed_only(&self, which: &[bool], mut spent: impl FnMut(&Budget, &Month) -> i64) {
        for (b, _) in self.list.iter().zip(which).filter(|(_, w)| **w) {
            let month = b.month();
            let s = spent(b, &month);
            b.st.spent.store(s, Ordering::Release);
            b.st.used.store(s, Ordering::Release);
            // Thresholds already crossed before the restart are not announced again.
            let bits = b
                .alert_at
                .iter()
                .enumerate()
                .filter(|(_, f)| crossed(s, b.limit_pico, **f))
                .fold(0u64, |acc, (i, _)| acc | (1 << i));
            b.st.fired.store(bits, Ordering::Release);
        }
    }

    /// Seeds month-to-date spend from the ledger.
    ///
    /// # Errors
    /// Storage errors.
    pub fn seed_from_ledger(&self, reader: &dyn crate::ledger::LedgerRead) -> anyhow::Result<()> {
        self.seed_from_ledger_only(&vec![true; self.list.len()], reader)
    }

    /// Seeds the budgets whose entry in `which` is true from the ledger's spend of their
    /// current month.
    ///
    /// # Errors
    /// Storage errors.
    pub fn seed_from_ledger_only(
        &self,
        which: &[bool],
        reader: &dyn crate::ledger::LedgerRead,
    ) -> anyhow::Result<()> {
        let mut cache: std::collections::HashMap<(i64, i64), Vec<SpendRow>> =
            std::collections::HashMap::new();
        for (b, _) in self.list.iter().zip(which).filter(|(_, w)| **w) {
            let m = b.month();
            if let std::collections::hash_map::Entry::Vacant(e) =
                cache.entry((m.start_ms, m.end_ms))
            {
                let rows = reader
                    .spend_between(m.start_ms, m.end_ms)?
                    .into_iter()
                    .map(|(name, tags, pico)| {
                        (name, serde_json::from_str(&tags).unwrap_or_default(), pico)
                    })
                    .collect();
                e.insert(rows);
            }
        }
        self.seed_only(which, |b, m| {
            cache.get(&(m.start_ms, m.end_ms)).map_or(0, |rows| {
                rows.iter()
                    .filter(|(name, tags, _)| b.scope.covers(name, tags))
                    .map(|(_, _, pico)| *pico)
                    .fold(0i64, i64::saturating_add)
            })
        });
        Ok(())
    }

    /// Seeds the budgets whose entry in `which` is true from the fleet's shared figures in the
    /// `PostgreSQL` ledger, their month rows recomputed from the month's calls; all of them
    /// (None, at start) from the rows as they are, a missing row created from the calls.
    ///
    /// # Errors
    /// Storage errors.
    pub fn seed_from_fleet(
        &self,
        which: Option<&[bool]>,
        pg: &crate::ledger::postgres::PgFleet,
    ) -> anyhow::Result<()> {
        let all = vec![true; self.list.len()];
        let all_of_them = which.is_none();
        let which = which.unwrap_or(&all);
        let now_ms = Timestamp::now().as_millisecond();
        let seeds = self
            .list
            .iter()
            .zip(which)
            .filter(|(_, w)| **w)
            .map(|(b, _)| {
                let m = Month::containing(now_ms, &b.tz);
                let scope = b.scope.clone();
                crate::ledger::postgres::BudgetSeed {
                    budget: b.name.clone(),
                    month: m.label(),
                    start_ms: m.start_ms,
                    end_ms: m.end_ms,
                    covers: Box::new(move |name, tags| {
                        scope.covers(name, &serde_json::from_str(tags).unwrap_or_default())
                    }),
                }
            })
            .collect();
        // At start a month's row is the fleet's figure; a budget a reload brings may find a
        // stale row (it was absent, or had another scope), so its row is recomputed.
        let figures = if all_of_them {
            pg.seed_budget_spend(seeds)?
        } else {
            pg.reseed_budget_spend(seeds)?
        };
        let mut figures = figures.into_iter();
        self.seed_only(which, |_, _| figures.next().unwrap_or(0));
        Ok(())
    }

    /// Statuses of every budget at `now_ms`.
    #[must_use]
    pub fn statuses(&self, now_ms: i64) -> Vec<Status> {
        self.list.iter().map(|b| b.status(now_ms)).collect()
    }

    /// Takes over the live figures of `old`'s budgets that continue here (same name, scope
    /// and time zone; limit, action and thresholds may change): each continuing budget shares
    /// the very state object of its predecessor, so calls admitted under the old config
    /// settle into it and its reservations count here. Called on the freshly built budgets of
    /// a reload, before they are shared. Returns whether each budget is new (renamed,
    /// re-scoped, or back after being absent): those start at 0 and are to be seeded from
    /// the ledger ([`Budgets::seed_only`]).
    pub fn carry_over(&mut self, old: &Self) -> Vec<bool> {
        self.list
            .iter_mut()
            .map(|b| {
                let Some(o) = old
                    .list
                    .iter()
                    .find(|o| o.name == b.name && o.scope == b.scope && o.tz_name == b.tz_name)
                else {
                    return true;
                };
                // Built just now and not shared yet: the only handle.
                let Some(fresh) = Arc::get_mut(b) else {
                    return true;
                };
                fresh.st = o.st.clone();
                false
            })
            .collect()
    }

    /// Admits a call under budgets `applicable`, reserving `reserve_pico` in each. A block
    /// budget that is spent, or that the reservation would take past its limit, refuses.
    ///
    /// # Errors
    /// The first block budget that refuses; nothing stays reserved then.
    pub fn admit(
        &self,
        applicable: &[usize],
        reserve_pico: i64,
        now_ms: i64,
    ) -> Result<Reservation, Exceeded> {
        let mut reservation = Reservation {
            held: Vec::with_capacity(applicable.len()),
            fleet: self.fleet,
        };
        for &i in applicable {
            let b = &self.list[i];
            b.roll(now_ms);
            let mut held = reserve_pico;
            let ok = if b.block {
                // Other replicas' reservations count against the limit as this one's do.
                let others = b.st.others.load(Ordering::Acquire);
                b.st.spent.load(Ordering::Acquire) < b.limit_pico
                    && b.st
                        .used
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                            let next = used.saturating_add(reserve_pico);
                            (next.saturating_add(others) <= b.limit_pico || reserve_pico == 0)
                                .then_some(next)
                        })
                        .is_ok()
            } else {
                // Saturating, and holding what was really added: an absurd reservation (a
                // call's worst case can be as large as an i64) cannot wrap the sum.
                let before =
                    b.st.used
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                            Some(used.saturating_add(reserve_pico))
                        })
                        .unwrap_or_else(|used| used);
                held = before.saturating_add(reserve_pico) - before;
                true
            };
            if !ok {
                let spent = b.spent_pico();
                let held =
                    b.st.used
                        .load(Ordering::Acquire)
                        .saturating_sub(spent)
                        .max(0)
                        .saturating_add(b.st.others.load(Ordering::Acquire).max(0));
                let left = b
                    .limit_pico
                    .saturating_sub(spent)
                    .saturating_sub(held)
                    .max(0);
                let exceeded = Exceeded {
                    name: b.name.clone(),
                    limit_usd: usd(b.limit_pico),
                    spend_usd: usd(spent),
                    reserve_usd: usd(reserve_pico),
                    held_usd: usd(held),
                    left_usd: usd(left),
                };
                reservation.release();
                return Err(exceeded);
            }
            reservation
                .held
                .push((Arc::new(BudgetRef(b.clone())), held));
        }
        Ok(reservation)
    }

    /// A reservation of nothing in the budgets `applicable`: for a call that was not
    /// admitted against them (a background response's GET) but whose cost still counts.
    #[must_use]
    pub fn unreserved(&self, applicable: &[usize]) -> Reservation {
        Reservation {
            held: applicable
                .iter()
                .map(|&i| (Arc::new(BudgetRef(self.list[i].clone())), 0))
                .collect(),
            fleet: self.fleet,
        }
    }

    /// Subtracts records the ledger writer committed from `unflushed`: `(budget, month,
    /// cost)` of each. A record of another month than the budget's current one is skipped
    /// (the month's roll already cleared it).
    pub fn committed<'a>(&self, written: impl IntoIterator<Item = (&'a str, &'a str, i64)>) {
        for (name, month, pico) in written {
            if let Some(b) = self.list.iter().find(|b| b.name == name)
                && b.month().label() == month
            {
                // Never below 0: a record settled before a reload's carry-over is not counted
                // twice in the other direction.
                let _ =
                    b.st.unflushed
                        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                            Some((u - pico).max(0))
                        });
            }
        }
    }

    /// What a fleet refresh sends and needs: each budget's month and this replica's own
    /// reservations, with `spent` and `unflushed` read before the shared figures are.
    #[must_use]
    pub fn fleet_marks(&self, now_ms: i64) -> Vec<FleetMark> {
        self.list
            .iter()
            .map(|b| {
                b.roll(now_ms);
                let month = b.month();
                let spent = b.st.spent.load(Ordering::Acquire);
                let unflushed = b.st.unflushed.load(Ordering::Acquire);
                let used = b.st.used.load(Ordering::Acquire);
                FleetMark {
                    budget: b.name.clone(),
                    month: month.label(),
                    start_ms: month.start_ms,
                    end_ms: month.end_ms,
                    spent,
                    unflushed,
                    own_reserved: (used - spent).max(0),
                }
            })
            .collect()
    }

    /// Takes in the fleet's figures read after `marks` (same order): committed month-to-date
    /// spend and the other replicas' reservations. Returns the thresholds now crossed and not
    /// yet marked fired, each marked fired here: the caller announces those the fleet lets
    /// it claim (`budget_alerts`), so each is announced once for the fleet.
    ///
    /// The new spend is `committed + unflushed`, applied as a difference so a call settling
    /// meanwhile is not lost. A record the writer committed between the marks and the read
    /// counts twice until the next refresh: the figure errs high, never low.
    #[must_use = "the alerts must be claimed and announced"]
    pub fn apply_fleet(
        &self,
        marks: &[FleetMark],
        figures: &[FleetFigure],
        now_ms: i64,
    ) -> Vec<Alert> {
        let mut alerts = Vec::new();
        for (mark, figure) in marks.iter().zip(figures) {
            let Some(b) = self.list.iter().find(|b| b.name == mark.budget) else {
                continue;
            };
            if b.month().label() != mark.month {
                continue; // rolled meanwhile: the next refresh reads the new month
            }
            let delta = figure.spent_pico.saturating_add(mark.unflushed) - mark.spent;
            let spent = b.st.spent.fetch_add(delta, Ordering::AcqRel) + delta;
            b.st.used.fetch_add(delta, Ordering::AcqRel);
            b.st.others
                .store(figure.others_reserved_pico.max(0), Ordering::Release);
            b.newly_crossed(spent, now_ms, &mut alerts);
        }
        alerts
    }
}

/// One budget's side of a fleet refresh (see [`Budgets::fleet_marks`]).
#[derive(Debug, Clone)]
pub struct FleetMark {
    /// Budget name.
    pub budget: String,
    /// `YYYY-MM` in its time zone.
    pub month: String,
    /// The month's start, Unix ms.
    pub start_ms: i64,
    /// The month's end (exclusive), Unix ms.
    pub end_ms: i64,
    /// `spent` when marked.
    pub spent: i64,
    /// `unflushed` when marked.
    pub unflushed: i64,
    /// This replica's reservations in flight.
    pub own_reserved: i64,
}

/// The fleet's figures for one budget month.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetFigure {
    /// Committed month-to-date spend of every replica.
    pub spent_pico: i64,
    /// Reservations the other replicas published recently.
    pub others_reserved_pico: i64,
}

impl Budget {
    /// Adds an alert for each threshold `spent` has reached that was not marked fired yet,
    /// marking it (so of racing callers, one announces it).
    fn newly_crossed(&self, spent: i64, now_ms: i64, alerts: &mut Vec<Alert>) {
        for (i, f) in self.alert_at.iter().enumerate() {
            let bit = 1u64 << i;
            if crossed(spent, self.limit_pico, *f)
                && self.st.fired.fetch_or(bit, Ordering::AcqRel) & bit == 0
            {
                alerts.push(self.alert(*f, spent, now_ms));
            }
        }
    }

    fn alert(&self, fraction: f64, spent: i64, now_ms: i64) -> Alert {
        Alert {
            budget: self.name.clone(),
            scope: self.scope.describe(),
            limit_usd: usd(self.limit_pico).to_string(),
            spend_usd: usd(spent).to_string(),
            fraction,
            forecast_usd: usd(self.forecast_pico(now_ms)).to_string(),
            month: self.month().label(),
            timezone: self.tz_name.clone(),
        }
    }
}

impl Reservation {
    /// Replaces the reservation with the real cost (`None`: unpriced, counts as 0) and
    /// returns the alerts this call's spend triggered.
    #[must_use = "the alerts must be sent"]
    pub fn settle(mut self, actual_pico: Option<i64>, now_ms: i64) -> Vec<Alert> {
        let actual = actual_pico.unwrap_or(0).max(0);
        let mut alerts = Vec::new();
        for (b, reserved) in std::mem::take(&mut self.held) {
            let b = &b.0;
            b.roll(now_ms);
            b.st.unflushed.fetch_add(actual, Ordering::AcqRel);
            b.st.used.fetch_add(actual - reserved, Ordering::AcqRel);
            let spent = b.st.spent.fetch_add(actual, Ordering::AcqRel) + actual;
            if self.fleet {
                continue; // announced by the fleet refresh, once for the fleet
            }
            b.newly_crossed(spent, now_ms, &mut alerts);
        }
        alerts
    }

    /// Gives the reservation back unspent (the call never reached the upstream).
    pub fn release(&mut self) {
        for (b, reserved) in self.held.drain(..) {
            b.0.st.used.fetch_sub(reserved, Ordering::AcqRel);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        s.parse::<Timestamp>().expect("timestamp").as_millisecond()
    }

    #[test]
    fn utc_months_of_28_to_31_days() {
        let utc = TimeZone::UTC;
        let feb = Month::containing(ms("2027-02-14T12:00:00Z"), &utc);
        assert_eq!(
            (feb.start_ms, feb.end_ms),
            (ms("2027-02-01T00:00:00Z"), ms("2027-03-01T00:00:00Z"))
        );
        assert_eq!((feb.end_ms - feb.start_ms) / 86_400_000, 28);
        let leap = Month::containing(ms("2028-02-29T23:59:59Z"), &utc);
        assert_eq!((leap.end_ms - leap.start_ms) / 86_400_000, 29);
        let dec = Month::containing(ms("2026-12-31T23:59:59.999Z"), &utc);
        assert_eq!(dec.end_ms, ms("2027-01-01T00:00:00Z"));
        assert_eq!(dec.label(), "2026-12");
        let apr = Month::containing(ms("2026-04-30T10:00:00Z"), &utc);
        assert_eq!((apr.end_ms - apr.start_ms) / 86_400_000, 30);
        // The first millisecond of a month belongs to it.
        assert_eq!(
            Month::containing(ms("2027-01-01T00:00:00Z"), &utc).label(),
            "2027-01"
        );
    }

    #[test]
    fn zoned_months_follow_local_midnight_across_dst() {
        let ny = TimeZone::get("America/New_York").expect("tz");
        // 03:30 UTC on 1 March is still 28 February in New York (EST, UTC-5).
        let m = Month::containing(ms("2026-03-01T03:30:00Z"), &ny);
        assert_eq!(m.label(), "2026-02");
        let march = Month::containing(ms("2026-03-15T12:00:00Z"), &ny);
        // Starts at EST midnight, ends at EDT midnight: DST began on 8 March.
        assert_eq!(march.start_ms, ms("2026-03-01T05:00:00Z"));
        assert_eq!(march.end_ms, ms("2026-04-01T04:00:00Z"));
        assert_eq!(march.end_ms - march.start_ms, 31 * 86_400_000 - 3_600_000);
        let berlin = TimeZone::get("Europe/Berlin").expect("tz");
        let oct = Month::containing(ms("2026-10-31T22:59:59Z"), &berlin);
        assert_eq!(oct.label(), "2026-10");
        assert_eq!(
            oct.end_ms,
            ms("2026-10-31T23:00:00Z"),
            "CET midnight after the DST end"
        );
        let tokyo = TimeZone::get("Asia/Tokyo").expect("tz");
        assert_eq!(
            Month::containing(ms("2026-11-30T15:00:00Z"), &tokyo).label(),
            "2026-12"
        );
    }

    fn budgets(block: bool, limit: &str) -> Budgets {
        let text = format!(
            r#"
            [upstream]
            base_url = "https://x.example"
            [[projects]]
            name = "P"
            id = "proj_p"
            tags = {{ Team = "T" }}
            [[budgets]]
            name = "b"
            project = "P"
            monthly_usd = "{limit}"
            action = "{}"
            alert_at = [0.5, 1.0]
            "#,
            if block { "block" } else { "alert" }
        );
        let config = Config::from_toml(&text).expect("valid");
        Budgets::from_config(&config, ms("2026-11-10T00:00:00Z")).expect("budgets")
    }

    const PICO: i64 = 1_000_000_000_000;

    #[test]
    fn absurd_reservations_saturate_and_give_back_what_they_took() {
        let now = ms("2026-11-10T00:00:00Z");
        // An alert budget takes every call: two worst cases as large as an i64 saturate the
        // sum instead of wrapping it negative, and each gives back what it really added.
        let b = budgets(false, "10");
        let first = b.admit(&[0], i64::MAX, now).expect("alert budgets admit");
        let second = b.admit(&[0], i64::MAX, now).expect("alert budgets admit");
        assert_eq!(b.list[0].st.used.load(Ordering::Acquire), i64::MAX);
        assert!(b.statuses(now)[0].reserved_usd.starts_with("9223372.03"));
        drop(second);
        drop(first);
        assert_eq!(b.list[0].st.used.load(Ordering::Acquire), 0);
        let r = b.admit(&[0], i64::MAX, now).expect("alert");
        let _ = r.settle(Some(PICO), now);
        assert_eq!(b.list[0].st.used.load(Ordering::Acquire), PICO);
        assert_eq!(b.list[0].spent_pico(), PICO);
        // A block budget refuses one, and says what it would have reserved.
        let b = budgets(true, "10");
        let err = b.admit(&[0], i64::MAX, now).expect_err("too large");
        assert_eq!(err.reserve_usd, from_pico_usd(i64::MAX));
        assert_eq!(err.spend_usd, Decimal::ZERO);
        assert_eq!(b.list[0].st.used.load(Ordering::Acquire), 0);
    }

    fn from_pico_usd(pico: i64) -> Decimal {
        pricing::from_pico(pico)
    }

    #[test]
    fn reservations_hold_the_line_under_concurrency() {
        let b = Arc::new(budgets(true, "10"));
        let now = ms("2026-11-10T00:00:00Z");
        // 50 threads each try to reserve $1 against $10: exactly 10 get in.
        let handles: Vec<_> = (0..50)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || b.admit(&[0], PICO, now).ok())
            })
            .collect();
        let admitted: Vec<Reservation> = handles
            .into_iter()
            .filter_map(|h| h.join().expect("thread"))
            .collect();
        assert_eq!(admitted.len(), 10);
        for r in admitted {
            let _ = r.settle(Some(PICO), now);
        }
        assert_eq!(b.list[0].spent_pico(), 10 * PICO);
        let err = b.admit(&[0], 0, now).expect_err("spent");
        assert_eq!(err.name, "b");
        assert_eq!(err.limit_usd, Decimal::from(10));
    }

    #[test]
    fn settling_replaces_the_reservation_and_releasing_gives_it_back() {
        let b = budgets(true, "10");
        let now = ms("2026-11-10T00:00:00Z");
        let r = b.admit(&[0], 8 * PICO, now).expect("fits");
        assert!(b.admit(&[0], 3 * PICO, now).is_err(), "8 + 3 > 10");
        let _ = r.settle(Some(PICO), now);
        let r = b.admit(&[0], 9 * PICO, now).expect("1 + 9 fits");
        drop(r);
        assert_eq!(b.list[0].status(now).reserved_usd, "0");
        assert_eq!(b.list[0].status(now).spend_usd, "1");
    }

    #[test]
    fn alert_budgets_never_refuse_and_each_threshold_fires_once() {
        let b = budgets(false, "10");
        let now = ms("2026-11-10T00:00:00Z");
        let fired: Vec<f64> = (0..12)
            .flat_map(|_| {
                b.admit(&[0], PICO, now)
                    .expect("alert budgets admit")
                    .settle(Some(PICO), now)
            })
            .map(|a| a.fraction)
            .collect();
        assert_eq!(fired, [0.5, 1.0]);
    }

    #[test]
    fn a_new_month_starts_from_zero() {
        let b = budgets(true, "10");
        let now = ms("2026-11-30T23:00:00Z");
        let _ = b
            .admit(&[0], 0, now)
            .expect("ok")
            .settle(Some(10 * PICO), now);
        assert!(b.admit(&[0], 0, now).is_err());
        let december = ms("2026-12-01T00:00:00Z");
        assert!(b.admit(&[0], PICO, december).is_ok());
        assert_eq!(b.list[0].status(december).month, "2026-12");
    }

    #[test]
    fn forecast_is_linear_over_the_month() {
        let b = budgets(false, "100");
        // November has 30 days; a third of it gone with $10 spent projects $30.
        let now = ms("2026-11-11T00:00:00Z");
        let _ = b
            .admit(&[0], 0, now)
            .expect("ok")
            .settle(Some(10 * PICO), now);
        assert_eq!(b.list[0].status(now).forecast_usd, "30");
    }

    fn fleet(mut b: Budgets) -> Budgets {
        b.fleet = true;
        b
    }

    #[test]
    fn a_fleet_refresh_takes_the_shared_figure_and_keeps_uncommitted_own_spend() {
        let b = fleet(budgets(true, "10"));
        let now = ms("2026-11-10T00:00:00Z");
        // This replica spent 2; the writer committed 1 of it so far.
        let _ = b
            .admit(&[0], 2 * PICO, now)
            .expect("fits")
            .settle(Some(2 * PICO), now);
        b.committed([("b", "2026-11", PICO)]);
        let marks = b.fleet_marks(now);
        assert_eq!((marks[0].spent, marks[0].unflushed), (2 * PICO, PICO));
        // Meanwhile one more call settles here; the fleet's committed figure is 5 (this
        // replica's committed 1, the others' 4), and the others hold 3 in flight.
        let _ = b
            .admit(&[0], 0, now)
            .expect("fits")
            .settle(Some(PICO / 2), now);
        let figures = [FleetFigure {
            spent_pico: 5 * PICO,
            others_reserved_pico: 3 * PICO,
        }];
        let alerts = b.apply_fleet(&marks, &figures, now);
        assert_eq!(alerts.len(), 1, "the fleet's 65% crossed 50%: {alerts:?}");
        let status = b.list[0].status(now);
        assert_eq!(
            status.spend_usd, "6.5",
            "5 committed + 1 uncommitted + 0.5 settled meanwhile"
        );
        assert_eq!(status.other_replicas_reserved_usd, "3");
        // 6.5 spent + 3 reserved elsewhere: 0.5 is left for this replica.
        assert!(b.admit(&[0], PICO, now).is_err(), "6.5 + 3 + 1 > 10");
        let r = b.admit(&[0], PICO / 2, now).expect("6.5 + 3 + 0.5 fits");
        drop(r);
    }

    #[test]
    fn in_a_fleet_thresholds_are_announced_by_the_refresh_once() {
        let b = fleet(budgets(false, "10"));
        let now = ms("2026-11-10T00:00:00Z");
        let alerts = b
            .admit(&[0], 0, now)
            .expect("alert budgets admit")
            .settle(Some(6 * PICO), now);
        assert!(
            alerts.is_empty(),
            "a fleet's calls leave alerts to the refresh"
        );
        let marks = b.fleet_marks(now);
        let figure = [FleetFigure {
            spent_pico: 0,
            others_reserved_pico: 0,
        }];
        let alerts = b.apply_fleet(&marks, &figure, now);
        assert_eq!(alerts.len(), 1, "50% crossed: {alerts:?}");
        assert!((alerts[0].fraction - 0.5).abs() < f64::EPSILON);
        assert_eq!(alerts[0].spend_usd, "6");
        // The writer commits the call; the next refresh finds 50% fired already.
        b.committed([("b", "2026-11", 6 * PICO)]);
        let marks = b.fleet_marks(now);
        let figure = [FleetFigure {
            spent_pico: 6 * PICO,
            others_reserved_pico: 0,
        }];
        assert!(b.apply_fleet(&marks, &figure, now).is_empty());
        let marks = b.fleet_marks(now);
        let figure = [FleetFigure {
            spent_pico: 11 * PICO,
            others_reserved_pico: 0,
        }];
        let alerts = b.apply_fleet(&marks, &figure, now);
        assert_eq!(alerts.len(), 1);
        assert!((alerts[0].fraction - 1.0).abs() < f64::EPSILON);
    }

    #[test]
    fn committed_spend_of_another_month_or_more_than_pending_changes_nothing_below_zero() {
        let b = budgets(true, "10");
        let now = ms("2026-11-10T00:00:00Z");
        let _ = b.admit(&[0], 0, now).expect("fits").settle(Some(PICO), now);
        b.committed([("b", "2026-10", PICO), ("other", "2026-11", PICO)]);
        assert_eq!(b.fleet_marks(now)[0].unflushed, PICO);
        b.committed([("b", "2026-11", 3 * PICO)]);
        assert_eq!(b.fleet_marks(now)[0].unflushed, 0);
    }

    #[test]
    fn a_continuing_budget_keeps_its_state_and_a_new_one_is_flagged_for_seeding() {
        let now = ms("2026-11-10T00:00:00Z");
        let old = budgets(true, "10");
        let _ = old
            .admit(&[0], 0, now)
            .expect("fits")
            .settle(Some(2 * PICO), now);
        let in_flight = old.admit(&[0], 3 * PICO, now).expect("fits");
        // The limit changes: the budget continues.
        let mut next = budgets(true, "6");
        assert_eq!(next.carry_over(&old), [false]);
        assert_eq!(next.list[0].status(now).reserved_usd, "3");
        assert!(next.admit(&[0], 2 * PICO, now).is_err(), "2 + 3 + 2 > 6");
        // The call admitted under the old config settles into the budget as it continues.
        let _ = in_flight.settle(Some(PICO), now);
        let status = next.list[0].status(now);
        assert_eq!(
            (status.spend_usd.as_str(), status.reserved_usd.as_str()),
            ("3", "0")
        );
        // Renamed: a new budget, to be seeded.
        let text = r#"
            [upstream]
            base_url = "https://x.example"
            [[projects]]
            name = "P"
            id = "proj_p"
            [[budgets]]
            name = "renamed"
            project = "P"
            monthly_usd = "10"
            "#;
        let config = Config::from_toml(text).expect("valid");
        let mut renamed = Budgets::from_config(&config, now).expect("budgets");
        assert_eq!(renamed.carry_over(&next), [true]);
        assert_eq!(renamed.list[0].status(now).spend_usd, "0");
    }

    #[test]
    fn an_unreserved_settlement_counts_its_cost() {
        let b = budgets(true, "10");
        let now = ms("2026-11-10T00:00:00Z");
        let alerts = b.unreserved(&[0]).settle(Some(6 * PICO), now);
        assert_eq!(alerts.len(), 1, "alone, the call announces 50%");
        assert_eq!(b.list[0].status(now).spend_usd, "6");
        assert_eq!(b.list[0].status(now).reserved_usd, "0");
    }
}
