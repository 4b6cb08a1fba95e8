//! The shared `PostgreSQL` ledger: month-partitioned calls, per-day roll-ups and budget spend
//! written in idempotent batches, versioned migrations, retention by dropping partitions.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use jiff::Timestamp;
use jiff::tz::TimeZone;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::{GenericClient, NoTls};

use super::transfer::{CallRow, RecordSource};
use super::{Background, LedgerRead, Record, Store};
use crate::report::{DailyRow, Period};

/// Every migration this build knows, oldest first: `(version, SQL)`. Append only: a shipped
/// file is never edited, a change is a new file with the next version.
const MIGRATIONS: &[(u32, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_init.sql")),
    (2, include_str!("../../migrations/postgres/0002_fleet.sql")),
    (
        3,
        include_str!("../../migrations/postgres/0003_call_id.sql"),
    ),
    (
        4,
        include_str!("../../migrations/postgres/0004_webhook_outbox.sql"),
    ),
];

/// Newest schema version this build knows: the last migration's.
pub const SCHEMA_VERSION: u32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Advisory lock held while migrating, so that replicas starting together migrate once.
const MIGRATION_LOCK: i64 = 0x6d67_6c65_6467_0001;
/// Advisory lock held while creating or dropping partitions of `calls`.
const PARTITION_LOCK: i64 = 0x6d67_6c65_6467_0002;

/// Connecting, or waiting for a pooled connection, longer than this is an error (and a retry).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// One batch longer than this is abandoned (its connection closed) and retried.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// One read (a report, a lookup) longer than this is an error.
const READ_TIMEOUT: Duration = Duration::from_mins(2);
/// One lookup a call waits on (who owns a stored response) longer than this is an error.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Partition DDL waits at most this long for the lock on `calls`: a pending `ACCESS
/// EXCLUSIVE` request queues every later insert behind it, so it must not wait long.
const DDL_LOCK_TIMEOUT: &str = "5s";
/// Rows per page of an export.
const EXPORT_PAGE: i64 = 5000;

/// The `calls` columns in insert order (`day` is the extra last column of the batch arrays).
const CALL_COLUMNS: &str = "ts_ms, request_id, key_name, key_fp, route, project_name, project_id,
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

/// Runs this module's async driver calls on a runtime of its own.
///
/// The ledger's callers are synchronous: the writer's std thread, the CLI, and `LedgerRead`
/// callers, some of which sit inside the server's runtime (`cli::run` seeds budgets before
/// serving). `Runtime::block_on` panics there, and so does the sync `postgres` crate, which
/// is a `block_on` wrapper; it also has no pool. So each call is spawned on one dedicated
/// worker thread and its result comes back over a std channel, which any thread may wait on.
/// The pool's connection tasks run on that worker too, so a connection the server closed is
/// noticed, and replaced by the pool, even while nobody is querying.
struct Driver {
    rt: Option<tokio::runtime::Runtime>,
}

impl Driver {
    fn new(name: &str) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()
            .context("starting the postgresql driver thread")?;
        Ok(Self { rt: Some(rt) })
    }

    /// Runs `fut` on the driver thread and waits for it; callable from any thread.
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = anyhow::Result<T>> + Send + 'static,
    ) -> anyhow::Result<T> {
        let rt = self
            .rt
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("postgresql driver stopped"))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv()
            .map_err(|_| anyhow::anyhow!("postgresql driver task failed"))?
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime (a handle dropped in
        // async code): let its thread wind down on its own instead.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A pool of at most `size` connections to the database of `url` (a `postgres://` URL or a
/// `key=value` string). `sslmode=require` turns on TLS, verified against the system's trust
/// store; otherwise (`disable`, `prefer`, the default) the connection is plain TCP.
fn pool(url: &str, size: usize) -> anyhow::Result<Pool> {
    // The URL may hold a password: it never goes into a message.
    let mut cfg: tokio_postgres::Config = url
        .parse()
        .map_err(|err| anyhow::anyhow!("invalid [ledger] url: {err}"))?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(CONNECT_TIMEOUT);
    }
    if cfg.get_application_name().is_none() {
        cfg.application_name("mantlegate");
    }
    // A peer that vanished (no RST) is noticed in about 30 s instead of the kernel's hours.
    if cfg.get_tcp_user_timeout().is_none() {
        cfg.tcp_user_timeout(Duration::from_secs(30));
    }
    if cfg.get_keepalives_idle() >= Duration::from_hours(1) {
        cfg.keepalives_idle(Duration::from_secs(15));
    }
    let manager_config = ManagerConfig {
        recycling_method: RecyclingMethod::Fast,
    };
    let manager = match cfg.get_ssl_mode() {
        SslMode::Disable | SslMode::Prefer => Manager::from_config(cfg, NoTls, manager_config),
        _ => {
            let (tls, skipped) =
                tokio_postgres_rustls::MakeRustlsConnect::with_native_certs().map_err(|errors| {
                    anyhow::anyhow!(
                        "sslmode=require, but no CA certificate could be loaded from the system trust store ({} errors)",
                        errors.len()
                    )
                })?;
            if !skipped.is_empty() {
                tracing::warn!(
                    skipped = skipped.len(),
                    "some system CA certificates could not be loaded"
                );
            }
            Manager::from_config(cfg, tls, manager_config)
        }
    };
    Pool::builder(manager)
        .max_size(size)
        .runtime(deadpool_postgres::Runtime::Tokio1)
        .wait_timeout(Some(CONNECT_TIMEOUT))
        .create_timeout(Some(CONNECT_TIMEOUT))
        .recycle_timeout(Some(CONNECT_TIMEOUT))
        .build()
        .context("building the postgresql connection pool")
}

