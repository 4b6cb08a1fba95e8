//! The writer thread's `PostgreSQL` [`Store`]: batches of records in one idempotent
//! statement, partitions created ahead, imports in one transaction.

use std::collections::{BTreeSet, HashSet};
use std::time::Duration;

use anyhow::Context as _;
use deadpool_postgres::{Object, Pool};
use tokio_postgres::error::SqlState;

use super::schema::{PARTITION_LOCK, apply_migrations, create_partitions};
use super::{DDL_LOCK_TIMEOUT, Driver, MonthKey, connection, now_ms, opt_text, pool, text};
use crate::ledger::transfer::CallRow;
use crate::ledger::{Background, Record, Store};

/// One batch longer than this is abandoned (its connection closed) and retried.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The `calls` columns in insert order (`day` is the extra last column of the batch arrays).
pub(super) const CALL_COLUMNS: &str =
    "ts_ms, request_id, key_name, key_fp, route, project_name, project_id,
    tags, api, model, stream, status, outcome, error_code, input_tokens, cached_input_tokens,
    output_tokens, reasoning_tokens, usage_source, cost_pico, duration_ms, ttfb_ms,
    upstream_response_id, call_id";

/// One statement per batch, whatever its size: the rows arrive as arrays. A call is known by
/// its call id (mantlegate's own, never a client's or the upstream's); only the rows the
/// insert really adds (`RETURNING`) feed the daily and budget upserts, so a batch retried
/// after a commit whose answer was lost, or an import run twice, counts nothing twice.
/// Upserts go in key order, so two replicas touching the same rows lock them in the same
/// order (no deadlock). The roll-up keys a call the upstream did not answer with success under
/// the model `(rejected)`, and a model beyond the first `$29` of a key's day under `(other)`:
/// whatever models clients name, a key adds a bounded number of roll-up rows a day.
/// (Replicas writing at the same moment may each admit the last free places: a few more.)
const WRITE_SQL: &str = "WITH src AS (
    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[],
        $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::boolean[],
        $12::integer[], $13::text[], $14::text[], $15::bigint[], $16::bigint[], $17::bigint[],
        $18::bigint[], $19::text[], $20::bigint[], $21::float8[], $22::float8[], $23::text[],
        $24::text[], $25::text[])
    AS s(ts_ms, request_id, key_name, key_fp, route, project_name, project_id, tags, api,
        model, stream, status, outcome, error_code, input_tokens, cached_input_tokens,
        output_tokens, reasoning_tokens, usage_source, cost_pico, duration_ms, ttfb_ms,
        upstream_response_id, day, call_id)
), ins AS (
    INSERT INTO calls (call_id, ts_ms, request_id, key_name, key_fp, route, project_name,
        project_id, tags, api, model, stream, status, outcome, error_code, input_tokens,
        cached_input_tokens, output_tokens, reasoning_tokens, usage_source, cost_pico,
        duration_ms, ttfb_ms, upstream_response_id)
    SELECT call_id, ts_ms, request_id, key_name, key_fp, route, project_name, project_id, tags,
        api, model, stream, status, outcome, error_code, input_tokens, cached_input_tokens,
        output_tokens, reasoning_tokens, usage_source, cost_pico, duration_ms, ttfb_ms,
        upstream_response_id
    FROM src
    ON CONFLICT (call_id, ts_ms) DO NOTHING
    RETURNING call_id
), new AS (
    SELECT src.* FROM src JOIN ins USING (call_id)
), tagged AS (
    SELECT new.*, COALESCE(new.key_name, '') AS rkey,
        CASE WHEN new.status BETWEEN 200 AND 299 THEN COALESCE(new.model, '')
            ELSE '(rejected)' END AS rmodel
    FROM new
), fresh AS (
    SELECT DISTINCT t.day, t.rkey, t.rmodel FROM tagged t
    WHERE t.rmodel NOT IN ('(rejected)', '(other)') AND NOT EXISTS (
        SELECT 1 FROM daily WHERE daily.day = t.day AND daily.key_name = t.rkey
            AND daily.model = t.rmodel)
), counts AS (
    SELECT k.day, k.rkey, (SELECT count(DISTINCT model) FROM daily
        WHERE daily.day = k.day AND daily.key_name = k.rkey
            AND daily.model NOT IN ('(rejected)', '(other)')) AS have
    FROM (SELECT DISTINCT day, rkey FROM fresh) k
), ranked AS (
    SELECT f.day, f.rkey, f.rmodel,
        c.have + row_number() OVER (PARTITION BY f.day, f.rkey ORDER BY f.rmodel) AS nth
    FROM fresh f JOIN counts c USING (day, rkey)
), rolled AS (
    SELECT t.*, CASE WHEN r.nth > $29 THEN '(other)' ELSE t.rmodel END AS dmodel
    FROM tagged t LEFT JOIN ranked r USING (day, rkey, rmodel)
), d AS (
    INSERT INTO daily (day, key_name, route, project_name, project_id, tags, api, model,
        outcome, requests, input_tokens, cached_input_tokens, output_tokens, reasoning_tokens,
        cost_pico, unpriced_requests)
    SELECT day, rkey, COALESCE(route, ''), COALESCE(project_name, ''),
        COALESCE(project_id, ''), tags, COALESCE(api, ''), dmodel, outcome,
        count(*), sum(input_tokens)::bigint, sum(cached_input_tokens)::bigint,
        sum(output_tokens)::bigint, sum(reasoning_tokens)::bigint,
        COALESCE(sum(cost_pico), 0)::bigint, count(*) FILTER (WHERE cost_pico IS NULL)
    FROM rolled
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9
    ORDER BY 1, 2, 3, 4, 5, 6, 7, 8, 9
    ON CONFLICT (day, key_name, route, project_name, project_id, tags, api, model, outcome)
    DO UPDATE SET requests = daily.requests + excluded.requests,
        input_tokens = daily.input_tokens + excluded.input_tokens,
        cached_input_tokens = daily.cached_input_tokens + excluded.cached_input_tokens,
        output_tokens = daily.output_tokens + excluded.output_tokens,
        reasoning_tokens = daily.reasoning_tokens + excluded.reasoning_tokens,
        cost_pico = daily.cost_pico + excluded.cost_pico,
        unpriced_requests = daily.unpriced_requests + excluded.unpriced_requests
), b AS (
    INSERT INTO budget_spend (budget, month, spent_pico)
    SELECT bm.budget, bm.month, sum(new.cost_pico)::bigint
    FROM unnest($26::text[], $27::text[], $28::text[]) AS bm(call_id, budget, month)
    JOIN new USING (call_id)
    WHERE new.cost_pico IS NOT NULL
    GROUP BY 1, 2
    ORDER BY 1, 2
    ON CONFLICT (budget, month)
    DO UPDATE SET spent_pico = budget_spend.spent_pico + excluded.spent_pico
)
SELECT count(*) FROM ins";

