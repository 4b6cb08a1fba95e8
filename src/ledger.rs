//! The cost ledger: one record per call, written in batches by one background writer, off the
//! request path, behind a small storage trait.

pub mod outbox;
pub mod postgres;
pub mod read;
pub mod sqlite;
pub mod transfer;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::meter::{Usage, UsageSource};

/// One call, as the ledger keeps it.
#[derive(Debug, Clone)]
pub struct Record {
    /// mantlegate's own id for the call ([`new_call_id`]): the ledger's identity for it, the
    /// one unique key of `calls`.
    pub call_id: String,
    /// Arrival time, Unix milliseconds (UTC).
    pub ts_ms: i64,
    /// The id the client saw in `x-request-id`: the upstream's when it sent one, which may be
    /// anything a client or gateway chose. A plain column, never an identity: many calls can
    /// share it.
    pub request_id: String,
    /// Name of the caller's key.
    pub key: Option<Arc<str>>,
    /// The key's fingerprint: the first 12 hex digits of its SHA-256.
    pub key_fp: Option<Arc<str>>,
    /// Route prefix the call came through.
    pub route: Option<Arc<str>>,
    /// Project name.
    pub project: Option<Arc<str>>,
    /// Bedrock project ID.
    pub project_id: Option<Arc<str>>,
    /// The project's tags at that moment, as a JSON object.
    pub tags: Option<Arc<str>>,
    /// API family (`chat.completions`, `responses`, `models`).
    pub api: Option<&'static str>,
    /// Model named in the body.
    pub model: Option<String>,
    /// Whether the client asked for a stream.
    pub stream: bool,
    /// Status sent to the client.
    pub status: u16,
    /// `forwarded`, `rejected`, `upstream_error`, `client_disconnect`, `client_stalled`.
    pub outcome: &'static str,
    /// mantlegate's error code, when it refused or failed the call.
    pub error_code: Option<&'static str>,
    /// Token counts.
    pub usage: Usage,
    /// Where the counts came from.
    pub usage_source: UsageSource,
    /// Cost in pico-dollars (1e-12 USD); `None` when the model has no price.
    pub cost_pico: Option<i64>,
    /// Total duration, ms.
    pub duration_ms: f64,
    /// Time to the first body byte, ms.
    pub ttfb_ms: Option<f64>,
    /// The upstream's response id (`resp_...`), for Responses calls.
    pub upstream_response_id: Option<String>,
    /// A background response this call created (`pending`) or whose usage it settles.
    pub background: Option<Background>,
    /// The budgets the call counts against, each with its month (`YYYY-MM` in the budget's
    /// time zone): the `PostgreSQL` ledger adds the call's cost to each in the same
    /// transaction as the call (the fleet's shared month-to-date figure). SQLite ignores it.
    pub budget_months: Vec<(Arc<str>, Arc<str>)>,
}

/// The roll-up model of a call the upstream did not answer with success: its model is
/// whatever the client wrote, and must not grow the daily roll-up.
pub const REJECTED_MODEL: &str = "(rejected)";
/// The roll-up model of calls to models past a key's `[ledger] max_models_per_day` that day.
pub const OTHER_MODEL: &str = "(other)";

impl Record {
    /// The model this call is rolled up under before the per-day cap: the real one when the
    /// upstream answered with success, else [`REJECTED_MODEL`].
    #[must_use]
    pub fn rollup_model(&self) -> &str {
        if (200..300).contains(&self.status) {
            self.model.as_deref().unwrap_or("")
        } else {
            REJECTED_MODEL
        }
    }
}