async fn connection(pool: &Pool) -> anyhow::Result<Object> {
    pool.get()
        .await
        .map_err(|err| anyhow::Error::new(err).context("no connection to postgresql"))
}

/// Now, Unix milliseconds.
fn now_ms() -> i64 {
    Timestamp::now().as_millisecond()
}

/// A UTC calendar month, counted as `year * 12 + month - 1`: the unit of partitioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct MonthKey(i32);

impl MonthKey {
    /// The month of `ts_ms`; `None` outside the years 1 to 9998 (no partition can hold it).
    fn of_ms(ts_ms: i64) -> Option<Self> {
        let date = Timestamp::from_millisecond(ts_ms)
            .ok()?
            .to_zoned_datetime(TimeZone::UTC)
            .date();
        (1..=9998)
            .contains(&date.year())
            .then(|| Self(i32::from(date.year()) * 12 + i32::from(date.month()) - 1))
    }

    fn year(self) -> i32 {
        self.0.div_euclid(12)
    }

    fn month(self) -> i32 {
        self.0.rem_euclid(12) + 1
    }

    fn next(self) -> Self {
        Self(self.0 + 1)
    }

    fn minus(self, months: u32) -> Self {
        Self(
            self.0
                .saturating_sub(i32::try_from(months).unwrap_or(i32::MAX)),
        )
    }

    /// First millisecond of the month.
    fn start_ms(self) -> Option<i64> {
        let year = i16::try_from(self.year()).ok()?;
        let month = i8::try_from(self.month()).ok()?;
        let first = jiff::civil::Date::new(year, month, 1).ok()?;
        Some(
            first
                .to_zoned_datetime(TimeZone::UTC)
                .ok()?
                .timestamp()
                .as_millisecond(),
        )
    }

    /// `calls_YYYY_MM`.
    fn partition(self) -> String {
        format!("calls_{:04}_{:02}", self.year(), self.month())
    }

    /// The month of a partition named `calls_YYYY_MM`.
    fn of_partition(name: &str) -> Option<Self> {
        let rest = name.strip_prefix("calls_")?;
        let (y, m) = rest.split_once('_')?;
        if y.len() != 4 || m.len() != 2 || !(y.bytes().chain(m.bytes())).all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let (y, m): (i32, i32) = (y.parse().ok()?, m.parse().ok()?);
        (1..=12).contains(&m).then_some(Self(y * 12 + m - 1))
    }
}

/// Creates the partitions of `months` that do not exist yet, under the partition lock.
async fn create_partitions(
    client: &mut tokio_postgres::Client,
    months: &BTreeSet<MonthKey>,
) -> anyhow::Result<()> {
    let tx = client.transaction().await?;
    tx.batch_execute(&format!("SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'"))
        .await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
        .await?;
    for &m in months {
        let (Some(from), Some(to)) = (m.start_ms(), m.next().start_ms()) else {
            continue;
        };
        // Only digits go into the name and bounds: nothing to escape.
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {} PARTITION OF calls FOR VALUES FROM ({from}) TO ({to})",
            m.partition()
        ))
        .await
        .with_context(|| format!("creating the partition {}", m.partition()))?;
    }
    tx.commit().await?;
    Ok(())
}