const PENDING_SQL: &str = "INSERT INTO pending_background (response_id, project_id, model, ts_ms)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT (response_id) DO UPDATE SET project_id = excluded.project_id,
        model = excluded.model, ts_ms = excluded.ts_ms";

const SETTLE_SQL: &str = "DELETE FROM pending_background WHERE response_id = $1";

/// A batch's background-response bookkeeping, applied in record order.
#[derive(Debug, Clone)]
enum BackgroundOp {
    Pending {
        id: String,
        project_id: String,
        model: Option<String>,
        ts_ms: i64,
    },
    Settled {
        id: String,
    },
}

/// One record, owned (the write runs on the driver thread) and ready for `PostgreSQL`.
#[derive(Debug, Clone)]
struct Row {
    call: CallRow,
    day: String,
    month: MonthKey,
    budget_months: Vec<(String, String)>,
    background: Option<BackgroundOp>,
}

impl Row {
    fn new(r: &Record, month: MonthKey) -> Self {
        let mut call = CallRow::from_record(r);
        for s in [
            &mut call.request_id,
            &mut call.tags,
            &mut call.outcome,
            &mut call.usage_source,
        ] {
            *s = text(s);
        }
        for s in [
            &mut call.call_id,
            &mut call.key_name,
            &mut call.key_fp,
            &mut call.route,
            &mut call.project_name,
            &mut call.project_id,
            &mut call.api,
            &mut call.model,
            &mut call.error_code,
            &mut call.upstream_response_id,
        ] {
            *s = opt_text(s.as_deref());
        }
        let background = match (&r.background, &call.upstream_response_id) {
            (Some(Background::Pending), Some(id)) => Some(BackgroundOp::Pending {
                id: id.clone(),
                project_id: call.project_id.clone().unwrap_or_default(),
                model: call.model.clone(),
                ts_ms: r.ts_ms,
            }),
            (Some(Background::Settled), Some(id)) => Some(BackgroundOp::Settled { id: id.clone() }),
            _ => None,
        };
        Self {
            day: crate::ledger::sqlite::utc_day(r.ts_ms),
            month,
            budget_months: r
                .budget_months
                .iter()
                .map(|(b, m)| (text(b), text(m)))
                .collect(),
            background,
            call,
        }
    }

