//! What the replicas of a fleet share through the `PostgreSQL` ledger beside the calls: the
//! budgets' month-to-date figures (seeded from the calls), each replica's reservations, the
//! claims to announce a budget alert, the background responses still pending, and the
//! webhook outbox.

use std::collections::HashMap;
use std::sync::Arc;

use super::reader::{SpendRows, existing_budget_rows, spend_rows};
use super::{Db, PgReader, now_ms, text};

/// The fleet's writes outside the ledger's writer thread: shared budget figures,
/// reservations, alert claims, pending background responses, the webhook outbox and
/// retention. Made by [`PgReader::fleet`] (sharing its connections) or [`PgFleet::connect`].
pub struct PgFleet {
    db: Arc<Db>,
}

/// One budget month for [`PgFleet::seed_budget_spend`].
pub struct BudgetSeed {
    /// Budget name.
    pub budget: String,
    /// `YYYY-MM` in the budget's time zone (as in `Record::budget_months`).
    pub month: String,
    /// The month's start, Unix ms.
    pub start_ms: i64,
    /// The month's end (exclusive), Unix ms.
    pub end_ms: i64,
    /// Whether calls of a project `(name, tags JSON)` count against the budget.
    pub covers: Box<Covers>,
}

/// A budget's scope as a predicate over a project's name and tags JSON.
pub type Covers = dyn Fn(&str, &str) -> bool + Send;

impl PgFleet {
    pub(super) fn new(db: Arc<Db>) -> Self {
        Self { db }
    }

    /// Connects as [`PgReader::connect`] does, for the fleet's writes.
    ///
    /// # Errors
    /// Connection errors, no ledger schema, or another schema version.
    pub fn connect(url: &str) -> anyhow::Result<Self> {
        Ok(PgReader::connect(url)?.fleet())
    }

    pub(super) fn db(&self) -> &Db {
        &self.db
    }

    /// Gives each budget month without a `budget_spend` row one, seeded from the calls it
    /// covers, and returns every month's figure (in order). Call it before a budget that is
    /// new (a config change mid-month) starts being written: rows are otherwise created by
    /// the first call written against them and would miss the month's earlier spend.
    ///
    /// Exact under concurrent writers: the seeding holds a lock that conflicts with their
    /// upserts, so a call committed before it is in the sum and one committed after it adds
    /// itself. The lock is taken only when a row is missing; writers wait for the time of one
    /// spend query over the month's calls.
    ///
    /// # Errors
    /// Storage errors.
    pub fn seed_budget_spend(&self, seeds: Vec<BudgetSeed>) -> anyhow::Result<Vec<i64>> {
        self.seed_budget_rows(seeds, false)
    }

    /// Sets each budget month's `budget_spend` row to the spend of the calls it covers, as
    /// [`PgFleet::seed_budget_spend`] creates a missing one: for budgets a reload brings
    /// (new, re-scoped, or back after an absence during which no record named them), whose
    /// row may be missing, stale or another scope's. Returns the figures, in order.
    ///
    /// # Errors
    /// Storage errors.
    pub fn reseed_budget_spend(&self, seeds: Vec<BudgetSeed>) -> anyhow::Result<Vec<i64>> {
        self.seed_budget_rows(seeds, true)
    }