/// The schema version a database holds: `None` when it has no ledger schema.
async fn schema_version(client: &impl GenericClient) -> anyhow::Result<Option<u32>> {
    let table: Option<String> = client
        .query_one("SELECT to_regclass('schema_migrations')::text", &[])
        .await?
        .try_get(0)?;
    if table.is_none() {
        return Ok(None);
    }
    let version: Option<i32> = client
        .query_one("SELECT max(version) FROM schema_migrations", &[])
        .await?
        .try_get(0)?;
    Ok(version.map(|v| u32::try_from(v).unwrap_or(0)))
}

/// Refuses a schema newer than this build: its writes could break what a newer mantlegate
/// relies on.
fn refuse_newer(version: u32) -> anyhow::Result<()> {
    anyhow::ensure!(
        version <= SCHEMA_VERSION,
        "the postgresql ledger has schema version {version}, newer than this mantlegate knows ({SCHEMA_VERSION}): upgrade mantlegate"
    );
    Ok(())
}

/// Applies the missing migrations in one transaction under the migration lock.
async fn apply_migrations(client: &mut tokio_postgres::Client) -> anyhow::Result<Vec<u32>> {
    let tx = client.transaction().await?;
    // Taken first: a second replica waits here, then sees the first one's work committed.
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
            version INTEGER PRIMARY KEY,
            applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
        )",
    )
    .await?;
    let applied: HashSet<i32> = tx
        .query("SELECT version FROM schema_migrations", &[])
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<Result<_, _>>()?;
    if let Some(&newest) = applied.iter().max() {
        refuse_newer(u32::try_from(newest).unwrap_or(0))?;
    }
    let mut done = Vec::new();
    for &(version, sql) in MIGRATIONS {
        let v = i32::try_from(version)?;
        if applied.contains(&v) {
            continue;
        }
        tx.batch_execute(sql)
            .await
            .with_context(|| format!("applying postgresql migration {version}"))?;
        tx.execute("INSERT INTO schema_migrations (version) VALUES ($1)", &[&v])
            .await?;
        done.push(version);
    }
    tx.commit().await?;
    Ok(done)
}

/// Brings the database of `url` to this build's schema (`mantlegate migrate`); returns the
/// versions it applied (none when it was current). Several processes may run it at once:
/// an advisory lock makes them take turns, and each migration is applied once.
///
/// # Errors
/// Connection or SQL errors, or a schema newer than this build (nothing is changed then).
pub fn migrate(url: &str) -> anyhow::Result<Vec<u32>> {
    let driver = Driver::new("ledger-pg-migrate")?;
    let pool = pool(url, 1)?;
    driver.run(async move {
        let mut client = connection(&pool).await?;
        apply_migrations(&mut client).await
    })
}

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

/// `PostgreSQL` text cannot hold NUL: a model name from a request body could, and a batch that
/// can never be written would stall the ledger. Such characters are dropped.
fn text(s: &str) -> String {
    s.replace('\0', "")
}