    /// The rows of a batch; a record repeated in it (same call id) is kept once, and a record
    /// no partition can hold (a time outside the years 1 to 9998) is dropped.
    fn batch(records: &[Record]) -> Vec<Self> {
        let mut seen = HashSet::with_capacity(records.len());
        let mut rows = Vec::with_capacity(records.len());
        for r in records {
            let Some(month) = MonthKey::of_ms(r.ts_ms) else {
                tracing::error!(call_id = %r.call_id, request_id = %r.request_id, ts_ms = r.ts_ms, "ledger record time out of range: dropped");
                continue;
            };
            // On the id as written (NULs dropped): two ids that become one are one call.
            let row = Self::new(r, month);
            if seen.insert(row.call.call_id.clone()) {
                rows.push(row);
            }
        }
        rows
    }
}

/// The months whose partitions a batch needs: its records' months and, to create them
/// before the first record of a month arrives, the month after each.
fn months_of(rows: &[Row]) -> BTreeSet<MonthKey> {
    rows.iter()
        .flat_map(|r| [r.month, r.month.next()])
        .collect()
}

/// Rows as the column arrays of [`WRITE_SQL`].
#[derive(Default)]
struct Columns {
    ts_ms: Vec<i64>,
    request_id: Vec<String>,
    key_name: Vec<Option<String>>,
    key_fp: Vec<Option<String>>,
    route: Vec<Option<String>>,
    project_name: Vec<Option<String>>,
    project_id: Vec<Option<String>>,
    tags: Vec<String>,
    api: Vec<Option<String>>,
    model: Vec<Option<String>>,
    stream: Vec<bool>,
    status: Vec<i32>,
    outcome: Vec<String>,
    error_code: Vec<Option<String>>,
    input_tokens: Vec<i64>,
    cached_input_tokens: Vec<i64>,
    output_tokens: Vec<i64>,
    reasoning_tokens: Vec<i64>,
    usage_source: Vec<String>,
    cost_pico: Vec<Option<i64>>,
    duration_ms: Vec<f64>,
    ttfb_ms: Vec<Option<f64>>,
    upstream_response_id: Vec<Option<String>>,
    day: Vec<String>,
    call_id: Vec<String>,
    budget_call_id: Vec<String>,
    budget_name: Vec<String>,
    budget_month: Vec<String>,
}

