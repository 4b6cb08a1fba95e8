//! The response index: the project of each response created here, the background ones still to bill.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

use crate::ledger::LedgerRead;

/// How long the index keeps a response's owner: long past the ledger's commit (after it,
/// lookups go to the ledger's index), short enough that the index stays small (at 1,000
/// responses a second, about 20 MiB).
pub const OWNER_TTL: Duration = Duration::from_mins(2);

/// How often [`ResponseIndex::prune_periodically`] drops the owners past [`OWNER_TTL`].
const PRUNE_EVERY: Duration = Duration::from_secs(15);

/// A background response waiting to be seen finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingBackground {
    /// Project id it was created under.
    pub project_id: Arc<str>,
    /// Model it was created with (its GET has no body to name it).
    pub model: Option<String>,
}

/// Response ids this process knows about: the owners of the Responses objects created through
/// it (kept for [`OWNER_TTL`], the moment until the ledger has the record), and the background
/// responses not yet metered (kept until an answer shows one finished with its usage).
#[derive(Debug, Default)]
pub struct ResponseIndex {
    /// Response id -> project id it was created under, and when it was recorded.
    owners: DashMap<String, (Arc<str>, Instant)>,
    /// Background responses not yet metered (response id -> what created them).
    pending: DashMap<String, PendingBackground>,
}

impl ResponseIndex {
    /// Records that response `id` was created under project `project_id`, now.
    pub fn record_owner(&self, id: String, project_id: Arc<str>) {
        self.owners.insert(id, (project_id, Instant::now()));
    }

    /// The project id response `id` was created under, when it was created through this
    /// process within [`OWNER_TTL`] (else the ledger knows).
    #[must_use]
    pub fn owner(&self, id: &str) -> Option<Arc<str>> {
        self.owners.get(id).map(|entry| entry.value().0.clone())
    }

    /// Records background response `id` as pending: its usage comes with the first answer
    /// that shows it finished.
    pub fn add_pending(&self, id: String, pending: PendingBackground) {
        self.pending.insert(id, pending);
    }

    /// Whether background response `id` is pending here.
    #[must_use]
    pub fn is_pending(&self, id: &str) -> bool {
        self.pending.contains_key(id)
    }

    /// Takes background response `id` out of the pending ones, to bill it: `None` when it is
    /// not pending (never was, or another answer billed it already).
    #[must_use]
    pub fn take_pending(&self, id: &str) -> Option<PendingBackground> {
        self.pending.remove(id).map(|(_, pending)| pending)
    }

    /// Drops the owners recorded more than [`OWNER_TTL`] before `now` (lookups of them go to
    /// the ledger). Pending background responses stay until billed.
    pub fn prune(&self, now: Instant) {
        if let Some(cutoff) = now.checked_sub(OWNER_TTL) {
            self.owners.retain(|_, (_, at)| *at >= cutoff);
        }
    }

    /// Prunes the owners (see [`ResponseIndex::prune`]) every 15 seconds, forever: the index
    /// only bridges the moment until the ledger has the record.
    pub async fn prune_periodically(&self) {
        let mut tick = tokio::time::interval(PRUNE_EVERY);
        loop {
            tick.tick().await;
            self.prune(Instant::now());
        }
    }