/// A plain forwarded call's record, for tests to vary with struct update syntax.
#[cfg(test)]
pub(crate) fn sample_record(ts_ms: i64) -> Record {
    Record {
        call_id: new_call_id(ts_ms),
        ts_ms,
        request_id: format!("mg_{ts_ms}"),
        key: Some(Arc::from("alice")),
        key_fp: Some(Arc::from("abcdef012345")),
        route: None,
        project: Some(Arc::from("search")),
        project_id: Some(Arc::from("proj_1")),
        tags: Some(Arc::from(r#"{"team":"core"}"#)),
        api: Some("chat.completions"),
        model: Some("gpt-x".to_owned()),
        stream: false,
        status: 200,
        outcome: "forwarded",
        error_code: None,
        usage: Usage {
            input: 10,
            cached_input: 2,
            output: 5,
            reasoning: 1,
        },
        usage_source: UsageSource::Reported,
        cost_pico: Some(1_234_567),
        duration_ms: 12.345_678_901_234_5,
        ttfb_ms: Some(0.1 + 0.2),
        upstream_response_id: None,
        background: None,
        budget_months: Vec::new(),
    }
}

/// A new call id: `mg_`, the arrival time (Unix ms) in 12 hex digits, then 80 random bits in 20.
///
/// Unique across replicas without coordination: two calls collide only if they arrive in the
/// same millisecond and draw the same 80 bits. Time first, so that ids sort by arrival and a
/// new id lands at the end of the unique index on `calls` (SQLite and `PostgreSQL` B-trees
/// append to their last page instead of dirtying a random one per call, as 128 purely random
/// bits would), and so that an id says when its call arrived.
#[must_use]
pub fn new_call_id(ts_ms: i64) -> String {
    let time = u64::try_from(ts_ms).unwrap_or(0) & 0xffff_ffff_ffff;
    let random = rand::random::<u128>() >> 48;
    // 48 bits of time and 80 random bits, 32 hex digits, written into one buffer (every call
    // makes one, and `format!` of two integers costs several times more).
    let bits = (u128::from(time) << 80) | random;
    let mut id = [0u8; 3 + 32];
    id[..3].copy_from_slice(b"mg_");
    for (i, digit) in id[3..].iter_mut().enumerate() {
        *digit = b"0123456789abcdef"[((bits >> ((31 - i) * 4)) & 0xf) as usize];
    }
    // ASCII throughout, so never the empty default.
    String::from_utf8(id.to_vec()).unwrap_or_default()
}

/// The call id given to a call recorded before calls had ids (a migrated ledger row, or a line
/// of an older export): `mgr_` and the first 32 hex digits of the SHA-256 of
/// `"{request_id}\n{ts_ms}"`, the identity such calls had. `nth` counts the earlier calls
/// with the same request id and time (possible in a SQLite ledger or its export, where that
/// pair was never unique): `0` for the first, and from `1` the text gets `"\n{nth}"` appended.
/// Deterministic, so that importing the same old file again, or an old export of rows a
/// migration already named, finds the same ids. The `PostgreSQL` migration computes the same
/// (`migrations/postgres/0003_call_id.sql`).
#[must_use]
pub fn legacy_call_id(request_id: &str, ts_ms: i64, nth: u64) -> String {
    use sha2::Digest as _;
    let mut hash = sha2::Sha256::new();
    hash.update(request_id.as_bytes());
    hash.update(format!("\n{ts_ms}").as_bytes());
    if nth > 0 {
        hash.update(format!("\n{nth}").as_bytes());
    }
    let digest = hash.finalize();
    format!("mgr_{}", hex::encode(&digest[..16]))
}

/// The background-response bookkeeping a record carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Background {
    /// The call created a background response that is not finished yet.
    Pending,
    /// The call returned the finished background response: its usage is metered here, once.
    Settled,
}

/// Where ledger records are stored. Implementations are used from the writer thread only
/// (writes) and from report/lookup callers (reads, on their own connections).
pub trait Store: Send {
    /// Writes records in one transaction, with their daily roll-ups.
    ///
    /// # Errors
    /// Storage errors; the batch is retried as a whole.
    fn write_batch(&mut self, records: &[Record]) -> anyhow::Result<()>;

    /// Writes every batch `next` yields in one transaction, committed once `next` returns
    /// `None`: all of them, or, at the first error of `next` or of the storage, none (an
    /// import). Calls the ledger has (same call id) are skipped, as by `write_batch`.
    ///
    /// # Errors
    /// The first error; nothing was written then.
    fn write_all(
        &mut self,
        next: &mut dyn FnMut() -> anyhow::Result<Option<Vec<Record>>>,
    ) -> anyhow::Result<()>;
}

/// Read access to a ledger, shared by the server (lookups, budgets, reports) and the CLI.
/// Blocking: call from a blocking thread (`spawn_blocking`) on the server.
pub trait LedgerRead: Send + Sync {
    /// The project id a Responses object was created under: `Ok(None)` when the ledger
    /// answered and knows no such response, `Err` when it could not answer (callers that
    /// guard ownership must then refuse, not treat it as unknown).
    ///
    /// # Errors
    /// Storage errors, and (`PostgreSQL`) no answer within 2 s.
    fn project_of_response(&self, response_id: &str) -> anyhow::Result<Option<String>>;
    /// Background responses not yet metered: `(response id, project id, model)`.
    ///
    /// # Errors
    /// Storage errors.
    fn pending_background(&self) -> anyhow::Result<Vec<(String, String, Option<String>)>>;
    /// Priced spend in `[start_ms, end_ms)` per project and tag set:
    /// `(project name, tags JSON, pico-dollars)`.
    ///
    /// # Errors
    /// Storage errors.
    fn spend_between(
        &self,
        start_ms: i64,
        end_ms: i64,
    ) -> anyhow::Result<Vec<(String, String, i64)>>;
    /// Last call time (Unix ms) per key fingerprint.
    ///
    /// # Errors
    /// Storage errors.
    fn last_used(&self) -> anyhow::Result<std::collections::HashMap<String, i64>>;
    /// The per-day roll-up rows of a period.
    ///
    /// # Errors
    /// Storage errors.
    fn daily(&self, period: &read::Period) -> anyhow::Result<Vec<read::DailyRow>>;
    /// Number of call records.
    ///
    /// # Errors
    /// Storage errors.
    fn count(&self) -> anyhow::Result<i64>;
}

/// Ledger statistics exported as metrics.
#[derive(Debug, Default)]
pub struct LedgerStats {
    /// Records accepted and not yet committed.
    pub queued: AtomicU64,
    /// Records committed.
    pub written: AtomicU64,
    /// Records refused because the queue was full.
    pub dropped: AtomicU64,
    /// Failed batch writes (each is retried).
    pub write_errors: AtomicU64,
    /// Notified after each committed batch (for waiting on the ledger without polling).
    pub committed: tokio::sync::Notify,
}

/// What the writer thread receives.
enum Msg {
    Record(Box<Record>),
    /// Write everything queued before this, then stop.
    Stop,
}

/// The writer thread's name, as `ps -L`, `top -H` and `/proc/PID/task/*/comm` show it.
pub const WRITER_THREAD: &str = "ledger-writer";

/// Handle used by the request path: `record` never blocks and never awaits.
#[derive(Clone)]
pub struct Ledger {
    tx: SyncSender<Msg>,
    /// Counters for metrics.
    pub stats: Arc<LedgerStats>,
}

/// Owns the writer thread; `close` flushes everything and waits for it.
pub struct LedgerWriter {
    thread: JoinHandle<()>,
    shutdown: Arc<std::sync::OnceLock<Spill>>,
}

/// Where a writer that cannot reach its storage by a deadline at shutdown puts what it holds.
struct Spill {
    deadline: std::time::Instant,
    path: std::path::PathBuf,
}

/// Most records one transaction takes.
const MAX_BATCH: usize = 4096;

/// How often the writer takes what has arrived and commits it together.
const LINGER: Duration = Duration::from_millis(50);

impl Ledger {
    /// Starts the writer thread over `store`, with a queue of `capacity` records.
    ///
    /// # Errors
    /// When the thread cannot be spawned.
    pub fn start(store: Box<dyn Store>, capacity: usize) -> anyhow::Result<(Self, LedgerWriter)> {
        Self::start_with(store, capacity, Box::new(|_| {}))
    }

    /// As [`Ledger::start`], calling `on_committed` with each batch once it is committed (on
    /// the writer thread: it must be quick).
    ///
    /// # Errors
    /// When the thread cannot be spawned.
    pub fn start_with(
        store: Box<dyn Store>,
        capacity: usize,
        on_committed: Box<OnCommitted>,
    ) -> anyhow::Result<(Self, LedgerWriter)> {
        let (tx, rx) = sync_channel(capacity);
        let stats = Arc::new(LedgerStats::default());
        let thread_stats = stats.clone();
        let shutdown = Arc::new(std::sync::OnceLock::new());
        let thread_shutdown = shutdown.clone();
        let thread = std::thread::Builder::new()
            .name(WRITER_THREAD.to_owned())
            .spawn(move || {
                write_loop(store, &rx, &thread_stats, &*on_committed, &thread_shutdown);
            })?;
        Ok((Self { tx, stats }, LedgerWriter { thread, shutdown }))
    }

    /// Queues a record for the writer. Never blocks: when the queue is full (storage stalled
    /// for the whole queue's worth of calls) the record is counted as dropped and logged.
    pub fn record(&self, record: Record) {
        self.stats.queued.fetch_add(1, Ordering::Relaxed);
        match self.tx.try_send(Msg::Record(Box::new(record))) {
            Ok(()) => {}
            Err(TrySendError::Full(m) | TrySendError::Disconnected(m)) => {
                self.stats.queued.fetch_sub(1, Ordering::Relaxed);
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                if let Msg::Record(r) = m {
                    tracing::error!(call_id = %r.call_id, request_id = %r.request_id, "ledger queue full or closed: record dropped");
                }
            }
        }
    }
}

impl LedgerWriter {
    /// Writes every record queued so far, stops the writer and waits for it. If the storage
    /// still refuses writes after `within`, the records not written go to `spill` as JSON
    /// lines that `mantlegate ledger import` takes, and the writer stops: a shutdown never
    /// hangs on an unreachable database, and loses nothing.
    pub fn close_within(self, ledger: &Ledger, within: Duration, spill: std::path::PathBuf) {
        let _ = self.shutdown.set(Spill {
            deadline: std::time::Instant::now() + within,
            path: spill,
        });
        self.close(ledger);
    }

    /// Writes every record queued so far, stops the writer and waits for it.
    pub fn close(self, ledger: &Ledger) {
        // A blocking send: on shutdown, waiting for room in the queue is right.
        let _ = ledger.tx.send(Msg::Stop);
        if self.thread.join().is_err() {
            tracing::error!("ledger writer thread panicked");
        }
    }
}

/// Told of each committed batch.
pub type OnCommitted = dyn Fn(&[Record]) + Send;

fn write_loop(
    mut store: Box<dyn Store>,
    rx: &Receiver<Msg>,
    stats: &LedgerStats,
    on_committed: &OnCommitted,
    shutdown: &std::sync::OnceLock<Spill>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut stop = false;
    let mut full = false;
    // Group commit by polling: every LINGER, take what has arrived (up to MAX_BATCH) in one
    // transaction. Never blocking on the channel matters: a sender never finds a receiver
    // waiting, so queueing a record stays a few atomic operations and never a wake-up of
    // this thread (a syscall and, on a busy core, two context switches). Idle, it is 20
    // wake-ups a second. A record waits at most LINGER plus the write, far inside the
    // one-second durability promise. Ends on Stop, or when every sender is gone.
    while !stop {
        if !full {
            std::thread::sleep(LINGER);
        }
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(Msg::Record(r)) => batch.push(*r),
                Ok(Msg::Stop) | Err(TryRecvError::Disconnected) => {
                    stop = true;
                    break;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        full = batch.len() == MAX_BATCH;
        if batch.is_empty() {
            continue;
        }
        let mut backoff = Duration::from_millis(50);
        loop {
            match store.write_batch(&batch) {
                Ok(()) => break,
                Err(err) => {
                    // Keep the batch and retry: a completed call's record is never given up.
                    stats.write_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(error = %format!("{err:#}"), records = batch.len(), "ledger write failed; retrying");
                    if let Some(spill) = shutdown.get() {
                        let now = std::time::Instant::now();
                        if now >= spill.deadline {
                            spill_all(batch, rx, spill, stats);
                            return;
                        }
                        std::thread::sleep(backoff.min(spill.deadline - now));
                    } else {
                        std::thread::sleep(backoff);
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        on_committed(&batch);
        let n = batch.len() as u64;
        stats.queued.fetch_sub(n, Ordering::Relaxed);
        stats.written.fetch_add(n, Ordering::Relaxed);
        stats.committed.notify_waiters();
        batch.clear();
    }
}

/// Shutdown with the storage unreachable: writes `batch` and everything still queued to the
/// spill file as export lines, or, failing that, logs each record whole (the log is then the
/// only copy).
fn spill_all(mut batch: Vec<Record>, rx: &Receiver<Msg>, spill: &Spill, stats: &LedgerStats) {
    while let Ok(msg) = rx.try_recv() {
        if let Msg::Record(r) = msg {
            batch.push(*r);
        }
    }
    let written = std::fs::File::create(&spill.path)
        .map(std::io::BufWriter::new)
        .and_then(|mut out| {
            use std::io::Write as _;
            for r in &batch {
                serde_json::to_writer(&mut out, &transfer::CallRow::from_record(r))?;
                out.write_all(b"\n")?;
            }
            out.flush()?;
            out.into_inner()
                .map_err(std::io::IntoInnerError::into_error)?
                .sync_all()
        });
    match written {
        Ok(()) => tracing::error!(
            records = batch.len(),
            file = %spill.path.display(),
            "ledger unreachable at shutdown: the records not written are in the file; load them with `mantlegate ledger import --config FILE --input {}`",
            spill.path.display()
        ),
        Err(err) => {
            tracing::error!(error = %err, records = batch.len(), file = %spill.path.display(), "ledger unreachable at shutdown and the spill file cannot be written: the records follow, one per line");
            for r in &batch {
                if let Ok(line) = serde_json::to_string(&transfer::CallRow::from_record(r)) {
                    tracing::error!(record = %line, "unwritten ledger record");
                }
            }
        }
    }
    let n = batch.len() as u64;
    stats.queued.fetch_sub(
        n.min(stats.queued.load(Ordering::Relaxed)),
        Ordering::Relaxed,
    );
}

#[cfg(test)]
mod tests {
    use super::{legacy_call_id, new_call_id};

    #[test]
    fn call_ids_are_unique_and_begin_with_their_time() {
        let ts = 1_793_491_200_123;
        let ids: std::collections::HashSet<String> = (0..10_000).map(|_| new_call_id(ts)).collect();
        assert_eq!(ids.len(), 10_000, "80 random bits per millisecond");
        for id in &ids {
            assert_eq!(id.len(), 3 + 32, "{id}");
            assert!(id.starts_with(&format!("mg_{ts:012x}")), "{id}");
            assert!(id[3..].bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        }
        // Later calls sort after earlier ones.
        assert!(new_call_id(ts) < new_call_id(ts + 1));
        assert!(new_call_id(-5).starts_with("mg_000000000000"));
    }

    #[test]
    fn legacy_ids_follow_the_request_id_time_and_rank() {
        // sha256("req_1\n1700000000000"), as the PostgreSQL migration computes it.
        assert_eq!(
            legacy_call_id("req_1", 1_700_000_000_000, 0),
            "mgr_3cda8a0865fb7434710f758c21c99e82"
        );
        let first = legacy_call_id("req_1", 1_700_000_000_000, 0);
        assert_eq!(first, legacy_call_id("req_1", 1_700_000_000_000, 0));
        for other in [
            legacy_call_id("req_1", 1_700_000_000_000, 1),
            legacy_call_id("req_1", 1_700_000_000_001, 0),
            legacy_call_id("req_2", 1_700_000_000_000, 0),
        ] {
            assert_ne!(first, other);
        }
    }
}