impl Columns {
    /// The parameters of [`WRITE_SQL`], in order.
    fn params<'a>(
        &'a self,
        max_models: &'a i64,
    ) -> [&'a (dyn tokio_postgres::types::ToSql + Sync); 29] {
        [
            &self.ts_ms,
            &self.request_id,
            &self.key_name,
            &self.key_fp,
            &self.route,
            &self.project_name,
            &self.project_id,
            &self.tags,
            &self.api,
            &self.model,
            &self.stream,
            &self.status,
            &self.outcome,
            &self.error_code,
            &self.input_tokens,
            &self.cached_input_tokens,
            &self.output_tokens,
            &self.reasoning_tokens,
            &self.usage_source,
            &self.cost_pico,
            &self.duration_ms,
            &self.ttfb_ms,
            &self.upstream_response_id,
            &self.day,
            &self.call_id,
            &self.budget_call_id,
            &self.budget_name,
            &self.budget_month,
            max_models,
        ]
    }

    fn of(rows: &[Row]) -> Self {
        let mut c = Self::default();
        for row in rows {
            let r = &row.call;
            c.ts_ms.push(r.ts_ms);
            c.request_id.push(r.request_id.clone());
            c.key_name.push(r.key_name.clone());
            c.key_fp.push(r.key_fp.clone());
            c.route.push(r.route.clone());
            c.project_name.push(r.project_name.clone());
            c.project_id.push(r.project_id.clone());
            c.tags.push(r.tags.clone());
            c.api.push(r.api.clone());
            c.model.push(r.model.clone());
            c.stream.push(r.stream);
            c.status.push(i32::from(r.status));
            c.outcome.push(r.outcome.clone());
            c.error_code.push(r.error_code.clone());
            c.input_tokens.push(r.input_tokens);
            c.cached_input_tokens.push(r.cached_input_tokens);
            c.output_tokens.push(r.output_tokens);
            c.reasoning_tokens.push(r.reasoning_tokens);
            c.usage_source.push(r.usage_source.clone());
            c.cost_pico.push(r.cost_pico);
            c.duration_ms.push(r.duration_ms);
            c.ttfb_ms.push(r.ttfb_ms);
            c.upstream_response_id.push(r.upstream_response_id.clone());
            c.day.push(row.day.clone());
            let call_id = r.call_id.clone().unwrap_or_default();
            for (budget, month) in &row.budget_months {
                c.budget_call_id.push(call_id.clone());
                c.budget_name.push(budget.clone());
                c.budget_month.push(month.clone());
            }
            c.call_id.push(call_id);
        }
        c
    }
}

/// Writes `rows` in one transaction; returns how many calls were new.
///
/// Background operations go first, in record order (as SQLite does: a response created and
/// settled in one batch is gone). A settlement whose response is no longer pending was
/// metered by another replica that saw it finished too: the record stays, its usage and cost
/// become zero, so the fleet counts a background response once.
async fn write_rows(
    client: &mut Object,
    rows: &[Row],
    max_models: i64,
) -> Result<i64, tokio_postgres::Error> {
    let stmt = client.prepare_cached(WRITE_SQL).await?;
    let tx = client.transaction().await?;
    let mut claimed_elsewhere = Vec::new();
    for (i, op) in rows
        .iter()
        .enumerate()
        .filter_map(|(i, r)| r.background.as_ref().map(|op| (i, op)))
    {
        match op {
            BackgroundOp::Pending {
                id,
                project_id,
                model,
                ts_ms,
            } => {
                tx.execute(PENDING_SQL, &[id, project_id, model, ts_ms])
                    .await?;
            }
            BackgroundOp::Settled { id } => {
                if tx.execute(SETTLE_SQL, &[id]).await? == 0 {
                    claimed_elsewhere.push(i);
                }
            }
        }
    }
    let c = if claimed_elsewhere.is_empty() {
        Columns::of(rows)
    } else {
        let mut rows = rows.to_vec();
        for i in claimed_elsewhere {
            rows[i].call.unmeter();
        }
        Columns::of(&rows)
    };
    let inserted: i64 = tx
        .query_one(&stmt, &c.params(&max_models))
        .await?
        .try_get(0)?;
    tx.commit().await?;
    Ok(inserted)
}

