//! The webhook outbox: budget alerts waiting for delivery, kept in the ledger so that a
//! restart, or another replica sharing the ledger, resumes them.
//!
//! A row is claimed for one attempt at a time under a lease: while any row's lease runs, no
//! other claim succeeds (the endpoint has its one request), and a claimant that dies mid-attempt
//! only holds the endpoint until its lease ends. The SQLite ([`super::sqlite::SqliteOutbox`]),
//! `PostgreSQL` ([`super::postgres::PgFleet`]) and in-memory ([`MemoryOutbox`]) stores keep the
//! same rules; the delivery itself is `crate::webhook`'s.

use std::sync::Mutex;

/// An alert waiting for delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The alert's stable id: the `Idempotency-Key` of every attempt, on every replica.
    pub id: String,
    /// When the alert was raised, Unix ms (it is given up a fixed time after).
    pub created_ms: i64,
    /// The JSON body, exactly as every attempt sends it.
    pub body: String,
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This row is the claimant's until its lease ends: attempt it now. `attempt` counts from 1.
    Row { entry: Entry, attempt: u32 },
    /// Another attempt holds the endpoint until `until_ms` (a lease, possibly another
    /// replica's).
    Busy { until_ms: i64 },
    /// Nothing due now; the earliest next attempt (None: the outbox is empty).
    Idle { next_ms: Option<i64> },
}

/// Where alerts wait. Blocking: call from a blocking thread.
pub trait Outbox: Send + Sync {
    /// Adds entries, due at once; an id already there is left as it is.
    ///
    /// # Errors
    /// Storage errors; nothing was added then.
    fn add(&self, entries: &[Entry]) -> anyhow::Result<()>;

    /// Claims the due row with the earliest next attempt for `owner` until `lease_until_ms`,
    /// unless a lease runs at `now_ms`.
    ///
    /// # Errors
    /// Storage errors.
    fn claim(&self, owner: &str, now_ms: i64, lease_until_ms: i64) -> anyhow::Result<Claim>;

    /// Removes a delivered row.
    ///
    /// # Errors
    /// Storage errors (the row stays, and is delivered again once its lease ends).
    fn delivered(&self, id: &str) -> anyhow::Result<()>;

    /// Ends `owner`'s lease on a row whose attempt failed; it is due again at `next_ms`.
    /// Nothing happens when the lease is no longer `owner`'s.
    ///
    /// # Errors
    /// Storage errors.
    fn failed(&self, id: &str, owner: &str, next_ms: i64) -> anyhow::Result<()>;

    /// Removes and returns the rows created before `created_before_ms` that no lease holds at
    /// `now_ms`: alerts given up.
    ///
    /// # Errors
    /// Storage errors.
    fn expire(&self, created_before_ms: i64, now_ms: i64) -> anyhow::Result<Vec<Entry>>;

    /// Drops the leases a previous process left (a store no other process shares); a shared
    /// store keeps them until they end.
    ///
    /// # Errors
    /// Storage errors.
    fn release_stale(&self) -> anyhow::Result<()> {
        Ok(())
    }
}

/// One row of an outbox, as the stores keep it.
#[derive(Debug, Clone)]
struct Row {
    entry: Entry,
    attempts: u32,
    next_ms: i64,
    lease_owner: Option<String>,
    lease_until_ms: i64,
}

/// The outbox of a proxy without a ledger: in memory, lost with the process.
#[derive(Debug, Default)]
pub struct MemoryOutbox {
    rows: Mutex<Vec<Row>>,
}

impl MemoryOutbox {
    fn rows(&self) -> anyhow::Result<std::sync::MutexGuard<'_, Vec<Row>>> {
        self.rows
            .lock()
            .map_err(|_| anyhow::anyhow!("outbox poisoned"))
    }
}

impl Outbox for MemoryOutbox {
    fn add(&self, entries: &[Entry]) -> anyhow::Result<()> {
        let mut rows = self.rows()?;
        for e in entries {
            if rows.iter().all(|r| r.entry.id != e.id) {
                rows.push(Row {
                    entry: e.clone(),
                    attempts: 0,
                    next_ms: e.created_ms,
                    lease_owner: None,
                    lease_until_ms: 0,
                });
            }
        }
        Ok(())
    }

    fn claim(&self, owner: &str, now_ms: i64, lease_until_ms: i64) -> anyhow::Result<Claim> {
        let mut rows = self.rows()?;
        if let Some(until_ms) = rows
            .iter()
            .map(|r| r.lease_until_ms)
            .filter(|&u| u > now_ms)
            .max()
        {
            return Ok(Claim::Busy { until_ms });
        }
        let due = rows
            .iter_mut()
            .filter(|r| r.next_ms <= now_ms)
            .min_by_key(|r| (r.next_ms, r.entry.created_ms));
        if let Some(row) = due {
            row.attempts += 1;
            row.lease_owner = Some(owner.to_owned());
            row.lease_until_ms = lease_until_ms;
            return Ok(Claim::Row {
                entry: row.entry.clone(),
                attempt: row.attempts,
            });
        }
        Ok(Claim::Idle {
            next_ms: rows.iter().map(|r| r.next_ms).min(),
        })
    }

