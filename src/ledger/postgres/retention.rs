//! Retention (`[ledger] retention_months`): the partitions of `calls` past the kept months
//! are dropped whole; `daily` and `budget_spend` stay.

use anyhow::Context as _;

use super::schema::PARTITION_LOCK;
use super::{DDL_LOCK_TIMEOUT, Db, MonthKey, PgFleet};

/// Names of the partitions of `calls`, oldest first.
pub(super) fn partitions(db: &Db) -> anyhow::Result<Vec<String>> {
    db.query(|c| async move {
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

impl PgFleet {
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
        let doomed: Vec<String> = partitions(self.db())?
            .into_iter()
            .filter(|name| MonthKey::of_partition(name).is_some_and(|m| m < cutoff))
            .collect();
        if doomed.is_empty() {
            return Ok(doomed);
        }
        self.db().query(move |mut c| async move {
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