/// One batch of an import, inside the import's transaction (opened on `client` by hand):
/// partitions the batch needs and lacks are created in that transaction too, so that a
/// refused import leaves nothing behind. Imported records have no background bookkeeping.
async fn import_rows(client: &Object, rows: &[Row], max_models: i64) -> anyhow::Result<()> {
    let months: BTreeSet<MonthKey> = rows.iter().map(|r| r.month).collect();
    let mut missing = Vec::new();
    for m in months {
        let exists: Option<String> = client
            .query_one("SELECT to_regclass($1)::text", &[&m.partition()])
            .await?
            .try_get(0)?;
        if exists.is_none() {
            missing.push(m);
        }
    }
    if !missing.is_empty() {
        client
            .batch_execute(&format!("SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'"))
            .await?;
        client
            .execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
            .await?;
        for m in missing {
            let (Some(from), Some(to)) = (m.start_ms(), m.next().start_ms()) else {
                continue;
            };
            // Only digits go into the name and bounds: nothing to escape.
            client
                .batch_execute(&format!(
                    "CREATE TABLE IF NOT EXISTS {} PARTITION OF calls FOR VALUES FROM ({from}) TO ({to})",
                    m.partition()
                ))
                .await
                .with_context(|| format!("creating the partition {}", m.partition()))?;
        }
    }
    let stmt = client.prepare_cached(WRITE_SQL).await?;
    client
        .query_one(&stmt, &Columns::of(rows).params(&max_models))
        .await?;
    Ok(())
}

/// A value `PostgreSQL` refused (SQLSTATE class 22: a sum past `BIGINT`, ...): retrying the
/// same batch would fail forever.
fn is_data_error(err: &tokio_postgres::Error) -> bool {
    err.code().is_some_and(|c| c.code().starts_with("22"))
}

/// A row whose month has no partition (dropped by retention after this writer cached it).
fn is_missing_partition(err: &tokio_postgres::Error) -> bool {
    err.code() == Some(&SqlState::CHECK_VIOLATION)
}

/// Writes a batch, creating partitions first where needed. A batch refused for one bad value
/// is written record by record, and only the records refused alone are dropped (logged).
async fn write_batch(
    client: &mut Object,
    rows: &[Row],
    missing: &BTreeSet<MonthKey>,
    max_models: i64,
) -> anyhow::Result<()> {
    if !missing.is_empty() {
        create_partitions(client, missing).await?;
    }
    match write_rows(client, rows, max_models).await {
        Ok(_) => Ok(()),
        Err(err) if is_missing_partition(&err) => {
            create_partitions(client, &months_of(rows)).await?;
            write_rows(client, rows, max_models).await?;
            Ok(())
        }
        Err(err) if is_data_error(&err) && rows.len() > 1 => {
            tracing::warn!(error = %format!("{err:#}"), records = rows.len(), "ledger batch refused by postgresql; writing its records one by one");
            for row in rows {
                match write_rows(client, std::slice::from_ref(row), max_models).await {
                    Ok(_) => {}
                    Err(err) if is_data_error(&err) => {
                        tracing::error!(call_id = ?row.call.call_id, request_id = %row.call.request_id, error = %format!("{err:#}"), "ledger record refused by postgresql: dropped");
                    }
                    Err(err) => return Err(err.into()),
                }
            }
            Ok(())
        }
        Err(err) if is_data_error(&err) => {
            tracing::error!(call_id = ?rows[0].call.call_id, request_id = %rows[0].call.request_id, error = %format!("{err:#}"), "ledger record refused by postgresql: dropped");
            Ok(())
        }
        Err(err) => Err(err.into()),
    }
}

/// The `PostgreSQL` [`Store`]: used by the ledger's writer thread, one connection at a time.
pub struct PostgresStore {
    driver: Driver,
    pool: Pool,
    /// Months whose partition this writer knows to exist.
    partitions: HashSet<MonthKey>,
    /// Distinct models a key may add to a day's roll-up (`[ledger] max_models_per_day`).
    max_models: i64,
}

