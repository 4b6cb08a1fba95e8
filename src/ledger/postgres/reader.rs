//! The `PostgreSQL` [`LedgerRead`]: reports, lookups, exports and the shared budget figures,
//! read only (the fleet's writes are [`PgFleet`]'s).

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use tokio_postgres::GenericClient;

use super::schema::{SCHEMA_VERSION, refuse_newer, schema_version};
use super::writer::CALL_COLUMNS;
use super::{Db, Driver, PgFleet, pool};
use crate::ledger::LedgerRead;
use crate::ledger::read::{DailyRow, Period};
use crate::ledger::transfer::{CallRow, RecordSource};

/// Rows per page of an export.
const EXPORT_PAGE: i64 = 5000;

/// The `PostgreSQL` [`LedgerRead`], with the fleet's shared budget figures; it never writes.
pub struct PgReader {
    db: Arc<Db>,
}

/// Priced spend per project and tag set: `(project name, tags JSON, pico-dollars)`.
pub(super) type SpendRows = Vec<(String, String, i64)>;

/// The `budget_spend` figures of the `(budget, month)` pairs that have a row.
pub(super) async fn existing_budget_rows(
    client: &impl GenericClient,
    budgets: &[String],
    months: &[String],
) -> anyhow::Result<HashMap<(String, String), i64>> {
    let rows = client
        .query(
            "SELECT s.budget, s.month, s.spent_pico
             FROM unnest($1::text[], $2::text[]) AS q(budget, month)
             JOIN budget_spend s USING (budget, month)",
            &[&budgets, &months],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Ok(((r.try_get(0)?, r.try_get(1)?), r.try_get(2)?)))
        .collect::<Result<_, tokio_postgres::Error>>()?)
}

const SPEND_SQL: &str = "SELECT COALESCE(project_name, ''), tags, sum(cost_pico)::bigint
    FROM calls WHERE ts_ms >= $1 AND ts_ms < $2 AND cost_pico IS NOT NULL
    GROUP BY project_name, tags";

/// Priced spend in `[start_ms, end_ms)` per project and tag set (as `spend_between`).
pub(super) async fn spend_rows(
    client: &impl GenericClient,
    start_ms: i64,
    end_ms: i64,
) -> anyhow::Result<SpendRows> {
    let rows = client.query(SPEND_SQL, &[&start_ms, &end_ms]).await?;
    Ok(rows
        .iter()
        .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
        .collect::<Result<_, tokio_postgres::Error>>()?)
}

const DAILY_SQL: &str = "SELECT day, key_name, route, project_name, project_id, tags, api,
    model, outcome, requests, input_tokens, cached_input_tokens, output_tokens,
    reasoning_tokens, cost_pico, unpriced_requests
    FROM daily WHERE day >= $1 AND day < $2";

impl PgReader {
    /// Connects for reading: the database must hold this build's schema (`serve` and
    /// `mantlegate migrate` apply it; reading never changes it).
    ///
    /// # Errors
    /// Connection errors, no ledger schema, or another schema version.
    pub fn connect(url: &str) -> anyhow::Result<Self> {
        let db = Db {
            driver: Driver::new("ledger-pg-reader")?,
            pool: pool(url, 4)?,
        };
        let version = db.query(|c| async move { schema_version(&**c).await })?;
        match version {
            None => anyhow::bail!(
                "the postgresql database holds no mantlegate ledger: run `mantlegate migrate`"
            ),
            Some(v) if v < SCHEMA_VERSION => anyhow::bail!(
                "the postgresql ledger has schema version {v}, older than this mantlegate's ({SCHEMA_VERSION}): run `mantlegate migrate`"
            ),
            Some(v) => refuse_newer(v)?,
        }
        Ok(Self { db: Arc::new(db) })
    }

    /// The fleet's writes (shared budget figures, reservations, alerts, the outbox,
    /// retention) over this reader's connections.
    #[must_use]
    pub fn fleet(&self) -> PgFleet {
        PgFleet::new(Arc::clone(&self.db))
    }

    /// Month-to-date spend (pico-dollars) of each `(budget, YYYY-MM)`, in order; 0 where
    /// nothing was spent. Replicas call it to refresh the fleet's shared figure.
    ///
    /// # Errors
    /// Storage errors.
    pub fn budget_spend(&self, budget_months: &[(String, String)]) -> anyhow::Result<Vec<i64>> {
        let (budgets, months): (Vec<String>, Vec<String>) = budget_months.iter().cloned().unzip();
        self.db.query(move |c| async move {
            let rows = c
                .query(
                    "SELECT COALESCE(s.spent_pico, 0)
                     FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS q(budget, month, i)
                     LEFT JOIN budget_spend s USING (budget, month)
                     ORDER BY q.i",
                    &[&budgets, &months],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?)
        })
    }

    /// Names of the partitions of `calls`, oldest first.
    ///
    /// # Errors
    /// Storage errors.
    pub fn partitions(&self) -> anyhow::Result<Vec<String>> {
        super::retention::partitions(&self.db)
    }
}