    fn seed_budget_rows(
        &self,
        seeds: Vec<BudgetSeed>,
        overwrite: bool,
    ) -> anyhow::Result<Vec<i64>> {
        let keys: Vec<(String, String)> = seeds
            .iter()
            .map(|s| (s.budget.clone(), s.month.clone()))
            .collect();
        let (budgets, months): (Vec<String>, Vec<String>) = keys.iter().cloned().unzip();
        let present = self.db.query({
            let (budgets, months) = (budgets.clone(), months.clone());
            move |c| async move { existing_budget_rows(&**c, &budgets, &months).await }
        })?;
        if !overwrite && keys.iter().all(|k| present.contains_key(k)) {
            return Ok(keys.iter().map(|k| present[k]).collect());
        }
        self.db.query(move |mut c| async move {
            let tx = c.transaction().await?;
            tx.batch_execute("LOCK TABLE budget_spend IN SHARE ROW EXCLUSIVE MODE")
                .await?;
            let present = existing_budget_rows(&*tx, &budgets, &months).await?;
            let mut spend: HashMap<(i64, i64), SpendRows> = HashMap::new();
            let mut figures = Vec::with_capacity(seeds.len());
            for seed in seeds {
                let key = (seed.budget.clone(), seed.month.clone());
                if let Some(&v) = present.get(&key)
                    && !overwrite
                {
                    figures.push(v);
                    continue;
                }
                let bounds = (seed.start_ms, seed.end_ms);
                if let std::collections::hash_map::Entry::Vacant(e) = spend.entry(bounds) {
                    e.insert(spend_rows(&*tx, bounds.0, bounds.1).await?);
                }
                let total = spend.get(&bounds).map_or(0, |rows| {
                    rows.iter()
                        .filter(|(project, tags, _)| (seed.covers)(project, tags))
                        .fold(0i64, |sum, (_, _, pico)| sum.saturating_add(*pico))
                });
                tx.execute(
                    if overwrite {
                        "INSERT INTO budget_spend (budget, month, spent_pico) VALUES ($1, $2, $3)
                         ON CONFLICT (budget, month) DO UPDATE SET spent_pico = excluded.spent_pico"
                    } else {
                        "INSERT INTO budget_spend (budget, month, spent_pico) VALUES ($1, $2, $3)
                         ON CONFLICT (budget, month) DO NOTHING"
                    },
                    &[&key.0, &key.1, &total],
                )
                .await?;
                figures.push(total);
            }
            tx.commit().await?;
            Ok(figures)
        })
    }