fn opt_text(s: Option<&str>) -> Option<String> {
    s.map(text)
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
            day: super::sqlite::utc_day(r.ts_ms),
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

/// The `PostgreSQL` [`LedgerRead`], with the fleet's shared budget figures and retention.
pub struct PgReader {
    driver: Driver,
    pool: Pool,
}

/// One budget month for [`PgReader::seed_budget_spend`].
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

/// Priced spend per project and tag set: `(project name, tags JSON, pico-dollars)`.
type SpendRows = Vec<(String, String, i64)>;

/// The `budget_spend` figures of the `(budget, month)` pairs that have a row.
async fn existing_budget_rows(
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
async fn spend_rows(
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
        let reader = Self {
            driver: Driver::new("ledger-pg-reader")?,
            pool: pool(url, 4)?,
        };
        let version = reader.query(|c| async move { schema_version(&**c).await })?;
        match version {
            None => anyhow::bail!(
                "the postgresql database holds no mantlegate ledger: run `mantlegate migrate`"
            ),
            Some(v) if v < SCHEMA_VERSION => anyhow::bail!(
                "the postgresql ledger has schema version {v}, older than this mantlegate's ({SCHEMA_VERSION}): run `mantlegate migrate`"
            ),
            Some(v) => refuse_newer(v)?,
        }
        Ok(reader)
    }

    /// Runs `f` with a pooled connection on the driver thread, bounded by [`READ_TIMEOUT`].
    fn query<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Object) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<T>> + Send,
    {
        let pool = self.pool.clone();
        self.driver.run(async move {
            let client = connection(&pool).await?;
            tokio::time::timeout(READ_TIMEOUT, f(client))
                .await
                .map_err(|_| {
                    anyhow::anyhow!("ledger read took over {} s", READ_TIMEOUT.as_secs())
                })?
        })
    }

    /// [`query`](Self::query) for a lookup a call waits on: getting the connection and running
    /// `f` together take at most [`LOOKUP_TIMEOUT`], so a stalled database costs each waiting
    /// call (and its blocking thread) that long, not minutes.
    fn lookup<T, F, Fut>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Object) -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<T>> + Send,
    {
        let pool = self.pool.clone();
        self.driver.run(async move {
            tokio::time::timeout(
                LOOKUP_TIMEOUT,
                async move { f(connection(&pool).await?).await },
            )
            .await
            .map_err(|_| {
                anyhow::anyhow!("ledger lookup took over {} ms", LOOKUP_TIMEOUT.as_millis())
            })?
        })
    }

    /// Month-to-date spend (pico-dollars) of each `(budget, YYYY-MM)`, in order; 0 where
    /// nothing was spent. Replicas call it to refresh the fleet's shared figure.
    ///
    /// # Errors
    /// Storage errors.
    pub fn budget_spend(&self, budget_months: &[(String, String)]) -> anyhow::Result<Vec<i64>> {
        let (budgets, months): (Vec<String>, Vec<String>) = budget_months.iter().cloned().unzip();
        self.query(move |c| async move {
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
    /// [`PgReader::seed_budget_spend`] creates a missing one: for budgets a reload brings
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
        let present = self.query({
            let (budgets, months) = (budgets.clone(), months.clone());
            move |c| async move { existing_budget_rows(&**c, &budgets, &months).await }
        })?;
        if !overwrite && keys.iter().all(|k| present.contains_key(k)) {
            return Ok(keys.iter().map(|k| present[k]).collect());
        }
        self.query(move |mut c| async move {
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
        self.query(move |mut c| async move {
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
        self.query(move |mut c| async move {
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
        self.query(move |c| async move {
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
        self.query(move |c| async move {
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

    /// Names of the partitions of `calls`, oldest first.
    ///
    /// # Errors
    /// Storage errors.
    pub fn partitions(&self) -> anyhow::Result<Vec<String>> {
        self.query(|c| async move {
            let rows = c
                .query(
                    "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
                     WHERE i.inhparent = 'calls'::regclass ORDER BY 1",
                    &[],
                )
                .await?;
            Ok(rows
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?)
        })
    }

    /// Retention (`[ledger] retention_months = months`): drops the partitions of `calls`
    /// (UTC months) older than the month `months` months before `now_ms`'s: with 3 in May,
    /// January and before go, February to May stay. So a raw record is kept at least `months`
    /// months, and the current month always; `daily` and `budget_spend` are untouched.
    /// Returns the dropped partitions.
    ///
    /// # Errors
    /// `months` is 0, or storage errors (partitions dropped before the error stay dropped).
    pub fn apply_retention(&self, months: u32, now_ms: i64) -> anyhow::Result<Vec<String>> {
        anyhow::ensure!(months >= 1, "retention must keep at least 1 month");
        let cutoff = MonthKey::of_ms(now_ms)
            .ok_or_else(|| anyhow::anyhow!("retention: time {now_ms} out of range"))?
            .minus(months);
        let doomed: Vec<String> = self
            .partitions()?
            .into_iter()
            .filter(|name| MonthKey::of_partition(name).is_some_and(|m| m < cutoff))
            .collect();
        if doomed.is_empty() {
            return Ok(doomed);
        }
        self.query(move |mut c| async move {
            let mut dropped = Vec::new();
            for name in doomed {
                let tx = c.transaction().await?;
                tx.batch_execute(&format!("SET LOCAL lock_timeout = '{DDL_LOCK_TIMEOUT}'"))
                    .await?;
                tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PARTITION_LOCK])
                    .await?;
                // The name matched calls_YYYY_MM: digits and underscores only.
                tx.batch_execute(&format!("DROP TABLE IF EXISTS {name}"))
                    .await
                    .with_context(|| format!("dropping the partition {name}"))?;
                tx.commit().await?;
                tracing::info!(partition = %name, "ledger retention: partition dropped");
                dropped.push(name);
            }
            Ok(dropped)
        })
    }
}

/// A budget threshold to claim for the fleet ([`PgReader::claim_and_queue_alerts`]).
#[derive(Debug, Clone)]
pub struct AlertClaim {
    /// Budget name.
    pub budget: String,
    /// `YYYY-MM` in the budget's time zone.
    pub month: String,
    /// The fraction crossed, as text.
    pub threshold: String,
    /// What to queue for the webhook when the claim is this replica's (None: no webhook).
    pub delivery: Option<super::outbox::Entry>,
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
impl super::outbox::Outbox for PgReader {
    fn add(&self, entries: &[super::outbox::Entry]) -> anyhow::Result<()> {
        let entries = entries.to_vec();
        self.query(move |mut c| async move {
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
    ) -> anyhow::Result<super::outbox::Claim> {
        use super::outbox::{Claim, Entry};
        let owner = owner.to_owned();
        self.query(move |mut c| async move {
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
        self.query(move |c| async move {
            c.execute("DELETE FROM webhook_outbox WHERE id = $1", &[&id])
                .await?;
            Ok(())
        })
    }

    fn failed(&self, id: &str, owner: &str, next_ms: i64) -> anyhow::Result<()> {
        let (id, owner) = (id.to_owned(), owner.to_owned());
        self.query(move |c| async move {
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
    ) -> anyhow::Result<Vec<super::outbox::Entry>> {
        self.query(move |c| async move {
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
                    Ok::<_, tokio_postgres::Error>(super::outbox::Entry {
                        id: r.try_get(0)?,
                        created_ms: r.try_get(1)?,
                        body: r.try_get(2)?,
                    })
                })
                .collect::<Result<_, _>>()?)
        })
    }
}

impl LedgerRead for PgReader {
    fn project_of_response(&self, response_id: &str) -> anyhow::Result<Option<String>> {
        let id = response_id.to_owned();
        self.lookup(move |c| async move {
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
        self.query(|c| async move {
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
        self.query(move |c| async move { spend_rows(&**c, start_ms, end_ms).await })
    }

    fn last_used(&self) -> anyhow::Result<std::collections::HashMap<String, i64>> {
        self.query(|c| async move {
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
        self.query(move |c| async move {
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
        self.query(|c| async move {
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
            let page = self.query(move |c| async move {
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

#[cfg(test)]
mod tests {
    use super::{MIGRATIONS, MonthKey, SCHEMA_VERSION, text};

    fn ms(s: &str) -> i64 {
        s.parse::<jiff::Timestamp>()
            .expect("timestamp")
            .as_millisecond()
    }

    #[test]
    fn migrations_are_numbered_from_one_without_gaps() {
        for (i, (version, sql)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version as usize, i + 1);
            assert!(!sql.trim().is_empty());
        }
        assert_eq!(SCHEMA_VERSION as usize, MIGRATIONS.len());
    }

    #[test]
    fn months_bound_their_partitions() {
        let m = MonthKey::of_ms(ms("2026-12-31T23:59:59.999Z")).expect("month");
        assert_eq!(m.partition(), "calls_2026_12");
        assert_eq!(m.start_ms(), Some(ms("2026-12-01T00:00:00Z")));
        assert_eq!(m.next().partition(), "calls_2027_01");
        assert_eq!(m.next().start_ms(), Some(ms("2027-01-01T00:00:00Z")));
        assert_eq!(
            MonthKey::of_ms(ms("2027-01-01T00:00:00Z")),
            Some(m.next()),
            "the bound belongs to the next month"
        );
        assert_eq!(m.minus(12).partition(), "calls_2025_12");
        assert_eq!(m.minus(11).partition(), "calls_2026_01");
    }

    #[test]
    fn partition_names_parse_back() {
        let m = MonthKey::of_ms(ms("2026-03-15T12:00:00Z")).expect("month");
        assert_eq!(MonthKey::of_partition(&m.partition()), Some(m));
        for bad in [
            "calls",
            "calls_2026_13",
            "calls_2026_00",
            "calls_26_03",
            "calls_2026_3",
            "daily_2026_03",
            "calls_2026_03_old",
            "calls_2026-03",
        ] {
            assert_eq!(MonthKey::of_partition(bad), None, "{bad}");
        }
    }

    #[test]
    fn times_no_partition_can_hold_are_refused() {
        assert_eq!(MonthKey::of_ms(i64::MAX), None);
        assert_eq!(MonthKey::of_ms(ms("0000-06-01T00:00:00Z")), None);
        assert!(MonthKey::of_ms(0).is_some());
    }

    #[test]
    fn nul_characters_are_dropped_from_text() {
        assert_eq!(text("gpt\0-x"), "gpt-x");
        assert_eq!(text("plain"), "plain");
    }
}