    fn delivered(&self, id: &str) -> anyhow::Result<()> {
        self.rows()?.retain(|r| r.entry.id != id);
        Ok(())
    }

    fn failed(&self, id: &str, owner: &str, next_ms: i64) -> anyhow::Result<()> {
        for r in self.rows()?.iter_mut() {
            if r.entry.id == id && r.lease_owner.as_deref() == Some(owner) {
                r.next_ms = next_ms;
                r.lease_owner = None;
                r.lease_until_ms = 0;
            }
        }
        Ok(())
    }

    fn expire(&self, created_before_ms: i64, now_ms: i64) -> anyhow::Result<Vec<Entry>> {
        let mut rows = self.rows()?;
        let mut gone = Vec::new();
        rows.retain(|r| {
            let expired = r.entry.created_ms < created_before_ms && r.lease_until_ms <= now_ms;
            if expired {
                gone.push(r.entry.clone());
            }
            !expired
        });
        Ok(gone)
    }

    fn release_stale(&self) -> anyhow::Result<()> {
        for r in self.rows()?.iter_mut() {
            r.lease_owner = None;
            r.lease_until_ms = 0;
        }
        Ok(())
    }
}

/// The rules every store keeps, run against `store` (its unit tests call this).
#[cfg(test)]
pub(crate) fn check_store(store: &dyn Outbox) {
    let entry = |id: &str, created_ms| Entry {
        id: id.to_owned(),
        created_ms,
        body: format!(r#"{{"id":"{id}"}}"#),
    };
    assert_eq!(
        store.claim("a", 0, 10).expect("claim"),
        Claim::Idle { next_ms: None }
    );
    store.add(&[entry("b", 200), entry("a", 100)]).expect("add");
    // Adding an id again changes nothing.
    store.add(&[entry("a", 999)]).expect("add again");
    // The oldest due row first.
    let got = store.claim("one", 1000, 5000).expect("claim");
    assert_eq!(
        got,
        Claim::Row {
            entry: entry("a", 100),
            attempt: 1
        }
    );
    // While its lease runs, nobody else gets a row, whatever is due.
    assert_eq!(
        store.claim("two", 1001, 6000).expect("claim"),
        Claim::Busy { until_ms: 5000 }
    );
    // Only the lease's owner puts it back.
    store.failed("a", "two", 1).expect("failed");
    assert_eq!(
        store.claim("two", 1002, 6000).expect("claim"),
        Claim::Busy { until_ms: 5000 }
    );
    store.failed("a", "one", 3000).expect("failed");
    // Then "b" is the due one; "a" waits for 3000.
    let got = store.claim("two", 1003, 2000).expect("claim");
    assert_eq!(
        got,
        Claim::Row {
            entry: entry("b", 200),
            attempt: 1
        }
    );
    store.delivered("b").expect("delivered");
    assert_eq!(
        store.claim("two", 2500, 9000).expect("claim"),
        Claim::Idle {
            next_ms: Some(3000)
        }
    );
    // A lease that ran out (its owner died mid-attempt) frees the row at its next attempt.
    let got = store.claim("one", 3000, 3100).expect("claim");
    assert_eq!(
        got,
        Claim::Row {
            entry: entry("a", 100),
            attempt: 2
        }
    );
    assert!(matches!(
        store.claim("two", 3050, 9000),
        Ok(Claim::Busy { .. })
    ));
    assert_eq!(
        store.claim("two", 3100, 9000).expect("claim"),
        Claim::Row {
            entry: entry("a", 100),
            attempt: 3
        }
    );
    // A leased row is not given up under its attempt; once free, it is.
    assert_eq!(store.expire(150, 3200).expect("expire"), Vec::new());
    store.failed("a", "two", 4000).expect("failed");
    store.add(&[entry("c", 300)]).expect("add");
    assert_eq!(
        store.expire(150, 3200).expect("expire"),
        vec![entry("a", 100)]
    );
    // A previous process's lease, released at start.
    assert!(matches!(
        store.claim("old", 3300, 99_999),
        Ok(Claim::Row { .. })
    ));
    store.release_stale().expect("release");
    assert!(matches!(
        store.claim("new", 3301, 9999),
        Ok(Claim::Row { entry, attempt: 2 }) if entry.id == "c"
    ));
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_memory_outbox_keeps_the_rules() {
        super::check_store(&super::MemoryOutbox::default());
    }
}