impl LedgerRead for PgReader {
    fn project_of_response(&self, response_id: &str) -> anyhow::Result<Option<String>> {
        let id = response_id.to_owned();
        self.db.lookup(move |c| async move {
            let row = c
                .query_opt(
                    "SELECT project_id FROM calls WHERE upstream_response_id = $1
                     AND project_id IS NOT NULL ORDER BY ts_ms LIMIT 1",
                    &[&id],
                )
                .await?;
            Ok(row.map(|r| r.try_get(0)).transpose()?)
        })
    }

    fn pending_background(&self) -> anyhow::Result<Vec<(String, String, Option<String>)>> {
        self.db.query(|c| async move {
            let rows = c
                .query(
                    "SELECT response_id, project_id, model FROM pending_background",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?)))
                .collect::<Result<_, tokio_postgres::Error>>()?)
        })
    }

    fn spend_between(
        &self,
        start_ms: i64,
        end_ms: i64,
    ) -> anyhow::Result<Vec<(String, String, i64)>> {
        self.db
            .query(move |c| async move { spend_rows(&**c, start_ms, end_ms).await })
    }

    fn last_used(&self) -> anyhow::Result<std::collections::HashMap<String, i64>> {
        self.db.query(|c| async move {
            let rows = c
                .query(
                    "SELECT key_fp, max(ts_ms) FROM calls WHERE key_fp IS NOT NULL GROUP BY key_fp",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
                .collect::<Result<_, tokio_postgres::Error>>()?)
        })
    }

    fn daily(&self, period: &Period) -> anyhow::Result<Vec<DailyRow>> {
        let (from, to) = (period.from.to_string(), period.to.to_string());
        self.db.query(move |c| async move {
            let rows = c.query(DAILY_SQL, &[&from, &to]).await?;
            let daily = rows
                .iter()
                .map(|r| {
                    Ok(DailyRow {
                        day: r.try_get(0)?,
                        key_name: r.try_get(1)?,
                        route: r.try_get(2)?,
                        project_name: r.try_get(3)?,
                        project_id: r.try_get(4)?,
                        tags: r.try_get(5)?,
                        api: r.try_get(6)?,
                        model: r.try_get(7)?,
                        outcome: r.try_get(8)?,
                        requests: r.try_get(9)?,
                        input_tokens: r.try_get(10)?,
                        cached_input_tokens: r.try_get(11)?,
                        output_tokens: r.try_get(12)?,
                        reasoning_tokens: r.try_get(13)?,
                        cost_pico: r.try_get(14)?,
                        unpriced_requests: r.try_get(15)?,
                    })
                })
                .collect::<Result<Vec<_>, tokio_postgres::Error>>()
                .with_context(|| format!("reading the daily roll-up from {from} to {to}"))?;
            Ok(daily)
        })
    }

    fn count(&self) -> anyhow::Result<i64> {
        self.db.query(|c| async move {
            Ok(c.query_one("SELECT count(*) FROM calls", &[])
                .await?
                .try_get(0)?)
        })
    }
}

fn call_row(r: &tokio_postgres::Row) -> Result<CallRow, tokio_postgres::Error> {
    let status: i32 = r.try_get(11)?;
    Ok(CallRow {
        ts_ms: r.try_get(0)?,
        request_id: r.try_get(1)?,
        key_name: r.try_get(2)?,
        key_fp: r.try_get(3)?,
        route: r.try_get(4)?,
        project_name: r.try_get(5)?,
        project_id: r.try_get(6)?,
        tags: r.try_get(7)?,
        api: r.try_get(8)?,
        model: r.try_get(9)?,
        stream: r.try_get(10)?,
        status: u16::try_from(status).unwrap_or(0),
        outcome: r.try_get(12)?,
        error_code: r.try_get(13)?,
        input_tokens: r.try_get(14)?,
        cached_input_tokens: r.try_get(15)?,
        output_tokens: r.try_get(16)?,
        reasoning_tokens: r.try_get(17)?,
        usage_source: r.try_get(18)?,
        cost_pico: r.try_get(19)?,
        duration_ms: r.try_get(20)?,
        ttfb_ms: r.try_get(21)?,
        upstream_response_id: r.try_get(22)?,
        call_id: r.try_get(23)?,
    })
}

impl RecordSource for PgReader {
    fn rows_between(
        &self,
        from_ms: i64,
        to_ms: i64,
        each: &mut dyn FnMut(CallRow) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        // Pages in (ts_ms, call_id) order (the key): each is a short query, however big the
        // range.
        let sql = format!(
            "SELECT {CALL_COLUMNS} FROM calls
             WHERE ts_ms >= $1 AND ts_ms < $2 AND (ts_ms, call_id) > ($3, $4)
             ORDER BY ts_ms, call_id LIMIT {EXPORT_PAGE}"
        );
        let mut after = (i64::MIN, String::new());
        loop {
            let sql = sql.clone();
            let (after_ts, after_id) = after.clone();
            let page = self.db.query(move |c| async move {
                let rows = c
                    .query(&sql, &[&from_ms, &to_ms, &after_ts, &after_id])
                    .await?;
                Ok(rows.iter().map(call_row).collect::<Result<Vec<_>, _>>()?)
            })?;
            let full = i64::try_from(page.len()).unwrap_or(i64::MAX) >= EXPORT_PAGE;
            if let Some(last) = page.last() {
                after = (last.ts_ms, last.call_id.clone().unwrap_or_default());
            }
            for row in page {
                each(row)?;
            }
            if !full {
                return Ok(());
            }
        }
    }
}
