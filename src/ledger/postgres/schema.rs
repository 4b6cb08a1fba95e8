//! The `PostgreSQL` ledger's schema: versioned migrations applied under an advisory lock, and
//! the month partitions of `calls`.

use std::collections::{BTreeSet, HashSet};

use anyhow::Context as _;
use tokio_postgres::GenericClient;

use super::{DDL_LOCK_TIMEOUT, Driver, MonthKey, connection, pool};

/// Every migration this build knows, oldest first: `(version, SQL)`. Append only: a shipped
/// file is never edited, a change is a new file with the next version.
pub(super) const MIGRATIONS: &[(u32, &str)] = &[
    (
        1,
        include_str!("../../../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        include_str!("../../../migrations/postgres/0002_fleet.sql"),
    ),
    (
        3,
        include_str!("../../../migrations/postgres/0003_call_id.sql"),
    ),
    (
        4,
        include_str!("../../../migrations/postgres/0004_webhook_outbox.sql"),
    ),
];

/// Newest schema version this build knows: the last migration's.
pub const SCHEMA_VERSION: u32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// Advisory lock held while migrating, so that replicas starting together migrate once.
const MIGRATION_LOCK: i64 = 0x6d67_6c65_6467_0001;
/// Advisory lock held while creating or dropping partitions of `calls`.
pub(super) const PARTITION_LOCK: i64 = 0x6d67_6c65_6467_0002;

/// Creates the partitions of `months` that do not exist yet, under the partition lock.
pub(super) async fn create_partitions(
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
pub(super) async fn schema_version(client: &impl GenericClient) -> anyhow::Result<Option<u32>> {
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
pub(super) fn refuse_newer(version: u32) -> anyhow::Result<()> {
    anyhow::ensure!(
        version <= SCHEMA_VERSION,
        "the postgresql ledger has schema version {version}, newer than this mantlegate knows ({SCHEMA_VERSION}): upgrade mantlegate"
    );
    Ok(())
}

/// Applies the missing migrations in one transaction under the migration lock.
pub(super) async fn apply_migrations(
    client: &mut tokio_postgres::Client,
) -> anyhow::Result<Vec<u32>> {
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