impl PostgresStore {
    /// Connects to `url`, applies the migrations this build has and the database lacks, and
    /// creates the partitions of this month and the next.
    ///
    /// # Errors
    /// Connection or SQL errors, or a schema newer than this build.
    pub fn connect(url: &str) -> anyhow::Result<Self> {
        let driver = Driver::new("ledger-pg-writer")?;
        // The writer runs one transaction at a time: one connection, replaced when it breaks.
        let pool = pool(url, 1)?;
        let ahead: BTreeSet<MonthKey> = MonthKey::of_ms(now_ms())
            .map(|m| [m, m.next()].into_iter().collect())
            .unwrap_or_default();
        let applied = driver.run({
            let pool = pool.clone();
            let ahead = ahead.clone();
            async move {
                let mut client = connection(&pool).await?;
                let applied = apply_migrations(&mut client).await?;
                create_partitions(&mut client, &ahead).await?;
                Ok(applied)
            }
        })?;
        if !applied.is_empty() {
            tracing::info!(versions = ?applied, "postgresql ledger migrated");
        }
        Ok(Self {
            driver,
            pool,
            partitions: ahead.into_iter().collect(),
            max_models: i64::try_from(crate::config::DEFAULT_MAX_MODELS_PER_DAY)
                .unwrap_or(i64::MAX),
        })
    }

    /// Sets how many distinct models a key may add to a day's roll-up (the rest roll up under
    /// `(other)`).
    #[must_use]
    pub fn with_max_models_per_day(mut self, max: usize) -> Self {
        self.max_models = i64::try_from(max).unwrap_or(i64::MAX);
        self
    }
}

impl Store for PostgresStore {
    fn write_batch(&mut self, records: &[Record]) -> anyhow::Result<()> {
        let rows = Row::batch(records);
        if rows.is_empty() {
            return Ok(());
        }
        let missing: BTreeSet<MonthKey> = months_of(&rows)
            .into_iter()
            .filter(|m| !self.partitions.contains(m))
            .collect();
        let pool = self.pool.clone();
        let created = missing.clone();
        let max_models = self.max_models;
        let result = self.driver.run(async move {
            let mut client = connection(&pool).await?;
            let outcome = tokio::time::timeout(
                WRITE_TIMEOUT,
                write_batch(&mut client, &rows, &missing, max_models),
            )
            .await;
            if let Ok(result) = outcome {
                result
            } else {
                // Its state is unknown: close it rather than hand it back to the pool. The
                // retry is safe, a commit that did happen is not counted twice.
                drop(Object::take(client));
                anyhow::bail!(
                    "ledger write took over {} s: abandoned",
                    WRITE_TIMEOUT.as_secs()
                )
            }
        });
        match result {
            Ok(()) => {
                self.partitions.extend(created);
                Ok(())
            }
            Err(err) => {
                // Partitions may have been dropped meanwhile: check again on the retry.
                self.partitions.clear();
                Err(err)
            }
        }
    }

    fn write_all(
        &mut self,
        next: &mut dyn FnMut() -> anyhow::Result<Option<Vec<Record>>>,
    ) -> anyhow::Result<()> {
        // One connection for the whole import, its transaction opened by hand: the batches
        // come from a reader on this thread, each written by a driver call of its own.
        let pool = self.pool.clone();
        let mut client = Some(self.driver.run(async move {
            let client = connection(&pool).await?;
            client.batch_execute("BEGIN").await?;
            Ok(client)
        })?);
        let result = (|| {
            while let Some(batch) = next()? {
                let rows = Row::batch(&batch);
                let c = client.take().context("postgresql connection lost")?;
                let max_models = self.max_models;
                client = Some(self.driver.run(async move {
                    match tokio::time::timeout(WRITE_TIMEOUT, import_rows(&c, &rows, max_models))
                        .await
                    {
                        Ok(Ok(())) => Ok(c),
                        Ok(Err(err)) => {
                            drop(Object::take(c));
                            Err(err)
                        }
                        Err(_) => {
                            drop(Object::take(c));
                            anyhow::bail!(
                                "an import batch took over {} s: abandoned",
                                WRITE_TIMEOUT.as_secs()
                            )
                        }
                    }
                })?);
            }
            let c = client.take().context("postgresql connection lost")?;
            self.driver.run(async move {
                c.batch_execute("COMMIT").await?;
                Ok(())
            })
        })();
        if result.is_err()
            && let Some(c) = client.take()
        {
            // Closed rather than handed back to the pool inside an open transaction: the
            // server rolls it back.
            drop(Object::take(c));
        }
        result
    }
}