    /// Takes in the background responses the ledger still holds as pending (created, never
    /// seen finished): after a restart, the first answer that shows one finished bills it.
    /// Returns how many there were.
    ///
    /// # Errors
    /// Storage errors of the read.
    pub fn seed_from_ledger(&self, reader: &dyn LedgerRead) -> anyhow::Result<usize> {
        let pending = reader.pending_background()?;
        let n = pending.len();
        for (id, project, model) in pending {
            self.add_pending(
                id,
                PendingBackground {
                    project_id: project.into(),
                    model,
                },
            );
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(project: &str, model: Option<&str>) -> PendingBackground {
        PendingBackground {
            project_id: project.into(),
            model: model.map(str::to_owned),
        }
    }

    #[test]
    fn owners_are_found_by_exact_id() {
        let index = ResponseIndex::default();
        assert_eq!(index.owner("resp_1"), None);
        index.record_owner("resp_1".to_owned(), "proj_a".into());
        index.record_owner("resp_2".to_owned(), "proj_b".into());
        assert_eq!(index.owner("resp_1").as_deref(), Some("proj_a"));
        assert_eq!(index.owner("resp_2").as_deref(), Some("proj_b"));
        for other in ["", "resp_", "resp_10", "RESP_1", "resp_1 "] {
            assert_eq!(index.owner(other), None, "{other:?}");
        }
        // Recording an id again names its latest owner.
        index.record_owner("resp_1".to_owned(), "proj_c".into());
        assert_eq!(index.owner("resp_1").as_deref(), Some("proj_c"));
    }

    #[test]
    fn owners_are_pruned_after_the_ttl_and_pending_ones_are_not() {
        let index = ResponseIndex::default();
        let before = Instant::now();
        index.record_owner("resp_1".to_owned(), "proj_a".into());
        index.add_pending("resp_1".to_owned(), pending("proj_a", Some("m")));
        // Within the TTL: kept.
        index.prune(Instant::now());
        index.prune(before + OWNER_TTL);
        assert_eq!(index.owner("resp_1").as_deref(), Some("proj_a"));
        // Past it: the owner goes (the ledger answers for it), the pending response stays.
        index.prune(Instant::now() + OWNER_TTL + Duration::from_millis(1));
        assert_eq!(index.owner("resp_1"), None);
        assert!(index.is_pending("resp_1"));
    }

    #[test]
    fn a_pending_response_is_taken_once() {
        let index = ResponseIndex::default();
        assert!(!index.is_pending("resp_bg"));
        assert_eq!(index.take_pending("resp_bg"), None);
        index.add_pending("resp_bg".to_owned(), pending("proj_a", Some("gpt")));
        assert!(index.is_pending("resp_bg"));
        assert!(!index.is_pending("resp_bg2"));
        // Pending is not owned: ownership comes from `record_owner` or the ledger.
        assert_eq!(index.owner("resp_bg"), None);
        assert_eq!(
            index.take_pending("resp_bg"),
            Some(pending("proj_a", Some("gpt")))
        );
        assert!(!index.is_pending("resp_bg"));
        assert_eq!(index.take_pending("resp_bg"), None);
    }

    #[test]
    fn taking_a_pending_response_races_to_one_winner() {
        let index = Arc::new(ResponseIndex::default());
        index.add_pending("resp_bg".to_owned(), pending("proj_a", None));
        let winners = std::thread::scope(|s| {
            let takers: Vec<_> = (0..8)
                .map(|_| s.spawn(|| index.take_pending("resp_bg").is_some()))
                .collect();
            takers
                .into_iter()
                .map(|t| t.join().expect("taker"))
                .filter(|won| *won)
                .count()
        });
        assert_eq!(winners, 1);
    }

    /// A ledger whose only content is its pending background responses.
    struct Pending(anyhow::Result<Vec<(String, String, Option<String>)>>);

    impl LedgerRead for Pending {
        fn project_of_response(&self, _: &str) -> anyhow::Result<Option<String>> {
            Ok(None)
        }
        fn pending_background(&self) -> anyhow::Result<Vec<(String, String, Option<String>)>> {
            match &self.0 {
                Ok(rows) => Ok(rows.clone()),
                Err(err) => Err(anyhow::anyhow!("{err}")),
            }
        }
        fn spend_between(&self, _: i64, _: i64) -> anyhow::Result<Vec<(String, String, i64)>> {
            Ok(Vec::new())
        }
        fn last_used(&self) -> anyhow::Result<std::collections::HashMap<String, i64>> {
            Ok(std::collections::HashMap::new())
        }
        fn daily(&self, _: &crate::report::Period) -> anyhow::Result<Vec<crate::report::DailyRow>> {
            Ok(Vec::new())
        }
        fn count(&self) -> anyhow::Result<i64> {
            Ok(0)
        }
    }

    #[test]
    fn seeding_takes_in_every_pending_response_of_the_ledger() {
        let index = ResponseIndex::default();
        index.add_pending("resp_here".to_owned(), pending("proj_a", None));
        let ledger = Pending(Ok(vec![
            (
                "resp_1".to_owned(),
                "proj_a".to_owned(),
                Some("m1".to_owned()),
            ),
            ("resp_2".to_owned(), "proj_b".to_owned(), None),
        ]));
        assert_eq!(index.seed_from_ledger(&ledger).expect("seed"), 2);
        assert_eq!(
            index.take_pending("resp_1"),
            Some(pending("proj_a", Some("m1")))
        );
        assert_eq!(index.take_pending("resp_2"), Some(pending("proj_b", None)));
        assert!(index.is_pending("resp_here"));
        // Seeding says nothing of owners: the ledger answers for those.
        assert_eq!(index.owner("resp_1"), None);
    }

    #[test]
    fn a_failed_seed_is_an_error_and_changes_nothing() {
        let index = ResponseIndex::default();
        let ledger = Pending(Err(anyhow::anyhow!("disk I/O error")));
        let err = index.seed_from_ledger(&ledger).expect_err("fails");
        assert!(format!("{err:#}").contains("disk I/O error"), "{err:#}");
        assert!(!index.is_pending("resp_1"));
        assert_eq!(
            index
                .seed_from_ledger(&Pending(Ok(Vec::new())))
                .expect("empty"),
            0
        );
    }
}