    /// One fleet refresh, in one transaction: publishes this replica's reservations per
    /// budget month (`marks`: budget, month, pico-dollars reserved), and returns for each, in
    /// order, the committed month-to-date spend and the sum of the other replicas'
    /// reservations published since `fresh_after_ms`. Rows older than a day are deleted.
    ///
    /// # Errors
    /// Storage errors.
    pub fn sync_fleet(
        &self,
        replica: &str,
        marks: Vec<(String, String, i64)>,
        fresh_after_ms: i64,
    ) -> anyhow::Result<Vec<(i64, i64)>> {
        let replica = replica.to_owned();
        let now = now_ms();
        self.db.query(move |mut c| async move {
            let mut budgets = Vec::with_capacity(marks.len());
            let mut months = Vec::with_capacity(marks.len());
            let mut reserved = Vec::with_capacity(marks.len());
            for (b, m, r) in marks {
                budgets.push(b);
                months.push(m);
                reserved.push(r);
            }
            let tx = c.transaction().await?;
            tx.execute(
                "INSERT INTO budget_reserved (replica, budget, month, reserved_pico, updated_ms)
                 SELECT $1, q.budget, q.month, q.reserved, $5
                 FROM unnest($2::text[], $3::text[], $4::bigint[]) AS q(budget, month, reserved)
                 ORDER BY 2, 3
                 ON CONFLICT (budget, month, replica) DO UPDATE
                 SET reserved_pico = excluded.reserved_pico, updated_ms = excluded.updated_ms",
                &[&replica, &budgets, &months, &reserved, &now],
            )
            .await?;
            tx.execute(
                "DELETE FROM budget_reserved WHERE updated_ms < $1",
                &[&(now - 86_400_000)],
            )
            .await?;
            let rows = tx
                .query(
                    "SELECT COALESCE(s.spent_pico, 0),
                        COALESCE((SELECT sum(r.reserved_pico) FROM budget_reserved r
                            WHERE r.budget = q.budget AND r.month = q.month
                            AND r.replica <> $3 AND r.updated_ms >= $4), 0)::bigint
                     FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS q(budget, month, i)
                     LEFT JOIN budget_spend s USING (budget, month)
                     ORDER BY q.i",
                    &[&budgets, &months, &replica, &fresh_after_ms],
                )
                .await?;
            tx.commit().await?;
            Ok(rows
                .iter()
                .map(|r| Ok::<_, tokio_postgres::Error>((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<_, _>>()?)
        })
    }

    /// Claims the right to announce each `(budget, month, threshold)`: `true` for those this
    /// replica is the first to claim (it announces them), `false` where another did.
    ///
    /// # Errors
    /// Storage errors.
    pub fn claim_alerts(
        &self,
        replica: &str,
        alerts: Vec<(String, String, String)>,
    ) -> anyhow::Result<Vec<bool>> {
        let alerts = alerts
            .into_iter()
            .map(|(budget, month, threshold)| AlertClaim {
                budget,
                month,
                threshold,
                delivery: None,
            })
            .collect();
        self.claim_and_queue_alerts(replica, alerts)
    }

    /// [`claim_alerts`](Self::claim_alerts) that also puts each claimed alert's `delivery`
    /// into the webhook outbox, in the same transaction: an alert the fleet claims is queued
    /// for delivery, or not claimed at all.
    ///
    /// # Errors
    /// Storage errors (nothing is claimed then).
    pub fn claim_and_queue_alerts(
        &self,
        replica: &str,
        alerts: Vec<AlertClaim>,
    ) -> anyhow::Result<Vec<bool>> {
        let replica = replica.to_owned();
        let now = now_ms();
        self.db.query(move |mut c| async move {
            let tx = c.transaction().await?;
            let mut claimed = Vec::with_capacity(alerts.len());
            for a in &alerts {
                let n = tx
                    .execute(
                        "INSERT INTO budget_alerts (budget, month, threshold, replica, fired_ms)
                         VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
                        &[&a.budget, &a.month, &a.threshold, &replica, &now],
                    )
                    .await?;
                if n == 1
                    && let Some(e) = &a.delivery
                {
                    tx.execute(OUTBOX_ADD_SQL, &[&e.id, &e.created_ms, &text(&e.body)])
                        .await?;
                }
                claimed.push(n == 1);
            }
            tx.commit().await?;
            Ok(claimed)
        })
    }

    /// Withdraws this replica's published reservations (at shutdown).
    ///
    /// # Errors
    /// Storage errors.
    pub fn withdraw_replica(&self, replica: &str) -> anyhow::Result<()> {
        let replica = replica.to_owned();
        self.db.query(move |c| async move {
            c.execute(
                "DELETE FROM budget_reserved WHERE replica = $1",
                &[&replica],
            )
            .await?;
            Ok(())
        })
    }

    /// The `(project id, model)` of a background response still pending, without taking it
    /// (the replica that meters its finished GET takes it, in the ledger write).
    ///
    /// # Errors
    /// Storage errors.
    pub fn pending_response(
        &self,
        response_id: &str,
    ) -> anyhow::Result<Option<(String, Option<String>)>> {
        let id = response_id.to_owned();
        self.db.query(move |c| async move {
            let row = c
                .query_opt(
                    "SELECT project_id, model FROM pending_background WHERE response_id = $1",
                    &[&id],
                )
                .await?;
            Ok(row
                .map(|r| Ok::<_, tokio_postgres::Error>((r.try_get(0)?, r.try_get(1)?)))
                .transpose()?)
        })
    }
}

/// A budget threshold to claim for the fleet ([`PgFleet::claim_and_queue_alerts`]).
#[derive(Debug, Clone)]
pub struct AlertClaim {
    /// Budget name.
    pub budget: String,
    /// `YYYY-MM` in the budget's time zone.
    pub month: String,
    /// The fraction crossed, as text.
    pub threshold: String,
    /// What to queue for the webhook when the claim is this replica's (None: no webhook).
    pub delivery: Option<crate::ledger::outbox::Entry>,
}

const OUTBOX_ADD_SQL: &str = "INSERT INTO webhook_outbox (id, created_ms, body, next_attempt_ms)
    VALUES ($1, $2, $3, $2) ON CONFLICT (id) DO NOTHING";

/// Advisory lock taken by every outbox claim, so that the check for a running lease and the
/// claim are one step for the fleet.
const OUTBOX_LOCK: i64 = 0x6d67_6c65_6467_0003;

/// The fleet's webhook outbox. A claim takes [`OUTBOX_LOCK`], so of replicas claiming at
/// once one looks at a time: no claim succeeds while a lease runs, so the endpoint has one
/// attempt in flight for the whole fleet, and a row is never attempted by two replicas at once
/// (`FOR UPDATE SKIP LOCKED` as well, should the lock ever be dropped).
impl crate::ledger::outbox::Outbox for PgFleet {
    fn add(&self, entries: &[crate::ledger::outbox::Entry]) -> anyhow::Result<()> {
        let entries = entries.to_vec();
        self.db.query(move |mut c| async move {
            let tx = c.transaction().await?;
            for e in &entries {
                tx.execute(OUTBOX_ADD_SQL, &[&e.id, &e.created_ms, &text(&e.body)])
                    .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn claim(
        &self,
        owner: &str,
        now_ms: i64,
        lease_until_ms: i64,
    ) -> anyhow::Result<crate::ledger::outbox::Claim> {
        use crate::ledger::outbox::{Claim, Entry};
        let owner = owner.to_owned();
        self.db.query(move |mut c| async move {
            let tx = c.transaction().await?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&OUTBOX_LOCK])
                .await?;
            let busy: Option<i64> = tx
                .query_one(
                    "SELECT max(lease_until_ms) FROM webhook_outbox WHERE lease_until_ms > $1",
                    &[&now_ms],
                )
                .await?
                .try_get(0)?;
            if let Some(until_ms) = busy {
                tx.commit().await?;
                return Ok(Claim::Busy { until_ms });
            }
            let row = tx
                .query_opt(
                    "UPDATE webhook_outbox SET attempts = attempts + 1, lease_owner = $2,
                        lease_until_ms = $3
                     WHERE id = (SELECT id FROM webhook_outbox WHERE next_attempt_ms <= $1
                        ORDER BY next_attempt_ms, created_ms LIMIT 1 FOR UPDATE SKIP LOCKED)
                     RETURNING id, created_ms, body, attempts",
                    &[&now_ms, &owner, &lease_until_ms],
                )
                .await?;
            let claim = match row {
                Some(r) => Claim::Row {
                    entry: Entry {
                        id: r.try_get(0)?,
                        created_ms: r.try_get(1)?,
                        body: r.try_get(2)?,
                    },
                    attempt: u32::try_from(r.try_get::<_, i32>(3)?).unwrap_or(u32::MAX),
                },
                None => Claim::Idle {
                    next_ms: tx
                        .query_one("SELECT min(next_attempt_ms) FROM webhook_outbox", &[])
                        .await?
                        .try_get(0)?,
                },
            };
            tx.commit().await?;
            Ok(claim)
        })
    }

    fn delivered(&self, id: &str) -> anyhow::Result<()> {
        let id = id.to_owned();
        self.db.query(move |c| async move {
            c.execute("DELETE FROM webhook_outbox WHERE id = $1", &[&id])
                .await?;
            Ok(())
        })
    }

    fn failed(&self, id: &str, owner: &str, next_ms: i64) -> anyhow::Result<()> {
        let (id, owner) = (id.to_owned(), owner.to_owned());
        self.db.query(move |c| async move {
            c.execute(
                "UPDATE webhook_outbox SET next_attempt_ms = $3, lease_owner = NULL,
                    lease_until_ms = 0
                 WHERE id = $1 AND lease_owner = $2",
                &[&id, &owner, &next_ms],
            )
            .await?;
            Ok(())
        })
    }

    fn expire(
        &self,
        created_before_ms: i64,
        now_ms: i64,
    ) -> anyhow::Result<Vec<crate::ledger::outbox::Entry>> {
        self.db.query(move |c| async move {
            let rows = c
                .query(
                    "DELETE FROM webhook_outbox WHERE created_ms < $1 AND lease_until_ms <= $2
                     RETURNING id, created_ms, body",
                    &[&created_before_ms, &now_ms],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| {
                    Ok::<_, tokio_postgres::Error>(crate::ledger::outbox::Entry {
                        id: r.try_get(0)?,
                        created_ms: r.try_get(1)?,
                        body: r.try_get(2)?,
                    })
                })
                .collect::<Result<_, _>>()?)
        })
    }
}
